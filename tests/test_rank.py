"""`tl rank` on a tiny ImageFolder target: candidates load, the labeled budget is what finetune trains on,
scores apply where they can, and with 0 labels the candidates are ranked label-free on the unlabeled pool."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from helpers import ROOT
from PIL import Image
from typer.testing import CliRunner


@pytest.fixture()
def project(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in ("a", "b", "c"):
            (tmp_path / "tgt" / split / c).mkdir(parents=True)
            for i in range(4):
                Image.fromarray(rng.integers(0, 256, (12, 12), dtype=np.uint8)).save(
                    tmp_path / "tgt" / split / c / f"{i}.png"
                )
    p = tmp_path / "project"
    p.mkdir()
    shutil.copy(ROOT / "params.yaml", p / "params.yaml")
    monkeypatch.chdir(p)
    return tmp_path


def test_rank_scores_each_candidate_on_the_labeled_budget(project):
    from tasks.cli import main as cli
    from tasks.cli.rank import rank
    from tasks.modeling.checkpoints import save_checkpoint
    from tasks.project.config import load_params
    from tlcore import models

    save_checkpoint(project / "ckpt.pt", models.create("tinycnn", 7), [str(i) for i in range(7)], 1)
    params = load_params(
        "params.yaml", [f"data.target={project / 'tgt'}", "data.labels_per_class=3", "evaluate.batch_size=4"]
    )
    r = rank(params, ["tinycnn", f"tinycnn:{project / 'ckpt.pt'}"])
    assert r["labeled"] == 9 and r["classes"] == 3  # 3 per class of the train split, never test
    rows = {row["candidate"]: row for row in r["rows"]}
    ckpt = rows[f"tinycnn:{project / 'ckpt.pt'}"]  # a project checkpoint keeps its 7-class source head
    assert ckpt["leep"] <= 0 and ckpt["nce"] <= 0 and ckpt["features"] == 64
    assert rows["tinycnn"]["leep"] is None and rows["tinycnn"]["nce"] is None  # random init: no source classifier
    assert [row["logme"] for row in r["rows"]] == sorted((row["logme"] for row in r["rows"]), reverse=True)

    run = lambda *a: CliRunner().invoke(cli.app, ["rank", "-S", f"data.target={project / 'tgt'}", *a])
    out = run("--candidate", "tinycnn", "-S", "data.labels_per_class=2", "--json")
    assert out.exit_code == 0 and json.loads(out.output)["labeled"] == 6
    out = run("--candidate", "tinycnn")
    assert (
        out.exit_code == 0 and "logme" in out.output and "12 labeled target images (3 classes)" in out.output
    )  # auto: all of a user's labels
    out = run("--candidate", "nosuchnet")
    assert out.exit_code == 2 and "unknown architecture 'nosuchnet'" in out.output
    out = run()
    assert out.exit_code == 2 and "nothing to rank" in out.output
    save_checkpoint("models/source.pt", models.create("tinycnn", 10), [str(i) for i in range(10)], 1)
    r = rank(params, [])  # the project's source model by default: its architecture from the checkpoint
    assert [(row["candidate"], row["arch"]) for row in r["rows"]] == [("source.pt", "tinycnn")]
    assert r["rows"][0]["leep"] is not None
    assert "source.pt" not in run("--no-source", "--candidate", "tinycnn").output


def test_rank_with_no_labels_uses_a_label_free_validator_on_the_pool(project):
    import torch

    from tasks.cli import main as cli
    from tasks.cli.rank import rank
    from tasks.modeling.checkpoints import save_checkpoint
    from tasks.project.config import load_params
    from tasks.project.measured import AUTO_VALIDATOR
    from tlcore import models

    sure, unsure = models.create("tinycnn", 7), models.create("tinycnn", 7)
    with torch.no_grad():
        unsure.head.weight.zero_()
        unsure.head.bias.zero_()  # uniform predictions: maximal entropy, no information
    for name, m in (("sure", sure), ("unsure", unsure)):
        save_checkpoint(project / f"{name}.pt", m, [str(i) for i in range(7)], 1)
    cands = [f"tinycnn:{project / 'unsure.pt'}", "tinycnn", f"tinycnn:{project / 'sure.pt'}"]
    params = load_params(
        "params.yaml", [f"data.target={project / 'tgt'}", "data.labels_per_class=0", "evaluate.batch_size=4"]
    )
    for v in ("entropy", "im"):  # lower is better for entropy, higher for im: the confident head wins both
        r = rank(params, cands, validator=v)
        assert r["score"] == v and r["labeled"] == 0 and r["unlabeled"] == 12  # the whole train split, labels unused
        assert [row["candidate"] for row in r["rows"]] == [
            cands[2],
            cands[0],
            cands[1],
        ]  # no classifier: no score, last
        assert r["rows"][-1]["snd"] is None and abs(r["rows"][1]["entropy"] - __import__("math").log(7)) < 1e-6

    run = lambda *a: CliRunner().invoke(
        cli.app,
        [
            "rank",
            "-S",
            f"data.target={project / 'tgt'}",
            "-S",
            "data.labels_per_class=0",
            *(x for c in cands for x in ("--candidate", c)),
            *a,
        ],
    )
    out = run()  # --validator auto: the selection benchmark's best
    assert out.exit_code == 0 and f"ranked label-free by {AUTO_VALIDATOR}" in out.output and "logme" not in out.output
    out = run("--validator", "dev")
    assert out.exit_code == 2 and "choose auto or one of entropy, im, snd, bnm" in out.output
