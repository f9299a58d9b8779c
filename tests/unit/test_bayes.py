"""Bayes: tokenizer, classifier, digests, learner batching, the check, autolearn, the API."""

from __future__ import annotations

import asyncio
import random

import pytest

from filterd import config
from filterd.bayes import HAM, SPAM, Bayes, Learner, message_digest
from filterd.bayes.api import forget, learn
from filterd.bayes.classifier import ClassifierParams, band, classify
from filterd.bayes.tokenizer import tokenize
from filterd.message import Envelope, parse
from filterd.stores import open_token_store
from filterd.stores.sqlite import SqliteTokenStore


def msg(subject: str = "hello", body: str = "just a note", *, headers: str = "",
        mid: str = "<1@example.org>", ctype: str = "text/plain") -> bytes:
    return (f"From: Alice <alice@example.org>\nTo: bob@example.net\nSubject: {subject}\n"
            f"Message-ID: {mid}\nDate: Mon, 16 Apr 2007 04:13:20 -0400\n{headers}"
            f"Content-Type: {ctype}; charset=utf-8\n\n{body}\n").encode()


def settings_for(tmp_path, **overrides):
    values = {"daemon.state_dir": str(tmp_path), "bayes.min_spam": 5, "bayes.min_ham": 5}
    rules = tmp_path / "rules"
    if not rules.exists():
        # the core rule files plus ours: loading every family's rules costs seconds per Scanner
        import shutil
        from filterd.config import PROJECT_RULES
        rules.mkdir()
        for name in ("actions.toml", "core.toml", "scores.toml", "bayes.toml"):
            shutil.copy(PROJECT_RULES / name, rules / name)
    values["rules.dir"] = str(rules)
    values.update(overrides)
    return config.defaults().with_overrides(values)


# --- tokenizer -----------------------------------------------------------------------------
def test_tokenizer_prefixes_headers_and_reads_body():
    tokens = tokenize(parse(msg("Cheap watches", "Buy our watches today")))
    assert {"S:cheap", "S:watches", "watches", "today", "FD:example.org"} <= set(tokens)
    assert "F:alice@example.org" in tokens and "MD:example.org" in tokens


def test_tokenizer_never_learns_other_filters_verdicts():
    foreign = ("X-Spam-Status: No, score=-2.6 required=5.0 tests=BAYES_00 autolearn=ham\n"
               "X-Spam-Flag: NO\nX-Virus-Scanned: ClamAV\nX-Barracuda-Spam-Score: -2.02\n"
               "X-Bogosity: Ham, tests=bogofilter\n"
               "Authentication-Results: mx.other; spf=pass smtp.mailfrom=example.org\n")
    with_verdicts = tokenize(parse(msg(headers=foreign)))
    without = tokenize(parse(msg()))
    assert with_verdicts == without


def test_tokenizer_drops_corpus_obfuscation_artifacts():
    raw = msg("Re: yyyy's patch", "zzzz@spamassassin.taint.org wrote: see jm@spamassassin.taint.org",
              headers="Reply-To: yyyy@spamassassin.taint.org\n")
    tokens = tokenize(parse(raw))
    assert not [t for t in tokens if "taint.org" in t or "zzzz" in t or "yyyy" in t]
    assert "wrote" in tokens


def test_tokenizer_defeats_common_obfuscation():
    body = ("V.I.A.G.R.A and f r e e c-i-a-l-i-s, v\u0456agra (Cyrillic i), "
            "vi\u200bagra (zero width), \uff56\uff49\uff41\uff47\uff52\uff41 (full width)")
    tokens = tokenize(parse(msg(body=body)))
    assert tokens.count("viagra") == 1      # every spelling became the same token
    assert {"free", "cialis"} <= set(tokens)
    assert not [t for t in tokens if "\u200b" in t or "\u0456" in t]


def test_tokenizer_html_text_urls_and_attachments():
    raw = (b"From: a@b.example\nSubject: x\nMIME-Version: 1.0\n"
           b"Content-Type: multipart/mixed; boundary=XX\n\n--XX\n"
           b"Content-Type: text/html\n\n<html><body><p>Click <a href='http://shop.evil.example/buy/now?id=3'>"
           b"here</a> <!-- hidden --> <font color=red>Bargain</font></p></body></html>\n"
           b"--XX\nContent-Type: application/octet-stream\nContent-Disposition: attachment; "
           b"filename=\"invoice.exe\"\n\nMZ\x90\x00\n--XX--\n")
    tokens = set(tokenize(parse(raw)))
    assert {"click", "bargain", "U:shop.evil.example", "UD:evil.example", "UP:buy",
            "A:ext:exe", "H:font", "CT:text/html"} <= tokens
    assert "font" not in tokens and "color" not in tokens   # markup is not text


def test_tokenizer_is_bounded_and_strips_our_subject_tag():
    body = " ".join(f"word{i}" for i in range(20000))
    tokens = tokenize(parse(msg(body=body)), max_tokens=500)
    assert len(tokens) == 500 and len(set(tokens)) == 500
    assert tokenize(parse(msg("***SPAM*** Cheap"))) == tokenize(parse(msg("Cheap")))


def test_tokenizer_survives_broken_input():
    for raw in (b"", b"\x00\xff" * 100, b"Subject: =?utf-8?b?////?=\n\n\xff\xfe",
                b"Content-Type: multipart/mixed; boundary=\"\"\n\n--\n--\n",
                b"From: <@>\nMessage-ID: <@>\n\n" + b"a" * 100_000):
        assert isinstance(tokenize(parse(raw)), tuple)


def test_bigrams_add_word_pairs():
    tokens = tokenize(parse(msg(body="limited time offer")), bigrams=True)
    assert {"B:limited time", "B:time offer", "B:limited ? offer"} <= set(tokens)


# --- classifier ----------------------------------------------------------------------------
def test_classifier_matches_hand_computation():
    params = ClassifierParams(robinson_s=1.0, robinson_x=0.5, min_dev=0.0, max_significant=150)
    counts = {"a": (9, 1), "b": (1, 9)}
    # f(a): p = 0.9/(0.9+0.1) = 0.9, f = (0.5 + 10*0.9)/11 = 0.8636...; f(b) = 1 - f(a)
    fa = (0.5 + 10 * 0.9) / 11
    result = classify(["a"], counts, 10, 10, params)
    # one token: H = 1 - Q(-2 ln fa, 2), S = 1 - Q(-2 ln(1-fa), 2), Q(x, 2) = exp(-x/2)
    h, s = 1 - fa, 1 - (1 - fa)
    assert result.probability == pytest.approx((1 + s - h) / 2)
    both = classify(["a", "b"], counts, 10, 10, params)
    assert both.probability == pytest.approx(0.5)
    assert both.used == 2 and both.known == 2


def test_classifier_ignores_unknown_and_weak_tokens():
    params = ClassifierParams(robinson_s=0.45, robinson_x=0.5, min_dev=0.375, max_significant=150)
    counts = {"spammy": (50, 0), "neutral": (10, 10)}
    result = classify(["spammy", "neutral", "never-seen"], counts, 100, 100, params, explain=5)
    assert result.used == 1 and result.known == 2 and result.probability > 0.9
    assert result.top[0][0] == "spammy"
    assert classify(["x"], {}, 0, 0).probability == 0.5


@pytest.mark.parametrize("p,name", [(0.0, "BAYES_00"), (0.0099, "BAYES_00"), (0.01, "BAYES_05"),
                                    (0.5, "BAYES_50"), (0.949, "BAYES_80"), (0.95, "BAYES_95"),
                                    (0.99, "BAYES_99"), (0.9995, "BAYES_999"), (1.0, "BAYES_999")])
def test_bands(p, name):
    assert band(p) == name


# --- digests and the learner ---------------------------------------------------------------
def test_digest_is_stable_across_delivered_copies():
    original = msg("Offer", "body text")
    delivered = (b"Return-Path: <x@y>\r\nReceived: from a by b\r\nX-Spam-Flag: YES\r\n" +
                 original.replace(b"Subject: Offer", b"Subject: ***SPAM*** Offer")
                 .replace(b"\n", b"\r\n"))
    assert message_digest(delivered) == message_digest(original)
    assert message_digest(msg("Offer", "other body")) != message_digest(original)
    no_mid = msg(mid="", body="x").replace(b"Message-ID: \n", b"")
    assert message_digest(no_mid) != message_digest(msg(mid="", body="y").replace(b"Message-ID: \n", b""))


def _state(store):
    return store.message_counts(), sorted(store.iter_tokens()), sorted(store.iter_learned())


def test_batching_changes_speed_never_counts(tmp_path):
    rng = random.Random(5)
    bodies = [" ".join(rng.choice(["cheap", "meds", "meeting", "lunch", "report", "win",
                                   "prize", "notes"]) for _ in range(12)) for _ in range(30)]
    ops = [(i % 30, rng.choice([SPAM, HAM, None])) for i in range(300)]
    states = []
    for batch_size in (1, 7, 1000):
        store = SqliteTokenStore(tmp_path / f"b{batch_size}.sqlite")
        learner = Learner(Bayes(store), batch_size=batch_size)
        for n, label in ops:
            learner.add(str(n), msg(body=bodies[n], mid=f"<{n}@x>"), label)
        learner.flush()
        states.append(_state(store))
        assert store.stats().consistent
        store.close()
    assert states[0] == states[1] == states[2]


def test_api_learn_forget_and_move(tmp_path):
    settings = settings_for(tmp_path)
    raw = msg("Winner", "You won a prize")
    assert learn(settings, raw, "spam") is True
    assert learn(settings, raw, "spam") is False           # twice: a no-op
    assert learn(settings, raw, "ham") is True             # moved
    store = open_token_store(settings)
    assert store.message_counts() == (0, 1)
    assert store.token_counts(["prize"]) == {"prize": (0, 1)}
    store.close()
    assert forget(settings, raw) is True and forget(settings, raw) is False
    with pytest.raises(ValueError):
        learn(settings, raw, "junk")
    assert (tmp_path / "bayes.sqlite").exists()


# --- the check and autolearn ---------------------------------------------------------------
def _train(settings, n=20):
    store = open_token_store(settings)
    learner = Learner(Bayes.from_settings(settings, store))
    for i in range(n):
        learner.add(f"s{i}", msg(f"Cheap meds {i}", f"buy cheap meds online pharmacy now {i}",
                                 mid=f"<s{i}@spam.example>"), SPAM)
        learner.add(f"h{i}", msg(f"Minutes {i}", f"the meeting minutes and project report {i}",
                                 mid=f"<h{i}@corp.example>"), HAM)
    learner.flush()
    store.close()


def _scan(scanner, raw):
    return asyncio.run(scanner.scan(raw, Envelope(client_ip="192.0.2.1"), skip_network=True))


def _bayes_symbols(outcome):
    return [s for s in outcome.verdict.symbols if s.name.startswith("BAYES_")]


def test_check_untrained_then_votes(tmp_path):
    from filterd.service import Scanner
    settings = settings_for(tmp_path)
    scanner = Scanner(settings)
    (sym,) = _bayes_symbols(_scan(scanner, msg()))
    assert sym.name == "BAYES_UNTRAINED" and sym.options == ("spam=0", "ham=0")
    _train(settings)
    spam = _scan(scanner, msg("Cheap meds", "cheap meds pharmacy online", mid="<t1@x>"))
    ham = _scan(scanner, msg("Minutes", "project meeting report minutes", mid="<t2@x>"))
    (s,), (h,) = _bayes_symbols(spam), _bayes_symbols(ham)
    assert s.name in ("BAYES_99", "BAYES_999") and float(s.options[0]) >= 0.99
    # calibrated: a ham known from a handful of tokens lands in the bottom two bands
    assert h.name in ("BAYES_00", "BAYES_05") and float(h.options[0]) < 0.05
    scores = scanner.ruleset.scores
    assert s.score == scores[s.name] > 0 > scores[h.name] == h.score


def test_check_store_down_adds_zero_score_symbol_not_tempfail(tmp_path):
    from filterd.service import Scanner
    from harness.ports import free_port
    pytest.importorskip("redis")
    settings = settings_for(tmp_path, **{"bayes.backend": "redis",
                                         "bayes.redis_url": f"redis://127.0.0.1:{free_port()}/0"})
    outcome = _scan(Scanner(settings), msg())
    (sym,) = _bayes_symbols(outcome)
    assert sym.name == "BAYES_STORE_ERROR" and sym.score == 0.0
    assert outcome.verdict.action.value != "tempfail"


def test_check_disabled(tmp_path):
    from filterd.service import Scanner
    outcome = _scan(Scanner(settings_for(tmp_path, **{"bayes.enabled": False})), msg())
    assert _bayes_symbols(outcome) == []


def _log_and_wait(scanner, outcome):
    from filterd.checks.bayes import BayesService
    from filterd.service import Disposition
    scanner.log_message(outcome, Disposition(outcome.verdict.action), "smtp")
    svc = scanner.services["bayes"]
    assert isinstance(svc, BayesService)
    svc._learner.submit(lambda: None).result(10)   # the learn queue has drained


def test_autolearn_at_thresholds_and_never_over_a_learned_message(tmp_path):
    from filterd.service import Scanner
    settings = settings_for(tmp_path)
    scanner = Scanner(settings)
    scanner.start_services()
    gtube = "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"
    spam = msg("test", gtube, mid="<gtube@x>")
    _log_and_wait(scanner, _scan(scanner, spam))
    store = open_token_store(settings)
    assert store.learned_label(message_digest(spam)) == SPAM
    # a message an admin learned as ham is never moved by autolearn
    other = msg("test 2", gtube + " again", mid="<gtube2@x>")
    assert learn(settings, other, "ham")
    _log_and_wait(scanner, _scan(scanner, other))
    assert store.learned_label(message_digest(other)) == HAM
    # an ordinary message scores between the thresholds: not learned
    plain = msg("lunch", "see you at noon", mid="<plain@x>")
    _log_and_wait(scanner, _scan(scanner, plain))
    assert store.learned_label(message_digest(plain)) is None
    assert store.message_counts() == (1, 1)
    store.close()


def test_autolearn_scores_with_the_set_without_bayes(tmp_path):
    """The [bayes_scores] set weighs a rule less once Bayes voted; autolearn still sees the
    rule's [scores] weight (as SpamAssassin's autolearn uses its non-Bayes score set)."""
    from filterd.service import Scanner
    settings = settings_for(tmp_path)
    (tmp_path / "rules" / "phrase.toml").write_text(
        '[rule.PILLS_PHRASE]\nkind = "body"\npattern = \'cheap meds\'\n'
        'description = "test phrase"\n\n[scores]\nPILLS_PHRASE = 13.0\n\n'
        '[score_sets]\nbayes_scores = ["BAYES_00", "BAYES_05", "BAYES_20", "BAYES_40", '
        '"BAYES_50", "BAYES_60", "BAYES_80", "BAYES_95", "BAYES_99", "BAYES_999"]\n\n'
        '[bayes_scores]\nPILLS_PHRASE = 1.0\n')
    _copy_engine_rules(tmp_path / "rules")
    _train(settings)
    scanner = Scanner(settings)
    scanner.start_services()
    spam = msg("Cheap meds today", "cheap meds pharmacy online", mid="<al1@x>")
    outcome = _scan(scanner, spam)
    phrase = [s for s in outcome.verdict.symbols if s.name == "PILLS_PHRASE"]
    assert phrase and phrase[0].score == 1.0          # scored with the Bayes set...
    assert _bayes_symbols(outcome)[0].name in ("BAYES_99", "BAYES_999")
    _log_and_wait(scanner, outcome)                    # ...but learned on its 13 points
    store = open_token_store(settings)
    assert store.learned_label(message_digest(spam)) == SPAM
    store.close()


def _copy_engine_rules(rules):
    import shutil
    from filterd.config import PROJECT_RULES
    shutil.copy(PROJECT_RULES / "rules-engine.toml", rules / "rules-engine.toml")


def test_autolearn_off_by_setting(tmp_path):
    from filterd.service import Scanner
    settings = settings_for(tmp_path, **{"bayes.autolearn": False})
    scanner = Scanner(settings)
    gtube = "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"
    spam = msg("test", gtube, mid="<gtube@x>")
    _log_and_wait(scanner, _scan(scanner, spam))
    store = open_token_store(settings)
    assert store.message_counts() == (0, 0)
    store.close()


def test_periodic_expiry_removes_old_tokens(tmp_path):
    from filterd.checks import bayes as check_module
    from filterd.stores import LearnItem
    settings = settings_for(tmp_path, **{"bayes.token_max_age_days": 30})
    store = open_token_store(settings)
    store.learn_batch([LearnItem("d1", SPAM, ("ancient",))], 1000)
    store.learn_batch([LearnItem("d2", SPAM, ("fresh",))], int(__import__("time").time() // 86400))
    check_module._last_expiry = 0.0
    check_module.periodic_expire(settings)
    assert store.token_counts(["ancient", "fresh"]) == {"fresh": (1, 0)}
    store.close()


# --- exact Fisher tails and calibration ---------------------------------------------------
def test_fisher_raw_score_orders_messages_that_saturate_at_one():
    from filterd.bayes.classifier import _log_chi2_tails
    import math
    # both tails sum to 1, and agree with the plain series where that does not underflow
    for x2, dof in ((1.0, 2), (10.0, 4), (300.0, 300), (600.0, 300)):
        lower, upper = _log_chi2_tails(x2, dof)
        assert math.exp(lower) + math.exp(upper) == pytest.approx(1.0)
    assert math.exp(_log_chi2_tails(10.0, 4)[1]) == pytest.approx(math.exp(-5) * 6)
    params = ClassifierParams(robinson_s=0.2, min_dev=0.0)
    counts = {f"s{i}": (100, 0) for i in range(60)} | {"h": (0, 100)}
    strong = classify([f"s{i}" for i in range(60)], counts, 100, 100, params)
    weaker = classify([f"s{i}" for i in range(50)] + ["h"], counts, 100, 100, params)
    assert strong.probability == weaker.probability == 1.0      # Fisher's p saturates...
    assert strong.raw > weaker.raw > 0                           # ...its exact logit does not


def test_calibration_map_is_monotone_and_names_the_band():
    from filterd.bayes.classifier import DEFAULT_CALIBRATION, calibrate
    raws = [p for p, _ in DEFAULT_CALIBRATION]
    assert raws == sorted(raws)
    probs = [calibrate(r / 4.0, DEFAULT_CALIBRATION) for r in range(-400, 400)]
    assert probs == sorted(probs) and 0.0 < probs[0] < probs[-1] < 1.0
    for raw, p in DEFAULT_CALIBRATION:
        assert calibrate(raw, DEFAULT_CALIBRATION) == pytest.approx(p)
    params = ClassifierParams(calibration=DEFAULT_CALIBRATION)
    counts = {"spammy": (90, 0), "hammy": (0, 90)}
    assert band(classify(["spammy"] * 1, counts, 100, 100, params).probability) >= "BAYES_95"
    assert classify(["hammy"], counts, 100, 100, params).probability < 0.2


def test_learn_batch_with_undo_in_the_same_batch_keeps_exact_counts(tmp_path):
    from filterd.stores import LearnItem
    store = SqliteTokenStore(tmp_path / "b.sqlite")
    items = [LearnItem("d1", SPAM, ("a", "b")), LearnItem("d2", HAM, ("b", "c")),
             LearnItem("d1", HAM, ("a", "b")), LearnItem("d2", None, ("b", "c")),
             LearnItem("d3", SPAM, ("a",))]
    results = store.learn_batch(items, 100)
    assert [r.value for r in results] == ["learned", "learned", "moved", "forgotten", "learned"]
    assert store.message_counts() == (1, 1)
    assert store.token_counts(["a", "b", "c"]) == {"a": (1, 1), "b": (0, 1)}
    store.close()
