"""aerl_fast.analysis.verdict's decisions on hand-made per-sample outcomes: the worst case is the
per-sample union over clean-correct points, each ordering check compares its own kind with the
union of the white-box attacks, every count threshold on both sides, and the label and the
sentence follow the checks that fired (and only those)."""
import math

import pytest
import torch

from aerl_fast.analysis.masking import MaskingFlag
from aerl_fast.analysis.verdict import (GRADIENT_FREE, LABELS, SINGLE_STEP, TRANSFER, WHITE_BOX, AttackBreaks,
                                        check_convergence, check_ordering, check_self_test, decide, label_counts,
                                        min_count, worst_case)


def _breaks(name, kind, bits):
    return AttackBreaks(name, kind, torch.tensor(bits, dtype=torch.bool))


def _mask(n, on):
    m = torch.zeros(n, dtype=torch.bool)
    m[list(on)] = True
    return m


@pytest.mark.parametrize("n, expected", [(0, 2), (10, 2), (100, 2), (400, 2), (401, 3), (1000, 5), (1001, 6)])
def test_min_count_is_half_a_percent_rounded_up_and_at_least_two(n, expected):
    assert min_count(n) == expected
    assert min_count(n, share=0.1) == max(2, math.ceil(0.1 * n))


def test_worst_case_and_unique_breaks_by_hand():
    clean = torch.tensor([1, 1, 1, 1, 0, 1], dtype=torch.bool)
    atts = [_breaks("pgd", WHITE_BOX, [1, 0, 0, 0, 1, 0]), _breaks("apgd-t", WHITE_BOX, [1, 1, 0, 0, 0, 0]),
            _breaks("square", GRADIENT_FREE, [0, 0, 1, 0, 0, 0])]
    w = worst_case(clean, atts)
    assert (w.n, w.clean, w.robust) == (6, 5, 2)          # points 3 and 5 survive everything
    assert w.broken_by == {"pgd": 1, "apgd-t": 2, "square": 1}  # point 4 is not clean-correct: not counted
    assert w.only_by == {"pgd": 0, "apgd-t": 1, "square": 1}
    assert w.robust_mask.tolist() == [False, False, False, True, False, True]
    assert w.accuracy == pytest.approx(2 / 6)
    js = w.to_json()
    assert "robust_mask" not in js and js["accuracy"] == pytest.approx(2 / 6)
    assert (js["n"], js["clean"], js["robust"], js["broken_by"], js["only_by"]) == (6, 5, 2, w.broken_by, w.only_by)


def test_worst_case_without_attacks_is_clean_accuracy():
    w = worst_case(torch.tensor([1, 0, 1], dtype=torch.bool), [])
    assert (w.n, w.clean, w.robust, w.broken_by, w.only_by) == (3, 2, 2, {}, {})
    assert w.robust_mask.tolist() == [True, False, True]
    assert math.isnan(worst_case(torch.zeros(0, dtype=torch.bool), []).accuracy)


@pytest.mark.parametrize("missed, flagged", [(0, False), (1, False), (2, True)])
def test_ordering_flags_points_the_white_box_attacks_missed(missed, flagged):
    n = 100
    white = torch.zeros(n, dtype=torch.bool)
    white[:30] = True
    other = white.clone()
    other[30:30 + missed] = True
    for kind, check in ((TRANSFER, "ordering_transfer"), (GRADIENT_FREE, "ordering_gradient_free"),
                        (SINGLE_STEP, "ordering_single_step")):
        flags = {f.check: f for f in check_ordering([AttackBreaks("w", WHITE_BOX, white), AttackBreaks("o", kind, other)], n)}
        assert flags[check].flagged is flagged and flags[check].numbers["missed_by_white_box"] == missed
        assert (": the model's own gradients are the weaker attack" in flags[check].observed) is flagged


@pytest.mark.parametrize("missed, flagged", [(4, False), (5, True)])
def test_ordering_threshold_grows_with_the_set(missed, flagged):
    n = 1000
    white = _mask(n, range(100))
    square = _mask(n, range(100 + missed))
    f = {f.check: f for f in check_ordering([AttackBreaks("w", WHITE_BOX, white),
                                             AttackBreaks("square", GRADIENT_FREE, square)], n)}
    assert f["ordering_gradient_free"].flagged is flagged
    assert f["ordering_gradient_free"].numbers["threshold"] == 5


def test_ordering_compares_each_kind_with_the_union_of_the_white_box_attacks():
    """Point 5 is broken only by the second white-box attack: no transfer break of it is 'missed'.
    Points 6-8 are broken by the two transfer sources (t2 alone breaks 7 and 8) and by no white-box
    attack; FGSM breaks only what white-box breaks; there is no gradient-free attack."""
    n = 20
    attacks = [AttackBreaks("pgd", WHITE_BOX, _mask(n, [0, 1])), AttackBreaks("apgd-dlr", WHITE_BOX, _mask(n, [5])),
               AttackBreaks("t1", TRANSFER, _mask(n, [0, 5, 6])), AttackBreaks("a2", TRANSFER, _mask(n, [6, 7, 8])),
               AttackBreaks("fgsm", SINGLE_STEP, _mask(n, [1, 5]))]
    f = {x.check: x for x in check_ordering(attacks, n)}
    assert f["ordering_transfer"].flagged is True
    assert f["ordering_transfer"].numbers == {"missed_by_white_box": 3, "by_attack": {"t1": 1, "a2": 3},
                                              "threshold": 2}
    assert f["ordering_transfer"].observed == (   # a2 breaks most (not the first or last name)
        "3 of 20 points are broken by transfer from other models but by no white-box attack (most by a2: 3): "
        "the model's own gradients are the weaker attack")
    assert f["ordering_single_step"].flagged is False
    assert f["ordering_single_step"].numbers["missed_by_white_box"] == 0
    assert f["ordering_single_step"].observed == "0 of 20 points are broken by single-step FGSM but by no white-box attack"
    assert f["ordering_gradient_free"].flagged is None
    assert f["ordering_gradient_free"].observed == "needs the gradient-free Square attack and a white-box attack"


def test_ordering_without_a_white_box_attack_is_not_run():
    n = 10
    flags = check_ordering([AttackBreaks("t", TRANSFER, _mask(n, range(10))),
                            AttackBreaks("sq", GRADIENT_FREE, _mask(n, range(10)))], n)
    assert [f.check for f in flags] == ["ordering_transfer", "ordering_gradient_free", "ordering_single_step"]
    assert all(f.flagged is None and f.numbers == {} for f in flags)


@pytest.mark.parametrize("extra, n, flagged", [(0, 1000, False), (4, 1000, False), (5, 1000, True), (2, 50, True),
                                               (1, 50, False)])
def test_convergence_threshold(extra, n, flagged):
    f = check_convergence(extra, 100, n, "APGD x2")
    assert f.flagged is flagged
    assert f.numbers == {"extra_broken": extra, "attacked": 100, "n": n, "threshold": min_count(n)}
    assert f.observed.startswith(f"APGD x2 broke {extra} more of the 100 points still robust ({extra / n:.1%} of {n})")
    assert ("had not converged" in f.observed) is flagged


def test_convergence_reports_word_for_word():
    fired, quiet = check_convergence(5, 40, 1000, "APGD x2"), check_convergence(4, 40, 1000, "APGD x2")
    assert (fired.check, fired.observed) == ("convergence", "APGD x2 broke 5 more of the 40 points still robust "
                                                            "(0.5% of 1000): the attack had not converged")
    assert (quiet.check, quiet.observed) == ("convergence", "APGD x2 broke 4 more of the 40 points still robust "
                                                            "(0.4% of 1000)")


@pytest.mark.parametrize("broken, attempted, flagged", [(64, 64, False), (61, 64, False), (60, 64, True),
                                                        (0, 64, True), (19, 20, False), (18, 20, True)])
def test_self_test_threshold(broken, attempted, flagged):
    """Needs 95% broken: 19 of 20 is exactly enough."""
    f = check_self_test(broken, attempted)
    assert f.flagged is flagged
    assert f.numbers == {"broken": broken, "attempted": attempted, "rate": broken / attempted, "min_rate": 0.95}
    assert f"the attack broke {broken} of {attempted} points" in f.observed
    assert ("the ATTACK fails" in f.observed) is flagged
    assert check_self_test(broken, attempted, min_rate=broken / attempted).flagged is False
    none = check_self_test(0, 0)
    assert (none.check, none.flagged, none.numbers) == ("attack_self_test", None, {})
    assert none.observed == "no clean-correct point to build the breakable model on"


def test_self_test_reports_word_for_word():
    failed, passed = check_self_test(18, 20), check_self_test(19, 20)
    assert (failed.check, failed.observed) == (
        "attack_self_test", "the attack broke 18 of 20 points of the same model with a shortcut to a wrong class "
        "inside the ε-ball (90%; needs 95%): the ATTACK fails, so its numbers say nothing about the model")
    assert passed.observed == ("the attack broke 19 of 20 points of the same model with a shortcut to a wrong "
                               "class inside the ε-ball (95%; needs 95%)")


def _flag(check, flagged, observed="seen"):
    return MaskingFlag(check, flagged, observed)


SETTINGS = {"eps": 0.5, "norm": "l2", "norm_name": "L2"}


def test_decide_puts_attack_failure_before_masking():
    w = worst_case(torch.ones(4, dtype=torch.bool), [])
    ok, bad_attack = check_self_test(4, 4), check_self_test(0, 4)
    masked = check_convergence(3, 4, 4, "x")
    settings = {"eps": 0.5, "norm": "l2"}
    assert decide(w, [ok], settings).label == "no masking signs"
    assert decide(w, [ok, masked], settings).label == "masking likely"
    assert decide(w, [bad_attack, masked], settings).label == "attack failure"


def test_checks_that_did_not_run_decide_nothing():
    w = worst_case(torch.ones(4, dtype=torch.bool), [])
    v = decide(w, [_flag("attack_self_test", None), _flag("randomness", None), _flag("gradients", False)], SETTINGS)
    assert v.label == "no masking signs"
    assert v.sentence.endswith("none of 3 gradient-masking and attack checks fired.")


def test_the_sentence_names_the_model_the_threat_and_what_fired():
    clean = _mask(8, range(6))
    w = worst_case(clean, [AttackBreaks("pgd", WHITE_BOX, _mask(8, [0])), AttackBreaks("sq", GRADIENT_FREE, _mask(8, [1]))])
    assert w.accuracy == 0.5
    failed = decide(w, [_flag("attack_self_test", True, "broke 1 of 9"), _flag("gradients", True)], SETTINGS, "rl-1")
    assert failed.label == "attack failure"
    assert failed.sentence == ("The white-box attack failed its self-test on rl-1 (broke 1 of 9); no robustness claim "
                               "at L2 ε = 0.5 can rest on it.")
    masked = decide(w, [_flag("attack_self_test", False), _flag("gradients", True, "4 zero"), _flag("saturation", False),
                        _flag("randomness", True, "changed")], SETTINGS)
    assert masked.label == "masking likely"
    assert masked.sentence == ("At L2 ε = 0.5, the worst case over 2 attacks leaves 50.0% of 8 test images correct, "
                               "but the gradient-masking checks gradients, randomness fired (4 zero); this number is "
                               "an upper bound that adaptive or gradient-free attacks may lower further, not evidence "
                               "of robustness.")
    unnamed = decide(w, [_flag("attack_self_test", True, "broke 0 of 9")], {})   # nothing about the threat known
    assert unnamed.sentence == ("The white-box attack failed its self-test on the model (broke 0 of 9); no robustness "
                                "claim at  ε = nan can rest on it.")
    clean_v = decide(w, [_flag("attack_self_test", False), _flag("gradients", False)], {"eps": 0.25, "norm": "linf"})
    assert clean_v.sentence == ("At linf ε = 0.25, the worst case over 2 attacks (white-box, transfer and "
                                "gradient-free) leaves 50.0% of 8 test images correct, and none of 2 gradient-masking "
                                "and attack checks fired.")
    js = masked.to_json()
    assert js["label"] == "masking likely" and js["sentence"] == masked.sentence and js["settings"] == SETTINGS
    assert js["worst_case"] == w.to_json() and [c["check"] for c in js["checks"]] == [
        "attack_self_test", "gradients", "saturation", "randomness"]


def test_label_counts_skip_models_without_a_verdict():
    w = worst_case(torch.ones(2, dtype=torch.bool), [])
    v = [decide(w, [], SETTINGS), decide(w, [_flag("gradients", True)], SETTINGS), None,
         decide(w, [_flag("gradients", True)], SETTINGS)]
    assert label_counts(v) == {"no masking signs": 1, "masking likely": 2, "attack failure": 0}
    assert list(label_counts([])) == list(LABELS)
