"""The benchmarks' spamd client: one SPAMC/1.5 SYMBOLS request on its own connection, as spamc
sends it, to a spamd on loopback."""

from __future__ import annotations

import socket


def spamd_symbols(port: int, raw: bytes, *, user: str | None = None,
                  timeout: float = 300) -> tuple[list[str], list[str]]:
    """(spamd's header lines after the status line, the rule names that hit).

    Raises RuntimeError unless spamd answered EX_OK."""
    extra = f"User: {user}\r\n".encode() if user else b""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(b"SYMBOLS SPAMC/1.5\r\nContent-length: %d\r\n%s\r\n" % (len(raw), extra)
                     + raw)
        sock.shutdown(socket.SHUT_WR)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    if not lines[0].startswith("SPAMD/") or " 0 " not in lines[0] + " ":
        raise RuntimeError(f"spamd said {lines[0]!r}")
    return lines[1:], [s for s in body.decode("latin-1").strip().split(",") if s]


def spam_score(header_lines: list[str]) -> tuple[bool, float] | None:
    """(spam?, score) from spamd's `Spam: True ; 7.1 / 5.0` line, None without one."""
    for line in header_lines:
        if line.lower().startswith("spam:"):
            verdict, _, scores = line[5:].partition(";")
            return verdict.strip().lower() == "true", float(scores.split("/")[0])
    return None
