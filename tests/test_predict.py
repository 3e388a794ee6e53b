"""`tl predict` (tasks/modeling/serving.py, tasks/cli/main.py): streams one result per image, --top-k, --format
tsv|csv|json,
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

from tasks.cli import main as cli
from tasks.modeling import serving
from tasks.services import registry
from tlcore import data, models, transforms

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
    got = list(serving.classify(net, meta, files, top_k=3))
    for f in files:  # the same files as an ImageFolder, decoded as training decodes them
        (tmp_path / "tree" / "a").mkdir(parents=True, exist_ok=True)
        (tmp_path / "tree" / "a" / f.name).write_bytes(f.read_bytes())
    ds = data.load_split(tmp_path / "tree", 32, 1)
    tf = transforms.build_transform(models.get_spec("smallcnn"), train=False)
    with torch.no_grad():
        want = torch.softmax(net(tf(ds.images)), 1)
    for r, p in zip(got, want):
        assert [c for c, _ in r["top"]] == [CLASSES[i] for i in p.argsort(descending=True).tolist()]
        assert np.allclose([q for _, q in r["top"]], p.sort(descending=True).values.tolist(), atol=1e-5)


def test_results_stream_in_order_and_errors_do_not_stop_them(model, images):
    net, meta = model
    files = serving.image_files([images])
    gen = serving.classify(net, meta, files, batch_size=2)
    first = next(gen)
    assert first["path"].endswith("0_broken.png") and "not a readable image" in first["error"]
    assert next(gen)["path"].endswith("1.png")
    (images / "more" / "3.png").write_bytes(b"junk")  # not read yet: results come as files are read, not after all
    rest = list(gen)
    assert [r["path"].rsplit("/", 1)[1] for r in rest] == ["2.png", "3.png"] and "error" in rest[1]


def test_many_files_are_decoded_by_processes_in_order(model, images, tmp_path):
    """Past ``PARALLEL_FROM`` files, decoding processes read ahead: the same results, in order, an unreadable
    file in the middle reported in its place."""
    net, meta = model
    many = tmp_path / "many"
    many.mkdir()
    srcs = [images / "1.png", images / "2.png", images / "more" / "3.png"]
    for i in range(serving.PARALLEL_FROM + 6):
        (many / f"{i:03d}.png").write_bytes(srcs[i % 3].read_bytes() if i != 40 else b"not a png")
    files = sorted(many.iterdir())
    here = list(serving.classify(net, meta, files, top_k=2, workers=1))
    there = list(serving.classify(net, meta, iter(files), top_k=2, workers=2))
    assert len(here) == len(files) and [r["path"].rsplit("/", 1)[1] for r in here] == [f.name for f in files]
    assert there == here and "error" in there[40] and all("error" not in r for i, r in enumerate(there) if i != 40)


def test_tl_predict_formats_top_k_and_exit_status(model, images, monkeypatch):
    monkeypatch.setattr(serving, "load_alias", lambda name, alias: model)
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
    assert len(table) == 3 and list(table[0]) == [
        "path",
        "class",
        "confidence",
        "class_2",
        "confidence_2",
        "class_3",
        "confidence_3",
    ]
    r = CliRunner().invoke(cli.app, ["predict", str(images / "*.png"), "--name", "m", "--format", "xml"])
    assert r.exit_code == 2 and "--format 'xml'" in r.stderr
    r = CliRunner().invoke(cli.app, ["predict", str(images / "[12].png"), "--name", "m"])  # a quoted glob
    assert r.exit_code == 0 and len(r.stdout.splitlines()) == 2


def _cached_registry(tmp_path, monkeypatch, nets: dict) -> None:
    """A sqlite registry as `tl` has cached it (tasks/services/registry.py): the listing keyed by the database file's
    signature and each version's model.pt with its checksum, so nothing asks MLflow. ``nets``: version -> model;
    version 1 is the champion."""
    import os
    import time

    from tasks.modeling.checkpoints import save_checkpoint
    from tasks.project.files import file_sha256, write_json

    db = tmp_path / "mlflow.db"
    db.write_bytes(b"")
    old = time.time() - 60
    os.utime(db, (old, old))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    cache = tmp_path / registry.CACHE_DIR
    versions = {}
    for v, net in nets.items():
        f = cache / "models" / "m" / f"v{v}-run{v}" / "model.pt"
        f.parent.mkdir(parents=True)
        save_checkpoint(f, net, CLASSES, 1)
        (f.parent / "model.pt.sha256").write_text(file_sha256(f))
        versions[str(v)] = {
            "version": str(v),
            "source": f"models:/m/{v}",
            "run_id": f"run{v}",
            "sha256": file_sha256(f),
        }
    write_json(
        cache / "registry" / "m.json",
        {
            "signature": registry._signature(f"sqlite:///{db}"),
            "rows": [],
            "aliases": {"champion": versions["1"]},
            "versions": versions,
        },
    )


def test_tl_predict_model_picks_an_alias_or_a_version(model, images, tmp_path, monkeypatch):
    champion, _ = model
    torch.manual_seed(1)
    other = models.create("smallcnn", len(CLASSES)).eval()
    _cached_registry(tmp_path, monkeypatch, {1: champion, 2: other})

    def classes(*args):
        r = CliRunner().invoke(cli.app, ["predict", str(images / "[12].png"), "--name", "m", "--top-k", "3", *args])
        assert r.exit_code == 0, r.output
        return r.stdout

    default = classes()
    assert classes("--model", "m@champion") == classes("--model", "@champion") == classes("--model", "m/1") == default
    v2 = classes("--model", "m/2")
    assert v2 == classes("--model", "2") != default  # a bare version number: of --name's model
    want = list(
        serving.classify(
            other,
            {"arch": "smallcnn", "in_channels": 1, "classes": CLASSES},
            [images / "1.png", images / "2.png"],
            top_k=3,
        )
    )
    assert [line.split("\t")[1] for line in v2.splitlines()] == [w["class"] for w in want]
    for bad, says in (
        ("m/7", "m has no version 7"),
        ("m@nobody", "no version with alias 'nobody'"),
        ("m/x", "give NAME@ALIAS"),
    ):
        r = CliRunner().invoke(cli.app, ["predict", str(images / "1.png"), "--name", "m", "--model", bad])
        assert r.exit_code != 0 and says in (r.stderr + str(r.exception)), (bad, r.output, r.exception)


def test_parse_model_spec():
    assert registry.parse_model("digits@challenger", "d") == ("digits", "challenger", None)
    assert registry.parse_model("digits/3", "d") == ("digits", None, 3)
    assert registry.parse_model("3", "d") == ("d", None, 3) and registry.parse_model("@x", "d") == ("d", "x", None)
    for bad in ("digits", "digits/0", "digits/", "digits@", "a@b/2"):
        with pytest.raises(registry.RegistryError, match="NAME@ALIAS"):
            registry.parse_model(bad, "d")


def test_a_users_big_jpeg_is_decoded_shrunk_and_a_prepared_image_as_training_decodes_it(tmp_path, monkeypatch):
    """A camera photo bound for 72 px is decoded by libjpeg at a reduced scale (never under 144 px), within a grey
    level of the full decode; a prepared image's bytes (what evaluate reads) are decoded whole."""
    from tlcore import images

    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).resize((1200, 900), Image.BICUBIC)
    photo.save(tmp_path / "big.jpg", quality=90)
    seen, real = [], images.open_image
    monkeypatch.setattr(
        images, "open_image", lambda src, name, shrink_to=None: seen.append(shrink_to) or real(src, name, shrink_to)
    )
    shrunk = serving._decode(tmp_path / "big.jpg", "RGB", 64, 72, "bilinear", "big.jpg")
    whole = serving._decode((tmp_path / "big.jpg").read_bytes(), "RGB", 64, 72, "bilinear", "big.jpg")
    assert seen == [72, None] and shrunk[0] == whole[0] == "ok" and shrunk[1].shape == whole[1].shape == (64, 64, 3)
    assert np.abs(shrunk[1].astype(float) - whole[1]).mean() < 1
