"""A registered model at work: ``(model, meta)`` of a version or alias, through the registry's checked
model cache (:mod:`tasks.services.registry`), and ``tl predict``'s streaming classification of files."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from tasks.modeling.checkpoints import load_checkpoint
from tasks.modeling.model_input import spec_from_meta
from tasks.services.registry import RegistryError, model_file, snapshot
from tasks.services.tracking import public_uri, tracking_uri


def load_version(name: str, v) -> tuple:
    """``(model, meta)`` of a model version object, through the checked local model cache."""
    return load_checkpoint(
        model_file(
            name,
            {"version": str(v.version), "source": v.source, "run_id": v.run_id, "sha256": v.tags.get("model_sha256")},
        )
    )


def load_alias(name: str, alias: str = "champion"):
    """``(model, meta)`` of ``name@alias``, from the local model cache when it holds that version."""
    entry = snapshot(name)["aliases"].get(alias)
    if entry is None:
        raise RegistryError(f"{name} has no version with alias {alias!r}; see `tl models`.")
    return load_checkpoint(model_file(name, entry))


def load_model(name: str, alias: str | None = "champion", version: int | None = None):
    """``(model, meta)`` of ``name@alias`` or of version ``version`` (when given), from the checked local model
    cache when it holds that version (:func:`load_alias`)."""
    if version is None:
        return load_alias(name, alias or "champion")
    entry = snapshot(name)["versions"].get(str(version))
    if entry is None:
        raise RegistryError(f"{name} has no version {version} in {public_uri(tracking_uri())}; see `tl models`.")
    return load_checkpoint(model_file(name, entry))


@dataclass(frozen=True)
class StoredImage:
    """An image of a prepared split (the data stage's shards), read when classified: ``path`` is shown as
    ``<split dir>/<class>/<file>``; :meth:`read` returns the stored bytes."""

    path: str
    images: object  # tlcore.shards.ShardImages of the split
    i: int

    def read(self) -> bytes:
        return self.images.raw(self.i)


def _stored(split_dir: Path, cls: str | None) -> Iterator[StoredImage]:
    """The images of a prepared split (of one class only, when ``cls`` is given), lazily, in split order."""
    from tlcore.shards import ShardImages

    images = ShardImages(split_dir, 1, 1)
    labels = images.labels()
    for i in range(len(images)):
        if cls is None or images.classes[labels[i]] == cls:
            yield StoredImage(f"{split_dir}/{images.name(i)}", images, i)


def image_files(paths: list[Path]) -> Iterator[Path | StoredImage]:
    """The files to classify, lazily: a file as given; a folder searched recursively (sorted; image extensions
    only, hidden names skipped); a pattern with ``*``, ``?`` or ``[`` (quoted, so the shell left it) as a glob
    (``**`` spans folders); a prepared split (``data/target/test``, the data stage's shards), or one class of it
    (``data/target/test/3``), read from its shards. Every path is checked before the first is yielded."""
    import glob

    from tlcore.images import IMG_EXTENSIONS
    from tlcore.shards import SplitIndex, is_prepared

    kinds = []
    for p in paths:
        if is_prepared(p):
            kinds.append((p, "split"))
        elif not p.exists() and is_prepared(p.parent) and p.name in SplitIndex.load(p.parent).classes:
            kinds.append((p, "class"))
        elif p.is_dir() or p.is_file():
            kinds.append((p, None))
        elif any(c in str(p) for c in "*?["):
            kinds.append((p, sorted(glob.glob(str(p), recursive=True))))
        else:
            raise RegistryError(
                f"{p} does not exist; pass image files, folders of images or a quoted glob ('imgs/*.png')."
            )
    for p, matches in kinds:
        if matches in ("split", "class"):
            yield from _stored(p if matches == "split" else p.parent, None if matches == "split" else p.name)
            continue
        for f in matches if matches is not None else [p]:
            f = Path(f)
            if f.is_dir():
                for dirpath, dirnames, filenames in os.walk(f):
                    dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                    yield from (
                        Path(dirpath, n)
                        for n in sorted(filenames)
                        if not n.startswith(".") and Path(n).suffix.lower() in IMG_EXTENSIONS
                    )
            else:
                yield f


PARALLEL_FROM = 64  # images: fewer are decoded here, faster than starting decoding processes


def _decode(src, mode: str, size: int, resize: int | None, interpolation: str, name: str):
    """``("ok", pixels)`` or ``("error", why)`` of one image: runs in a decoding process. A user's file (not a
    prepared image's bytes, decoded as training decodes them) may be decoded shrunk (a big JPEG: ``decode_image``'s
    ``shrink``)."""
    from tlcore.images import ImageDecodeError, decode_image

    try:
        return "ok", decode_image(src, mode, size, resize, interpolation, name=name, shrink=not isinstance(src, bytes))
    except ImageDecodeError as e:
        return "error", str(e)


def _decoded(items: Iterator, decode, workers: int) -> Iterator[tuple]:
    """``(item, result of decode(item))`` in order. With more than :data:`PARALLEL_FROM` items and ``workers`` > 1,
    decoded by ``workers`` processes, at most ``4 x workers`` images ahead (memory flat in the number of files)."""
    import collections
    import itertools
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    head = list(itertools.islice(items, PARALLEL_FROM))
    if len(head) < PARALLEL_FROM or workers < 2:
        for f in itertools.chain(head, items):
            yield f, decode(f)
        return
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
        ahead: collections.deque = collections.deque()
        for f in itertools.chain(head, items):
            ahead.append((f, pool.submit(*decode.job(f))))
            if len(ahead) >= 4 * workers:
                g, fut = ahead.popleft()
                yield g, fut.result()
        while ahead:
            g, fut = ahead.popleft()
            yield g, fut.result()


def classify(
    model, meta: dict, files: Iterable[Path], top_k: int = 1, batch_size: int = 16, workers: int | None = None
) -> Iterator[dict]:
    """Classify ``files`` as they come, ``batch_size`` at a time, in order; yields per file ``{"path", "class",
    "confidence", "top": [(class, probability), ...]}`` (``top_k`` long), or ``{"path", "error"}`` for a file
    that does not decode. Pixels come from :func:`tlcore.images.decode_image`, as the training data's do, decoded
    by ``workers`` processes (default :func:`tlcore.data.decode_workers`) beside the model when there are many."""
    import torch

    from tlcore import transforms
    from tlcore.data import decode_workers
    from tlcore.images import show_path

    spec = spec_from_meta(meta)  # size, crop and normalisation as the model was trained with
    tf = transforms.build_transform(spec, train=False, channels=meta["in_channels"])
    mode, classes = ("L" if meta["in_channels"] == 1 else "RGB"), meta["classes"]
    k = max(1, min(top_k, len(classes)))
    model.eval()

    def run(batch: list) -> Iterator[dict]:
        xs = [x for _, x in batch if x is not None]
        if xs:
            with torch.no_grad():
                probs = torch.softmax(model(tf(torch.stack(xs))).float(), dim=1)
            conf, idx = probs.topk(k, dim=1)
            rows = iter(zip(conf.tolist(), idx.tolist()))
        for f, x in batch:
            if x is None:
                continue
            c, i = next(rows)
            top = [(classes[j], p) for p, j in zip(c, i)]
            yield {"path": shown(f), "class": top[0][0], "confidence": top[0][1], "top": top}

    def shown(f) -> str:
        return f.path if isinstance(f, StoredImage) else show_path(f)

    class Decode:
        """One image's decoding, here (a call) or in a decoding process (:meth:`job`)."""

        def job(self, f) -> tuple:
            src = f.read() if isinstance(f, StoredImage) else f  # a stored image's bytes travel, not its reader
            return _decode, src, mode, spec.input_size, spec.resize_size, spec.interpolation, shown(f)

        def __call__(self, f):
            fn, *args = self.job(f)
            return fn(*args)

    batch: list = []
    for f, (status, px) in _decoded(iter(files), Decode(), decode_workers() if workers is None else workers):
        if status == "error":
            yield from run(batch)  # keep the order: what came before, then this file's error
            batch = []
            yield {"path": shown(f), "error": px}
            continue
        batch.append((f, torch.from_numpy(px).permute(2, 0, 1)))
        if len(batch) == batch_size:
            yield from run(batch)
            batch = []
    yield from run(batch)


def predict(
    paths: list[Path], name: str, alias: str | None = "champion", top_k: int = 1, version: int | None = None
) -> Iterator[dict]:
    """Classify image files, folders (recursively) or globs with the registered model ``name@alias`` (or its
    version ``version``), streaming one result per file (see :func:`classify`)."""
    import itertools

    from tlcore.images import IMG_EXTENSIONS

    files = image_files(paths)
    first = next(files, None)
    if first is None:
        raise RegistryError(f"no images found in {', '.join(map(str, paths))} ({', '.join(sorted(IMG_EXTENSIONS))}).")
    model, meta = load_model(name, alias, version)
    return classify(model, meta, itertools.chain([first], files), top_k)
