"""The promotion gate as a pure function: paired evidence on the same images, not one noisy number."""

from __future__ import annotations

import pytest

from tasks.modeling.gate import decide, paired
from tasks.project.config import Register  # the gate's rules are params.register


def _results(n: int, wrong: set[int]) -> list[bool]:
    return [i not in wrong for i in range(n)]


def test_paired_counts_and_exact_mcnemar():
    a = _results(100, {0, 1})  # 98 %
    b = _results(100, set(range(2, 12)))  # 90 %: disagree on 12 images, 10 of them only a gets right
    c = paired(a, b)
    assert (c.n, c.a_only, c.b_only) == (100, 10, 2)
    assert c.a_acc == pytest.approx(0.98) and c.delta == pytest.approx(0.08)
    from scipy.stats import binomtest

    assert c.p_a_better == pytest.approx(binomtest(10, 12, 0.5, alternative="greater").pvalue)
    assert c.p_a_better < 0.05 < c.p_b_better
    same = paired(a, a)
    assert same.p_a_better == same.p_b_better == 1.0 and same.delta == 0
    with pytest.raises(ValueError):
        paired(a, a[:-1])


def test_a_tie_with_the_baseline_is_not_negative_transfer():
    """98.3 % vs 98.3 % on a user's folder with all labels: promote, and say it is a tie."""
    a = _results(60, {5})
    d = decide(Register(), sum(a) / 60, champion=None, baseline=paired(a, a), baseline_name="scratch")
    assert d.promoted, d.reasons
    assert any("ties" in r for r in d.reasons)


def test_only_a_significantly_better_baseline_rejects():
    new = _results(540, set(range(30)))
    noise = paired(new, _results(540, set(range(28))))  # baseline 2 images better: noise
    d = decide(Register(), noise.a_acc, baseline=noise, baseline_name="scratch")
    assert d.promoted and "not significantly" in d.reasons[-1], d.reasons
    clear = paired(new, _results(540, set(range(5))))  # baseline 25 images better on the same images
    d = decide(Register(), clear.a_acc, baseline=clear, baseline_name="scratch")
    assert not d.promoted and "negative transfer" in d.reasons[-1] and d.p_baseline < 0.05


def test_champion_non_inferiority_and_superiority():
    champ = _results(540, set(range(20)))
    slightly_worse = paired(_results(540, set(range(22))), champ)
    d = decide(Register(), slightly_worse.a_acc, champion=slightly_worse, champion_version="3")
    assert d.promoted and "no significant difference" in d.reasons[1], d.reasons  # noise does not block a retrain
    much_worse = paired(_results(540, set(range(60))), champ)
    d = decide(Register(), much_worse.a_acc, champion=much_worse, champion_version="3")
    assert not d.promoted and "champion v3" in d.reasons[1] and d.p_champion < 0.05
    # a required improvement needs the effect size and significance
    better = paired(_results(540, set(range(5))), champ)
    assert decide(Register(min_improvement=0.02), better.a_acc, champion=better).promoted
    assert not decide(Register(min_improvement=0.05), better.a_acc, champion=better).promoted
    tiny = paired(_results(540, set(range(18))), champ)
    assert not decide(Register(min_improvement=0.001), tiny.a_acc, champion=tiny).promoted  # +0.4 pt, not significant


def test_an_incomparable_champion_is_never_replaced_and_the_reason_says_why():
    d = decide(
        Register(),
        0.99,
        champion="it predicts classes ['cat', 'dog'] but this target has ['0', '1', '2']",
        champion_version="7",
    )
    assert not d.promoted
    assert "cannot compare with champion v7" in d.reasons[1] and "tl promote" in d.reasons[1]


def test_min_accuracy_is_a_floor():
    assert not decide(Register(min_accuracy=0.9), 0.89).promoted
    assert decide(Register(min_accuracy=0.9), 0.9).promoted


def test_recorded_p_values_are_for_the_observed_direction():
    """What `tl models` shows: a clear gain gets a tiny p-value, not the p-value of the opposite claim."""
    new = _results(540, set(range(5)))
    gain = paired(new, _results(540, set(range(60))))
    d = decide(Register(), gain.a_acc, champion=gain, champion_version="2", baseline=gain, baseline_name="scratch")
    assert d.p_baseline == gain.p_a_better < 1e-6 and d.p_champion == gain.p_a_better
    assert d.delta_baseline == pytest.approx(55 / 540) and "significantly better" in d.reasons[1]


def test_p_values_are_worded_as_what_they_are():
    """A p-value is the chance of a difference at least this large if there were none, not the chance that the
    difference is real: "p=7e-32 that it is real" misreads it (issue 25)."""
    new = _results(540, set(range(5)))
    gain = paired(new, _results(540, set(range(60))))
    loss = paired(_results(540, set(range(60))), new)
    reasons = [
        *decide(
            Register(), gain.a_acc, champion=gain, champion_version="2", baseline=gain, baseline_name="scratch"
        ).reasons[1:],
        *decide(
            Register(), loss.a_acc, champion=loss, champion_version="2", baseline=loss, baseline_name="scratch"
        ).reasons[1:],
        decide(Register(min_improvement=0.01), gain.a_acc, champion=gain).reasons[1],
    ]
    assert len(reasons) == 5
    for r in reasons:
        assert "that it is real" not in r and " is better;" not in r, r
        assert "p=" in r and "the chance of a difference at least this large in " in r, r
        assert "if the two were equally accurate" in r, r
    assert "in the new model's favour" in reasons[0] and "in scratch's favour" in reasons[3]


def test_the_registration_candidate_is_the_better_model_on_validation_images():
    """A run trains the transfer model and scratch; it registers the more accurate on the validation images held out
    of the training split (ties: the transfer model), and says why. Test accuracies are never read (issue 25: a
    scratch model at 100 % lost to a 95 % transfer model that McNemar could not tell apart on the test split)."""
    from tasks.modeling.candidate import choose

    ft = {"strategy": "gradual_unfreeze", "val_images": 40, "val_accuracy": 0.95}
    base = {"scratch_accuracy": 0.10, "scratch_val_accuracy": 1.0}  # a test score that would mislead: not read
    c = choose(ft, base)
    assert (c.stage, c.strategy, c.is_scratch_baseline) == ("baselines", "scratch", True)
    assert c.why == "scratch (val 100.0 % vs gradual_unfreeze 95.0 % on 40 validation images)"
    c = choose({**ft, "val_accuracy": 1.0}, base)  # a tie: the transfer model
    assert (c.stage, c.strategy) == ("finetune", "gradual_unfreeze") and "a tie goes to the transfer model" in c.why
    c = choose({**ft, "val_images": 0, "val_accuracy": None}, {**base, "scratch_val_accuracy": None})
    assert c.stage == "finetune" and "no validation images" in c.why  # the demo's 2 labels per class: none spared
    c = choose(ft, {"scratch_accuracy": None, "scratch_val_accuracy": None})
    assert c.stage == "finetune" and "no target labels" in c.why
    assert choose({**ft, "strategy": "scratch"}, base).stage == "finetune"  # finetune's model is scratch already


def test_a_failed_adaptation_check_keeps_the_model_challenger():
    """With no target labels nothing else in the gate can tell a failed adaptation (confident, diverse, wrong) from a
    good one: the agreement check's "probably failed" keeps the model out of the champion's place, and says why."""
    from tasks.modeling.gate import decide
    from tasks.project.config import Register

    rules = Register(min_accuracy=0.0, require_positive_transfer=False)
    failed = {"failed": True, "why": "semi and a dann witness predict the same class on 16 % of 400 images"}
    d = decide(rules, 0.3, None, adaptation=failed)
    assert not d.promoted and any(
        r.startswith("FAIL: adaptation check (no target labels): semi and") for r in d.reasons
    )
    ok = decide(rules, 0.9, None, adaptation={"failed": False, "why": "they agree on 89 %"})
    assert ok.promoted and "pass: adaptation check (no target labels): they agree on 89 %" in ok.reasons
    assert decide(rules, 0.9, None).promoted  # labels, or no check: the gate as before
