"""GLDv2 manifests (train.csv and train_clean.csv) on a tiny synthetic layout."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from msretrieval.data.gldv2 import gldv2_image_path, landmark_ids, read_gldv2, read_gldv2_pairs, select_landmarks
from msretrieval.data.images import ImageLoadError, load_image
from msretrieval.data.manifest import ManifestError
from msretrieval.data.samplers import ClassBalancedBatchSampler

# landmark id -> image ids (16 hex characters, like GLDv2's)
LANDMARKS = {
    907: ["a1b2c3d4e5f60001", "a1b2c3d4e5f60002", "0f0e0d0c0b0a0003"],
    12: ["ffee000000000004", "ffee000000000005"],
    138982: ["1234567890abcdef", "1234567890abcde0", "1234567890abcde1", "1234567890abcde2"],
    55: ["9999999999999999"],
}


def write_text(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def write_train_csv(folder: Path) -> Path:
    rows = [(image_id, landmark) for landmark, ids in LANDMARKS.items() for image_id in ids]
    rows = rows[1::2] + rows[0::2]          # images of a landmark are not contiguous in the real file
    lines = ["id,url,landmark_id"] + [f"{i},http://x/{i}.jpg,{landmark}" for i, landmark in rows]
    return write_text(folder / "train.csv", "\n".join(lines) + "\n")


def write_clean_csv(folder: Path) -> Path:
    lines = ["landmark_id,images"] + [f"{landmark},{' '.join(ids)}" for landmark, ids in LANDMARKS.items()]
    return write_text(folder / "train_clean.csv", "\n".join(lines) + "\n")


@pytest.fixture
def gldv2_root(tmp_path) -> Path:
    root = tmp_path / "gldv2"
    write_train_csv(root)
    write_clean_csv(root)
    for ids in LANDMARKS.values():
        for image_id in ids:
            path = gldv2_image_path(root, image_id)
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (12, 10), (int(image_id[:2], 16), 0, 0)).save(path)
    return root


def test_image_path_uses_the_first_three_characters_as_folders(tmp_path):
    assert gldv2_image_path(tmp_path, "abcdef0123") == tmp_path / "train/a/b/c/abcdef0123.jpg"
    assert gldv2_image_path(tmp_path, "abc", image_folder="index") == tmp_path / "index/a/b/c/abc.jpg"


def test_train_csv_gives_remapped_labels_paths_and_the_landmark_mapping(gldv2_root):
    images = read_gldv2(gldv2_root / "train.csv")
    assert images.name == "gldv2-train" and len(images) == 10 and images.num_classes == 4
    # Labels in ascending landmark-id order: 12 -> 0, 55 -> 1, 907 -> 2, 138982 -> 3.
    assert landmark_ids(images).tolist() == [12, 55, 907, 138982]
    for path, label, image_id, landmark in zip(images.paths, images.labels, images.extra["image_id"],
                                               images.extra["landmark_id"]):
        assert image_id in LANDMARKS[int(landmark)]
        assert landmark_ids(images)[label] == int(landmark)
        assert path == gldv2_root / "train" / image_id[0] / image_id[1] / image_id[2] / f"{image_id}.jpg"
        assert load_image(path).size == (12, 10)


def test_clean_csv_gives_the_same_images(gldv2_root):
    per_image = read_gldv2(gldv2_root / "train.csv")
    clean = read_gldv2(gldv2_root / "train_clean.csv")
    assert clean.name == "gldv2-train_clean"
    assert sorted(zip(per_image.paths, per_image.labels.tolist())) == sorted(zip(clean.paths, clean.labels.tolist()))


def test_min_images_per_class_drops_small_landmarks_and_remaps(gldv2_root):
    images = read_gldv2(gldv2_root / "train_clean.csv", min_images_per_class=3)
    assert landmark_ids(images).tolist() == [907, 138982]
    assert sorted(images.labels.tolist()) == [0] * 3 + [1] * 4
    with pytest.raises(ManifestError, match=">= 5 images"):
        read_gldv2(gldv2_root / "train_clean.csv", min_images_per_class=5)


def test_max_classes_keeps_the_largest_landmarks(gldv2_root):
    images = read_gldv2(gldv2_root / "train.csv", max_classes=2)
    assert landmark_ids(images).tolist() == [907, 138982]
    three = read_gldv2(gldv2_root / "train.csv", max_classes=3)
    assert landmark_ids(three).tolist() == [12, 907, 138982]
    # Ties go to the smaller landmark id; the result is in ascending landmark-id order.
    assert select_landmarks({9: 4, 5: 2, 3: 2, 1: 1}, min_images_per_class=1, max_classes=2) == [3, 9]
    assert select_landmarks({9: 4, 5: 2, 3: 2, 1: 1}, min_images_per_class=2, max_classes=None) == [3, 5, 9]
    with pytest.raises(ValueError, match="max_classes"):
        read_gldv2(gldv2_root / "train.csv", max_classes=0)


def test_labels_work_with_the_class_balanced_sampler(gldv2_root):
    images = read_gldv2(gldv2_root / "train.csv")
    batch = next(iter(ClassBalancedBatchSampler(images.labels, classes_per_batch=3, images_per_class=2)))
    assert len(set(images.labels[batch].tolist())) == 3


@pytest.mark.parametrize("text, message", [
    ("id,landmark\nabc,1\n", "expected columns"),
    ("id,landmark_id\nabc,one\n", r"train.csv:2: landmark_id 'one' is not an integer"),
    ("id,landmark_id\nab,1\n", "image id 'ab'"),
    ("id,landmark_id\n../etc,1\n", "image id '../etc'"),
    ("id,landmark_id\nabc,1\nabd\n", "train.csv:3: expected 2 fields"),
    ("id,landmark_id\nabc,1,extra\n", "expected 2 fields"),
    ("id,landmark_id\nabc,1\nabc,2\n", "image abc is listed twice"),
    ("id,landmark_id\n", "no images"),
])
def test_malformed_train_csv(tmp_path, text, message):
    with pytest.raises(ManifestError, match=message):
        read_gldv2(write_text(tmp_path / "train.csv", text))


@pytest.mark.parametrize("text, message", [
    ("landmark_id,images\n7,\n", "landmark 7 lists no images"),
    ("landmark_id,images\n7,abc abd\n8,abd\n", "image abd is listed twice"),
    ("landmark_id,images\n7,abc a/b\n", "image id 'a/b'"),
])
def test_malformed_clean_csv(tmp_path, text, message):
    with pytest.raises(ManifestError, match=message):
        read_gldv2_pairs(write_text(tmp_path / "train_clean.csv", text))


def test_missing_manifest(tmp_path):
    with pytest.raises(ManifestError, match="not found"):
        read_gldv2(tmp_path / "nowhere.csv")


def test_missing_image_fails_when_loaded_not_when_listed(gldv2_root):
    images = read_gldv2(gldv2_root / "train.csv")
    images.paths[0].unlink()
    with pytest.raises(ImageLoadError, match=images.extra["image_id"][0]):
        load_image(images.paths[0])
    assert np.array_equal(read_gldv2(gldv2_root / "train.csv").labels, images.labels)
