"""Choosing a strategy with no target labels: ``finetune.strategy: auto`` when ``data.labels_per_class`` is 0.

With no labeled target image there is nothing to validate on, so the rule of :func:`tasks.plan.choose_strategy`
(semi) is replaced by a measurement: each candidate of ``tune.strategies`` that can train without target labels
is trained for ``tune.epochs`` epochs from the source model at ``finetune.lr``, in this process, and scored by
the label-free validator ``tune.validator`` (``auto``: the one the selection benchmark found best,
:data:`tasks.config.AUTO_VALIDATOR`) on a seeded sample of the unlabeled target pool; with labeled validation
images (``data.val_per_class > 0``) by their accuracy instead. The best candidate then trains as the finetune
stage's strategy (Ray Train, ``finetune.epochs``). ``tl tune`` is the fuller search (learning rates, strategy
params, ASHA); this is the cheap one the pipeline runs by itself. How far the validator can be trusted is
measured by ``bench/selection.py`` (README, "Choosing without target labels").
"""
from __future__ import annotations

import numpy as np

from .config import Params, needs_target_labels, resolve_validator
from .stage import say

VALIDATOR_IMAGES = 2000  # target pool images a label-free score reads


def pool_loader(params: Params, arch: str, batch_size: int):
    """A seeded random sample of the target training split (labels unused; the split is ordered class by
    class), fed as evaluation feeds the model: what a label-free validator scores."""
    from tlcore import data

    from .domains import load_domain

    train, test = load_domain(params, "target", arch)
    pick = np.random.default_rng(params.base.seed).permutation(len(train))[:VALIDATOR_IMAGES]
    return data.make_loader(train.subset(np.sort(pick), transform=test.transform), batch_size, train=False)


def select_strategy(params: Params) -> dict | None:
    """The candidate to train, with its score and every candidate's: ``{"strategy", "objective", "higher_is_better",
    "scores": {strategy: score}, "epochs", "why"}``; ``None`` when fewer than two candidates can run."""
    import torch

    from tlcore import validators

    from .training import run_job, target_job

    candidates = [s for s in params.tune.strategies if not needs_target_labels(s)]
    if len(candidates) < 2:
        return None
    labeled_val = params.data.val_per_class > 0
    validator = resolve_validator(params.tune.validator)
    objective = "val_accuracy" if labeled_val else validator
    higher = True if labeled_val else validators.HIGHER_IS_BETTER[validator]
    device = torch.device("cuda" if params.ray.use_gpu and torch.cuda.is_available() else "cpu")
    epochs = params.tune.epochs
    say(f"finetune: no target labels, so strategy auto measures {', '.join(candidates)} ({epochs} epoch(s) each at "
        f"lr {params.finetune.lr:g}) by {objective} and trains the best")
    scores, pool = {}, None
    for s in candidates:
        job, _ = target_job(params, s)
        job.optim = job.optim.model_copy(update={"epochs": epochs})
        model, history = run_job(job, device, log=None)
        if labeled_val:
            scores[s] = float(history[-1]["val_accuracy"])
        else:
            if pool is None:
                pool = pool_loader(params, job.arch, job.optim.batch_size)
            _, logits, _ = validators.features_and_logits(model, pool, device)
            scores[s] = float(validators.scores(logits)[validator])
        say(f"finetune:   {s:<10} {objective} {scores[s]:.4f}")
    best = (max if higher else min)(scores, key=scores.get)
    shown = ", ".join(f"{s} {v:.4f}" for s, v in scores.items())
    why = (f"no target labels; {objective} ({'higher' if higher else 'lower'} is better) after {epochs} epoch(s) "
           f"each: {shown}")
    return {"strategy": best, "objective": objective, "higher_is_better": higher, "scores": scores, "epochs": epochs,
            "why": why}
