"""The landmark detector (models/detector.py), its box utilities (models/boxes.py), box CSVs (data/boxes.py)
and its training script (scripts/train_detector.py). Small images and random-init backbones keep it fast; the
one learning test trains the offline-pretrained Lite0 for 40 steps on bright squares."""
from __future__ import annotations

import csv
import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from msretrieval.data.boxes import BoxCSVError, read_box_csv
from msretrieval.models.backbones import offline_weights_path
from msretrieval.models.boxes import average_precision_at_iou, box_iou, detection_metrics, nms, recall_at_iou
from msretrieval.models.detector import (DETECTOR_FORMAT, LandmarkDetector, create_detector, load_detector,
                                         read_detector_checkpoint, save_detector)
from msretrieval.models.retrieval_net import UnsafeCheckpointError

REPO = Path(__file__).resolve().parents[2]


def _script():
    spec = importlib.util.spec_from_file_location("train_detector_script", REPO / "scripts" / "train_detector.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_detector(**options) -> LandmarkDetector:
    torch.manual_seed(0)
    settings = dict(pretrained=False, min_size=64, max_size=64, rpn_pre_nms_top_n_train=100,
                    rpn_post_nms_top_n_train=50, rpn_pre_nms_top_n_test=100, rpn_post_nms_top_n_test=50,
                    rpn_batch_size_per_image=16, box_batch_size_per_image=16, representation_size=32)
    return create_detector(**{**settings, **options})


def write_squares(folder: Path, count: int, size: int = 128, seed: int = 0, split: str = "train") -> Path:
    """Bright squares (1-2 per image, 20-50 % of the side) on dark noise, with boxes.csv in our layout."""
    rng = np.random.default_rng(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(count):
        pixels = rng.uniform(0, 60, (size, size, 3))
        for _ in range(int(rng.integers(1, 3))):
            side = int(rng.integers(size // 5, size // 2))
            x, y = (int(v) for v in rng.integers(0, size - side, 2))
            pixels[y:y + side, x:x + side] = rng.uniform(190, 255, 3)
            rows.append([f"images/{split}{i}.png", x / size, y / size, (x + side) / size, (y + side) / size, 1, split])
        Image.fromarray(pixels.astype(np.uint8)).save(folder / "images" / f"{split}{i}.png")
    path = folder / "boxes.csv"
    new = not path.exists()
    with path.open("a", newline="") as handle:
        writer = csv.writer(handle)
        if new:
            writer.writerow(["file", "x1", "y1", "x2", "y2", "class_id", "split"])
        writer.writerows(rows)
    return path


# --- box utilities: hand-computed values ---------------------------------------------------------------------

def test_iou_hand_computed():
    a = [[0, 0, 2, 2], [0, 0, 4, 4]]
    b = [[1, 1, 3, 3], [0, 0, 2, 2], [5, 5, 6, 6], [1, 1, 1, 3]]
    expected = [[1 / 7, 1.0, 0.0, 0.0],      # overlap 1x1 of two 2x2 boxes: 1 / (4 + 4 - 1)
                [4 / 16, 4 / 16, 0.0, 0.0]]  # boxes inside a 4x4 one: their area / 16; degenerate box: 0
    np.testing.assert_allclose(box_iou(a, b), expected)
    assert box_iou(np.zeros((0, 4)), b).shape == (0, 4)
    with pytest.raises(ValueError, match=r"\(N, 4\)"):
        box_iou([[0, 0, 1]], b)


def test_nms_hand_computed():
    boxes = [[20, 20, 30, 30],   # 0: score 0.7, far from the others
             [0, 0, 10, 10],     # 1: score 0.9, the best
             [1, 0, 11, 10],     # 2: score 0.8, IoU with box 1 = 90 / 110 = 0.818
             [0, 0, 10, 5]]      # 3: score 0.6, IoU with box 1 = 50 / 100 = 0.5 exactly
    scores = [0.7, 0.9, 0.8, 0.6]
    assert nms(boxes, scores, 0.5).tolist() == [1, 0, 3]        # 0.818 > 0.5 dropped, 0.5 is not > 0.5: kept
    assert nms(boxes, scores, 0.49).tolist() == [1, 0]
    assert nms(boxes, scores, 0.85).tolist() == [1, 2, 0, 3]   # highest score first
    assert nms(np.zeros((0, 4)), [], 0.5).tolist() == []
    with pytest.raises(ValueError, match="scores"):
        nms(boxes, scores[:2], 0.5)


def test_average_precision_golden_values():
    # Image A has ground truth g1, g2; image B has g3 (3 boxes in all).
    g1, g2, g3 = [0, 0, 10, 10], [20, 20, 30, 30], [0, 0, 10, 10]
    truth = [np.array([g1, g2]), np.array([g3])]
    # Predictions by score: p1 0.9 on g1 (TP), p2 0.8 on g1 again (duplicate: FP), p3 0.7 on g3 (TP),
    # p4 0.6 on nothing (FP); g2 is missed.
    #   precision 1/1, 1/2, 2/3, 2/4 at recall 1/3, 1/3, 2/3, 2/3
    #   interpolated: recall 1/3 -> max(1, .5, .667, .5) = 1; recall 2/3 -> max(.667, .5) = 2/3
    #   AP = 1/3 * 1 + 1/3 * 2/3 = 5/9 = 0.5556; recall = 2/3
    predictions = [(np.array([[0, 0, 10, 10], [0.5, 0, 10, 10], [50, 50, 60, 60]]), np.array([0.9, 0.8, 0.6])),
                   (np.array([[0, 0, 10, 9]]), np.array([0.7]))]
    assert average_precision_at_iou(predictions, truth) == pytest.approx(5 / 9)
    assert recall_at_iou(predictions, truth) == pytest.approx(2 / 3)
    metrics = detection_metrics(predictions, truth)
    assert (metrics.true_positives, metrics.num_predictions, metrics.num_ground_truth) == (2, 4, 3)
    assert metrics.precision == pytest.approx(0.5)
    # The same boxes with p3 scored below p4: TP, FP, FP, TP -> precision 1, 1/2, 1/3, 1/2 at recall
    # 1/3, 1/3, 1/3, 2/3 -> AP = 1/3 * 1 + 1/3 * 1/2 = 0.5.
    predictions[1] = (predictions[1][0], np.array([0.5]))
    assert average_precision_at_iou(predictions, truth) == pytest.approx(0.5)
    # Interpolation lifts an early false positive: FP 0.9, TP 0.8 on one box -> precision 0, 1/2 at recall
    # 0, 1 -> AP = 1 * 1/2.
    single = [(np.array([[50, 50, 60, 60], [0, 0, 10, 10]]), np.array([0.9, 0.8]))]
    assert average_precision_at_iou(single, [np.array([g1])]) == pytest.approx(0.5)


def test_average_precision_iou_threshold_and_voc_matching():
    truth = [np.array([[0, 0, 10, 10]])]
    shifted = [(np.array([[0, 0, 10, 4.5]]), np.array([0.9]))]     # IoU 0.45: a miss at 0.5, a hit at 0.4
    assert average_precision_at_iou(shifted, truth, iou=0.5) == 0.0
    assert average_precision_at_iou(shifted, truth, iou=0.4) == pytest.approx(1.0)
    # VOC matching: a prediction whose best ground truth is taken is a false positive, even if it overlaps
    # another free box by >= 0.5 (no fall-back to the second best).
    two = [np.array([[0, 0, 10, 10], [1, 0, 11, 10]])]
    predictions = [(np.array([[0, 0, 10, 10], [0, 0, 10, 10]]), np.array([0.9, 0.8]))]
    assert recall_at_iou(predictions, two) == pytest.approx(0.5)
    assert math.isnan(average_precision_at_iou([(np.zeros((0, 4)), np.zeros(0))], [np.zeros((0, 4))]))
    assert average_precision_at_iou([(np.zeros((0, 4)), np.zeros(0))], truth) == 0.0
    with pytest.raises(ValueError, match="predictions for 2 images"):
        average_precision_at_iou(predictions * 2, truth)


# --- the detector --------------------------------------------------------------------------------------------

def test_forward_and_losses_on_cpu(one_thread):
    detector = tiny_detector()
    assert detector.model.backbone.stride == 16 and detector.model.backbone.out_channels == 112
    assert detector.config.anchor_sizes == (6, 13, 26, 51)  # 0.1, 0.2, 0.4, 0.8 x min_size
    images = [torch.rand(3, 64, 80), torch.rand(3, 72, 64)]
    targets = [{"boxes": torch.tensor([[10.0, 12.0, 40.0, 50.0]]), "labels": torch.ones(1, dtype=torch.int64)},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}]  # a negative image
    detector.train()
    losses = detector(images, targets)
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    trunk = detector.model.backbone
    assert all(p.grad is None for p in trunk.stem.parameters())            # frozen stem
    assert trunk.blocks[-1][0].conv_pw.weight.grad is not None             # trained stride-16 block
    assert detector.model.roi_heads.box_predictor.cls_score.weight.grad is not None
    bn = trunk.blocks[-1][0].bn1
    assert not bn.training  # BatchNorm statistics stay frozen in training mode
    detector.eval()
    with torch.no_grad():
        outputs = detector(images)
    assert len(outputs) == 2 and set(outputs[0]) == {"boxes", "scores", "labels"}


def test_propose_full_image_first_normalised_and_thresholds(one_thread):
    detector = tiny_detector()
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (60, 90, 3), dtype=np.uint8)), torch.rand(3, 80, 64)]
    regions = detector.propose(images, max_boxes=3, score_threshold=0.0, nms_threshold=0.5)
    assert len(regions) == 2
    for array in regions:
        assert array.dtype == np.float32 and array.ndim == 2 and array.shape[1] == 4
        assert 1 < len(array) <= 4  # full image + at most max_boxes
        np.testing.assert_array_equal(array[0], [0, 0, 1, 1])
        assert (array >= 0).all() and (array <= 1).all()
        assert (array[:, 2] >= array[:, 0]).all() and (array[:, 3] >= array[:, 1]).all()
    # Thresholds: every detection scores above score_threshold, no two overlap by more than nms_threshold,
    # and they are the top of detect()'s list.
    all_boxes, all_scores = detector.detect(images[:1], score_threshold=0.0, nms_threshold=0.3)[0]
    threshold = float(np.median(all_scores))
    kept, scores = detector.propose(images[:1], max_boxes=50, score_threshold=threshold, nms_threshold=0.3,
                                    return_scores=True)
    boxes, scores = kept[0][1:], scores[0][1:]
    assert len(boxes) >= 1 and (scores > threshold).all() and (np.diff(scores) <= 0).all()
    np.testing.assert_allclose(boxes, all_boxes[all_scores > threshold][:50], atol=1e-6)
    overlaps = box_iou(boxes, boxes) - np.eye(len(boxes))
    assert overlaps.max() <= 0.3 + 1e-6
    only_full = detector.propose(images, max_boxes=0)
    assert all(a.shape == (1, 4) for a in only_full)
    assert detector.propose(images, score_threshold=0.999)[0].shape == (1, 4)  # scores of a fresh head ~0.5


def test_propose_drops_sliver_boxes_before_keeping_the_best(one_thread, monkeypatch):
    detector = tiny_detector(max_boxes=2)  # min_box_side 0.02 by default
    boxes = np.array([[0.2, 0.2, 0.6, 0.6],      # kept
                      [0.0, 0.5, 0.9, 0.5001],   # a sliver clipped at a border: 0.0001 tall
                      [0.985, 0.1, 1.0, 0.9],    # 0.015 wide: dropped
                      [0.1, 0.1, 0.3, 0.125],    # 0.025 tall: kept
                      [0.5, 0.5, 0.9, 0.9]],     # would be third: cut by max_boxes
                     dtype=np.float32)
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5], dtype=np.float32)
    asked = []
    monkeypatch.setattr(detector, "detect", lambda images, s, n, most, b: asked.append(most) or [(boxes, scores)])
    regions, kept_scores = detector.propose([torch.rand(3, 32, 32)], return_scores=True)
    np.testing.assert_array_equal(regions[0], [[0, 0, 1, 1], boxes[0], boxes[3]])
    np.testing.assert_array_equal(kept_scores[0], np.float32([1.0, 0.9, 0.6]))
    assert asked == [100]  # more candidates than max_boxes, so slivers do not take a real region's place
    with pytest.raises(ValueError, match="min_box_side"):
        tiny_detector(min_box_side=1.0)


def test_propose_validates_its_arguments(one_thread):
    detector = tiny_detector()
    image = torch.rand(3, 32, 32)
    for kwargs, message in [({"max_boxes": -1}, "max_boxes"), ({"max_boxes": 2.5}, "max_boxes"),
                            ({"max_boxes": True}, "max_boxes"), ({"score_threshold": 1.0}, "score_threshold"),
                            ({"score_threshold": -0.1}, "score_threshold"), ({"nms_threshold": 0.0}, "nms_threshold"),
                            ({"nms_threshold": 1.5}, "nms_threshold")]:
        with pytest.raises(ValueError, match=message):
            detector.propose([image], **kwargs)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        detector.propose([image * 255])
    with pytest.raises(ValueError, match="float"):
        detector.propose([(image * 255).to(torch.uint8)])
    with pytest.raises(ValueError, match=r"\(3, H, W\)"):
        detector.propose([torch.rand(1, 32, 32)])
    with pytest.raises(TypeError, match="PIL image"):
        detector.propose([np.zeros((32, 32, 3))])


def test_checkpoint_round_trip_gives_equal_outputs(tmp_path, one_thread):
    detector = tiny_detector(max_boxes=3, score_threshold=0.2, anchor_sizes=(8, 16, 32))
    path = tmp_path / "det.pth"
    save_detector(detector, path, extra={"note": "round trip", "step": 7})
    raw = torch.load(path, weights_only=True)  # plain tensors and values only
    assert raw["format"] == DETECTOR_FORMAT and raw["note"] == "round trip"
    assert raw["config"]["anchor_sizes"] == [8, 16, 32] and raw["config"]["min_size"] == 64
    loaded = load_detector(path)
    assert loaded.config == detector.config and not loaded.training
    images = [torch.rand(3, 64, 64), torch.rand(3, 48, 70)]
    first, first_scores = detector.propose(images, score_threshold=0.0, return_scores=True)
    second, second_scores = loaded.propose(images, score_threshold=0.0, return_scores=True)
    for a, b, sa, sb in zip(first, second, first_scores, second_scores):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(sa, sb)
    with pytest.raises(ValueError, match="reserved"):
        save_detector(detector, tmp_path / "x.pth", extra={"config": {}})
    torch.save({"format": "something-else", "state_dict": {}}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not a msretrieval-detector"):
        load_detector(tmp_path / "other.pth")


class Payload:
    """Unpickling this calls exec(), which writes ``marker``."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('the payload ran')",)


def test_a_crafted_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "ran"
    evil = tmp_path / "run" / "last.pth"
    evil.parent.mkdir()
    torch.save({"format": DETECTOR_FORMAT, "config": {}, "state_dict": {}, "training_state": {"step": 1},
                "payload": Payload(marker)}, evil)
    torch.load(evil, weights_only=False)  # the payload is live under a plain unpickler...
    assert marker.read_text() == "the payload ran"
    marker.unlink()
    script = _script()
    for load in (lambda: load_detector(evil), lambda: read_detector_checkpoint(evil),
                 lambda: script.main(["--resume", str(evil.parent)])):  # train_detector.py --resume
        with pytest.raises(UnsafeCheckpointError, match="refusing .*last.pth"):
            load()
    assert not marker.exists()
    from msretrieval.utils.cli import USER_ERRORS
    assert issubclass(UnsafeCheckpointError, USER_ERRORS)  # the script reports it in one line, exit code 2


# --- box CSVs ------------------------------------------------------------------------------------------------

def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_box_csv_our_layout(tmp_path):
    (tmp_path / "img").mkdir()
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        Image.new("RGB", (8, 8)).save(tmp_path / "img" / name)
    path = _write(tmp_path / "boxes.csv", "file,x1,y1,x2,y2,class_id,split\n"
                  "img/a.jpg,0.1,0.2,0.5,0.6,3,train\n"
                  "img/a.jpg,0.5,0.5,1.0004,1.0,3,train\n"     # a hair outside [0, 1]: clipped
                  "img/b.jpg,,,,,,test\n"                       # an image without boxes
                  "img/c.jpg,0,0,1,1,,\n")                      # class 1, the default split
    images = read_box_csv(path)
    assert [im.path.name for im in images] == ["a.jpg", "b.jpg", "c.jpg"]
    np.testing.assert_allclose(images[0].boxes, [[0.1, 0.2, 0.5, 0.6], [0.5, 0.5, 1.0, 1.0]], rtol=1e-6)
    assert images[0].class_ids.tolist() == [3, 3] and images[0].split == "train"
    assert images[1].boxes.shape == (0, 4) and images[1].split == "test"
    assert images[2].class_ids.tolist() == [1] and images[2].split == "train"


@pytest.mark.parametrize("row,message", [
    ("img/a.jpg,0.1,zero,0.5,0.6,1,train", r"boxes.csv:3 \(img/a.jpg\): y1 'zero' is not a number"),
    ("img/a.jpg,0.1,0.2,1.5,0.6,1,train", r"boxes.csv:3 \(img/a.jpg\): x2 = 1.5 is outside \[0, 1\]"),
    ("img/a.jpg,0.6,0.2,0.5,0.6,1,train", r"boxes.csv:3 \(img/a.jpg\): empty box"),
    ("img/a.jpg,0.1,,0.5,0.6,1,train", r"boxes.csv:3 \(img/a.jpg\): some coordinates are empty"),
    ("img/a.jpg,0.1,0.2,0.5,0.6,x,train", r"boxes.csv:3 \(img/a.jpg\): class_id 'x'"),
    ("img/a.jpg,0.1,0.2,0.5,0.6,1,test", r"boxes.csv:3 \(img/a.jpg\): a.jpg is in split 'test' here but 'train'"),
    ("img/zzz.jpg,0.1,0.2,0.5,0.6,1,train", r"1 image\(s\) not found, e.g. .*zzz.jpg \(.*boxes.csv:3\)"),
])
def test_box_csv_errors_name_file_and_row(tmp_path, row, message):
    (tmp_path / "img").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "img" / "a.jpg")
    path = _write(tmp_path / "boxes.csv",
                  f"file,x1,y1,x2,y2,class_id,split\nimg/a.jpg,0.1,0.2,0.5,0.6,1,train\n{row}\n")
    with pytest.raises(BoxCSVError, match=message):
        read_box_csv(path)


def test_box_csv_google_landmarks_layout(tmp_path):
    flat = "0123456789abcdef"
    nested = "fedcba9876543210"
    Image.new("RGB", (8, 8)).save(tmp_path / f"{flat}.jpg")
    (tmp_path / "f" / "e" / "d").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "f" / "e" / "d" / f"{nested}.jpg")
    path = _write(tmp_path / "boxes_split1.csv", f"id,box\n{flat},0.1 0.2 0.7 0.9\n"
                  f"{nested},0.0 0.0 0.5 0.5 0.5 0.5 1.0 1.0\n{flat},0.2 0.3 0.4 0.5\n")
    images = read_box_csv(path)
    assert [im.path for im in images] == [tmp_path / f"{flat}.jpg", tmp_path / "f/e/d" / f"{nested}.jpg"]
    # ymin xmin ymax xmax -> x1 y1 x2 y2; the id's second row adds a box
    np.testing.assert_allclose(images[0].boxes, [[0.2, 0.1, 0.9, 0.7], [0.3, 0.2, 0.5, 0.4]], rtol=1e-6)
    assert len(images[1].boxes) == 2 and {im.split for im in images} == {"train"}
    bad = _write(tmp_path / "bad.csv", f"id,box\n{flat},0.1 0.2 0.7\n")
    with pytest.raises(BoxCSVError, match=rf"bad.csv:2 \(id {flat}\): box has 3 numbers"):
        read_box_csv(bad)
    with pytest.raises(BoxCSVError, match="unknown box CSV layout"):
        read_box_csv(_write(tmp_path / "other.csv", "file,class_id\na.jpg,1\n"))


# --- training --------------------------------------------------------------------------------------------------

def test_training_resumes_exactly(tmp_path, monkeypatch, one_thread):
    """A run killed after its step-2 checkpoint and resumed ends with the weights of an uninterrupted run."""
    boxes = write_squares(tmp_path / "data", 10, size=64)
    script = _script()
    common = ["--boxes", str(boxes), "--steps", "4", "--eval-every", "2", "--batch-size", "2", "--random-init",
              "--min-size", "64", "--max-size", "64", "--val-fraction", "0.2", "--lr", "1e-3"]
    assert script.main([*common, "--out", str(tmp_path / "straight")]) == 0

    from msretrieval.training.detection import DetectorTrainer
    original_save = DetectorTrainer.save

    def save_then_die(self, name, metrics=None):
        original_save(self, name, metrics)
        if name == "last.pth" and self.step == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(DetectorTrainer, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        script.main([*common, "--out", str(tmp_path / "killed")])
    monkeypatch.setattr(DetectorTrainer, "save", original_save)
    with pytest.raises(ValueError, match="cannot change when resuming"):
        script.main(["--resume", str(tmp_path / "killed"), "--lr", "0.1"])
    assert script.main(["--resume", str(tmp_path / "killed")]) == 0
    straight = read_detector_checkpoint(tmp_path / "straight" / "last.pth")
    resumed = read_detector_checkpoint(tmp_path / "killed" / "last.pth")
    assert straight["training_state"]["step"] == resumed["training_state"]["step"] == 4
    for key, value in straight["state_dict"].items():
        assert torch.equal(value, resumed["state_dict"][key]), key
    results = json.loads((tmp_path / "straight" / "results.json").read_text())
    assert [entry["step"] for entry in results["validation"]] == [0, 2, 4]
    assert (tmp_path / "straight" / "best.pth").is_file() and any((tmp_path / "straight" / "tb").iterdir())
    with pytest.raises(FileExistsError, match="--resume"):
        script.main([*common, "--out", str(tmp_path / "straight")])


@pytest.mark.skipif(offline_weights_path("tf_efficientnet_lite0") is None, reason="offline Lite0 weights missing")
@pytest.mark.timeout(300)  # 30 training steps of the detector
def test_training_learns_bright_squares(tmp_path, one_thread):
    """30 steps of the offline-pretrained Lite0 detector lift validation AP@0.5 well above the untrained
    model's, and the test split is evaluated once at the end with the best checkpoint."""
    boxes = write_squares(tmp_path / "data", 56, size=128, seed=1)
    write_squares(tmp_path / "data", 12, size=128, seed=2, split="test")
    run = tmp_path / "run"
    assert _script().main(["--boxes", str(boxes), "--out", str(run), "--steps", "30", "--eval-every", "30",
                           "--batch-size", "4", "--lr", "1e-3", "--warmup", "5", "--min-size", "128",
                           "--max-size", "128", "--val-fraction", "0.25", "--eval-split", "test"]) == 0
    results = json.loads((run / "results.json").read_text())
    untrained, trained = results["validation"][0]["ap50"], results["validation"][-1]["ap50"]
    assert trained > untrained + 0.3 and trained > 0.4, results["validation"]
    assert results["test"]["checkpoint"] == "best.pth" and results["test"]["images"] == 12
    assert results["test"]["ap50"] > 0.3, results["test"]
    detector = load_detector(run / "best.pth")
    regions = detector.propose([Image.open(tmp_path / "data" / "images" / "test0.png")])
    assert 1 <= len(regions[0]) <= 5
