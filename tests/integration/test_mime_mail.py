"""Ambiguous MIME through a real Postfix, the real `filterd serve` and a real clamd (issue 14).

The CVE-2024-28054 shapes (harness.messages.ambiguous): two Content-Type headers, or two
boundary parameters in one, each in both orders, so that the attachment is hidden from the
reading that takes the first header (or parameter) in one order and from the reading that
takes the last in the other.

milter:      the hidden payload.exe is found and the message refused with 550 5.7.1;
after queue: Postfix accepts, filterd quarantines it as banned, nothing is delivered or bounced;
both:        a hidden EICAR is found by clamd (every reading's parts are scanned);
scan:        `filterd scan --explain` shows the MIME_* symbol with the banned one.
"""

from __future__ import annotations

import json
import shutil

import pytest

from harness.messages import EICAR, ambiguous

KINDS = ("two-content-type", "two-boundary")
KIND_SYMBOL = {"two-content-type": "MIME_DUPLICATE_CONTENT_TYPE",
               "two-boundary": "MIME_DUPLICATE_BOUNDARY"}
ORDERS = pytest.mark.parametrize("hidden_first", [False, True], ids=["exe-second", "exe-first"])


@pytest.fixture(scope="module")
def filterd_overrides(tmp_path_factory):
    """The core checks (sanity: the MIME symbols), banned files and antivirus."""
    from filterd.config import PROJECT_RULES
    rules = tmp_path_factory.mktemp("mime-rules")
    rules.chmod(0o755)
    for name in ("actions.toml", "core.toml", "scores.toml", "antivirus.toml", "banned.toml"):
        shutil.copy(PROJECT_RULES / name, rules / name)
    return {"rules.dir": str(rules)}


def sidecars(rig) -> list[dict]:
    spool = rig.filterd.state_dir / "quarantine"
    return [json.loads(p.read_text()) for p in sorted(spool.glob("*/*.json"))]


@ORDERS
@pytest.mark.parametrize("kind", KINDS)
def test_milter_refuses_the_hidden_exe(mta_milter, kind, hidden_first):
    reply = mta_milter.send(ambiguous(kind, hidden_first, subject=f"{kind} {hidden_first}"))
    assert reply.code == 550 and reply.text.startswith("5.7.1"), \
        f"{reply}\n{mta_milter.logs()}"
    assert mta_milter.mailbox("user") == [] and mta_milter.queue_ids() == []


@ORDERS
@pytest.mark.parametrize("kind", KINDS)
def test_after_queue_quarantines_the_hidden_exe_as_banned(mta_after_queue, kind, hidden_first):
    rig = mta_after_queue
    subject = f"aq {kind} {hidden_first}"
    before = len(sidecars(rig))
    reply = rig.send(ambiguous(kind, hidden_first, subject=subject))
    assert reply.ok, reply                      # Postfix took it; filterd decides after queue
    rig.wait_queue_empty(30)
    assert rig.mailbox("user") == []
    items = sidecars(rig)
    assert len(items) == before + 1, rig.logs()
    (item,) = [i for i in items if i["subject"] == subject]
    names = {s["name"]: s["options"] for s in item["symbols"]}
    assert item["category"] == "banned" and item["action"] == "reject"
    assert names["BANNED_EXTENSION"] == ["payload.exe"] and KIND_SYMBOL[kind] in names
    assert "status=bounced" not in rig.maillog()


@ORDERS
@pytest.mark.parametrize("mode", ["milter", "after-queue"])
def test_hidden_eicar_is_found_by_clamd(mode, mta_milter, mta_after_queue, hidden_first):
    rig = mta_milter if mode == "milter" else mta_after_queue
    raw = ambiguous("two-content-type", hidden_first, name="notes.txt", data=EICAR,
                    subject=f"eicar {mode} {hidden_first}")
    before = len(sidecars(rig))
    reply = rig.send(raw)
    if mode == "milter":
        assert reply.code == 550 and "virus" in reply.text, f"{reply}\n{rig.logs()}"
    else:
        assert reply.ok, reply
        rig.wait_queue_empty(30)
        items = sidecars(rig)
        assert len(items) == before + 1, rig.logs()
        (item,) = [i for i in items if i["subject"] == f"eicar {mode} {hidden_first}"]
        assert item["category"] == "virus" and item["virus_names"], item
    assert rig.mailbox("user") == []


@ORDERS
@pytest.mark.parametrize("kind", KINDS)
def test_scan_explain_names_the_mime_and_banned_symbols(mta_milter, tmp_path, kind,
                                                        hidden_first):
    path = tmp_path / "ambiguous.eml"
    path.write_bytes(ambiguous(kind, hidden_first))
    res = mta_milter.filterd.cli("scan", "--explain", "--offline", str(path))
    out = res.stdout.decode()
    assert f"{KIND_SYMBOL[kind]} [message]" in out, out
    assert "BANNED_EXTENSION [payload.exe]" in out and ": reject " in out, out
    res = mta_milter.filterd.cli("scan", "--json", "--explain", "--offline", str(path))
    doc = json.loads(res.stdout)
    symbols = {s["name"]: s for s in doc["symbols"]}
    assert doc["action"] == "reject" and symbols[KIND_SYMBOL[kind]]["location"], doc
