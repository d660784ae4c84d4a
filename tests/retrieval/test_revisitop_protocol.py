"""Golden sizes of the revisitop protocol as published (cnnimageretrieval-pytorch), computed by hand.

The reference (``cirtorch/datasets/genericdataset.py`` ``ImagesFromList.__getitem__`` and
``cirtorch/datasets/datahelpers.py`` ``imresize``), with imsize = N = 1024:

    imfullsize = max(img.size)
    query:    img = img.crop(bbx); img.thumbnail((b, b), ANTIALIAS) with b = N * max(img.size) / imfullsize
    database: img.thumbnail((N, N), ANTIALIAS)

and PIL's ``thumbnail((b, b))`` (Pillow >= 7): L = floor(b); an image with both sides <= L is kept; else,
with a = w / h, a portrait (a <= 1) image gets height L and width floor or ceil of L * a, whichever makes
|a - width / L| smaller; a landscape one gets width L and height floor or ceil of L / a, whichever makes
|a - L / height| smaller (floor on ties). ``crop`` rounds each box coordinate with Python's round().
"""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from msretrieval.data.revisitop import save_revisitop
from msretrieval.data.transforms import resized_shape
from msretrieval.retrieval.evaluation.benchmarks import create_benchmark
from msretrieval.retrieval.descriptors.extract import output_sizes
from msretrieval.retrieval.evaluation.harness import EvalSettings, _transform
from msretrieval.retrieval.descriptors.methods import RetrievalMethod

NAME = "golden"
DATABASE = {  # name: (full size, expected size by hand)
    # 1280 x 960 > 1024: L = 1024, a = 4/3 (landscape): width 1024, height 1024 / (4/3) = 768 exactly
    "d_large": ((1280, 960), (1024, 768)),
    # 800 x 600 fits in 1024 x 1024: kept (the old "longer side to 1024" rule made it 1024 x 768)
    "d_small": ((800, 600), (800, 600)),
    # 1500 x 1000: L = 1024, a = 1.5: height 1024 / 1.5 = 682.67; |1.5 - 1024/682| = 0.001466,
    # |1.5 - 1024/683| = 0.000732 -> 683
    "d_round": ((1500, 1000), (1024, 683)),
}
QUERIES = {  # name: (full size, bbx, expected size by hand)
    # the example: a 300 x 200 crop of a 1024 x 768 photo. b = 1024 * 300 / 1024 = 300 -> L = 300: the
    # crop fits, kept at 300 x 200 (the old rule resized the crop itself to 1024 x 683)
    "q_upscaled_before": ((1024, 768), (100, 100, 400, 300), (300, 200)),
    # 1500 x 1000, crop 700 x 350: b = 1024 * 700 / 1500 = 477.87 -> L = 477 (floored, not rounded to 478);
    # a = 2: height 477 / 2 = 238.5; |2 - 477/238| = 0.004202 > |2 - 477/239| = 0.004184 -> 239 (round() and
    # Pillow < 7's truncation both give 238; scaling each side by 1024/1500 gives 478 x 239)
    "q_rounding": ((1500, 1000), (200, 100, 900, 450), (477, 239)),
    # portrait 960 x 1280, float box: round(10.5) = 10, round(20.4) = 20, round(310.5) = 310 (half to even),
    # round(820.6) = 821 -> crop 300 x 801. b = 1024 * 801 / 1280 = 640.8 -> L = 640; a = 300/801 = 0.374532:
    # width 640 * a = 239.70; |a - 239/640| = 0.001095 > |a - 240/640| = 0.000468 -> 240
    "q_portrait": ((960, 1280), (10.5, 20.4, 310.5, 820.6), (240, 640)),
}


def _write(path, size, seed):
    """A smooth random image (JPEG): resampling differences show in its pixels."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (size[1] // 16 + 1, size[0] // 16 + 1, 3), dtype=np.uint8)
    Image.fromarray(small).resize(size, Image.BILINEAR).save(path, quality=90)


@pytest.fixture(scope="module")
def golden(tmp_path_factory):
    root = tmp_path_factory.mktemp("revisitop")
    save_revisitop(root, NAME, list(DATABASE), list(QUERIES),
                   [{"bbx": bbx, "easy": [0], "hard": [], "junk": []} for _, bbx, _ in QUERIES.values()])
    for seed, (name, spec) in enumerate([*DATABASE.items(), *QUERIES.items()]):
        _write(root / NAME / "jpg" / f"{name}.jpg", spec[0], seed)
    return create_benchmark(f"revisitop:{NAME}", root)


class _Plain(RetrievalMethod):
    def __init__(self):
        super().__init__("plain")


def test_the_default_revisitop_transform_gives_the_reference_sizes_from_headers_and_from_pixels(golden):
    transform = _transform(_Plain(), golden, EvalSettings())
    assert (transform.mode, transform.size, transform.interpolation) == ("longer_max", 1024, "lanczos")
    database, queries = golden.database_dataset(transform), golden.query_dataset(transform)
    expected_db = [expected for _, expected in DATABASE.values()]
    expected_q = [expected for _, _, expected in QUERIES.values()]
    # header-only sizing (the batch sampler's buckets) ...
    assert output_sizes(database) == expected_db
    assert output_sizes(queries) == expected_q
    # ... and the decoded, transformed images
    assert [tuple(database[i][0].shape[:0:-1]) for i in range(3)] == expected_db
    assert [tuple(queries[i][0].shape[:0:-1]) for i in range(3)] == expected_q


@pytest.mark.parametrize("size", [1024, 200])  # 200: shrinking by 4x or more, where thumbnail reduces first
def test_the_pixels_are_those_of_crop_then_pil_thumbnail_with_lanczos(golden, size):
    """The reference's own operations, run with the installed Pillow: the same pixels to the bit."""
    transform = _transform(_Plain(), golden, EvalSettings(image_size=size))
    queries, database = golden.query_dataset(transform), golden.database_dataset(transform)
    for i, (full_size, bbx, _) in enumerate(QUERIES.values()):
        reference = Image.open(queries.paths[i]).convert("RGB")
        full = max(reference.size)
        reference = reference.crop(bbx)
        reference.thumbnail((size * max(reference.size) / full,) * 2, Image.LANCZOS)
        ours = transform.pixels(queries.load(i), queries.full_size(i)).numpy()
        np.testing.assert_array_equal(ours, np.asarray(reference))
    for i in range(3):
        reference = Image.open(database.paths[i]).convert("RGB")
        reference.thumbnail((size, size), Image.LANCZOS)
        np.testing.assert_array_equal(transform.pixels(database.load(i)).numpy(), np.asarray(reference))


@pytest.mark.parametrize("mode, expected", [
    # the crop takes the factor its FULL image gets under the rule, then each side is rounded:
    # q_upscaled_before: full 1024 x 768, crop 300 x 200; q_rounding: full 1500 x 1000, crop 700 x 350
    # longer: 1024/1024 = 1 -> 300 x 200;  1024/1500 = 0.68267 -> 477.87 x 238.93 -> 478 x 239
    ("longer", [(300, 200), (478, 239)]),
    # shorter: 1024/768 = 1.3333 -> 400 x 266.67 -> 400 x 267;  1024/1000 = 1.024 -> 716.8 x 358.4 -> 717 x 358
    ("shorter", [(400, 267), (717, 358)]),
    # shorter_max: min(1, 1.3333) = min(1, 1.024) = 1: both crops keep their size
    ("shorter_max", [(300, 200), (700, 350)]),
    ("none", [(300, 200), (700, 350)]),
])
def test_every_resize_mode_scales_a_crop_by_its_full_images_factor(golden, mode, expected):
    transform = _transform(_Plain(), golden, EvalSettings(resize_mode=mode))
    assert output_sizes(golden.query_dataset(transform), [0, 1]) == expected
    for (full, bbx, _), size in zip(list(QUERIES.values())[:2], expected):
        crop = (bbx[2] - bbx[0], bbx[3] - bbx[1])
        assert resized_shape(*crop, 1024, mode, full_size=full) == size


def test_an_uncropped_image_is_its_own_full_image():
    # no full_size: the image's own scale. longer_max: 1500 x 1000 -> (1024, 683) as d_round above;
    # longer upscales 800 x 600 -> 1024 x 768 (shrink-only is longer_max's business)
    assert resized_shape(1500, 1000, 1024, "longer_max") == resized_shape(1500, 1000, 1024, "longer_max",
                                                                          full_size=(1500, 1000)) == (1024, 683)
    assert resized_shape(800, 600, 1024, "longer") == (1024, 768)
    assert resized_shape(800, 600, 1024, "longer_max") == (800, 600)
