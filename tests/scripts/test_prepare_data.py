"""scripts/prepare_flowers102.py and scripts/download_revisitop.py, run as subprocesses on tiny synthetic data.

Nothing is downloaded: the "offline" tests point the scripts' base-URL override (FLOWERS102_URL /
REVISITOP_URL) at a local port that refuses connections.
"""
from __future__ import annotations

import contextlib
import csv
import functools
import http.server
import os
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from PIL import Image

from msretrieval.data.manifest import flowers102
from msretrieval.data.revisitop import load_revisitop, save_revisitop

REPO = Path(__file__).resolve().parents[2]
REFUSED = "http://127.0.0.1:9/"  # the discard port: nothing listens, the connection is refused at once

FLOWER_SIZES = [(500, 600), (640, 500), (100, 80), (300, 300)]  # image_00003 is smaller than 144: not enlarged
FLOWER_LABELS = [1, 1, 60, 60]


def run(script: str, *args, env: dict | None = None) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items()
                   if k not in ("DATA_ROOT", "FLOWERS102_URL", "REVISITOP_URL")}
    environment.update(env or {})
    return subprocess.run([sys.executable, str(REPO / "scripts" / script), "--no-progress", *map(str, args)],
                          cwd=REPO, env=environment, capture_output=True, text=True, timeout=120)


@contextlib.contextmanager
def local_server(folder: Path):
    """Serve ``folder`` over HTTP on 127.0.0.1 (a stand-in for the official sites; no real network)."""
    handler = functools.partial(QuietHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def write_jpeg(path: Path, size=(16, 12), shade: int = 100) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (shade, 120, 60)).save(path, "JPEG")


def official_flowers(folder: Path, as_archive: bool = False) -> Path:
    """The official VGG layout: jpg/image_XXXXX.jpg (or 102flowers.tgz holding it) + imagelabels.mat."""
    folder.mkdir(parents=True)
    jpg = folder / "jpg"
    for i, size in enumerate(FLOWER_SIZES, start=1):
        write_jpeg(jpg / f"image_{i:05d}.jpg", size, shade=40 * i)
    scipy.io.savemat(folder / "imagelabels.mat", {"labels": np.array([FLOWER_LABELS], dtype=np.uint8)})
    if as_archive:
        with tarfile.open(folder / "102flowers.tgz", "w:gz") as tar:
            tar.add(jpg, arcname="jpg")
        for path in jpg.iterdir():
            path.unlink()
        jpg.rmdir()
    return folder


def flowers_pack(folder: Path) -> Path:
    """A ready pack: labels.csv + images/."""
    rows = [("images/image_00001.jpg", 3, "canterbury bells", "train", 20, 10),
            ("images/image_00002.jpg", 77, "passion flower", "test", 20, 10)]
    for row in rows:
        write_jpeg(folder / row[0])
    with (folder / "labels.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file", "class_id", "class_name", "split", "orig_w", "orig_h"])
        writer.writerows(rows)
    return folder


def read_rows(csv_path: Path) -> list[dict]:
    with csv_path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def assert_one_line_error(result: subprocess.CompletedProcess, *needles: str) -> str:
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0]
    return lines[0]


# ----------------------------------------------------------------------------------------- Flowers-102


@pytest.mark.parametrize("as_archive", [False, True], ids=["jpg-folder", "tgz"])
def test_flowers_built_from_official_layout(tmp_path, as_archive):
    source = official_flowers(tmp_path / "vgg", as_archive)
    root = tmp_path / "root"
    result = run("prepare_flowers102.py", "--from", source, "--data-root", root)
    assert result.returncode == 0, result.stderr

    rows = read_rows(root / "flowers102" / "labels.csv")
    assert [r["file"] for r in rows] == [f"images/image_{i:05d}.jpg" for i in range(1, 5)]
    assert [int(r["class_id"]) for r in rows] == FLOWER_LABELS
    assert [r["class_name"] for r in rows] == ["pink primrose"] * 2 + ["pink-yellow dahlia"] * 2
    assert [r["split"] for r in rows] == ["train", "train", "test", "test"]
    assert [(int(r["orig_w"]), int(r["orig_h"])) for r in rows] == FLOWER_SIZES

    sizes = [Image.open(root / "flowers102" / r["file"]).size for r in rows]
    assert sizes == [(144, 173), (184, 144), (100, 80), (144, 144)]

    train = flowers102(root, "train")
    assert len(train) == 2 and set(train.labels) == {1}
    assert all(path.is_file() for path in train.paths)
    test = flowers102(root, "test")
    assert list(test.labels) == [60, 60]
    assert not (root / ".partial").exists() and not (root / ".downloads").exists()


def test_flowers_keep_size(tmp_path):
    source = official_flowers(tmp_path / "vgg")
    root = tmp_path / "root"
    result = run("prepare_flowers102.py", "--from", source, "--data-root", root, "--shorter-side", 0)
    assert result.returncode == 0, result.stderr
    built = root / "flowers102" / "images" / "image_00001.jpg"
    assert built.read_bytes() == (source / "jpg" / "image_00001.jpg").read_bytes()


def test_flowers_class_names_match_the_shared_pack():
    script = (REPO / "scripts" / "prepare_flowers102.py").read_text()
    assert "'passion flower'" in script or '"passion flower"' in script
    shared = Path("/work/shared/data/flowers102/labels.csv")
    if not shared.is_file():
        pytest.skip("no shared Flowers-102 pack on this machine")
    import importlib.util

    spec = importlib.util.spec_from_file_location("prepare_flowers102", REPO / "scripts" / "prepare_flowers102.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    names = {int(r["class_id"]): r["class_name"] for r in read_rows(shared)}
    assert [names[c] for c in range(1, 103)] == list(module.CLASS_NAMES)


def test_flowers_pack_is_linked_then_replaced_only_with_force(tmp_path):
    pack = flowers_pack(tmp_path / "pack")
    root = tmp_path / "root"
    result = run("prepare_flowers102.py", "--from", pack, "--data-root", root)
    assert result.returncode == 0, result.stderr
    target = root / "flowers102"
    assert target.is_symlink() and target.resolve() == pack.resolve()
    assert list(flowers102(root, "test").labels) == [77]

    again = run("prepare_flowers102.py", "--from", pack, "--data-root", root, "--copy")
    assert again.returncode == 1
    assert_one_line_error(again, "already exists", "--force")
    assert target.is_symlink()

    forced = run("prepare_flowers102.py", "--from", pack, "--data-root", root, "--copy", "--force")
    assert forced.returncode == 0, forced.stderr
    assert target.is_dir() and not target.is_symlink()
    assert (pack / "labels.csv").is_file()  # replacing the link never touched the pack itself
    assert list(flowers102(root, "train").labels) == [3]


def test_flowers_data_root_from_environment(tmp_path):
    pack = flowers_pack(tmp_path / "pack")
    root = tmp_path / "env-root"
    result = run("prepare_flowers102.py", "--from", pack, env={"DATA_ROOT": str(root)})
    assert result.returncode == 0, result.stderr
    assert (root / "flowers102" / "labels.csv").is_file()


def test_flowers_unusable_source_is_one_line_error(tmp_path):
    (tmp_path / "empty").mkdir()
    result = run("prepare_flowers102.py", "--from", tmp_path / "empty", "--data-root", tmp_path / "root")
    assert result.returncode == 1
    assert_one_line_error(result, "labels.csv", "imagelabels.mat")


def test_flowers_download_from_a_local_mirror(tmp_path):
    mirror = official_flowers(tmp_path / "mirror", as_archive=True)
    root = tmp_path / "root"
    with local_server(mirror) as url:
        result = run("prepare_flowers102.py", "--data-root", root, env={"FLOWERS102_URL": url})
    assert result.returncode == 0, result.stderr
    assert list(flowers102(root, "test").labels) == [60, 60]
    assert not (root / ".downloads").exists()  # archives are removed after a successful build


def test_flowers_offline_download_fails_cleanly(tmp_path):
    root = tmp_path / "root"
    result = run("prepare_flowers102.py", "--data-root", root, env={"FLOWERS102_URL": REFUSED})
    assert result.returncode == 2
    line = assert_one_line_error(result, "download", "failed", "--from DIR")
    assert REFUSED in line
    assert not (root / "flowers102").exists()
    assert not (root / ".downloads").exists() and not (root / ".partial").exists()


# --------------------------------------------------------------------------------------- revisitop


def revisitop_set(folder: Path, name: str, database: list[str], queries: list[str]) -> Path:
    """gnd_<name>.pkl via save_revisitop in folder/<name>/ (it also creates the empty jpg/)."""
    truth = [{"bbx": [1, 1, 8, 8], "easy": [0], "hard": [1], "junk": []} for _ in queries]
    save_revisitop(folder, name, database, queries, truth)
    return folder / name


def test_revisitop_from_jpg_folder(tmp_path):
    source = revisitop_set(tmp_path / "src", "roxford5k", ["all_souls_000001", "radcliffe_000002"],
                           ["all_souls_000013"])
    for stem in ("all_souls_000001", "radcliffe_000002", "all_souls_000013"):
        write_jpeg(source / "jpg" / f"{stem}.jpg")
    root = tmp_path / "root"
    result = run("download_revisitop.py", "--datasets", "roxford5k", "--from", tmp_path / "src",
                 "--data-root", root)
    assert result.returncode == 0, result.stderr
    assert (root / "roxford5k").is_symlink()
    dataset = load_revisitop(root, "roxford5k")
    assert dataset.database == ("all_souls_000001", "radcliffe_000002")
    assert all(path.is_file() for path in dataset.database_paths + dataset.query_paths)
    assert not (root / "rparis6k").exists()


def test_revisitop_paris_archives_are_flattened(tmp_path):
    source = revisitop_set(tmp_path / "src", "rparis6k", ["paris_louvre_000001", "paris_eiffel_000002"],
                           ["paris_eiffel_000003"])
    source.joinpath("jpg").rmdir()  # only the archives, as published
    staging = tmp_path / "staging"
    for archive, stems in (("paris_1.tgz", ["louvre/paris_louvre_000001"]),
                           ("paris_2.tgz", ["eiffel/paris_eiffel_000002", "eiffel/paris_eiffel_000003"])):
        for stem in stems:
            write_jpeg(staging / "paris" / f"{stem}.jpg")
        with tarfile.open(source / archive, "w:gz") as tar:
            for stem in stems:
                tar.add(staging / "paris" / f"{stem}.jpg", arcname=f"paris/{stem}.jpg")
    root = tmp_path / "root"
    result = run("download_revisitop.py", "--datasets", "rparis6k", "--from", source, "--data-root", root)
    assert result.returncode == 0, result.stderr
    target = root / "rparis6k"
    assert target.is_dir() and not target.is_symlink()
    assert sorted(p.name for p in (target / "jpg").iterdir()) == [
        "paris_eiffel_000002.jpg", "paris_eiffel_000003.jpg", "paris_louvre_000001.jpg"]
    dataset = load_revisitop(root, "rparis6k")
    assert all(path.is_file() for path in dataset.database_paths + dataset.query_paths)
    assert (source / "paris_1.tgz").is_file()  # a user's archives are never deleted


def test_revisitop_missing_image_is_named_and_exits_1(tmp_path):
    source = revisitop_set(tmp_path / "src", "roxford5k", ["a_000001", "b_000002"], ["q_000003"])
    write_jpeg(source / "jpg" / "a_000001.jpg")
    write_jpeg(source / "jpg" / "q_000003.jpg")
    root = tmp_path / "root"
    result = run("download_revisitop.py", "--datasets", "roxford5k", "--from", source, "--data-root", root)
    assert result.returncode == 1
    assert_one_line_error(result, "b_000002.jpg", "1 of 3")
    assert not (root / "roxford5k").exists() and not (root / ".partial").exists()


def test_revisitop_distractors_from_archives(tmp_path):
    src = tmp_path / "src"
    oxford = revisitop_set(src, "roxford5k", ["a_000001", "b_000002"], ["a_000001"])
    write_jpeg(oxford / "jpg" / "a_000001.jpg")
    write_jpeg(oxford / "jpg" / "b_000002.jpg")
    distractors = src / "revisitop1m"
    distractors.mkdir()
    image = tmp_path / "d.jpg"
    write_jpeg(image, (4, 4))
    names = []
    for part in range(1, 101):
        name = f"{part:03d}/d{part}.jpg"
        names.append(name)
        with tarfile.open(distractors / f"revisitop1m.{part}.tar.gz", "w:gz") as tar:
            tar.add(image, arcname=name)
    (distractors / "revisitop1m.txt").write_text("\n".join(names) + "\n")
    root = tmp_path / "root"
    result = run("download_revisitop.py", "--datasets", "roxford5k", "--distractors", "--from", src,
                 "--data-root", root)
    assert result.returncode == 0, result.stderr
    assert (root / "revisitop1m" / "jpg" / "050" / "d50.jpg").is_file()
    assert (root / "revisitop1m" / "revisitop1m.txt").is_file()
    assert not (root / "revisitop1m" / ".extracted").exists()


def test_revisitop_download_from_a_local_mirror(tmp_path):
    mirror = revisitop_set(tmp_path / "mirror", "roxford5k", ["all_souls_000001", "balliol_000002"],
                           ["balliol_000002"])
    for stem in ("all_souls_000001", "balliol_000002"):
        write_jpeg(mirror / "jpg" / f"{stem}.jpg")
    with tarfile.open(mirror / "oxbuild_images.tgz", "w:gz") as tar:
        for stem in ("all_souls_000001", "balliol_000002"):
            tar.add(mirror / "jpg" / f"{stem}.jpg", arcname=f"{stem}.jpg")
    root = tmp_path / "root"
    with local_server(mirror) as url:
        result = run("download_revisitop.py", "--datasets", "roxford5k", "--data-root", root, "--keep-archives",
                     env={"REVISITOP_URL": url})
    assert result.returncode == 0, result.stderr
    dataset = load_revisitop(root, "roxford5k")
    assert all(path.is_file() for path in dataset.database_paths + dataset.query_paths)
    assert (root / ".downloads" / "roxford5k" / "oxbuild_images.tgz").is_file()


def test_revisitop_offline_download_fails_cleanly(tmp_path):
    root = tmp_path / "root"
    result = run("download_revisitop.py", "--datasets", "roxford5k", "--data-root", root,
                 env={"REVISITOP_URL": REFUSED})
    assert result.returncode == 2
    line = assert_one_line_error(result, "download", "failed", "--from DIR")
    assert "gnd_roxford5k.pkl" in line
    assert not (root / "roxford5k").exists()
    assert not (root / ".downloads").exists() and not (root / ".partial").exists()


def test_revisitop_refuses_existing_target(tmp_path):
    root = tmp_path / "root"
    (root / "rparis6k").mkdir(parents=True)
    result = run("download_revisitop.py", "--data-root", root, env={"REVISITOP_URL": REFUSED})
    assert result.returncode == 1
    assert_one_line_error(result, "already exist", "--force")
    assert (root / "rparis6k").is_dir()
