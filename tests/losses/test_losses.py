"""Triplet and contrastive losses against hand-computed values and cirtorch's formulas."""
from __future__ import annotations

import pytest
import torch
from pytorch_metric_learning.reducers import AvgNonZeroReducer, MeanReducer, SumReducer

from msretrieval.losses import (LOSS_NAMES, CirtorchContrastiveLoss, SquaredEuclideanTripletLoss, create_loss,
                                create_reducer, squared_euclidean_distance)


def t(values, dtype=torch.float64):
    return torch.tensor(values, dtype=dtype)


def idx(*values):
    return torch.tensor(values, dtype=torch.long)


# --- triplet --------------------------------------------------------------------------------------------

# q = (0, 0), p = (0.3, 0), n = (0, 0.4): d(q,p) = 0.09, d(q,n) = 0.16, d(p,n) = 0.25 (squared).
QPN = [[0.0, 0.0], [0.3, 0.0], [0.0, 0.4]]
QPN_LABELS = idx(0, 0, 1)


def test_powered_lp_distance_is_the_squared_euclidean_distance():
    x = torch.randn(7, 5, dtype=torch.float64)
    expected = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    torch.testing.assert_close(squared_euclidean_distance()(x), expected)


def test_triplet_hand_computed_single_triplet():
    loss = SquaredEuclideanTripletLoss()
    # max(0.1 + 0.09 - 0.16, 0) = 0.03; on plain distances it would be max(0.1 + 0.3 - 0.4, 0) = 0.
    value = loss(t(QPN), indices_tuple=(idx(0), idx(1), idx(2)))
    assert value.item() == pytest.approx(0.03)


def test_triplet_all_triplets_from_labels_and_reducers():
    # Triplets (q,p,n): 0.03 and (p,q,n): max(0.1 + 0.09 - 0.25, 0) = 0.
    assert SquaredEuclideanTripletLoss()(t(QPN), QPN_LABELS).item() == pytest.approx(0.03)      # avg non-zero
    mean = SquaredEuclideanTripletLoss(reducer=MeanReducer())(t(QPN), QPN_LABELS)
    assert mean.item() == pytest.approx(0.015)
    total = SquaredEuclideanTripletLoss(reducer=SumReducer())(t(QPN), QPN_LABELS)
    assert total.item() == pytest.approx(0.03)


def test_triplet_margin_is_applied_to_squared_distances():
    loss = SquaredEuclideanTripletLoss(margin=0.5)
    assert loss(t(QPN), indices_tuple=(idx(0), idx(1), idx(2))).item() == pytest.approx(0.5 + 0.09 - 0.16)


def test_triplet_easy_triplets_give_zero_loss_with_gradient():
    embeddings = t([[0.0, 0.0], [0.1, 0.0], [1.0, 1.0], [1.1, 1.0]]).requires_grad_()
    value = SquaredEuclideanTripletLoss()(embeddings, idx(0, 0, 1, 1))
    assert value.item() == 0.0
    value.backward()
    assert torch.count_nonzero(embeddings.grad) == 0


def test_triplet_does_not_normalise_embeddings():
    # Scaling all embeddings by 2 scales squared distances by 4: 0.1 + 0.36 - 0.64 < 0.
    assert SquaredEuclideanTripletLoss()(2 * t(QPN), indices_tuple=(idx(0), idx(1), idx(2))).item() == 0.0


def test_triplet_matches_cirtorch_formula_on_random_data():
    torch.manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(12, 8, dtype=torch.float64), dim=1)
    a, p, n = idx(0, 3, 6, 9), idx(1, 4, 7, 10), idx(2, 5, 8, 11)
    expected = torch.clamp(((x[a] - x[p]) ** 2).sum(1) - ((x[a] - x[n]) ** 2).sum(1) + 0.1, min=0)
    torch.testing.assert_close(SquaredEuclideanTripletLoss(reducer=SumReducer())(x, indices_tuple=(a, p, n)),
                               expected.sum())
    torch.testing.assert_close(SquaredEuclideanTripletLoss(reducer=MeanReducer())(x, indices_tuple=(a, p, n)),
                               expected.mean())


@pytest.mark.parametrize("loss", [SquaredEuclideanTripletLoss, CirtorchContrastiveLoss])
def test_gradient_is_finite_for_duplicate_embeddings_in_a_large_batch(loss):
    # > 25 rows: torch.cdist switches to the matrix-product path with a sqrt that must not produce NaN.
    x = torch.nn.functional.normalize(torch.randn(40, 16), dim=1)
    x[1] = x[0]
    x.requires_grad_()
    loss()(x, torch.arange(40) // 4).backward()
    assert torch.isfinite(x.grad).all()


# --- contrastive ----------------------------------------------------------------------------------------

def cirtorch_contrastive_loss(x, label, margin=0.7, eps=1e-6):
    """cirtorch.layers.functional.contrastive_loss, rewritten: x is D x N, tuples (query, positive,
    negatives...) with label -1 for queries, 1 for positives, 0 for negatives."""
    dim = x.size(0)
    nq = int(torch.sum(label == -1))
    S = x.size(1) // nq
    x1 = x[:, ::S].permute(1, 0).repeat(1, S - 1).view((S - 1) * nq, dim).permute(1, 0)
    x2 = x[:, label != -1]
    lbl = label[label != -1].to(x.dtype)
    D = torch.pow(x1 - x2 + eps, 2).sum(dim=0).sqrt()
    y = 0.5 * lbl * torch.pow(D, 2) + 0.5 * (1 - lbl) * torch.pow(torch.clamp(margin - D, min=0), 2)
    return torch.sum(y)


def cirtorch_tuples(num_tuples, num_negatives, dim, seed):
    generator = torch.Generator().manual_seed(seed)
    size = 2 + num_negatives
    x = torch.nn.functional.normalize(torch.randn(num_tuples * size, dim, generator=generator,
                                                  dtype=torch.float64), dim=1)
    label = torch.tensor(([-1, 1] + [0] * num_negatives) * num_tuples)
    queries = torch.arange(num_tuples) * size
    a1, p = queries, queries + 1
    a2 = queries.repeat_interleave(num_negatives)
    n = (queries[:, None] + 2 + torch.arange(num_negatives)).reshape(-1)
    return x, label, (a1, p, a2, n)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_contrastive_equals_cirtorch_on_random_tuples(seed):
    x, label, pairs = cirtorch_tuples(num_tuples=5, num_negatives=5, dim=16, seed=seed)
    expected = cirtorch_contrastive_loss(x.T, label)
    assert expected > 0
    torch.testing.assert_close(CirtorchContrastiveLoss()(x, indices_tuple=pairs), expected, atol=1e-5, rtol=0)


def test_contrastive_equals_cirtorch_with_other_margin_and_close_negatives():
    x, label, pairs = cirtorch_tuples(num_tuples=3, num_negatives=4, dim=4, seed=5)
    expected = cirtorch_contrastive_loss(x.T, label, margin=1.4)
    torch.testing.assert_close(CirtorchContrastiveLoss(margin=1.4)(x, indices_tuple=pairs), expected,
                               atol=1e-5, rtol=0)


def test_contrastive_hand_computed_all_pairs():
    # Ordered pairs: (0,1),(1,0) d=0.3 -> 2 * 0.5 * 0.09; (0,2),(2,0) d=0.4 -> 2 * 0.5 * 0.3^2;
    # (1,2),(2,1) d=0.5 -> 2 * 0.5 * 0.2^2.  Sum = 0.09 + 0.09 + 0.04.
    loss = CirtorchContrastiveLoss()
    assert loss(t(QPN), QPN_LABELS).item() == pytest.approx(0.22)
    mean = CirtorchContrastiveLoss(reducer=MeanReducer())(t(QPN), QPN_LABELS)
    assert mean.item() == pytest.approx(0.045 + (0.045 + 0.02) / 2)   # mean(pos) + mean(neg)


def test_contrastive_from_labels_equals_formula_over_all_ordered_pairs():
    torch.manual_seed(3)
    x = torch.nn.functional.normalize(torch.randn(16, 8, dtype=torch.float64), dim=1)
    labels = torch.arange(16) // 4
    margin = 1.5     # random unit vectors are ~1.4 apart: some negatives inside the margin, some outside
    d = torch.cdist(x, x)
    same = labels[:, None] == labels[None, :]
    off_diagonal = ~torch.eye(16, dtype=torch.bool)
    pos = 0.5 * d[same & off_diagonal] ** 2
    neg = 0.5 * torch.clamp(margin - d[~same], min=0) ** 2
    assert 0 < torch.count_nonzero(neg) < len(neg)
    total = CirtorchContrastiveLoss(margin=margin)(x, labels)
    torch.testing.assert_close(total, pos.sum() + neg.sum())
    mean = CirtorchContrastiveLoss(margin=margin, reducer=MeanReducer())(x, labels)
    torch.testing.assert_close(mean, pos.mean() + neg.mean())
    nonzero = CirtorchContrastiveLoss(margin=margin, reducer=AvgNonZeroReducer())(x, labels)
    torch.testing.assert_close(nonzero, pos[pos > 0].mean() + neg[neg > 0].mean())


def test_contrastive_single_positive_and_negative_pair_is_not_dropped():
    # PML's GenericPairLoss would return 0 here (every index tensor has length 1).
    value = CirtorchContrastiveLoss()(t(QPN), indices_tuple=(idx(0), idx(1), idx(0), idx(2)))
    assert value.item() == pytest.approx(0.5 * 0.09 + 0.5 * 0.3 ** 2)


def test_contrastive_accepts_triplets_as_pairs():
    value = CirtorchContrastiveLoss()(t(QPN), indices_tuple=(idx(0), idx(1), idx(2)))
    assert value.item() == pytest.approx(0.5 * 0.09 + 0.5 * 0.3 ** 2)


def test_contrastive_without_pairs_is_zero_with_gradient():
    embeddings = t([[0.6, 0.8]]).requires_grad_()
    value = CirtorchContrastiveLoss()(embeddings, idx(0))
    assert value.item() == 0.0
    value.backward()
    assert embeddings.grad is not None


# --- factory --------------------------------------------------------------------------------------------

def test_factory_builds_defaults():
    triplet, contrastive = create_loss("triplet"), create_loss("contrastive")
    assert isinstance(triplet, SquaredEuclideanTripletLoss) and triplet.margin == 0.1
    assert isinstance(triplet.reducer, AvgNonZeroReducer)
    assert isinstance(contrastive, CirtorchContrastiveLoss) and contrastive.margin == 0.7
    assert all(isinstance(r, SumReducer) for r in contrastive.reducer.reducers.values())
    assert set(LOSS_NAMES) == {"triplet", "contrastive", "csq", "dpsh"}


def test_factory_passes_margin_and_reducer():
    triplet = create_loss("triplet", margin=0.2, reducer="mean")
    assert triplet.margin == 0.2 and isinstance(triplet.reducer, MeanReducer)
    contrastive = create_loss("contrastive", margin=1.0, reducer=MeanReducer())
    assert contrastive.margin == 1.0
    assert all(isinstance(r, MeanReducer) for r in contrastive.reducer.reducers.values())


def test_factory_errors():
    with pytest.raises(ValueError, match="unknown loss 'arcface'"):
        create_loss("arcface")
    with pytest.raises(ValueError, match="unknown reducer 'median'"):
        create_loss("triplet", reducer="median")
    with pytest.raises(ValueError, match="margin"):
        create_loss("contrastive", margin=0)
    with pytest.raises(ValueError, match="margin"):
        create_loss("triplet", margin=-0.1)
    with pytest.raises(TypeError):
        create_loss("triplet", swap=True)
    assert isinstance(create_reducer("sum"), SumReducer)
