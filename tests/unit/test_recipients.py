"""Per-recipient policy: lookups (file map, SQLite), one scan with a verdict per recipient,
and what each front end does with mixed recipients (milter delrcpt, SMTP reinjection per
group, LMTP replies per recipient). The MTA side is faked at the wire (a fake libmilter
context, a real aiosmtpd sink on loopback); the Scanner, quarantine and policy are real."""

import asyncio
import json
import smtplib
import sqlite3

import Milter
import pytest

from filterd import config
from harness.loopback import GTUBE, FrontendRig, free_port, milter_session

from filterd.frontends import smtp as smtp_frontend
from filterd.message import Envelope
from filterd.policy import Action
from filterd.policy.banks import PolicyError
from filterd.policy.recipients import (FileMap, RecipientLookup, SqliteMap, lookup_keys,
                                       write_entry)
from filterd.quarantine import Query, SpoolStore
from filterd.service import Scanner

CLEAN = (b"From: a@example.org\r\nTo: b@example.net\r\nSubject: hi\r\n"
         b"Date: Sun, 22 Nov 2026 05:00:00 +0000\r\nMessage-ID: <1@example.org>\r\n\r\nhello\r\n")


RECIPIENTS = """
["lover@test.example"]
spam_lover = true
["bypass@test.example"]
bypass_spam_checks = true
["@relay.example"]
local = false
spam_lover = true
["picky@test.example"]
deny_senders = ["@example.org"]
"""
SPAM = CLEAN.replace(b"hello", GTUBE.encode())


def site_dir(tmp_path, gtube_score=12, recipients=RECIPIENTS):
    site = tmp_path / "site"
    (site / "local.d").mkdir(parents=True, exist_ok=True)
    # GTUBE in the quarantine band: kill_level 10 <= 12 < reject_level 15
    (site / "local.d" / "scores.toml").write_text(f"[scores]\nGTUBE = {gtube_score}\n")
    (site / "recipients.toml").write_text(recipients)
    return site


def settings_for(tmp_path, core_rules, recipients=RECIPIENTS, **extra):
    values = {"daemon.state_dir": str(tmp_path / "state"), "daemon.hostname": "mx.test",
              "scan.mynetworks": [], "rules.dir": str(core_rules),
              "rules.site_dir": str(site_dir(tmp_path, recipients=recipients)),
              "policy.recipient_map": "recipients.toml",
              "policy.local_domains": ["test.example"]}
    values.update(extra)
    return values


# ---- lookups ----------------------------------------------------------------------------

def test_lookup_order_least_specific_first():
    assert lookup_keys("<Joe+Lists@Mail.Example.COM>") == [
        "@.", "@.com", "@.example.com", "@.mail.example.com", "@mail.example.com",
        "joe@mail.example.com", "joe+lists@mail.example.com"]
    assert lookup_keys("joe+x@d.test", delimiter="") == ["@.", "@.test", "@.d.test", "@d.test",
                                                         "joe+x@d.test"]


def test_file_map_and_database_layers(tmp_path):
    (tmp_path / "m.toml").write_text('["@."]\ntag_level = 1\n["@d.test"]\ntag_level = 3\n'
                                     '["joe@d.test"]\nspam_lover = true\n')
    db = tmp_path / "p.sqlite"
    write_entry(db, "joe@d.test", {"tag_level": 4.5})
    lookup = RecipientLookup(file_map=FileMap(tmp_path / "m.toml"), db=SqliteMap(db))
    layers = lookup.layers("joe+x@D.test")
    assert [l.name.rpartition("[")[2] for l in layers] == ["@.]", "@d.test]", "joe@d.test]",
                                                           "joe@d.test]"]
    assert layers[-1].name.startswith("sqlite ") and layers[-1].values == {"tag_level": 4.5}
    assert lookup.layers("x@other.test")[0].values == {"tag_level": 1.0}


def test_bad_map_is_an_error_naming_file_and_key(tmp_path):
    (tmp_path / "m.toml").write_text('["joe@d.test"]\nspam_lovers = true\n')
    with pytest.raises(PolicyError, match=r"m.toml: joe@d.test.spam_lovers: unknown key"):
        FileMap(tmp_path / "m.toml")
    (tmp_path / "m.toml").write_text('["joe"]\nspam_lover = true\n')
    with pytest.raises(PolicyError, match="keys are user@domain"):
        FileMap(tmp_path / "m.toml")
    (tmp_path / "m.toml").write_text('["@d.test"]\ndkim_sign = true\n')
    with pytest.raises(PolicyError, match="bank-only key"):
        FileMap(tmp_path / "m.toml")


def test_bad_database_row_is_skipped_and_logged_once(tmp_path, caplog):
    db = tmp_path / "p.sqlite"
    write_entry(db, "@d.test", {"tag_level": 3})
    with sqlite3.connect(db) as conn:
        conn.execute("INSERT INTO recipient_policy VALUES ('joe@d.test', '{\"colour\": 1}')")
    lookup = RecipientLookup(db=SqliteMap(db))
    for _ in range(2):
        assert [l.values for l in lookup.layers("joe@d.test")] == [{"tag_level": 3.0}]
    assert len([r for r in caplog.records if "ignored" in r.getMessage()]) == 1


def test_unreadable_database_tempfails_the_message(tmp_path, core_rules):
    db = tmp_path / "p.sqlite"
    write_entry(db, "@d.test", {"tag_level": 3})
    s = Scanner(config.defaults().with_overrides(settings_for(
        tmp_path, core_rules, **{"policy.recipient_db": str(db)})))
    db.write_bytes(b"this is not a database" * 100)
    out = asyncio.run(s.scan(CLEAN, Envelope("a@example.org", ("joe@d.test",), "192.0.2.1")))
    assert out.verdict.action is Action.TEMPFAIL and out.failure is None
    assert out.verdict.reason == "failure: policy_lookup"


# ---- one scan, verdicts per recipient ---------------------------------------------------

def scanner(tmp_path, core_rules, recipients=RECIPIENTS, **extra):
    return Scanner(config.defaults().with_overrides(settings_for(tmp_path, core_rules,
                                                                 recipients, **extra)))


def test_one_scan_groups_recipients_by_verdict(tmp_path, core_rules):
    s = scanner(tmp_path, core_rules)
    env = Envelope("a@example.org", ("user@test.example", "lover@test.example",
                                     "user2@test.example", "bypass@test.example",
                                     "x@relay.example"), "192.0.2.1")
    out = asyncio.run(s.scan(SPAM, env))
    by_rcpt = {r: (g.verdict.action, g.spam_headers) for g in out.groups for r in g.recipients}
    assert by_rcpt == {
        "user@test.example": (Action.QUARANTINE, True),
        "user2@test.example": (Action.QUARANTINE, True),
        "lover@test.example": (Action.SPAM, True),
        "bypass@test.example": (Action.ACCEPT, False),
        "x@relay.example": (Action.SPAM, False),       # not local: no X-Spam headers
    }
    assert len(out.groups) == 4 and out.verdict.action is Action.QUARANTINE
    heads = {g.recipients[0]: dict(e.add) for g, e in zip(out.groups, out.group_edits)}
    assert heads["lover@test.example"]["X-Spam-Flag"] == "YES"
    assert "X-Spam-Flag" not in heads["bypass@test.example"]
    assert "X-Spam-Flag" not in heads["x@relay.example"]
    subjects = {g.recipients[0]: e.subject for g, e in zip(out.groups, out.group_edits)}
    assert subjects["lover@test.example"].startswith("***SPAM***")
    assert subjects["x@relay.example"] is None and subjects["bypass@test.example"] is None


def test_deny_list_only_affects_its_recipient(tmp_path, core_rules):
    s = scanner(tmp_path, core_rules)
    out = asyncio.run(s.scan(CLEAN, Envelope("a@example.org", ("picky@test.example",
                                                               "user@test.example"))))
    by_rcpt = {r: g.verdict for g in out.groups for r in g.recipients}
    assert "POLICY_SENDER_DENIED" in by_rcpt["picky@test.example"].symbol_names
    assert by_rcpt["picky@test.example"].action is Action.REJECT
    assert by_rcpt["user@test.example"].action is Action.ACCEPT


def test_split_is_quarantined_once_for_the_held_recipients(tmp_path, core_rules):
    s = scanner(tmp_path, core_rules)
    env = Envelope("a@example.org", ("user@test.example", "lover@test.example",
                                     "user2@test.example"), "192.0.2.1", queue_id="QS1")
    out = asyncio.run(s.scan(SPAM, env))
    d = asyncio.run(s.dispose(out, "milter"))
    assert d.action is Action.ACCEPT and d.quarantine_id
    assert d.remove_rcpts == ("user@test.example", "user2@test.example")
    assert dict(d.edits.add)["X-Spam-Flag"] == "YES"
    [item] = SpoolStore(s.settings.quarantine_dir).search(Query())
    meta = json.loads(next(s.settings.quarantine_dir.rglob("*.json")).read_text())
    assert sorted(meta["rcpt_tos"] if "rcpt_tos" in meta else meta["recipients"]) == [
        "user2@test.example", "user@test.example"]


def test_all_recipients_rejecting_rejects_the_message(tmp_path, core_rules):
    s = scanner(tmp_path, core_rules)
    out = asyncio.run(s.scan(CLEAN, Envelope("a@example.org", ("picky@test.example",
                                                               "x@relay.example"))))
    assert len(out.groups) == 2
    d = asyncio.run(s.dispose(out, "milter"))
    # picky rejects (deny list); the relay recipient is a lover and gets it: a split
    assert d.action is Action.ACCEPT and d.remove_rcpts == ("picky@test.example",)
    both_deny = RECIPIENTS.replace("local = false\nspam_lover = true",
                                   "deny_senders = [\"@example.org\"]")
    s2 = scanner(tmp_path, core_rules, recipients=both_deny)
    out2 = asyncio.run(s2.scan(CLEAN, Envelope("a@example.org", ("picky@test.example",
                                                                 "x@relay.example"))))
    assert len(out2.groups) == 2         # different headers (local or not), both reject
    d2 = asyncio.run(s2.dispose(out2, "milter"))
    assert (d2.action, d2.code) == (Action.REJECT, 550)


def test_tempfail_of_one_recipient_tempfails_all_before_storing(tmp_path, core_rules):
    db = tmp_path / "p.sqlite"
    write_entry(db, "@d.test", {"tag_level": 3})
    s = scanner(tmp_path, core_rules, **{"policy.recipient_db": str(db)})
    db.write_bytes(b"garbage" * 500)
    out = asyncio.run(s.scan(SPAM, Envelope("a@example.org", ("user@test.example",
                                                              "lover@test.example"))))
    d = asyncio.run(s.dispose(out, "milter"))
    assert (d.action, d.code) == (Action.TEMPFAIL, 451)
    assert SpoolStore(s.settings.quarantine_dir).search(Query()) == []


# ---- milter -----------------------------------------------------------------------------

def milter_deliver(loop, scanner, body, rcpts):
    m = milter_session(scanner, loop, macros={"i": "QR1"}, rcpts=tuple(rcpts))
    for name, value in ((b"Subject", b"hi"), (b"From", b"a@example.org")):
        m.header_bytes(name, value)
    m.eoh()
    m.body(body)
    return m.eom(), m._ctx.calls


def test_milter_removes_held_recipients_and_tags_the_lover_copy(tmp_path, core_rules,
                                                                loop_thread):
    s = scanner(tmp_path, core_rules)
    rc, calls = milter_deliver(loop_thread, s, GTUBE.encode() + b"\r\n",
                               ["user@test.example", "lover@test.example"])
    assert rc == Milter.ACCEPT
    assert ("delrcpt", "<user@test.example>") in calls
    assert not any(c == ("delrcpt", "<lover@test.example>") for c in calls)
    assert ("addheader", "X-Spam-Flag", "YES") in calls
    assert len(SpoolStore(s.settings.quarantine_dir).search(Query())) == 1


def test_milter_single_recipient_path_is_unchanged(tmp_path, core_rules, loop_thread):
    s = scanner(tmp_path, core_rules)
    rc, calls = milter_deliver(loop_thread, s, GTUBE.encode() + b"\r\n", ["user@test.example"])
    assert rc == Milter.DISCARD and not any(c[0] == "delrcpt" for c in calls)


# ---- after queue: SMTP and LMTP ---------------------------------------------------------

@pytest.fixture
def aq(tmp_path, core_rules):
    rigs = []

    def make(**extra):
        r = FrontendRig(settings_for(tmp_path, core_rules, **extra))
        rigs.append(r)
        return r

    yield make
    for r in rigs:
        r.close()


def test_smtp_reinjects_each_group_with_its_own_headers(aq):
    rig = aq()
    code, _ = rig.send(SPAM, rcpts=("user@test.example", "lover@test.example",
                                    "bypass@test.example"))
    assert code == 250
    got = {tuple(rcpts): data for _, rcpts, data in rig.sink.messages}
    assert set(got) == {("lover@test.example",), ("bypass@test.example",)}
    assert b"X-Spam-Flag: YES" in got[("lover@test.example",)]
    assert b"X-Spam-" not in got[("bypass@test.example",)]
    [item] = SpoolStore(rig.settings.quarantine_dir).search(Query())


def test_smtp_failed_group_reinjection_is_a_451_for_the_message(aq):
    rig = aq()
    rig.sink.reply = "452 4.3.1 full"
    code, text = rig.send(SPAM, rcpts=("lover@test.example", "bypass@test.example"))
    assert code == 451 and "Reinjection failed" in text


def lmtp_send(port, data, rcpts):
    with smtplib.LMTP("127.0.0.1", port, timeout=30) as client:
        client.ehlo("postfix.test")
        client.mail("a@example.org")
        for r in rcpts:
            client.rcpt(r)
        client.putcmd("data")
        assert client.getreply()[0] == 354
        client.send(data.replace(b"\r\n.", b"\r\n..") + b"\r\n.\r\n")
        return [client.getreply() for _ in rcpts]


def test_lmtp_answers_each_recipient(aq):
    lport = free_port()
    rig = aq(**{"smtp.reject_action": "reject"})
    fut = asyncio.run_coroutine_threadsafe(
        smtp_frontend.start_server(rig.scanner, f"127.0.0.1:{lport}", lmtp=True), rig.loop)
    server = fut.result(10)
    try:
        replies = lmtp_send(lport, CLEAN, ["user@test.example", "picky@test.example"])
        assert replies[0][0] == 250 and replies[1][0] == 550, replies
        assert [r for _, r, _ in rig.sink.messages] == [["user@test.example"]]
        rig.sink.reply = "451 4.3.0 try later"
        replies = lmtp_send(lport, SPAM, ["lover@test.example", "user@test.example"])
        assert [c for c, _ in replies] == [451, 250], replies   # held copy stored: 250
    finally:
        rig.loop.call_soon_threadsafe(server.close)


# ---- CLI --------------------------------------------------------------------------------

def test_policy_show_names_the_layer_of_each_value(tmp_path, core_rules, capsys):
    from filterd.cli.main import main
    values = settings_for(tmp_path, core_rules)
    cfg = tmp_path / "filterd.toml"
    cfg.write_text(f'[rules]\ndir = "{values["rules.dir"]}"\nsite_dir = '
                   f'"{values["rules.site_dir"]}"\n[policy]\nrecipient_map = '
                   f'"recipients.toml"\nlocal_domains = ["test.example"]\n')
    assert main(["--config", str(cfg), "--state-dir", str(tmp_path / "st"), "policy", "show",
                 "lover+x@test.example", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)["policy"]
    assert shown["spam_lover"] == {"value": True,
                                   "from": f"{tmp_path / 'site' / 'recipients.toml'} "
                                           f"[lover@test.example]"}
    assert shown["tag2_level"] == {"value": 6.0, "from": "rules"}
    (tmp_path / "site" / "recipients.toml").write_text('["x@y"]\nlover = 1\n')
    assert main(["--config", str(cfg), "policy", "show", "x@y"]) == 1
    assert "x@y.lover: unknown key" in capsys.readouterr().err
