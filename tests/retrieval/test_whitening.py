"""PCA-whitening and Lw (cirtorch/utils/whiten.py) on data small enough to whiten by hand."""
from __future__ import annotations

import numpy as np
import pytest

from msretrieval.retrieval.aggregation.whitening import learn_lw, learn_pca_whitening, learn_whitening


def _same_up_to_row_signs(actual: np.ndarray, expected: np.ndarray) -> None:
    signs = np.sign(np.sum(actual * expected, axis=1, keepdims=True))
    np.testing.assert_allclose(actual * signs, expected, atol=1e-9)


def test_lw_by_hand():
    # pairs (ordered) of class A {(0,0), (2,0)}: differences +-(2,0); class B {(0,1), (0,2)}: +-(0,1).
    # m = mean of the 4 query sides = (0.5, 0.75); S = mean of d d^T = diag((4+4)/4, (1+1)/4) = diag(2, 0.5);
    # P1 = inv(chol(S)) = diag(1/sqrt(2), sqrt(2)).
    # P1 (x - m) for the 4 images: (-0.3536, -1.0607), (1.0607, -1.0607), (-0.3536, 0.3536), (-0.3536, 1.7678);
    # D = sum of their outer products = [[1.5, -1.5], [-1.5, 5.5]]: eigenvalues 6 and 1, eigenvectors
    # (1, -3)/sqrt(10) and (3, 1)/sqrt(10) -> P = E P1 = [[1/sqrt(20), -3/sqrt(5)], [3/sqrt(20), 1/sqrt(5)]]
    x = np.array([[0, 0], [2, 0], [0, 1], [0, 2]], dtype=float)
    whitening = learn_lw(x, np.array([7, 7, 9, 9]))
    np.testing.assert_allclose(whitening.mean, [0.5, 0.75])
    _same_up_to_row_signs(whitening.projection, np.array([[1 / np.sqrt(20), -3 / np.sqrt(5)],
                                                          [3 / np.sqrt(20), 1 / np.sqrt(5)]]))
    # (2, 0): P (1.5, -0.75) = (1.3416, 0.6708), norm 1.5 -> (2, 1)/sqrt(5), up to the signs of the rows
    y = whitening.apply(np.array([[2.0, 0.0]]))
    np.testing.assert_allclose(np.abs(y), [[2 / np.sqrt(5), 1 / np.sqrt(5)]], atol=1e-6)


def _reference_lw(x: np.ndarray, qidxs, pidxs) -> tuple[np.ndarray, np.ndarray]:
    """cirtorch's whitenlearn with its explicit pair lists (columns are descriptors there)."""
    X = x.T
    m = X[:, qidxs].mean(axis=1, keepdims=True)
    df = X[:, qidxs] - X[:, pidxs]
    S = df @ df.T / df.shape[1]
    P = np.linalg.inv(np.linalg.cholesky(S))
    df = P @ (X - m)
    eigval, eigvec = np.linalg.eig(df @ df.T)
    order = eigval.argsort()[::-1]
    return m[:, 0], eigvec[:, order].T @ P


def test_lw_closed_form_equals_the_reference_with_every_same_label_pair_listed():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(23, 5))
    labels = np.array([0] * 6 + [1] * 4 + [2] * 9 + [3, 4, 5, 6])  # 4 images alone in their label: in no pair
    pairs = [(i, j) for i in range(len(x)) for j in range(len(x)) if i != j and labels[i] == labels[j]]
    mean, projection = _reference_lw(x, [i for i, _ in pairs], [j for _, j in pairs])
    whitening = learn_lw(x, labels)
    np.testing.assert_allclose(whitening.mean, mean, atol=1e-12)
    _same_up_to_row_signs(whitening.projection, projection)


def test_pca_whitening_by_hand():
    # mean 0; covariance (1/N) sum x x^T = diag(2/4, 0.5/4) = diag(0.5, 0.125): rows (1/sqrt(0.5), 0) and
    # (0, 1/sqrt(0.125)); (1, 0.5) -> (1.4142, 1.4142) -> normalised (0.7071, 0.7071)
    x = np.array([[1, 0], [-1, 0], [0, 0.5], [0, -0.5]])
    whitening = learn_pca_whitening(x)
    np.testing.assert_allclose(whitening.mean, [0, 0], atol=1e-15)
    _same_up_to_row_signs(whitening.projection, np.array([[np.sqrt(2), 0], [0, np.sqrt(8)]]))
    np.testing.assert_allclose(np.abs(whitening.apply(np.array([[1.0, 0.5]]))), [[0.5 ** 0.5] * 2], atol=1e-6)


def test_pca_whitening_keeps_at_most_n_minus_1_directions_and_dims_truncate():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(4, 10))  # 4 images: 3 directions with variance
    assert learn_pca_whitening(x).dims == 3
    assert learn_whitening("pca", x, dims=2).dims == 2
    with pytest.raises(ValueError, match="--whiten-dims must be 1 to 3"):
        learn_whitening("pca", x, dims=4)


def test_lw_needs_two_images_with_one_label():
    with pytest.raises(ValueError, match="no two images with one label"):
        learn_lw(np.eye(3), np.array([0, 1, 2]))
    with pytest.raises(ValueError, match="needs labels"):
        learn_whitening("lw", np.eye(3))
