import pytest
import torch

from msretrieval.models.pooling import GeM, MAC, SPoC, create_pooling, gem, mac, spoc


def test_hand_computed_values():
    x = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])  # (1, 1, 2, 2)
    assert spoc(x).item() == pytest.approx(2.5)
    assert mac(x).item() == pytest.approx(4.0)
    assert gem(x, p=3).item() == pytest.approx(((1 + 8 + 27 + 64) / 4) ** (1 / 3))
    assert gem(x, p=1).item() == pytest.approx(2.5)


def test_mask_restricts_pooling_and_empty_mask_falls_back():
    x = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]]).repeat(2, 1, 1, 1)
    mask = torch.tensor([[[[1, 0], [0, 1]]], [[[0, 0], [0, 0]]]])
    assert spoc(x, mask).tolist() == [[2.5], [2.5]]  # (1+4)/2, then all four
    assert mac(x, mask).tolist() == [[4.0], [4.0]]
    assert gem(x, 3.0, mask=mask)[0].item() == pytest.approx(((1 + 64) / 2) ** (1 / 3))


def test_gem_p_is_learnable_and_gets_gradient():
    pool = GeM(p=3.0)
    x = torch.rand(2, 4, 3, 3) + 0.1
    pool(x).sum().backward()
    assert pool.p.grad is not None and pool.p.grad.abs().item() > 0
    assert not GeM(learn_p=False).p.requires_grad


def test_modules_and_factory():
    x = torch.rand(3, 5, 4, 4)
    assert torch.equal(SPoC()(x), spoc(x)) and torch.equal(MAC()(x), mac(x))
    assert isinstance(create_pooling("gem"), GeM)
    with pytest.raises(ValueError, match="unknown pooling"):
        create_pooling("nope")
