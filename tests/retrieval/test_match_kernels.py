"""The match-kernel methods in the harness: one fit shared by every kernel, padded rows that score like the
aggregation module's own scorer, R-VLAD over the full image alone equal to VLAD, and separation of two
textures on a leave-one-out set (near duplicates)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from data.datasets import ImageDataset
from data.manifest import LabelledImageSet
from data.transforms import EvalTransform
from retrieval.benchmarks import LabelledBenchmark
from retrieval.harness import EvalSettings, evaluate_methods
from retrieval.match_kernels import KernelSettings, LocalVocabulary, MatchKernelMethod
from retrieval.local_features import LocalFeatureExtractor
from models.backbones import create_backbone


class Boxes:
    """A stand-in detector: fixed regions (the full image first)."""

    max_regions = 1

    def __init__(self, boxes):
        self.boxes = np.asarray(boxes, dtype=np.float32)

    def config(self):
        return {"detector": "fixed", "boxes": self.boxes.tolist()}

    def __call__(self, images, preprocessing):
        return [self.boxes] * len(images)


def near_duplicates(tmp_path, count_per_class=4):
    """Two classes, each a random texture photographed again with fresh noise (near-duplicate search)."""
    rng = np.random.default_rng(0)
    paths, labels = [], []
    for label in (0, 1):
        base = rng.integers(0, 256, (8, 8, 3)).repeat(8, axis=0).repeat(8, axis=1)  # 64 x 64 blocks
        for i in range(count_per_class):
            pixels = (base + rng.normal(0, 12, base.shape)).clip(0, 255)
            path = tmp_path / f"{label}_{i}.png"
            Image.fromarray(pixels.astype(np.uint8)).save(path)
            paths.append(path)
            labels.append(label)
    return LabelledImageSet("textures", tuple(paths), np.array(labels))


@pytest.fixture(scope="module")
def vocabulary():
    torch.manual_seed(0)
    backbone = create_backbone("resnet18", pretrained=False).eval()
    settings = KernelSettings(words=8, dims=16, max_features=20, fit_images=8, kmeans_iterations=5)
    extractor = LocalFeatureExtractor(backbone, tap="layer2", max_features=20, dims=16)  # stride 8: 64 cells
    return LocalVocabulary(extractor, settings, cache_dir=None)


def test_kernels_share_one_fit_and_regional_vlad_over_the_full_image_is_vlad(tmp_path, vocabulary):
    images = near_duplicates(tmp_path)
    pre = vocabulary.extractor.backbone.preprocessing
    dataset = ImageDataset(images.paths, EvalTransform(64, "shorter", pre.mean, pre.std))
    vlad = MatchKernelMethod("vlad", vocabulary)
    r_vlad = MatchKernelMethod("r_vlad", vocabulary, Boxes([[0, 0, 1, 1]]))
    vlad.fit(dataset)
    codebook = vocabulary.codebook
    r_vlad.fit(dataset)
    assert vocabulary.codebook is codebook          # the second kernel reuses the fit
    batch = torch.stack([dataset[i][0] for i in range(len(dataset))])
    queries, database = vlad.encode(batch).numpy(), r_vlad.encode_database(batch).numpy()
    assert r_vlad.asymmetric and not vlad.asymmetric
    np.testing.assert_allclose(r_vlad.scores(queries, database).rows(0, len(queries)).numpy(),
                               vlad.scores(queries, vlad.encode_database(batch).numpy()).rows(0, len(queries)).numpy(),
                               atol=1e-5)
    with pytest.raises(ValueError, match="RegionProposer"):
        MatchKernelMethod("r_asmk", vocabulary)


def test_match_kernels_in_the_harness_report_real_bytes_and_find_near_duplicates(tmp_path, vocabulary):
    images = near_duplicates(tmp_path)
    bench = LabelledBenchmark(name="stripes", images=images, training=images)
    regions = Boxes([[0, 0, 1, 1], [0, 0, 0.5, 0.5]])
    methods = [MatchKernelMethod(name, vocabulary, regions if name.startswith("r_") else None)
               for name in ("vlad", "asmk", "asmk_star", "r_asmk", "r_asmk_star")]
    results = {r.method: r for r in evaluate_methods(methods, bench, EvalSettings(image_size=64, cache_dir=None))}
    for name, result in results.items():
        assert result.metrics["mAP"] > 0.9, (name, result.metrics)   # chance is about 0.45
        assert result.query_ms > 0
    # float words: 2-byte id + 16 float32; binary: 2-byte id + 2 bytes of bits; at most 8 words
    assert 18 <= results["asmk"].descriptor_bytes <= 8 * 66
    assert results["asmk_star"].descriptor_bytes <= 8 * 4
    assert results["asmk_star"].descriptor_bytes * 10 < results["asmk"].descriptor_bytes


def test_regional_kernels_describe_a_small_detected_object_by_its_crop(tmp_path, vocabulary):
    """A database image of texture A holding a small patch of texture B (the detected box): querying with B,
    R-ASMK over the box's crop scores it higher than over the whole image's features inside the box (too few
    at this scale), and than ASMK of the whole image."""
    from dataclasses import replace

    images = near_duplicates(tmp_path)
    pre = vocabulary.extractor.backbone.preprocessing
    dataset = ImageDataset(images.paths, EvalTransform(64, "shorter", pre.mean, pre.std))
    MatchKernelMethod("asmk", vocabulary).fit(dataset)
    texture_a, texture_b = dataset[0][0], dataset[len(dataset) - 1][0]
    database = texture_a.repeat(1, 2, 2).clone()                   # 128 x 128 of texture A
    database[:, :24, :24] = texture_b[:, :24, :24]                 # a small patch of B in the top-left corner
    box = Boxes([[0, 0, 1, 1], [0, 0, 24 / 128, 24 / 128]])
    query = texture_b[None]
    scores = {}
    for label, size in (("crop", 64), ("select", 0)):
        vocabulary.settings = replace(vocabulary.settings, region_size=size)
        method = MatchKernelMethod("r_asmk", vocabulary, box)
        scores[label] = float(method.scores(method.encode(query).numpy(),
                                            method.encode_database(database[None]).numpy()).rows(0, 1)[0, 0])
    vocabulary.settings = replace(vocabulary.settings, region_size=224)
    asmk = MatchKernelMethod("asmk", vocabulary)
    scores["whole"] = float(asmk.scores(asmk.encode(query).numpy(), asmk.encode(database[None]).numpy()).rows(0, 1)[0, 0])
    assert scores["crop"] > scores["select"] and scores["crop"] > scores["whole"], scores


def test_region_size_reaches_the_regional_methods_from_the_context(tmp_path):
    from retrieval.methods import MethodContext, create_method
    from utils.errors import UserError

    context = MethodContext(backbone="resnet18", pretrained=False, share_backbone=True, region_size=0)
    assert create_method("asmk", context).vocabulary.settings.region_size == 0
    with pytest.raises(UserError, match="--region-size must be at least 16"):
        create_method("regional_search_max", context)


def test_a_word_budget_caps_each_database_image_at_a_multiple_of_its_asmk_words(tmp_path, vocabulary,
                                                                               monkeypatch):
    from retrieval import aggregation as agg
    from retrieval import match_kernels
    from retrieval.methods import MethodContext, create_method

    images = near_duplicates(tmp_path)
    pre = vocabulary.extractor.backbone.preprocessing
    dataset = ImageDataset(images.paths, EvalTransform(64, "shorter", pre.mean, pre.std))
    MatchKernelMethod("asmk", vocabulary).fit(dataset)
    database = dataset[0][0].repeat(1, 2, 2).clone()[None]
    database[:, :, :24, :24] = dataset[len(dataset) - 1][0][:, :24, :24]
    box = Boxes([[0, 0, 1, 1], [0, 0, 24 / 128, 24 / 128]])

    def words(method, encoded):
        return len(agg.from_rows(encoded.numpy(), vocabulary.settings.dims)[0].words)

    asmk_words = words(MatchKernelMethod("asmk", vocabulary), MatchKernelMethod("asmk", vocabulary).encode(database))
    free = words(MatchKernelMethod("r_asmk", vocabulary, box), MatchKernelMethod("r_asmk", vocabulary, box)
                 .encode_database(database))
    assert asmk_words >= 2 and free >= asmk_words // 2
    capped = MatchKernelMethod("r_asmk", vocabulary, box, word_budget=0.5)
    assert words(capped, capped.encode_database(database)) == asmk_words // 2
    assert capped.config()["word_budget"] == 0.5

    # from the command line's context: the budget reaches r_asmk / r_asmk_star only, and an uncapped method's
    # cache key is the one it always was (the caches of earlier runs stay valid)
    monkeypatch.setattr(match_kernels, "proposer_from_context", lambda context, name: box)
    context = MethodContext(backbone="resnet18", pretrained=False, share_backbone=True, word_budget=1.2)
    for name in ("r_asmk", "r_asmk_star"):
        assert create_method(name, context).config()["word_budget"] == 1.2
    for name in ("asmk", "r_vlad", "r_asmk_naive"):
        assert "word_budget" not in create_method(name, context).config()
    assert "word_budget" not in create_method("r_asmk", MethodContext(backbone="resnet18", pretrained=False)).config()


def _fresh_vocabulary(vocabulary, cache_dir=None) -> LocalVocabulary:
    """An unfitted vocabulary with the fixture's backbone and settings."""
    extractor = LocalFeatureExtractor(vocabulary.extractor.backbone, tap="layer2", max_features=20, dims=16)
    return LocalVocabulary(extractor, KernelSettings(words=8, dims=16, max_features=20, fit_images=8,
                                                     kmeans_iterations=5), cache_dir)


def test_a_cached_codebook_is_reused_only_in_the_whole_pca_it_was_fitted_in(tmp_path, vocabulary, monkeypatch):
    images = near_duplicates(tmp_path)
    pre = vocabulary.extractor.backbone.preprocessing
    dataset = ImageDataset(images.paths, EvalTransform(64, "shorter", pre.mean, pre.std))
    cache = tmp_path / "codebooks"

    def fitted():
        fresh = _fresh_vocabulary(vocabulary, str(cache))
        fresh.fit(dataset)
        return fresh

    first, second = fitted(), fitted()
    assert len(list(cache.glob("codebook-*.npy"))) == 1  # the same PCA: the codebook came from the cache
    np.testing.assert_array_equal(second.codebook.centroids, first.codebook.centroids)
    # a refit whose PCA differs only in the sign of one basis vector (as at another thread count): the same
    # mean to the bit, but the descriptors the codebook is made of differ, so the cached one must not be used
    fit_pca = LocalFeatureExtractor.fit_pca

    def flipped(self, descriptors):
        fit_pca(self, descriptors)
        self.pca.basis[:, 0] *= -1

    monkeypatch.setattr(LocalFeatureExtractor, "fit_pca", flipped)
    third = fitted()
    np.testing.assert_array_equal(third.extractor.pca.mean, first.extractor.pca.mean)
    assert not np.array_equal(third.extractor.pca.basis, first.extractor.pca.basis)
    assert len(list(cache.glob("codebook-*.npy"))) == 2


def test_kernel_cache_keys_do_not_depend_on_the_order_of_methods_or_on_an_earlier_fit(tmp_path, vocabulary):
    from retrieval.harness import _cache_keys

    images = near_duplicates(tmp_path)
    bench = LabelledBenchmark(name="stripes", images=images, training=images)
    settings = EvalSettings(image_size=64, batch_size=4)

    def keys(names, fit_first=False):
        methods = [MatchKernelMethod(name, _fresh_vocabulary(vocabulary)) for name in names]
        methods = [MatchKernelMethod(name, methods[0].vocabulary) for name in names]  # one shared vocabulary
        if fit_first:
            pre = vocabulary.extractor.backbone.preprocessing
            methods[0].fit(ImageDataset(images.paths, EvalTransform(64, "shorter", pre.mean, pre.std)))
        return dict(zip(names, _cache_keys(methods, bench, settings)))

    expected = keys(["vlad", "asmk"])
    assert expected["vlad"] != expected["asmk"]
    assert keys(["asmk", "vlad"]) == expected
    assert keys(["asmk", "vlad"], fit_first=True) == expected  # asmk fitted the shared vocabulary before vlad
    # in the harness: vlad evaluated after asmk (which fitted the vocabulary) is found again by a run of vlad
    # alone, which then fits nothing
    cached = EvalSettings(image_size=64, batch_size=4, cache_dir=str(tmp_path / "cache"))
    shared = _fresh_vocabulary(vocabulary)
    evaluate_methods([MatchKernelMethod("asmk", shared), MatchKernelMethod("vlad", shared)], bench, cached)
    alone = _fresh_vocabulary(vocabulary)
    evaluate_methods([MatchKernelMethod("vlad", alone)], bench, cached)
    assert alone.codebook is None
