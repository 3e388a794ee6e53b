"""Decoding image files as users have them into the pixels a model sees.

One decoder for training data (``tlcore.data``) and prediction (``tl predict``), so both see the same
pixels whatever the file: EXIF-rotated photos, 16-bit greyscale, transparency, palettes, CMYK, and
files that are not images, truncated, or decompression bombs (refused with the file named).
"""

from __future__ import annotations

import io
import os
import struct
import warnings
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image, ImageChops, ImageOps, UnidentifiedImageError

# torchvision's ImageFolder extensions (torchvision.datasets.folder.IMG_EXTENSIONS; a test keeps them equal).
# Not imported from there: importing torchvision costs ~2 s per process on a 2-core machine.
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def show_path(p: str | Path) -> str:
    """A path as text that always prints: bytes that are not UTF-8 (kept by Python as surrogates) as ``\\xNN``."""
    return os.fsencode(p).decode("utf-8", "backslashreplace")


class ImageDecodeError(ValueError):
    """One file cannot be decoded into pixels; the message names the file and the rule it broke."""


_HIGH_DEPTH = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
_ALPHA = ("RGBA", "RGBa", "LA", "La", "PA")
BACKGROUND = (255, 255, 255)  # transparent pixels become white, as a viewer on a white page shows them


def _to_8bit(a: np.ndarray, mode: str) -> np.ndarray:
    """Grey values of a high-bit-depth image scaled to 0..255 by their bit depth, not clipped: 16-bit
    (``I;16*``, and ``I`` holding 0..65535) divides by 257 (65535 -> 255); floats in [0, 1] times 255;
    anything else (negative or wider values) is stretched from its own minimum to maximum."""
    a = a.astype(np.float64)
    lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
    if mode.startswith("I;16") or (mode == "I" and lo >= 0 and hi <= 65535):
        a = a / 257
    elif mode == "F" and lo >= 0 and hi <= 1:
        a = a * 255
    else:
        a = (a - lo) * (255 / (hi - lo)) if hi > lo else np.zeros_like(a)
    return np.clip(np.rint(a), 0, 255).astype(np.uint8)


# Pillow frees every decoded image's memory at once by default (PILLOW_BLOCKS_MAX=0): decoding images one after
# another then hands memory back to the system and faults it in again, ~1 M page faults and a sixth of the time
# of preparing 8,000 photos. Keeping a few blocks (at most 16 MiB each) for the next image ends that; a
# PILLOW_BLOCKS_MAX the user set is left as it is.
KEEP_BLOCKS = 4
DRAFT_FORMATS = ("JPEG", "MPO")  # libjpeg can decode these at 1/2, 1/4, 1/8 scale (MPO: a phone's JPEG)
OWN_MEMORY_FORMATS = ("JPEG", "MPO", "PNG")  # decoded into memory of their own: no map of the file, no codec kept


def open_image(
    src: Path | bytes, name: str, shrink_to: int | None = None, as_stored: dict | None = None
) -> Image.Image:
    """Open and fully decode ``src`` (a file, or a file's bytes); every failure (decompression bombs included) as
    :class:`ImageDecodeError` naming ``name``. ``as_stored``, if given, receives what the file itself holds, read
    before any change: ``format``, ``mode``, ``size``, ``transparency`` (a transparency key) and ``orientation``
    (EXIF or XMP; 1 when none; a TIFF's is 1 and its size upright: Pillow turns a TIFF upright as it opens it).

    ``shrink_to``, for a caller that resizes the image to that shorter side anyway: a JPEG at least 4 times bigger
    is decoded at 1/2, 1/4 or 1/8 of its size by libjpeg's DCT scaling (``Image.draft``), its shorter side never
    under twice ``shrink_to`` (``Image.thumbnail``'s default ``reducing_gap``): a 12-megapixel photo bound for 512
    px decodes and resizes ~2x faster."""
    path = name
    if Image.core.get_blocks_max() < KEEP_BLOCKS and "PILLOW_BLOCKS_MAX" not in os.environ:
        Image.core.set_blocks_max(KEEP_BLOCKS)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)  # over the limit: refused, not just warned
        try:
            with Image.open(io.BytesIO(src) if isinstance(src, (bytes, bytearray, memoryview)) else src) as im:
                short = min(im.size)
                if as_stored is not None:
                    as_stored.update(
                        format=im.format, mode=im.mode, size=im.size, transparency="transparency" in im.info
                    )
                if shrink_to and im.format in DRAFT_FORMATS and short >= 4 * shrink_to:
                    # rounded down: libjpeg's scale is the whole quotient, so the shorter side stays >= 2x
                    im.draft(im.mode, (im.width * 2 * shrink_to // short, im.height * 2 * shrink_to // short))
                im.load()
                if as_stored is not None:
                    as_stored["orientation"] = im.getexif().get(ExifTags.Base.Orientation, 1)
                # a rotated phone photo stands upright, as viewers show it; in place: no copy of an upright one
                ImageOps.exif_transpose(im, in_place=True)
                # a JPEG or PNG is decoded whole into memory and returned as it is; any other format is copied, so
                # that nothing of the file (a memory map of it, a codec's state) outlives this call
                return im if im.format in OWN_MEMORY_FORMATS else im.copy()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise ImageDecodeError(
                f"{path}: refused as a possible decompression bomb ({e}; the limit is PIL's "
                f"Image.MAX_IMAGE_PIXELS = {Image.MAX_IMAGE_PIXELS} pixels)"
            ) from None
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, struct.error) as e:
            why = (
                "cannot identify the image format"
                if isinstance(e, UnidentifiedImageError) and not isinstance(src, Path)
                else e
            )  # PIL would name an anonymous buffer
            raise ImageDecodeError(f"{path}: not a readable image ({type(e).__name__}: {why})") from None


_RESAMPLE = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST}


def resize_image(im: Image.Image, size: int, resize: int | None = None, interpolation: str = "bilinear") -> Image.Image:
    """``size`` x ``size`` pixels: stretched (``resize=None``; the aspect ratio is not kept), or the shorter side
    resized to ``resize`` and the centre ``size`` x ``size`` cropped (torchvision's ``Resize(resize)`` +
    ``CenterCrop(size)``, the evaluation transform of its pretrained weights)."""
    how = _RESAMPLE[interpolation]
    if resize is None:
        return im.resize((size, size), how)
    w, h = im.size
    if w <= h:
        nw, nh = resize, max(1, int(h * resize / w))  # int(), as torchvision computes it
    else:
        nw, nh = max(1, int(w * resize / h)), resize
    im = im.resize((nw, nh), how)
    if nw < size or nh < size:  # resize < size: pad, as CenterCrop does, with black
        canvas = Image.new(im.mode, (max(nw, size), max(nh, size)))
        canvas.paste(im, ((canvas.size[0] - nw) // 2, (canvas.size[1] - nh) // 2))
        im, (nw, nh) = canvas, canvas.size
    left, top = int(round((nw - size) / 2.0)), int(round((nh - size) / 2.0))
    return im.crop((left, top, left + size, top + size))


def has_colour(im: Image.Image) -> bool:
    """Whether an ``L`` or ``RGB`` image has colour: ``not is_grey(to_pixels(im))`` without making the array."""
    if im.mode not in ("L", "RGB"):
        return not is_grey(to_pixels(im, "RGB"))
    if im.mode == "L":
        return False
    r, g, b = im.split()
    return ImageChops.difference(r, g).getbbox() is not None or ImageChops.difference(g, b).getbbox() is not None


def is_grey(a: np.ndarray) -> bool:
    """Whether decoded pixels ``(H, W, C)`` carry no colour: one channel, or three equal ones."""
    return a.shape[-1] == 1 or bool((a[..., 0] == a[..., 1]).all() and (a[..., 1] == a[..., 2]).all())


def decode_image(
    path: str | Path | bytes,
    mode: str = "RGB",
    size: int | None = None,
    resize: int | None = None,
    interpolation: str = "bilinear",
    name: str | None = None,
    shrink: bool = False,
) -> np.ndarray:
    """Decode one image file as a user has it into ``uint8 (H, W, C)`` pixels, ``C`` = 1 (``mode="L"``) or 3.

    The one decoder that training data (:func:`load_split`) and prediction use, so both see the same
    pixels. EXIF orientation is applied; 16-bit and 32-bit greyscale is scaled to 8 bits (see
    :func:`_to_8bit`), not saturated; alpha (RGBA, LA, a palette or grey image with a transparent
    colour) is composited onto a white background; palette, CMYK, 1-bit and other modes are converted.
    ``size`` resizes to ``size`` x ``size`` (bilinear), stretched, or with ``resize`` by a centre crop (see
    :func:`resize_image`). Raises :class:`ImageDecodeError` naming the file:
    not an image, truncated, or larger than PIL's decompression-bomb limit. ``path`` may also be a file's bytes
    (as a prepared shard holds them; ``name`` then says which file they came from). ``shrink`` (with a ``size``):
    a big JPEG may be decoded at a reduced scale, never under twice the side it is resized to (see
    :func:`open_image`), for a caller that does not need the very pixels training saw (``tl predict`` on a
    user's camera photos: ~2x faster, within a fraction of a grey level).
    """
    if not isinstance(path, (bytes, bytearray, memoryview)):
        path = Path(path)
    name = name or (show_path(path) if isinstance(path, Path) else "image bytes")
    shrink_to = (resize or size) if shrink else None
    return to_pixels(open_image(path, name, shrink_to), mode, size, resize, interpolation, name)


def to_pixels(
    im: Image.Image,
    mode: str = "RGB",
    size: int | None = None,
    resize: int | None = None,
    interpolation: str = "bilinear",
    name: str = "image",
) -> np.ndarray:
    """The pixels of an opened image by :func:`decode_image`'s rules (bit depth, alpha, mode, size)."""
    try:
        if im.mode in _HIGH_DEPTH:
            im = Image.fromarray(_to_8bit(np.asarray(im), im.mode), "L")
        if im.mode in ("P", "L", "RGB") and "transparency" in im.info:
            im = im.convert("RGBA")
        if im.mode in _ALPHA:
            rgba = im.convert("RGBA")
            im = Image.alpha_composite(Image.new("RGBA", rgba.size, (*BACKGROUND, 255)), rgba).convert("RGB")
        im = im.convert(mode)
        if size is not None:
            im = resize_image(im, size, resize, interpolation)
    except (OSError, ValueError) as e:
        raise ImageDecodeError(f"{name}: cannot be converted to {mode} ({type(e).__name__}: {e})") from None
    a = np.array(im)  # writable: torch.from_numpy takes it as is
    return a.reshape(*a.shape[:2], -1)
