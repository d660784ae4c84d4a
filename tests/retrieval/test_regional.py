"""Regional search: packed regional rows, max / average pooling of region similarities (hand-computed), region
crops, and the harness's asymmetric path (database regions, plain queries, also on leave-one-out sets)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from msretrieval.models.backbones import Preprocessing
from msretrieval.retrieval.descriptors.methods import RetrievalMethod
from msretrieval.retrieval.evaluation.catalogue import MethodContext, create_method
from msretrieval.retrieval.aggregation.regional import (NATIVE, DetectorMissing, RegionalScores, RegionalSearch,
                                                        crop_region, pack_regions, parse_region_size, unpack_regions)
from msretrieval.utils.errors import UserError


def test_pack_and_unpack_regions_round_trip():
    regions = [torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0], [0.6, 0.8], [0.8, 0.6]])]
    rows = pack_regions(regions, slots=3, dim=2).numpy()
    np.testing.assert_allclose(rows, [[1, 1, 0, 0, 0, 0, 0], [3, 0, 1, 0.6, 0.8, 0.8, 0.6]], atol=1e-7)
    descriptors, mask = unpack_regions(rows, dim=2)
    assert mask.tolist() == [[True, False, False], [True, True, True]]
    assert torch.equal(descriptors[1], regions[1])
    with pytest.raises(ValueError, match="do not hold"):
        unpack_regions(rows[:, :-1], dim=2)


def test_regional_scores_take_the_max_or_mean_over_the_real_regions_only():
    # image 0: one region (1, 0); image 1: regions (0, 1), (0.6, 0.8); the padding slot must not count
    rows = pack_regions([torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0], [0.6, 0.8]])], 3, 2).numpy()
    query = np.array([[0.8, 0.6]], dtype=np.float32)
    # similarities: image 0 -> [0.8]; image 1 -> [0.6, 0.48 + 0.48 = 0.96]
    assert RegionalScores(query, rows, 2, "max").rows(0, 1)[0].tolist() == pytest.approx([0.8, 0.96])
    assert RegionalScores(query, rows, 2, "avg").rows(0, 1)[0].tolist() == pytest.approx([0.8, 0.78])
    # a negative-similarity query: max must not pick the zero padding
    assert RegionalScores(-query, rows, 2, "max").rows(0, 1)[0].tolist() == pytest.approx([-0.8, -0.6])
    with pytest.raises(ValueError, match="pooling"):
        RegionalScores(query, rows, 2, "sum")


def test_crop_region_takes_the_box_pixels_and_scales_the_shorter_side():
    image = torch.arange(3 * 10 * 20, dtype=torch.float32).reshape(3, 10, 20)
    crop = crop_region(image, (0.5, 0.0, 1.0, 0.5), shorter_side=5)  # x 10..20, y 0..5: already 5 x 10
    assert crop.shape == (3, 5, 10)
    assert torch.allclose(crop, image[:, 0:5, 10:20])
    assert crop_region(image, (0.0, 0.0, 0.25, 0.5), shorter_side=10).shape == (3, 10, 10)  # 5 x 5 -> 10 x 10


def test_crop_region_caps_a_sliver_box_like_an_evaluation_image():
    # a detection clipped at the border: 1 px wide, 40 px tall; scaling its shorter side to 224 would make it
    # 224 x 8,960 px; the longer side is capped at 4 x 224 = 896 instead, the shorter side floored at 32 px
    image = torch.rand(3, 40, 40)
    crop = crop_region(image, (0.99, 0.0, 1.0, 1.0), shorter_side=224)
    assert crop.shape == (3, 896, 32)
    wide = crop_region(image, (0.0, 0.0, 1.0, 0.1), shorter_side=16)  # 40 x 4 px -> 64 x 6.4: capped at 4 x 16
    assert wide.shape == (3, 16, 64)


def test_native_crops_keep_the_box_pixels_at_the_image_scale():
    image = torch.rand(3, 448, 448)
    # box (0.1, 0.2, 0.35, 0.3) of a 448-px image: columns floor(44.8) = 44 .. ceil(156.8) = 157 (113 px), rows
    # floor(89.6) = 89 .. ceil(134.4) = 135 (46 px): the pixels as they are, no resampling
    crop = crop_region(image, (0.1, 0.2, 0.35, 0.3), NATIVE)
    assert crop.shape == (3, 46, 113)
    assert torch.equal(crop, image[:, 89:135, 44:157])
    # the same box upscaled to a 224-px shorter side: 224 / 46 x 113 = 550.26 -> 224 x 550 (under the 4 x 224 cap)
    assert crop_region(image, (0.1, 0.2, 0.35, 0.3), 224).shape == (3, 224, 550)
    # a 23 x 9 px box (columns 224 .. ceil(246.4) = 247, rows 224 .. ceil(232.96) = 233): each side floored at 32
    assert crop_region(image, (0.5, 0.5, 0.55, 0.52), NATIVE).shape == (3, 32, 32)
    # a 10 x 40 px box: only the short side is stretched
    assert crop_region(image, (0.0, 0.0, 10 / 448, 40 / 448), NATIVE).shape == (3, 40, 32)


def test_region_size_is_pixels_or_native():
    assert parse_region_size("native") == NATIVE == parse_region_size(" Native ")
    assert parse_region_size("0") == 0 and parse_region_size("224") == 224
    for bad in ("-1", "big", "22.5"):
        with pytest.raises(UserError, match="--region-size"):
            parse_region_size(bad)
    method = RegionalSearch("rs", MeanColour("colour"), FixedBoxes(), "max", region_size=NATIVE)
    assert method.config()["region_size"] == NATIVE
    images = torch.zeros(1, 3, 64, 64)
    images[:, 0, :32, :32] = 1.0                     # the red top-left quarter, a 32-px native crop
    regions, _ = unpack_regions(method.encode_database(images).numpy(), 3)
    assert regions[0, 1].argmax() == 0 and regions[0, 1, 0] > 0.99
    with pytest.raises(ValueError, match="at least 16 pixels or 'native'"):
        RegionalSearch("rs", MeanColour("colour"), FixedBoxes(), "max", region_size=8)


class MeanColour(RetrievalMethod):
    """A 3-d descriptor: the mean colour of the image (so a region's descriptor shows where it was cut)."""

    def encode(self, images):
        return torch.nn.functional.normalize(images.mean(dim=(2, 3)) + 1e-3, dim=1)


class FixedBoxes:
    max_regions = 2

    def __init__(self):
        self.calls = 0

    def config(self):
        return {"detector": "fixed"}

    def __call__(self, images, preprocessing):
        self.calls += len(images)
        return [np.array([[0, 0, 1, 1], [0, 0, 0.5, 0.5]], dtype=np.float32)] * len(images)


def test_regional_search_describes_database_images_by_their_regions_and_queries_whole():
    images = torch.zeros(2, 3, 8, 8)
    images[:, 0, :4, :4] = 1.0   # a red top-left quarter
    method = RegionalSearch("rs", MeanColour("colour"), FixedBoxes(), "max")
    assert method.asymmetric
    rows = method.encode_database(images).numpy()
    assert rows.shape == (2, 1 + 3 * 3) and rows[:, 0].tolist() == [2, 2]
    regions, _ = unpack_regions(rows, 3)
    assert torch.allclose(regions[0, 0], MeanColour("c").encode(images[:1])[0])  # the full image
    assert regions[0, 1].argmax() == 0 and regions[0, 1, 0] > 0.99                # the red quarter alone
    assert method.encode(images).shape == (2, 3)
    assert method.descriptor_bytes(rows) == 2 * 3 * 4


def test_the_harness_encodes_queries_as_queries_on_leave_one_out_sets(tmp_path):
    from PIL import Image

    from msretrieval.data.manifest import LabelledImageSet
    from msretrieval.retrieval.evaluation.benchmarks import LabelledBenchmark
    from msretrieval.retrieval.evaluation.harness import EvalSettings, evaluate_methods

    paths = []
    for i, colour in enumerate([(250, 10, 10), (240, 20, 10), (10, 10, 250), (10, 20, 240)]):
        path = tmp_path / f"{i}.png"
        Image.new("RGB", (16, 16), colour).save(path)
        paths.append(path)
    images = LabelledImageSet("toy", tuple(paths), np.array([0, 0, 1, 1]))
    boxes = FixedBoxes()
    method = RegionalSearch("rs", MeanColour("colour"), boxes, "avg")
    result = evaluate_methods([method], LabelledBenchmark(name="toy", images=images),
                              EvalSettings(image_size=16, cache_dir=None))[0]
    assert boxes.calls == 4          # regions for the database side only
    assert result.metrics["mAP"] == pytest.approx(1.0) and result.metrics["R@1"] == pytest.approx(1.0)
    assert result.query_ms is not None and result.query_ms > 0
    assert result.descriptor_bytes == 2 * 3 * 4


def test_regional_methods_without_a_detector_say_how_to_get_one():
    with pytest.raises(DetectorMissing, match="train_detector.py"):
        create_method("regional_search_max", MethodContext(pretrained=False, backbone="resnet18"))


def test_region_proposer_uses_the_checkpoint_thresholds_and_detects_each_image_once(tmp_path):
    from msretrieval.models.detector import create_detector, save_detector
    from msretrieval.retrieval.aggregation.regional import RegionProposer

    torch.manual_seed(0)
    detector = create_detector(pretrained=False, min_size=64, max_size=64, rpn_pre_nms_top_n_test=50,
                               rpn_post_nms_top_n_test=20, representation_size=32, score_threshold=0.0,
                               nms_threshold=0.4)
    save_detector(detector, tmp_path / "det.pth")
    proposer = RegionProposer(tmp_path / "det.pth", max_regions=2)
    assert (proposer.score_threshold, proposer.nms_threshold) == (0.0, 0.4)
    assert RegionProposer(tmp_path / "det.pth", score_threshold=0.9).score_threshold == 0.9
    calls = []
    real_propose = proposer.detector.propose
    proposer.detector.propose = lambda images, **kw: calls.append(len(images)) or real_propose(images, **kw)
    pre = Preprocessing(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    images = torch.rand(3, 3, 64, 64) * 2 - 1
    boxes = proposer(images, pre)
    assert calls == [3]
    for image_boxes in boxes:
        assert image_boxes.shape[1] == 4 and 1 <= len(image_boxes) <= 3
        np.testing.assert_array_equal(image_boxes[0], [0, 0, 1, 1])
        assert (image_boxes >= 0).all() and (image_boxes <= 1).all()
    again = proposer(images[1:], pre)           # already seen: no detector call
    assert calls == [3] and all(np.array_equal(a, b) for a, b in zip(again, boxes[1:]))
    with pytest.raises(DetectorMissing, match="not found"):
        RegionProposer(tmp_path / "missing.pth")
