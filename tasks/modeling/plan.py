"""What a run will do with the data it is given: the label sets, the target label budget and the strategy.

``data.labels_per_class: auto`` and ``finetune.strategy: auto`` are resolved here, and a strategy the data
cannot support is refused here, before any training: by ``tl check`` and ``tl run`` and by the
``finetune`` stage itself (from the data stage's manifest when it describes this source and target,
else from the class folders of ``train/``, or the embedded datasets' digits 0-9).

How ``auto`` picks (no new measurement was made for it; the numbers are those of the transfer table
in ``docs/benchmarks.md``, synth_digits -> optdigits, accuracy on the fixed optdigits test split, 3 seeds):

- source and target share one label set: ``semi``. It is best or within one standard deviation of
  the best at every budget from 0 to 10 labels per class, the pipeline's default since that
  benchmark, so the embedded demo runs exactly as before.
- different label sets: ``gradual_unfreeze``. Only methods that replace the source classifier can
  run (``semi``, ``mcc`` and ``dann`` adapt it and need the source's classes). No benchmark measures
  different label sets, so this is a judgement from the same-label-set table: among the plain
  methods, ``gradual_unfreeze`` is the most accurate at 5, 10 and all labels per class (all labels
  is what ``labels_per_class: auto`` gives a user's own folder) and within about one standard
  deviation of ``joint`` and ``finetune`` at 1-3 labels; it trains only the new head for its first
  epoch, so the random head's first gradients do not disturb the pretrained backbone, which a new
  head for new classes needs (``joint``'s row was measured with a shared head, which it cannot have
  here, at twice the time). The choice used that table's test-split numbers as published and
  nothing else; it was not tuned on any test split beyond them.
- different label sets and no target labels: nothing can learn the target's classes, an error.
- the same label set and no target labels: ``semi`` here, but the finetune stage replaces the rule by a
  measurement (:mod:`tasks.modeling.strategy_choice`: the candidates of ``tune.strategies`` scored by a label-free
  validator).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tasks.project.config import EMBEDDED, Params, ParamsError, needs_target_labels
from tasks.project.measured import DEMO_LABELS_PER_CLASS

DIGITS = [str(d) for d in range(10)]  # the classes of both embedded datasets
AUTO_SAME = "semi"
AUTO_DIFFERENT = "gradual_unfreeze"


def labels_per_class(params: Params) -> int | None:
    """``data.labels_per_class`` with ``auto`` resolved: the demo's budget for an embedded target, all of a
    user's own labels (``None``) for an ImageFolder target."""
    k = params.data.labels_per_class
    if k != "auto":
        return k
    return DEMO_LABELS_PER_CLASS if params.data.target in EMBEDDED else None


VAL_FRACTION = 0.2  # of the smallest class's training images, held out by val_per_class auto
VAL_MIN_PER_CLASS = 5  # fewer validation images per class than this tell two models apart by chance: none
VAL_MAX_PER_CLASS = 100  # enough to choose between two models; the rest train


def val_per_class(params: Params, per_class: Sequence[int] | None = None) -> int:
    """``data.val_per_class`` with ``auto`` resolved. ``auto``: when every target label trains (``labels_per_class``
    all), :data:`VAL_FRACTION` of the smallest class's training images (``per_class``: the count of each class,
    e.g. the manifest's ``target.splits.train.per_class``), from :data:`VAL_MIN_PER_CLASS` to
    :data:`VAL_MAX_PER_CLASS`, and none when that class is too small for the minimum; with a label budget (the
    demo's 2 per class, or 0) none, since holding images out would spend labels beyond the budget."""
    v = params.data.val_per_class
    if v != "auto":
        return v
    if labels_per_class(params) is not None:
        return 0
    if per_class is None:
        raise ValueError("data.val_per_class auto with all target labels needs the target's class counts")
    n = min(per_class, default=0)
    v = min(VAL_MAX_PER_CLASS, int(n * VAL_FRACTION))
    return v if v >= VAL_MIN_PER_CLASS else 0


def train_counts(manifest: dict) -> list[int]:
    """Training images per target class, as the data stage recorded them in the manifest."""
    counts = manifest["target"]["splits"]["train"]["per_class"]
    return list(counts.values()) if isinstance(counts, dict) else list(counts)


def budget_text(k: int | None) -> str:
    """For people: ``all``, ``none``, ``2 per class``."""
    return "all" if k is None else "none" if k == 0 else f"{k} per class"


@dataclass
class LabelSets:
    source: list[str]
    target: list[str]
    origin: str  # where they were read, for messages

    @property
    def same(self) -> bool:
        return self.source == self.target


def _folder_classes(name: str, role: str, root: Path) -> list[str]:
    from tlcore.images import show_path  # names as the data stage stores them (odd bytes as \xNN)

    train = os.path.join(root, os.path.expanduser(name), "train")
    try:
        return sorted(show_path(e.name) for e in os.scandir(train) if e.is_dir() and not e.name.startswith("."))
    except OSError:
        raise ParamsError(
            f"data.{role} = {name!r} has no readable train/ folder ({train}); an ImageFolder root needs "
            f"train/<class>/ and test/<class>/ folders of images."
        ) from None


def label_sets(params: Params, manifest: dict | None = None, root: Path = Path(".")) -> LabelSets:
    """Source and target class names: from ``manifest`` (or ``<data_dir>/manifest.json``) when it was written
    for this ``data.source`` and ``data.target``, else from the class folders (embedded datasets: digits).
    Relative paths are taken from ``root``, the project directory."""
    where = root / params.path("data", "manifest.json")
    if manifest is None and where.is_file():
        try:
            manifest = json.loads(where.read_text())
        except (OSError, ValueError):
            manifest = None
    src, tgt = params.data.source, params.data.target
    if manifest and manifest.get("source", {}).get("name") == src and manifest.get("target", {}).get("name") == tgt:
        return LabelSets(manifest["source"]["classes"], manifest["target"]["classes"], str(where))
    classes = {
        role: DIGITS if name in EMBEDDED else _folder_classes(name, role, root)
        for role, name in (("source", src), ("target", tgt))
    }
    return LabelSets(classes["source"], classes["target"], "the class folders of train/")


@dataclass
class Choice:
    strategy: str  # the strategy that runs (with ``measured``: the fallback, should no candidate fit)
    requested: str  # finetune.strategy as written (a name or auto)
    why: str
    measured: bool = False  # decided by the finetune stage's measurement, not here

    def describe(self) -> str:
        if self.measured:
            return f"measured (auto: {self.why})"
        return self.strategy + (f" (auto: {self.why})" if self.requested == "auto" else "")


def _shown(names: list[str]) -> str:
    return ", ".join(names[:6]) + (f", ... ({len(names)} classes)" if len(names) > 6 else "")


def _differ(params: Params, sets: LabelSets) -> str:
    return (
        f"source {params.data.source!r} has classes {_shown(sets.source)} and target {params.data.target!r} has "
        f"{_shown(sets.target)} (read from {sets.origin})"
    )


def choose_strategy(params: Params, sets: LabelSets) -> Choice:
    """The strategy to run; raises :class:`ParamsError` (what, where, how to fix) when the data cannot support it."""
    from tlcore.strategies import list_strategies, strategy_class

    req, k = params.finetune.strategy, labels_per_class(params)
    if not sets.same and k == 0:
        raise ParamsError(
            f"finetune.strategy = {req!r} with data.labels_per_class = 0 cannot work with this data: "
            f"{_differ(params, sets)}. "
            f"With different label sets the target needs a new classifier head, and with no labeled target image "
            f"nothing can train it (unsupervised adaptation, semi/mcc/dann, only carries the source's own classes "
            f"over). "
            f"Give target labels (data.labels_per_class >= 1, or auto/null for all of them), or use a source whose "
            f"class folders are the target's."
        )
    if req == "auto":
        same = sets.same
        if same and k == 0:
            return Choice(
                AUTO_SAME,
                req,
                "no target labels: the finetune stage measures tune.strategies by a "
                "label-free validator and trains the best (tasks/modeling/strategy_choice.py); "
                f"{AUTO_SAME} if none of them fits",
                measured=True,
            )
        return Choice(
            AUTO_SAME if same else AUTO_DIFFERENT,
            req,
            "source and target share one label set" if same else "source and target have different label sets",
        )
    if not sets.same and strategy_class(req).shared_label_set:
        plain = [s for s in list_strategies() if not strategy_class(s).shared_label_set]
        raise ParamsError(
            f"finetune.strategy = {req!r} cannot work with this data: it adapts the source classifier to the target, "
            f"so source and target must share one label set, but {_differ(params, sets)}. Set finetune.strategy to "
            f"auto (it picks {AUTO_DIFFERENT} here) or one of {', '.join(plain)}, or give source and target the same "
            f"class folders."
        )
    if k == 0 and needs_target_labels(req):  # load_params refuses this too; the stage re-checks
        raise ParamsError(
            f"finetune.strategy = {req!r} trains on labeled target images, but data.labels_per_class = 0. Use a "
            f"strategy that adapts without target labels (mcc, semi, dann) or auto, or set data.labels_per_class >= 1."
        )
    return Choice(req, req, "set in finetune.strategy")


def plan(params: Params, manifest: dict | None = None, root: Path = Path(".")) -> tuple[Choice, LabelSets]:
    """Resolve and check the strategy for ``params`` and the data; raises :class:`ParamsError` before any work."""
    sets = label_sets(params, manifest, root)
    return choose_strategy(params, sets), sets
