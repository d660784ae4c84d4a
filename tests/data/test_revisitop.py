"""A synthetic revisitop set: save/load round trip, protocols, query crops, malformed ground truth."""
from __future__ import annotations

import pickle

import numpy as np
import pytest
from PIL import Image

from msretrieval.data.datasets import ImageDataset
from msretrieval.data.images import load_image
from msretrieval.data.revisitop import PROTOCOLS, RevisitopError, load_revisitop, save_revisitop
from msretrieval.data.transforms import EvalTransform

NAME = "rtoy"
DATABASE = ["db0", "db1", "db2", "db3", "db4", "db5"]
QUERIES = ["q0", "q1"]
# Query 0: a 64x48 image, the box rounds to (16, 8, 48, 40): a 32x32 crop.
# Query 1: a 48x64 image, box (8, 16, 40, 56): a 32x40 crop.
TRUTH = [
    {"bbx": [15.6, 8.4, 48.3, 39.7], "easy": [0, 1], "hard": [2], "junk": [3]},
    {"bbx": [8.0, 16.0, 40.0, 56.0], "easy": [4], "hard": [0, 5], "junk": []},
]
RED, GREEN, BLUE, YELLOW = (230, 20, 20), (20, 230, 20), (20, 20, 230), (230, 230, 20)


def _query_image(width, height, box):
    """Blue background; inside the box: green top-left quadrant, red elsewhere.

    Saved as 4:4:4 JPEG with the box on 8-pixel block edges, so no blue bleeds into the box: any blue in a
    crop means the crop is in the wrong place.
    """
    x1, y1, x2, y2 = box
    array = np.empty((height, width, 3), np.uint8)
    array[:] = BLUE
    array[y1:y2, x1:x2] = RED
    array[y1:(y1 + y2) // 2, x1:(x1 + x2) // 2] = GREEN
    return Image.fromarray(array)


@pytest.fixture
def toy(tmp_path):
    gnd_path = save_revisitop(tmp_path, NAME, DATABASE, QUERIES, TRUTH)
    jpg = tmp_path / NAME / "jpg"
    rng = np.random.default_rng(0)
    for name in DATABASE:
        colour = rng.integers(0, 256, 3)
        Image.fromarray(np.broadcast_to(colour, (40, 56, 3)).astype(np.uint8)).save(jpg / f"{name}.jpg")
    _query_image(64, 48, (16, 8, 48, 40)).save(jpg / "q0.jpg", quality=100, subsampling=0)
    _query_image(48, 64, (8, 16, 40, 56)).save(jpg / "q1.jpg", quality=100, subsampling=0)
    return tmp_path, gnd_path


def _close(pixel, colour, tol=40):
    return np.abs(np.asarray(pixel, dtype=int) - np.asarray(colour, dtype=int)).max() <= tol


def test_round_trip(toy):
    root, gnd_path = toy
    assert gnd_path == root / NAME / f"gnd_{NAME}.pkl"
    data = load_revisitop(root, NAME)
    assert data.name == NAME and data.root == root / NAME and data.extension == ".jpg"
    assert data.database == tuple(DATABASE) and data.queries == tuple(QUERIES)
    assert len(data.truth) == 2
    for truth, expected in zip(data.truth, TRUTH):
        assert truth.bbox == tuple(float(v) for v in expected["bbx"])
        for key in ("easy", "hard", "junk"):
            values = getattr(truth, key)
            assert values.dtype == np.int64
            np.testing.assert_array_equal(values, expected[key])
    assert data.query_boxes == [(15.6, 8.4, 48.3, 39.7), (8.0, 16.0, 40.0, 56.0)]
    assert data.database_paths == [root / NAME / "jpg" / f"{n}.jpg" for n in DATABASE]
    assert data.query_paths == [root / NAME / "jpg" / f"{n}.jpg" for n in QUERIES]
    assert all(p.is_file() for p in data.database_paths + data.query_paths)


def test_save_fills_missing_lists(tmp_path):
    save_revisitop(tmp_path, "sparse", ["a", "b"], ["q"], [{"bbx": (0, 0, 5, 5), "hard": [1]}])
    data = load_revisitop(tmp_path, "sparse")
    (truth,) = data.truth
    assert truth.easy.size == 0 and truth.junk.size == 0
    np.testing.assert_array_equal(truth.hard, [1])


@pytest.mark.parametrize("protocol, positives, junk", [
    ("easy", [[0, 1], [4]], [[3, 2], [0, 5]]),            # pos easy; junk junk + hard
    ("medium", [[0, 1, 2], [4, 0, 5]], [[3], []]),        # pos easy + hard; junk junk
    ("hard", [[2], [0, 5]], [[3, 0, 1], [4]]),            # pos hard; junk junk + easy
])
def test_protocols(toy, protocol, positives, junk):
    data = load_revisitop(toy[0], NAME)
    got_pos, got_junk = data.protocol(protocol)
    assert len(got_pos) == len(got_junk) == 2
    for q in range(2):
        assert sorted(got_pos[q].tolist()) == sorted(positives[q])
        assert sorted(got_junk[q].tolist()) == sorted(junk[q])
        assert got_pos[q].dtype == np.int64 and got_junk[q].dtype == np.int64
        assert not set(got_pos[q].tolist()) & set(got_junk[q].tolist())


def test_protocols_constant_and_invalid(toy):
    assert PROTOCOLS == ("easy", "medium", "hard")
    data = load_revisitop(toy[0], NAME)
    with pytest.raises(ValueError, match="protocol"):
        data.protocol("Medium")
    with pytest.raises(ValueError, match="protocol"):
        data.truth[0].protocol("all")


def test_queries_are_cropped_to_bbx(toy):
    data = load_revisitop(toy[0], NAME)
    dataset = ImageDataset(data.query_paths, boxes=data.query_boxes)
    full_sizes = [(64, 48), (48, 64)]
    crop_boxes = [(16, 8, 48, 40), (8, 16, 40, 56)]
    for q in range(2):
        crop, index = dataset[q]
        assert index == q
        x1, y1, x2, y2 = crop_boxes[q]
        assert crop.size == (x2 - x1, y2 - y1)
        full = load_image(data.query_paths[q])
        assert full.size == full_sizes[q]
        # Exactly the pixels of the box ...
        np.testing.assert_array_equal(np.asarray(crop), np.asarray(full)[y1:y2, x1:x2])
        # ... which are the distinctive region: green top-left quadrant, red elsewhere, no blue background.
        w, h = crop.size
        assert _close(crop.getpixel((w // 4, h // 4)), GREEN)
        for xy in [(3 * w // 4, h // 4), (w // 4, 3 * h // 4), (3 * w // 4, 3 * h // 4), (w - 2, h - 2)]:
            assert _close(crop.getpixel(xy), RED), (q, xy, crop.getpixel(xy))
        array = np.asarray(crop).astype(int)
        assert array[..., 2].max() < 150  # blue only ever appears outside the box
    # Through the evaluation transform: crop first, then the FULL image's scale. "longer" to 128: the 64-pixel
    # longer side of both full images gives a factor 2, so the 32x32 crop -> 64x64 and the 32x40 one -> 64x80.
    transformed = ImageDataset(data.query_paths, EvalTransform(size=128, mode="longer"), boxes=data.query_boxes)
    assert tuple(transformed[0][0].shape) == (3, 64, 64)
    assert tuple(transformed[1][0].shape) == (3, 80, 64)
    # The published rule (longer_max, shrink only): bound 128 * 32 / 64 = 64 and 128 * 40 / 64 = 80, which the
    # crops fit in: they keep their size.
    published = ImageDataset(data.query_paths, EvalTransform(size=128, mode="longer_max"), boxes=data.query_boxes)
    assert tuple(published[0][0].shape) == (3, 32, 32)
    assert tuple(published[1][0].shape) == (3, 40, 32)
    # Without the boxes the full query image is used (the bug the boxes exist to prevent).
    assert ImageDataset(data.query_paths)[0][0].size == (64, 48)


def _write_pickle(root, name, cfg):
    (root / name).mkdir(parents=True, exist_ok=True)
    path = root / name / f"gnd_{name}.pkl"
    with path.open("wb") as handle:
        pickle.dump(cfg, handle)
    return path


def _cfg(**changes):
    cfg = {"imlist": ["a", "b", "c"], "qimlist": ["q"],
           "gnd": [{"bbx": [0, 0, 10, 10], "easy": [0], "hard": [1], "junk": [2]}]}
    cfg.update(changes)
    return cfg


def test_missing_gnd_file(tmp_path):
    with pytest.raises(RevisitopError, match="ground truth not found") as info:
        load_revisitop(tmp_path, "roxford5k")
    message = str(info.value)
    assert str(tmp_path / "roxford5k" / "gnd_roxford5k.pkl") in message
    assert "download_revisitop" in message


@pytest.mark.parametrize("key", ["imlist", "qimlist", "gnd"])
def test_missing_key(tmp_path, key):
    cfg = _cfg()
    del cfg[key]
    path = _write_pickle(tmp_path, "bad", cfg)
    with pytest.raises(RevisitopError, match=f"missing key '{key}'") as info:
        load_revisitop(tmp_path, "bad")
    assert str(path) in str(info.value)


@pytest.mark.parametrize("field, value", [("easy", [3]), ("hard", [0, 99]), ("junk", [-1])])
def test_index_out_of_range(tmp_path, field, value):
    cfg = _cfg()
    cfg["gnd"][0][field] = value
    path = _write_pickle(tmp_path, "bad", cfg)
    with pytest.raises(RevisitopError, match=r"out of range \[0, 3\)") as info:
        load_revisitop(tmp_path, "bad")
    assert str(path) in str(info.value) and "query 0" in str(info.value)


def test_gnd_and_query_count_mismatch(tmp_path):
    _write_pickle(tmp_path, "bad", _cfg(qimlist=["q", "r"]))
    with pytest.raises(RevisitopError, match="1 ground-truth entries for 2 queries"):
        load_revisitop(tmp_path, "bad")


@pytest.mark.parametrize("bbx", [None, [0, 0, 10]])
def test_bad_bbx(tmp_path, bbx):
    cfg = _cfg()
    if bbx is None:
        del cfg["gnd"][0]["bbx"]
    else:
        cfg["gnd"][0]["bbx"] = bbx
    _write_pickle(tmp_path, "bad", cfg)
    with pytest.raises(RevisitopError, match="bbx"):
        load_revisitop(tmp_path, "bad")


def test_corrupt_pickle(tmp_path):
    (tmp_path / "bad").mkdir()
    path = tmp_path / "bad" / "gnd_bad.pkl"
    path.write_bytes(b"definitely not a pickle")
    with pytest.raises(RevisitopError, match="cannot read") as info:
        load_revisitop(tmp_path, "bad")
    assert str(path) in str(info.value)


class _Payload:
    """Unpickling this runs ``open(marker, 'w')``: proof that a loader executed code from the file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_ground_truth_pickle_that_would_run_code_is_refused_without_running_it(toy, tmp_path):
    root, gnd_path = toy
    marker = tmp_path / "payload-ran"
    hostile = {"imlist": DATABASE, "qimlist": QUERIES, "gnd": TRUTH, "extra": _Payload(marker)}
    gnd_path.write_bytes(pickle.dumps(hostile))
    pickle.loads(gnd_path.read_bytes())          # the payload is live: a plain pickle.load runs it
    assert marker.exists()
    marker.unlink()
    with pytest.raises(RevisitopError, match="refusing to load .*open"):
        load_revisitop(root, NAME)
    assert not marker.exists()


def test_ground_truth_with_numpy_arrays_still_loads(toy):
    root, gnd_path = toy
    arrays = [{k: (np.asarray(v, dtype=np.float64 if k == "bbx" else np.int64)) for k, v in t.items()} for t in TRUTH]
    gnd_path.write_bytes(pickle.dumps({"imlist": DATABASE, "qimlist": QUERIES, "gnd": arrays}))
    data = load_revisitop(root, NAME)
    assert [len(p) for p in data.protocol("medium")[0]] == [3, 3]


def test_landmark_labels_for_fitting_on_a_revisitop_set(toy, tmp_path):
    from msretrieval.data.revisitop import QueryTruth, RevisitopSet

    # the toy set: both queries list db0 as a positive -> one landmark (0); db3 is only junk -> a label of its
    # own, numbered after the one group (1); the two query images follow the database with the group's label
    labelled = load_revisitop(toy[0], NAME).labelled_images()
    assert [p.name for p in labelled.paths] == [f"{n}.jpg" for n in DATABASE + QUERIES]
    assert labelled.labels.tolist() == [0, 0, 0, 1, 0, 0, 0, 0]
    # a chain: q1-q2 share db1, q2-q3 share db2 -> q1, q2, q3 are one landmark (transitively); q0 and q4 alone.
    # Groups in order of first query: q0 -> 0, q1..q3 -> 1, q4 -> 2; db5 is in no list -> 3; db3 (hard of q3) -> 1
    def truth(easy, hard=()):
        return QueryTruth((0, 0, 1, 1), np.array(easy, dtype=np.int64), np.array(hard, dtype=np.int64),
                          np.array([], dtype=np.int64))

    chain = RevisitopSet("chain", tmp_path, tuple(f"db{i}" for i in range(6)), tuple(f"q{i}" for i in range(5)),
                         (truth([0]), truth([1]), truth([1], [2]), truth([2], [3]), truth([4])))
    assert chain.landmark_groups().tolist() == [0, 1, 1, 1, 2]
    assert chain.labelled_images().labels.tolist() == [0, 1, 1, 1, 2, 3] + [0, 1, 1, 1, 2]
