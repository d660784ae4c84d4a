"""alpha-QE and alpha-DBA (Radenovic et al. 2018) on tiny examples computed by hand from the definitions:
new vector = normalise(itself + sum over its top n neighbours of similarity ** alpha x neighbour)."""
from dataclasses import dataclass

import numpy as np
import pytest

from msretrieval.retrieval.descriptors.methods import RetrievalMethod
from msretrieval.retrieval.aggregation.postprocess import database_augmentation, postprocess, query_expansion
from msretrieval.retrieval.search.scores import DenseScores
from msretrieval.utils.errors import UserError


def unit(*values):
    vector = np.array(values, dtype=np.float64)
    return vector / np.linalg.norm(vector)


# 2-D database: d0 = (1, 0), d1 = (0, 1), d2 = (0.6, 0.8)
DATABASE_2D = np.array([[1, 0], [0, 1], [0.6, 0.8]], dtype=np.float32)


def test_qe_weights_neighbours_by_similarity_to_the_power_alpha():
    # q = (1, 0): similarities 1 (d0), 0 (d1), 0.6 (d2); top 2 = d0, d2; weights 1 ** 3 = 1, 0.6 ** 3 = 0.216
    # q + d0 + 0.216 d2 = (1 + 1 + 0.1296, 0.1728)
    expanded = query_expansion(np.array([[1, 0]], np.float32), DATABASE_2D, n=2, alpha=3)
    np.testing.assert_allclose(expanded[0], unit(2.1296, 0.1728), rtol=1e-6)
    # q = (0.6, 0.8): similarities 0.6, 0.8, 1; top 2 = d2 (1), d1 (0.8); alpha 1: q + d2 + 0.8 d1 = (1.2, 2.4)
    expanded = query_expansion(np.array([[0.6, 0.8]], np.float32), DATABASE_2D, n=2, alpha=1)
    np.testing.assert_allclose(expanded[0], unit(1, 2), rtol=1e-6)


def test_qe_with_no_neighbours_or_only_dissimilar_ones_keeps_the_query():
    query = np.array([[1, 0]], np.float32)
    np.testing.assert_array_equal(query_expansion(query, DATABASE_2D, n=0), query)
    # similarities -1 and 0: negative ones are clipped to weight 0 (not NaN, even for a non-integer alpha)
    opposite = np.array([[-1, 0], [0, 1]], np.float32)
    np.testing.assert_allclose(query_expansion(query, opposite, n=2, alpha=0.5), query)


def test_leave_one_out_qe_skips_the_query_own_database_copy():
    # queries = database = r0 (1, 0), r1 (0.6, 0.8), r2 (0, 1); n = 1, alpha = 3
    rows = np.array([[1, 0], [0.6, 0.8], [0, 1]], np.float32)
    expanded = query_expansion(rows, rows, n=1, alpha=3, exclude_self=True)
    # r0: itself excluded; r1 (0.6) before r2 (0): r0 + 0.216 r1 = (1.1296, 0.1728)
    np.testing.assert_allclose(expanded[0], unit(1.1296, 0.1728), rtol=1e-6)
    # r1: r2 (0.8) before r0 (0.6): r1 + 0.512 r2 = (0.6, 1.312)
    np.testing.assert_allclose(expanded[1], unit(0.6, 1.312), rtol=1e-6)
    # r2: r1 (0.8): r2 + 0.512 r1 = (0.3072, 1.4096)
    np.testing.assert_allclose(expanded[2], unit(0.3072, 1.4096), rtol=1e-6)


def test_dba_augments_each_database_vector_with_its_other_neighbours():
    # 3-D: a = (1, 0, 0), b = (0.8, 0.6, 0), c = (0, 0, 1); n = 1, alpha = 2
    database = np.array([[1, 0, 0], [0.8, 0.6, 0], [0, 0, 1]], np.float32)
    augmented = database_augmentation(database, n=1, alpha=2)
    # a: neighbour b (0.8, weight 0.64): a + 0.64 b = (1.512, 0.384, 0)
    np.testing.assert_allclose(augmented[0], unit(1.512, 0.384, 0), rtol=1e-6)
    # b: neighbour a (0.8): b + 0.64 a = (1.44, 0.6, 0)
    np.testing.assert_allclose(augmented[1], unit(1.44, 0.6, 0), rtol=1e-6)
    # c: similarity 0 to both: weight 0, c unchanged
    np.testing.assert_allclose(augmented[2], [0, 0, 1], atol=1e-7)


@dataclass
class Options:
    query_expansion: int = 0
    qe_alpha: float = 3.0
    dba: int = 0
    dba_alpha: float = 3.0


class Plain(RetrievalMethod):  # inner products of float descriptors (the base class's scores)
    pass


def test_postprocess_applies_dba_before_qe_and_records_it():
    database = np.array([[1, 0, 0], [0.8, 0.6, 0], [0, 0, 1]], np.float32)
    query = np.array([[0.6, 0, 0.8]], np.float32)
    options = Options(query_expansion=2, qe_alpha=1, dba=1, dba_alpha=2)
    queries, augmented, applied = postprocess(options, Plain("plain"), query, database, leave_one_out=False)
    # DBA as above: a' = (1.512, 0.384, 0) / 1.56, b' = (1.44, 0.6, 0) / 1.56 (both norms are 1.56), c' = c
    a_dba = np.array([1.512, 0.384, 0]) / 1.56
    np.testing.assert_allclose(augmented[0], a_dba, rtol=1e-6)
    # QE against the augmented database: similarities a' 0.6 * 1.512 / 1.56, b' 0.6 * 1.44 / 1.56, c 0.8;
    # top 2 = c, a'; alpha 1: q + 0.8 c + (0.9072 / 1.56) a'
    expected = np.array([0.6, 0, 0.8]) + 0.8 * np.array([0, 0, 1]) + (0.9072 / 1.56) * a_dba
    np.testing.assert_allclose(queries[0], expected / np.linalg.norm(expected), rtol=1e-6)
    assert applied == {"postprocess": {"query_expansion": 2, "qe_alpha": 1, "dba": 1, "dba_alpha": 2,
                                       "qe_excludes_own_copy": False}}
    # nothing asked: the same arrays back, nothing recorded
    assert postprocess(Options(), Plain("plain"), query, database, False) == (query, database, {})


class Binary(RetrievalMethod):
    descriptor_kind = "binary"


class Dissimilar(RetrievalMethod):
    def scores(self, queries, database):
        return DenseScores(-np.abs(queries[:, :1] - database[:, 0]))


@pytest.mark.parametrize("method", [Binary("codes"), Dissimilar("msbd-like")])
def test_methods_not_ranked_by_inner_product_are_refused_in_one_line(method):
    rows = np.eye(3, dtype=np.float32)
    with pytest.raises(UserError, match=f"method {method.name} is not one") as error:
        postprocess(Options(dba=2), method, rows, rows, leave_one_out=True)
    assert "\n" not in str(error.value)


def test_the_harness_evaluates_the_expanded_descriptors_and_says_so(make_labelled_set):
    import torch

    from msretrieval.data.manifest import read_csv_manifest
    from msretrieval.retrieval.evaluation.benchmarks import LabelledBenchmark
    from msretrieval.retrieval.descriptors.extract import extract
    from msretrieval.retrieval.evaluation.harness import EvalSettings, _transform, evaluate_method
    from msretrieval.retrieval.evaluation.catalogue import MethodContext, create_method
    from msretrieval.retrieval.search.scores import InnerProductScores

    bench = LabelledBenchmark(name="toy", images=read_csv_manifest(make_labelled_set(num_classes=3, per_class=3)))
    assert bench.queries_are_database  # leave-one-out: QE must skip each query's own copy
    torch.manual_seed(0)
    method = create_method("gem", MethodContext(backbone="resnet18", pretrained=False))
    settings = EvalSettings(image_size=64, batch_size=2, cache_dir=None, query_expansion=2, qe_alpha=1.0, dba=1,
                            dba_alpha=2.0)
    result = evaluate_method(method, bench, settings)
    assert result.config["postprocess"] == {"query_expansion": 2, "qe_alpha": 1.0, "dba": 1, "dba_alpha": 2.0,
                                            "qe_excludes_own_copy": True}
    plain = extract(method, bench.database_dataset(_transform(method, bench, settings)), batch_size=2).descriptors
    database = database_augmentation(plain, 1, 2.0)
    queries = query_expansion(plain, database, 2, 1.0, exclude_self=True)
    assert result.metrics == pytest.approx(bench.evaluate(InnerProductScores(queries, database)))
