"""``-S key=value`` overrides: parsed as YAML 1.2, as ``dvc exp run -S`` parses them, and applied to a params
mapping (a dict, or a ruamel document whose comments are kept).

Errors are :class:`OverrideError`; :func:`tasks.project.config.load_params` and the other callers report
them as :class:`tasks.project.config.ParamsError`.
"""

from __future__ import annotations

import copy
import re
from typing import Any

LEADING_ZERO = re.compile(r"[-+]?0[0-9_]+")


class OverrideError(ValueError):
    """An ``-S`` item that cannot be applied; the message says which and how to fix it."""


def leading_zero_message(text: str, where: str) -> str:
    """Why the integer ``text`` (matching :data:`LEADING_ZERO`) is refused, and what to write instead."""
    n = int(text.replace("_", ""))
    return (
        f"{where}: {text} is a number with a leading zero, which is ambiguous: YAML 1.1 reads it as octal "
        f"(010 = 8), YAML 1.2 (DVC, this project) as decimal {n}. Write {n} (or quote it, '{text}', if you "
        f"mean text)."
    )


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"finetune.lr=0.01"`` -> (["finetune", "lr"], 0.01); the value is parsed as YAML 1.2 (ruamel), as
    ``dvc exp run -S`` does: ``1e-3`` is a number (PyYAML's YAML 1.1 would keep it a string). A leading-zero
    integer (``010``) is refused: the two YAML versions read it differently."""
    from ruamel.yaml import YAML
    from ruamel.yaml.error import YAMLError

    if "=" not in item:
        raise OverrideError(f"override {item!r} is not KEY=VALUE (e.g. -S finetune.strategy=dann).")
    key, raw = item.split("=", 1)
    if LEADING_ZERO.fullmatch(raw.strip()):
        raise OverrideError(leading_zero_message(raw.strip(), f"override {item!r}"))
    try:
        return key.strip().split("."), YAML(typ="safe").load(raw) if raw.strip() else None
    except YAMLError as e:
        raise OverrideError(f"override {item!r}: the value is not valid YAML ({e}).") from None


def set_overrides(doc, overrides: list[str]):
    """Apply ``-S key=value`` items to a nested mapping in place (a dict or a ruamel document)."""
    for item in overrides:
        keys, val = parse_override(item)
        node = doc
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not hasattr(node, "setdefault"):
                raise OverrideError(f"override {item!r}: {k} is not a section.")
        node[keys[-1]] = val
    return doc


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """A copy of ``raw`` with the ``-S key=value`` items applied."""
    return set_overrides(copy.deepcopy(raw), overrides)
