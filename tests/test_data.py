import numpy as np
import pytest
import torch
from PIL import Image

from tlcore import data, datasets, folders, models, transforms


def _tree(root, classes=("a", "b"), n=3, split="train"):
    for c in classes:
        d = root / split / c
        d.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(np.full((10, 10), 40 * i, np.uint8)).save(d / f"{i}.png")


@pytest.fixture
def good(tmp_path):
    _tree(tmp_path)
    _tree(tmp_path, split="test", n=2)
    return tmp_path


def test_valid_tree_loads(good):
    rep = folders.validate_imagefolder(good)
    assert rep["train"].counts == {"a": 3, "b": 3} and rep["test"].classes == ["a", "b"]
    ds = data.load_split(good / "train", size=16, channels=3)
    assert ds.images.shape == (6, 3, 16, 16) and ds.images.dtype == torch.uint8
    assert ds.targets.tolist() == [0, 0, 0, 1, 1, 1]


def test_corrupt_image_named_or_skipped(good, caplog):
    bad = good / "train" / "a" / "broken.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(folders.DataValidationError, match="broken.png.*skip_corrupt"):
        folders.validate_imagefolder(good)
    rep = folders.validate_imagefolder(good, skip_corrupt=True)
    assert rep["train"].skipped == [bad] and len(rep["train"].files) == 6
    assert "skipped 1 corrupt" in caplog.text


def test_non_image_files_are_ignored_and_counted(good, caplog):
    # torchvision's ImageFolder ignores files by extension; so does the pipeline, and it says how many
    caplog.set_level("INFO", logger="tlcore.folders")
    for name in ("notes.txt", "Thumbs.db", ".DS_Store"):
        (good / "train" / "b" / name).write_text("hi")
    rep = folders.validate_imagefolder(good)
    assert len(rep["train"].files) == 6 and [p.name for p in rep["train"].ignored] == ["Thumbs.db", "notes.txt"]
    assert "ignored 2 file(s) without an image extension" in caplog.text and "notes.txt" in caplog.text


def test_empty_class_named(good):
    (good / "train" / "c").mkdir()
    with pytest.raises(folders.DataValidationError, match=r"no readable images.*train/c"):
        folders.validate_imagefolder(good)


def test_class_in_test_not_train_named(good):
    _tree(good, classes=("z",), split="test")
    with pytest.raises(folders.DataValidationError, match=r"test.*classes that train/ does not: z"):
        folders.validate_imagefolder(good)


def test_missing_split_named(tmp_path):
    _tree(tmp_path)
    with pytest.raises(folders.DataValidationError, match=r"test does not exist"):
        folders.validate_imagefolder(tmp_path)


def test_label_budget_stratified_deterministic_disjoint():
    y = np.repeat(np.arange(5), 20)
    a = data.label_budget_split(y, 3, seed=1, val_per_class=2)
    b = data.label_budget_split(y, 3, seed=1, val_per_class=2)
    c = data.label_budget_split(y, 3, seed=2, val_per_class=2)
    assert np.array_equal(a.labeled, b.labeled) and not np.array_equal(a.labeled, c.labeled)
    assert np.bincount(y[a.labeled]).tolist() == [3] * 5 and np.bincount(y[a.val]).tolist() == [2] * 5
    # the pool is every image outside validation, the labeled ones included
    assert set(a.unlabeled) == set(range(100)) - set(a.val) and set(a.labeled) <= set(a.unlabeled)
    with pytest.raises(ValueError, match="lower the label budget"):
        data.label_budget_split(y, 25, seed=0)
    assert len(data.label_budget_split(y, None, seed=0).labeled) == 100


def test_transform_per_backbone():
    x = torch.full((1, 32, 32), 255, dtype=torch.uint8)
    t = transforms.build_transform(models.get_spec("smallcnn"), train=False)
    assert torch.allclose(t(x), torch.ones(1, 32, 32))  # (1 - 0.5) / 0.5
    t3 = transforms.build_transform(models.get_spec("resnet18"), train=True)
    assert t3(torch.zeros(3, 64, 64, dtype=torch.uint8)).shape == (3, 64, 64)


def test_batched_affine_is_per_image_and_matches_single_calls():
    x = torch.zeros(1, 1, 32, 32)
    x[..., 8:24, 14:18] = 1
    assert torch.allclose(transforms.random_affine(x, 0.0, 0.0, (1.0, 1.0), 0.0), x, atol=1e-6)  # identity
    shifted = transforms.random_affine(x, 0.0, 0.25, (1.0, 1.0), 0.0)
    assert not torch.allclose(shifted, x) and shifted.sum() > 0
    t = transforms.build_transform(models.get_spec("smallcnn"), train=True)
    batch = torch.zeros(16, 1, 32, 32, dtype=torch.uint8)
    batch[..., 8:24, 14:18] = 255
    out = t(batch)
    assert out.shape == (16, 1, 32, 32) and out.dtype == torch.float32
    # every image draws its own warp (torchvision's RandomAffine shares one per call)
    assert len({tuple(o.flatten().round(decimals=3).tolist()) for o in out}) == 16
    # the DataLoader path (ImageDataset.__getitems__) gives the same as per-item __getitem__ without randomness
    ds = data.ImageDataset(
        batch,
        torch.arange(16) % 10,
        [str(i) for i in range(10)],
        transforms.build_transform(models.get_spec("smallcnn"), train=False),
    )
    xb, yb = next(iter(data.make_loader(ds, 8, train=False)))
    assert torch.equal(xb, torch.stack([ds[i][0] for i in range(8)])) and yb.tolist() == list(range(8))


def test_a_training_loader_leaves_the_transform_to_its_consumer_and_every_consumer_applies_it():
    from tlcore import engine, validators

    g = torch.Generator().manual_seed(0)
    tf = transforms.build_transform(models.get_spec("tinycnn"), train=False)
    ds = data.ImageDataset(
        torch.randint(0, 256, (16, 1, 32, 32), dtype=torch.uint8, generator=g),
        torch.arange(16) % 10,
        [str(i) for i in range(10)],
        tf,
    )
    train, test = data.make_loader(ds, 8, train=True), data.make_loader(ds, 8, train=False)
    xb, _ = next(iter(train))
    assert xb.dtype == torch.uint8 and data.device_transform(train) is tf and data.device_transform(test) is None
    assert (
        ds.transform is tf and not ds.defer_transform and ds[0][0].dtype == torch.float32
    )  # the dataset itself is unchanged
    assert torch.equal(data.batch_to(xb, "cpu", train), tf(xb))
    assert ds.subset([0, 1]).defer_transform is False and train.dataset.subset([0]).defer_transform is True
    # the same images through a deferring and a ready loader: the same predictions and features
    model = models.create("tinycnn", 10).eval()
    ready, deferred = data.make_loader(ds, 8, train=False), data.make_loader(ds.deferred(), 8, train=False)
    assert torch.equal(engine.predict(model, ready, "cpu")[0], engine.predict(model, deferred, "cpu")[0])
    assert torch.equal(
        validators.features_and_logits(model, ready)[0], validators.features_and_logits(model, deferred)[0]
    )
    with pytest.raises(ValueError, match="batch-capable"):
        data.ImageDataset(ds.images, ds.targets, ds.classes, lambda x: x.float(), defer_transform=True)


def test_synth_digits_deterministic_and_balanced():
    x1, y1 = datasets.render_synth_digits(4, seed=3)
    x2, y2 = datasets.render_synth_digits(4, seed=3)
    x3, _ = datasets.render_synth_digits(4, seed=4)
    assert np.array_equal(x1, x2) and np.array_equal(y1, y2) and not np.array_equal(x1, x3)
    assert np.bincount(y1).tolist() == [4] * 10 and x1.shape == (40, 32, 32) and x1.dtype == np.uint8
    assert len(datasets.digit_fonts()) >= 10


def test_optdigits_export_roundtrip(tmp_path):
    root = datasets.materialize("optdigits", tmp_path / "optdigits", seed=0)
    x, y = datasets.load_optdigits()
    tr = data.load_split(root / "train", 32, 1)
    te = data.load_split(root / "test", 32, 1)
    assert len(tr) + len(te) == len(y) == 1797
    assert np.bincount(tr.targets.numpy()).tolist() == [
        int(v) for v in np.bincount(y[datasets.stratified_split(y, 0.3, 0)[0]])
    ]
    train_idx, _ = datasets.stratified_split(y, 0.3, 0)
    # PNG is lossless: the first exported image of class 0 equals the source pixels
    first0 = train_idx[y[train_idx] == 0][0]
    assert torch.equal(tr.images[0, 0], torch.from_numpy(x[first0]))
    few = data.load_split(root / "test", 32, 1, max_images=40, seed=1)  # a seeded sample, decoded alone
    assert len(few) == 40 and few.classes == te.classes
    assert torch.equal(few.images, data.load_split(root / "test", 32, 1, max_images=40, seed=1).images)
    assert all((te.images == im).all((1, 2, 3)).any() for im in few.images)


def _content_hash(split_dir, out_dir):
    from tlcore import shards

    rep = folders.list_split(split_dir)
    files = [(p, y, f"{rep.classes[y]}/{p.name}") for p, y in rep.files]
    return shards.write_split(files, rep.classes, out_dir, max_side=64)[0].content_hash()


def test_a_prepared_split_hash_follows_names_and_bytes_not_location_or_sharding(good, tmp_path_factory):
    import shutil

    out = tmp_path_factory.mktemp("prepared")
    h = _content_hash(good / "train", out / "1")
    copy = tmp_path_factory.mktemp("elsewhere") / "train"
    shutil.copytree(good / "train", copy)
    assert _content_hash(copy, out / "2") == h  # where the split lives does not count
    f = copy / "a" / "1.png"
    f.write_bytes(f.read_bytes() + b"\0")  # still a PNG (trailing bytes are ignored), one byte more
    assert _content_hash(copy, out / "3") != h
    shutil.copy(good / "train" / "a" / "1.png", f)
    assert _content_hash(copy, out / "4") == h  # the same bytes back under the same name
    (copy / "a" / "1.png").rename(copy / "b" / "9.png")
    assert _content_hash(copy, out / "5") != h  # the same bytes under another class: a relabel


def test_image_extensions_match_torchvision():
    from torchvision.datasets.folder import IMG_EXTENSIONS as TV

    from tlcore.images import IMG_EXTENSIONS

    assert set(IMG_EXTENSIONS) == set(TV)


def test_embedded_domain_pairs_are_named_alike_everywhere():
    from tasks.project import config

    assert config.EMBEDDED == datasets.EMBEDDED  # config cannot import tlcore.datasets (torch) to read it
    for source, target, _ in datasets.PAIRS:
        p = config.Params.model_validate({"data": {"source": source, "target": target}})
        config._check_budget(p)
    with pytest.raises(config.ParamsError, match="smallest synth_digits class"):
        config._check_budget(
            config.Params.model_validate(
                {
                    "data": {
                        "source": "optdigits",
                        "target": "synth_digits",
                        "labels_per_class": 30,
                        "synth_per_class": 20,
                    }
                }
            )
        )


def test_shifted_optdigits_keep_labels_and_change_pixels_deterministically():
    x, y = datasets.load_optdigits()
    x = x[:60]
    rot, noisy = datasets.rotate_digits(x), datasets.corrupt_digits(x)
    assert np.array_equal(rot, datasets.rotate_digits(x)) and np.array_equal(noisy, datasets.corrupt_digits(x))
    assert rot.shape == noisy.shape == x.shape and rot.dtype == noisy.dtype == np.uint8
    assert (rot != x).mean() > 0.3 and abs(rot.mean() / x.mean() - 1) < 0.25  # moved ink, most of it kept
    corners = (slice(None), slice(0, 3), slice(0, 3))
    assert x[corners].mean() < 2 and noisy[corners].mean() > 10  # a grey, noisy veil over the background
    assert np.corrcoef(noisy.reshape(60, -1).mean(0), x.reshape(60, -1).mean(0))[0, 1] > 0.8  # the digits remain
    colour = datasets.colour_digits(x)  # MNIST-M's blend over photo patches: RGB, both polarities, digits kept
    assert colour.shape == (*x.shape, 3) and np.array_equal(colour, datasets.colour_digits(x))
    ink, ground = x > 128, x < 16
    brighter = np.array([colour[i][ink[i]].mean() > colour[i][ground[i]].mean() for i in range(60)])
    assert 0.1 < brighter.mean() < 0.9  # ink lighter than the ground on some images, darker on others
    assert np.abs(colour[..., 0].astype(int) - colour[..., 2]).mean() > 10  # in colour


def test_domain_task_builds_the_reverse_pair():
    source, target, test = datasets.domain_task(
        models.get_spec("smallcnn"), "optdigits", "synth_digits", 2, synth_test_per_class=1
    )
    assert (len(source), len(target), len(test)) == (1257, 20, 10)  # optdigits' training split as source
    assert source.classes == target.classes == datasets.CLASSES
    with pytest.raises(ValueError, match="unknown embedded dataset"):
        datasets.domain_task(models.get_spec("smallcnn"), "mnist", "optdigits", 2)


def test_batched_blur_is_torchvisions_gaussian_blur_per_image():
    import torch
    from torchvision.transforms.v2 import functional as TF

    from tlcore.datasets import gaussian_blur_each

    x = torch.rand(6, 32, 32, generator=torch.Generator().manual_seed(0))
    sig = torch.tensor([0.2, 0.5, 0.8, 1.0, 1.1, 1.2])
    want = torch.stack([TF.gaussian_blur(xi[None], kernel_size=5, sigma=float(s))[0] for xi, s in zip(x, sig)])
    assert torch.allclose(gaussian_blur_each(x, sig), want, atol=1e-6)


def test_photo_augmentation_is_batched_per_image_and_exact_at_its_limits():
    torch.manual_seed(0)
    x = torch.rand(16, 3, 24, 20)
    same = dict(scale=(1.0, 1.0), ratio=(1.0, 1.0), brightness=0.0, contrast=0.0, saturation=0.0)
    assert torch.allclose(transforms.random_photo(x, flip=0.0, **same), x, atol=1e-5)  # the whole image, unchanged
    assert torch.allclose(transforms.random_photo(x, flip=1.0, **same), x.flip(-1), atol=1e-5)  # mirrored
    out = transforms.random_photo(x, **transforms.AUGMENT["photo"]["photo"])
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1
    assert len({tuple(o.flatten().round(decimals=3).tolist()) for o in out}) == 16  # parameters per image
    # brightness alone scales each image by its own factor in [0.6, 1.4]
    flat = torch.full((8, 3, 4, 4), 0.5)
    b = transforms.random_photo(flat, flip=0.0, **{**same, "brightness": 0.4})
    f = b[:, :, 0, 0] / 0.5
    assert torch.allclose(b, b[:, :, :1, :1].expand_as(b)) and (f - f[:, :1]).abs().max() < 1e-6
    assert f.min() >= 0.6 - 1e-6 and f.max() <= 1.4 + 1e-6 and f[:, 0].unique().numel() == 8
    # a grey photo stays grey: saturation and contrast do not invent colour
    grey = torch.rand(8, 1, 6, 6).expand(8, 3, 6, 6).contiguous()
    g = transforms.random_photo(grey, flip=0.5, **{**same, "contrast": 0.4, "saturation": 0.9})
    assert torch.allclose(g[:, 0], g[:, 1], atol=1e-6) and torch.allclose(g[:, 1], g[:, 2], atol=1e-6)
    # a profile per transform: photo at train time only; digits keep the affine warp
    spec = models.get_spec("resnet18")
    train, test = (
        transforms.build_transform(spec, True, augment="photo"),
        transforms.build_transform(spec, False, augment="photo"),
    )
    assert train.photo and not train.affine and not test.photo and not test.affine
    assert (
        transforms.build_transform(spec, True).affine
        and not transforms.build_transform(spec, True, augment="none").affine
    )
    with pytest.raises(
        ValueError, match="unknown augmentation 'flips'; choose one of: digits, photo, digits_colour, none"
    ):
        transforms.build_transform(spec, True, augment="flips")


def test_photo_crops_sample_the_stored_image_beyond_the_evaluation_crop(tmp_path):
    """With torchvision's weights (shorter side to 256, centre 224) a photo's training crops are cut from a bigger
    canvas of the stored image (379 px: the smallest crop still holds 224 real pixels a side), so they reach the
    rim the evaluation view cuts off; the evaluation transform of that canvas gives the view a direct decode
    gives. Before, the split was decoded at 224 first and every crop came from inside it."""
    import dataclasses

    from tlcore import shards

    spec = dataclasses.replace(models.get_spec("resnet18"), input_size=224, resize_size=256)  # ImageNet weights'
    img = np.zeros((600, 600, 3), np.uint8)
    img[..., 1] = 200  # green, with a red rim 4 % of a side wide: outside the centre 224/256 of the image
    rim = 24
    img[:rim], img[-rim:], img[:, :rim], img[:, -rim:] = (220, 0, 0), (220, 0, 0), (220, 0, 0), (220, 0, 0)
    (tmp_path / "a").mkdir()
    Image.fromarray(img).save(tmp_path / "a" / "0.png")
    shards.write_split([(tmp_path / "a" / "0.png", 0, "a/0.png")], ["a"], tmp_path / "split", max_side=512)
    canvas = transforms.train_canvas(spec, "photo")
    assert canvas == 379 and transforms.train_canvas(spec, "digits") is None
    big = data.open_split(tmp_path / "split", canvas, 3, resize=canvas)
    direct = data.open_split(tmp_path / "split", 224, 3, resize=256)
    train = transforms.build_transform(spec, True, augment="photo")
    test = transforms.build_transform(spec, False)
    torch.manual_seed(0)
    crops = train(big.images.expand(64, -1, -1, -1).contiguous())
    assert crops.shape == (64, 3, 224, 224)
    mean, std = torch.tensor(spec.mean).view(3, 1, 1), torch.tensor(spec.std).view(3, 1, 1)
    red = ((crops * std + mean)[:, 0] > 0.5) & ((crops * std + mean)[:, 1] < 0.3)
    assert red.flatten(1).any(1).sum() >= 8  # many crops reach the rim
    view = test(big.images)
    assert view.shape == (1, 3, 224, 224) and not (((view * std + mean)[:, 0] > 0.5).any())
    assert (view - test(direct.images)).abs().mean() < 0.05  # the evaluation view, up to resampling
    assert not ((test(direct.images) * std + mean)[:, 0] > 0.5).any()  # the old path never saw the rim


def test_a_training_canvas_is_no_bigger_than_the_stored_photos(tmp_path):
    """The canvas a photo split is decoded on for random crops is capped by the photos as stored (the median of
    their shorter sides, which the index records, after any re-encoding): 256 px photos are not upsampled to 379 px
    at every read (decoding time, and no pixels the crop's resampling does not make itself). Bigger photos fill the
    whole canvas; photos smaller than the input are decoded at the input size; an index from before sides were
    recorded keeps the whole canvas. The split is held in memory by the size it is decoded at."""
    import dataclasses
    import json

    from tlcore import shards

    spec = dataclasses.replace(models.get_spec("resnet18"), input_size=224, resize_size=256)
    canvas = transforms.train_canvas(spec, "photo")

    def split(name, sizes):
        files = []
        for i, (w, h) in enumerate(sizes):
            (tmp_path / name / "a").mkdir(parents=True, exist_ok=True)
            f = tmp_path / name / "a" / f"{i}.png"
            Image.fromarray(np.full((h, w, 3), (i * 40, 90, 10), np.uint8)).save(f)
            files.append((f, 0, f"a/{i}.png"))
        shards.write_split(files, ["a"], tmp_path / f"{name}-split", max_side=512)
        return tmp_path / f"{name}-split"

    small = split("small", [(256, 300), (300, 256), (256, 256), (700, 900)])  # the last stored at 512 x 658
    assert shards.SplitIndex.load(small).side == [256, 256, 256, 512]
    ds = data.open_split(small, 224, 3, resize=256, canvas=canvas)
    assert canvas == 379 and ds.images.shape == (4, 3, 256, 256)
    direct = data.open_split(small, 256, 3, resize=256)  # the same pixels as a direct decode on that square
    assert torch.equal(ds.images, direct.images)
    assert data.open_split(split("big", [(600, 600)]), 224, 3, resize=256, canvas=canvas).images.shape[-1] == 379
    tiny = split("tiny", [(100, 120), (90, 90)])  # no bigger than the input: decoded as the test split is
    assert torch.equal(
        data.open_split(tiny, 224, 3, resize=256, canvas=canvas).images,
        data.open_split(tiny, 224, 3, resize=256).images,
    )
    stretched = data.open_split(small, 224, 3, canvas=canvas)  # no resize: the whole photo, stretched
    assert stretched.images.shape[-1] == 256
    held = data.open_split(small, 224, 3, resize=256, canvas=canvas, memory_bytes=4 * 3 * 224 * 224)
    assert held.streamed  # 4 images at 256 px take more than that
    old = json.loads((small / "index.json").read_text())
    (small / "index.json").write_text(json.dumps({**old, "side": []}))
    assert data.open_split(small, 224, 3, resize=256, canvas=canvas).images.shape[-1] == 379


def test_colour_randomisation_for_a_grey_source_of_a_colour_target():
    """`digits_colour`: an RGB batch's grey level blended over random colour textures (both polarities appear),
    grey input untouched; `auto` picks it only for a grey source whose target has colour images."""
    from tlcore.transforms import augment_profile, random_colour

    torch.manual_seed(0)
    ink = torch.zeros(64, 1, 16, 16)
    ink[:, :, 4:12, 7:9] = 1.0  # a bright stroke on black, as the grey digits are
    rgb = ink.repeat(1, 3, 1, 1)
    out = random_colour(rgb, p=1.0, grid=4)
    assert torch.equal(random_colour(ink, p=1.0, grid=4), ink)  # one channel: nothing to colour
    assert torch.equal(random_colour(rgb, p=0.0, grid=4), rgb)
    stroke, ground = out[:, :, 4:12, 7:9].mean((1, 2, 3)), out[:, :, :2, :2].mean((1, 2, 3))
    assert (stroke > ground).any() and (stroke < ground).any()  # bright ink on dark, and dark ink on bright
    assert (out[:, 0] - out[:, 1]).abs().mean() > 0.05  # colour, not grey
    assert augment_profile("source", source_grey=True, target_colour=True) == "digits_colour"
    for args in (("target", True, True), ("source", True, False), ("source", False, True)):
        assert augment_profile(*args) == "digits", args
    assert augment_profile("source", True, True, kind="photo") == "photo"


def test_auto_augmentation_follows_the_prepared_data():
    from helpers import ROOT

    from tasks.modeling.model_input import augment
    from tasks.project.config import load_params

    params = load_params(ROOT / "params.yaml", ["data.source=optdigits", "data.target=optdigits_colour"])
    manifest = {"source": {"colour_images": 0}, "target": {"colour_images": 1797}}
    assert augment(params, "source", manifest) == "digits_colour" and augment(params, "target", manifest) == "digits"
    grey = {"source": {"colour_images": 0}, "target": {"colour_images": 0}}
    assert augment(params, "source", grey) == "digits"
