"""DVC knows every input: a user ImageFolder (data.source/data.target) and a pretrain.weights file rerun
the stages that read them when their content changes, and only then (the `inputs` stage)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time

import pytest
import yaml
from helpers import ROOT, dvc, env, make_repo

from tasks.stages import inputs

OLD = time.time() - 3600  # an mtime far from now: hashes of such files are cached (recent ones are racy)


def _tree(root, n_train=3, n_test=2, classes=("a", "b"), png=False):
    """A tiny ImageFolder; real 8x8 PNGs when ``png`` (the data stage decodes them), else random bytes."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("test", n_test)):
        for c in classes:
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                f = root / split / c / f"{i}.png"
                if png:
                    Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8), "L").save(f)
                else:
                    f.write_bytes(rng.bytes(64))
                os.utime(f, (OLD, OLD))
    return root


def _fp(root, cache_file):
    cache = inputs.HashCache(cache_file)
    fp = inputs.data_fingerprint(str(root), cache)
    cache.save()
    return fp, cache.hashed


def test_folder_fingerprint_follows_content_not_mtime(tmp_path):
    root, cf = _tree(tmp_path / "imgs"), tmp_path / "cache.json"
    fp, hashed = _fp(root, cf)
    assert hashed == 10 and fp["kind"] == "folder" and sorted(fp["splits"]["train"]) == ["a", "b"]
    img = root / "train/a/0.png"
    assert fp["splits"]["train"]["a"]["0.png"] == hashlib.sha256(img.read_bytes()).hexdigest()
    assert _fp(root, cf) == (fp, 0)  # unchanged: every hash from the cache
    os.utime(img, (OLD + 5, OLD + 5))  # `touch`: read again, same fingerprint
    assert _fp(root, cf) == (fp, 1)
    (root / "train/a/.DS_Store").write_bytes(b"x")  # hidden files: the data stage skips them too
    assert _fp(root, cf)[0] == fp
    (root / "train/a/2024").mkdir()
    for change in (
        lambda: img.write_bytes(b"edited"),
        lambda: (root / "train/b/new.png").write_bytes(b"n"),
        lambda: (root / "test/a/1.png").unlink(),
        lambda: (root / "train/c").mkdir(),
        lambda: (root / "train/a/2024/nested.png").write_bytes(b"n"),
    ):  # the data stage reads nested images
        change()
        new, _ = _fp(root, cf)
        assert new != fp
        fp = new
    assert inputs.data_fingerprint("synth_digits", inputs.HashCache(cf)) == {"name": "synth_digits", "kind": "embedded"}


def test_a_few_thousand_files_cost_stats_only(tmp_path):
    root, cf = tmp_path / "big", tmp_path / "cache.json"
    for split, n in (("train", 250), ("test", 50)):
        for c in range(10):
            d = root / split / f"c{c}"
            d.mkdir(parents=True)
            for i in range(n):
                (d / f"{i}.png").write_bytes(os.urandom(512))
                os.utime(d / f"{i}.png", (OLD, OLD))
    assert _fp(root, cf)[1] == 3000
    _, hashed = _fp(root, cf)
    assert hashed == 0  # every file's hash came from the cache: its size and mtime were enough


def test_weights_fingerprint_file_and_torchvision_name(tmp_path, monkeypatch):
    import torch

    cache = inputs.HashCache(tmp_path / "cache.json")
    assert inputs.weights_fingerprint(None, "smallcnn", cache) == {"weights": None}
    w = tmp_path / "w.pt"
    torch.save({"head.weight": torch.zeros(2, 3)}, w)
    fp = inputs.weights_fingerprint(str(w), "smallcnn", cache)
    assert fp == {"weights": str(w), "kind": "file", "sha256": hashlib.sha256(w.read_bytes()).hexdigest()}
    torch.save({"head.weight": torch.ones(2, 3)}, w)
    assert inputs.weights_fingerprint(str(w), "smallcnn", cache)["sha256"] != fp["sha256"]
    assert inputs.weights_fingerprint(str(tmp_path / "gone.pt"), "smallcnn", cache)["sha256"] is None
    # a torchvision name: the file tlcore would load from the local hub cache (its error names the path)
    from tlcore import models

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(models.WeightsNotFoundError) as e:
        models.create("resnet18", 2, weights="IMAGENET1K_V1")
    fp = inputs.weights_fingerprint("IMAGENET1K_V1", "resnet18", cache)
    expected = inputs.torch_hub_dir() / "checkpoints" / fp["file"]
    assert str(expected) in str(e.value) and fp["kind"] == "torchvision" and fp["sha256"] is None
    expected.parent.mkdir(parents=True)
    expected.write_bytes(b"weights")
    assert (
        inputs.weights_fingerprint("IMAGENET1K_V1", "resnet18", cache)["sha256"]
        == hashlib.sha256(b"weights").hexdigest()
    )
    assert any(k.startswith("resnet18|IMAGENET1K_V1|") for k in cache.names)  # resolved once, then cached


def test_stage_imports_no_torch(tmp_path):
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    r = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "tasks.stages.inputs"],
        cwd=tmp_path,
        env={**env(), "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    imported = {line.split("|")[-1].strip() for line in r.stderr.splitlines() if line.startswith("import time:")}
    assert "torch" not in imported and "tasks.project.config" in imported
    assert yaml.safe_load((tmp_path / "data/inputs.json").read_text())["source"]["kind"] == "embedded"
    assert yaml.safe_load((tmp_path / "models/weights.json").read_text()) == {"weights": None}


def _ran(out: str) -> set[str]:
    return {line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage '")}


@pytest.mark.slow
def test_dvc_reruns_data_when_the_user_folder_changes(tmp_path):
    imgs = _tree(tmp_path / "imgs", png=True)
    repo = make_repo(tmp_path / "repo", {"data": {"source": str(imgs), "target": str(imgs)}})
    out = dvc("repro", "data", cwd=repo).stdout
    assert _ran(out) == {"inputs", "data"}
    assert "data:" not in dvc("status", "data", cwd=repo).stdout  # only `inputs: always changed`
    out = dvc("repro", "data", cwd=repo).stdout
    assert _ran(out) == {"inputs"} and "Stage 'data' didn't change" in out
    img = imgs / "train/a/0.png"
    os.utime(img)  # touch: new mtime, same bytes
    assert _ran(dvc("repro", "data", cwd=repo).stdout) == {"inputs"}
    from PIL import Image

    Image.new("L", (8, 8), 255).save(img)  # edit one image
    out = dvc("repro", "data", cwd=repo).stdout
    assert _ran(out) == {"inputs", "data"}
    index = json.loads((repo / "data/target/train/index.json").read_text())  # the prepared split holds the new bytes
    assert index["sha256"][index["name"].index("a/0.png")] == hashlib.sha256(img.read_bytes()).hexdigest()
    assert _ran(dvc("repro", "data", cwd=repo).stdout) == {"inputs"}
