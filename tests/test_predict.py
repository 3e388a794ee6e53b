"""`tl predict` (tasks/registry.py, tasks/cli.py): streams one result per image, --top-k, --format tsv|csv|json,
unreadable files listed at the end, and the same pixels as the training data. A tiny untrained model stands in
for the registered one (no MLflow)."""
from __future__ import annotations

import csv
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from tasks import cli, registry
from tlcore import data, models

CLASSES = ["a", "b", "c"]


@pytest.fixture()
def model():
    torch.manual_seed(0)
    return models.create("smallcnn", len(CLASSES)).eval(), {"arch": "smallcnn", "in_channels": 1, "classes": CLASSES}


@pytest.fixture()
def images(tmp_path):
    """A folder as a user has it: RGBA and 16-bit files, a nested folder, a file that is not an image, a broken one."""
    d = tmp_path / "imgs"
    (d / "more").mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (20, 30, 4), dtype=np.uint8), "RGBA").save(d / "1.png")
    Image.fromarray(rng.integers(0, 65536, (16, 16), dtype=np.uint16)).save(d / "2.png")
    Image.fromarray(rng.integers(0, 256, (40, 40), dtype=np.uint8)).save(d / "more" / "3.png")
    (d / "notes.txt").write_text("not an image")
    (d / "0_broken.png").write_bytes(b"not a png")
    return d


def test_predict_agrees_with_the_training_pixels(model, images, tmp_path):
    net, meta = model
    files = [images / "1.png", images / "2.png", images / "more" / "3.png"]
    got = list(registry.classify(net, meta, files, top_k=3))
    for f in files:  # the same files as an ImageFolder, decoded as training decodes them
        (tmp_path / "tree" / "a").mkdir(parents=True, exist_ok=True)
        (tmp_path / "tree" / "a" / f.name).write_bytes(f.read_bytes())
    ds = data.load_split(tmp_path / "tree", 32, 1)
    tf = data.build_transform(models.get_spec("smallcnn"), train=False)
    with torch.no_grad():
        want = torch.softmax(net(tf(ds.images)), 1)
    for r, p in zip(got, want):
        assert [c for c, _ in r["top"]] == [CLASSES[i] for i in p.argsort(descending=True).tolist()]
        assert np.allclose([q for _, q in r["top"]], p.sort(descending=True).values.tolist(), atol=1e-5)


def test_results_stream_in_order_and_errors_do_not_stop_them(model, images):
    net, meta = model
    files = registry.image_files([images])
    gen = registry.classify(net, meta, files, batch_size=2)
    first = next(gen)
    assert first["path"].endswith("0_broken.png") and "not a readable image" in first["error"]
    assert next(gen)["path"].endswith("1.png")
    (images / "more" / "3.png").write_bytes(b"junk")  # not read yet: results come as files are read, not after all
    rest = list(gen)
    assert [r["path"].rsplit("/", 1)[1] for r in rest] == ["2.png", "3.png"] and "error" in rest[1]


def test_tl_predict_formats_top_k_and_exit_status(model, images, monkeypatch):
    monkeypatch.setattr(registry, "load_alias", lambda name, alias: model)
    run = lambda *a: CliRunner().invoke(cli.app, ["predict", str(images), "--name", "m", *a])  # noqa: E731

    r = run()
    assert r.exit_code == 1 and "1 file(s) could not be classified" in r.stderr and "0_broken.png" in r.stderr
    rows = [line.split("\t") for line in r.stdout.splitlines()]
    assert [len(x) for x in rows] == [3, 3, 3] and all(x[1] in CLASSES and 0 < float(x[2]) <= 1 for x in rows)
    assert "notes.txt" not in r.stdout + r.stderr  # a folder is searched for images only

    r = run("--format", "json", "--top-k", "2")
    objs = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(objs) == 3 and all(len(o["top_k"]) == 2 and o["top_k"][0]["class"] == o["class"] for o in objs)
    assert all(o["top_k"][0]["confidence"] >= o["top_k"][1]["confidence"] for o in objs)

    r = run("--format", "csv", "--top-k", "9")  # more than there are classes: all of them
    table = list(csv.DictReader(io.StringIO(r.stdout)))
    assert len(table) == 3 and list(table[0]) == ["path", "class", "confidence", "class_2", "confidence_2",
                                                  "class_3", "confidence_3"]
    r = CliRunner().invoke(cli.app, ["predict", str(images / "*.png"), "--name", "m", "--format", "xml"])
    assert r.exit_code == 2 and "--format 'xml'" in r.stderr
    r = CliRunner().invoke(cli.app, ["predict", str(images / "[12].png"), "--name", "m"])  # a quoted glob
    assert r.exit_code == 0 and len(r.stdout.splitlines()) == 2
