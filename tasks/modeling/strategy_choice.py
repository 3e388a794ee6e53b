"""Choosing a strategy with no target labels: ``finetune.strategy: auto`` when ``data.labels_per_class`` is 0.

With no labeled target image there is nothing to validate on, so the rule of :func:`tasks.modeling.plan.choose_strategy`
(semi) is replaced by a measurement: each candidate of ``tune.strategies`` that can train without target labels
(and takes ``finetune.strategy_params``) is trained for ``tune.epochs`` epochs from the source model at
``finetune.lr``, in the stage's process, and scored by the label-free validator ``tune.validator`` (``auto``: the
one the selection benchmark found best for this use, :data:`tasks.project.measured.AUTO_STRATEGY_VALIDATOR`) on a seeded
sample of the unlabeled target pool; with labeled validation images (``data.val_per_class > 0``) by their
accuracy instead. The best candidate then trains as the finetune stage's strategy (Ray Train,
``finetune.epochs``). A candidate that fails or scores a non-finite number is dropped, and said so.

The measurement is one short single-process run per candidate (``ray.num_workers`` does not split it), on the
GPU when ``ray.use_gpu`` is set and this process sees one, else on the CPU. ``tl tune`` is the fuller search
(learning rates, strategy params, ASHA); this is the cheap one the pipeline runs by itself. How far the
validator can be trusted is measured by ``bench/selection.py`` (README, "Choosing without target labels").
"""

from __future__ import annotations

import math

import numpy as np

from tasks.modeling.domains import pool_sample
from tasks.modeling.plan import val_per_class
from tasks.project.config import Params, needs_target_labels
from tasks.project.measured import resolve_validator
from tasks.project.stage import StageError, say


def pool_dataset(params: Params, arch: str):
    """A seeded random sample of the target training split (labels unused, :func:`pool_sample`), fed as
    evaluation feeds the model: what a label-free validator scores."""
    from tasks.modeling.domains import load_domain

    train, test = load_domain(params, "target", arch)
    pick = pool_sample(np.arange(len(train)), params.base.seed)
    return train.subset(pick, transform=test.transform)


def pool_loader(params: Params, arch: str, batch_size: int):
    """:func:`pool_dataset`'s loader."""
    from tlcore import data

    return data.make_loader(pool_dataset(params, arch), batch_size, train=False)


def candidates(params: Params) -> list[str]:
    """The strategies of ``tune.strategies`` that train without target labels and take ``finetune.strategy_params``."""
    from tlcore.strategies import create_strategy

    out = []
    for s in params.tune.strategies:
        if needs_target_labels(s):
            continue
        try:
            create_strategy(s, **params.finetune.strategy_params)
        except TypeError:  # finetune.strategy_params names a parameter this strategy has not
            continue
        out.append(s)
    return out


def select_strategy(params: Params) -> dict | None:
    """The candidate to train and why: ``{"strategy", "objective", "higher_is_better", "scores": {strategy: score},
    "dropped": {strategy: reason}, "epochs", "why"}``; ``None`` when no candidate fits (the rule then applies)."""
    import torch

    from tasks.modeling.hardware import set_torch_threads
    from tasks.modeling.train import run_job, target_job
    from tlcore import validators

    cands = candidates(params)
    if not cands:
        say(
            f"finetune: none of tune.strategies ({', '.join(params.tune.strategies)}) trains without target labels "
            f"with finetune.strategy_params; strategy auto keeps its rule"
        )
        return None
    labeled_val = val_per_class(params) > 0  # no target labels: auto holds none out
    validator = resolve_validator(params.tune.validator, "strategy")
    objective = "val_accuracy" if labeled_val else validator
    higher = True if labeled_val else validators.HIGHER_IS_BETTER[validator]
    base = {"objective": objective, "higher_is_better": higher, "epochs": params.tune.epochs, "dropped": {}}
    if len(cands) == 1:
        return {
            **base,
            "strategy": cands[0],
            "scores": {},
            "why": "no target labels; the only one of tune.strategies that trains without them",
        }
    set_torch_threads(params)
    device = torch.device("cuda" if params.ray.use_gpu and torch.cuda.is_available() else "cpu")
    say(
        f"finetune: no target labels, so strategy auto measures {', '.join(cands)} ({params.tune.epochs} epoch(s) each "
        f"at lr {params.finetune.lr:g}, on {device.type}) by {objective} and trains the best"
    )
    scores, dropped, pool, pool_logits = {}, {}, None, {}
    for s in cands:
        try:
            job, _ = target_job(params, s, params.finetune.strategy_params)
            job.optim = job.optim.model_copy(update={"epochs": params.tune.epochs})
            model, history = run_job(job, device, log=None)
            if labeled_val:
                score = float(history[-1]["val_accuracy"])
            else:
                if pool is None:
                    pool = pool_loader(params, job.arch, job.optim.batch_size)
                _, logits, _ = validators.features_and_logits(model, pool, device)
                pool_logits[s] = logits
                score = float(validators.scores(logits)[validator])
            del model
            if device.type == "cuda":
                torch.cuda.empty_cache()  # before the finetune run's own workers take the GPU
        except Exception as e:  # noqa: BLE001 - a diverging candidate must not end a run that never asked for it
            dropped[s] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            say(f"finetune:   {s:<10} dropped ({dropped[s]})")
            continue
        if not math.isfinite(score):
            dropped[s] = f"{objective} is {score}"
            say(f"finetune:   {s:<10} dropped ({dropped[s]})")
            continue
        scores[s] = score
        say(f"finetune:   {s:<10} {objective} {score:.4f}")
    if not scores:
        raise StageError(
            "finetune: strategy auto with no target labels measured " + ", ".join(cands) + " and every "
            "one failed: " + "; ".join(f"{s}: {r}" for s, r in dropped.items()) + ". Fix the cause, or "
            "set finetune.strategy to one strategy to see its own error."
        )
    best = (max if higher else min)(scores, key=scores.get)
    shown = ", ".join(f"{s} {v:.4f}" for s, v in scores.items())
    why = (
        f"no target labels; {objective} ({'higher' if higher else 'lower'} is better) after {params.tune.epochs} "
        f"epoch(s) each: {shown}" + (f"; dropped {', '.join(dropped)}" if dropped else "")
    )
    check = None if labeled_val else adaptation_check(params, best, pool_logits, pool, device)
    return {**base, "strategy": best, "scores": scores, "dropped": dropped, "why": why, "check": check}


def adaptation_check(params: Params, best: str, pool_logits: dict, pool, device) -> dict | None:
    """Did the 0-label adaptation probably fail? A witness adapted by another family of method
    (:data:`tlcore.validators.WITNESS`, DANN) trains as the candidates did, and the check is how often it and
    ``best`` predict the same class on the pool sample (:func:`tlcore.validators.agreement`): below
    :data:`tlcore.validators.AGREEMENT_FAILED_BELOW` the two disagree on most target images, which is what a
    failed adaptation looks like while the validator still rates it well (bench/failure_signal.py measures it).
    ``{"witness", "agreement", "failed", "why"}``; ``None`` when the witness cannot train (said so)."""
    from tasks.modeling.train import run_job, target_job
    from tlcore import validators

    witness = validators.WITNESS if best != validators.WITNESS else "mcc"  # another family than the pick's
    try:
        if witness in pool_logits:
            logits = pool_logits[witness]
        else:
            job, _ = target_job(params, witness, {})
            job.optim = job.optim.model_copy(update={"epochs": params.tune.epochs})
            model, _ = run_job(job, device, log=None)
            _, logits, _ = validators.features_and_logits(model, pool, device)
        agree = validators.agreement(pool_logits[best], logits)
    except Exception as e:  # noqa: BLE001 - a check that cannot run must not end the run; it says so
        say(f"finetune: adaptation check skipped: the {witness} witness failed ({type(e).__name__}: {e})")
        return None
    failed = agree < validators.AGREEMENT_FAILED_BELOW
    n = len(pool_logits[best])
    why = (
        f"{best} and a {witness} witness (from the same source model, {params.tune.epochs} epoch(s)) predict the "
        f"same class on {agree * 100:.0f} % of {n} target pool images"
        + (
            f" (< {validators.AGREEMENT_FAILED_BELOW * 100:.0f} %): adaptation probably failed; a model with no "
            f"target labels and this check failed is registered as challenger only"
            if failed
            else f" (>= {validators.AGREEMENT_FAILED_BELOW * 100:.0f} %)"
        )
    )
    say(f"finetune: adaptation check: {why}")
    return {"witness": witness, "agreement": agree, "failed": failed, "why": why}
