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


# A minimal Windows PE header: what the `filetype` library sniffs as application/x-msdownload.
PE = b"MZ" + b"\x90" * 58 + b"\x40\x00\x00\x00" + b"PE\x00\x00" + b"\x00" * 200


def ambiguous(kind: str, hidden_first: bool, *, name: str = "payload.exe", data: bytes = PE,
              subject: str = "ambiguous") -> bytes:
    """A message whose MIME structure has two readings (CVE-2024-28054's shape).

    kind "two-content-type": two Content-Type headers, boundaries AAA and BBB;
    kind "two-boundary":     one Content-Type header with boundary=AAA and boundary=BBB.
    Under AAA the message is one text part (holding the BBB lines as text); under BBB it is an
    attachment `name` with `data`. hidden_first=False puts AAA first, the reading that hides
    the attachment from a parser that takes the first header (or parameter); True puts BBB first.
    """
    import base64
    first, second = (b"BBB", b"AAA") if hidden_first else (b"AAA", b"BBB")
    if kind == "two-content-type":
        ctype = (b'Content-Type: multipart/mixed; boundary="' + first + b'"\r\n'
                 b'Content-Type: multipart/mixed; boundary="' + second + b'"\r\n')
    elif kind == "two-boundary":
        ctype = (b'Content-Type: multipart/mixed; boundary="' + first + b'";\r\n'
                 b' boundary="' + second + b'"\r\n')
    else:
        raise ValueError(kind)
    encoded = base64.encodebytes(data).replace(b"\n", b"\r\n")
    return (b"From: Sender <sender@client.test>\r\nTo: user@test.example\r\n"
            b"Subject: " + subject.encode() + b"\r\n"
            b"Date: " + email.utils.formatdate(localtime=False).encode() + b"\r\n"
            b"Message-ID: " + email.utils.make_msgid(domain="client.test").encode() + b"\r\n"
            b"MIME-Version: 1.0\r\n" + ctype + b"\r\n"
            b"--AAA\r\nContent-Type: text/plain\r\n\r\nPlease find the file attached.\r\n"
            b"--BBB\r\nContent-Type: application/octet-stream; name=\"" + name.encode() + b"\"\r\n"
            b"Content-Disposition: attachment; filename=\"" + name.encode() + b"\"\r\n"
            b"Content-Transfer-Encoding: base64\r\n\r\n" + encoded +
            b"--BBB--\r\n--AAA--\r\n")
