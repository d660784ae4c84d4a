"""data.overlap: shared images by resolved path or identical bytes, found without reading every file."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

import msretrieval.data.overlap as overlap
from msretrieval.data.overlap import SharedImage, SharedImagesError, refuse_shared_images, shared_images


@pytest.fixture
def files(tmp_path):
    (tmp_path / "test").mkdir()
    (tmp_path / "train").mkdir()
    paths = {}
    for name, payload in [("test/a.jpg", b"A" * 10), ("test/b.jpg", b"B" * 10), ("test/c.jpg", b"C" * 7),
                          ("train/x.jpg", b"X" * 10), ("train/y.jpg", b"Y" * 3)]:
        paths[name] = tmp_path / name
        paths[name].write_bytes(payload)
    return tmp_path, paths


def test_the_same_file_by_another_spelling_or_a_symlink_is_shared_by_path(files, monkeypatch):
    root, paths = files
    os.symlink(paths["test/a.jpg"], root / "train" / "link.jpg")
    monkeypatch.chdir(root / "train")
    candidates = ["../test/c.jpg", root / "train" / "link.jpg", paths["train/y.jpg"]]
    protected = [paths["test/a.jpg"], paths["test/b.jpg"], paths["test/c.jpg"]]
    assert shared_images(candidates, protected) == [
        SharedImage(Path("../test/c.jpg"), paths["test/c.jpg"], "path"),
        SharedImage(root / "train" / "link.jpg", paths["test/a.jpg"], "path")]


def test_a_copy_under_another_name_is_shared_by_content_and_only_equal_sizes_are_read(files, monkeypatch):
    root, paths = files
    copy = root / "train" / "renamed.jpg"
    shutil.copyfile(paths["test/b.jpg"], copy)
    hashed = []
    real = overlap.file_sha1
    monkeypatch.setattr(overlap, "file_sha1", lambda path: hashed.append(os.path.basename(path)) or real(path))
    protected = [paths["test/a.jpg"], paths["test/b.jpg"], paths["test/c.jpg"]]
    found = shared_images([paths["train/x.jpg"], copy, paths["train/y.jpg"], root / "train" / "missing.jpg"],
                          protected)
    assert found == [SharedImage(copy, paths["test/b.jpg"], "content")]
    # x.jpg (10 bytes, like a and b, other bytes) and renamed.jpg (10 bytes) are read, each file once; y.jpg (3
    # bytes) and c.jpg (7 bytes) match no size on the other side and are never read; a missing file is skipped
    assert sorted(hashed) == ["a.jpg", "b.jpg", "renamed.jpg", "x.jpg"]


def test_refusal_is_one_line_with_the_count_and_the_first_three(files):
    root, paths = files
    protected = [paths["test/a.jpg"], paths["test/b.jpg"], paths["test/c.jpg"]]
    copies = []
    for i in range(4):
        copies.append(root / "train" / f"copy{i}.jpg")
        shutil.copyfile(paths["test/a.jpg"], copies[-1])
    with pytest.raises(SharedImagesError) as info:
        refuse_shared_images([paths["train/y.jpg"], *copies], protected, "the training set T", "benchmark B", "Do X.")
    message = str(info.value)
    assert "\n" not in message
    assert message == ("the training set T shares 4 of its 5 images with benchmark B (by path or identical bytes): "
                       + "; ".join(f"{c} (same bytes as {paths['test/a.jpg']})" for c in copies[:3]) + "; .... Do X.")
    refuse_shared_images([paths["train/x.jpg"], paths["train/y.jpg"]], protected, "T", "B", "")  # disjoint: fine
