"""Harness methods ``asym:CODES`` and ``rerank@R:[asym:|asym-fast:]CODES`` end to end on tiny networks and images: their
descriptor rows, the cache's two kinds (float queries, packed database), and the metrics they produce."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from msretrieval.data.manifest import read_csv_manifest
from msretrieval.data.transforms import EvalTransform
from msretrieval.models.hashing import learn_pca_signs
from msretrieval.models.retrieval_net import create_model, save_model
from msretrieval.retrieval.descriptors.code_search import (ASYMMETRIC_SPEC, RERANK_SPEC, AsymmetricCodeMethod,
                                                            RerankedCodeMethod)
from msretrieval.retrieval.descriptors.trained import PCASignTrainedMethod
from msretrieval.retrieval.evaluation.benchmarks import LabelledBenchmark
from msretrieval.retrieval.evaluation.catalogue import MethodContext, create_method
from msretrieval.retrieval.evaluation.harness import EvalSettings, evaluate_methods
from msretrieval.retrieval.search.binary import AsymmetricScores, pack_bits
from msretrieval.retrieval.search.scores import InnerProductScores
from msretrieval.retrieval.search.two_stage import RerankScores, TwoStageIndex
from msretrieval.utils.errors import UserError

from tests.conftest import write_labelled_set
from tests.models.test_hashing_net import hashing_net


@pytest.mark.parametrize("spec, parts", [
    ("rerank@100:itq@64:run:a", ("100", None, "itq@64:run:a")),
    ("rerank@5:asym:run:a", ("5", "asym:", "run:a")), ("rerank@5:asym-fast:run:a", ("5", "asym-fast:", "run:a")),
    ("rerank@5:rerank@5:run:a", None), ("rerank@:run:a", None), ("rerank@5:asym:asym:run:a", None),
    ("rerank@5:asym-fast:asym:run:a", None), ("rerank@5:asym:asym-fast:run:a", None)])
def test_rerank_specs(spec, parts):
    match = RERANK_SPEC.fullmatch(spec)
    assert (match.group("shortlist", "asymmetric", "codes") if match else None) == parts


def test_asymmetric_spec_takes_a_code_spec_only():
    assert ASYMMETRIC_SPEC.fullmatch("asym:pcasign@16:model:m.pth").group("codes") == "pcasign@16:model:m.pth"
    assert ASYMMETRIC_SPEC.fullmatch("asym:rerank@5:run:a") is None
    assert ASYMMETRIC_SPEC.fullmatch("asym:asym-fast:run:a") is None


@pytest.fixture
def toy(tmp_path, one_thread):
    """A labelled benchmark (3 classes x 4 images) with a training split of 5 classes x 4 images."""
    bench = read_csv_manifest(write_labelled_set(tmp_path / "bench", num_classes=3, per_class=4, seed=0))
    train = read_csv_manifest(write_labelled_set(tmp_path / "train", num_classes=5, per_class=4, seed=1))
    return LabelledBenchmark(name="toy", images=bench, training=train)


def _descriptors(toy, encode, preprocessing) -> list[torch.Tensor]:
    """``encode``'s outputs for the benchmark's images, one at a time, as the harness resizes them."""
    dataset = toy.database_dataset(EvalTransform(64, "shorter", preprocessing.mean, preprocessing.std))
    with torch.no_grad():
        parts = [encode(dataset[i][0][None]) for i in range(len(dataset))]
    return [torch.cat(column) for column in zip(*parts)]


def test_hashing_network_searched_asymmetrically_and_reranked(toy, tmp_path):
    model = hashing_net(16)
    save_model(model, tmp_path / "hash.pth")
    spec = f"model:{tmp_path / 'hash.pth'}"
    context = MethodContext()
    names = [spec, f"asym:{spec}", f"rerank@3:{spec}", f"rerank@100:{spec}", f"rerank@3:asym-fast:{spec}",
             f"rerank@100:asym-fast:{spec}"]
    methods = [create_method(name, context) for name in names]
    assert isinstance(methods[1], AsymmetricCodeMethod) and methods[1].asymmetric
    assert isinstance(methods[2], RerankedCodeMethod) and not methods[2].asymmetric
    assert methods[4].asymmetric and methods[4].fast_scan and not methods[2].fast_scan
    settings = EvalSettings(image_size=64, batch_size=1, cache_dir=str(tmp_path / "cache"))
    results = {r.method: r for r in evaluate_methods(methods, toy, settings)}
    assert [results[name].descriptor_bytes for name in names] == [2] * 6  # the codes, what stays in RAM
    assert results[f"rerank@3:{spec}"].config["float_bytes_on_disk"] == 4 * 512  # resnet18's GeM descriptor

    projection, bits, floats = _descriptors(toy, methods[1].codes.code_parts, model.preprocessing)
    with torch.no_grad():  # the float descriptor is the hashing layer's input, L2-normalised
        fmap = model.feature_map(toy.database_dataset(EvalTransform(64, "shorter", model.preprocessing.mean,
                                                                    model.preprocessing.std))[0][0][None])
        torch.testing.assert_close(projection[:1], model.head.hash.linear(model.head.descriptor(fmap)))
    assert torch.equal(bits, projection >= 0)
    torch.testing.assert_close(floats.norm(dim=1), torch.ones(12))
    asymmetric = toy.evaluate(AsymmetricScores(projection.numpy(), pack_bits(bits.numpy())))
    exact = toy.evaluate(InnerProductScores(floats, floats))
    codes = pack_bits(bits.numpy())
    shortlisted = toy.evaluate(RerankScores(TwoStageIndex(codes, floats.numpy(), 3), codes, floats.numpy()))
    fast = toy.evaluate(RerankScores(TwoStageIndex(codes, floats.numpy(), 3, asymmetric=True, fast_scan=True),
                                     projection.numpy(), floats.numpy()))
    for name, expected in ((f"asym:{spec}", asymmetric), (f"rerank@100:{spec}", exact),
                           (f"rerank@3:{spec}", shortlisted), (f"rerank@100:asym-fast:{spec}", exact),
                           (f"rerank@3:asym-fast:{spec}", fast)):
        for metric, value in expected.items():
            assert results[name].metrics[metric] == pytest.approx(value, abs=1e-6), (name, metric)
    assert shortlisted != exact  # a shortlist of 3 loses some of the float ranking here

    # the cache holds float32 queries and packed database codes for asym:, one uint8 entry of codes + floats
    # for rerank@R: (queries are database rows: described once)
    cached = [(path.name, np.load(path)) for path in (tmp_path / "cache").rglob("*.npy")]
    asym = [array for name, array in cached if name.startswith("asym")]
    assert sorted((a.dtype.str, a.shape) for a in asym) == [("<f4", (12, 16)), ("|u1", (12, 2))]
    queries, database = sorted(asym, key=lambda a: a.dtype.str)
    torch.testing.assert_close(torch.from_numpy(queries), projection)
    np.testing.assert_array_equal(database, codes)
    rerank = [array for name, array in cached if name.startswith("rerank") and "asym-fast" not in name]
    assert [(a.dtype.str, a.shape) for a in rerank] == [("|u1", (12, 2 + 4 * 512))] * 2
    # asym-fast: float32 projection + floats for the queries, codes + float bytes for the database
    fast = [array for name, array in cached if "asym-fast" in name]
    assert sorted((a.dtype.str, a.shape) for a in fast) == \
        [("<f4", (12, 16 + 512))] * 2 + [("|u1", (12, 2 + 4 * 512))] * 2


def test_itq_and_pca_sign_codes_searched_asymmetrically_and_reranked(toy, tmp_path):
    torch.manual_seed(0)
    model = create_model("gem", backbone="resnet18", out_dim=32).eval()
    model.head.initialise([model.feature_map(torch.rand(70, 3, 64, 64))])
    save_model(model, tmp_path / "float.pth")
    target = f"model:{tmp_path / 'float.pth'}"
    names = [f"asym:itq@16:{target}", f"rerank@4:itq@16:{target}", f"rerank@4:asym:pcasign@16:{target}",
             f"rerank@100:pcasign@16:{target}"]
    context = MethodContext()
    methods = [create_method(name, context) for name in names]
    assert isinstance(methods[2].codes, PCASignTrainedMethod) and methods[2].asymmetric and methods[2].needs_fit()
    settings = EvalSettings(image_size=64, batch_size=4, cache_dir=None)
    results = evaluate_methods(methods, toy, settings)
    assert [r.method for r in results] == names
    for result in results:
        assert result.descriptor_bytes == 2 and result.config["fit_set"]["images"] == 20
        assert all(np.isfinite(list(result.metrics.values())))
    assert results[0].config["codes"]["itq_bits"] == 16 and results[2].config["codes"]["pcasign_bits"] == 16
    # PCA signs: the principal axes of the training descriptors (shared by the methods of one checkpoint)
    training = next(value for key, value in context._shared.items() if key[0] == "training descriptors")
    reference = learn_pca_signs(training, 16)
    np.testing.assert_allclose(np.abs(methods[2].codes.itq.projection.T @ reference.projection), np.eye(16), atol=1e-4)
    # R >= N: every item re-ranked by the network's float descriptors
    floats = _descriptors(toy, lambda images: (model(images),), model.preprocessing)[0]
    for metric, value in toy.evaluate(InnerProductScores(floats, floats)).items():
        assert results[3].metrics[metric] == pytest.approx(value, abs=1e-6), metric


def test_pca_signs_are_the_signs_of_the_principal_components():
    # rows +-a +-b with a = (3, 1, 0) orthogonal to b = (-0.5, 1.5, 0): mean 0, covariance 4 a a^T + 4 b b^T, so
    # the principal axes are a / |a| (|a|^2 = 10) then b / |b| (|b|^2 = 2.5), each up to its sign
    a, b = np.array([3, 1, 0]), np.array([-0.5, 1.5, 0])
    x = np.stack([a + b, a - b, -a + b, -a - b])
    codes = learn_pca_signs(x, 2)
    axes = np.stack([a / np.sqrt(10), b / np.sqrt(2.5)])
    agreement = codes.projection.T @ axes.T
    np.testing.assert_allclose(np.abs(agreement), np.eye(2), atol=1e-6)
    signs = np.sign(np.diag(agreement))
    # the rows' signs on (a, b): (+, +), (+, -), (-, +), (-, -), flipped where an axis came out negated
    expected = np.array([[1, 1], [1, -1], [-1, 1], [-1, -1]]) * signs > 0
    np.testing.assert_array_equal(codes.encode(x), expected)


def test_code_search_of_a_float_network_is_one_clear_error(tmp_path):
    torch.manual_seed(0)
    save_model(create_model("gem", backbone="resnet18", out_dim=32).eval(), tmp_path / "float.pth")
    for name in (f"asym:model:{tmp_path / 'float.pth'}", f"rerank@10:pca@8:model:{tmp_path / 'float.pth'}"):
        with pytest.raises(UserError, match="has no binary code"):
            create_method(name, MethodContext())
