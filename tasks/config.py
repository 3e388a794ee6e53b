"""``params.yaml`` parsed once into validated pydantic models.

One section per stage plus a shared ``base`` (the DVC ``example-get-started`` layout). Bad
values fail before any work starts with one message naming the key, the value and what is
allowed (:class:`ParamsError`). Overrides use DVC's ``-S key=value`` syntax.
"""
from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

EMBEDDED = ("synth_digits", "optdigits")
DEFAULT_PARAMS = Path("params.yaml")


class ParamsError(ValueError):
    """params.yaml (or an override) is invalid; the message says which key and how to fix it."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class Base(_Section):
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    data_dir: str = "data"
    models_dir: str = "models"
    reports_dir: str = "reports"
    num_threads: int | None = Field(None, ge=1, description="torch CPU threads; null = torch's default")


class Data(_Section):
    source: str = "synth_digits"
    target: str = "optdigits"
    labels_per_class: int | None = Field(2, ge=0, description="target label budget; null = all labels")
    val_per_class: int = Field(0, ge=0, description="held out from the target training split for model choice")
    skip_corrupt: bool = False
    synth_per_class: int = Field(500, ge=1)
    synth_test_per_class: int = Field(100, ge=1)
    target_test_fraction: float = Field(0.3, gt=0, lt=1)

    @field_validator("source", "target")
    @classmethod
    def _name_or_path(cls, v: str) -> str:
        if v in EMBEDDED:
            return v
        p = Path(v).expanduser()
        if not p.is_dir():
            raise ValueError(f"{v!r} is neither an embedded dataset ({', '.join(EMBEDDED)}) nor an existing directory "
                             f"(an ImageFolder root with train/ and test/)")
        return v


class Optim(_Section):
    epochs: int = Field(ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(3e-3, gt=0)
    optimizer: Literal["adamw", "sgd"] = "adamw"
    weight_decay: float = Field(5e-4, ge=0)
    scheduler: Literal["cosine", "constant"] = "cosine"
    steps_per_epoch: int | None = Field(None, ge=1)
    grad_clip: float | None = Field(5.0, gt=0)
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    precision: Literal["auto", "bf16", "fp32"] = Field(
        "auto", description="auto: bf16 autocast where it is faster (a GPU with compute capability >= 8.0, "
                            "or a CPU where a one-off measurement of the model says so), else fp32")


class Pretrain(Optim):
    backbone: str = "smallcnn"
    weights: str | None = Field(None, description="torchvision weights name or file: skip source pretraining")
    epochs: int = Field(6, ge=1)
    batch_size: int = Field(128, ge=1)

    @field_validator("backbone")
    @classmethod
    def _known_backbone(cls, v: str) -> str:
        from tlcore.models import list_models

        if v not in list_models():
            raise ValueError(f"unknown backbone {v!r}; allowed: {', '.join(list_models())}")
        return v


class Finetune(Optim):
    strategy: str = "semi"
    strategy_params: dict[str, Any] = Field(default_factory=dict)
    epochs: int = Field(10, ge=1)
    steps_per_epoch: int | None = Field(25, ge=1)

    @field_validator("strategy")
    @classmethod
    def _known_strategy(cls, v: str) -> str:
        from tlcore.strategies import list_strategies

        if v not in list_strategies():
            raise ValueError(f"unknown strategy {v!r}; allowed: {', '.join(list_strategies())}")
        return v


class Evaluate(_Section):
    batch_size: int = Field(256, ge=1)
    latency_iters: int = Field(50, ge=1)
    ece_bins: int = Field(15, ge=2)


class Compress(_Section):
    methods: list[Literal["prune", "prune_structured", "int8", "distill"]] = ["prune", "int8", "distill"]
    prune_amount: float = Field(0.5, gt=0, lt=1)
    prune_finetune_epochs: int = Field(4, ge=0, description="recovery epochs after pruning (distilling from the "
                                                            "unpruned model, masks held); 0: prune only")
    student: str = "tinycnn"
    distill_epochs: int = Field(8, ge=1)
    distill_temperature: float = Field(4.0, gt=0)
    distill_alpha: float = Field(0.9, ge=0, le=1)


class Register(_Section):
    model_name: str = Field("digits-transfer", min_length=1)
    min_accuracy: float = Field(0.5, ge=0, le=1)
    min_improvement: float = Field(0.0, ge=0)
    require_positive_transfer: bool = True
    experiment: str = "transfer-pipeline"


class Ray(_Section):
    address: str | None = None
    num_workers: int = Field(0, ge=0, description="0: Ray Train local mode (in-process, no cluster start-up); "
                                                  "N: N data-parallel workers")
    use_gpu: bool = False
    cpus_per_worker: float | Literal["auto"] = Field(
        "auto", description="auto: the CPUs of a node divided by the workers on it; torch threads per worker follow it")

    @field_validator("cpus_per_worker")
    @classmethod
    def _positive(cls, v):
        if v != "auto" and not v > 0:
            raise ValueError("must be 'auto' or a number > 0")
        return v
    gpus_per_worker: float = Field(0, ge=0)
    max_failures: int = Field(1, ge=0)
    storage_path: str = "ray_results"


# `register` is also the name of ABCMeta.register on the metaclass; instances are unaffected
warnings.filterwarnings("ignore", message='Field name "register"', category=UserWarning)


class Params(_Section):
    base: Base = Base()
    data: Data = Data()
    pretrain: Pretrain = Pretrain()
    finetune: Finetune = Finetune()
    evaluate: Evaluate = Evaluate()
    compress: Compress = Compress()
    register: Register = Register()
    ray: Ray = Ray()

    def path(self, kind: Literal["data", "models", "reports"], *parts: str) -> Path:
        return Path(getattr(self.base, f"{kind}_dir"), *parts)


def _fmt_error(err: ValidationError, origin: str) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        val = e.get("input")
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            section = e["loc"][0] if len(e["loc"]) > 1 else None
            allowed = Params.model_fields if section is None else Params.model_fields[section].annotation.model_fields
            msg = f"unknown key; allowed keys here: {', '.join(allowed)}"
        lines.append(f"  {key} = {val!r}: {msg}")
    return f"invalid parameters in {origin}:\n" + "\n".join(lines) + "\nFix these keys and run again."


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"finetune.lr=0.01"`` -> (["finetune", "lr"], 0.01); the value is parsed as YAML 1.2 (ruamel), as
    ``dvc exp run -S`` does: ``1e-3`` is a number (PyYAML's YAML 1.1 would keep it a string)."""
    from ruamel.yaml import YAML
    from ruamel.yaml.error import YAMLError

    if "=" not in item:
        raise ParamsError(f"override {item!r} is not KEY=VALUE (e.g. -S finetune.strategy=dann).")
    key, raw = item.split("=", 1)
    try:
        return key.strip().split("."), YAML(typ="safe").load(raw) if raw.strip() else None
    except YAMLError as e:
        raise ParamsError(f"override {item!r}: the value is not valid YAML ({e}).") from None


def set_overrides(doc, overrides: list[str]):
    """Apply ``-S key=value`` items to a nested mapping in place (a dict or a ruamel document)."""
    for item in overrides:
        keys, val = parse_override(item)
        node = doc
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not hasattr(node, "setdefault"):
                raise ParamsError(f"override {item!r}: {k} is not a section.")
        node[keys[-1]] = val
    return doc


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    return set_overrides(copy.deepcopy(raw), overrides)


def validate(raw: dict, origin: str = "params.yaml") -> Params:
    try:
        return Params.model_validate(raw or {})
    except ValidationError as e:
        raise ParamsError(_fmt_error(e, origin)) from None


def load_raw(path: str | Path = DEFAULT_PARAMS) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path} not found; run from the project root or pass --params PATH.")
    from ruamel.yaml import YAML
    from ruamel.yaml.error import YAMLError

    with path.open() as f:  # YAML 1.2, as DVC reads it and as `-S` writes it (1e-5 is a number)
        try:
            return YAML(typ="safe").load(f) or {}
        except YAMLError as e:
            raise ParamsError(f"{path} is not valid YAML: {e}") from None


def load_params(path: str | Path = DEFAULT_PARAMS, overrides: list[str] | None = None) -> Params:
    """Read, override and validate ``params.yaml``; raises :class:`ParamsError`."""
    raw = apply_overrides(load_raw(path), overrides or [])
    params = validate(raw, str(path) + (" with overrides " + " ".join(overrides) if overrides else ""))
    _check_budget(params)
    return params


def _check_budget(p: Params) -> None:
    from tlcore.strategies import strategy_class

    k, v = p.data.labels_per_class, p.data.val_per_class
    uses = strategy_class(p.finetune.strategy).uses
    if k == 0 and "target" in uses and not uses >= {"source", "unlabeled"}:
        raise ParamsError(
            f"finetune.strategy = {p.finetune.strategy!r} trains on labeled target images, but "
            f"data.labels_per_class = 0. Use a strategy that adapts without target labels (mcc, semi, dann), "
            f"or set data.labels_per_class >= 1 (null for all labels)."
        )
    if p.data.target == "optdigits" and k is not None:
        # the smallest class of the bundled digits has 174 images, 70 % of them in train
        smallest = int(174 * (1 - p.data.target_test_fraction))
        if k + v > smallest:
            raise ParamsError(
                f"data.labels_per_class = {k} (+ data.val_per_class = {v}) is larger than the smallest optdigits "
                f"class in the training split ({smallest} images). Use at most {smallest - v}, or null for all labels."
            )
