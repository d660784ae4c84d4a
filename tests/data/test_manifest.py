"""CSV manifests written to tmp_path."""
from __future__ import annotations

import numpy as np
import pytest

from msretrieval.data.manifest import LabelledImageSet, ManifestError, flowers102, read_csv_manifest

ROWS = [
    ("img/a.jpg", "1", "train", "x"),
    ("img/b.jpg", "1", "train", "y"),
    ("img/c.jpg", "2", "train", "z"),
    ("img/d.jpg", "52", "test", "u"),
    ("img/e.jpg", "53", "test", "v"),
    ("img/f.jpg", "52", "test", "w"),
]


def _write(path, header, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join([",".join(header)] + [",".join(r) for r in rows]) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def manifest(tmp_path):
    return _write(tmp_path / "myset" / "labels.csv", ("file", "class_id", "split", "note"), ROWS)


def test_read_all_rows(manifest):
    data = read_csv_manifest(manifest)
    assert isinstance(data, LabelledImageSet)
    assert len(data) == 6 and data.name == "myset"
    assert data.labels.dtype == np.int64
    np.testing.assert_array_equal(data.labels, [1, 1, 2, 52, 53, 52])
    assert data.num_classes == 4
    assert data.extra == {"split": ("train",) * 3 + ("test",) * 3, "note": ("x", "y", "z", "u", "v", "w")}


def test_paths_are_relative_to_the_csv(manifest, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the working directory must not matter
    data = read_csv_manifest(manifest)
    assert data.paths[0] == manifest.parent / "img" / "a.jpg"
    assert all(p.parent == manifest.parent / "img" for p in data.paths)
    assert [p.name for p in data.paths] == ["a.jpg", "b.jpg", "c.jpg", "d.jpg", "e.jpg", "f.jpg"]


@pytest.mark.parametrize("split, names, labels", [
    ("train", ["a.jpg", "b.jpg", "c.jpg"], [1, 1, 2]),
    ("test", ["d.jpg", "e.jpg", "f.jpg"], [52, 53, 52]),
])
def test_split_selection(manifest, split, names, labels):
    data = read_csv_manifest(manifest, split=split)
    assert data.name == f"myset-{split}"
    assert [p.name for p in data.paths] == names
    np.testing.assert_array_equal(data.labels, labels)
    assert data.extra["split"] == (split,) * 3
    assert read_csv_manifest(manifest, split=split, name="custom").name == "custom"


def test_empty_split_is_an_error(manifest):
    with pytest.raises(ManifestError, match="val") as info:
        read_csv_manifest(manifest, split="val")
    assert str(manifest) in str(info.value)


def test_split_without_split_column(tmp_path):
    path = _write(tmp_path / "s" / "labels.csv", ("file", "class_id"), [("a.jpg", "0")])
    assert len(read_csv_manifest(path)) == 1
    with pytest.raises(ManifestError, match="split"):
        read_csv_manifest(path, split="test")


@pytest.mark.parametrize("header, missing", [
    (("file", "split"), "class_id"),
    (("path", "class_id", "split"), "file"),
    (("name", "label"), "file"),
])
def test_missing_columns(tmp_path, header, missing):
    path = _write(tmp_path / "m" / "labels.csv", header, [("a.jpg", "1", "train")[: len(header)]])
    with pytest.raises(ManifestError, match="missing column") as info:
        read_csv_manifest(path)
    assert missing in str(info.value) and str(path) in str(info.value)


@pytest.mark.parametrize("bad", ["one", "1.5", ""])
def test_non_integer_class_id(tmp_path, bad):
    path = _write(tmp_path / "n" / "labels.csv", ("file", "class_id"), [("a.jpg", "3"), ("broken.jpg", bad)])
    with pytest.raises(ManifestError, match="not an integer") as info:
        read_csv_manifest(path)
    message = str(info.value)
    assert str(path) in message and "broken.jpg" in message


def test_short_row_is_an_error(tmp_path):
    path = tmp_path / "short" / "labels.csv"
    path.parent.mkdir()
    path.write_text("file,class_id\na.jpg,1\nb.jpg\n", encoding="utf-8")
    with pytest.raises(ManifestError, match="b.jpg"):
        read_csv_manifest(path)


def test_missing_and_empty_manifest(tmp_path):
    with pytest.raises(ManifestError, match="not found"):
        read_csv_manifest(tmp_path / "nothing.csv")
    empty = _write(tmp_path / "e" / "labels.csv", ("file", "class_id"), [])
    with pytest.raises(ManifestError, match="no rows"):
        read_csv_manifest(empty)


def test_subset(manifest):
    data = read_csv_manifest(manifest)
    sub = data.subset([4, 0, 4])
    assert sub.name == data.name
    assert [p.name for p in sub.paths] == ["e.jpg", "a.jpg", "e.jpg"]
    np.testing.assert_array_equal(sub.labels, [53, 1, 53])
    assert sub.extra == {"split": ("test", "train", "test"), "note": ("v", "x", "v")}
    assert sub.num_classes == 2
    named = data.subset(np.array([1, 2]), name="part")
    assert named.name == "part" and len(named) == 2
    assert len(data.subset([])) == 0
    assert len(data) == 6  # the original is untouched


def test_labelled_set_length_check():
    with pytest.raises(ValueError):
        LabelledImageSet(name="x", paths=(), labels=np.array([1]))


def test_flowers102_layout(tmp_path):
    _write(tmp_path / "flowers102" / "labels.csv", ("file", "class_id", "split"), [r[:3] for r in ROWS])
    test = flowers102(tmp_path)
    assert test.name == "flowers102-test" and len(test) == 3
    assert flowers102(tmp_path, split="train").name == "flowers102-train"
    assert len(flowers102(tmp_path, split=None)) == 6
    with pytest.raises(ManifestError, match="not found"):
        flowers102(tmp_path / "elsewhere")


def test_a_manifest_saved_with_a_byte_order_mark_reads_like_one_without(tmp_path):
    # Excel's "CSV UTF-8" starts the file with U+FEFF, which would otherwise glue onto the first column name
    (tmp_path / "labels.csv").write_bytes("\ufefffile,class_id\na.jpg,3\nb.jpg,4\n".encode("utf-8"))
    images = read_csv_manifest(tmp_path / "labels.csv")
    assert [p.name for p in images.paths] == ["a.jpg", "b.jpg"] and images.labels.tolist() == [3, 4]


def test_a_gldv2_csv_with_a_byte_order_mark_reads(tmp_path):
    from msretrieval.data.gldv2 import read_gldv2_pairs

    (tmp_path / "train.csv").write_bytes("\ufeffid,url,landmark_id\nabc1,u,7\nabc2,u,7\nabd3,u,8\n".encode())
    assert read_gldv2_pairs(tmp_path / "train.csv") == [("abc1", 7), ("abc2", 7), ("abd3", 8)]
