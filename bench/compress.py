"""Compression trade-offs of the fine-tuned model: size, CPU latency (b=1 p50/p95), throughput, accuracy.

Trains the default source model and fine-tune (2 labels per class) in-process, then measures
fp32, pruning, int8 and a distilled student. Writes a section of docs/benchmarks.md.

    python -m bench.compress
"""

from __future__ import annotations

import argparse

from bench.docs import machine, write_section


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--labels-per-class", type=int, default=2)
    ap.add_argument("--iters", type=int, default=200, help="latency repetitions")
    ap.add_argument("--recover-epochs", type=int, default=4, help="distillation epochs after pruning (masks held)")
    args = ap.parse_args(argv)
    import torch

    from bench.transfer import optim_config
    from tasks.modeling.train import TrainJob, run_job
    from tasks.project.config import Params
    from tasks.stages.compress import measure_variant, prune_and_recover, train_student
    from tlcore import compress as C
    from tlcore import data, datasets, models

    source, target, test = datasets.digits_task(models.get_spec("smallcnn"), 500, seed=0)
    eval_tf = test.transform
    labeled = target.subset(data.label_budget_split(target.targets.numpy(), args.labels_per_class, 0).labeled)

    print("training source model and fine-tune ...", flush=True)
    src, _ = run_job(
        TrainJob("smallcnn", 10, "scratch", optim_config(6, None, 128), 0, labeled=source), "cpu", log=None
    )
    teacher, _ = run_job(
        TrainJob("smallcnn", 10, "finetune", optim_config(10, 25, 64), 0, init_state=src.state_dict(), labeled=labeled),
        "cpu",
        log=None,
    )
    teacher.eval()
    loader = data.make_loader(test, 256, train=False)
    example = torch.stack([test[i][0] for i in range(64)])
    calib = torch.stack([target.subset(range(256), transform=eval_tf)[i][0] for i in range(256)])
    rows = [measure_variant("fp32", teacher, loader, example, args.iters, {"sparsity": C.sparsity(teacher)})]

    def params(amount: float = 0.5) -> Params:
        """The pipeline's defaults for this budget: the benchmark runs the compress stage's own code."""
        return Params.model_validate(
            {
                "data": {"labels_per_class": args.labels_per_class},
                "compress": {"prune_amount": amount, "prune_finetune_epochs": args.recover_epochs},
            }
        )

    def add(name, m):
        rows.append(measure_variant(name, m, loader, example, args.iters, {"sparsity": C.sparsity(m)}))

    for amount in (0.5, 0.8):
        add(f"prune{int(amount * 100)} (global L1), no retraining", C.prune_unstructured(teacher, amount))
        add(
            f"prune{int(amount * 100)} (global L1) + {args.recover_epochs} recovery epochs",
            prune_and_recover(params(amount), teacher, target, structured=False),
        )
    add("prune25 (structured channels), no retraining", C.prune_structured(teacher, 0.25))
    add(
        f"prune25 (structured channels) + {args.recover_epochs} recovery epochs",
        prune_and_recover(params(0.25), teacher, target, structured=True),
    )
    rows.append(measure_variant("int8 (FX static, x86)", C.quantize_int8(teacher, calib), loader, example, args.iters))
    p = params()
    add(
        "distilled tinycnn (10 epochs)",
        train_student(p, teacher, models.create("tinycnn", 10), target, 10, p.finetune.lr),
    )
    base = rows[0]
    lines = [
        "## Compression: the fine-tuned model",
        "",
        f"`python -m bench.compress`: `smallcnn` fine-tuned with {args.labels_per_class} labels per class; CPU, "
        f"{torch.get_num_threads()} threads, batch-1 latency over {args.iters} runs, throughput at batch 256. "
        f"Machine: {machine()}.",
        "",
        "| variant | accuracy | Δ acc (pt) | size (MB) | smaller | p50 (ms) | p95 (ms) | faster (b=1) | images/s "
        "(b=256) | sparsity |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['variant']} | {r['accuracy'] * 100:.2f} | {(r['accuracy'] - base['accuracy']) * 100:+.2f} | "
            f"{r['size_mb']:.3f} | {base['size_mb'] / r['size_mb']:.2f}x | {r['latency_ms_p50']:.3f} | "
            f"{r['latency_ms_p95']:.3f} | {base['latency_ms_p50'] / r['latency_ms_p50']:.2f}x | "
            f"{r['throughput_ips']:.0f} | {r.get('sparsity', 0) * 100:.0f} % |"
        )
    lines += [
        "",
        "Pruning alone costs accuracy; a few recovery epochs (distilling from the unpruned model on the labeled "
        "target and the unlabeled pool, with `torch.nn.utils.prune` masks held so pruned weights stay zero) win "
        "it back. Unstructured pruning keeps dense storage and dense kernels: it pays off only with a sparse "
        "runtime or file compression. int8 uses PyTorch's FX graph-mode static quantisation with the x86 "
        "backend. Training runs use the engine's default precision (`auto`).",
    ]
    print("\n".join(lines))
    print(f"wrote {write_section('compress', chr(10).join(lines))}")


if __name__ == "__main__":
    main()
