"""The match-kernel methods in the harness: one fit shared by every kernel, padded rows that score like the
aggregation module's own scorer, R-VLAD over the full image alone equal to VLAD, and separation of two
textures on a leave-one-out set (near duplicates)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from msretrieval.data.datasets import ImageDataset
from msretrieval.data.manifest import LabelledImageSet
from msretrieval.data.transforms import EvalTransform
from msretrieval.retrieval.aggregation import vlad_asmk as agg
from msretrieval.retrieval.evaluation.benchmarks import LabelledBenchmark
from msretrieval.retrieval.evaluation.harness import EvalSettings, evaluate_methods
from msretrieval.retrieval.aggregation.match_kernels import KernelSettings, LocalVocabulary, MatchKernelMethod
from msretrieval.retrieval.aggregation.local_features import LocalFeatureExtractor
from msretrieval.models.backbones import create_backbone


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
    from msretrieval.retrieval.evaluation.catalogue import MethodContext, create_method
    from msretrieval.utils.errors import UserError

    context = MethodContext(backbone="resnet18", pretrained=False, share_backbone=True, region_size=0)
    assert create_method("asmk", context).vocabulary.settings.region_size == 0
    with pytest.raises(UserError, match="--region-size must be at least 16"):
        create_method("regional_search_max", context)


def test_a_word_budget_caps_each_database_image_at_a_multiple_of_its_asmk_words(tmp_path, vocabulary,
                                                                               monkeypatch):
    from msretrieval.retrieval.aggregation import vlad_asmk as agg
    from msretrieval.retrieval.aggregation import match_kernels
    from msretrieval.retrieval.evaluation.catalogue import MethodContext, create_method

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
    from msretrieval.retrieval.evaluation.harness import _cache_keys

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


# ---------------------------------------------------------------------------------------------------------
# controls (normaliser, multi-scale word budget, command-line settings) on hand-made local features: a stand-in
# extractor returns fixed features per image (the image's id is its first pixel), words from a toy codebook


class FixedFeatures:
    """A stand-in LocalFeatureExtractor: image i (pixel [0, 0, 0] = i) has the features ``table[i]``
    = (descriptors, scales)."""

    def __init__(self, table, scales=(1.0,)):
        self.table, self.scales = table, tuple(scales)
        self.backbone = torch.nn.Identity()
        self.backbone.preprocessing = None
        self.max_features = max(len(d) for d, _ in table.values())

    def features_per_image(self, scales=None):
        return self.max_features

    def config(self):
        return {"fixed": sorted(self.table)}

    def pca_state(self):
        return {}

    def __call__(self, images, scales=None):
        from msretrieval.retrieval.aggregation.local_features import LocalFeatures

        out = []
        for image in images:
            descriptors, image_scales = self.table[int(image[0, 0, 0])]
            keep = np.isin(np.asarray(image_scales, np.float32), self.scales if scales is None else scales)
            n = int(keep.sum())
            out.append(LocalFeatures(np.asarray(descriptors, np.float32)[keep], np.full((n, 2), 0.5, np.float32),
                                     np.zeros(n, np.float32), np.asarray(image_scales, np.float32)[keep]))
        return out


def fixed_vocabulary(table, centroids, scales=(1.0,), region_size=224, database_scales=None) -> LocalVocabulary:
    from msretrieval.retrieval.aggregation.codebook import Codebook

    settings = KernelSettings(words=len(centroids), dims=2, scales=tuple(scales), region_size=region_size,
                              database_scales=database_scales)
    vocabulary = LocalVocabulary(FixedFeatures(table, scales), settings, None)
    vocabulary.codebook = Codebook(np.asarray(centroids, dtype=np.float32))
    return vocabulary


def ids(*numbers):
    images = torch.zeros(len(numbers), 3, 4, 4)
    images[:, 0, 0, 0] = torch.tensor(numbers, dtype=torch.float32)
    return images


def score_row(method, query, database):
    return method.scores(method.encode(query).numpy(), method.encode_database(database).numpy()).rows(0, 1)[0].numpy()


def test_the_kernel_gamma_gives_asmk_and_r_asmk_one_normaliser():
    """Codebook c0 = (0,0), c1 = (4,0). Query q: (0,1) -> c0 residual (0,1); (5,0) -> c1 residual (1,0).
    Image A: (0,1) -> word 0 only, V_hat = (0,1). Image B: (1,1) -> word 0, V_hat = (1,1)/sqrt2; (5,0) -> word 1,
    V_hat = (1,0). sigma(u) = u^3 (u > 0): A: sigma(1) = 1; B: sigma(1/sqrt2) + sigma(1) = 0.3535534 + 1 = 1.3535534.
    gamma(q) = 1/sqrt2, gamma(A) = 1, gamma(B) = 1/sqrt2 by word count.
      words: A = 0.7071068 * 1 * 1 = 0.7071068, B = 0.7071068 * 0.7071068 * 1.3535534 = 0.6767767  (A first)
      one:   A = 1, B = 1.3535534                                                                  (B first)
    R-ASMK with the full image as its only region normalises each word like ASMK, so under one setting both
    kernels score alike; by default R-ASMK drops the database gamma (DELF) and ASMK keeps it:
      default r_asmk: A = 0.7071068 * 1 = 0.7071068, B = 0.7071068 * 1.3535534 = 0.9571068."""
    vocabulary = fixed_vocabulary({0: ([[0, 1], [5, 0]], [1, 1]), 1: ([[0, 1]], [1]), 2: ([[1, 1], [5, 0]], [1, 1])},
                                  [[0, 0], [4, 0]])
    full = Boxes([[0, 0, 1, 1]])
    expected = {("asmk", "default"): [0.7071068, 0.6767767], ("r_asmk", "default"): [0.7071068, 0.9571068],
                ("asmk", "words"): [0.7071068, 0.6767767], ("r_asmk", "words"): [0.7071068, 0.6767767],
                ("asmk", "one"): [1.0, 1.3535534], ("r_asmk", "one"): [1.0, 1.3535534]}
    for (name, gamma), scores in expected.items():
        method = MatchKernelMethod(name, vocabulary, full if name == "r_asmk" else None, gamma=gamma)
        np.testing.assert_allclose(score_row(method, ids(0), ids(1, 2)), scores, rtol=1e-6, err_msg=f"{name} {gamma}")
        # in the cache key only when asked for (earlier caches keep their keys)
        assert method.config().get("gamma") == (None if gamma == "default" else gamma)
    # the binary kernels follow the same setting; VLAD (normalised inside its vector) and naive R-ASMK ignore it
    star = MatchKernelMethod("r_asmk_star", vocabulary, full, gamma="words")
    assert star.normalize == (True, True) and star.config()["gamma"] == "words"
    for name in ("vlad", "r_vlad", "r_asmk_naive"):
        method = MatchKernelMethod(name, vocabulary, full if name.startswith("r_") else None, gamma="one")
        assert "gamma" not in method.config()
    with pytest.raises(ValueError, match="kernel gamma must be one of"):
        MatchKernelMethod("asmk", vocabulary, gamma="sqrt")


def test_multi_scale_asmk_at_a_word_budget_keeps_the_longest_residuals_up_to_b_times_its_scale_1_words():
    """Codebook c0 = (0,0), c1 = (4,0), c2 = (0,4), c3 = (4,4). The database image's features:
      scale 1: (1,0) -> c0 residual (1,0); (4,1) -> c1 residual (0,1)          -> 2 words at scale 1
      scale 2: (0,6) -> c2 residual (0,2); (4.5,4) -> c3 residual (0.5,0); (0.5,0) -> c0 residual (0.5,0)
    ||V|| per word: V0 = (1.5,0) 1.5, V1 = (0,1) 1, V2 = (0,2) 2, V3 = (0.5,0) 0.5.
    Budget 1.5: floor(1.5 x 2) = 3 words, the longest: 2, 0, 1 -> [0, 1, 2], gamma 3^(-1/2);
    budget 1.0: 2 words -> [0, 2]; budget 0.4: floor(0.8) = 0 -> at least 1 -> [2]. The query side keeps all 4."""
    table = {0: ([[1, 0], [4, 1], [0, 6], [4.5, 4], [0.5, 0]], [1, 1, 2, 2, 2])}
    centroids = [[0, 0], [4, 0], [0, 4], [4, 4]]
    vocabulary = fixed_vocabulary(table, centroids, scales=(1.0, 2.0))

    def words(rows):
        return agg.from_rows(rows.numpy(), 2)[0]

    free = MatchKernelMethod("asmk", vocabulary)
    assert words(free.encode_database(ids(0))).words.tolist() == [0, 1, 2, 3] and not free.asymmetric
    for budget, kept in ((1.5, [0, 1, 2]), (1.0, [0, 2]), (0.4, [2])):
        capped = MatchKernelMethod("asmk", vocabulary, word_budget=budget)
        database = words(capped.encode_database(ids(0)))
        assert database.words.tolist() == kept, budget
        assert database.gamma == pytest.approx(len(kept) ** -0.5)
        assert capped.asymmetric and capped.config()["word_budget"] == budget
        assert words(capped.encode(ids(0))).words.tolist() == [0, 1, 2, 3]   # queries are not capped
    # one scale: the budget does not reach asmk (and its key is unchanged)
    single = MatchKernelMethod("asmk", fixed_vocabulary({0: ([[1, 0]], [1])}, centroids), word_budget=1.2)
    assert single.word_budget == 0 and "word_budget" not in single.config() and not single.asymmetric
    # R-ASMK's cap counts the full image's scale-1 words too: the crop-free full-image region here holds the
    # same 4 summed residuals (one region: S_c = V_c / ||V||, the same order of norms) -> the same words kept
    r_asmk = MatchKernelMethod("r_asmk", vocabulary, Boxes([[0, 0, 1, 1]]), word_budget=1.0)
    assert words(r_asmk.encode_database(ids(0))).words.tolist() == [0, 2]
    # the budget is relative to scale 1: it must be one of the scales
    with pytest.raises(ValueError, match="include 1 in the database's scales"):
        MatchKernelMethod("asmk", fixed_vocabulary(table, centroids, scales=(0.5, 2.0)), word_budget=1.2)
    # multi-scale on the database side only: queries (and the fit) at scale 1 keep words 0 and 1 alone
    database_only = fixed_vocabulary(table, centroids, database_scales=(1.0, 2.0))
    method = MatchKernelMethod("asmk", database_only, word_budget=1.5)
    assert words(method.encode(ids(0))).words.tolist() == [0, 1]
    assert words(method.encode_database(ids(0))).words.tolist() == [0, 1, 2]
    assert method.asymmetric and method.config()["database_scales"] == [1.0, 2.0]
    uncapped = MatchKernelMethod("vlad", database_only)     # VLAD too describes the database at its scales
    assert words(uncapped.encode_database(ids(0))).words.tolist() == [0, 1, 2, 3] and uncapped.asymmetric
    assert "database_scales" not in MatchKernelMethod("asmk", vocabulary).config()


def test_kernel_settings_come_from_the_command_line_context_and_key_the_cache():
    from msretrieval.retrieval.evaluation.catalogue import MethodContext, create_method
    from msretrieval.retrieval.aggregation.regional import NATIVE
    from msretrieval.utils.errors import UserError

    default = create_method("asmk", MethodContext(backbone="resnet18", pretrained=False))
    context = MethodContext(backbone="resnet18", pretrained=False, share_backbone=True, kernel_words=512,
                            kernel_max_features=100, kernel_scales=(1.0, 2.0), kernel_fit_images=50,
                            kernel_gamma="one", region_size=NATIVE, kernel_database_scales=(1.0, 2.0, 4.0))
    method = create_method("asmk", context)
    settings, extractor = method.vocabulary.settings, method.vocabulary.extractor
    assert (settings.words, settings.max_features, settings.scales, settings.fit_images, settings.region_size) == \
        (512, 100, (1.0, 2.0), 50, NATIVE)
    assert (extractor.max_features, extractor.scales, extractor.per_scale) == (100, (1.0, 2.0), True)
    assert settings.database_scales == (1.0, 2.0, 4.0) and method.asymmetric
    config = method.config()
    assert (config["words"], config["fit_images"], config["region_size"], config["gamma"]) == (512, 50, NATIVE, "one")
    assert config["local_features"]["max_features"] == 100 and config["local_features"]["scales"] == [1.0, 2.0]
    assert config["local_features"]["max_features_per"] == "scale"
    assert config["database_scales"] == [1.0, 2.0, 4.0]
    assert method.max_words == 300                         # min(C, 100 features x 3 database scales)
    # the defaults: KernelSettings()'s, and the key of earlier caches (no new entries in the config)
    assert default.vocabulary.settings == KernelSettings()
    assert set(default.config()) == {"name", "local_features", "words", "region_size", "fit_images",
                                     "kmeans_iterations", "seed"}
    assert "max_features_per" not in default.config()["local_features"]
    for bad in ({"kernel_words": 0}, {"kernel_scales": (1.0, -2.0)}, {"kernel_scales": (1.0, 1.0)},
                {"kernel_database_scales": (0.0, 1.0)}):
        with pytest.raises(UserError):
            create_method("asmk", MethodContext(backbone="resnet18", pretrained=False, **bad))


def test_r_asmk_describes_native_crops_and_its_rows_hold_the_words_every_crop_brings():
    """Codebook c0 = (0,0), c1 = (4,0), c2 = (0,4), c3 = (4,4); at most 2 features per image. The database image
    (id 3: the feature (1,0) -> word 0) has a detected box (0.5, 0.5, 1, 1) whose native crop is image id 4
    (its top-left pixel): (0,6) -> c2 residual (0,2), (4.5,4) -> c3 residual (0.5,0), ||VLAD|| = sqrt(4.25).
    S_0 = (1,0), S_2 = (0, 0.9701425), S_3 = (0.2425356, 0): 3 words, more than the 2 features of one image,
    each normalised to unit length. Budget 2: floor(2 x 1 scale-1 word) = 2, the longest S: words 0 and 2."""
    table = {3: ([[1, 0]], [1]), 4: ([[0, 6], [4.5, 4]], [1, 1])}
    centroids = [[0, 0], [4, 0], [0, 4], [4, 4]]
    vocabulary = fixed_vocabulary(table, centroids, region_size="native")
    image = torch.zeros(1, 3, 8, 8)
    image[0, 0, 0, 0], image[0, 0, 4:, 4:] = 3, 4
    box = Boxes([[0, 0, 1, 1], [0.5, 0.5, 1, 1]])
    r_asmk = MatchKernelMethod("r_asmk", vocabulary, box)
    assert r_asmk.max_words == 4                          # min(C, 2 features x (1 + 1 region))
    database = agg.from_rows(r_asmk.encode_database(image).numpy(), 2)[0]
    assert database.words.tolist() == [0, 2, 3]
    np.testing.assert_allclose(database.vectors, [[1, 0], [0, 1], [1, 0]], atol=1e-6)
    assert r_asmk.config()["region_size"] == "native"
    capped = MatchKernelMethod("r_asmk", vocabulary, box, word_budget=2.0)
    assert agg.from_rows(capped.encode_database(image).numpy(), 2)[0].words.tolist() == [0, 2]
