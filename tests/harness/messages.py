"""Test messages: the GTUBE and EICAR strings and a builder for well-formed messages.

    message(subject="hi", body="hello", attachments=[("eicar.txt", EICAR)]) -> bytes

The builder adds Date and Message-ID, so a clean message does not score on missing headers.
"""

from __future__ import annotations

import email.utils
from email.message import EmailMessage
from typing import Iterable, Mapping

GTUBE = "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"
EICAR = rb"X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"


def message(*, subject: str = "test message", body: str = "Hello,\n\nthis is a test.\n",
            sender: str = "Sender <sender@client.test>", to: str = "user@test.example",
            headers: Mapping[str, str] | None = None,
            attachments: Iterable[tuple[str, bytes]] = (),
            content_type: str = "application/octet-stream") -> bytes:
    """An RFC 5322 message as bytes (CRLF line ends); attachments are base64 parts."""
    m = EmailMessage()
    m["From"] = sender
    m["To"] = to
    m["Subject"] = subject
    m["Date"] = email.utils.formatdate(localtime=False)
    m["Message-ID"] = email.utils.make_msgid(domain="client.test")
    for k, v in (headers or {}).items():
        m[k] = v
    m.set_content(body)
    maintype, _, subtype = content_type.partition("/")
    for name, data in attachments:
        m.add_attachment(data, maintype=maintype, subtype=subtype, filename=name)
    return m.as_bytes(policy=m.policy.clone(linesep="\r\n"))
