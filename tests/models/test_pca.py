"""The one PCA (models/pca.py) and the network layers that take their axes from it."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from msretrieval.models.pca import PCA, pca_basis, principal_axes
from msretrieval.models.retrieval_net import init_linear_pca
from msretrieval.utils.errors import UserError

# Centred rows spread 3 along x and 1 along y: X^T X = diag(18, 2), singular values sqrt(18) and sqrt(2).
ROWS = torch.tensor([[3.0, 0.0], [-3.0, 0.0], [0.0, 1.0], [0.0, -1.0]], dtype=torch.float64)


def test_principal_axes_of_a_known_spread():
    axes, singular = principal_axes(ROWS, 2, exact=True)
    assert torch.allclose(axes.abs(), torch.eye(2, dtype=torch.float64))
    assert torch.allclose(singular, torch.tensor([math.sqrt(18), math.sqrt(2)], dtype=torch.float64))


def test_randomised_and_exact_paths_find_the_same_subspace():
    """Few components of wide data take the randomised SVD; on rank-2 data it finds the exact subspace."""
    generator = torch.Generator().manual_seed(0)
    directions = torch.linalg.qr(torch.randn(64, 2, generator=generator, dtype=torch.float64))[0]
    x = torch.randn(200, 2, generator=generator, dtype=torch.float64) * torch.tensor([5.0, 2.0]) @ directions.T
    x = x - x.mean(0)
    fast = pca_basis(x, 2)                 # 2 < 64 // 4: randomised
    exact = pca_basis(x, 2, exact=True)
    assert torch.allclose(fast @ fast.T, exact @ exact.T, atol=1e-8)   # the same projector
    assert torch.allclose(exact @ exact.T, directions @ directions.T, atol=1e-8)


def test_too_many_components_is_a_user_error():
    with pytest.raises(UserError, match="cannot take 3 principal components of \\(4, 2\\) data"):
        pca_basis(ROWS, 3)


def test_the_reduction_is_l2_pca_l2():
    x = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    pca = PCA(mean=torch.zeros(2), basis=torch.tensor([[1.0], [0.0]]))
    # L2 rows: (1, 0), (0, 1), (1, 1)/sqrt 2; first coordinate 1, 0, 0.707; L2 of a 1-d value is its sign (0 -> 0)
    assert torch.allclose(pca(x), torch.tensor([[1.0], [0.0], [1.0]]), atol=1e-6)


def test_a_whitened_projection_divides_each_axis_by_its_standard_deviation():
    """Std along x is sqrt(18 / 3) = sqrt(6): the first row of the weight is +-e_x / sqrt(6), the bias
    -weight @ mean = 0 for these centred rows."""
    linear = nn.Linear(2, 1)
    init_linear_pca(linear, ROWS.float(), whiten=True, option="out_dim")
    assert torch.allclose(linear.weight.abs(), torch.tensor([[1 / math.sqrt(6), 0.0]]), atol=1e-6)
    assert torch.allclose(linear.bias, torch.zeros(1), atol=1e-6)
