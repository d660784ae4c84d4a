"""Multi-scale descriptors of a trained network, against cirtorch's ``extract_ms`` (cirtorch/networks/
imageretrievalnet.py): v = sum over scales s of net(input resized by s with bilinear ``interpolate``,
``align_corners=False``; the input itself at s = 1) ** msp, then / len(ms), ** (1 / msp), / ||v||; with
cirtorch's default msp = 1 that is the L2-normalised sum."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from msretrieval.models.retrieval_net import create_model
from msretrieval.retrieval.descriptors.trained import TrainedModelMethod
from msretrieval.utils.errors import UserError

SCALES = (1.0, 1 / math.sqrt(2), math.sqrt(2))


@pytest.fixture(scope="module")
def network():
    torch.manual_seed(0)
    model = create_model("gem", backbone="resnet18", pretrained=False).eval()
    return model


def cirtorch_extract_ms(net, image, ms, msp=1.0):
    """Transcribed from cirtorch's extract_ms (one image, a batch of 1)."""
    v = torch.zeros(net.out_dim)
    for s in ms:
        input_t = image if s == 1 else F.interpolate(image, scale_factor=s, mode="bilinear", align_corners=False)
        v += net(input_t).pow(msp).squeeze()
    v /= len(ms)
    v = v.pow(1.0 / msp)
    return v / torch.norm(v)


def test_the_descriptor_is_cirtorchs_multi_scale_descriptor(network):
    images = torch.rand(2, 3, 72, 88)
    with torch.no_grad():
        got = TrainedModelMethod(network, "net", scales=SCALES).encode(images)
        expected = torch.stack([cirtorch_extract_ms(network, image[None], SCALES) for image in images])
        single = TrainedModelMethod(network, "net").encode(images)
    assert torch.allclose(got, expected, atol=1e-6)
    assert not torch.allclose(got, single, atol=1e-3)  # the other scales change it
    assert torch.equal(single, network(images))


def test_scales_key_the_cache_and_are_refused_for_a_hashing_network(network):
    assert "scales" not in TrainedModelMethod(network, "net").config()  # single-scale keys as before
    assert TrainedModelMethod(network, "net", scales=(1.0, 0.5)).config()["scales"] == [1.0, 0.5]
    with pytest.raises(UserError, match="descriptor scales must be positive numbers"):
        TrainedModelMethod(network, "net", scales=(1.0, 0.0))
    hashing = create_model("gem", backbone="resnet18", pretrained=False, hash_bits=16).eval()
    with pytest.raises(UserError, match="multi-scale descriptors need a float network; this one hashes"):
        TrainedModelMethod(hashing, "hash", scales=SCALES)
