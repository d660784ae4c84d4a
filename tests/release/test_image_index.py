"""Indexing a folder with a release: incremental updates equal a fresh build; the search CLI's JSON and sheet."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image

from msretrieval.release import load_release
from msretrieval.release.export import export_release
from msretrieval.release.image_index import ImageIndex
from tests.conftest import run_script
from tests.release.test_release import small_model



@pytest.fixture
def release_and_folder(tiny_release, make_labelled_set):
    manifest = make_labelled_set(num_classes=3, per_class=4)
    return tiny_release, manifest.parent / "images", manifest


def test_updates_encode_only_new_or_changed_images_and_equal_a_fresh_build(tmp_path, release_and_folder):
    release, folder, _ = release_and_folder
    retriever = load_release(release)
    index, update = ImageIndex.update(tmp_path / "idx", folder, retriever, release)
    assert (update.added, update.kept, update.removed, len(index.paths)) == (12, 0, 0, 12)
    _, update = ImageIndex.update(tmp_path / "idx", folder, retriever, release)
    assert (update.added, update.kept, update.removed) == (0, 12, 0)
    # one new image only: the flat index grows in place
    Image.new("RGB", (50, 40), (10, 200, 30)).save(folder / "new.png")
    index, update = ImageIndex.update(tmp_path / "idx", folder, retriever, release)
    assert (update.added, update.kept, update.removed, index.index.ntotal) == (1, 12, 0, 13)
    # one removed, one rewritten with other pixels: the rewritten one is encoded again
    (folder / "c0_0.jpg").unlink()
    Image.new("RGB", (48, 40), (250, 250, 0)).save(folder / "c1_1.jpg")
    index, update = ImageIndex.update(tmp_path / "idx", folder, retriever, release)
    assert (update.added, update.kept, update.removed) == (1, 11, 2)
    reopened = ImageIndex.open(tmp_path / "idx")
    paths = reopened.paths
    assert sorted(paths) == sorted(p.resolve() for p in folder.iterdir())
    np.testing.assert_allclose(reopened.descriptors, retriever.encode(paths), atol=1e-5)  # batching differs
    scores, rows = reopened.search(retriever.encode(paths), k=1)
    assert rows[:, 0].tolist() == list(range(len(paths))) and np.allclose(scores[:, 0], 1, atol=1e-5)


def test_auto_factory_records_its_choice_and_grows_an_exact_index(tmp_path, release_and_folder):
    release, folder, _ = release_and_folder
    retriever = load_release(release)
    index, _ = ImageIndex.update(tmp_path / "idx", folder, retriever, release, factory="auto")
    assert index.meta["factory"] == "auto"
    assert index.meta["index"]["factory"] == "Flat" and index.meta["index"]["count"] == 12
    Image.new("RGB", (50, 40), (10, 200, 30)).save(folder / "new.png")
    index, update = ImageIndex.update(tmp_path / "idx", folder, retriever, release, factory="auto")
    assert (update.added, index.index.ntotal, index.meta["index"]["count"]) == (1, 13, 13)
    assert ImageIndex.open(tmp_path / "idx").meta["index"]["factory"] == "Flat"
    with pytest.raises(ValueError, match="another release or factory"):
        ImageIndex.update(tmp_path / "idx", folder, retriever, release, factory="Flat")


def test_an_index_refuses_another_release(tmp_path, release_and_folder):
    release, folder, _ = release_and_folder
    ImageIndex.update(tmp_path / "idx", folder, load_release(release), release)
    other = tmp_path / "other"
    model = small_model()
    model.head.projection.linear.bias.data += 1
    export_release(model, other, image_size=64, graph=False)
    with pytest.raises(ValueError, match="another release"):
        ImageIndex.update(tmp_path / "idx", folder, load_release(other), other)


def test_index_and_search_command_lines(tmp_path, release_and_folder, capsys):
    release, folder, manifest = release_and_folder
    run = lambda script, *args: run_script(script, list(args), capsys)  # noqa: E731 (main(argv), in-process)
    code, out, err = run("index", release, folder, "--out", tmp_path / "idx", "--factory", "Flat")
    assert code == 0 and "12 images (12 added" in out, err[-2000:]
    queries = [folder / "c0_1.jpg", folder / "c2_3.jpg"]
    code, out, err = run("search", tmp_path / "idx", *queries, "--k", 3, "--labels", manifest, "--sheet",
                         tmp_path / "sheet.png", "--json", tmp_path / "out.json")
    assert code == 0 and "ms per query" in out, err[-2000:]
    result = json.loads((tmp_path / "out.json").read_text())
    assert [q["query"] for q in result["queries"]] == [str(q.resolve()) for q in queries]
    for query in result["queries"]:
        assert len(query["results"]) == 3 and query["query"] not in [r["path"] for r in query["results"]]
        assert all(r["correct"] == (r["label"] == query["label"]) for r in query["results"])
        scores = [r["score"] for r in query["results"]]
        assert scores == sorted(scores, reverse=True)
    assert result["timing"]["index_size"] == 12 and result["timing"]["search_ms_per_query"] > 0
    with Image.open(tmp_path / "sheet.png") as sheet:
        assert sheet.size == (4 * 138 + 12, 2 * (138 + 14))
        for row, query in enumerate(result["queries"]):  # frames: query blue, results green / red by label
            top = row * (138 + 14)
            assert sheet.getpixel((1, top + 1)) == (40, 90, 220)
            for i, entry in enumerate(query["results"]):
                expected = (30, 160, 60) if entry["correct"] else (210, 40, 40)
                assert sheet.getpixel((12 + (i + 1) * 138 + 1, top + 1)) == expected
    code, _, err = run("search", tmp_path / "missing", *queries)
    assert code == 2 and "scripts/index.py" in err


@pytest.mark.parametrize("damage", ["meta_not_json", "meta_without_images", "descriptors_cut", "faiss_file_missing"])
def test_a_damaged_index_is_a_user_error(tmp_path, release_and_folder, damage):
    from msretrieval.release.image_index import DESCRIPTORS_FILE, FAISS_FILE, META_FILE
    from msretrieval.utils.errors import UserError

    release, folder, _ = release_and_folder
    ImageIndex.update(tmp_path / "idx", folder, load_release(release), release)
    directory = tmp_path / "idx"
    if damage == "meta_not_json":
        (directory / META_FILE).write_text("{not json")
    elif damage == "meta_without_images":
        (directory / META_FILE).write_text("{}")
    elif damage == "descriptors_cut":
        path = directory / DESCRIPTORS_FILE
        path.write_bytes(path.read_bytes()[:100])
    else:
        (directory / FAISS_FILE).unlink()
    with pytest.raises(UserError, match="is not a readable image index.*rebuild it"):
        ImageIndex.open(directory)


def test_a_full_disk_during_an_update_leaves_the_previous_index(tmp_path, release_and_folder, monkeypatch):
    import errno

    from msretrieval.utils import files

    release, folder, _ = release_and_folder
    retriever = load_release(release)
    ImageIndex.update(tmp_path / "idx", folder, retriever, release)
    Image.new("RGB", (50, 40), (10, 200, 30)).save(folder / "new.png")
    fsync = files.os.fsync

    def full_at_the_faiss_file(descriptor):  # descriptors.npy fits, index.faiss does not
        if os.readlink(f"/proc/self/fd/{descriptor}").endswith("index.faiss.tmp"):
            raise OSError(errno.ENOSPC, "No space left on device")
        fsync(descriptor)

    monkeypatch.setattr(files.os, "fsync", full_at_the_faiss_file)
    with pytest.raises(OSError, match="No space left"):
        ImageIndex.update(tmp_path / "idx", folder, retriever, release)
    monkeypatch.undo()
    index = ImageIndex.open(tmp_path / "idx")  # the 12-image index, whole
    assert (len(index.paths), len(index.descriptors), index.index.ntotal) == (12, 12, 12)
    assert sorted(p.name for p in (tmp_path / "idx").iterdir()) == ["descriptors.npy", "index.faiss", "index.json"]
