"""A method's top-k search is exactly the ranking of its own scores, whatever its descriptors hold."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import msretrieval.retrieval.search.scores
from msretrieval.models.retrieval_net import create_model
from msretrieval.retrieval.search.binary import HammingScores
from msretrieval.retrieval.evaluation.harness import EvalSettings, _save_top_k
from msretrieval.retrieval.evaluation.catalogue import MethodContext, create_method
from msretrieval.retrieval.search.scores import DenseScores
from msretrieval.retrieval.descriptors.trained import TrainedModelMethod


def brute_force_top_k(matrix: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Best first; equal scores in ascending database index."""
    order = np.stack([np.lexsort((np.arange(len(row)), -row))[:k] for row in matrix])
    return np.take_along_axis(matrix, order, axis=1), order


def assert_search_is_the_score_ranking(method, queries, database, k):
    matrix = method.scores(queries, database).rows(0, len(queries)).numpy()
    scores, indices = method.search(queries, database, k)
    expected_scores, expected_indices = brute_force_top_k(matrix, k)
    assert scores.shape == indices.shape == (len(queries), min(k, len(database)))
    np.testing.assert_array_equal(scores, expected_scores)
    np.testing.assert_array_equal(indices, expected_indices)


def tied_codes(rng, count: int, code_bytes: int) -> np.ndarray:
    """Packed codes drawn from a few distinct ones, so many Hamming distances tie."""
    pool = rng.integers(0, 256, (6, code_bytes), dtype=np.uint8)
    return pool[rng.integers(0, len(pool), count)]


def msbd_descriptors(rng, count: int, code_bytes: int, classes: int = 4) -> np.ndarray:
    """[code bytes as 0..255, class probabilities] rows; every item appears twice, so dissimilarities tie."""
    codes = tied_codes(rng, count // 2, code_bytes).astype(np.float32)
    probs = rng.dirichlet(np.ones(classes), count // 2).astype(np.float32)
    rows = np.concatenate([codes, probs], axis=1)
    return rows[rng.permutation(np.repeat(np.arange(count // 2), 2))]


@pytest.fixture(scope="module")
def msbd_context():
    return MethodContext(backbone="tf_efficientnet_lite0", pretrained=False)


def test_top_k_rows_keeps_the_lowest_indices_among_ties(monkeypatch):
    rng = np.random.default_rng(0)
    matrix = rng.integers(0, 4, (9, 40)).astype(np.float32)  # four values: ties everywhere, also at the cut
    monkeypatch.setattr(msretrieval.retrieval.search.scores, "_SEARCH_BLOCK_ELEMENTS", 100)  # two query rows per block
    for k in (1, 5, 17, 40, 60):
        scores, indices = DenseScores(matrix).top_k(k)
        expected_scores, expected_indices = brute_force_top_k(matrix, k)
        np.testing.assert_array_equal(scores, expected_scores)
        np.testing.assert_array_equal(indices, expected_indices)


def test_top_k_rejects_nan_and_k_below_one():
    with pytest.raises(ValueError, match="NaN"):
        DenseScores(np.array([[0.0, np.nan, 1.0]])).top_k(1)
    with pytest.raises(ValueError, match="at least 1"):
        DenseScores(np.zeros((2, 3))).top_k(0)


def test_float_method_search():
    rng = np.random.default_rng(1)
    method = create_method("gem", MethodContext(backbone="resnet18", pretrained=False))
    database = rng.standard_normal((120, 32)).astype(np.float32)
    database[60:] = database[:60]  # duplicates: equal inner products
    queries = rng.standard_normal((15, 32)).astype(np.float32)
    for k in (1, 10, 200):
        assert_search_is_the_score_ranking(method, queries, database, k)


def test_trained_model_method_search():
    torch.manual_seed(0)
    method = TrainedModelMethod(create_model("gem", backbone="resnet18", out_dim=16).eval(), name="model:toy")
    descriptors = method.encode(torch.randn(24, 3, 32, 32)).numpy()
    assert descriptors.shape == (24, 16)
    assert_search_is_the_score_ranking(method, descriptors[:6], descriptors, 5)


@pytest.mark.parametrize("name", ["msbd_h@32", "itq@64"])
def test_hamming_method_search_matches_the_faiss_tie_rule(msbd_context, name):
    rng = np.random.default_rng(2)
    method = create_method(name, msbd_context)
    database = tied_codes(rng, 300, method.code_bytes)
    queries = np.concatenate([database[:4], tied_codes(rng, 6, method.code_bytes)])
    assert method.descriptor_kind == "binary"
    for k in (1, 10, 120):  # ties at the cut: FAISS must keep the lowest indices, as the brute force does
        assert_search_is_the_score_ranking(method, queries, database, k)


@pytest.mark.parametrize("name", ["msbd@32", "msbd_s@64"])
def test_msbd_dissimilarity_search(msbd_context, name):
    rng = np.random.default_rng(3)
    method = create_method(name, msbd_context)
    database = msbd_descriptors(rng, 200, method.code_bytes)
    queries = np.concatenate([database[:5], msbd_descriptors(rng, 10, method.code_bytes)])
    for k in (1, 10, 50):
        assert_search_is_the_score_ranking(method, queries, database, k)
    # the query's own row has dissimilarity 0, the smallest possible: it (or its duplicate) comes first
    scores, indices = method.search(database, database, 1)
    assert (scores[:, 0] == 0).all()


def test_hamming_scores_search_with_one_byte_codes():
    rng = np.random.default_rng(4)
    codes = rng.integers(0, 4, (500, 1), dtype=np.uint8)  # 2 effective bits: huge ties
    source = HammingScores(codes[:20], codes)
    scores, indices = source.top_k(64)
    expected_scores, expected_indices = brute_force_top_k(source.rows(0, 20).numpy(), 64)
    np.testing.assert_array_equal(scores, expected_scores)
    np.testing.assert_array_equal(indices, expected_indices)


def test_harness_saves_the_methods_own_top_k(msbd_context, tmp_path):
    """The harness's --top-k for msbd: the Eq. 7 ranking without the query itself, not a float search of the
    stored [code bytes, probabilities] rows."""
    rng = np.random.default_rng(5)
    method = create_method("msbd@32", msbd_context)
    descriptors = msbd_descriptors(rng, 60, method.code_bytes)
    benchmark = SimpleNamespace(name="toy", queries_are_database=True)
    _save_top_k(method, descriptors, descriptors, EvalSettings(cache_dir=str(tmp_path), top_k=5), benchmark)
    saved = np.load(tmp_path / "topk" / "toy-msbd_32.npz")
    matrix = method.scores(descriptors, descriptors).rows(0, len(descriptors)).numpy()
    np.fill_diagonal(matrix, -np.inf)  # the query itself is dropped
    expected_scores, expected_indices = brute_force_top_k(matrix, 5)
    np.testing.assert_array_equal(saved["scores"], expected_scores)
    np.testing.assert_array_equal(saved["indices"], expected_indices)
