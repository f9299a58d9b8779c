"""The real-component harness works: Postfix built from packaging/postfix/ in both modes with
the real `filterd serve`, clamd with the generated signature database, the DNS server and
its fault switches, Redis. Feature tests build on these fixtures; if one of these fails,
look here first.
"""

from __future__ import annotations

import email
import subprocess
import time
from pathlib import Path

import dns.exception
import dns.resolver
import pytest

from harness.clamd import TESTFILES
from harness.messages import EICAR, GTUBE, message
from harness.postfix import SNIPPETS, placeholder_defaults, snippet


def headers_of(raw: bytes) -> email.message.Message:
    return email.message_from_bytes(raw)


# --- packaging -----------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["main.cf.milter", "main.cf.after-queue",
                                  "master.cf.after-queue", "master.cf.release"])
def test_render_script_and_harness_fill_in_the_same_snippet(name: str) -> None:
    """Admins run packaging/postfix/render; the tests fill in the same file in Python."""
    out = subprocess.run([str(SNIPPETS / "render"), name, "FILTERD_SMTP_PORT=20024"],
                         capture_output=True, text=True, check=True).stdout
    assert out == snippet(name, {"FILTERD_SMTP_PORT": 20024}).rstrip("\n") + "\n"
    assert "@" not in "".join(l for l in out.splitlines() if not l.startswith("#"))
    assert set(placeholder_defaults()) >= {"FILTERD_MILTER_PORT", "FILTERD_SMTP_PORT",
                                           "POSTFIX_REINJECT_PORT", "POSTFIX_RELEASE_PORT"}


# --- Postfix + filterd ---------------------------------------------------------------------
def test_milter_mode_delivers_a_clean_message_once_with_x_virus_scanned(mta_milter) -> None:
    code, text = mta_milter.send(message(subject="harness clean"), "sender@client.test",
                                 ["user@test.example"])
    assert code == 250, f"{code} {text}\n{mta_milter.logs()}"
    [delivered] = mta_milter.wait_delivered("user", 1)
    msg = headers_of(delivered)
    assert msg["Subject"] == "harness clean"
    assert msg["X-Virus-Scanned"], f"no X-Virus-Scanned header:\n{delivered.decode()[:2000]}"
    assert "filterd" in msg["X-Virus-Scanned"]


def test_milter_mode_rejects_gtube_with_550(mta_milter) -> None:
    reply = mta_milter.send(message(subject="gtube", body=f"{GTUBE}\n"))
    assert reply.code == 550 and reply.text.startswith("5.7.1"), \
        f"{reply}\n{mta_milter.logs()}"
    mta_milter.wait_queue_empty()
    assert mta_milter.mailbox("user") == []


def test_milter_mode_tempfails_while_filterd_is_down(mta_milter) -> None:
    """milter_default_action = tempfail (filterd killed, as in a crash)."""
    mta_milter.filterd.kill()
    reply = mta_milter.send(message(subject="filterd down"))
    assert reply.temporary and reply.text.startswith("4.7.1"), f"{reply}\n{mta_milter.logs()}"
    mta_milter.filterd.start()
    assert mta_milter.send(message(subject="filterd back")).ok
    mta_milter.wait_delivered("user", 1)


def test_after_queue_mode_delivers_clean_once_and_quarantines_gtube(mta_after_queue) -> None:
    rig = mta_after_queue
    assert rig.send(message(subject="aq clean"), rcpts=["user@test.example"]).ok
    assert rig.send(message(subject="aq gtube", body=f"{GTUBE}\n"),
                    rcpts=["user2@test.example"]).ok          # queued: the verdict comes later
    [delivered] = rig.wait_delivered("user", 1)
    msg = headers_of(delivered)
    assert msg["Subject"] == "aq clean" and msg["X-Virus-Scanned"], delivered.decode()[:2000]
    # passed through filterd once: two Received by Postfix (before and after), no loop
    assert len(msg.get_all("Received")) == 2, delivered.decode()[:2000]
    rig.wait_queue_empty()
    assert rig.mailbox("user2") == [], "GTUBE was delivered in after-queue mode"
    assert "relay=127.0.0.1[127.0.0.1]:%d" % rig.filterd.smtp_port in rig.maillog()


def test_release_listener_delivers_without_filtering(mta_after_queue) -> None:
    """master.cf.release: what `filterd quarantine release` talks to. No filter, no milter."""
    reply = mta_after_queue.send(message(subject="released", body=f"{GTUBE}\n"),
                                 port="release")
    assert reply.ok, f"{reply}\n{mta_after_queue.logs()}"
    [delivered] = mta_after_queue.wait_delivered("user", 1)
    assert headers_of(delivered)["X-Virus-Scanned"] is None


# --- clamd ---------------------------------------------------------------------------------
def test_clamd_finds_eicar_in_a_raw_mime_message(clamd) -> None:
    raw = message(subject="eicar inside", attachments=[("eicar.txt", EICAR)])
    assert EICAR not in raw                                  # only base64 of it is there
    for via in ("unix", "tcp"):
        reply = clamd.instream(raw, via=via)
        assert reply == "stream: Filterd.Test.EICAR.UNOFFICIAL FOUND", (via, reply)
    assert clamd.instream(message(subject="clean")) == "stream: OK"


def test_clamd_finds_the_clamav_test_files(clamd) -> None:
    exe = TESTFILES / "clam.exe"
    if not exe.exists():
        pytest.skip(f"{exe} missing: install the Debian package clamav-testfiles")
    assert clamd.instream(exe.read_bytes()) == "stream: Filterd.Test.clam_exe.UNOFFICIAL FOUND"
    raw = message(subject="clam.exe attached", attachments=[("clam.exe", exe.read_bytes())])
    assert clamd.instream(raw).startswith("stream: Filterd.Test.clam_exe")


def test_clamd_stops_and_starts_again_on_the_same_socket(clamd) -> None:
    clamd.stop()
    assert not Path(clamd.socket).exists()
    with pytest.raises(OSError):
        clamd.instream(b"hello")
    clamd.start()
    assert clamd.command("PING") == "PONG"
    assert clamd.command("PING", via="tcp") == "PONG"


# --- DNS -----------------------------------------------------------------------------------
def test_dns_answers_a_txt_mx_nxdomain_and_nodata(dns_server) -> None:
    key = "MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEA" + "x" * 350
    dns_server.listed("zen.test", "192.0.2.1", txt="listed for testing")
    dns_server.add("sel._domainkey.test.example", "TXT", f"v=DKIM1; k=rsa; p={key}")
    dns_server.add("test.example", "MX", (10, "mx.test.example"))
    r = dns_server.resolver()
    assert [a.to_text() for a in r.resolve("1.2.0.192.zen.test", "A")] == ["127.0.0.2"]
    assert r.resolve("1.2.0.192.zen.test", "TXT")[0].strings == (b"listed for testing",)
    txt = r.resolve("sel._domainkey.test.example", "TXT")[0]
    assert len(txt.strings) == 2 and b"".join(txt.strings) == f"v=DKIM1; k=rsa; p={key}".encode()
    assert r.resolve("test.example", "MX")[0].exchange.to_text() == "mx.test.example."
    with pytest.raises(dns.resolver.NXDOMAIN):
        r.resolve("2.2.0.192.zen.test", "A")
    with pytest.raises(dns.resolver.NoAnswer):
        r.resolve("1.2.0.192.zen.test", "AAAA")
    assert dns_server.queried("1.2.0.192.zen.test", "A")


def test_dns_slow_and_dead_switches_make_queries_time_out(dns_server) -> None:
    dns_server.add("slow.test", "A", "127.0.0.9")
    r = dns_server.resolver(lifetime=0.5)
    with dns_server.slow(2.0):
        t = time.monotonic()
        with pytest.raises(dns.exception.Timeout):
            r.resolve("slow.test", "A")
        assert time.monotonic() - t < 1.5
    with dns_server.dead("slow.test"):
        with pytest.raises(dns.exception.Timeout):
            r.resolve("slow.test", "A")
    assert r.resolve("slow.test", "A")[0].to_text() == "127.0.0.9"


# --- Redis ---------------------------------------------------------------------------------
def test_redis_answers_ping(redis_server) -> None:
    assert redis_server.ping()
    client = redis_server.client()
    assert client.ping() is True
    client.set("filterd:test", "1")
    assert client.get("filterd:test") == b"1"
