"""The cluttered-scene set (data.clutter) and its benchmark, on a tiny synthetic "flowers" pack.

Every photo of the pack is one solid colour, unique to it, so a composite can be redrawn by hand from its
construction record (sources.csv) and compared with the generator's. Classes 1-4 are ``train`` (in each, three
"foliage" photos of green / grey / dark colours that may be backgrounds and three bright "flower" photos that
may not; class 1's first photo is a magenta disk on green), 5-8 ``test``; composites are 96 px.
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

from msretrieval.data import clutter as clutter_module
from msretrieval.data.clutter import (ClutterError, ClutterParams, build_clutter_set, flower_like, load_clutter_set,
                                      read_boxes_csv, soft_mask)
from msretrieval.retrieval.evaluation.benchmarks import ClutterBenchmark, create_benchmark
from msretrieval.retrieval.search.scores import DenseScores

TRAIN_CLASSES, TEST_CLASSES = (1, 2, 3, 4), (5, 6, 7, 8)
PER_CLASS = 6
SIZES = [(40, 30), (30, 44), (36, 36), (48, 24), (26, 40), (44, 33)]
CANVAS = 96
#: no whole-image blur / noise / softening and a fixed JPEG quality, so composites can be redrawn by hand
EXACT = dict(max_blur=0.0, max_noise=0.0, max_softening=0.0, min_jpeg_quality=95, max_jpeg_quality=95,
             min_foliage_patches=1, max_foliage_patches=2, max_flower_fraction=0.0)
SMALL = ClutterParams(canvas=CANVAS, test_composites=24, train_composites=8, queries_per_class=2, **EXACT)
LEVELS = (20, 100, 180, 250)
MAGENTA = (250, 20, 250)
DISK = "images/image_00001.jpg"  # class 1's first photo: a magenta disk on green


def palette() -> tuple[list[tuple], list[tuple]]:
    """The 64 colours of LEVELS^3 split into foliage ones (not flower-like by the generator's rule: checked by
    test_flower_like on hand-picked colours) and flower ones, each in a fixed shuffled order."""
    colours = list(itertools.product(LEVELS, repeat=3))
    colours = [colours[i] for i in np.random.default_rng(0).permutation(len(colours))]
    is_flower = flower_like(np.asarray(colours, dtype=np.uint8)[None])[0]
    return ([c for c, f in zip(colours, is_flower) if not f],
            [c for c, f in zip(colours, is_flower) if f and c != MAGENTA])


def write_pack(root: Path) -> Path:
    """root/flowers102: labels.csv (file,class_id,class_name,split,orig_w,orig_h) + images/ (PNG-exact JPEGs)."""
    folder = root / "flowers102"
    (folder / "images").mkdir(parents=True)
    foliage, flowers = palette()
    rows, n = [], 0
    for class_id in TRAIN_CLASSES + TEST_CLASSES:
        for i in range(PER_CLASS):
            name = f"images/image_{n + 1:05d}.jpg"
            width, height = SIZES[i]
            if class_id in TRAIN_CLASSES and i < 3:
                colour = foliage.pop()
            else:
                colour = flowers.pop()
            pixels = np.empty((height, width, 3), dtype=np.uint8)
            pixels[:] = colour
            if name == DISK:  # a flower in the middle of leaves: only its corners may become backgrounds
                yy, xx = np.mgrid[:height, :width]
                pixels[(xx + 0.5 - width / 2) ** 2 + (yy + 0.5 - height / 2) ** 2 <= (0.3 * height) ** 2] = MAGENTA
            Image.fromarray(pixels).save(folder / name, quality=95)
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


def numbers(text: str) -> list[float]:
    return [float(v) for v in text.split()]


def colour_of(pack: Path, source: str) -> np.ndarray:
    """The photo's colour (the disk photo's: its green surround, the colour of its foliage crops)."""
    pixels = np.asarray(Image.open(pack / source).convert("RGB"), dtype=np.float64)
    return pixels[0, 0]


def layers_by_file(folder: Path) -> dict[str, dict[str, list[dict]]]:
    """Per composite, its ``object`` and ``background`` rows of sources.csv, each in order."""
    grouped: dict[str, dict[str, list[dict]]] = {}
    for r in rows(folder / "sources.csv"):
        grouped.setdefault(r["file"], {"object": [], "background": []})[r["role"]].append(r)
    for layers in grouped.values():
        for role_rows in layers.values():
            assert [int(r["order"]) for r in role_rows] == list(range(len(role_rows)))
    return grouped


def hand_mask(width: int, height: int, exponent: float, feather: float) -> np.ndarray:
    """The soft mask by its definition: superellipse radius at pixel centres, smoothstep((1 - r) / feather)."""
    alpha = np.zeros((height, width))
    for row in range(height):
        for col in range(width):
            u, v = (col + 0.5) / width * 2 - 1, (row + 0.5) / height * 2 - 1
            r = (abs(u) ** exponent + abs(v) ** exponent) ** (1 / exponent)
            t = min(max((1 - r) / feather, 0.0), 1.0)
            alpha[row, col] = t * t * (3 - 2 * t)
    return alpha


def redraw(pack: Path, layers: dict[str, list[dict]]) -> tuple[np.ndarray, list[np.ndarray], list[np.ndarray]]:
    """A composite redrawn from its record: the base colour, then every patch alpha-blended in paste order.
    Returns the image, each object's weight in it (alpha x (1 - alpha) of everything later) and its alpha."""
    background, objects = layers["background"], layers["object"]
    image = np.empty((CANVAS, CANVAS, 3))
    image[:] = colour_of(pack, background[0]["source"])
    weights, alphas = [], []
    for layer in background[1:] + objects:
        x1, y1, x2, y2 = (round(v * CANVAS) for v in numbers(layer["placed"]))
        alpha = np.zeros((CANVAS + 2 * x2 - 2 * x1 + 2 * y2 - 2 * y1, ) * 2)  # room for patches past the border
        pad = (alpha.shape[0] - CANVAS) // 2
        alpha[pad + y1:pad + y2, pad + x1:pad + x2] = hand_mask(x2 - x1, y2 - y1, *numbers(layer["mask"]))
        alpha_full = alpha
        alpha = alpha[pad:pad + CANVAS, pad:pad + CANVAS]
        image = alpha[..., None] * colour_of(pack, layer["source"]) + (1 - alpha[..., None]) * image
        if layer["role"] == "object":
            weights = [w * (1 - alpha) for w in weights] + [alpha.copy()]
            alphas.append(alpha_full)
    return image, weights, alphas


def test_flower_like():
    colours = np.array([[40, 140, 40],    # leaf green (hue 120, saturation 0.71)   -> foliage
                        [10, 10, 10],     # shadow (value 0.04)                     -> foliage
                        [120, 90, 60],    # earth (hue 30, saturation 0.5, value 0.47) -> foliage
                        [100, 100, 110],  # dull grey (saturation 0.09, value 0.43) -> foliage
                        [230, 220, 30],   # yellow (hue 57, below the green range)  -> flower
                        [250, 250, 250],  # white (value 0.98)                      -> flower
                        [200, 50, 200],   # magenta                                 -> flower
                        [60, 120, 200]],  # blue (hue 214)                          -> flower
                       dtype=np.uint8)
    assert flower_like(colours[None])[0].tolist() == [False] * 4 + [True] * 4


def test_soft_mask_by_hand():
    alpha = soft_mask(11, 7, exponent=2.0, feather=0.4)
    assert alpha.shape == (7, 11) and alpha.dtype == np.float32
    assert alpha[3, 5] == 1.0                        # the centre (u = v = 0)
    # the centre row's last pixel: u = 10.5 / 11 * 2 - 1 = 10 / 11, t = (1 - 10/11) / 0.4 = 5 / 22
    t = 5 / 22
    assert alpha[3, 10] == pytest.approx(t * t * (3 - 2 * t), abs=1e-6)
    # a corner pixel: u = 10/11, v = 6/7, r > 1 -> 0
    assert alpha[0, 0] == alpha[6, 10] == 0.0
    # alpha >= 0.5 exactly where r <= 1 - feather / 2 (any exponent), e.g. on the centre row |u| <= 0.8:
    u = np.abs((np.arange(11) + 0.5) / 11 * 2 - 1)
    assert ((alpha[3] >= 0.5) == (u <= 0.8)).all()
    np.testing.assert_allclose(soft_mask(9, 5, 3.3, 0.25), hand_mask(9, 5, 3.3, 0.25), atol=1e-6)


def test_layout_and_manifests(built, pack):
    images = rows(built / "images.csv")
    assert [r["split"] for r in images] == ["test"] * 24 + ["train"] * 8
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
    assert list(rows(built / "sources.csv")[0]) == ["file", "role", "order", "source", "class_id", "crop", "placed",
                                                     "mask"]
    queries = rows(built / "queries.csv")
    assert len(queries) == 2 * len(TEST_CLASSES)
    for q in queries:  # byte-for-byte copies of the pack's photos
        assert (built / q["file"]).read_bytes() == (pack / q["source"]).read_bytes()
    params = json.loads((built / "params.json").read_text())
    assert params["seed"] == 0 and params["params"] == SMALL.to_json() and params["generator_version"] == 2
    assert params["counts"]["test_composites"] == 24 and params["counts"]["queries"] == 8
    assert params["counts"]["foliage_photos"] == 12  # the 3 foliage photos of each train class, disk included
    assert not list(built.parent.glob(".clutter.*"))  # no staging folder left behind


def test_composites_are_soft_alpha_blends_and_boxes_are_the_visible_part(built, pack, tmp_path):
    """Redrawn by hand from sources.csv (solid colours, soft masks by their definition), every composite
    matches the generator's up to JPEG error; each box is the box of the object's weight >= 0.5 pixels, and
    every object keeps >= 70 % of its alpha >= 0.5 area visible."""
    redrawn = occluded = 0
    boxes = {}
    for b in rows(built / "boxes.csv"):
        boxes.setdefault(b["file"], []).append(tuple(round(float(b[k]) * CANVAS) for k in ("x1", "y1", "x2", "y2")))
    for file, layers in layers_by_file(built).items():
        expected, weights, alphas = redraw(pack, layers)
        found = [tuple(int(v) for v in (np.nonzero((w >= 0.5).any(0))[0].min(), np.nonzero((w >= 0.5).any(1))[0].min(),
                                        np.nonzero((w >= 0.5).any(0))[0].max() + 1,
                                        np.nonzero((w >= 0.5).any(1))[0].max() + 1)) for w in weights]
        assert found == boxes[file], file
        for weight, alpha in zip(weights, alphas):
            assert (weight >= 0.5).sum() >= 0.7 * (alpha >= 0.5).sum() - 1e-9
            occluded += (weight >= 0.5).sum() < (alpha >= 0.5).sum()
        if any(layer["source"] == DISK for layer in layers["object"] + layers["background"]):
            continue  # not one colour (and its JPEG rings near the disk): resampled, maybe flipped
        # the redraw through the same JPEG encoder at the same quality: equal up to a level or two of rounding
        encoded = tmp_path / "redrawn.jpg"
        Image.fromarray(np.clip(np.rint(expected), 0, 255).astype(np.uint8)).save(encoded, quality=95)
        pixels = np.asarray(Image.open(built / file).convert("RGB"), dtype=np.int16)
        assert np.abs(pixels - np.asarray(Image.open(encoded), dtype=np.int16)).max() <= 3, file
        redrawn += 1
    assert redrawn >= 15 and occluded >= 3  # the occlusion bound was exercised, not vacuous


def test_no_hard_edges(built, pack):
    """Across every patch border the mask rises over at least min_feather x the half-axis: no object or
    foliage patch changes from background to its own colour in one pixel."""
    for layers in layers_by_file(built).values():
        for layer in layers["background"][1:] + layers["object"]:
            x1, y1, x2, y2 = (round(v * CANVAS) for v in numbers(layer["placed"]))
            exponent, feather = numbers(layer["mask"])
            assert SMALL.min_feather - 1e-6 <= feather <= SMALL.max_feather + 1e-6 and 2 <= exponent <= 4
            alpha = soft_mask(x2 - x1, y2 - y1, exponent, feather)
            steepest = max(np.abs(np.diff(alpha, axis=0)).max(initial=0), np.abs(np.diff(alpha, axis=1)).max(initial=0))
            half_axis = min(x2 - x1, y2 - y1) / 2
            assert steepest <= 1.5 / (SMALL.min_feather * half_axis) + 1e-6  # smoothstep's slope is at most 1.5


def test_exactly_one_test_object_and_balanced_counts(built):
    """A test composite holds one test-class object and 0-2 train-class distractors; within each class the
    number of distractors is dealt evenly, so the object count carries no class information."""
    per_class: dict[int, list[int]] = {}
    for r in rows(built / "images.csv"):
        classes = [int(c) for c in r["class_ids"].split()]
        if r["split"] == "train":
            assert set(classes) <= set(TRAIN_CLASSES)
            continue
        test_objects = [c for c in classes if c in TEST_CLASSES]
        assert len(test_objects) == 1 and set(classes) - set(test_objects) <= set(TRAIN_CLASSES)
        per_class.setdefault(test_objects[0], []).append(len(classes))
    assert sorted(per_class) == list(TEST_CLASSES)
    for counts in per_class.values():
        histogram = np.bincount(counts, minlength=4)[1:]
        assert histogram.max() - histogram.min() <= 1, per_class


def test_backgrounds_are_train_foliage(built, pack):
    """Background layers are foliage crops of train photos (of other classes than a train composite's
    objects): never a flower photo, and of the disk photo only crops without a magenta pixel."""
    foliage, flowers = palette()
    labels = {r["file"]: r for r in rows(pack / "labels.csv")}
    used_disk = 0
    for layers in layers_by_file(built).values():
        object_classes = {int(r["class_id"]) for r in layers["object"]}
        for layer in layers["background"]:
            source = labels[layer["source"]]
            assert source["split"] == "train" and int(layer["class_id"]) in TRAIN_CLASSES
            photo = np.asarray(Image.open(pack / layer["source"]).convert("RGB"))
            x1, y1, x2, y2 = numbers(layer["crop"])
            height, width = photo.shape[:2]
            crop = photo[round(y1 * height):round(y2 * height), round(x1 * width):round(x2 * width)]
            assert crop.size and not flower_like(crop).any(), layer
            assert tuple(colour_of(pack, layer["source"]).round(-1)) in {tuple(np.round(c, -1)) for c in foliage}
            used_disk += layer["source"] == DISK
            if layer["file"].startswith("images/train/"):
                assert int(layer["class_id"]) not in object_classes
    assert used_disk >= 1


def test_same_seed_same_bytes_other_seed_differs(built, pack, tmp_path):
    again = build_clutter_set(pack, tmp_path / "again", seed=0, params=SMALL, progress=False)
    other = build_clutter_set(pack, tmp_path / "other", seed=1, params=SMALL, progress=False)
    for name in ("images.csv", "boxes.csv", "queries.csv", "sources.csv", "params.json"):
        assert (again / name).read_bytes() == (built / name).read_bytes(), name
    for r in rows(built / "images.csv"):
        assert (again / r["file"]).read_bytes() == (built / r["file"]).read_bytes()
    assert (other / "boxes.csv").read_bytes() != (built / "boxes.csv").read_bytes()
    assert (other / "sources.csv").read_bytes() != (built / "sources.csv").read_bytes()


def test_degradations_change_pixels_not_boxes(built, pack, tmp_path):
    """Blur, noise, softening and the JPEG quality draw act on pixels only: the boxes stay those of the
    exact set (drawn from the same generator state), and the images differ."""
    degraded = ClutterParams(**{**SMALL.to_json(), "max_blur": 0.6, "max_noise": 3.0, "max_softening": 1.0,
                                "min_jpeg_quality": 75})
    folder = build_clutter_set(pack, tmp_path / "degraded", params=degraded, progress=False)
    assert (folder / "boxes.csv").read_bytes() == (built / "boxes.csv").read_bytes()
    file = rows(built / "images.csv")[0]["file"]
    assert (folder / file).read_bytes() != (built / file).read_bytes()


def test_queries_are_never_pasted(built):
    queries = rows(built / "queries.csv")
    pasted = {r["source"] for r in rows(built / "sources.csv") if r["role"] == "object"}
    assert not pasted & {q["source"] for q in queries}
    per_class = {c: sum(int(q["class_id"]) == c for q in queries) for c in TEST_CLASSES}
    assert per_class == {c: 2 for c in TEST_CLASSES}


def test_rebuild_is_a_no_op_or_refused(pack, tmp_path):
    folder = build_clutter_set(pack, tmp_path / "set", params=SMALL, progress=False)
    stamp = (folder / "params.json").stat().st_mtime_ns
    assert build_clutter_set(pack, folder, params=SMALL) == folder
    assert (folder / "params.json").stat().st_mtime_ns == stamp
    other = ClutterParams(**{**SMALL.to_json(), "test_composites": 5})
    with pytest.raises(ClutterError, match=r"set was built differently: test_composites: 24 -> 5.*Delete that folder"):
        build_clutter_set(pack, folder, params=other)
    with pytest.raises(ClutterError, match="seed: 0 -> 3"):
        build_clutter_set(pack, folder, seed=3, params=SMALL)
    identity = json.loads((folder / "params.json").read_text())
    older = {**identity, "generator_version": 1, "params": {"min_objects": 1}}
    assert clutter_module._differences(older, identity) == ["generator_version: 1 -> 2"]
    assert (folder / "params.json").stat().st_mtime_ns == stamp  # refused: untouched
    build_clutter_set(pack, folder, params=other, overwrite=True, progress=False)
    assert len(rows(folder / "images.csv")) == 5 + 8
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
    with pytest.raises(ClutterError, match="min_feather"):
        ClutterParams(min_feather=0.0)
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


def test_reference_rows_chance_and_object_count_prior(tmp_path):
    """Hand-computed from the definition of tie-aware AP (the mean AP over the orders of tied scores).

    The hand-made set: database objects per composite [1, 2, 1, 1]; query 5's positives {0, 1}, query 6's
    {1, 2}, query 7 has none (left out of every mean). Chance (all tied, N = 4, R = 2): the mean AP over the
    6 placements of two positives is (1 + 5/6 + 3/4 + 7/12 + 1/2 + 5/12) / 6 = 49/72; R@1 = 2/4. Object-count
    prior: composite 1 (2 objects, a positive of both queries) ranks first, the others tie at ranks 2-4 with
    one positive among them: AP = (1 + (2/2 + 2/3 + 2/4) / 3) / 2 = 31/36; R@1 = 1."""
    from msretrieval.retrieval.evaluation.harness import format_table, report

    bench = ClutterBenchmark.from_folder(hand_made_set(tmp_path / "hand"))
    assert bench.object_counts().tolist() == [1, 2, 1, 1]
    rows_ = {row["method"]: row for row in bench.reference_rows(map_at_k=1)}
    assert list(rows_) == ["chance", "object-count prior"]
    assert rows_["chance"]["metrics"]["mAP"] == pytest.approx(49 / 72)
    assert rows_["chance"]["metrics"]["R@1"] == pytest.approx(0.5)
    assert rows_["object-count prior"]["metrics"]["mAP"] == pytest.approx(31 / 36)
    assert rows_["object-count prior"]["metrics"]["R@1"] == pytest.approx(1.0)
    assert rows_["object-count prior"]["metrics"]["mAP@1"] == pytest.approx(1.0)
    summary = report(bench, [])
    assert [row["method"] for row in summary["reference"]] == ["chance", "object-count prior"]
    table = format_table(summary).splitlines()
    assert table[-2].startswith("chance ") and table[-1].startswith("object-count prior")
    assert table[-1].split()[2] == f"{31 / 36:.4f}" and table[-1].split()[-3:] == ["-", "-", "-"]


@pytest.mark.parametrize("line, message", [
    ("db/0.jpg,0.1,0.1,1.2,0.5,5,test", r"boxes.csv:3 \(db/0.jpg\): x2 = 1.2 is outside \[0, 1\]"),
    ("db/0.jpg,0.5,0.1,0.5,0.5,5,test", ":3 .*need x1 < x2 and y1 < y2"),
    ("db/0.jpg,a,0.1,0.2,0.5,5,test", ":3 .*x1 'a' is not a number"),
    ("db/0.jpg,0.1,0.1,0.2,0.5,five,test", ":3 .*class_id 'five' is not an integer"),
    ("db/0.jpg,0.1,0.1,0.2,0.5,5,train", ":3 .*is in split 'train' here but 'test'"),
    ("db/0.jpg,0.1,0.1,0.2,0.5", "line 3: expected 7 fields"),
])
def test_bad_box_rows_are_named(tmp_path, line, message):
    from msretrieval.data.manifest import ManifestError

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
    monkeypatch.setattr("msretrieval.retrieval.evaluation.benchmarks.build_clutter_set",
                        partial(build_clutter_set, params=SMALL, progress=False))
    bench = create_benchmark("flowers102-clutter", pack.parent)
    assert (pack.parent / "flowers102-clutter" / "params.json").is_file()
    assert bench.name == "flowers102-clutter" and bench.default_size == CANVAS
    assert len(bench.queries) == 8 and len(bench.database) == 24 and len(bench.train_set()) == 8
    assert all(p.is_file() for p in bench.database_paths() + bench.query_paths() + list(bench.train_set().paths))
    assert all(len(set(c.tolist()) & set(TEST_CLASSES)) == 1 for c in bench.database_classes)
    small = create_benchmark("flowers102-clutter", pack.parent, limit=4)  # the second use reads the built set
    assert small.name == "flowers102-clutter[:4]" and len(small.database) == 4
    assert sorted(small.queries.labels.tolist()) == list(TEST_CLASSES)
