"""Embedded, offline datasets: ``synth_digits`` (rendered), ``optdigits`` (real) and two shifted copies of it.

``synth_digits`` renders 0-9 from TrueType faces shipped with matplotlib, with random size,
rotation, shear, aspect, stroke width, elastic (handwriting-like) distortion, blur, noise and
an optional 8x8 low-resolution pass that mimics how optdigits was recorded. ``optdigits`` is
scikit-learn's bundled UCI handwritten digits (1,797 images, 8x8, values 0-16), upsampled.
``optdigits_rotated`` and ``optdigits_noisy`` are the same images (same split) under one kind of shift
each: a rotation of 25-45 degrees either way, or blur + low contrast + noise. All export to
ImageFolder PNG trees so the pipeline treats them like user data. :data:`PAIRS` are the source ->
target pairs the transfer benchmark measures.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from tlcore.embedded import EMBEDDED  # noqa: F401 - re-exported: the datasets this module builds

# (source, target, kind of shift); the optdigits copies share one split, so a source's training images are
# never a shifted target's test images
PAIRS = (
    ("synth_digits", "optdigits", "synthetic -> real (fonts to handwriting)"),
    ("optdigits", "synth_digits", "real -> synthetic (the reverse: 1,257 handwritten digits to many fonts)"),
    ("optdigits", "optdigits_rotated", "rotation only (25-45 degrees either way)"),
    ("optdigits", "optdigits_noisy", "corruption only (blur, low contrast, noise)"),
    ("optdigits", "optdigits_colour", "colour and polarity (grey digits to digits blended over colour photo patches)"),
)
CLASSES = [str(d) for d in range(10)]
COLOUR = ("optdigits_colour",)  # the embedded domains in colour (RGB); the others are grey
_SKIP = ("Display", "STIXNonUni", "STIXSiz", "cmex", "cmsy", "LastResort")


@lru_cache(maxsize=1)
def digit_fonts() -> tuple[str, ...]:
    """Paths of matplotlib's bundled faces that render ten distinct, non-empty digit glyphs."""
    import matplotlib

    ttf = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    good = []
    for p in sorted(ttf.glob("*.ttf")):
        if any(s in p.name for s in _SKIP):
            continue
        glyphs = [_render_glyph(str(p), d, 40, 0) for d in CLASSES]
        inked = [g for g in glyphs if g.sum() > 255 * 20]
        distinct = {g.tobytes() for g in glyphs}
        if len(inked) == 10 and len(distinct) == 10:
            good.append(str(p))
    if not good:
        raise RuntimeError(f"no usable digit fonts found under {ttf}; reinstall matplotlib")
    return tuple(good)


def _render_glyph(font_path: str, text: str, size: int, stroke: int) -> np.ndarray:
    font = ImageFont.truetype(font_path, size)
    img = Image.new("L", (96, 96), 0)
    ImageDraw.Draw(img).text((48, 48), text, fill=255, font=font, anchor="mm", stroke_width=stroke, stroke_fill=255)
    return np.asarray(img)


def upsample_lowres(img8: np.ndarray, size: int = 32) -> np.ndarray:
    """Upsample an 8x8 uint8 image to ``size`` with bilinear interpolation (same for both domains)."""
    return np.asarray(Image.fromarray(img8).resize((size, size), Image.BILINEAR))


def _place(glyph: np.ndarray, rng: np.random.Generator, size: int) -> np.ndarray:
    """Rotate/shear the glyph, crop its ink, rescale to a random box and centre it with jitter."""
    im = Image.fromarray(glyph)
    shear = rng.uniform(-0.3, 0.3)
    im = im.transform(im.size, Image.AFFINE, (1, shear, -shear * 48, 0, 1, 0), resample=Image.BILINEAR)
    im = im.rotate(rng.uniform(-15, 15), resample=Image.BILINEAR)
    bbox = im.getbbox() or (0, 0, 96, 96)
    im = im.crop(bbox)
    w, h = im.size
    longest = rng.uniform(0.85, 1.0) * size
    aspect = rng.uniform(0.8, 1.5)
    scale = longest / max(w * aspect, h)
    nw, nh = max(2, int(round(w * aspect * scale))), max(2, int(round(h * scale)))
    im = im.resize((min(nw, size), min(nh, size)), Image.BILINEAR)
    canvas = Image.new("L", (size, size), 0)
    jx, jy = rng.integers(-2, 3, size=2)
    canvas.paste(im, ((size - im.size[0]) // 2 + int(jx), (size - im.size[1]) // 2 + int(jy)))
    return np.asarray(canvas)


def _elastic(x: torch.Tensor, gen: torch.Generator, alpha: float = 2.0, sigma: float = 4.0) -> torch.Tensor:
    """Elastic distortion (Simard et al. 2003) of a batch ``(N, 1, H, W)`` in [0, 1]."""
    n, _, h, w = x.shape
    disp = torch.rand(n, 2, h, w, generator=gen) * 2 - 1
    k = int(4 * sigma) | 1
    r = torch.arange(k) - k // 2
    g = torch.exp(-(r.float() ** 2) / (2 * sigma**2))
    g = (g / g.sum()).view(1, 1, 1, k).repeat(2, 1, 1, 1)
    disp = F.conv2d(F.pad(disp, (k // 2, k // 2, 0, 0), mode="reflect"), g, groups=2)
    disp = F.conv2d(F.pad(disp, (0, 0, k // 2, k // 2), mode="reflect"), g.transpose(2, 3), groups=2)
    amp = torch.rand(n, 1, 1, 1, generator=gen) * alpha
    disp = disp / disp.abs().amax(dim=(1, 2, 3), keepdim=True).clamp_min(1e-6) * amp * 2 / h
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    grid = torch.stack([xx, yy], dim=-1).unsqueeze(0) + disp.permute(0, 2, 3, 1)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=True)


def render_synth_digits(
    n_per_class: int, seed: int = 0, size: int = 32, lowres_prob: float = 0.7
) -> tuple[np.ndarray, np.ndarray]:
    """Render ``10 * n_per_class`` digits; returns ``(images uint8 (N, size, size), labels (N,))``.

    Deterministic for a given ``seed``; classes are exactly balanced.
    """
    rng = np.random.default_rng(seed)
    fonts = digit_fonts()
    labels = np.repeat(np.arange(10), n_per_class)
    rng.shuffle(labels)
    imgs = np.empty((len(labels), size, size), dtype=np.uint8)
    for i, d in enumerate(labels):
        glyph = _render_glyph(
            fonts[rng.integers(len(fonts))], CLASSES[d], int(rng.integers(40, 60)), int(rng.integers(0, 4))
        )
        imgs[i] = _place(glyph, rng, size)
    gen = torch.Generator().manual_seed(seed)
    x = torch.from_numpy(imgs).float().unsqueeze(1) / 255
    x = _elastic(x, gen)
    sig = torch.rand(len(x), generator=gen) * 1.2
    flat = x.squeeze(1)  # one grouped convolution for all images (a per-image call cost ~15 s per 6,000)
    blurred = torch.where((sig >= 0.2)[:, None, None], gaussian_blur_each(flat, sig.clamp_min(0.2)), flat)
    out = (blurred.clamp(0, 1) * 255).round().byte().numpy()
    low = rng.random(len(out)) < lowres_prob
    for i in np.flatnonzero(low):
        small = np.asarray(Image.fromarray(out[i]).resize((8, 8), Image.BOX)).astype(np.float32)
        small = np.round(small / max(1.0, small.max()) * 16) * 255 / 16  # optdigits stores 17 grey levels
        out[i] = upsample_lowres(small.astype(np.uint8), size)
    peak = out.reshape(len(out), -1).max(axis=1).clip(1, None).astype(np.float32)
    out = (out.astype(np.float32) * (255 / peak)[:, None, None]).clip(0, 255)
    noise = rng.normal(0, 1, out.shape) * rng.uniform(0, 12, (len(out), 1, 1))
    return np.clip(out + noise, 0, 255).astype(np.uint8), labels.astype(np.int64)


def load_optdigits(size: int = 32, variant: str = "optdigits") -> tuple[np.ndarray, np.ndarray]:
    """All 1,797 bundled UCI digits upsampled to ``size``: ``(uint8 (N, size, size), labels (N,))``.

    ``variant`` ``optdigits_rotated`` / ``optdigits_noisy`` shifts every image (deterministically: the
    same pixels whatever the pipeline's seed)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    small = np.round(d.images * 255 / 16).astype(np.uint8)
    x = np.stack([upsample_lowres(im, size) for im in small])
    shift = {
        "optdigits": None,
        "optdigits_rotated": rotate_digits,
        "optdigits_noisy": corrupt_digits,
        "optdigits_colour": colour_digits,
    }[variant]
    return (x if shift is None else shift(x)), d.target.astype(np.int64)


def colour_digits(x: np.ndarray, seed: int = 0) -> np.ndarray:
    """Blend each ``(N, H, W)`` uint8 digit over a colour photo patch, as MNIST-M (Ganin et al. 2016) does:
    ``|patch - digit|`` per channel, so the ink is the patch's colours inverted, bright on a dark patch and dark on
    a bright one (polarity varies per image). Patches are random crops, at a random scale, of the two photos
    scikit-learn ships (``load_sample_images``), with their channels in a random order (more hues than two
    photos have). Returns ``(N, H, W, 3)`` uint8; the same pixels for a given ``seed``."""
    from sklearn.datasets import load_sample_images

    rng = np.random.default_rng(seed)
    photos = load_sample_images().images
    n, h, w = x.shape
    out = np.empty((n, h, w, 3), dtype=np.uint8)
    for i in range(n):
        photo = photos[rng.integers(len(photos))]
        side = int(rng.integers(h, 4 * h + 1))  # a crop of h..4h pixels, resized to h: textures of many scales
        top, left = rng.integers(0, photo.shape[0] - side + 1), rng.integers(0, photo.shape[1] - side + 1)
        patch = Image.fromarray(photo[top : top + side, left : left + side]).resize((w, h), Image.BILINEAR)
        patch = np.asarray(patch)[:, :, rng.permutation(3)].astype(np.int16)
        out[i] = np.abs(patch - x[i].astype(np.int16)[:, :, None]).astype(np.uint8)
    return out


def rotate_digits(x: np.ndarray, lo: float = 25, hi: float = 45, seed: int = 0) -> np.ndarray:
    """Rotate each ``(N, H, W)`` uint8 image by ``U(lo, hi)`` degrees, clockwise or not at random (black fill).

    Beyond the +-15 degrees ``synth_digits`` renders and the +-12 of training augmentation; below 90, so a
    6 stays a 6."""
    rng = np.random.default_rng(seed)
    angles = rng.uniform(lo, hi, len(x)) * rng.choice([-1, 1], len(x))
    return np.stack([np.asarray(Image.fromarray(im).rotate(a, resample=Image.BILINEAR)) for im, a in zip(x, angles)])


def corrupt_digits(x: np.ndarray, seed: int = 0) -> np.ndarray:
    """Blur (sigma 0.6-1.2 px), lower contrast over a grey veil (ink 45-70 % of the range, veil 5-25 %) and
    add Gaussian noise (sigma 8-14 % of the range) to each ``(N, H, W)`` uint8 image."""
    rng = np.random.default_rng(seed)
    n = len(x)
    t = gaussian_blur_each(torch.from_numpy(x).double() / 255, torch.from_numpy(rng.uniform(0.6, 1.2, n))).numpy()
    out = rng.uniform(0.05, 0.25, (n, 1, 1)) + t * rng.uniform(0.45, 0.7, (n, 1, 1))
    out = out + rng.normal(0, 1, out.shape) * rng.uniform(0.08, 0.14, (n, 1, 1))
    return np.clip(np.round(out * 255), 0, 255).astype(np.uint8)


def gaussian_blur_each(x: torch.Tensor, sigma: torch.Tensor, k: int = 5) -> torch.Tensor:
    """Gaussian blur of each ``(N, H, W)`` image with its own ``sigma`` (separable, reflect padding), in one
    grouped convolution per axis: torchvision's ``gaussian_blur(kernel_size=k)`` per image, batched."""
    r = torch.arange(k, dtype=x.dtype) - k // 2
    g = torch.exp(-(r[None] ** 2) / (2 * sigma[:, None].to(x.dtype) ** 2))
    g = g / g.sum(1, keepdim=True)
    y = F.pad(x[None], (k // 2, k // 2, 0, 0), mode="reflect")
    y = F.conv2d(y, g[:, None, None, :], groups=len(x))
    y = F.conv2d(F.pad(y, (0, 0, k // 2, k // 2), mode="reflect"), g[:, None, :, None], groups=len(x))
    return y[0]


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Fixed, seeded, stratified ``(train_idx, test_idx)``."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(labels))
    tr, te = train_test_split(idx, test_size=test_fraction, stratify=labels, random_state=seed)
    return np.sort(tr), np.sort(te)


def export_imagefolder(root: str | Path, split: str, images: np.ndarray, labels: np.ndarray) -> None:
    """Write ``root/split/<class>/<i>.png`` for every image."""
    for c in CLASSES:
        (Path(root) / split / c).mkdir(parents=True, exist_ok=True)
    for i, (im, y) in enumerate(zip(images, labels)):
        Image.fromarray(im).save(Path(root) / split / CLASSES[y] / f"{i:05d}.png", optimize=False)


def materialize(
    name: str,
    out_dir: str | Path,
    seed: int = 0,
    n_per_class: int = 600,
    test_per_class: int = 100,
    test_fraction: float = 0.3,
    size: int = 32,
) -> Path:
    """Write an embedded dataset as an ImageFolder tree at ``out_dir`` (atomically: temp dir + rename)."""
    if name not in EMBEDDED:
        raise ValueError(f"unknown embedded dataset {name!r}; choose one of: {', '.join(EMBEDDED)}")
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        if name == "synth_digits":
            x, y = render_synth_digits(n_per_class, seed=seed, size=size)
            export_imagefolder(tmp, "train", x, y)
            x, y = render_synth_digits(test_per_class, seed=seed + 7919, size=size)
            export_imagefolder(tmp, "test", x, y)
        else:
            x, y = load_optdigits(size, name)
            tr, te = stratified_split(y, test_fraction, seed)
            export_imagefolder(tmp, "train", x[tr], y[tr])
            export_imagefolder(tmp, "test", x[te], y[te])
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def domain_task(
    spec,
    source: str,
    target: str,
    synth_per_class: int,
    seed: int = 0,
    test_fraction: float = 0.3,
    synth_test_per_class: int = 100,
    augment: str | None = None,
):
    """In-memory embedded task ``source -> target``: ``(source, target_train, target_test)`` ImageDatasets.

    ``augment``: the training augmentation of both domains; ``None`` decides per domain as the pipeline's ``auto``
    does (:func:`tlcore.transforms.augment_profile`).

    Training sets carry the train-time transform, the test set the eval transform. An optdigits-based
    domain is its fixed split (seed 0; a source uses its training part); ``synth_digits`` renders
    ``synth_per_class`` training images per class with ``seed`` (as a target, ``synth_test_per_class``
    test images from a seed of its own, as the data stage does).
    """
    from .data import ImageDataset
    from .transforms import augment_profile, build_transform

    channels = 3 if target in COLOUR or source in COLOUR else None  # None: as before, the spec's
    aug = {r: augment or augment_profile(r, source not in COLOUR, target in COLOUR) for r in ("source", "target")}
    tf = {r: build_transform(spec, True, channels, aug[r]) for r in aug}
    eval_tf = build_transform(spec, False, channels)

    def domain(name):
        if name == "synth_digits":
            return render_synth_digits(synth_per_class, seed=seed), render_synth_digits(
                synth_test_per_class, seed=seed + 7919
            )
        x, y = load_optdigits(variant=name)
        tr, te = stratified_split(y, test_fraction, seed=0)
        return (x[tr], y[tr]), (x[te], y[te])

    for name in (source, target):
        if name not in EMBEDDED:
            raise ValueError(f"unknown embedded dataset {name!r}; choose one of: {', '.join(EMBEDDED)}")
    (xs, ys), _ = domain(source)
    (xt, yt), (xe, ye) = domain(target)

    def rgb(x):  # a grey domain beside a colour one is fed in the same three channels
        return np.repeat(x[..., None], 3, axis=-1) if channels == 3 and x.ndim == 3 else x

    return (
        ImageDataset.from_numpy(rgb(xs), ys, CLASSES, tf["source"]),
        ImageDataset.from_numpy(rgb(xt), yt, CLASSES, tf["target"]),
        ImageDataset.from_numpy(rgb(xe), ye, CLASSES, eval_tf),
    )


def digits_task(spec, synth_per_class: int, seed: int = 0, test_fraction: float = 0.3):
    """:func:`domain_task` for the default pair, ``synth_digits -> optdigits``."""
    return domain_task(spec, "synth_digits", "optdigits", synth_per_class, seed, test_fraction)
