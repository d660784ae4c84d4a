"""scripts/proposal_rate.py: the share of images a detector proposes regions on, and how much they cover."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from msretrieval.models.boxes import union_area

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
import proposal_rate  # noqa: E402

FULL = [0.0, 0.0, 1.0, 1.0]


def test_union_area_counts_overlaps_once():
    assert union_area(np.zeros((0, 4))) == 0.0
    assert union_area([[0, 0, 2, 2]]) == 4.0
    assert union_area([[0, 0, 2, 2], [1, 1, 3, 3]]) == 7.0                      # 4 + 4 - the 1 x 1 overlap
    assert union_area([[0, 0, 2, 2], [1, 1, 3, 3], [5, 5, 6, 6], [0, 0, 1, 1]]) == 8.0  # + disjoint, + inside
    assert union_area([[0, 0, 2, 2], [3, 3, 3, 4]]) == 4.0                      # a zero-width box adds nothing
    assert union_area([[0, 0, 4, 1], [0, 0, 1, 4], [3, 0, 4, 4], [0, 3, 4, 4]]) == 12.0  # a frame: 16 - the 2 x 2 hole


def test_proposal_statistics_by_hand():
    regions = [np.array([FULL]),
               np.array([FULL, [0, 0, 0.5, 0.5], [0.25, 0.25, 0.75, 0.75]]),
               np.array([FULL, [0, 0, 1, 0.5]])]
    stats = proposal_rate.proposal_statistics(regions)
    assert stats["images"] == 3 and stats["images_with_proposals"] == 2
    assert stats["with_proposals"] == pytest.approx(2 / 3)
    assert stats["proposals_per_image"] == pytest.approx(1.0)
    # coverage: 0, 0.25 + 0.25 - 0.0625 = 0.4375, 0.5
    assert stats["coverage"] == pytest.approx((0.4375 + 0.5) / 3)
    assert stats["coverage_when_proposed"] == pytest.approx((0.4375 + 0.5) / 2)
    assert stats["box_area"] == pytest.approx((0.25 + 0.25 + 0.5) / 3)


def test_evenly_spread():
    assert proposal_rate.evenly_spread(10, None).tolist() == list(range(10))
    assert proposal_rate.evenly_spread(10, 4).tolist() == [0, 3, 6, 9]
    assert proposal_rate.evenly_spread(3, 5).tolist() == [0, 1, 2]


def test_command_line_end_to_end(tmp_path, make_labelled_set, capsys):
    from msretrieval.models.detector import create_detector, save_detector

    torch.manual_seed(0)
    detector = create_detector(pretrained=False, min_size=64, max_size=64, rpn_pre_nms_top_n_test=50,
                               rpn_post_nms_top_n_test=20, representation_size=32)
    save_detector(detector, tmp_path / "det.pth")
    manifest = make_labelled_set(num_classes=2, per_class=3)
    out = tmp_path / "rate.json"
    assert proposal_rate.main(["--detector", str(tmp_path / "det.pth"), "--images", f"csv:{manifest}",
                               "--image-size", "64", "--limit", "4", "--score-threshold", "0.0",
                               "--out", str(out), "--threads", "1"]) == 0
    record = json.loads(out.read_text())
    assert record["images"] == 4 and len(record["files"]) == 4 and len(record["proposals"]) == 4
    assert record["images_with_proposals"] == sum(n > 0 for n in record["proposals"])
    assert record["proposals_per_image"] == pytest.approx(np.mean(record["proposals"]))
    assert record["score_threshold"] == 0.0 and record["max_regions"] == 4
    assert f"{record['images_with_proposals']} of 4 images with a proposal" in capsys.readouterr().out


def test_bad_image_spec_is_one_line(tmp_path):
    from msretrieval.utils.errors import UserError

    with pytest.raises(UserError, match="use flowers102:SPLIT or csv:PATH"):
        proposal_rate.image_list("revisitop:roxford5k", tmp_path)
