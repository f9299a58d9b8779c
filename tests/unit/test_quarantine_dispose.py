"""Scanner.dispose() and the quarantine: store before answering, tempfail when storing fails,
keep copies of rejected mail per category (quarantine.quarantine_on_reject)."""

import asyncio
import dataclasses

import pytest

from filterd import config
from filterd.message import Envelope
from filterd.policy import Action, Symbol, Verdict
from filterd.quarantine import Query, SpoolStore
from filterd.service import Scanner

GTUBE = "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"
RAW = (b"From: a@example.org\r\nTo: u@test.example\r\nSubject: s\r\n"
       b"Date: Sun, 22 Nov 2026 05:00:00 +0000\r\nMessage-ID: <d@example.org>\r\n\r\n"
       + GTUBE.encode() + b"\r\n")
ENV = Envelope("a@example.org", ("u@test.example",), "192.0.2.1", "h.example",
               queue_id="DQ1", listener="milter")


def scanner(tmp_path, core_rules, **overrides):
    values = {"daemon.state_dir": str(tmp_path / "state"), "rules.dir": str(core_rules),
              "scan.mynetworks": []}
    values.update(overrides)
    return Scanner(config.defaults().with_overrides(values))


def outcome_with(s, verdict=None):
    out = asyncio.run(s.scan(RAW, ENV))
    return dataclasses.replace(out, verdict=verdict) if verdict else out


def test_gtube_quarantine_band_discards_after_storing(tmp_path, core_rules):
    s = scanner(tmp_path, core_rules)
    verdict = Verdict(Action.QUARANTINE, 1000.0, (Symbol("GTUBE", (), 1000.0),), "spam", 6.0,
                      True, True)
    d = asyncio.run(s.dispose(outcome_with(s, verdict), "milter"))
    assert (d.action, d.code) == (Action.DISCARD, 250) and d.quarantine_id
    store = SpoolStore(s.settings.quarantine_dir)
    assert store.read_raw(d.quarantine_id) == RAW
    s2 = scanner(tmp_path, core_rules, **{"milter.quarantine_reply": "reject"})
    d2 = asyncio.run(s2.dispose(outcome_with(s2, verdict), "milter"))
    assert (d2.action, d2.code) == (Action.REJECT, 550) and d2.quarantine_id == d.quarantine_id


def test_after_queue_reject_is_quarantined_by_default(tmp_path, core_rules):
    s = scanner(tmp_path, core_rules)
    out = outcome_with(s)  # GTUBE: score 1000 >= reject_level
    assert out.verdict.action is Action.REJECT
    d = asyncio.run(s.dispose(out, "smtp"))
    assert (d.action, d.code) == (Action.DISCARD, 250) and d.quarantine_id


@pytest.mark.parametrize("symbol,virus,stored", [("CLAM_VIRUS", ("Eicar",), True),
                                                 ("BANNED_EXTENSION", (), True),
                                                 ("GTUBE", (), False)])
def test_milter_reject_keeps_a_copy_per_category(tmp_path, core_rules, symbol, virus, stored):
    s = scanner(tmp_path, core_rules)
    verdict = Verdict(Action.REJECT, 20.0, (Symbol(symbol, (), 20.0),), symbol, 6.0, True, True,
                      virus)
    d = asyncio.run(s.dispose(outcome_with(s, verdict), "milter"))
    assert (d.action, d.code) == (Action.REJECT, 550)
    assert bool(d.quarantine_id) is stored
    assert len(SpoolStore(s.settings.quarantine_dir).search(Query())) == int(stored)


def test_unwritable_spool_tempfails(tmp_path, core_rules):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    s = scanner(tmp_path, core_rules, **{"quarantine.dir": str(blocker / "q")})
    held = Verdict(Action.QUARANTINE, 1000.0, (Symbol("GTUBE", (), 1000.0),), "spam", 6.0,
                   True, True)
    for frontend, verdict in (("milter", held), ("smtp", None)):  # smtp: reject -> quarantine
        d = asyncio.run(s.dispose(outcome_with(s, verdict), frontend))
        assert (d.action, d.code, d.status) == (Action.TEMPFAIL, 451, "4.3.0"), frontend
