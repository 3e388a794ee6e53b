"""Stage ``data``: materialise the embedded datasets or validate (and snapshot) user ImageFolder trees.

Writes ``data/source`` and ``data/target`` (DVC-tracked) and ``data/manifest.json``: class
names, counts and a per-split content hash.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from .config import EMBEDDED, Params
from .files import write_json
from .stage import say, stage_main


def _copy_user_tree(src: Path, dst: Path, skip_corrupt: bool) -> None:
    from tlcore import data

    reports = data.validate_imagefolder(src, skip_corrupt)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=dst.parent))
    try:
        for split, rep in reports.items():
            for path, y in rep.files:
                # nested folders kept; a name that is not UTF-8 is stored with its odd bytes written as \xNN
                rel = path.relative_to(src / split / rep.classes[y])
                out = tmp / split / data.show_path(rep.classes[y]) / data.show_path(rel)
                out.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, out)
            where = data.show_path(src / split)
            if rep.ignored:
                say(f"data: ignored {len(rep.ignored)} file(s) without an image extension in {where} "
                    f"(e.g. {data.show_path(rep.ignored[0].name)})")
            if rep.skipped:
                say(f"data: skipped {len(rep.skipped)} corrupt image(s) in {where}")
        if dst.exists():
            shutil.rmtree(dst)
        tmp.rename(dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def prepare(params: Params) -> dict:
    """Materialise/validate both domains; returns the manifest."""
    from tlcore import data, datasets

    manifest = {}
    for role, name in (("source", params.data.source), ("target", params.data.target)):
        dst = params.path("data", role)
        dst.parent.mkdir(parents=True, exist_ok=True)
        if name in EMBEDDED:
            say(f"data: materialising embedded {name!r} -> {dst}")
            datasets.materialize(name, dst, seed=params.base.seed, n_per_class=params.data.synth_per_class,
                                 test_per_class=params.data.synth_test_per_class,
                                 test_fraction=params.data.target_test_fraction)
        else:
            say(f"data: validating ImageFolder {data.show_path(name)} -> {dst}")
            _copy_user_tree(Path(name).expanduser(), dst, params.data.skip_corrupt)
        reports = data.validate_imagefolder(dst)
        colour = sum(r.colour for r in reports.values())
        manifest[role] = {
            "name": name, "path": str(dst), "classes": reports["train"].classes,
            # 1: every image is grey (whatever its file mode), 3: some have colour; data.channels: auto follows the target
            "channels": 3 if colour else 1, "colour_images": colour,
            "splits": {s: {"count": len(r.files), "per_class": r.counts, "sha256": data.tree_hash(dst / s)}
                       for s, r in reports.items()},
        }
        say(f"data: {role} {name}: " + ", ".join(f"{s} {v['count']}" for s, v in manifest[role]["splits"].items())
            + (f" ({colour} in colour)" if colour else ""))
    manifest["same_label_space"] = manifest["source"]["classes"] == manifest["target"]["classes"]
    write_json(params.path("data", "manifest.json"), manifest)
    return manifest


if __name__ == "__main__":
    stage_main(prepare)
