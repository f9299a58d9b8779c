"""GTUBE: the Generic Test for Unsolicited Bulk Email, the spam filter's EICAR.

Searched in the subject and every *decoded* text part, so a base64- or QP-encoded GTUBE body
is found too (and the scan benchmark exercises real body decoding).
Symbols: GTUBE.
"""

from __future__ import annotations

from filterd.message import MessageView
from filterd.pipeline import Phase, ScanContext, check
from filterd.policy import Symbol

GTUBE = "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"


@check("gtube", phase=Phase.MAIN, symbols=("GTUBE",))
def gtube(msg: MessageView, ctx: ScanContext) -> list[Symbol]:
    if GTUBE in msg.subject or any(GTUBE in part.text for part in msg.text_parts):
        return [Symbol("GTUBE")]
    return []
