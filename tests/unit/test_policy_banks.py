"""Policy banks: loading and layering, selection (table-driven), and which layer wins."""

import math
from pathlib import Path

import pytest

from filterd.config import PROJECT_RULES
from filterd.policy import Action, Levels, Policy, Symbol
from filterd.policy.banks import (Layer, MessageFacts, PolicyError, load_banks, merge,
                                  select_banks)
from filterd.policy.recipients import decide_for

BANKS = """
[bank.originating]
order = 10
select = [{ mynetworks = true }, { authenticated = true }]
originating = true
bypass_spam_checks = true
spam_headers = false

[bank.submission]
order = 20
select = { macros = { "{daemon_name}" = "ORIGINATING" } }
originating = true
dkim_sign = true

[bank.port10026]
select = { listener = "smtp", port = 10026 }
originating = true
tag2_level = 4.0

[bank.partners]
select = { client_networks = ["198.51.100.0/24"], sender_domains = [".partner.test"] }
tag2_level = 9.0
disable_checks = ["dnsbl*"]

[bank.boss_auth]
order = 30
select = { auth_users = ["boss*"] }
originating_reject_level = 20

[bank.lmtp]
select = { listener = ["lmtp"] }
subject_tag = "[SPAM] "
"""


@pytest.fixture
def shipped(tmp_path) -> Path:
    d = tmp_path / "rules"
    (d / "banks").mkdir(parents=True)
    (d / "banks" / "site.toml").write_text(BANKS)
    return d


@pytest.mark.parametrize("facts, banks", [
    (MessageFacts(), []),
    (MessageFacts(mynetworks=True), ["originating"]),
    (MessageFacts(auth_user="alice"), ["originating"]),
    (MessageFacts(auth_user="boss1"), ["originating", "boss_auth"]),
    (MessageFacts(macros={"{daemon_name}": "originating"}), ["submission"]),
    (MessageFacts(macros={"{daemon_name}": "mx.test"}), []),
    (MessageFacts(listener="smtp", port=10026), ["port10026"]),
    (MessageFacts(listener="smtp", port=10024), []),
    (MessageFacts(listener="milter", port=10026), []),
    (MessageFacts(client_ip="198.51.100.7", sender_domain="mx.partner.test"), ["partners"]),
    (MessageFacts(client_ip="198.51.100.7", sender_domain="partner.test"), ["partners"]),
    (MessageFacts(client_ip="198.51.100.7", sender_domain="evilpartner.test"), []),
    (MessageFacts(client_ip="203.0.113.1", sender_domain="partner.test"), []),
    (MessageFacts(client_ip="not an ip", sender_domain="partner.test"), []),
    (MessageFacts(listener="lmtp", mynetworks=True), ["originating", "lmtp"]),
])
def test_selection(shipped, facts, banks):
    assert [b.name for b in select_banks(load_banks(shipped), facts)] == banks


BASE = Policy(levels=Levels(2.0, 6.0, 10.0, 15.0), forced={"CLAM_VIRUS": Action.REJECT})


@pytest.mark.parametrize("layers, key, value, source", [
    # nothing: the rule set's values
    ([], "tag2_level", 6.0, "rules"),
    # a bank over the rules
    ([Layer("bank a", {"tag2_level": 4.0})], "tag2_level", 4.0, "bank a"),
    # later layer wins (bank by order, then domain, then address)
    ([Layer("bank a", {"tag2_level": 4.0}), Layer("bank b", {"tag2_level": 5.0})],
     "tag2_level", 5.0, "bank b"),
    ([Layer("bank a", {"kill_level": 8.0}), Layer("map [@example.com]", {"kill_level": 9.0}),
      Layer("map [u@example.com]", {"kill_level": 30.0})], "kill_level", 30.0,
     "map [u@example.com]"),
    # a later layer that does not set the key leaves it
    ([Layer("bank a", {"spam_lover": True}), Layer("map [u@x]", {"tag_level": 1.0})],
     "spam_lover", True, "bank a"),
    ([Layer("bank a", {"kill_action": Action.DISCARD})], "kill_action", Action.DISCARD, "bank a"),
    ([], "spam_headers", True, "default"),
    ([Layer("bank a", {"local": False})], "local", False, "bank a"),
])
def test_which_layer_wins(layers, key, value, source):
    eff = merge(BASE, layers)
    got = getattr(eff.policy.levels, key, None) if key.endswith("_level") else \
        getattr(eff.policy, key, None) if key in ("kill_action", "subject_tag") else \
        getattr(eff, key)
    assert got == value
    assert eff.source_of(key) == source


def test_lists_accumulate_and_forced_merges_per_symbol():
    eff = merge(BASE, [Layer("a", {"allow_senders": ("@a.test",), "forced": {"X": Action.TAG}}),
                       Layer("b", {"allow_senders": ("b@b.test", "@a.test"),
                                   "forced": {"CLAM_VIRUS": Action.QUARANTINE}})])
    assert eff.allow_senders == ("@a.test", "b@b.test")
    assert dict(eff.policy.forced) == {"CLAM_VIRUS": Action.QUARANTINE, "X": Action.TAG}


@pytest.mark.parametrize("originating, layers, bypass", [
    (False, [], False),
    (True, [], True),                       # today's rule without banks
    (True, [Layer("b", {"bypass_spam_checks": False})], False),
    (False, [Layer("b", {"bypass_spam_checks": True})], True),
])
def test_bypass_default_follows_originating(originating, layers, bypass):
    assert merge(BASE, layers, originating=originating).bypass_spam_checks is bypass


SCORES = {"SPAMMY": 12.0, "HUGE": 30.0, "CLAM_VIRUS": 0.0}


@pytest.mark.parametrize("layers, symbols, action, tagged", [
    ([], ["SPAMMY"], Action.QUARANTINE, True),
    ([Layer("u", {"spam_lover": True})], ["SPAMMY"], Action.SPAM, True),
    ([Layer("u", {"spam_lover": True})], ["HUGE"], Action.SPAM, True),
    ([Layer("u", {"spam_lover": True})], ["CLAM_VIRUS"], Action.REJECT, False),
    ([Layer("u", {"virus_lover": True})], ["CLAM_VIRUS"], Action.ACCEPT, False),
    ([Layer("u", {"bypass_spam_checks": True})], ["HUGE"], Action.ACCEPT, False),
    ([Layer("u", {"quarantine": False})], ["SPAMMY"], Action.DISCARD, True),
    ([Layer("u", {"kill_level": math.inf})], ["SPAMMY"], Action.SPAM, True),
    # outbound: no spam tagging, but a compromised account's spam is refused
    ([Layer("o", {"originating": True, "bypass_spam_checks": True,
                  "originating_reject_level": 25.0})], ["SPAMMY"], Action.ACCEPT, False),
    ([Layer("o", {"originating": True, "bypass_spam_checks": True,
                  "originating_reject_level": 25.0})], ["HUGE"], Action.REJECT, False),
])
def test_recipient_verdicts(layers, symbols, action, tagged):
    verdict = decide_for([Symbol(s) for s in symbols], SCORES, merge(BASE, layers))
    assert verdict.action is action
    assert verdict.tagged is tagged


@pytest.mark.parametrize("lists, sender, symbol, action", [
    ({"allow_senders": ("@.partner.test",)}, "a@mx.partner.test", "POLICY_SENDER_ALLOWED",
     Action.ACCEPT),
    ({"deny_senders": ("*@spam.test",)}, "x@spam.test", "POLICY_SENDER_DENIED", Action.REJECT),
    ({"deny_senders": ("x@spam.test",)}, "X@Spam.Test", "POLICY_SENDER_DENIED", Action.REJECT),
    ({"deny_senders": ("@spam.test",)}, "x@sub.spam.test", None, Action.QUARANTINE),
])
def test_sender_lists_are_per_recipient_symbols(lists, sender, symbol, action):
    scores = {**SCORES, "POLICY_SENDER_ALLOWED": -100.0, "POLICY_SENDER_DENIED": 100.0}
    verdict = decide_for([Symbol("SPAMMY")], scores, merge(BASE, [Layer("u", lists)]),
                         senders=(sender,))
    assert (symbol in verdict.symbol_names) if symbol else \
        not any(n.startswith("POLICY_") for n in verdict.symbol_names)
    assert verdict.action is action


def test_site_layers_merge_and_replace(shipped, tmp_path):
    site = tmp_path / "site"
    (site / "local.d" / "banks").mkdir(parents=True)
    (site / "override.d" / "banks").mkdir(parents=True)
    (site / "local.d" / "banks" / "x.toml").write_text(
        "[bank.partners]\ntag2_level = 7.5\n[bank.new]\nselect = {}\nkill_level = 50\n")
    (site / "override.d" / "banks" / "y.toml").write_text(
        "[bank.lmtp]\nselect = { listener = \"smtp\" }\n")
    banks = {b.name: b for b in load_banks(shipped, site)}
    assert banks["partners"].overrides["tag2_level"] == 7.5          # merged ...
    assert banks["partners"].overrides["disable_checks"] == ("dnsbl*",)  # ... keeping the rest
    assert "x.toml" in banks["partners"].source
    assert "subject_tag" not in banks["lmtp"].overrides              # replaced whole
    assert [b.name for b in select_banks(list(banks.values()), MessageFacts(listener="smtp"))] \
        == ["lmtp", "new"]          # same order: by name


@pytest.mark.parametrize("text, problem", [
    ("[bank.x]\ntag2_level = 5\n", "needs `select`"),
    ("[bank.x]\nselect = {}\ntag2_levle = 5\n", "unknown key"),
    ("[bank.x]\nselect = { listener = \"pop3\" }\n", "unknown listener"),
    ("[bank.x]\nselect = { client_networks = [\"10.0.0.300/8\"] }\n", "not a network"),
    ("[bank.x]\nselect = { port = \"25\" }\n", "port number"),
    ("[bank.x]\nselect = { colour = 1 }\n", "unknown condition"),
    ("[bank.x]\nselect = {}\nkill_action = \"explode\"\n", "unknown action"),
    ("[bank.x]\nselect = {}\ntag_level = \"high\"\n", "number or \"off\""),
    ("[bank.x]\nselect = []\n", "never selects"),
    ("[banks.x]\nselect = {}\n", "unknown table"),
    ("[bank.x\n", "syntax"),
])
def test_bad_bank_files_name_file_and_key(tmp_path, text, problem):
    d = tmp_path / "rules"
    (d / "banks").mkdir(parents=True)
    (d / "banks" / "bad.toml").write_text(text)
    with pytest.raises(PolicyError) as exc:
        load_banks(d)
    assert problem in str(exc.value) and "bad.toml" in str(exc.value)


def test_shipped_originating_bank():
    [bank] = load_banks(PROJECT_RULES)
    assert bank.name == "originating"
    assert bank.matches(MessageFacts(mynetworks=True)) and bank.matches(
        MessageFacts(auth_user="u")) and not bank.matches(MessageFacts(client_ip="192.0.2.1"))
    eff = merge(BASE, [Layer("bank originating", bank.overrides)], originating=True)
    assert eff.originating and eff.dkim_sign and eff.bypass_spam_checks and not eff.spam_headers
    assert eff.policy.levels.originating_reject_level == math.inf
