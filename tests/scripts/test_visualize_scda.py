"""scripts/visualize_scda.py (its main(argv), in-process) on a tiny generated set with ground-truth boxes (random ResNet-18)."""
from __future__ import annotations

import csv
import importlib.util
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "visualize_scda.py"
TRUTH_COLOUR = (0, 230, 90)      # scripts/visualize_scda.py TRUTH_COLOUR
PREDICTED_COLOUR = (255, 220, 0)
SIZE = (64, 48)                  # files on disk
ORIGINAL = (128, 96)             # orig_w, orig_h: the boxes are given in this frame
BOX = (16, 12, 48, 36)           # object in file pixels


def _write_boxed_set(folder: Path, count: int = 6) -> Path:
    """``count`` images with a bright square at BOX; boxes in the (2x larger) original-photo frame."""
    (folder / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(count):
        pixels = rng.integers(0, 60, (SIZE[1], SIZE[0], 3), dtype=np.uint8)
        x1, y1, x2, y2 = BOX
        pixels[y1:y2, x1:x2] = rng.integers(180, 255, 3, dtype=np.uint8)
        name = f"images/im{i}.png"
        Image.fromarray(pixels).save(folder / name)
        scale = ORIGINAL[0] // SIZE[0]
        rows.append([name, i % 2 + 1, "test", *ORIGINAL, *(v * scale for v in BOX)])
    rows.append(["images/im0.png", 1, "train", *ORIGINAL, 0, 0, 1, 1])   # another split: never used
    with (folder / "labels.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file", "class_id", "split", "orig_w", "orig_h", "x1", "y1", "x2", "y2"])
        writer.writerows(rows)
    return folder / "labels.csv"


def _pixels_of(grid: np.ndarray, colour) -> np.ndarray:
    return np.all(grid == np.array(colour, dtype=np.uint8), axis=-1)


def test_grid_boxes_and_pcp_over_the_whole_split(script, one_thread, tmp_path, capsys, caplog):
    manifest = _write_boxed_set(tmp_path / "toy")
    out = tmp_path / "out" / "grid.png"
    caplog.set_level("INFO")
    assert script.main(["--backbone", "resnet18", "--random-init", "--image-size", "48", "--benchmark-csv",
                        str(manifest), "--split", "test", "--num-images", "4", "--columns", "3", "--pcp-all",
                        "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    grid = np.asarray(Image.open(out).convert("RGB"))
    assert grid.shape == (2 * 48, 3 * 48, 3)          # 4 cells of 48 px, 3 columns -> 2 rows
    assert re.search(r"^PCP: [01]\.\d{3} \(6 images\)$", stdout, re.M), stdout
    assert "PCP on the 4 shown images" in caplog.text
    assert _pixels_of(grid, PREDICTED_COLOUR).any()
    # The ground truth of the first cell, rescaled from the original frame to the file, then to the cell:
    # the 64x48 image is shown at 48x36 (scale 0.75), centred 6 px down.
    truth = _pixels_of(grid[:48, :48], TRUTH_COLOUR)
    ys, xs = np.nonzero(truth)
    assert len(xs) > 0
    expected = (BOX[0] * 0.75, BOX[1] * 0.75 + 6, BOX[2] * 0.75 - 1, BOX[3] * 0.75 - 1 + 6)
    np.testing.assert_allclose([xs.min(), ys.min(), xs.max(), ys.max()], expected, atol=1)


@pytest.fixture(scope="module")
def script():
    """The script as a module, for the cases run in-process (a subprocess start-up alone costs seconds)."""
    spec = importlib.util.spec_from_file_location("visualize_scda_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module




def test_seeded_choice_without_boxes(script, one_thread, make_labelled_set, tmp_path, capsys, caplog):
    manifest = make_labelled_set(num_classes=2, per_class=3)
    out = tmp_path / "grid.png"
    caplog.set_level("INFO")
    assert script.main(["--benchmark-csv", str(manifest), "--num-images", "5", "--columns", "2", "--seed", "1",
                        "--backbone", "resnet18", "--random-init", "--image-size", "48", "--cell-size", "40",
                        "--out", str(out)]) == 0
    grid = np.asarray(Image.open(out).convert("RGB"))
    assert grid.shape == (3 * 40, 2 * 40, 3)          # 5 cells, 2 columns -> 3 rows
    assert "PCP" not in capsys.readouterr().out and "no ground-truth boxes" in caplog.text
    assert not _pixels_of(grid, TRUTH_COLOUR).any()
    assert list(script.choose_images(6, 5, seed=1)) != [0, 1, 2, 3, 4]
    assert list(script.choose_images(6, 9, seed=None)) == [0, 1, 2, 3, 4, 5]


def test_pcp_all_without_boxes_is_a_clear_error(script, make_labelled_set, tmp_path):
    manifest = make_labelled_set(num_classes=2, per_class=2)
    with pytest.raises(ValueError, match="--pcp-all needs ground-truth boxes"):   # before any model is built
        script.main(["--benchmark-csv", str(manifest), "--pcp-all", "--backbone", "no_such_net",
                     "--out", str(tmp_path / "x.png")])
    assert not (tmp_path / "x.png").exists()
