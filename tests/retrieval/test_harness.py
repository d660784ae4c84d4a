"""End to end: data -> method -> descriptors (cached) -> scores -> metrics -> report."""
import json

import numpy as np
import pytest

from msretrieval.data.manifest import read_csv_manifest
from msretrieval.retrieval.evaluation.benchmarks import LabelledBenchmark, create_benchmark
from msretrieval.retrieval.descriptors.extract import extract
from msretrieval.retrieval.evaluation.harness import EvalSettings, evaluate_method, format_table, report, write_report
from msretrieval.retrieval.search.index import SearchIndex
from msretrieval.retrieval.evaluation.catalogue import MethodContext, create_method, available_methods
from msretrieval.retrieval.evaluation.reference_metrics import labelled_evaluate


def test_registry_has_baselines_and_rejects_unknown():
    assert {"gem", "gap", "mac"} <= set(available_methods())
    with pytest.raises(ValueError, match="unknown method"):
        create_method("nope")


def test_batched_extraction_equals_one_by_one(make_labelled_set):
    csv = make_labelled_set(num_classes=2, per_class=3)
    # Two sizes so the size buckets matter.
    from PIL import Image
    img = Image.open(csv.parent / "images/c0_0.jpg")
    img.resize((30, 60)).save(csv.parent / "images/c0_0.jpg")
    method = create_method("gem", MethodContext(backbone="resnet18", pretrained=False))
    bench = LabelledBenchmark(name="toy", images=read_csv_manifest(csv))
    from msretrieval.data.transforms import EvalTransform
    transform = EvalTransform(64, "shorter")
    single = extract(method, bench.database_dataset(transform), batch_size=1).descriptors
    batched = extract(method, bench.database_dataset(transform), batch_size=4).descriptors
    np.testing.assert_allclose(batched, single, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(single, axis=1), 1.0, rtol=1e-5)


def test_flowers_slice_end_to_end(flowers_root, tmp_path):
    bench = create_benchmark("flowers102", flowers_root, limit=204)  # 4 images of each of the 51 classes
    method = create_method("gem")  # pretrained EfficientNet-Lite0 (offline weights)
    settings = EvalSettings(image_size=128, cache_dir=str(tmp_path / "cache"), top_k=3)
    result = evaluate_method(method, bench, settings)
    assert set(result.metrics) == {"mAP", "mAP@R", "R@1", "R@2", "R@4", "R@8"}
    assert result.descriptor_bytes == 1280 * 4
    # The metrics agree with the slow reference computed from the cached descriptors.
    cached = list((tmp_path / "cache").rglob("gem-*.npy"))
    assert len(cached) == 1
    descriptors = np.load(cached[0])
    expected = labelled_evaluate(descriptors @ descriptors.T, bench.images.labels)
    for name, value in expected.items():
        assert result.metrics[name] == pytest.approx(value, abs=1e-9)
    # Pretrained features are far better than chance (R@1 ~ 3/203, mAP ~ 0.02 for random descriptors).
    assert result.metrics["mAP"] > 0.3 and result.metrics["R@1"] > 0.4
    # Second run comes from the cache, same numbers.
    again = evaluate_method(create_method("gem"), bench, settings)
    assert again.metrics == result.metrics
    # FAISS top-1 agrees with the rank-based R@1.
    top = np.load(next((tmp_path / "cache" / "topk").glob("*.npz")))
    r1 = np.mean(bench.images.labels[top["indices"][:, 0]] == bench.images.labels)
    assert r1 == pytest.approx(result.metrics["R@1"])
    # Report schema.
    summary = report(bench, [result])
    write_report(summary, tmp_path / "r.json")
    loaded = json.loads((tmp_path / "r.json").read_text())
    assert loaded["benchmark"] == bench.name
    assert set(loaded["results"][0]) >= {"method", "metrics", "descriptor_bytes", "images_per_second"}
    assert "gem" in format_table(summary)


def test_search_index_inner_product_and_hamming():
    rng = np.random.default_rng(0)
    db = rng.standard_normal((50, 8)).astype(np.float32)
    q = rng.standard_normal((7, 8)).astype(np.float32)
    scores, ids = SearchIndex(db).search(q, k=5, chunk=3)
    np.testing.assert_array_equal(ids, np.argsort(-(q @ db.T), axis=1, kind="stable")[:, :5])
    codes = rng.integers(0, 256, (40, 4), dtype=np.uint8)
    qc = codes[:5]
    scores, ids = SearchIndex(codes, metric="hamming").search(qc, k=1)
    np.testing.assert_array_equal(ids[:, 0], np.arange(5))
    assert (scores == 0).all()


def test_methods_extracted_together_equal_separately(make_labelled_set, tmp_path):
    """One pass with a shared backbone gives exactly the descriptors of separate passes."""
    import torch
    from msretrieval.data.transforms import EvalTransform
    from msretrieval.retrieval.descriptors.extract import extract_together
    from msretrieval.retrieval.evaluation.harness import evaluate_methods
    bench = LabelledBenchmark(name="toy", images=read_csv_manifest(make_labelled_set(num_classes=3, per_class=3)))
    torch.manual_seed(0)
    shared = MethodContext(backbone="resnet18", pretrained=False, share_backbone=True)
    methods = [create_method(name, shared) for name in ("gem", "scda_plus", "scda_flip_plus")]
    assert methods[0].backbone is methods[1].backbone
    dataset = bench.database_dataset(EvalTransform(64, "shorter"))
    together = extract_together(methods, dataset, batch_size=2)
    for method, joint in zip(methods, together):
        alone = extract_together([method], dataset, batch_size=2)[0]
        np.testing.assert_array_equal(joint.descriptors, alone.descriptors)
    settings = EvalSettings(image_size=64, batch_size=2, num_workers=0, cache_dir=str(tmp_path / "cache"))
    results = evaluate_methods(methods, bench, settings, together=True)
    assert [r.method for r in results] == ["gem", "scda_plus", "scda_flip_plus"]
    assert {p.name.split("-")[0] for p in (tmp_path / "cache").rglob("*.npy")} == {"gem", "scda_plus", "scda_flip_plus"}


def test_a_method_that_fits_on_a_benchmark_without_training_images_is_told_how_to_get_some(make_labelled_set):
    from msretrieval.retrieval.evaluation.harness import evaluate_methods
    from msretrieval.retrieval.descriptors.methods import RetrievalMethod

    class NeedsFit(RetrievalMethod):
        def needs_fit(self):
            return True

    bench = LabelledBenchmark(name="toy", images=read_csv_manifest(make_labelled_set(num_classes=2, per_class=2)))
    with pytest.raises(ValueError, match=r"toy has no training split: give .* --fit-on SPEC .*csv:PATH:SPLIT .*'train' rows"):
        evaluate_methods([NeedsFit("fitter")], bench, EvalSettings(cache_dir=None))
