"""Viruses through real Postfix, the real `filterd serve` and a real clamd (generated DB).

milter:      a virus is refused at end of DATA with 550 5.7.1 "virus NAME detected";
after-queue: Postfix accepts, filterd quarantines, nothing is delivered and nothing bounces;
both:        a clean message is delivered with X-Virus-Scanned and X-Virus-Status: Clean;
clamd down:  messages are tempfailed (the client or Postfix keeps them) and delivered exactly
             once after clamd is back.
"""

from __future__ import annotations

import io
import re
import zipfile
from pathlib import Path

import pytest

from harness.messages import EICAR, message

BASE64_EICAR = message(subject="eicar base64", attachments=[("eicar.txt", EICAR)])


def plain_eicar() -> bytes:
    """EICAR as a 7bit text/plain attachment: the string itself is in the raw message."""
    return (b"From: Sender <sender@client.test>\r\nTo: user@test.example\r\n"
            b"Subject: eicar plain\r\nDate: Mon, 1 Jan 2024 00:00:00 +0000\r\n"
            b"Message-ID: <plain-eicar@client.test>\r\nMIME-Version: 1.0\r\n"
            b"Content-Type: multipart/mixed; boundary=\"b1\"\r\n\r\n"
            b"--b1\r\nContent-Type: text/plain\r\n\r\nsee attachment\r\n"
            b"--b1\r\nContent-Type: text/plain; name=\"eicar.txt\"\r\n"
            b"Content-Disposition: attachment; filename=\"eicar.txt\"\r\n"
            b"Content-Transfer-Encoding: 7bit\r\n\r\n" + EICAR + b"\r\n--b1--\r\n")


def zipped_eicar() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("readme.txt", EICAR)
    return message(subject="eicar zipped", attachments=[("docs.zip", buf.getvalue())],
                   content_type="application/zip")


VIRUSES = {"plain": plain_eicar, "base64": lambda: BASE64_EICAR, "zip": zipped_eicar}


def corpus_viruses(corpora_dir: Path) -> list[tuple[str, bytes]]:
    out = []
    for path in sorted((corpora_dir / "clamav-testfiles" / "virus").glob("*")):
        raw = path.read_bytes()
        if raw.startswith(b"From "):            # mbox separator line, not a header
            raw = raw.split(b"\n", 1)[1]
        out.append((path.name, raw))
    if not out:
        pytest.skip("no clamav-testfiles/virus in the corpora")
    return out


def header(msg: bytes, name: str) -> list[str]:
    head = msg.split(b"\n\n", 1)[0].split(b"\r\n\r\n", 1)[0].decode("utf-8", "replace")
    return re.findall(rf"(?mi)^{re.escape(name)}:[ \t]*(.*)$", head)


# --- milter ------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", sorted(VIRUSES))
def test_milter_rejects_eicar(mta_milter, kind):
    reply = mta_milter.send(VIRUSES[kind]())
    assert reply.code == 550, f"{reply}\n{mta_milter.logs()}"
    assert "5.7.1 virus Filterd.Test.EICAR" in reply.text and "detected" in reply.text
    assert mta_milter.mailbox("user") == []


def test_milter_rejects_clamav_test_mails(mta_milter, corpora_dir):
    for name, raw in corpus_viruses(corpora_dir):
        reply = mta_milter.send(raw)
        assert reply.code == 550 and "virus Filterd.Test." in reply.text, \
            f"{name}: {reply}\n{mta_milter.logs()}"
    assert mta_milter.mailbox("user") == []


def test_milter_delivers_clean_mail_with_virus_headers(mta_milter):
    reply = mta_milter.send(message(subject="clean"))
    assert reply.ok, reply
    (delivered,) = mta_milter.wait_delivered("user", 1)
    assert header(delivered, "X-Virus-Scanned") == ["filterd at filterd.test.example"]
    assert header(delivered, "X-Virus-Status") == ["Clean"]


def test_milter_tempfails_while_clamd_is_down(mta_milter, clamd):
    clamd.stop()
    reply = mta_milter.send(message(subject="while clamd is down"))
    assert reply.code == 451 and reply.temporary, f"{reply}\n{mta_milter.logs()}"
    assert mta_milter.mailbox("user") == []
    clamd.start()
    reply = mta_milter.send(message(subject="clamd is back"))
    assert reply.ok, reply
    (delivered,) = mta_milter.wait_delivered("user", 1)
    assert header(delivered, "X-Virus-Status") == ["Clean"]


# --- after queue -------------------------------------------------------------------------

def quarantined(rig) -> int:
    log = rig.filterd.log() if callable(getattr(rig.filterd, "log", None)) else ""
    return len(re.findall(r"frontend=smtp .*verdict=reject .*quarantine=(?!-)\S+", log))


def test_after_queue_quarantines_viruses_and_delivers_nothing(mta_after_queue, corpora_dir):
    messages = [(k, f()) for k, f in sorted(VIRUSES.items())] + corpus_viruses(corpora_dir)
    before = quarantined(mta_after_queue)
    for name, raw in messages:
        reply = mta_after_queue.send(raw)
        assert reply.ok, f"{name}: Postfix should queue it: {reply}"
    mta_after_queue.wait_queue_empty(60)
    assert mta_after_queue.mailbox("user") == []
    assert quarantined(mta_after_queue) - before == len(messages), mta_after_queue.logs()
    # no bounce went anywhere: the sender's domain is not local, so a bounce would sit in
    # the queue (outbound mail is disabled), and the queue is empty
    assert "status=bounced" not in mta_after_queue.maillog()


def test_after_queue_clamd_down_defers_then_delivers_exactly_once(mta_after_queue, clamd):
    clamd.stop()
    subjects = [f"deferred {i}" for i in range(3)]
    for s in subjects:
        assert mta_after_queue.send(message(subject=s)).ok
    # filterd answers 451: Postfix keeps all three in its queue
    import time
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and "4.7.1" not in mta_after_queue.maillog():
        time.sleep(0.2)
    assert len(mta_after_queue.settled_queue_ids()) == 3, mta_after_queue.logs()
    assert mta_after_queue.mailbox("user") == []
    clamd.start()
    mta_after_queue.flush()
    delivered = mta_after_queue.wait_delivered("user", 3, timeout=60)
    got = sorted(header(m, "Subject")[0] for m in delivered)
    assert got == subjects                      # each once, none lost, none twice
    for m in delivered:
        assert header(m, "X-Virus-Status") == ["Clean"]
