import pytest
import torch

from tlcore import models

ALL = models.list_models()


def test_registry_has_required_backbones():
    assert {"resnet18", "resnet50", "mobilenet_v3_small", "efficientnet_b0", "smallcnn"} <= set(ALL)


def test_duplicate_registration_raises():
    with pytest.raises(ValueError, match="already registered"):
        models.register_model("smallcnn", input_size=32, mean=(0.5,), std=(0.5,), in_channels=1)(lambda **k: None)


def test_unknown_model_names_choices():
    with pytest.raises(KeyError, match="resnet18"):
        models.create("resnet19", 10)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("in_channels", [1, 3])
def test_forward_backward_every_param_gets_grad(name, in_channels):
    torch.manual_seed(0)
    spec = models.get_spec(name)
    m = models.create(name, num_classes=7, in_channels=in_channels)
    x = torch.randn(2, in_channels, spec.input_size, spec.input_size)
    f = m.backbone(x)
    assert f.shape == (2, m.out_features)
    out = m(x)
    assert out.shape == (2, 7) and torch.isfinite(out).all()
    out.logsumexp(1).sum().backward()
    for n, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
    m.reset_head(4)
    assert m(x).shape == (2, 4) and m.num_classes == 4


def test_imagenet_weights_absent_gives_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(models.WeightsNotFoundError, match=r"resnet18-.*\.pth.*never downloads"):
        models.create("resnet18", 10, weights="IMAGENET1K_V1")


def test_imagenet_weights_load_from_local_cache(tmp_path, monkeypatch):
    from torchvision.models import ResNet18_Weights, resnet18

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    ref = resnet18()
    path = tmp_path / "hub" / "checkpoints" / ResNet18_Weights.IMAGENET1K_V1.url.rsplit("/", 1)[1]
    path.parent.mkdir(parents=True)
    torch.save(ref.state_dict(), path)
    m = models.create("resnet18", 10, weights="IMAGENET1K_V1")
    assert torch.equal(m.backbone.layer4[1].conv2.weight, ref.layer4[1].conv2.weight)
    gray = models.create("resnet18", 10, in_channels=1, weights="IMAGENET1K_V1")
    assert torch.allclose(gray.backbone.conv1.weight[:, 0], ref.conv1.weight.mean(1) * 3)


def test_weights_file_roundtrip_skips_mismatched_head(tmp_path):
    src = models.create("smallcnn", 10)
    torch.save(src.state_dict(), tmp_path / "w.pt")
    dst = models.create("smallcnn", 3, weights=str(tmp_path / "w.pt"))
    assert torch.equal(dst.backbone[0][0].weight, src.backbone[0][0].weight)
    assert dst.num_classes == 3
    with pytest.raises(ValueError, match="do not fit"):
        models.create("tinycnn", 10, weights=str(tmp_path / "w.pt"))


def _cache_file(tmp_path, monkeypatch, arch="resnet18"):
    """The exact path torchvision (and so this project) looks for ``arch``'s DEFAULT weights under TORCH_HOME."""
    from torchvision.models import get_model_weights

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    path = tmp_path / "hub" / "checkpoints" / get_model_weights(arch).DEFAULT.url.rsplit("/", 1)[1]
    path.parent.mkdir(parents=True, exist_ok=True)
    assert models.torchvision_cache_path(get_model_weights(arch).DEFAULT) == path
    return path


def test_weights_of_another_architecture_or_shape_are_refused_naming_the_file(tmp_path, monkeypatch):
    from torchvision.models import mobilenet_v3_small, resnet18

    path = _cache_file(tmp_path, monkeypatch)
    torch.save(mobilenet_v3_small().state_dict(), path)  # another architecture under resnet18's file name
    with pytest.raises(
        ValueError,
        match=rf"weights file {path} does not fit a torchvision resnet18 \(missing \d+ "
        r"key\(s\), e\.g\. conv1\.weight.*unknown key.*features\.0\.0\.weight",
    ):
        models.create("resnet18", 10, weights="IMAGENET1K_V1")
    torch.save(resnet18(num_classes=10).state_dict(), path)  # the right keys, a changed shape
    with pytest.raises(ValueError, match=r"other shapes: fc\.weight \(10, 512\) \(a resnet18 has \(1000, 512\)\)"):
        models.create("resnet18", 10, weights="DEFAULT")
    path.write_bytes(b"<html>a proxy's error page</html>")  # a failed download saved under the name
    with pytest.raises(ValueError, match=rf"{path} for resnet18 cannot be read as a torch state_dict"):
        models.create("resnet18", 10, weights="IMAGENET1K_V1")
    own = tmp_path / "mine.pth"  # a file path: the same checks
    torch.save(mobilenet_v3_small().state_dict(), own)
    with pytest.raises(ValueError, match=rf"weights file {own} does not fit a torchvision resnet18"):
        models.create("resnet18", 10, weights=str(own))
    with pytest.raises(ValueError, match=r"unknown weights 'IMAGENET9K' for resnet18; choose one of: IMAGENET1K_V1"):
        models.create("resnet18", 10, weights="IMAGENET9K")


def test_weights_preprocessing_comes_from_torchvisions_own_transforms():
    from torchvision.models import get_model_weights

    pre = models.weights_preprocessing("resnet18", "IMAGENET1K_V1")
    t = get_model_weights("resnet18").IMAGENET1K_V1.transforms()
    assert pre == {
        "crop_size": 224,
        "resize_size": 256,
        "mean": tuple(t.mean),
        "std": tuple(t.std),
        "interpolation": "bilinear",
    }
    assert models.weights_preprocessing("efficientnet_b0", "DEFAULT")["interpolation"] == "bicubic"
    assert models.weights_preprocessing("resnet18", None) is None
    assert models.weights_preprocessing("resnet18", "models/source.pt") is None  # a file: nothing recorded
    with pytest.raises(ValueError, match="smallcnn has no torchvision weights"):
        models.weights_preprocessing("smallcnn", "IMAGENET1K_V1")
