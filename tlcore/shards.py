"""A prepared split: the images of an ImageFolder split written once into WebDataset-style tar shards, with an
index, so that training and evaluation read (and decode) each image where it lies instead of holding the split.

Layout of a prepared split directory::

    shard-000000.tar   members <key>.png|<key>.jpg (the image) and <key>.cls (its label), key = 8 digits
    shard-000001.tar   ... at most ``shard_bytes`` (256 MiB) or 1,000 images each
    index.json         classes, shard names, and per image: shard, byte offset and length of the image member,
                       label, the SHA-256 of the original file, its name (``<class>/<relative path>``) and the stored
                       image's shorter side in pixels

Each image is decoded once while preparing (so a file that does not decode is found here, once) and stored
as it came when that loses nothing, else re-encoded at a bounded resolution: the shorter side at most
``max_side`` pixels, EXIF orientation, bit depth and transparency resolved as :func:`tlcore.images.decode_image`
resolves them (PNG for lossless sources, JPEG quality 95 for lossy ones). All cores decode and encode the
images of a split that would take one more than :data:`SPREAD_FROM` seconds, in small chunks, and make their tar
members; the process writing the split encodes too, and appends every member to the shards, in order. The tar
headers are fixed (no times, owners), so the same inputs give the same bytes, and DVC stores a shard once.

Reading (:class:`ShardImages`) needs only the index's arrays in memory: an image is one ``pread`` of its bytes and
one decode, in whichever process asks (a DataLoader's worker processes decode in parallel). Any tar reader (the
``webdataset`` package, Ray Data's ``read_webdataset``) reads the shards too.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import itertools
import json
import os
import tarfile
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from PIL import Image

from .images import ImageDecodeError, has_colour, is_grey, open_image, show_path, to_pixels

INDEX = "index.json"
SHARD_BYTES = 256 * 2**20
SHARD_IMAGES = 1000  # at most, per shard
# a process's job: consecutive files, at most CHUNK of them and, past the first, at most CHUNK_BYTES of them on disk
# (~20 ms of 10 KB thumbnails; a 4 MB camera photo, ~0.1 s, alone): small, so that every process stays busy to the
# split's end
CHUNK = 32
CHUNK_BYTES = 2**20
AHEAD = 4  # chunks per process encoded ahead of the writer, at most, and at most 64 in all (memory)
QUEUED = 2  # chunks given to each other process at a time: it never waits for the writer, nor the writer long for it
BLOCK = tarfile.BLOCKSIZE
# seconds of encoding left, as this process measures it, from which other processes are started to share it (one
# takes ~0.3 s of a core to start; this process goes on encoding meanwhile): a small split never starts any
SPREAD_FROM = 1.0
KEEP_FORMATS = {"PNG": "png", "JPEG": "jpg"}
LOSSY_FORMATS = ("JPEG", "MPO", "WEBP")


@dataclass
class SplitIndex:
    """What a prepared split holds (``index.json``); the columns are parallel lists, one entry per image."""

    classes: list[str]
    shards: list[str]
    shard: list[int] = field(default_factory=list)
    offset: list[int] = field(default_factory=list)
    length: list[int] = field(default_factory=list)
    label: list[int] = field(default_factory=list)
    sha256: list[str] = field(default_factory=list)
    name: list[str] = field(default_factory=list)
    side: list[int] = field(default_factory=list)  # the stored image's shorter side, pixels (empty: not recorded)
    colour: int = 0  # images with colour (the others are grey, whatever their file mode)
    max_side: int = 0

    def __len__(self) -> int:
        return len(self.label)

    @property
    def counts(self) -> dict[str, int]:
        c = dict.fromkeys(self.classes, 0)
        for y in self.label:
            c[self.classes[y]] += 1
        return c

    def content_hash(self) -> str:
        """SHA-256 of the split's names and original bytes, independent of how it was sharded."""
        h = hashlib.sha256()
        for name, sha in sorted(zip(self.name, self.sha256)):
            h.update(name.encode("utf-8", "backslashreplace") + b"\0" + bytes.fromhex(sha))
        return h.hexdigest()

    def save(self, split_dir: Path) -> None:
        tmp = Path(split_dir) / (INDEX + ".tmp")
        tmp.write_text(json.dumps(asdict(self), separators=(",", ":")))
        tmp.replace(Path(split_dir) / INDEX)

    @classmethod
    def load(cls, split_dir: str | Path) -> SplitIndex:
        f = Path(split_dir) / INDEX
        if not f.is_file():
            raise FileNotFoundError(
                f"{show_path(f)} does not exist: {show_path(split_dir)} is not a prepared split; "
                f"run the data stage (`dvc repro data` or `tl run`) first."
            )
        return cls(**json.loads(f.read_text()))


def is_prepared(split_dir: str | Path) -> bool:
    return (Path(split_dir) / INDEX).is_file()


# ------------------------------------------------------------------------------------------------ writing


def _encode(path: Path, name: str, max_side: int) -> tuple[bytes, str, bool, str, int]:
    """``(bytes to store, extension, has colour, SHA-256 of the file, the stored image's shorter side)`` of one
    image file; :class:`ImageDecodeError` if it does not decode."""
    raw = path.read_bytes()
    # decoded whole (a big JPEG at a reduced scale, never under 2x max_side) or refused; EXIF orientation applied
    stored: dict = {}  # the file as it is, before any change
    im = open_image(raw, name, shrink_to=max_side, as_stored=stored)
    fmt = stored["format"]
    plain = (
        fmt in KEEP_FORMATS
        and stored["mode"] in ("L", "RGB")
        and not stored["transparency"]
        and stored["orientation"] == 1
        and min(stored["size"]) <= max_side
    )
    sha = hashlib.sha256(raw).hexdigest()
    if plain:
        return raw, KEEP_FORMATS[fmt], has_colour(im), sha, min(im.size)
    rgb = to_pixels(im, "RGB", name=name)
    colour = not is_grey(rgb)
    out = Image.fromarray(rgb if colour else np.ascontiguousarray(rgb[..., 0]), "RGB" if colour else "L")
    w, h = out.size
    if min(w, h) > max_side:
        s = max_side / min(w, h)
        out = out.resize((max(1, round(w * s)), max(1, round(h * s))), Image.BICUBIC)
    buf = io.BytesIO()
    if fmt in LOSSY_FORMATS:
        out.save(buf, "JPEG", quality=95)
        return buf.getvalue(), "jpg", colour, sha, min(out.size)
    out.save(buf, "PNG")
    return buf.getvalue(), "png", colour, sha, min(out.size)


def _member(name: str, data: bytes) -> bytes:
    """One tar member as ``tarfile`` writes it in a PAX archive (header, data, zero padding to a block): fixed
    owner, mode and time, so the same member has the same bytes anywhere. Nothing in it depends on where in the
    archive it goes, so the encoding processes make the members and the writer only appends them."""
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o644, 0
    return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape") + data + tarfile.NUL * (-len(data) % BLOCK)


def _encode_chunk(
    items: list[tuple[int, str, int, str]], max_side: int, max_pixels: int | None | str = "as is"
) -> list[tuple[bytes, int, int, bool, str, int] | str]:
    """The tar members of each ``(key, file, label, name)``: ``(the image's and its label's members, where the
    image's bytes start in them, their length, has colour, SHA-256 of the file, the stored shorter side)``, or why
    the file did not decode (a string). Runs in any encoding process; ``max_pixels``, PIL's decompression-bomb
    limit as the writing process has it (None: none), is set here first."""
    if max_pixels != "as is":
        Image.MAX_IMAGE_PIXELS = max_pixels
    out = []
    for key, f, y, name in items:
        try:
            data, ext, colour, sha, side = _encode(Path(f), name, max_side)
        except ImageDecodeError as e:
            out.append(str(e))
            continue
        except OSError as e:  # gone, unreadable, a dangling link: corrupt as far as the data goes
            out.append(f"{name}: cannot be read ({e.strerror or e})")
            continue
        image = _member(f"{key:08d}.{ext}", data)
        at = len(image) - len(data) - (-len(data) % BLOCK)
        out.append((image + _member(f"{key:08d}.cls", str(y).encode()), at, len(data), colour, sha, side))
    return out


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0  # unreadable: reported when it is encoded


def _runs(items: list, sizes: list[int], most: int, most_bytes: int) -> list[list]:
    """``items`` cut into consecutive runs of at most ``most`` items and, past the first item of each, at most
    ``most_bytes`` by ``sizes``: a shard's images (:func:`_groups`), or a process's job (:func:`_chunks`)."""
    runs: list[list] = []
    size = 0
    for item, n in zip(items, sizes, strict=True):
        if not runs or len(runs[-1]) >= most or size + n > most_bytes:
            runs.append([])
            size = 0
        runs[-1].append(item)
        size += n
    return runs


def _chunks(items: list, sizes: list[int]) -> list[list]:
    """A process's jobs: at most :data:`CHUNK` items and, past the first, :data:`CHUNK_BYTES` by ``sizes``."""
    return _runs(items, sizes, CHUNK, CHUNK_BYTES)


def _jobs(files: list[tuple[Path, int, str]], sizes: list[int]) -> list[list[tuple[int, str, int, str]]]:
    """``files`` as the encoding processes take them: ``(key, file, label, name)`` (the key: the file's place in
    ``files``), in :func:`_chunks` by ``sizes``."""
    return _chunks([(k, str(p), y, name) for k, (p, y, name) in enumerate(files)], sizes)


def _here(chunk: list, *args) -> Future:
    """A chunk encoded in this process, as a done Future: its results, or what it raised, in its turn."""
    f: Future = Future()
    try:
        f.set_result(_encode_chunk(chunk, *args))
    except Exception as e:  # raised when the consumer reaches this chunk, as one process would
        f.set_exception(e)
    return f


def _encoded(
    files: list[tuple[Path, int, str]],
    max_side: int,
    processes: int,
    tally: dict | None = None,
    sizes: list[int] | None = None,
) -> Iterator:
    """:func:`_encode_chunk`'s results for ``files``, one per file, in order, keyed by their place in ``files``.

    This process encodes the files in chunks (:func:`_chunks`, by ``sizes`` on disk, each file's if not given), in
    order, as the consumer asks for them. When its own pace (from its second chunk on: the first carries one-time
    costs) leaves more than :data:`SPREAD_FROM` seconds of work, it starts ``processes - 1`` spawned processes.
    Once one is up they hold up to :data:`QUEUED` chunks each, and this process encodes the next chunk itself
    whenever the one due is not back yet. Nothing waits for a process to start, the writer's core encodes too,
    and a process that fails to start or dies leaves its chunks to this one. At most :data:`AHEAD` chunks per
    process (64 in all) are held ahead of the consumer: memory is bounded whatever the split's size. ``tally``
    (if given) counts the chunks encoded ``"here"`` and by the ``"others"``, and holds ``"up"``, done once another
    process runs (None while none is started)."""
    processes = max(1, processes)
    chunks = _jobs(files, sizes if sizes is not None else [_size(p) for p, _, _ in files])
    todo = iter(chunks)
    ahead: deque[tuple[Future, list]] = deque()  # per chunk, in order: its Future (done at once if encoded here)
    tally = {} if tally is None else tally
    tally.update(here=0, others=0, up=None)
    args = (max_side, Image.MAX_IMAGE_PIXELS)  # a spawned process starts with PIL's default limit
    window, pool, up, finished = min(AHEAD * processes, 64), None, None, False
    files_here, since = 0, 0.0  # files encoded here, and when the first chunk was
    try:
        while True:
            if pool is None and processes > 1 and tally["here"] >= 2:
                timed = files_here - len(chunks[0])
                left = (len(files) - files_here) * (time.perf_counter() - since) / timed
                if left > SPREAD_FROM:
                    pool = ProcessPoolExecutor(processes - 1, mp_context=get_context("spawn"))
                    # done once a process runs: until then this one encodes alone
                    up = tally["up"] = pool.submit(os.getpid)
            if up is not None and up.done():
                if up.exception() is not None:  # no process could start: this one encodes alone
                    up = None
                given = sum(not f.done() for f, _ in ahead)  # only another process's can be pending
                while up is not None and given < QUEUED * (processes - 1) and len(ahead) < window:
                    if (c := next(todo, None)) is None:
                        break
                    try:
                        ahead.append((pool.submit(_encode_chunk, c, *args), c))
                        tally["others"] += 1
                        given += 1
                    except BrokenProcessPool:  # its process died since: this chunk and the rest are encoded here
                        todo, up = itertools.chain([c], todo), None
            if ahead and ahead[0][0].done():
                f, c = ahead.popleft()
                try:
                    got = f.result()
                except BrokenProcessPool:  # its process died (killed, out of memory): encoded here instead
                    got, up = _encode_chunk(c, *args), None
                yield from got
            elif len(ahead) < window and (c := next(todo, None)) is not None:
                ahead.append((_here(c, *args), c))
                tally["here"] += 1
                files_here += len(c)
                since = since or time.perf_counter()
            elif ahead:
                wait([ahead[0][0]])  # the one due is another process's, and the window is full or all given out
            else:
                finished = True
                return
    finally:
        if pool is not None:
            # failed or closed by the consumer: encode no more, and leave no process behind; done before any
            # process came up: none holds a chunk, so the writer does not wait for one to start
            started = tally["up"].done()
            pool.shutdown(wait=started or not finished, cancel_futures=True)


def _write_shard(path: Path, items: list, encoded: Iterator) -> dict:
    """Write one shard of ``items`` (file, label, name), appending each one's members from ``encoded``
    (:func:`_encode_chunk`), then the end of the archive as ``tarfile`` closes one; returns its index rows and the
    files that did not decode."""
    rows, bad, colour, pos = [], [], 0, 0
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as out:
        for f, y, name in items:
            got = next(encoded)
            if isinstance(got, str):
                bad.append((Path(f), got))
                continue
            members, at, length, c, sha, side = got
            out.write(members)
            rows.append({"offset": pos + at, "length": length, "label": y, "name": name, "sha256": sha, "side": side})
            colour += c
            pos += len(members)
        end = pos + 2 * BLOCK  # two zero blocks, then zeros to a whole record (tar -b20)
        out.write(tarfile.NUL * (2 * BLOCK + (-end % tarfile.RECORDSIZE)))
    os.replace(tmp, path)
    return {"rows": rows, "bad": bad, "colour": colour}


def _counted(encoded: Iterator, progress: Callable[[int], None]) -> Iterator:
    """``encoded``, calling ``progress`` with the count of items taken from it so far as each one is taken."""
    for done, got in enumerate(encoded, 1):
        progress(done)
        yield got


def _groups(
    files: list[tuple[Path, int, str]], sizes: list[int], shard_bytes: int
) -> list[list[tuple[Path, int, str]]]:
    """Consecutive files in groups of at most ``shard_bytes`` (by their ``sizes`` on disk) and :data:`SHARD_IMAGES`
    images: the same groups on any machine."""
    return _runs(files, sizes, SHARD_IMAGES, shard_bytes)


def write_split(
    files: list[tuple[Path, int, str]],
    classes: list[str],
    split_dir: str | Path,
    max_side: int,
    processes: int = 1,
    shard_bytes: int = SHARD_BYTES,
    progress: Callable[[int], None] | None = None,
) -> tuple[SplitIndex, list]:
    """Prepare one split into ``split_dir`` (created empty): ``files`` are ``(path, label, name)`` in order,
    encoded by ``processes`` processes; ``progress(done)``, if given, is called as each file comes to be written
    (or left out). Returns the index and ``[(path, why), ...]`` of the files that did not decode (left out)."""
    split_dir = Path(split_dir)
    split_dir.mkdir(parents=True, exist_ok=False)
    sizes = [_size(p) for p, _, _ in files]
    groups = _groups(files, sizes, shard_bytes)
    names = [f"shard-{i:06d}.tar" for i in range(len(groups))]
    with contextlib.closing(_encoded(files, max_side, processes, sizes=sizes)) as encoded:  # closed: processes stop
        counted = _counted(encoded, progress) if progress is not None else encoded
        results = [_write_shard(split_dir / name, group, counted) for name, group in zip(names, groups)]
    index, bad = SplitIndex(classes=list(classes), shards=names, max_side=max_side), []
    for s, res in enumerate(results):
        bad += res["bad"]
        index.colour += res["colour"]
        for r in res["rows"]:
            index.shard.append(s)
            for k in ("offset", "length", "label", "sha256", "name", "side"):
                getattr(index, k).append(r[k])
    index.save(split_dir)
    return index, bad


# ------------------------------------------------------------------------------------------------ reading

_FDS: OrderedDict[str, int] = OrderedDict()  # this process's open shards, least recently used first
_FDS_PID = [os.getpid()]
MAX_OPEN = 64


def _fd(path: str) -> int:
    """A read-only descriptor of ``path``, shared by every reader in this process; at most :data:`MAX_OPEN` stay
    open (the least recently used is closed). A forked process opens its own."""
    if _FDS_PID[0] != os.getpid():
        _FDS.clear()  # the parent's: not ours to close
        _FDS_PID[0] = os.getpid()
    fd = _FDS.get(path)
    if fd is not None:
        _FDS.move_to_end(path)
        return fd
    fd = _FDS[path] = os.open(path, os.O_RDONLY)
    while len(_FDS) > MAX_OPEN:
        os.close(_FDS.popitem(last=False)[1])
    return fd


@dataclass(frozen=True, eq=False)
class _Columns:
    """The index columns a reader needs, as arrays (names and hashes stay on disk)."""

    shards: list[str]
    classes: list[str]
    shard: np.ndarray
    offset: np.ndarray
    length: np.ndarray
    label: np.ndarray
    side: np.ndarray  # empty for a split prepared before sides were recorded

    @classmethod
    def load(cls, split_dir: Path) -> _Columns:
        ix = SplitIndex.load(split_dir)
        return cls(
            ix.shards,
            ix.classes,
            np.asarray(ix.shard, dtype=np.int32),
            np.asarray(ix.offset, dtype=np.int64),
            np.asarray(ix.length, dtype=np.int64),
            np.asarray(ix.label, dtype=np.int64),
            np.asarray(ix.side, dtype=np.int32),
        )


class ShardImages:
    """The images of a prepared split as a read-only array ``(N, C, size, size)`` of uint8 that decodes on
    access: ``images[i]`` one image, ``images[LongTensor]`` or ``images[a:b]`` a batch, :meth:`take` a view of
    some rows (no pixels copied). Holds the index's arrays only (~30 bytes an image); files are opened per process,
    shared by all readers in it."""

    def __init__(
        self,
        split_dir: str | Path,
        size: int,
        channels: int,
        resize: int | None = None,
        interpolation: str = "bilinear",
        rows: np.ndarray | None = None,
        columns: _Columns | None = None,
    ):
        # absolute: a Ray Train worker runs in a folder of its own
        self.split_dir, self.size, self.channels = Path(split_dir).resolve(), size, channels
        self.resize, self.interpolation = resize, interpolation
        self.columns = columns or _Columns.load(self.split_dir)
        n = len(self.columns.label)
        self.rows = np.arange(n, dtype=np.int64) if rows is None else np.asarray(rows, dtype=np.int64)

    @property
    def classes(self) -> list[str]:
        return list(self.columns.classes)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self.rows), self.channels, self.size, self.size)

    def __len__(self) -> int:
        return len(self.rows)

    def labels(self) -> np.ndarray:
        return self.columns.label[self.rows]

    def stored_side(self) -> int | None:
        """The median shorter side of these images as stored, in pixels (what a canvas can hold without
        upsampling most of them); ``None`` if the index does not record it."""
        side = self.columns.side
        return int(np.median(side[self.rows])) if len(side) and len(self.rows) else None

    def take(self, idx) -> ShardImages:
        return ShardImages(
            self.split_dir,
            self.size,
            self.channels,
            self.resize,
            self.interpolation,
            self.rows[np.asarray(idx, dtype=np.int64)],
            self.columns,
        )

    def raw(self, i: int) -> bytes:
        """The stored bytes of image ``i`` (of this view)."""
        c, r = self.columns, int(self.rows[i])
        path = str(self.split_dir / c.shards[int(c.shard[r])])
        want = int(c.length[r])
        got = os.pread(_fd(path), want, int(c.offset[r]))
        if len(got) != want:
            raise OSError(
                f"{path} is shorter than its index says (image {r}: {len(got)} of {want} bytes at "
                f"{int(c.offset[r])}); the shard is truncated: run the data stage again (or `dvc pull`)."
            )
        return got

    def name(self, i: int) -> str:
        """The original file's name (``<class>/<path>``) of image ``i``: read from the index on disk."""
        return _names(str(self.split_dir))[int(self.rows[i])]

    def decode(self, i: int) -> np.ndarray:
        """Image ``i``'s pixels ``(size, size, C)``, by :func:`tlcore.images.decode_image`'s rules. What the writer
        stores is already upright, 8-bit grey or RGB, opaque, PNG or JPEG: that is decoded directly, by
        torchvision's decoders (:func:`_decode_stored`; resized by PIL as the general path resizes), since the
        general path's EXIF, bit-depth and alpha steps would change nothing. Anything else (a shard changed since)
        takes the general path."""
        raw = self.raw(i)
        mode = "L" if self.channels == 1 else "RGB"
        px = _decode_stored(raw, self.channels)
        if px is not None:
            if px.shape[:2] == (self.size, self.size) and self.resize in (None, self.size):
                return px
            im = Image.fromarray(px[..., 0] if self.channels == 1 else px, mode)
            return to_pixels(im, mode, self.size, self.resize, self.interpolation)
        try:
            return to_pixels(open_image(raw, "image"), mode, self.size, self.resize, self.interpolation)
        except ImageDecodeError as e:  # decoded once when prepared: the shard changed since; name the file
            raise ImageDecodeError(self.name(i) + str(e).removeprefix("image")) from None

    def __getitem__(self, i):
        import torch

        if isinstance(i, (int, np.integer)) or (hasattr(i, "dim") and i.dim() == 0):
            return torch.from_numpy(self.decode(int(i))).permute(2, 0, 1).contiguous()
        idx = np.arange(len(self))[i] if isinstance(i, slice) else np.asarray(i, dtype=np.int64).reshape(-1)
        out = np.empty((len(idx), self.size, self.size, self.channels), dtype=np.uint8)
        for k, j in enumerate(idx):
            out[k] = self.decode(int(j))
        return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


_PNG, _JPEG = b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff"


def _decode_stored(raw: bytes, channels: int) -> np.ndarray | None:
    """``(H, W, channels)`` uint8 pixels of an image as the writer stores it (PNG or JPEG, 8-bit grey or RGB, no
    transparency, no EXIF or XMP orientation, not a palette), decoded by torchvision (libpng, libjpeg-turbo: the
    same pixels as PIL's decoders, a 256 px JPEG in a third of PIL's time, a 32 px PNG in half, since PIL's
    per-image overhead is Python); ``None`` for anything else (EXIF, transparency, a palette, 16 bits, colour
    asked as grey, or a decoder error), which :func:`tlcore.images.decode_image`'s rules then decode."""
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg, decode_png

    if b"Exif" in raw or b"eXIf" in raw or b"rientation" in raw:  # EXIF or XMP orientation (or such bytes by chance)
        return None
    if raw[:8] == _PNG:  # IHDR: bit depth at byte 24, colour type at 25 (0 grey, 2 RGB; 3 palette, 4/6 alpha)
        if len(raw) < 26 or raw[24] != 8 or raw[25] not in (0, 2) or b"tRNS" in raw:
            return None
        decode = decode_png
    elif raw[:3] == _JPEG:
        decode = decode_jpeg
    else:
        return None
    try:
        px = decode(torch.frombuffer(bytearray(raw), dtype=torch.uint8), ImageReadMode.UNCHANGED)
    except RuntimeError:
        return None
    if px.dtype != torch.uint8 or px.shape[0] not in (1, 3) or (px.shape[0] == 3 and channels == 1):
        return None
    px = px.permute(1, 2, 0).numpy()
    return np.repeat(px, 3, axis=2) if px.shape[2] < channels else px  # grey as RGB: the grey repeated, as PIL does


@lru_cache(maxsize=8)
def _names(split_dir: str) -> list[str]:
    return SplitIndex.load(split_dir).name
