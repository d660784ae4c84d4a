"""MSBD's pluggable saliency network: a state dict loaded into an importable module, never code from a file."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from msretrieval.baselines.msbd.saliency import create_saliency
from msretrieval.utils.errors import UserError

WEIGHT, BIAS = (0.5, -1.0, 2.0), 0.25


def build():
    """The saliency network a user would name: map = 0.5 R - 1.0 G + 2.0 B + 0.25 (a 1x1 convolution)."""
    return nn.Conv2d(3, 1, kernel_size=1)


def trained_state() -> dict:
    return {"weight": torch.tensor(WEIGHT).reshape(1, 3, 1, 1), "bias": torch.tensor([BIAS])}


SPEC = f"network:{__name__}:build@"


def test_a_state_dict_in_a_named_module_gives_its_map(tmp_path):
    save_file(trained_state(), str(tmp_path / "net.safetensors"))
    rgb = np.array([[[0, 0, 0], [255, 0, 0]], [[0, 255, 0], [0, 0, 255]], [[255, 255, 255], [0, 0, 51]]],
                   dtype=np.uint8)  # (3, 2, 3)
    # by hand: 0.25, 0.75, -0.75, 2.25 / 1.75, 0.65 (51/255 = 0.2 -> 0.4 + 0.25); min-max to [0, 1] over 3.0
    raw = np.array([[0.25, 0.75], [-0.75, 2.25], [1.75, 0.65]])
    expected = (raw + 0.75) / 3.0
    np.testing.assert_allclose(create_saliency(SPEC + str(tmp_path / "net.safetensors"))(rgb), expected, atol=1e-6)
    torch.save(trained_state(), tmp_path / "net.pth")  # a plain-tensor .pth state dict is as good
    np.testing.assert_allclose(create_saliency(SPEC + str(tmp_path / "net.pth"))(rgb), expected, atol=1e-6)


def test_torchscript_is_refused_without_loading_the_file(tmp_path, monkeypatch):
    scripted = torch.jit.script(build())
    scripted.save(str(tmp_path / "net.pt"))

    def never(*args, **kwargs):
        raise AssertionError("torch.jit.load was called on a user file")

    monkeypatch.setattr(torch.jit, "load", never)
    with pytest.raises(UserError, match="TorchScript files are no longer loaded"):
        create_saliency(f"torchscript:{tmp_path / 'net.pt'}")
    with pytest.raises(UserError, match=r"refusing .*net\.pt: it is not a plain-tensor checkpoint"):
        create_saliency(SPEC + str(tmp_path / "net.pt"))  # a TorchScript archive named as weights


def test_a_pickled_module_is_refused_and_nothing_in_it_runs(tmp_path):
    torch.save(build(), tmp_path / "net.pth")  # a whole pickled nn.Module: unpickling would run code
    with pytest.raises(UserError, match=r"refusing .*net\.pth: it is not a plain-tensor checkpoint"):
        create_saliency(SPEC + str(tmp_path / "net.pth"))


@pytest.mark.parametrize("spec, message", [
    ("network:nowhere", "must read network:MODULE:FACTORY@WEIGHTS"),
    ("network:no_such_module_xyz:build@w.safetensors", "cannot be imported"),
    (SPEC + "net.pt2", r"expected a state dict \(\.safetensors, \.pt, \.pth\)"),
])
def test_a_wrong_spec_is_one_line(spec, message):
    with pytest.raises(UserError, match=message):
        create_saliency(spec)


def test_weights_of_another_network_are_named(tmp_path):
    save_file({"weight": torch.zeros(1, 4, 1, 1), "bias": torch.zeros(1), "extra": torch.zeros(2)},
              str(tmp_path / "net.safetensors"))
    with pytest.raises(UserError, match=r"do not fit the network: missing \[\], unexpected \['extra'\], "
                                        r"other shapes \['weight'\]"):
        create_saliency(SPEC + str(tmp_path / "net.safetensors"))
