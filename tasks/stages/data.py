"""Stage ``data``: prepare each domain once, into shards that every later stage streams.

For the source and the target (an embedded dataset, rendered here, or a user's ImageFolder tree), each split
is checked (class folders, stray files, names), every image decoded once (a corrupt file stops the run, or is
skipped with ``data.skip_corrupt``) and written into WebDataset-style tar shards with an index
(:mod:`tlcore.shards`): ``<data_dir>/<role>/<split>/shard-*.tar`` and ``index.json``, on all cores when a split
would take one more than a second.
Images are kept as they came, or re-encoded with the shorter side at most :data:`MAX_SIDE` pixels. Later stages
never walk or decode the user's folder again. Writes ``<data_dir>/manifest.json``: class names, counts,
colour, and a per-split content hash (names and original bytes).
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

from tasks.modeling.hardware import local_cpus
from tasks.project.config import Params
from tasks.project.files import write_json
from tasks.project.stage import say, stage_main
from tlcore.embedded import EMBEDDED

# the shorter side of a stored image, at most: room for a random-resized crop at 448 px, a quarter of the
# bytes of a 1024 px photo
MAX_SIDE = 512
PROGRESS_EVERY = 10.0  # seconds between two progress lines while a split is prepared


class _Progress:
    """``write_split``'s progress callback: a line at most every :data:`PROGRESS_EVERY` seconds while one split
    is prepared (how far, how fast, about how long is left); a split done sooner prints none."""

    def __init__(self, what: str, total: int):
        self.what, self.total = what, total
        self.start = self.last = time.monotonic()

    def __call__(self, done: int) -> None:
        now = time.monotonic()
        if now - self.last < PROGRESS_EVERY:
            return
        self.last = now
        rate = done / max(now - self.start, 1e-9)
        say(
            f"data: {self.what}: {done:,} of {self.total:,} images ({done / self.total:.0%}), "
            f"{rate:,.0f} images/s, ~{(self.total - done) / max(rate, 1e-9):.0f} s left"
        )


def _prepare_tree(src: Path, dst: Path, skip_corrupt: bool) -> dict:
    """Shard ``src/{train,test}`` into ``dst/{train,test}`` (``dst`` replaced only when all went well);
    returns the manifest entry's splits and colour count."""
    from tlcore import folders, shards
    from tlcore.images import show_path

    reports = {"train": folders.list_split(src / "train")}
    reports["test"] = folders.list_split(src / "test", reports["train"].classes)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=dst.parent))
    try:
        splits, colour = {}, 0
        for split, rep in reports.items():
            where = show_path(src / split)
            if rep.ignored:
                say(
                    f"data: ignored {len(rep.ignored)} file(s) without an image extension in {where} "
                    f"(e.g. {show_path(rep.ignored[0].name)})"
                )
            files = [
                (
                    p,
                    y,
                    f"{show_path(rep.classes[y])}/{show_path(p.relative_to(src / split / rep.classes[y]))}",
                )
                for p, y in rep.files
            ]
            t0 = time.perf_counter()
            classes = [show_path(c) for c in rep.classes]  # a name that is not UTF-8: its odd bytes as \xNN
            index, bad = shards.write_split(
                files, classes, tmp / split, MAX_SIDE, processes=local_cpus(), progress=_Progress(split, len(files))
            )
            folders.check_decoded(src / split, rep, bad, skip_corrupt)  # raises unless skip_corrupt
            if bad:
                say(f"data: skipped {len(bad)} corrupt image(s) in {where}")
            took = time.perf_counter() - t0
            say(
                f"data: {split}: {len(index):,} images in {len(index.shards)} shard(s), "
                f"{len(index) / max(took, 1e-9):,.0f} images/s"
            )
            colour += index.colour
            splits[split] = {
                "count": len(index),
                "per_class": index.counts,
                "sha256": index.content_hash(),
                "shards": len(index.shards),
            }
        if dst.exists():
            shutil.rmtree(dst)
        tmp.rename(dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"splits": splits, "colour": colour, "classes": [show_path(c) for c in reports["train"].classes]}


def prepare(params: Params) -> dict:
    """Prepare both domains into shards; returns the manifest."""
    from tlcore import datasets
    from tlcore.images import show_path

    manifest = {}
    for role, name in (("source", params.data.source), ("target", params.data.target)):
        dst = params.path("data", role)
        dst.parent.mkdir(parents=True, exist_ok=True)
        if name in EMBEDDED:
            say(f"data: rendering embedded {name!r} -> {dst}")
            with tempfile.TemporaryDirectory(prefix=f".{role}-tree.", dir=dst.parent) as tree:
                datasets.materialize(
                    name,
                    Path(tree) / "tree",
                    seed=params.base.seed,
                    n_per_class=params.data.synth_per_class,
                    test_per_class=params.data.synth_test_per_class,
                    test_fraction=params.data.target_test_fraction,
                )
                got = _prepare_tree(Path(tree) / "tree", dst, skip_corrupt=False)
        else:
            say(f"data: preparing ImageFolder {show_path(name)} -> {dst}")
            got = _prepare_tree(Path(name).expanduser(), dst, params.data.skip_corrupt)
        colour = got["colour"]
        manifest[role] = {
            "name": name,
            "path": str(dst),
            "classes": got["classes"],
            "format": "shards",
            # 1: every image is grey (whatever its file mode), 3: some have colour; data.channels: auto follows
            # the target
            "channels": 3 if colour else 1,
            "colour_images": colour,
            "max_side": MAX_SIDE,
            "splits": got["splits"],
        }
        say(
            f"data: {role} {name}: "
            + ", ".join(f"{s} {v['count']}" for s, v in got["splits"].items())
            + (f" ({colour} in colour)" if colour else "")
        )
    manifest["same_label_space"] = manifest["source"]["classes"] == manifest["target"]["classes"]
    write_json(params.path("data", "manifest.json"), manifest)
    return manifest


if __name__ == "__main__":
    stage_main(prepare)
