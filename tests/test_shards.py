"""Prepared splits (tlcore/shards.py): written once into tar shards with an index, streamed by every reader with
the same pixels as the files have, in disjoint parts per data-parallel worker, memory flat in the split's size."""

from __future__ import annotations

import hashlib
import io
import pickle
import tarfile

import numpy as np
import pytest
import torch
from helpers import image_folder
from PIL import Image

from tlcore import data, folders, shards
from tlcore.images import decode_image


def _files(root, split="train"):
    rep = folders.list_split(root / split)
    return [(p, y, f"{rep.classes[y]}/{p.name}") for p, y in rep.files], rep.classes


@pytest.fixture
def folder(tmp_path):
    return image_folder(
        tmp_path / "imgs",
        ("a", "b", "c"),
        n_train=12,
        n_test=4,
        pixels=lambda rng, c, i: rng.integers(0, 256, (20 + i, 30, 3), dtype=np.uint8),
        suffix=lambda i: "jpg" if i % 2 else "png",
    )


def test_shards_are_webdataset_tars_and_the_index_points_at_each_images_bytes(folder, tmp_path):
    files, classes = _files(folder)
    index, bad = shards.write_split(files, classes, tmp_path / "out", max_side=64, shard_bytes=4000)
    assert bad == [] and len(index) == len(files) == 36 and len(index.shards) > 1
    assert index.counts == {"a": 12, "b": 12, "c": 12} and index.colour == 36
    members = {}
    for name in index.shards:
        with tarfile.open(tmp_path / "out" / name) as tar:
            for m in tar:
                members[m.name] = tar.extractfile(m).read()
    keys = sorted({k.split(".")[0] for k in members})
    assert len(keys) == 36 and all(f"{k}.cls" in members for k in keys)  # one image + its label per key
    for i, (f, y, name) in enumerate(files):
        assert index.name[i] == name and index.label[i] == y == int(members[f"{i:08d}.cls"])
        assert index.sha256[i] == hashlib.sha256(f.read_bytes()).hexdigest()
        stored = shards.ShardImages(tmp_path / "out", 8, 3).raw(i)
        assert stored == f.read_bytes()  # a plain PNG/JPEG under max_side is kept as it came
    # each shard is the file tarfile itself writes for its members (fixed owner, mode, time): the same bytes as
    # shards prepared before the members were made by the encoding processes
    for name in index.shards:
        with (
            tarfile.open(tmp_path / "out" / name) as tar,
            tarfile.open(tmp_path / "ref.tar", "w", format=tarfile.PAX_FORMAT) as ref,
        ):
            for m in tar:
                info = tarfile.TarInfo(m.name)
                info.size, info.mode, info.mtime = m.size, 0o644, 0
                ref.addfile(info, tar.extractfile(m))
        assert (tmp_path / "ref.tar").read_bytes() == (tmp_path / "out" / name).read_bytes()


def test_big_rotated_deep_and_transparent_images_are_stored_as_decode_image_sees_them(tmp_path):
    root = tmp_path / "imgs" / "train" / "a"
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (300, 200, 3), dtype=np.uint8)).save(root / "big.png")
    rotated = Image.fromarray(rng.integers(0, 256, (10, 20, 3), dtype=np.uint8))
    exif = rotated.getexif()
    exif[0x0112] = 6  # stored sideways: viewers turn it upright
    rotated.save(root / "rotated.jpg", exif=exif, quality=95)
    Image.fromarray((rng.integers(0, 65536, (12, 12))).astype(np.uint16)).save(root / "deep.png")
    Image.fromarray(rng.integers(0, 256, (12, 12, 4), dtype=np.uint8), "RGBA").save(root / "alpha.png")
    photo = Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)).resize((900, 600), Image.BICUBIC)
    exif = photo.getexif()
    exif[0x0112] = 6  # a camera photo stored sideways, big enough to be decoded at a reduced scale
    photo.save(root / "camera.jpg", exif=exif, quality=95)
    files, classes = _files(tmp_path / "imgs")
    index, bad = shards.write_split(files, classes, tmp_path / "out", max_side=100)
    assert bad == []
    stored = shards.ShardImages(tmp_path / "out", 1, 3)
    by_name = {n.split("/")[1]: i for i, n in enumerate(index.name)}
    big = Image.open(io.BytesIO(stored.raw(by_name["big.png"])))
    assert big.size == (100, 150) and big.format == "PNG"  # the shorter side bounded, the aspect ratio kept
    for name in ("deep.png", "alpha.png"):  # lossless sources: exactly the pixels decode_image gives the file
        got = decode_image(stored.raw(by_name[name]), "RGB")
        assert np.array_equal(got, decode_image(root / name, "RGB")), name
    upright = decode_image(stored.raw(by_name["rotated.jpg"]), "RGB")
    assert upright.shape == decode_image(root / "rotated.jpg", "RGB").shape == (20, 10, 3)
    camera = decode_image(stored.raw(by_name["camera.jpg"]), "RGB")  # upright, the shorter side bounded
    assert camera.shape == (150, 100, 3) and index.side[by_name["camera.jpg"]] == 100
    whole = decode_image(root / "camera.jpg", "RGB", size=None)
    assert whole.shape == (900, 600, 3)
    buf = io.BytesIO()  # the same picture as a full decode resized and stored
    Image.fromarray(whole).resize((100, 150), Image.BICUBIC).save(buf, "JPEG", quality=95)
    assert np.abs(camera - decode_image(buf.getvalue(), "RGB").astype(float)).mean() < 2  # of 0-255


def test_a_corrupt_file_is_reported_once_and_kept_out(folder, tmp_path):
    (folder / "train" / "a" / "broken.png").write_bytes(b"not an image")
    files, classes = _files(folder)
    index, bad = shards.write_split(files, classes, tmp_path / "out", max_side=64)
    assert [p.name for p, _ in bad] == ["broken.png"] and "not a readable image" in bad[0][1]
    assert len(index) == len(files) - 1 and "a/broken.png" not in index.name
    rep = folders.list_split(folder / "train")
    with pytest.raises(folders.DataValidationError, match="broken.png.*data.skip_corrupt"):
        folders.check_decoded(folder / "train", rep, [(p, why) for p, why in bad])
    assert len(folders.check_decoded(folder / "train", rep, bad, skip_corrupt=True).files) == len(files) - 1


def test_parallel_writing_gives_the_same_bytes_as_one_process(folder, tmp_path, monkeypatch):
    monkeypatch.setattr(shards, "SPREAD_FROM", -1)  # 36 images: start an encoding process all the same
    monkeypatch.setattr(shards, "CHUNK", 5)  # several chunks per shard, chunks across shard ends
    files, classes = _files(folder)
    broken = folder / "train" / "b" / "broken.png"
    broken.write_bytes(b"\x89PNG not really")
    files.insert(17, (broken, 1, "b/broken.png"))

    # this process and the one it starts both encode (this one alone until the other is up), in order
    tally: dict = {}
    encoded = shards._encoded(files, 64, 2, tally)
    got = [next(encoded) for _ in range(6)]  # two chunks here: then the other process is started
    tally["up"].result(timeout=120)  # the other process runs: chunks from here on are shared
    got += list(encoded)
    assert tally["here"] >= 1 and tally["others"] >= 1 and tally["here"] + tally["others"] == 8
    assert got == list(shards._encoded(files, 64, 1))

    one, bad1 = shards.write_split(files, classes, tmp_path / "one", max_side=64, shard_bytes=4000)
    done: list[int] = []  # what progress sees: one call per file, left-out ones too
    two, bad2 = shards.write_split(
        files, classes, tmp_path / "two", max_side=64, shard_bytes=4000, processes=3, progress=done.append
    )
    assert done == list(range(1, len(files) + 1))
    assert one == two and len(one) == 36 and bad1 == bad2 and [p for p, _ in bad2] == [broken]
    members = []
    for name in one.shards:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()
        with tarfile.open(tmp_path / "two" / name) as tar:
            members += [m.name.split(".")[0] for m in tar if not m.name.endswith(".cls")]
    # keys are the files' places in the list: the broken file's (17) is left out, the next is 18
    assert members == [f"{i:08d}" for i in range(37) if i != 17]


def test_closing_the_encoder_early_stops_its_processes(folder, monkeypatch):
    """A split that fails while its shards are written (a full disk) closes the encoding processes' results:
    they stop, none is left behind."""
    import multiprocessing

    monkeypatch.setattr(shards, "SPREAD_FROM", -1)
    monkeypatch.setattr(shards, "CHUNK", 1)
    files, _ = _files(folder)
    encoded = shards._encoded(files, 64, 2)
    assert all(isinstance(next(encoded), tuple) for _ in range(2))  # two chunks here: the other process starts
    assert multiprocessing.active_children()
    encoded.close()
    assert multiprocessing.active_children() == []


def test_an_encoding_process_that_dies_leaves_its_chunks_to_the_writer(folder, monkeypatch):
    """Killed (out of memory, by an operator): the split is still whole and in order, encoded here instead."""
    import multiprocessing
    import os
    import signal

    monkeypatch.setattr(shards, "SPREAD_FROM", -1)
    monkeypatch.setattr(shards, "CHUNK", 1)
    files, _ = _files(folder)
    tally: dict = {}
    encoded = shards._encoded(files, 64, 2, tally)
    got = [next(encoded) for _ in range(2)]
    tally["up"].result(timeout=120)
    got.append(next(encoded))  # chunks given to the other process now
    for p in multiprocessing.active_children():
        os.kill(p.pid, signal.SIGKILL)
        p.join()
    got += list(encoded)
    assert got == list(shards._encoded(files, 64, 1)) and len(got) == len(files)
    assert multiprocessing.active_children() == []


def test_reading_a_stored_image_gives_decode_images_pixels_and_anything_else_takes_its_rules(tmp_path, monkeypatch):
    """A stored image (upright, 8-bit grey or RGB, opaque PNG or JPEG) is decoded directly (torchvision's
    decoders), to the pixels decode_image (PIL) gives its bytes, in both modes and at any size and resize; bytes
    that are not what the writer stores (a shard changed since: rotated by EXIF, transparent, 16-bit, a palette)
    still get decode_image's rules. JPEG: baseline, progressive, 4:4:4, 4:2:2, 4:2:0 and grey; PNG: interlaced too."""
    root = tmp_path / "imgs" / "train" / "a"
    root.mkdir(parents=True)
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)).save(root / "rgb.jpg", quality=90)
    Image.fromarray(rng.integers(0, 256, (24, 24), dtype=np.uint8)).save(root / "grey.png")
    Image.fromarray(rng.integers(0, 256, (30, 50, 3), dtype=np.uint8)).save(root / "wide.png")
    smooth = np.clip(np.add.outer(np.arange(33), np.arange(27))[..., None] * (3, 5, 7) % 256, 0, 255).astype(np.uint8)
    Image.fromarray(smooth).save(root / "progressive.jpg", progressive=True, quality=80)
    Image.fromarray(smooth).save(root / "full-chroma.jpg", subsampling=0, quality=97)
    Image.fromarray(smooth).save(root / "half-chroma.jpg", subsampling=1, quality=85)  # 4:2:2
    Image.fromarray(smooth[..., 1]).save(root / "grey.jpg")
    Image.fromarray(smooth).save(root / "interlaced.png", interlace=1)  # Adam7
    Image.fromarray(smooth[..., 0] // 16, "L").convert("P").save(root / "palette.png")
    files, classes = _files(tmp_path / "imgs")
    index, _ = shards.write_split(files, classes, tmp_path / "out", max_side=512)
    for size, resize, channels in ((24, None, 3), (16, 20, 1), (30, 30, 3), (33, None, 3), (64, 64, 3)):
        images = shards.ShardImages(tmp_path / "out", size, channels, resize)
        for i in range(len(index)):
            want = decode_image(images.raw(i), "L" if channels == 1 else "RGB", size, resize)
            assert np.array_equal(images.decode(i), want), (index.name[i], size, resize, channels)
    rotated = Image.fromarray(rng.integers(0, 256, (10, 20, 3), dtype=np.uint8))
    exif = rotated.getexif()
    exif[0x0112] = 6
    odd = {"rotated": io.BytesIO(), "alpha": io.BytesIO(), "deep": io.BytesIO(), "palette": io.BytesIO()}
    rotated.save(odd["rotated"], "JPEG", exif=exif)
    Image.fromarray(rng.integers(0, 256, (12, 12, 4), dtype=np.uint8), "RGBA").save(odd["alpha"], "PNG")
    Image.fromarray(rng.integers(0, 65536, (12, 12)).astype(np.uint16)).save(odd["deep"], "PNG")
    Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).convert("P").save(odd["palette"], "PNG")
    images = shards.ShardImages(tmp_path / "out", 12, 3)
    for raw in (b.getvalue() for b in odd.values()):
        monkeypatch.setattr(shards.ShardImages, "raw", lambda self, i, raw=raw: raw)
        assert np.array_equal(images.decode(0), decode_image(raw, "RGB", 12))


def test_streamed_and_in_memory_splits_hold_the_same_pixels_and_labels(folder, tmp_path):
    files, classes = _files(folder)
    shards.write_split(files, classes, tmp_path / "out", max_side=64)
    held = data.open_split(tmp_path / "out", 16, 3)
    streamed = data.open_split(tmp_path / "out", 16, 3, memory_bytes=0)
    assert not held.streamed and streamed.streamed and held.classes == streamed.classes == list(classes)
    assert torch.equal(held.targets, streamed.targets)
    assert torch.equal(held.images, streamed.images[torch.arange(len(streamed))])
    sub = streamed.subset([5, 1, 30])
    assert sub.streamed and torch.equal(sub.images[torch.arange(3)], held.images[[5, 1, 30]])
    f, y, _ = files[7]
    want = torch.from_numpy(decode_image(f, "RGB", 16)).permute(2, 0, 1)
    assert torch.equal(streamed.images[7], want)  # the pixels a user's file gives, as tl predict sees them


def test_a_streamed_split_pickles_its_index_only(tmp_path):
    sizes = {}
    for n in (20, 200):
        root = image_folder(
            tmp_path / f"n{n}",
            ("a", "b"),
            n_train=n // 2,
            n_test=1,
            pixels=lambda rng, c, i: rng.integers(0, 256, (64, 64), dtype=np.uint8),
        )
        files, classes = _files(root)
        shards.write_split(files, classes, tmp_path / f"out{n}", max_side=64)
        ds = data.open_split(tmp_path / f"out{n}", 64, 1, memory_bytes=0)
        sizes[n] = len(pickle.dumps(ds))
        assert torch.equal(pickle.loads(pickle.dumps(ds))[3][0], ds[3][0])
    # what a Ray worker is sent grows by index entries (~100 bytes an image), not by pixels (4 KB an image)
    assert sizes[200] - sizes[20] < 180 * 200


def _read_part(rank: int, split_dir: str, out: str) -> None:
    """One of 2 data-parallel workers: read its part of the split for one epoch with a loader process."""
    ds = data.open_split(split_dir, 8, 1, memory_bytes=0)
    ds.targets = torch.arange(len(ds))  # an id per image: which ones this worker read
    loader = data.make_loader(ds, 4, train=True, seed=3, num_workers=1, replicas=2, rank=rank)
    ids = [int(i) for _, y in loader for i in y]
    torch.save(torch.tensor(ids), out)


def test_two_workers_read_disjoint_parts_that_cover_the_split(tmp_path):
    root = image_folder(tmp_path / "imgs", ("a", "b"), n_train=16, n_test=1)
    files, classes = _files(root)
    shards.write_split(files, classes, tmp_path / "out", max_side=64, shard_bytes=2000)
    outs = [str(tmp_path / f"rank{r}.pt") for r in range(2)]
    torch.multiprocessing.start_processes(
        lambda r: _read_part(r, str(tmp_path / "out"), outs[r]), nprocs=2, start_method="fork"
    )
    parts = [set(torch.load(o, weights_only=True).tolist()) for o in outs]
    assert parts[0].isdisjoint(parts[1]) and parts[0] | parts[1] == set(range(32))


def test_shards_are_the_same_on_any_machine_and_an_unreadable_file_counts_as_corrupt(tmp_path):
    root = tmp_path / "imgs" / "train" / "a"
    root.mkdir(parents=True)
    for i in range(2500):
        (root / f"{i:04d}.png").write_bytes(b"x" * 10)
    files = [(p, 0, f"a/{p.name}") for p in sorted(root.iterdir())]
    # groups by size and count only, never by this machine's cores: the same shards, the same DVC hashes
    sizes = [shards._size(p) for p, _, _ in files]
    assert [len(g) for g in shards._groups(files, sizes, shards.SHARD_BYTES)] == [1000, 1000, 500]
    assert [len(g) for g in shards._groups(files, sizes, 8_000)] == [800, 800, 800, 100]  # or at the bytes
    # what one process encodes at a time: 32 small files, or fewer big ones (a camera photo alone)
    assert [len(c) for c in shards._chunks(files[:70], sizes[:70])] == [32, 32, 6]
    mib = 2**20
    assert shards._chunks(list("abcde"), [3 * mib, 10, 10, mib, mib // 2]) == [["a"], ["b", "c"], ["d"], ["e"]]
    good = image_folder(tmp_path / "ok", ("a",), n_train=2, n_test=0)
    (good / "train" / "a" / "gone.png").symlink_to(tmp_path / "nowhere.png")  # a dangling link
    listed, classes = _files(good)
    index, bad = shards.write_split(listed, classes, tmp_path / "out", max_side=64)
    assert len(index) == 2 and [(p.name, "cannot be read" in why) for p, why in bad] == [("gone.png", True)]


def test_a_class_name_that_is_not_utf8_is_stored_printable(tmp_path, project):
    import os

    import yaml

    from tasks.project.config import load_params
    from tasks.stages.data import prepare

    root = os.fsencode(tmp_path / "mine")
    for split in (b"train", b"test"):
        for cls in (b"caf\xe9", b"tea"):
            os.makedirs(os.path.join(root, split, cls))
            Image.new("L", (6, 6), 7).save(os.fsdecode(os.path.join(root, split, cls, b"0.png")))
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["data"].update(source=os.fsdecode(root), target=os.fsdecode(root))
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    manifest = prepare(load_params(project / "params.yaml"))
    assert manifest["target"]["classes"] == ["caf\\xe9", "tea"]
    json_text = (project / "data" / "target" / "train" / "index.json").read_text(encoding="utf-8")
    assert "caf\\\\xe9/0.png" in json_text  # printable, UTF-8, as every report and message shows it
