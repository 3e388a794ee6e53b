"""``params.yaml`` parsed once into validated pydantic models.

One section per stage plus a shared ``base`` (the DVC ``example-get-started`` layout). Bad
values fail before any work starts with one message naming the key, the value and what is
allowed (:class:`ParamsError`). :func:`load_params` reads the file, applies ``-S key=value`` overrides
(:mod:`tasks.project.overrides`) and checks what the models alone cannot: the output directories against
the file system, the label budget against the target's smallest class.
"""

from __future__ import annotations

import math
import re
import types
import typing
import warnings
from pathlib import Path, PurePath
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from tasks.project.measured import AUTO_STRATEGY_VALIDATOR, AUTO_VALIDATOR, DEMO_LABELS_PER_CLASS, VALIDATORS
from tasks.project.overrides import LEADING_ZERO, OverrideError, apply_overrides, leading_zero_message
from tlcore.embedded import EMBEDDED

DEFAULT_PARAMS = Path("params.yaml")


class ParamsError(ValueError):
    """params.yaml (or an override) is invalid; the message says which key and how to fix it."""


def _leaves(ann) -> tuple[set, set]:
    """(plain types, Literal options) a field annotation admits, through Optional/Union/Annotated."""
    if typing.get_origin(ann) is Literal:
        return set(), set(typing.get_args(ann))
    if typing.get_origin(ann) in (typing.Union, types.UnionType, typing.Annotated):
        kinds, lits = set(), set()
        for a in typing.get_args(ann)[:1] if typing.get_origin(ann) is typing.Annotated else typing.get_args(ann):
            k, lit = _leaves(a)
            kinds |= k
            lits |= lit
        return kinds, lits
    return {ann}, set()


_NON_FINITE_TEXT = re.compile(r"[-+]?\.?(nan|inf|infinity)", re.IGNORECASE)


def _non_finite(v) -> bool:
    return isinstance(v, float) and not math.isfinite(v)


class _Section(BaseModel):
    """Numbers are numbers: a number key refuses true/false, text ('10', '1:30') and .inf/.nan, wherever the
    value comes from (params.yaml, ``-S``, Python), instead of pydantic's lax coercions (True -> 1)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _plain_numbers(cls, v, info: ValidationInfo):
        kinds, lits = _leaves(cls.model_fields[info.field_name].annotation)
        if not kinds & {int, float} or not isinstance(v, bool) and any(v == x for x in lits):
            return v
        want = "an integer" if float not in kinds else "a number"
        example = {"an integer": "10", "a number": "0.001"}[want]
        if isinstance(v, bool) and bool not in kinds:
            raise ValueError(
                f"{str(v).lower()} is a boolean, but this key takes {want}; write {want} such as "
                f"{example} (YAML reads true/false/yes/no-like words as booleans)"
            )
        if _non_finite(v) or isinstance(v, str) and _NON_FINITE_TEXT.fullmatch(v.strip()):
            raise ValueError(
                f"{v} is not a finite number (.inf, -.inf and .nan are refused everywhere); "
                f"write a finite number such as {example}"
            )
        if isinstance(v, str) and str not in kinds:
            hint = (
                " (YAML 1.1 would read it as a base-60 time, YAML 1.2 as text; write the plain number, e.g. 1:30 -> 90)"
                if ":" in v
                else ""
            )
            opts = f" or one of {', '.join(map(repr, sorted(lits)))}" if lits else ""
            raise ValueError(
                f"{v!r} is text, but this key takes {want}{opts}; write an unquoted number such as {example}{hint}"
            )
        return v


_DIRS = ("data_dir", "models_dir", "reports_dir")
_RESERVED = (".git", ".dvc")


class Base(_Section):
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto",
        description="where the stage process computes (evaluation, compression); training runs where "
        "ray.use_gpu says, and the two must agree (see Params)",
    )
    data_dir: str = "data"
    models_dir: str = "models"
    reports_dir: str = "reports"
    num_threads: int | None = Field(None, ge=1, description="torch CPU threads; null = torch's default")

    @field_validator(*_DIRS)
    @classmethod
    def _inside_project(cls, v: str) -> str:
        """The pipeline deletes and rewrites these directories: keep them relative, below the project root."""
        fix = (
            "use a relative path below the project directory (the one holding params.yaml), e.g. `data`; "
            "the pipeline deletes and rewrites this directory, so it must never point at your own files "
            "(give a dataset as data.source/data.target instead)"
        )
        p = PurePath(v)
        if p.is_absolute() or v.startswith("~"):
            raise ValueError(f"is an absolute path; {fix}")
        if ".." in p.parts:
            raise ValueError(f"leaves the project with `..`; {fix}")
        if not p.parts:
            raise ValueError(f"is the project directory itself; {fix}")
        if p.parts[0] in _RESERVED:
            raise ValueError(f"lies inside {p.parts[0]}/, which git/DVC own; {fix}")
        return v

    @model_validator(mode="after")
    def _distinct_dirs(self):
        dirs = [(k, PurePath(getattr(self, k))) for k in _DIRS]
        for i, (k1, p1) in enumerate(dirs):
            for k2, p2 in dirs[i + 1 :]:
                if p1 == p2 or p1 in p2.parents or p2 in p1.parents:
                    rel = "is the same directory as" if p1 == p2 else "contains" if p1 in p2.parents else "lies inside"
                    raise ValueError(
                        f"base.{k1} = {str(p1)!r} {rel} base.{k2} = {str(p2)!r}; give data_dir, "
                        f"models_dir and reports_dir distinct directories, none inside another "
                        f"(e.g. data, models, reports)"
                    )
        return self


class Data(_Section):
    source: str = "synth_digits"
    target: str = "optdigits"
    labels_per_class: Annotated[int, Field(ge=0)] | Literal["auto"] | None = Field(
        "auto",
        description=f"target labels per class; null = all; auto = {DEMO_LABELS_PER_CLASS} for an embedded "
        f"target (the demo), all for your own folder",
    )
    val_per_class: Annotated[int, Field(ge=0)] | Literal["auto"] = Field(
        "auto",
        description="target training images per class held out as labeled validation images (model choice: the "
        "registered model is the better of the transfer model and scratch on them; tl tune's objective); auto = "
        "20 % of the smallest class (5 to 100) when every target label is used and that class has >= 25 training "
        "images, else 0 (a label budget spends no labels beyond it)",
    )
    skip_corrupt: bool = False
    synth_per_class: int = Field(500, ge=1)
    synth_test_per_class: int = Field(100, ge=1)
    target_test_fraction: float = Field(0.3, gt=0, lt=1)
    image_size: Annotated[int, Field(ge=8, le=2048)] | Literal["auto"] = Field(
        "auto",
        description="pixels per side the model sees; auto = the ImageNet weights' own (224) when "
        "pretrain.weights names them, else the backbone's (32 smallcnn, 64 the ResNets)",
    )
    channels: Literal["auto", 1, 3] = Field(
        "auto",
        description="1 (grey) or 3 (RGB) for both domains; auto = the target's: 1 when all its images are grey, else 3",
    )
    augment: Literal["auto", "digits", "digits_colour", "photo", "none"] = Field(
        "auto",
        description="train-time augmentation: digits (affine warp), digits_colour (the warp, then colour and "
        "polarity randomisation), photo (crop, flip, colour jitter), none; auto = digits for an embedded dataset "
        "(digits_colour for a grey source when the target has colour images), photo for your own folder",
    )

    @field_validator("channels", mode="before")
    @classmethod
    def _channel_count(cls, v):
        if isinstance(v, bool):  # Literal[1] would take True: a boolean is not a channel count
            raise ValueError(f"{str(v).lower()} is a boolean; write auto, 1 (grey) or 3 (RGB)")
        return v

    loader_workers: Annotated[int, Field(ge=0)] | Literal["auto"] = Field(
        "auto",
        description="data-loader processes per training stream: auto = 0 on CPU, up to 2 on a GPU (4 for a "
        "streamed split; tasks/modeling/hardware.py says why); a number >= 0 sets it. The batches, and so the "
        "results, do not depend on it",
    )

    hold_in_memory_mib: Annotated[int, Field(ge=0)] = Field(
        256,
        description="a prepared split whose decoded pixels take at most this many MiB is decoded into memory once "
        "(small data trains fastest so); bigger ones are streamed from the shards, memory flat in their size. "
        "0 streams every split. The pixels, and so the results, are the same either way",
    )

    @field_validator("source", "target")
    @classmethod
    def _name_or_path(cls, v: str) -> str:
        if v in EMBEDDED:
            return v
        p = Path(v).expanduser()
        if not p.is_dir():
            raise ValueError(
                f"{v!r} is neither an embedded dataset ({', '.join(EMBEDDED)}) nor an existing directory "
                f"(an ImageFolder root with train/ and test/)"
            )
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
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto",
        description="auto: bf16 autocast where it is faster (a GPU with compute capability >= 8.0, "
        "or a CPU where a one-off measurement of the model says so), fp16 with loss "
        "scaling on compute capability 7.x, else fp32",
    )


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

    @model_validator(mode="after")
    def _weights_fit_backbone(self):
        """A torchvision weights name needs a torchvision backbone (a file may hold any backbone's weights)."""
        w = self.weights
        if not w:
            return self  # no torch import for the common case: validating params must stay quick
        from tlcore.models import TORCHVISION_ARCHS

        if not (Path(w).suffix in {".pt", ".pth"} or Path(w).exists()) and self.backbone not in TORCHVISION_ARCHS:
            raise ValueError(
                f"pretrain.weights = {w!r} names torchvision weights (no such file exists), but "
                f"pretrain.backbone = {self.backbone!r} has none; pick one of "
                f"{', '.join(TORCHVISION_ARCHS)} for ImageNet weights, or give the path of a weights "
                f"file saved from a {self.backbone}"
            )
        return self


class Finetune(Optim):
    strategy: str = Field(
        "auto",
        description="a strategy name, or auto: semi when source and target share one "
        "label set, else gradual_unfreeze (tasks/modeling/plan.py says why); with no "
        "target labels, the best of tune.strategies by tune.validator "
        "(tasks/modeling/strategy_choice.py)",
    )
    strategy_params: dict[str, Any] = Field(default_factory=dict)
    epochs: int = Field(10, ge=1)
    steps_per_epoch: int | None = Field(25, ge=1)

    @field_validator("strategy_params")
    @classmethod
    def _finite(cls, v: dict) -> dict:
        def walk(x, key):
            if _non_finite(x):
                raise ValueError(
                    f"{key} = {x} is not a finite number (.inf, -.inf and .nan are refused "
                    f"everywhere); write a finite number"
                )
            for k, y in x.items() if isinstance(x, dict) else enumerate(x) if isinstance(x, list) else ():
                walk(y, f"{key}.{k}")

        for k, x in v.items():
            walk(x, k)
        return v

    @field_validator("strategy")
    @classmethod
    def _known_strategy(cls, v: str) -> str:
        from tlcore.strategies import list_strategies

        if v != "auto" and v not in list_strategies():
            raise ValueError(f"unknown strategy {v!r}; allowed: auto, {', '.join(list_strategies())}")
        return v


class Evaluate(_Section):
    batch_size: int = Field(256, ge=1)
    latency_iters: int = Field(50, ge=1)
    ece_bins: int = Field(15, ge=2)


class Compress(_Section):
    methods: list[Literal["prune", "prune_structured", "int8", "distill"]] = ["prune", "int8", "distill"]
    prune_amount: float = Field(0.5, gt=0, lt=1)
    prune_finetune_epochs: int = Field(
        4,
        ge=0,
        description="recovery epochs after pruning (distilling from the unpruned model, masks held); 0: prune only",
    )
    student: str = "tinycnn"
    distill_epochs: int = Field(8, ge=1)
    distill_temperature: float = Field(4.0, gt=0)
    distill_alpha: float = Field(0.9, ge=0, le=1)


class Register(_Section):
    model_name: str = Field("digits-transfer", min_length=1)
    min_accuracy: float = Field(0.5, ge=0, le=1)
    min_improvement: float = Field(
        0.0,
        ge=0,
        le=1,
        description="0: replace the champion unless it is significantly "
        "better; > 0: only when better by this much and significantly",
    )
    significance: float = Field(0.05, gt=0, lt=1, description="the gate's paired (McNemar) test level")
    require_positive_transfer: bool = True
    experiment: str = "transfer-pipeline"


class Ray(_Section):
    address: str | None = None
    num_workers: int = Field(
        0, ge=0, description="0: Ray Train local mode (in-process, no cluster start-up); N: N data-parallel workers"
    )
    use_gpu: bool = False
    cpus_per_worker: float | Literal["auto"] = Field(
        "auto", description="auto: the CPUs of a node divided by the workers on it; torch threads per worker follow it"
    )

    gpus_per_worker: float = Field(0, ge=0, description="GPUs per worker: a whole number >= 1 with use_gpu, 0 without")
    max_failures: int = Field(1, ge=0)
    storage_path: str = "ray_results"

    @field_validator("cpus_per_worker")
    @classmethod
    def _positive(cls, v):
        if v != "auto" and not v > 0:
            raise ValueError("must be 'auto' or a number > 0")
        return v

    @model_validator(mode="after")
    def _whole_gpus(self):
        g = self.gpus_per_worker
        if self.use_gpu and (g < 1 or g != int(g)):
            why = "NCCL cannot run two workers on one GPU ('Duplicate GPU detected')" if g else "0 GPUs cannot train"
            raise ValueError(
                f"ray.gpus_per_worker = {g:g} with ray.use_gpu = true: each worker needs a whole number "
                f"of GPUs >= 1 ({why}); set ray.gpus_per_worker: 1 (-S ray.gpus_per_worker=1), or 2, ..."
            )
        if not self.use_gpu and g:
            raise ValueError(
                f"ray.gpus_per_worker = {g:g} but ray.use_gpu = false: the workers would hold GPUs and "
                f"train on the CPU; set ray.use_gpu: true to train on GPUs, or ray.gpus_per_worker: 0"
            )
        return self


class Tune(_Section):
    """``tl tune``: the search space (a grid of strategy x learning rate x strategy params) and ASHA's budget."""

    strategies: list[str] = Field(["semi", "mcc"], min_length=1)
    lr: list[Annotated[float, Field(gt=0)]] = Field([0.001, 0.003], min_length=1)
    strategy_params: dict[str, dict[str, list[Any]]] = Field(
        default_factory=dict,
        description="per strategy, values to try for each of its params, e.g. {mcc: {temperature: [2.0, 3.0]}}",
    )
    epochs: int = Field(4, ge=1, description="epochs per trial (ASHA's max_t); finetune.epochs is left alone")
    validator: Literal[("auto", *VALIDATORS)] = Field(  # type: ignore[valid-type]
        "auto",
        description="the objective when data.val_per_class = 0 (no labeled validation images); auto = the "
        f"validator the selection benchmark found best for the use: {AUTO_VALIDATOR} for tl "
        f"tune's search, {AUTO_STRATEGY_VALIDATOR} for finetune.strategy auto's choice",
    )
    grace_period: int = Field(1, ge=1, description="ASHA: epochs every trial runs before it may be stopped")
    reduction_factor: float = Field(2, gt=1, description="ASHA: keep the best 1/reduction_factor at each rung")
    concurrent_trials: int = Field(1, ge=1, description="trials at once; each gets the cluster's CPUs / this")

    @field_validator("strategies")
    @classmethod
    def _known(cls, v: list[str]) -> list[str]:
        from tlcore.strategies import list_strategies

        bad = [s for s in v if s not in list_strategies()]
        if bad:
            raise ValueError(f"unknown strategy {', '.join(map(repr, bad))}; allowed: {', '.join(list_strategies())}")
        if len(set(v)) != len(v):
            raise ValueError("lists a strategy twice; give each once")
        return v

    @model_validator(mode="after")
    def _params_fit_strategies(self):
        import itertools

        if not self.strategy_params:
            return self  # no torch import for the common case: validating params must stay quick
        from tlcore.strategies import create_strategy

        for name, grid in self.strategy_params.items():
            if name not in self.strategies:
                raise ValueError(
                    f"tune.strategy_params has values for {name!r}, which is not in tune.strategies "
                    f"({', '.join(self.strategies)}); add it there or remove its params"
                )
            for key, values in grid.items():
                if not values:
                    raise ValueError(f"tune.strategy_params.{name}.{key} is an empty list; give at least one value")
            for combo in itertools.product(*grid.values()):
                try:
                    create_strategy(name, **dict(zip(grid, combo)))
                except (TypeError, ValueError) as e:
                    raise ValueError(
                        f"tune.strategy_params.{name} = {dict(zip(grid, combo))} is not accepted by "
                        f"strategy {name!r} ({e}); use the names of its constructor's arguments"
                    ) from None
        return self


# `register` is also the name of ABCMeta.register on the metaclass (instances are unaffected), so pydantic
# warns, while it creates the class, that the field shadows it: silenced for that moment only.
with warnings.catch_warnings():
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
        tune: Tune = Tune()

        @model_validator(mode="after")
        def _one_device_rule(self):
            """``ray.use_gpu`` decides where training runs; ``base.device`` (this process's work) must agree."""
            dev, gpu = self.base.device, self.ray.use_gpu
            if dev == "cuda" and not gpu:
                raise ValueError(
                    "base.device = 'cuda' but ray.use_gpu = false: training runs where ray.use_gpu says, "
                    "so it would run on the CPU. Set ray.use_gpu: true to train on GPUs (-S ray.use_gpu=true), "
                    "or base.device: auto (GPU for evaluation where one is visible) or cpu."
                )
            if dev == "cpu" and gpu:
                raise ValueError(
                    "base.device = 'cpu' but ray.use_gpu = true: the two contradict each other. Set "
                    "base.device: auto to train on GPUs (evaluation uses a GPU where the stage process "
                    "sees one), or ray.use_gpu: false to stay on the CPU."
                )
            return self

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
        if isinstance(val, dict) and e["type"] == "value_error":  # a section-wide rule: the message names the keys
            lines.append(f"  {key}: {msg}" if key else f"  {msg}")
            continue
        lines.append(f"  {key} = {val!r}: {msg}")
    return f"invalid parameters in {origin}:\n" + "\n".join(lines) + "\nFix these keys and run again."


def require_sections(raw, origin: str = "params.yaml") -> None:
    """Every top-level section must be in the file: an empty or truncated params.yaml is an error, not a run
    on defaults. (Keys inside a section may still be left out; ``Params()`` in Python keeps its defaults.)"""
    name = Path(origin.split(" with overrides ")[0]).name or "params.yaml"
    if raw is not None and not isinstance(raw, dict):
        raise ParamsError(
            f"{origin} is not a mapping of sections (it holds a {type(raw).__name__}); restore it "
            f"from git (`git checkout {name}`) or copy it from the project template."
        )
    missing = [k for k in Params.model_fields if (raw or {}).get(k) is None]
    if missing:
        secs = ", ".join(f"`{k}:`" for k in missing)
        what = (
            f"is empty: it has none of the sections {secs}"
            if not raw
            else f"has no {secs} section" + ("s" if len(missing) > 1 else "") + " (missing, or empty)"
        )
        raise ParamsError(
            f"{origin} {what}. Every section must be in the file (keys inside a section may be "
            f"left out to take their defaults); nothing falls back to defaults silently. Restore "
            f"it from git (`git checkout {name}`) or copy the missing section(s) from the project "
            f"template."
        )


def validate(raw: dict, origin: str = "params.yaml") -> Params:
    """Validate a params mapping read from a file: every section must be present (see :func:`require_sections`)."""
    require_sections(raw, origin)
    try:
        return Params.model_validate(raw)
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


_YAML_LEADING_ZERO = re.compile(rf"\s*([\w.-]+)\s*:\s+({LEADING_ZERO.pattern})\s*(#.*)?")


def load_params(path: str | Path = DEFAULT_PARAMS, overrides: list[str] | None = None) -> Params:
    """Read, override and validate ``params.yaml``; raises :class:`ParamsError`.

    The file itself must hold every section (an override cannot stand in for a lost one), and the
    output directories must lie inside the project: the directory holding ``path``."""
    file_raw = load_raw(path)
    require_sections(file_raw, str(path))
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if m := _YAML_LEADING_ZERO.fullmatch(line):
            raise ParamsError(leading_zero_message(m[2], f"{path} line {n} ({m[1]})"))
    origin = str(path) + (" with overrides " + " ".join(overrides) if overrides else "")
    try:
        raw = apply_overrides(file_raw, overrides or [])
    except OverrideError as e:
        raise ParamsError(str(e)) from None
    params = validate(raw, origin)
    _check_paths(params, Path(path).resolve().parent, origin)
    _check_budget(params)
    return params


def _check_paths(p: Params, project: Path, origin: str) -> None:
    """base.*_dir resolve (symlinks followed) inside ``project`` and away from the user's ImageFolder trees."""
    errors = []
    dirs = {k: (project / getattr(p.base, k)).resolve() for k in _DIRS}
    for k, d in dirs.items():
        if d == project or project not in d.parents:
            errors.append(
                f"  base.{k} = {getattr(p.base, k)!r}: resolves to {d}, outside the project directory "
                f"{project} (a symlink?); use a plain relative directory below the project, e.g. "
                f"`{k.removesuffix('_dir')}`: the pipeline deletes and rewrites it."
            )
            continue
        for role in ("source", "target"):
            name = getattr(p.data, role)
            if name in EMBEDDED:
                continue
            tree = Path(name).expanduser().resolve()
            if d == tree or tree in d.parents or d in tree.parents:
                rel = "is" if d == tree else "lies inside" if tree in d.parents else "contains"
                errors.append(
                    f"  base.{k} = {getattr(p.base, k)!r}: {rel} the ImageFolder data.{role} = "
                    f"{name!r} ({tree}); the pipeline deletes and rewrites base.{k}, so it must not "
                    f"overlap your dataset. Keep the dataset outside base.{k} (or pick another "
                    f"base.{k}, e.g. `{k.removesuffix('_dir')}`)."
                )
    if errors:
        raise ParamsError(f"invalid parameters in {origin}:\n" + "\n".join(errors) + "\nFix these keys and run again.")


def needs_target_labels(strategy: str) -> bool:
    """Whether ``strategy`` cannot train without labeled target images: its declared streams
    (:class:`tlcore.strategies.Streams`) are not met by the labeled source and the unlabeled target pool."""
    from tlcore.strategies import StreamsError, strategy_class

    try:
        strategy_class(strategy).streams.check(("source", "unlabeled"))
    except StreamsError:
        return True
    return False


def _check_budget(p: Params) -> None:
    k, v = p.data.labels_per_class, p.data.val_per_class
    if k == "auto":  # as tasks.modeling.plan.labels_per_class resolves it
        k = DEMO_LABELS_PER_CLASS if p.data.target in EMBEDDED else None
    if v == "auto":  # as tasks.modeling.plan.val_per_class resolves it: 0 beside a label budget
        v = 0
    if k == 0 and p.finetune.strategy != "auto" and needs_target_labels(p.finetune.strategy):
        raise ParamsError(
            f"finetune.strategy = {p.finetune.strategy!r} trains on labeled target images, but "
            f"data.labels_per_class = 0. Use a strategy that adapts without target labels (mcc, semi, dann), "
            f"or set data.labels_per_class >= 1 (null for all labels)."
        )
    if p.data.target in EMBEDDED and k is not None:
        if p.data.target == "synth_digits":
            smallest, what = p.data.synth_per_class, "synth_digits class (data.synth_per_class)"
        else:  # the smallest class of the bundled digits has 174 images, 70 % of them in train
            smallest, what = (
                int(174 * (1 - p.data.target_test_fraction)),
                f"{p.data.target} class in the training split",
            )
        if k + v > smallest:
            raise ParamsError(
                f"data.labels_per_class = {k} (+ data.val_per_class = {v}) is larger than the smallest {what} "
                f"({smallest} images). Use at most {smallest - v}, or null for all labels."
            )
