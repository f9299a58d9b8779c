"""decide(): table-driven, every level and every override."""

import pytest

from filterd.policy import Action, Levels, Policy, Symbol, decide

SCORES = {"A": 1.0, "B": 2.5, "BIG": 7.0, "HUGE": 12.0, "HUGER": 20.0, "NEG": -3.0,
          "CLAM_VIRUS": 0.0, "CLAM_UNAVAILABLE": 0.0}
POLICY = Policy(levels=Levels(2.0, 6.0, 10.0, 15.0),
                forced={"CLAM_VIRUS": Action.REJECT},
                failures={"CLAM_UNAVAILABLE": Action.TEMPFAIL, "deadline": Action.TEMPFAIL})


@pytest.mark.parametrize("symbols, originating, failure, action, score, tagged, spam", [
    ([], False, None, Action.ACCEPT, 0.0, False, False),
    (["A"], False, None, Action.ACCEPT, 1.0, False, False),
    (["A", "A"], False, None, Action.TAG, 2.0, True, False),
    (["BIG"], False, None, Action.SPAM, 7.0, True, True),
    (["HUGE"], False, None, Action.QUARANTINE, 12.0, True, True),
    (["HUGER"], False, None, Action.REJECT, 20.0, True, True),
    (["HUGE", "NEG"], False, None, Action.SPAM, 9.0, True, True),
    (["BIG", "NEG"], False, None, Action.TAG, 4.0, True, False),
    (["UNKNOWN"], False, None, Action.ACCEPT, 0.0, False, False),
    # originating mail is never spam-tagged, but forced actions still apply
    (["HUGER"], True, None, Action.ACCEPT, 20.0, False, False),
    (["CLAM_VIRUS"], True, None, Action.REJECT, 0.0, False, False),
    # failure defaults
    (["CLAM_UNAVAILABLE"], False, None, Action.TEMPFAIL, 0.0, False, False),
    ([], False, "deadline", Action.TEMPFAIL, 0.0, False, False),
    ([], False, "never_heard_of", Action.TEMPFAIL, 0.0, False, False),
    # a deliberate reject needs no retry: it outranks a failure
    (["CLAM_VIRUS", "CLAM_UNAVAILABLE"], False, None, Action.REJECT, 0.0, False, False),
    (["HUGE", "CLAM_UNAVAILABLE"], False, None, Action.TEMPFAIL, 12.0, True, True),
])
def test_decide(symbols, originating, failure, action, score, tagged, spam):
    verdict = decide([Symbol(s) for s in symbols], SCORES, POLICY, originating=originating,
                     failure=failure)
    assert verdict.action is action
    assert verdict.score == pytest.approx(score)
    assert verdict.tagged is tagged
    assert verdict.is_spam is spam
    assert verdict.required == 6.0


def test_scores_are_attached_and_virus_names_collected():
    verdict = decide([Symbol("CLAM_VIRUS", ("Eicar-Test",)), Symbol("B")], SCORES, POLICY)
    assert [(s.name, s.score) for s in verdict.symbols] == [("CLAM_VIRUS", 0.0), ("B", 2.5)]
    assert verdict.virus_names == ("Eicar-Test",)
    assert verdict.reason == "CLAM_VIRUS (Eicar-Test)"


def test_kill_action_is_policy():
    policy = Policy(levels=Levels(), kill_action=Action.DISCARD)
    assert decide([Symbol("HUGE")], SCORES, policy).action is Action.DISCARD


def test_spam_verdicts_for_evaluation():
    assert {a for a in Action if a.is_spam_verdict} == {
        Action.SPAM, Action.QUARANTINE, Action.REJECT, Action.DISCARD}
