"""``tl rank``: rank candidate source models on the labeled target budget, before any training.

Each candidate runs once, in eval mode, over the labeled target images (``data.labels_per_class``,
the same seeded split the finetune stage trains on; the target test split is never read). Its
penultimate features give LogME; a candidate that keeps a classifier over its source classes also gets
LEEP and NCE (:mod:`tlcore.transferability`). Candidates: the project's source model
(``models/source.pt``, when pretrain has run) and every ``--candidate ARCH[:WEIGHTS]``: WEIGHTS is a
file (a checkpoint saved by this project, or a state_dict) or a torchvision weights name read from the
local torch cache; no WEIGHTS is random initialisation, the floor any real candidate should clear.

With ``data.labels_per_class: 0`` there is nothing labeled to score on: each candidate with a classifier of its
own is then scored label-free, by :mod:`tlcore.validators` (entropy, IM, SND, BNM) of its source-class predictions
on the unlabeled target pool (up to :data:`tasks.modeling.domains.VALIDATOR_IMAGES` images of the training
split, labels unused), ranked by
one of them (``validator``; ``auto``, the default, is the one the selection benchmark found best,
:data:`tasks.project.measured.AUTO_VALIDATOR`). That asks "how confidently and consistently does the source model
cluster the target?", a weaker signal than LogME with labels; a candidate without a classifier gets no score.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tasks.modeling.checkpoints import load_checkpoint
from tasks.modeling.domains import VALIDATOR_IMAGES, pool_sample
from tasks.modeling.hardware import device_for, set_torch_threads
from tasks.modeling.plan import labels_per_class, val_per_class
from tasks.project.config import EMBEDDED, Params
from tasks.project.measured import VALIDATORS, resolve_validator
from tasks.project.stage import StageError, say

SOURCE = "source.pt"


@dataclass
class Candidate:
    name: str  # as the user wrote it (or source.pt)
    arch: str  # a registered architecture ("" for source.pt: its checkpoint says)
    weights: str | None


def parse_candidate(text: str) -> Candidate:
    """``ARCH`` or ``ARCH:WEIGHTS``; the architecture must be registered."""
    from tlcore.models import list_models

    arch, _, weights = text.partition(":")
    if arch not in list_models():
        raise StageError(
            f"--candidate {text!r}: unknown architecture {arch!r}; choose one of {', '.join(list_models())}"
            f" (optionally ARCH:WEIGHTS, WEIGHTS a file or a torchvision weights name)"
        )
    return Candidate(text, arch, weights or None)


def load_candidate(c: Candidate, params: Params):
    """``(model, has_source_head)``: a project checkpoint or a state_dict with a head keeps its classifier;
    torchvision weights and random initialisation give a backbone only."""
    import torch

    from tlcore import models

    if c.name == SOURCE:
        return load_checkpoint(params.path("models", SOURCE))[0], True
    blob = None
    if c.weights and (Path(c.weights).suffix in {".pt", ".pth"} or Path(c.weights).exists()):
        if not Path(c.weights).is_file():
            raise StageError(f"--candidate {c.name!r}: weights file {c.weights} does not exist")
        blob = torch.load(c.weights, map_location="cpu", weights_only=True)
    if isinstance(blob, dict) and isinstance(blob.get("model"), dict) and "num_classes" in blob:  # save_checkpoint
        if blob.get("arch", c.arch) != c.arch:
            raise StageError(f"--candidate {c.name!r}: {c.weights} holds a {blob['arch']} checkpoint, not {c.arch}")
        model = models.create(c.arch, blob["num_classes"], in_channels=blob.get("in_channels"))
        model.load_state_dict(blob["model"])
        return model, True
    head = blob.get("head.weight") if isinstance(blob, dict) else None
    model = models.create(c.arch, head.shape[0] if head is not None else 1, weights=c.weights)
    return model, head is not None


def _target_root(params: Params, tmp: Path) -> Path:
    """The target: the data stage's prepared shards when made from ``data.target``, else the user's ImageFolder,
    else the embedded dataset materialised into ``tmp``."""
    from tlcore import datasets

    made = params.path("data", "target")
    manifest = params.path("data", "manifest.json")
    if (
        made.is_dir()
        and manifest.is_file()
        and json.loads(manifest.read_text())["target"]["name"] == params.data.target
    ):
        return made
    if params.data.target not in EMBEDDED:
        return Path(params.data.target).expanduser()
    say(f"rank: materialising embedded {params.data.target!r} (run the data stage to reuse it)")
    return datasets.materialize(
        params.data.target,
        tmp / "target",
        seed=params.base.seed,
        n_per_class=params.data.synth_per_class,
        test_per_class=params.data.synth_test_per_class,
        test_fraction=params.data.target_test_fraction,
    )


def rank(params: Params, candidates: list[str], include_source: bool = True, validator: str = "auto") -> dict:
    """Score every candidate; returns ``{"rows": [...] best first, "labeled": N, "labels_per_class": k,
    "score": the column the rows are ordered by}``. With 0 labels per class the rows hold the label-free
    validators on the unlabeled pool, ordered by ``validator`` (see the module docstring)."""
    from tlcore import data, shards, transferability, transforms, validators

    set_torch_threads(params)
    device = device_for(params)
    k = labels_per_class(params)
    validator = resolve_validator(validator)
    if k == 0 and validator not in VALIDATORS:
        raise StageError(f"--validator {validator!r}: choose auto or one of {', '.join(VALIDATORS)}")
    todo = [parse_candidate(t) for t in candidates]
    if include_source and params.path("models", SOURCE).is_file():
        todo.insert(0, Candidate(SOURCE, "", None))  # its architecture is read from the checkpoint
    if not todo:
        raise StageError(
            f"nothing to rank: no {params.path('models', SOURCE)} (run pretrain first) and no "
            f"--candidate ARCH[:WEIGHTS]"
        )
    rows, splits = [], {}
    with tempfile.TemporaryDirectory(prefix="tl-rank-") as tmp:
        root = _target_root(params, Path(tmp))
        for c in todo:
            model, has_head = load_candidate(c, params)
            model = model.to(device)
            spec = candidate_spec(c, model, params)
            channels = model_in_channels(model)
            key = (spec.input_size, spec.resize_size, spec.interpolation, channels)
            if key not in splits:
                kw = dict(resize=spec.resize_size, interpolation=spec.interpolation)
                ds = (
                    data.open_split(root / "train", spec.input_size, channels, **kw)
                    if shards.is_prepared(root / "train")
                    else data.load_split(root / "train", spec.input_size, channels, params.data.skip_corrupt, **kw)
                )
                y = ds.targets.numpy()
                v = val_per_class(params, [int((y == c).sum()) for c in range(len(ds.classes))])
                b = data.label_budget_split(y, k, params.base.seed, v)
                splits[key] = ds.subset(pool_sample(b.unlabeled, params.base.seed) if k == 0 else b.labeled)
            images = splits[key]
            images.transform = transforms.build_transform(spec, train=False, channels=channels)
            loader = data.make_loader(images, params.evaluate.batch_size, train=False)
            row = {"candidate": c.name, "arch": model.arch}
            if k == 0:
                feats, logits, _ = validators.features_and_logits(model, loader, device, limit=VALIDATOR_IMAGES)
                free = validators.scores(logits) if has_head else {}
                rows.append({**row, "features": int(feats.shape[1]), **{v: free.get(v) for v in VALIDATORS}})
                continue
            feats, logits, y = validators.features_and_logits(model, loader, device)
            s = transferability.scores(
                feats.numpy(), y.numpy(), logits.softmax(1).numpy() if has_head else None, len(images.classes)
            )
            rows.append({**row, "features": int(feats.shape[1]), **s})
    if k == 0:
        sign = 1 if validators.HIGHER_IS_BETTER[validator] else -1
        rows.sort(key=lambda r: (r[validator] is None, -sign * (r[validator] or 0)))
        return {
            "rows": rows,
            "labeled": 0,
            "unlabeled": min(len(images), VALIDATOR_IMAGES),
            "labels_per_class": 0,
            "classes": len(images.classes),
            "score": validator,
        }
    rows.sort(key=lambda r: -r["logme"])
    return {
        "rows": rows,
        "labeled": len(images),
        "labels_per_class": k,
        "classes": len(images.classes),
        "score": "logme",
    }


def candidate_spec(c: Candidate, model, params: Params):
    """How to feed candidate ``c``: the source checkpoint as it was trained; torchvision weights as they were
    trained (their resolution, crop and normalisation, or ``data.image_size``); else the backbone's own."""
    from tasks.modeling.model_input import spec_from_meta, weights_spec

    if c.name == SOURCE:
        return spec_from_meta(load_checkpoint(params.path("models", SOURCE))[1])
    file = c.weights and (Path(c.weights).suffix in {".pt", ".pth"} or Path(c.weights).exists())
    return weights_spec(model.arch, None if file else c.weights, params.data.image_size)


def model_in_channels(model) -> int:
    """Input channels of the first convolution (1 for this project's digit models, 3 for ImageNet nets)."""
    import torch

    return next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d)).in_channels


def table(result: dict) -> str:
    """The ranking, for people: best LogME first; ``-`` where a score does not apply."""
    free = result["labels_per_class"] == 0
    cols = ["rank", "candidate", "arch", "features", *(VALIDATORS if free else ("logme", "leep", "nce"))]
    fmt = lambda v: "-" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)
    cells = [[str(i + 1)] + [fmt(r[c]) for c in cols[1:]] for i, r in enumerate(result["rows"])]
    widths = [max(len(c), *(len(t[i]) for t in cells)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(t, widths)) for t in cells]
    if free:
        from tlcore.validators import HIGHER_IS_BETTER

        v = result["score"]
        lines.append(
            f"0 labeled target images: ranked label-free by {v} ({'higher' if HIGHER_IS_BETTER[v] else 'lower'}"
            f" is better) on {result['unlabeled']} unlabeled target images, from each candidate's own source-"
            f"class predictions (- without a classifier). Lower is better for entropy, higher for the others. "
            f"A hint only: with labels (-S data.labels_per_class=N) LogME ranks on the target's classes."
        )
    else:
        lines.append(
            f"{result['labeled']} labeled target images ({result['classes']} classes); higher is better for "
            f"every score. LEEP/NCE need the candidate's own source classifier (- without one)."
        )
    return "\n".join(lines)
