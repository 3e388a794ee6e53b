"""Images as users have them (tlcore/images.py, tlcore/folders.py, tlcore/data.py): each case is a generated
file; errors name the file and the rule. Pure and fast: tiny images in a temporary folder."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from tlcore import data, folders
from tlcore.images import ImageDecodeError, decode_image, has_colour, is_grey, open_image, show_path, to_pixels


def _png(path, arr, mode=None, **save):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr, mode).save(path, **save) if mode else Image.fromarray(arr).save(path, **save)
    return path


def test_exif_orientation_is_applied(tmp_path):
    a = np.zeros((2, 4), np.uint8)
    a[:, 2:] = 255  # wide: dark left half
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    f = _png(tmp_path / "phone.png", a, exif=exif)
    got = decode_image(f, "L")[..., 0]
    assert got.shape == (4, 2) and np.array_equal(got, np.rot90(a, k=-1))


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_16_bit_greyscale_is_scaled_not_saturated(tmp_path, suffix):
    a = np.arange(256, dtype=np.uint16).reshape(16, 16) * 257  # the full 16-bit range
    f = tmp_path / f"x16{suffix}"
    Image.fromarray(a).save(f)
    assert Image.open(f).mode.startswith("I;16")
    got = decode_image(f, "L")[..., 0]
    assert np.array_equal(got, np.arange(256, dtype=np.uint8).reshape(16, 16))  # PIL's convert("L") gives 99 % 255
    assert (decode_image(f, "RGB") == got[..., None]).all()


def test_32_bit_integer_and_float_greyscale(tmp_path):
    i32 = Image.fromarray(np.array([[0, 65535]], np.int32), "I")
    i32.save(tmp_path / "i.tif")
    assert decode_image(tmp_path / "i.tif", "L")[..., 0].tolist() == [[0, 255]]
    Image.fromarray(np.array([[0.0, 0.5, 1.0]], np.float32), "F").save(tmp_path / "f.tif")
    assert decode_image(tmp_path / "f.tif", "L")[..., 0].tolist() == [[0, 128, 255]]


@pytest.mark.parametrize("kind", ["RGBA", "LA", "P+transparency", "L+transparency"])
def test_alpha_is_composited_on_white(tmp_path, kind):
    f = tmp_path / f"{kind}.png"
    if kind == "RGBA":
        Image.fromarray(np.array([[[255, 0, 0, 255], [0, 0, 0, 0]]], np.uint8), "RGBA").save(f)
    elif kind == "LA":
        Image.fromarray(np.array([[[0, 255], [0, 0]]], np.uint8), "LA").save(f)
    elif kind == "P+transparency":
        im = Image.new("P", (2, 1))
        im.putpalette([255, 0, 0, 0, 0, 0] + [0] * 762)
        im.putpixel((1, 0), 1)
        im.save(f, transparency=1)
    else:
        Image.fromarray(np.array([[0, 7]], np.uint8), "L").save(f, transparency=7)
    rgb = decode_image(f, "RGB")
    assert rgb[0, 1].tolist() == [255, 255, 255]  # the transparent pixel: white, not black
    assert rgb[0, 0].tolist() == ([255, 0, 0] if kind in ("RGBA", "P+transparency") else [0, 0, 0])


def test_palette_cmyk_and_1bit_are_converted(tmp_path):
    Image.new("CMYK", (3, 3), (0, 255, 255, 0)).save(tmp_path / "c.tif")
    assert decode_image(tmp_path / "c.tif", "RGB")[0, 0].tolist() == [255, 0, 0]
    Image.new("1", (3, 3), 1).save(tmp_path / "b.png")
    assert decode_image(tmp_path / "b.png", "L", size=8).shape == (8, 8, 1)


def test_decompression_bomb_is_named_and_skippable(tmp_path, monkeypatch, caplog):
    for c in ("a", "b"):
        for split in ("train", "test"):
            _png(tmp_path / split / c / "ok.png", np.zeros((4, 4), np.uint8))
    bomb = _png(tmp_path / "train" / "a" / "bomb.png", np.zeros((40, 40), np.uint8))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)  # 1,600 pixels: over the limit (the warning zone)
    with pytest.raises(
        ImageDecodeError, match=r"bomb\.png: refused as a possible decompression bomb.*MAX_IMAGE_PIXELS = 500"
    ):
        decode_image(bomb)
    with pytest.raises(
        folders.DataValidationError, match=r"bomb\.png: refused as a possible decompression bomb.*skip_corrupt"
    ):
        folders.validate_imagefolder(tmp_path)
    rep = folders.validate_imagefolder(tmp_path, skip_corrupt=True)
    assert rep["train"].skipped == [bomb] and "skipped 1 corrupt" in caplog.text
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 200)  # over twice the limit: PIL raises an error, not a warning
    with pytest.raises(ImageDecodeError, match="decompression bomb"):
        decode_image(bomb)


def test_truncated_image_is_named_with_the_reason(tmp_path):
    f = _png(tmp_path / "cut.png", np.random.default_rng(0).integers(0, 255, (64, 64), np.uint8))
    f.write_bytes(f.read_bytes()[:200])
    with pytest.raises(ImageDecodeError, match=r"cut\.png: not a readable image \("):
        decode_image(f)


def test_nested_folders_in_a_class_are_included(tmp_path):
    for split in ("train", "test"):
        _png(tmp_path / split / "a" / "0.png", np.zeros((4, 4), np.uint8))
        _png(tmp_path / split / "b" / "0.png", np.zeros((4, 4), np.uint8))
    _png(tmp_path / "train" / "a" / "2023" / "june" / "1.png", np.zeros((4, 4), np.uint8))
    _png(tmp_path / "train" / "a" / ".thumbs" / "x.png", np.zeros((4, 4), np.uint8))  # hidden: skipped
    rep = folders.validate_imagefolder(tmp_path)
    assert rep["train"].counts == {"a": 2, "b": 1}
    assert len(data.load_split(tmp_path / "train", 8, 1)) == 3


def test_a_file_name_that_is_not_utf8_is_read_hashed_and_named(tmp_path):
    root = os.fsencode(tmp_path)
    for split in (b"train", b"test"):
        os.makedirs(os.path.join(root, split, b"a"))
        Image.new("L", (4, 4)).save(os.fsdecode(os.path.join(root, split, b"a", b"ok.png")))
    odd = os.fsdecode(os.path.join(root, b"train", b"a", b"caf\xe9.png"))  # Latin-1 name
    Image.new("L", (4, 4), 9).save(odd)
    rep = folders.validate_imagefolder(tmp_path)
    assert rep["train"].counts == {"a": 2}
    names = [f"a/{show_path(p.name)}" for p, _ in rep["train"].files]
    assert "a/caf\\xe9.png" in names  # shown with the odd byte written out, as the shards' index names it
    with open(odd, "wb") as f:
        f.write(b"junk")
    with pytest.raises(folders.DataValidationError, match=r"caf\\xe9\.png: not a readable image") as e:
        folders.validate_imagefolder(tmp_path)
    str(e.value).encode("utf-8")  # the message prints on any terminal


@pytest.mark.parametrize("wh", [(300, 200), (200, 300), (256, 256), (90, 120)])
def test_resize_and_centre_crop_are_torchvisions_eval_transform(tmp_path, wh):
    """With ImageNet weights an image is prepared as torchvision's weights.transforms() does: the shorter side
    resized, the centre cropped (no stretching); without, stretched to size as before."""
    from torchvision.transforms import functional as F

    rng = np.random.default_rng(0)
    p = _png(tmp_path / "photo.png", rng.integers(0, 256, (wh[1], wh[0], 3), dtype=np.uint8))
    want = np.asarray(F.center_crop(F.resize(Image.open(p).convert("RGB"), 256), 224))
    got = decode_image(p, "RGB", 224, resize=256)
    assert got.shape == (224, 224, 3) and np.array_equal(got, want)
    assert decode_image(p, "RGB", 32).shape == (32, 32, 3)  # stretched
    small = decode_image(p, "L", 64, resize=40)  # resize below the crop: padded as CenterCrop pads
    assert small.shape == (64, 64, 1)


def test_colour_is_counted_per_split_and_grey_stored_as_rgb_is_grey(tmp_path):
    from tlcore.images import is_grey

    grey = np.tile(np.arange(64, dtype=np.uint8).reshape(8, 8, 1), (1, 1, 3))
    colour = grey.copy()
    colour[0, 0] = (10, 200, 30)
    _png(tmp_path / "train" / "a" / "grey_as_rgb.png", grey)
    _png(tmp_path / "train" / "a" / "colour.png", colour)
    _png(tmp_path / "train" / "b" / "l.png", grey[..., 0])
    rep = folders.validate_split(tmp_path / "train")
    assert rep.colour == 1
    assert is_grey(grey) and not is_grey(colour) and is_grey(grey[..., :1])


def test_has_colour_is_is_grey_of_the_pixels_and_a_big_jpeg_decodes_shrunk_only_when_asked(tmp_path):
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (20, 30), dtype=np.uint8)
    one_pixel = np.stack([grey] * 3, -1)
    one_pixel[7, 9, 2] ^= 1
    for im in (
        Image.fromarray(grey, "L"),
        Image.fromarray(np.stack([grey] * 3, -1), "RGB"),  # grey stored as RGB
        Image.fromarray(one_pixel, "RGB"),
        Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8), "RGB"),
    ):
        assert has_colour(im) == (not is_grey(to_pixels(im, "RGB"))), im.mode
    assert has_colour(Image.fromarray(one_pixel, "RGB"))

    photo = Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).resize((1200, 900), Image.BICUBIC)
    photo.save(tmp_path / "photo.jpg", quality=90)
    raw = (tmp_path / "photo.jpg").read_bytes()
    full = open_image(raw, "photo.jpg")
    assert full.size == (1200, 900) and open_image(raw, "photo.jpg", shrink_to=300).size == (1200, 900)  # < 4x
    shrunk = open_image(raw, "photo.jpg", shrink_to=100)  # 1/4 by libjpeg: the shorter side still >= 200
    assert shrunk.size == (300, 225) and shrunk.mode == full.mode
    # what it is shrunk for: at the bounded size, the same picture as the full decode resized
    a, b = (np.asarray(im.resize((133, 100), Image.BICUBIC), dtype=float) for im in (shrunk, full))
    assert np.abs(a - b).mean() < 2


def test_open_image_reports_the_file_as_stored_before_it_turns_or_shrinks_it(tmp_path):
    """What the data stage decides on (store the file as it came, or re-encode it) is read from the same open as the
    decode: the file's own format, mode, size, transparency key and orientation, not the upright, shrunk image's."""
    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).resize((1200, 900), Image.BICUBIC)
    exif = photo.getexif()
    exif[0x0112] = 6  # stored sideways
    photo.save(tmp_path / "sideways.jpg", exif=exif, quality=90)
    stored: dict = {}
    im = open_image((tmp_path / "sideways.jpg").read_bytes(), "sideways.jpg", shrink_to=100, as_stored=stored)
    assert stored == {"format": "JPEG", "mode": "RGB", "size": (1200, 900), "transparency": False, "orientation": 6}
    assert im.size == (225, 300)  # shrunk 1/4 by libjpeg, then turned upright
    assert np.array_equal(np.asarray(im), np.asarray(open_image(tmp_path / "sideways.jpg", "x", shrink_to=100)))
    Image.fromarray(rng.integers(0, 256, (5, 7), dtype=np.uint8), "L").save(tmp_path / "key.png", transparency=3)
    stored = {}
    open_image(tmp_path / "key.png", "key.png", as_stored=stored)
    assert stored == {"format": "PNG", "mode": "L", "size": (7, 5), "transparency": True, "orientation": 1}
