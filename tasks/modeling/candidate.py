"""Which model a run registers: the transfer strategy's (``finetune``) or the ``scratch`` baseline's, whichever is
more accurate on the validation images.

A transfer method can lose to training from scratch: an unrelated source with enough target labels (a user's
3-class photo folder from a digit source: scratch 100 %, ``gradual_unfreeze`` 95 %). The run trains both, so it
registers the better one, judged on the labeled validation images held out of the target's *training* split
(``data.val_per_class``; ``auto`` holds some out when every target label is used,
:func:`tasks.modeling.plan.val_per_class`). Never on the test split: the gate and the report measure the chosen
model there, and a choice made on it would inflate what they report.

- a tie goes to the transfer model, the method the run was asked for;
- no validation images (a label budget such as the demo's 2 per class, or too few labels to spare), or no
  scratch model (no target labels to train it on): the transfer model, and the reason says so;
- ``finetune.strategy: scratch``: the finetune stage's model is itself scratch.

No I/O here but :func:`model_path`: the stages hand the two summaries in (``finetune.json``, ``baselines.json``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tasks.project.config import Params

SCRATCH_MODEL = ("baselines", "scratch.pt")  # under base.models_dir: the baselines stage's scratch model
TRANSFER_MODEL = ("finetuned.pt",)


@dataclass(frozen=True)
class Candidate:
    stage: str  # the stage whose model is registered: "finetune" or "baselines"
    strategy: str  # what trained it ("scratch" for the baselines stage's model)
    why: str  # for people: "scratch (val 100.0 % vs gradual_unfreeze 95.0 % on 40 validation images)"

    @property
    def is_scratch_baseline(self) -> bool:
        return self.stage == "baselines"


def model_path(params: Params, cand: Candidate) -> Path:
    """The model file of ``cand`` (``<models_dir>/finetuned.pt`` or ``<models_dir>/baselines/scratch.pt``)."""
    return params.path("models", *(SCRATCH_MODEL if cand.is_scratch_baseline else TRANSFER_MODEL))


def _pct(x: float) -> str:
    return f"{x * 100:.1f} %"


def choose(ft: dict, base: dict) -> Candidate:
    """The registration candidate from the finetune stage's summary (``strategy``, ``val_accuracy``,
    ``val_images``) and the baselines stage's (``scratch_accuracy``, ``scratch_val_accuracy``)."""
    strategy = ft["strategy"]
    n = ft.get("val_images") or 0
    t, s = ft.get("val_accuracy"), base.get("scratch_val_accuracy")
    if strategy == "scratch":
        return Candidate("finetune", strategy, "scratch (finetune.strategy is scratch: no transfer model to compare)")
    if base.get("scratch_accuracy") is None:
        return Candidate("finetune", strategy, f"{strategy} (no scratch model to compare: no target labels)")
    if not n or t is None or s is None:
        return Candidate(
            "finetune",
            strategy,
            f"{strategy} (no validation images to compare it with scratch on: data.val_per_class is 0 here)",
        )
    if s > t:
        return Candidate(
            "baselines", "scratch", f"scratch (val {_pct(s)} vs {strategy} {_pct(t)} on {n} validation images)"
        )
    return Candidate(
        "finetune",
        strategy,
        f"{strategy} (val {_pct(t)} vs scratch {_pct(s)} on {n} validation images"
        + ("; a tie goes to the transfer model)" if s == t else ")"),
    )
