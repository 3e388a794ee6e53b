"""The promotion gate: a pure decision from per-image results on one test set, with a paired test.

One accuracy on a few hundred images is noisy (+-1.5 points at 95 % on 540 images), so the gate
compares models on the *same* images and decides with an exact McNemar test on the images where
they disagree (a one-sided binomial test on the discordant pairs; McNemar 1947, the exact form as
recommended for classifier comparison by Dietterich 1998):

* ``min_accuracy``: the new model's accuracy is at least this (a floor, not a comparison).
* champion, ``min_improvement = 0`` (non-inferiority): the new model replaces the champion unless the
  champion is *significantly* better (p < ``significance``). A tie or noise-level difference promotes
  the newer model (trained on the newer data and code).
* champion, ``min_improvement > 0`` (superiority): it must be better by at least that much *and*
  significantly better.
* negative transfer (``require_positive_transfer``): rejected only when the baseline (scratch, or
  source-only with no target labels) is significantly better. A tie passes, and says so.

A champion that cannot be compared like with like (other classes, or trained on images of this test
set) is never replaced by the gate; the reason says why and how to decide by hand. One that cannot be
loaded at all is no gate decision: the register stage stops with an error. The champion is re-measured as
it was trained (its checkpoint's input size and normalisation), on the same test images as the new model.
No I/O here: :mod:`tasks.stages.register` gathers the inputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from tasks.project.config import Register


@dataclass(frozen=True)
class Paired:
    """Two models' results on the same test images (``a`` is the new model)."""

    n: int
    a_acc: float
    b_acc: float
    a_only: int  # images a gets right and b gets wrong
    b_only: int
    p_a_better: float  # one-sided exact McNemar p-values
    p_b_better: float

    @property
    def delta(self) -> float:
        return self.a_acc - self.b_acc


def paired(a_correct: Sequence[bool], b_correct: Sequence[bool]) -> Paired:
    """Exact one-sided McNemar tests of ``a`` vs ``b`` from per-image correctness (same images, same order)."""
    from scipy.stats import binomtest

    if len(a_correct) != len(b_correct) or not len(a_correct):
        raise ValueError(
            f"paired comparison needs two equally long, non-empty result lists "
            f"(got {len(a_correct)} and {len(b_correct)})"
        )
    a = [bool(x) for x in a_correct]
    b = [bool(x) for x in b_correct]
    a_only = sum(x and not y for x, y in zip(a, b))
    b_only = sum(y and not x for x, y in zip(a, b))
    disc = a_only + b_only
    p_a = binomtest(a_only, disc, 0.5, alternative="greater").pvalue if disc else 1.0
    p_b = binomtest(b_only, disc, 0.5, alternative="greater").pvalue if disc else 1.0
    return Paired(len(a), sum(a) / len(a), sum(b) / len(b), a_only, b_only, float(p_a), float(p_b))


@dataclass(frozen=True)
class Decision:
    promoted: bool
    reasons: list[str]
    # the p-value each reason quotes: one-sided, in the observed direction (the chance of a difference at least
    # this large that way round if the two models were equally accurate; not the chance that it is real)
    p_champion: float | None = None
    p_baseline: float | None = None
    delta_champion: float | None = None  # new model's accuracy minus the champion's, on the same images
    delta_baseline: float | None = None


def _pt(x: float) -> str:
    return f"{x * 100:.1f} %"


def _p(p: float, favour: str) -> str:
    """A one-sided McNemar p-value in words: how likely a difference this large is when there is none, which is
    not the probability that the difference is real."""
    return (
        f"p={p:.3g}: the chance of a difference at least this large in {favour}'s favour if the two were "
        f"equally accurate"
    )


def _vs(c: Paired, who: str) -> str:
    return (
        f"{_pt(c.a_acc)} vs {who} {_pt(c.b_acc)} on the same {c.n} images; they disagree on "
        f"{c.a_only + c.b_only} ({c.a_only} only the new model gets right, {c.b_only} only {who})"
    )


def decide(
    rules: Register,
    accuracy: float,
    champion: Paired | str | None = None,
    champion_version: str | None = None,
    baseline: Paired | str | None = None,
    baseline_name: str | None = None,
    adaptation: dict | None = None,
) -> Decision:
    """The gate. ``champion``: the paired comparison with the current champion, None when there is none,
    or a string saying why it cannot be compared (then the champion stays). ``baseline``: the paired comparison
    with the baseline, None when none applies, or a string saying why the guard does not apply (it passes).
    ``adaptation``: the 0-label adaptation check (:func:`tasks.modeling.strategy_choice.adaptation_check`) of a
    model trained with no target labels; one that says "probably failed" stays challenger, whatever else holds:
    with no labels nothing else here can tell a failed adaptation from a good one (the test split measures it,
    but a model chosen with no labels should not become champion on that alone)."""
    alpha, reasons, ok = rules.significance, [], True
    good = accuracy >= rules.min_accuracy
    ok &= good
    reasons.append(
        f"{'pass' if good else 'FAIL'}: accuracy {_pt(accuracy)} {'>=' if good else '<'} "
        f"min_accuracy {_pt(rules.min_accuracy)}"
    )
    if adaptation is not None:
        ok &= not adaptation["failed"]
        reasons.append(
            f"{'FAIL' if adaptation['failed'] else 'pass'}: adaptation check (no target labels): {adaptation['why']}"
        )
    p_champ = None
    cv = f"champion v{champion_version}" if champion_version else "champion"
    if champion is None:
        reasons.append("pass: no current champion")
    elif isinstance(champion, str):
        ok = False
        reasons.append(
            f"FAIL: cannot compare with {cv} like with like: {champion}. The champion stays; if the new "
            f"model should replace it anyway, `tl promote` it by hand with a reason"
        )
    elif rules.min_improvement > 0:
        p_champ = champion.p_a_better
        good = champion.delta >= rules.min_improvement and p_champ < alpha
        ok &= good
        reasons.append(
            f"{'pass' if good else 'FAIL'}: {_vs(champion, cv)}; needs +{rules.min_improvement * 100:.1f} "
            f"points and significance: {champion.delta * 100:+.1f} points, {_p(p_champ, 'the new model')} "
            f"({'<' if p_champ < alpha else '>='} {alpha})"
        )
    else:
        worse = champion.p_b_better < alpha and champion.delta < rules.min_improvement
        p_champ = champion.p_b_better if champion.delta <= 0 else champion.p_a_better
        ok &= not worse
        verdict = (
            "the champion is significantly better"
            if worse
            else "no significant difference"
            if champion.delta <= 0 or p_champ >= alpha
            else "the new model is significantly better"
        )
        who = "the champion" if champion.delta <= 0 else "the new model"
        reasons.append(
            f"{'FAIL' if worse else 'pass'}: {_vs(champion, cv)}: {verdict} "
            f"({champion.delta * 100:+.1f} points, {_p(p_champ, who)}; significance {alpha})"
        )
    p_base = None
    if rules.require_positive_transfer:
        if baseline is None:
            reasons.append(
                "pass: no baseline applies (no target labels for scratch, and different label sets for source_only)"
            )
        elif isinstance(baseline, str):
            reasons.append(f"pass: {baseline}")
        else:
            p_base = baseline.p_b_better if baseline.delta <= 0 else baseline.p_a_better
            negative = baseline.p_b_better < alpha and baseline.delta < 0
            ok &= not negative
            if negative:
                why = (
                    f"negative transfer: {baseline_name} is significantly better ({baseline.delta * 100:+.1f} "
                    f"points, {_p(p_base, baseline_name)}, < {alpha}); the source model hurts here: try another "
                    f"strategy or source, or train from scratch"
                )
            elif baseline.delta > 0:
                why = f"transfer gain {baseline.delta * 100:+.1f} points ({_p(baseline.p_a_better, 'the new model')})"
            elif baseline.delta == 0:
                why = "the transferred model ties the baseline: no negative transfer"
            else:
                why = (
                    f"{baseline_name} is {-baseline.delta * 100:.1f} points better but not significantly "
                    f"({_p(p_base, baseline_name)}, >= {alpha})"
                )
            reasons.append(
                f"{'FAIL' if negative else 'pass'}: vs {baseline_name}: {_vs(baseline, baseline_name)}: {why}"
            )
    return Decision(
        ok,
        reasons,
        p_champ,
        p_base,
        champion.delta if isinstance(champion, Paired) else None,
        baseline.delta if rules.require_positive_transfer and isinstance(baseline, Paired) else None,
    )
