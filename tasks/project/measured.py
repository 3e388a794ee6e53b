"""What ``auto`` means where a benchmark decided it.

``tests/test_validators.py`` holds the validators to ``docs/selection_benchmark.json``: a re-run of
``python -m bench.selection`` that finds another best fails until these lines follow it.
"""

from __future__ import annotations

from typing import Literal

# data.labels_per_class: auto for an embedded target: the label-scarce demo the benchmarks measure
DEMO_LABELS_PER_CLASS = 2

VALIDATORS = ("entropy", "im", "snd", "bnm")  # label-free objectives of `tl tune` (tlcore.validators, no source data)
# What `auto` means for tune.validator and `tl rank --validator`, per use, each the validator of VALIDATORS with the
# lowest mean regret for that use in the selection benchmark (`python -m bench.selection`, docs/benchmarks.md).
AUTO_VALIDATOR = "entropy"  # a search over methods and learning rates (`tl tune`; `tl rank` borrows it)
AUTO_STRATEGY_VALIDATOR = "bnm"  # choosing among tune.strategies at finetune.lr (finetune.strategy auto, 0 labels)


def resolve_validator(name: str, use: Literal["search", "strategy"] = "search") -> str:
    """``auto`` -> the benchmark's best for ``use`` (:data:`AUTO_VALIDATOR`, :data:`AUTO_STRATEGY_VALIDATOR`);
    any other name as given."""
    if name != "auto":
        return name
    return AUTO_STRATEGY_VALIDATOR if use == "strategy" else AUTO_VALIDATOR
