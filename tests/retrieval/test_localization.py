"""Box IoU and PCP on hand-computed boxes; ground-truth boxes read from manifests."""
from __future__ import annotations

import numpy as np
import pytest

from msretrieval.data.manifest import LabelledImageSet, read_csv_manifest
from msretrieval.retrieval.evaluation.localization import (box_iou, boxes_from_manifest, original_sizes, pcp,
                                                           rescale_boxes)

UNIT = [0, 0, 10, 10]  # area 100


@pytest.mark.parametrize("other, expected", [
    ([0, 0, 10, 10], 1.0),             # identical
    ([20, 20, 30, 30], 0.0),           # disjoint
    ([10, 0, 20, 10], 0.0),            # sharing an edge only: zero-area intersection
    ([5, 0, 15, 10], 50 / 150),        # shifted by half its width: 50 / (100 + 100 - 50)
    ([0, 5, 10, 15], 50 / 150),        # the same vertically
    ([2, 2, 7, 7], 25 / 100),          # contained: 25 / 100
    ([-5, -5, 15, 15], 100 / 400),     # containing
    ([5, 5, 15, 15], 25 / 175),        # corner overlap: 25 / (100 + 100 - 25)
])
def test_iou_hand_values(other, expected):
    assert box_iou([UNIT], [other])[0] == pytest.approx(expected)
    assert box_iou([other], [UNIT])[0] == pytest.approx(expected)   # symmetric


def test_iou_is_pairwise_aligned_not_all_pairs():
    a = np.array([UNIT, [0, 0, 4, 4]], dtype=float)
    b = np.array([[0, 0, 4, 4], [0, 0, 4, 4]], dtype=float)
    np.testing.assert_allclose(box_iou(a, b), [16 / 100, 1.0])
    assert box_iou(a, b).shape == (2,)


def test_iou_of_degenerate_boxes_is_zero_not_nan():
    iou = box_iou([[3, 3, 3, 3], [0, 0, 0, 5]], [[3, 3, 3, 3], [0, 0, 10, 10]])
    np.testing.assert_array_equal(iou, [0.0, 0.0])


def test_iou_accepts_single_boxes_and_rejects_bad_shapes():
    assert box_iou(UNIT, UNIT).shape == (1,)
    with pytest.raises(ValueError, match="differ in length"):
        box_iou([UNIT, UNIT], [UNIT])
    with pytest.raises(ValueError, match=r"\(N, 4\)"):
        box_iou([[0, 0, 1]], [[0, 0, 1]])


def test_pcp_counts_strictly_greater_than_threshold():
    half = [0, 0, 10, 5]                  # IoU with UNIT exactly 50 / 100 = 0.5
    assert box_iou([UNIT], [half])[0] == 0.5
    assert pcp([half], [UNIT]) == 0.0     # 0.5 is not > 0.5
    assert pcp([half], [UNIT], threshold=0.49) == 1.0
    predicted = [UNIT, half, [5, 0, 15, 10], [0, 0, 10, 9]]   # IoU 1, 0.5, 1/3, 0.9
    truth = [UNIT] * 4
    assert pcp(predicted, truth) == pytest.approx(2 / 4)
    assert pcp(predicted, truth, threshold=0.3) == pytest.approx(4 / 4)
    assert pcp(predicted, truth, threshold=0.95) == pytest.approx(1 / 4)


def test_pcp_of_nothing_is_an_error():
    with pytest.raises(ValueError, match="zero boxes"):
        pcp(np.zeros((0, 4)), np.zeros((0, 4)))


def _manifest(tmp_path, header, rows):
    path = tmp_path / "labels.csv"
    path.write_text("\n".join([",".join(header)] + [",".join(map(str, r)) for r in rows]) + "\n")
    return path


def test_boxes_from_manifest(tmp_path):
    path = _manifest(tmp_path, ["file", "class_id", "split", "x1", "y1", "x2", "y2"],
                     [["a.jpg", 1, "test", 1, 2, 30, 40], ["b.jpg", 2, "train", 0, 0, 5, 5],
                      ["c.jpg", 2, "test", 0.5, 1.5, 10.25, 20]])
    boxes = boxes_from_manifest(read_csv_manifest(path, split="test"))
    np.testing.assert_array_equal(boxes, [[1, 2, 30, 40], [0.5, 1.5, 10.25, 20]])
    assert boxes.dtype == np.float64


def test_boxes_absent_give_none(tmp_path):
    path = _manifest(tmp_path, ["file", "class_id", "orig_w"], [["a.jpg", 1, 100]])
    assert boxes_from_manifest(read_csv_manifest(path)) is None


@pytest.mark.parametrize("bad, match", [("abc", "not a number"), ("", "not a number"), ("nan", "not finite"),
                                        ("inf", "not finite")])
def test_non_numeric_box_names_the_file(tmp_path, bad, match):
    path = _manifest(tmp_path, ["file", "class_id", "x1", "y1", "x2", "y2"],
                     [["ok.jpg", 1, 0, 0, 5, 5], ["broken.jpg", 1, 0, bad, 5, 5]])
    with pytest.raises(ValueError, match=match) as error:
        boxes_from_manifest(read_csv_manifest(path))
    assert "broken.jpg" in str(error.value) and "y1" in str(error.value)


def test_inverted_box_names_the_file(tmp_path):
    path = _manifest(tmp_path, ["file", "class_id", "x1", "y1", "x2", "y2"], [["flip.jpg", 1, 9, 0, 5, 5]])
    with pytest.raises(ValueError, match="x2 < x1") as error:
        boxes_from_manifest(read_csv_manifest(path))
    assert "flip.jpg" in str(error.value)


def test_partial_box_columns_are_an_error():
    image_set = LabelledImageSet("toy", ("a.jpg",), np.array([1]), {"x1": ("0",), "y1": ("0",)})
    with pytest.raises(ValueError, match=r"\['x2', 'y2'\] missing"):
        boxes_from_manifest(image_set)


def test_original_sizes_and_rescaling():
    image_set = LabelledImageSet("toy", ("a.jpg", "b.jpg"), np.array([1, 1]),
                                 {"orig_w": ("500", "200"), "orig_h": ("400", "100")})
    assert original_sizes(image_set) == [(500.0, 400.0), (200.0, 100.0)]
    boxes = rescale_boxes([[100, 40, 500, 400], [0, 0, 20, 10]], original_sizes(image_set), [(250, 200), (400, 200)])
    np.testing.assert_allclose(boxes, [[50, 20, 250, 200], [0, 0, 40, 20]])
    no_sizes = LabelledImageSet("toy", ("a.jpg",), np.array([1]), {"orig_w": ("5",)})
    assert original_sizes(no_sizes) is None
