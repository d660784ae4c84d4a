"""The cluttered-scene set (data.clutter) and its benchmark, on a tiny synthetic "flowers" pack.

Every photo of the pack is one solid colour, unique to it, so a composite's pixels tell which photo lies
where. Classes 1-4 are ``train``, 5-8 ``test``; composites are 96 px.
"""
from __future__ import annotations

import csv
import itertools
import json
from functools import partial
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data import clutter as clutter_module
from data.clutter import ClutterError, ClutterParams, build_clutter_set, load_clutter_set, read_boxes_csv
from retrieval.benchmarks import ClutterBenchmark, create_benchmark
from retrieval.scores import DenseScores

TRAIN_CLASSES, TEST_CLASSES = (1, 2, 3, 4), (5, 6, 7, 8)
PER_CLASS = 6
SIZES = [(40, 30), (30, 44), (36, 36), (48, 24), (26, 40), (44, 33)]
CANVAS = 96
SMALL = ClutterParams(canvas=CANVAS, test_composites=8, train_composites=6, queries_per_class=2)
TOLERANCE = 30  # per channel, JPEG error on a solid patch at quality 90 is a few levels


def write_pack(root: Path) -> Path:
    """root/flowers102: labels.csv (file,class_id,class_name,split,orig_w,orig_h) + images/ of solid colours."""
    folder = root / "flowers102"
    (folder / "images").mkdir(parents=True)
    levels = (20, 100, 180, 250)
    colours = list(itertools.product(levels, repeat=3))
    order = np.random.default_rng(0).permutation(len(colours))
    rows, n = [], 0
    for class_id in TRAIN_CLASSES + TEST_CLASSES:
        for i in range(PER_CLASS):
            name = f"images/image_{n + 1:05d}.jpg"
            width, height = SIZES[i]
            Image.new("RGB", (width, height), colours[order[n]]).save(folder / name, quality=95)
            rows.append({"file": name, "class_id": class_id, "class_name": f"c{class_id}",
                         "split": "train" if class_id in TRAIN_CLASSES else "test", "orig_w": width * 3,
                         "orig_h": height * 3})
            n += 1
    with (folder / "labels.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return folder


@pytest.fixture(scope="module")
def pack(tmp_path_factory) -> Path:
    return write_pack(tmp_path_factory.mktemp("pack"))


@pytest.fixture(scope="module")
def built(pack) -> Path:
    return build_clutter_set(pack, pack.parent / "clutter", seed=0, params=SMALL, progress=False)


def rows(path: Path) -> list[dict]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def pixel_box(row: dict) -> tuple[int, int, int, int]:
    return tuple(round(float(row[k]) * CANVAS) for k in ("x1", "y1", "x2", "y2"))


def colour_of(pack: Path, source: str) -> np.ndarray:
    return np.asarray(Image.open(pack / source).convert("RGB"), dtype=np.int16).reshape(-1, 3).mean(0)


def objects_by_file(folder: Path) -> dict[str, list[dict]]:
    """Per composite, its object rows (boxes.csv joined with sources.csv), in paste order."""
    sources = [r for r in rows(folder / "sources.csv") if r["role"] == "object"]
    boxes = rows(folder / "boxes.csv")
    assert len(sources) == len(boxes)
    grouped: dict[str, list[dict]] = {}
    for box, source in zip(boxes, sources):
        assert (box["file"], box["class_id"]) == (source["file"], source["class_id"])
        grouped.setdefault(box["file"], []).append({**box, "source": source["source"], "order": source["order"]})
    for objects in grouped.values():
        assert [int(o["order"]) for o in objects] == list(range(len(objects)))
    return grouped


def visible_masks(objects: list[dict]) -> list[np.ndarray]:
    """Each object's pixels not covered by a later one."""
    top = np.full((CANVAS, CANVAS), -1)
    for k, obj in enumerate(objects):
        x1, y1, x2, y2 = pixel_box(obj)
        top[y1:y2, x1:x2] = k
    return [top == k for k in range(len(objects))]


def test_layout_and_manifests(built, pack):
    images = rows(built / "images.csv")
    assert [r["split"] for r in images] == ["test"] * 8 + ["train"] * 6
    for r in images:
        with Image.open(built / r["file"]) as image:
            assert image.size == (CANVAS, CANVAS) and image.format == "JPEG"
    boxes = rows(built / "boxes.csv")
    assert list(boxes[0]) == ["file", "x1", "y1", "x2", "y2", "class_id", "split"]
    coordinates = np.array([[float(b[k]) for k in ("x1", "y1", "x2", "y2")] for b in boxes])
    assert coordinates.min() >= 0 and coordinates.max() <= 1
    assert (coordinates[:, 2] > coordinates[:, 0]).all() and (coordinates[:, 3] > coordinates[:, 1]).all()
    for r in images:  # class_ids = the file's box classes in paste order, 1-3 objects
        classes = [b["class_id"] for b in boxes if b["file"] == r["file"]]
        assert r["class_ids"].split() == classes and 1 <= len(classes) <= 3
        assert all(b["split"] == r["split"] for b in boxes if b["file"] == r["file"])
    queries = rows(built / "queries.csv")
    assert len(queries) == 2 * len(TEST_CLASSES)
    for q in queries:  # byte-for-byte copies of the pack's photos
        assert (built / q["file"]).read_bytes() == (pack / q["source"]).read_bytes()
    params = json.loads((built / "params.json").read_text())
    assert params["seed"] == 0 and params["params"] == SMALL.to_json()
    assert params["counts"]["test_composites"] == 8 and params["counts"]["queries"] == 8
    assert not list(built.parent.glob(".clutter.*"))  # no staging folder left behind


def test_objects_lie_in_their_boxes(built, pack):
    """Where not occluded, a box holds its photo's colour; outside it that colour is absent."""
    checked_inside = checked_outside = 0
    for file, objects in objects_by_file(built).items():
        pixels = np.asarray(Image.open(built / file).convert("RGB"), dtype=np.int16)
        masks = visible_masks(objects)
        for obj, mask in zip(objects, masks):
            matches = np.abs(pixels - colour_of(pack, obj["source"])).max(axis=2) <= TOLERANCE
            x1, y1, x2, y2 = pixel_box(obj)
            inner = np.zeros_like(mask)
            inner[y1 + 2:y2 - 2, x1 + 2:x2 - 2] = True  # JPEG blurs the first pixels at an edge
            inner &= mask
            for later in objects[objects.index(obj) + 1:]:  # ... also at the edge of a later object
                lx1, ly1, lx2, ly2 = pixel_box(later)
                inner[max(ly1 - 2, 0):ly2 + 2, max(lx1 - 2, 0):lx2 + 2] = False
            if inner.any():
                assert matches[inner].mean() > 0.98, (file, obj)
                checked_inside += 1
            outside = np.ones_like(mask)
            outside[max(y1 - 2, 0):y2 + 2, max(x1 - 2, 0):x2 + 2] = False
            assert matches[outside].mean() < 0.01, (file, obj)  # the photo is nowhere else
            checked_outside += 1
    assert checked_inside >= 20 and checked_outside >= 25


def test_box_sizes_and_aspect(built, pack):
    for objects in objects_by_file(built).values():
        for obj in objects:
            x1, y1, x2, y2 = pixel_box(obj)
            width, height = x2 - x1, y2 - y1
            assert SMALL.min_scale * CANVAS - 0.5 <= max(width, height) <= SMALL.max_scale * CANVAS + 0.5
            photo_w, photo_h = Image.open(pack / obj["source"]).size
            if photo_w >= photo_h:
                assert abs(height - width * photo_h / photo_w) <= 1
            else:
                assert abs(width - height * photo_w / photo_h) <= 1


def test_same_seed_same_bytes_other_seed_differs(built, pack, tmp_path):
    again = build_clutter_set(pack, tmp_path / "again", seed=0, params=SMALL, progress=False)
    other = build_clutter_set(pack, tmp_path / "other", seed=1, params=SMALL, progress=False)
    for name in ("images.csv", "boxes.csv", "queries.csv", "sources.csv", "params.json"):
        assert (again / name).read_bytes() == (built / name).read_bytes(), name
    for r in rows(built / "images.csv"):
        assert (again / r["file"]).read_bytes() == (built / r["file"]).read_bytes()
    assert (other / "boxes.csv").read_bytes() != (built / "boxes.csv").read_bytes()
    assert (other / "sources.csv").read_bytes() != (built / "sources.csv").read_bytes()


def test_queries_are_never_pasted(built):
    queries = rows(built / "queries.csv")
    pasted = {r["source"] for r in rows(built / "sources.csv") if r["role"] == "object"}
    assert not pasted & {q["source"] for q in queries}
    per_class = {c: sum(int(q["class_id"]) == c for q in queries) for c in TEST_CLASSES}
    assert per_class == {c: 2 for c in TEST_CLASSES}


def test_splits_by_construction(built):
    """Test composites paste test classes only; clutter is always train photos, and in train composites of
    other classes than the pasted ones."""
    records: dict[tuple[str, str], list[int]] = {}
    for r in rows(built / "sources.csv"):
        records.setdefault((r["file"], r["role"]), []).append(int(r["class_id"]))
    for r in rows(built / "images.csv"):
        objects, background = records[(r["file"], "object")], records[(r["file"], "background")]
        assert len(background) >= SMALL.min_cells ** 2
        assert set(background) <= set(TRAIN_CLASSES)
        if r["split"] == "test":
            assert set(objects) <= set(TEST_CLASSES)
        else:
            assert set(objects) <= set(TRAIN_CLASSES) and not set(objects) & set(background)


def test_occlusion_bound_under_crowding(pack, tmp_path):
    crowded = ClutterParams(canvas=CANVAS, test_composites=12, train_composites=0, queries_per_class=2,
                            min_objects=3, max_objects=5, min_scale=0.4, max_scale=0.7, max_occlusion=0.3)
    folder = build_clutter_set(pack, tmp_path / "crowded", params=crowded, progress=False)
    occluded = 0
    for objects in objects_by_file(folder).values():
        for obj, mask in zip(objects, visible_masks(objects)):
            x1, y1, x2, y2 = pixel_box(obj)
            area = (x2 - x1) * (y2 - y1)
            assert mask.sum() >= 0.7 * area
            occluded += mask.sum() < area
    assert occluded >= 5  # the bound was exercised, not vacuous
    counts = json.loads((folder / "params.json").read_text())["counts"]
    assert counts["test_objects"] + counts["objects_left_out"] >= 3 * 12


def test_rebuild_is_a_no_op_or_refused(pack, tmp_path):
    folder = build_clutter_set(pack, tmp_path / "set", params=SMALL, progress=False)
    stamp = (folder / "params.json").stat().st_mtime_ns
    assert build_clutter_set(pack, folder, params=SMALL) == folder
    assert (folder / "params.json").stat().st_mtime_ns == stamp
    other = ClutterParams(canvas=CANVAS, test_composites=5, train_composites=6, queries_per_class=2)
    with pytest.raises(ClutterError, match=r"set was built differently: test_composites: 8 -> 5.*Delete that folder"):
        build_clutter_set(pack, folder, params=other)
    with pytest.raises(ClutterError, match="seed: 0 -> 3"):
        build_clutter_set(pack, folder, seed=3, params=SMALL)
    assert (folder / "params.json").stat().st_mtime_ns == stamp  # refused: untouched
    build_clutter_set(pack, folder, params=other, overwrite=True, progress=False)
    assert len(rows(folder / "images.csv")) == 5 + 6
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set"]  # no staging or retired folder left
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    with pytest.raises(ClutterError, match="foreign is not empty and holds no clutter set"):
        build_clutter_set(pack, tmp_path / "foreign", params=SMALL)


def test_interrupted_build_leaves_nothing(pack, tmp_path, monkeypatch):
    calls = []

    def failing_render(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    original = clutter_module._render
    monkeypatch.setattr(clutter_module, "_render", failing_render)
    with pytest.raises(KeyboardInterrupt):
        build_clutter_set(pack, tmp_path / "set", params=SMALL, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_bad_parameters_and_source(pack, tmp_path):
    with pytest.raises(ClutterError, match="min_scale"):
        ClutterParams(min_scale=0.5, max_scale=0.2)
    with pytest.raises(ClutterError, match="test class 5 has 6 photos"):
        build_clutter_set(pack, tmp_path / "x", params=ClutterParams(canvas=CANVAS, queries_per_class=6))
    with pytest.raises(ClutterError, match="Flowers-102 manifest not found"):
        build_clutter_set(tmp_path / "nowhere", tmp_path / "y")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


# ---------------------------------------------------------------------------------------------------------
# Reading manifests and the benchmark.

def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text.strip() + "\n")
    return path


def hand_made_set(folder: Path) -> Path:
    """4 database composites, 1 train composite, 3 queries (class 7 has no positive)."""
    write(folder / "images.csv", """
file,split,class_ids
db/0.jpg,test,5
db/1.jpg,test,6 5
db/2.jpg,test,6
db/3.jpg,test,4
tr/0.jpg,train,1 2
""")
    write(folder / "boxes.csv", """
file,x1,y1,x2,y2,class_id,split
db/0.jpg,0.1,0.1,0.5,0.5,5,test
db/1.jpg,0,0,0.25,0.5,6,test
db/1.jpg,0.5,0.5,1,1,5,test
db/2.jpg,0.2,0.3,0.4,0.6,6,test
db/3.jpg,0.2,0.2,0.3,0.3,4,test
tr/0.jpg,0.1,0.1,0.2,0.2,1,train
tr/0.jpg,0.6,0.6,0.9,0.8,2,train
""")
    write(folder / "queries.csv", """
file,class_id
q/a.jpg,5
q/b.jpg,6
q/c.jpg,7
""")
    return folder


def test_benchmark_positives_and_hand_computed_metrics(tmp_path):
    bench = ClutterBenchmark.from_folder(hand_made_set(tmp_path / "hand"))
    assert not bench.queries_are_database and bench.resize_mode == "none"
    assert bench.database_paths() == [tmp_path / "hand" / f"db/{i}.jpg" for i in range(4)]
    assert bench.query_paths()[0] == tmp_path / "hand" / "q" / "a.jpg"
    assert [p.tolist() for p in bench.positives()] == [[0, 1], [1, 2], []]
    np.testing.assert_array_equal(bench.database_boxes[1], [[0, 0, 0.25, 0.5], [0.5, 0.5, 1, 1]])
    assert [c.tolist() for c in bench.database_classes] == [[5], [6, 5], [6], [4]]
    train = bench.train_set()
    assert train.paths == (tmp_path / "hand" / "tr" / "0.jpg",) and train.labels.tolist() == [1]
    assert train.extra["class_ids"] == ("1 2",)
    scores = np.array([[0.9, 0.1, 0.5, 0.3],    # positives 0, 1 at ranks 1 and 4: AP (1 + 2/4) / 2
                       [0.2, 0.6, 0.4, 0.6],    # positive 1 tied with negative 3 on top, positive 2 third
                       [0.1, 0.2, 0.3, 0.4]])   # no positive: left out of every mean
    metrics = bench.evaluate(DenseScores(scores.astype(np.float32)), map_at_k=1)
    # query 1 over the two orders of its tie: AP (1 + 2/3)/2 or (1/2 + 2/3)/2 -> 17/24; AP@R 1/2 or 1/4;
    # AP@1: 1 or 0 -> 1/2
    assert metrics["mAP"] == pytest.approx((0.75 + 17 / 24) / 2)
    assert metrics["mAP@R"] == pytest.approx((0.5 + 3 / 8) / 2)
    assert metrics["mAP@1"] == pytest.approx((1 + 0.5) / 2)
    assert metrics["R@1"] == pytest.approx(0.75)
    assert metrics["R@2"] == metrics["R@4"] == metrics["R@8"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="3 queries x 4 database"):
        bench.evaluate(DenseScores(scores[:, :3].astype(np.float32)))


@pytest.mark.parametrize("line, message", [
    ("db/0.jpg,0.1,0.1,1.2,0.5,5,test", r"boxes.csv:3 \(db/0.jpg\): x2 = 1.2 is outside \[0, 1\]"),
    ("db/0.jpg,0.5,0.1,0.5,0.5,5,test", ":3 .*need x1 < x2 and y1 < y2"),
    ("db/0.jpg,a,0.1,0.2,0.5,5,test", ":3 .*x1 'a' is not a number"),
    ("db/0.jpg,0.1,0.1,0.2,0.5,five,test", ":3 .*class_id 'five' is not an integer"),
    ("db/0.jpg,0.1,0.1,0.2,0.5,5,train", ":3 .*is in split 'train' here but 'test'"),
    ("db/0.jpg,0.1,0.1,0.2,0.5", "line 3: expected 7 fields"),
])
def test_bad_box_rows_are_named(tmp_path, line, message):
    from data.manifest import ManifestError

    path = write(tmp_path / "boxes.csv", "file,x1,y1,x2,y2,class_id,split\ndb/0.jpg,0,0,0.5,0.5,5,test\n" + line)
    with pytest.raises(ManifestError, match=message) as error:
        read_boxes_csv(path)
    assert str(path) in str(error.value)


def test_read_boxes_csv(tmp_path):
    folder = hand_made_set(tmp_path / "hand")
    train = read_boxes_csv(folder / "boxes.csv", split="train")
    assert train.paths == (folder / "tr/0.jpg",) and train.splits == ("train",)
    np.testing.assert_allclose(train.boxes[0], [[0.1, 0.1, 0.2, 0.2], [0.6, 0.6, 0.9, 0.8]], atol=1e-7)  # float32
    assert train.labels[0].tolist() == [1, 2] and train.labels[0].dtype == np.int64
    assert len(read_boxes_csv(folder / "boxes.csv")) == 5
    with pytest.raises(ClutterError, match="no boxes with split == 'val'"):
        read_boxes_csv(folder / "boxes.csv", split="val")
    write(tmp_path / "cols.csv", "file,x1,y1,x2,y2,class\na.jpg,0,0,1,1,3")
    with pytest.raises(ClutterError, match=r"cols.csv: missing column\(s\) \['class_id', 'split'\]"):
        read_boxes_csv(tmp_path / "cols.csv")


def test_images_and_boxes_must_agree(tmp_path):
    folder = hand_made_set(tmp_path / "hand")
    text = (folder / "images.csv").read_text().replace("db/1.jpg,test,6 5", "db/1.jpg,test,5 6")
    (folder / "images.csv").write_text(text)
    with pytest.raises(ClutterError, match=r"images.csv, line 3 \(file 'db/1.jpg'\).*boxes.csv has split 'test', "
                                           r"classes \[6, 5\]"):
        load_clutter_set(folder)


def test_create_benchmark_builds_on_first_use(pack, monkeypatch):
    monkeypatch.setattr("retrieval.benchmarks.build_clutter_set", partial(build_clutter_set, params=SMALL,
                                                                          progress=False))
    bench = create_benchmark("flowers102-clutter", pack.parent)
    assert (pack.parent / "flowers102-clutter" / "params.json").is_file()
    assert bench.name == "flowers102-clutter" and bench.default_size == CANVAS
    assert len(bench.queries) == 8 and len(bench.database) == 8 and len(bench.train_set()) == 6
    assert all(p.is_file() for p in bench.database_paths() + bench.query_paths() + list(bench.train_set().paths))
    assert all(set(c.tolist()) <= set(TEST_CLASSES) for c in bench.database_classes)
    small = create_benchmark("flowers102-clutter", pack.parent, limit=4)  # the second use reads the built set
    assert small.name == "flowers102-clutter[:4]" and len(small.database) == 4
    assert sorted(small.queries.labels.tolist()) == list(TEST_CLASSES)
