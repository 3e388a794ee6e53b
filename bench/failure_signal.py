"""Does the 0-label adaptation check say "probably failed" when adaptation failed, and only then?

With no target labels, ``finetune.strategy: auto`` picks among ``tune.strategies`` (semi, mcc) by a label-free
validator, which cannot see a confident, class-balanced but wrong model (IM rated one at chance 2.07 of 2.30). The
check (:func:`tlcore.validators.agreement`) trains a witness of another family (DANN) from the same source model
and measures how often it and the picked model agree on the target pool; below
:data:`tlcore.validators.AGREEMENT_FAILED_BELOW` (0.5, fixed in advance) the run is flagged.

Cases: every embedded pair of ``tlcore.datasets.PAIRS`` as the pipeline runs it, and one deliberately failing
case: optdigits -> optdigits_colour with the source model denied the colour randomisation (``augment digits``),
the shift the issue that asked for the check found adaptation fails on. Per case and seed: pretrain the source
model, train semi, mcc and dann with no target labels (the transfer benchmark's schedule), pick semi or mcc by
the validator ``auto`` uses for this choice (:func:`tasks.project.measured.resolve_validator`), and report the
agreement of the pick with the witness, the pick's test accuracy and whether the check flagged it. The test
split only scores; nothing is chosen on it.

    python -m bench.failure_signal            # 1 seed, writes the docs section
    python -m bench.failure_signal --seeds 3
    python -m bench.failure_signal --seeds 3 --resume --case colour   # only the cases naming "colour", keeping
                                                                       # the runs already saved
"""

from __future__ import annotations

import argparse
import json
import time

from bench.docs import DOC, machine, write_section
from tasks.project.files import atomic_path

RESULTS = DOC.parent / "failure_signal.json"
FAILING = ("optdigits", "optdigits_colour", "digits")  # colour target, source denied the colour randomisation


def cases() -> list[tuple[str, str, str | None]]:
    from tlcore.datasets import PAIRS

    return [(s, t, None) for s, t, _ in PAIRS] + [FAILING]


def run_case(source: str, target: str, augment: str | None, seed: int) -> dict:

    from bench.transfer import optim_config
    from tasks.modeling.train import TrainJob, job_streams, run_job
    from tlcore import data, datasets, models, validators
    from tlcore.metrics import accuracy
    from tlcore.strategies import strategy_class

    spec = models.get_spec("smallcnn")
    src_ds, tgt_ds, test = datasets.domain_task(spec, source, target, 500, seed=seed, augment=augment)
    src = run_job(
        TrainJob("smallcnn", 10, "scratch", optim_config(6, None, 128, precision="fp32"), seed, labeled=src_ds),
        "cpu",
        log=None,
    )[0]
    state = {k: v.clone() for k, v in src.state_dict().items()}
    split = data.label_budget_split(tgt_ds.targets.numpy(), 0, seed)
    pool = tgt_ds.subset(split.unlabeled)
    scored = data.make_loader(tgt_ds.subset(split.unlabeled, transform=test.transform), 512, train=False)
    test_loader = data.make_loader(test, 512, train=False)
    from tasks.project.measured import resolve_validator

    chooser = resolve_validator("auto", "strategy")
    logits, acc, score = {}, {}, {}
    for m in ("semi", "mcc", validators.WITNESS):
        job = TrainJob(
            "smallcnn",
            10,
            m,
            optim_config(8, 25, 64, precision="fp32"),
            seed,
            init_state=state,
            **job_streams(strategy_class(m), source=src_ds, labeled=None, unlabeled=pool),
        )
        model = run_job(job, "cpu", log=None)[0]
        _, logits[m], _ = validators.features_and_logits(model, scored, "cpu")
        score[m] = {k: float(v) for k, v in validators.scores(logits[m]).items() if v is not None}
        acc[m] = accuracy(model, test_loader)
    better = validators.HIGHER_IS_BETTER[chooser]
    pick = (max if better else min)(("semi", "mcc"), key=lambda m: score[m][chooser])
    agree = validators.agreement(logits[pick], logits[validators.WITNESS])
    return {
        "pick": pick,
        "chooser": chooser,
        "scores": score,  # every validator of each candidate: the pick of another validator needs no retraining
        "test_accuracy": acc[pick],
        "witness_accuracy": acc[validators.WITNESS],
        "agreement": agree,
        "flagged": agree < validators.AGREEMENT_FAILED_BELOW,
        "source_only": accuracy(src, test_loader),
    }


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--render", action="store_true", help="only rewrite the docs from the saved results")
    ap.add_argument("--resume", action="store_true", help="keep the runs already saved; run only the missing ones")
    ap.add_argument("--case", default="", help="run only the cases whose name contains this text")
    args = ap.parse_args(argv)
    saved = json.loads(RESULTS.read_text()) if RESULTS.exists() else {"runs": {}, "wall_s": 0.0}
    t0, wall0 = time.time(), saved["wall_s"] if args.resume else 0.0
    if not args.render:
        saved = saved if args.resume else {"runs": {}, "wall_s": 0.0}
        for source, target, augment in cases():
            key = f"{source}->{target}" + (f" (augment {augment})" if augment else "")
            if args.case not in key:
                continue
            for seed in range(args.seeds):
                if str(seed) in saved["runs"].get(key, {}):
                    continue
                t = time.time()
                r = run_case(source, target, augment, seed)
                saved["runs"].setdefault(key, {})[str(seed)] = r
                print(
                    f"{key} seed {seed}: {r['pick']} test {r['test_accuracy']:.3f}, agreement with "
                    f"dann {r['agreement']:.3f}{' FLAGGED' if r['flagged'] else ''} ({time.time() - t:.0f} s)",
                    flush=True,
                )
                saved["wall_s"] = wall0 + time.time() - t0
                with atomic_path(RESULTS) as tmp:
                    tmp.write_text(json.dumps(saved, indent=1))
    write_section("failure-signal", render(saved, max(len(v) for v in saved["runs"].values())))
    print(f"wrote {DOC}")


def _chooser(saved: dict) -> str:
    used = {r.get("chooser", "im") for by_seed in saved["runs"].values() for r in by_seed.values()}
    return ", ".join(sorted(used))


def render(saved: dict, seeds: int) -> str:
    from tlcore.validators import AGREEMENT_FAILED_BELOW, WITNESS

    rows = []
    for case, by_seed in saved["runs"].items():
        for seed, r in sorted(by_seed.items()):
            rows.append(
                f"| {case} | {seed} | {r['source_only'] * 100:.1f} | {r['pick']} | {r['test_accuracy'] * 100:.1f} | "
                f"{r['witness_accuracy'] * 100:.1f} | {r['agreement']:.2f} | {'**yes**' if r['flagged'] else 'no'} |"
            )
    return "\n".join(
        [
            "## Did 0-label adaptation fail? The agreement check",
            "",
            f"`python -m bench.failure_signal --seeds {seeds}` (a case listed with fewer seeds was not run with "
            "more: `--resume --case`): per embedded pair (as the pipeline runs it) and one "
            "deliberately failing case (optdigits -> optdigits_colour with the source model denied colour "
            "randomisation, `augment digits`), no target labels: the source model, then semi and mcc, the pick "
            f"by the validator `finetune.strategy: auto` uses for this choice (`{_chooser(saved)}`), and a "
            f"{WITNESS} witness from the same source model "
            "(8 epochs x 25 steps each, fp32). *Agreement*: the fraction of the target pool on which pick and "
            f"witness predict the same class; the check flags a run below {AGREEMENT_FAILED_BELOW} (fixed in "
            "advance: they disagree on most images). Test accuracy only scores; nothing is chosen on it. "
            f"Wall time {saved['wall_s'] / 60:.1f} min; {machine()}.",
            "",
            "| case | seed | source only (%) | pick | pick's test accuracy (%) | witness (%) | agreement | flagged |",
            "|---|---|---|---|---|---|---|---|",
            *rows,
        ]
    )


if __name__ == "__main__":
    main()
