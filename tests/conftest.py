"""Shared fixtures: where the real Flowers-102 pack is, and small generated image sets."""
from __future__ import annotations

import csv
import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
#: An MSBD configuration small enough for tests (a 3 x 3 grid of 32-px patches, 6 words, 4 ITQ iterations).
TINY_MSBD = """
scales: [1.0]
proposals: grid
patches: 3
patch_size: 32
proposal_side: 48
patch_dim: 8
codebook: 6
nearest_words: 3
saliency_size: 48
branch_dims: 12
classifier_steps: 20
iterations: 4
itq_iterations: 4
fit_images: null
"""
# Tests never reach the model hub: fail at once instead of retrying for a minute on offline machines.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Scripts and ``python -c`` run by the tests import msretrieval from this tree, installed or not.
os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])


def pytest_configure(config):
    """Under pytest-xdist (``make test``) the workers share the cores rather than each starting a thread per core
    (torch, FAISS and the tests' subprocesses read OMP_NUM_THREADS; set before any of them is imported)."""
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers:
        os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // int(workers))))


def shared_data_root() -> Path | None:
    for candidate in (os.environ.get("DATA_ROOT"), REPO.parent / "shared" / "data"):
        if candidate and (Path(candidate) / "flowers102" / "labels.csv").is_file():
            return Path(candidate)
    return None


def load_script(name: str):
    """``scripts/NAME.py`` as a module, for calling its ``main(argv)`` in-process (``run_cli(lambda:
    module.main(argv))`` is what its ``__main__`` runs): a test that checks a message or a file then costs no
    interpreter start-up."""
    spec = importlib.util.spec_from_file_location(f"script_{name}", REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_script(name: str, argv: list[str], capsys) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of ``python scripts/NAME.py ARGV``, run in-process through ``run_cli`` as
    the script's ``__main__`` does."""
    from msretrieval.utils.cli import run_cli

    capsys.readouterr()  # only this command's output
    code = run_cli(lambda: load_script(name).main([str(a) for a in argv]))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="session")
def flowers_root() -> Path:
    root = shared_data_root()
    if root is None:
        pytest.skip("Flowers-102 pack not found ($DATA_ROOT or ../shared/data)")
    return root


def write_labelled_set(root: Path, num_classes: int = 3, per_class: int = 4, size=(48, 40), seed: int = 0) -> Path:
    """A tiny labelled set whose classes differ in colour, with a manifest at root/toy/labels.csv."""
    rng = np.random.default_rng(seed)
    folder = root / "toy"
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for c in range(num_classes):
        base = rng.integers(0, 256, 3)
        for i in range(per_class):
            pixels = np.clip(base + rng.normal(0, 20, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
            name = f"images/c{c}_{i}.jpg"
            Image.fromarray(pixels).save(folder / name, quality=90)
            rows.append({"file": name, "class_id": c + 1, "split": "test"})
    with (folder / "labels.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["file", "class_id", "split"])
        writer.writeheader()
        writer.writerows(rows)
    return folder / "labels.csv"


@pytest.fixture
def make_labelled_set(tmp_path):
    """``make_labelled_set(num_classes=3, per_class=4, size=(48, 40))`` -> path of a tiny labelled manifest."""
    return lambda **kwargs: write_labelled_set(tmp_path, **kwargs)


def write_flowers_subset(path: Path, data_root: Path, classes: dict[str, list[int]], per_class: int) -> Path:
    """A manifest of real Flowers-102 photos: ``classes`` maps a split name to class ids, ``per_class`` images
    of each (the first ones of the class), with absolute paths."""
    rows = list(csv.DictReader((data_root / "flowers102" / "labels.csv").open()))
    chosen = []
    for split, ids in classes.items():
        for class_id in ids:
            members = [r for r in rows if int(r["class_id"]) == class_id][:per_class]
            chosen += [{"file": str(data_root / "flowers102" / r["file"]), "class_id": class_id, "split": split}
                       for r in members]
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["file", "class_id", "split"])
        writer.writeheader()
        writer.writerows(chosen)
    return path


@pytest.fixture
def flowers_subset(tmp_path, flowers_root):
    """``flowers_subset({"train": [1, 2, 3]}, per_class=5)`` -> manifest of real photos (skips without the pack)."""
    return lambda classes, per_class=5: write_flowers_subset(tmp_path / "flowers" / "labels.csv", flowers_root,
                                                             classes, per_class)


@pytest.fixture(scope="session")
def tiny_release(tmp_path_factory) -> Path:
    """A release directory (no graph) of ``tests.release.test_release.small_model()`` at 64 px, exported once
    per test process and shared: tests must not change it (copy it first)."""
    from msretrieval.release.export import export_release
    from tests.release.test_release import small_model

    path = tmp_path_factory.mktemp("tiny_release") / "rel"
    export_release(small_model(), path, image_size=64, graph=False)
    return path


@pytest.fixture
def one_thread():
    """Single-threaded torch for tiny tensors (extra threads only contend on a shared 2-core machine),
    restored afterwards."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_revisitop_set(root: Path, name: str, seed: int = 0, landmarks: int = 3, views: int = 3,
                        distractors: int = 3, size=(96, 80)) -> Path:
    """A tiny set in the revisitop layout (``data.revisitop``): ``landmarks`` textured patches, each pasted
    into ``views`` database images on noise (the first two of a landmark's views are its query's ``easy``
    images, the others ``hard``), ``distractors`` noise-only database images (``junk`` of query 0), and one
    query per landmark, its ``bbx`` around the patch. Returns ``root``; the images differ with ``seed``."""
    from msretrieval.data.revisitop import save_revisitop

    rng = np.random.default_rng(seed)
    width, height = size
    patch_side = min(size) // 2
    folder = root / name / "jpg"
    patches = [Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).resize((patch_side, patch_side),
                                                                                          Image.BILINEAR)
               for _ in range(landmarks)]

    def picture(file: str, patch: Image.Image | None) -> list[float]:
        canvas = Image.fromarray(np.clip(rng.normal(128, 40, (height, width, 3)), 0, 255).astype(np.uint8))
        x, y = int(rng.integers(0, width - patch_side)), int(rng.integers(0, height - patch_side))
        if patch is not None:
            canvas.paste(patch, (x, y))
        folder.mkdir(parents=True, exist_ok=True)
        canvas.save(folder / f"{file}.jpg", quality=90)
        return [float(x), float(y), float(x + patch_side), float(y + patch_side)]

    database, truth = [], []
    for lm, patch in enumerate(patches):
        members = []
        for v in range(views):
            picture(f"{name}_l{lm}_v{v}", patch)
            members.append(len(database))
            database.append(f"{name}_l{lm}_v{v}")
        truth.append({"easy": members[:2], "hard": members[2:], "junk": []})
    for d in range(distractors):
        picture(f"{name}_d{d}", None)
        database.append(f"{name}_d{d}")
    truth[0]["junk"] = [len(database) - 1]
    queries = []
    for lm, patch in enumerate(patches):
        truth[lm]["bbx"] = picture(f"{name}_q{lm}", patch)
        queries.append(f"{name}_q{lm}")
    save_revisitop(root, name, database, queries, truth)
    return root


@pytest.fixture
def make_revisitop_set(tmp_path):
    """``make_revisitop_set(name, seed=0, ...)`` -> the data root (tmp_path) holding a tiny revisitop-layout set
    ``name`` (12 database images and 3 queries with boxes by default; see :func:`write_revisitop_set`)."""
    return lambda name, **kwargs: write_revisitop_set(tmp_path, name, **kwargs)
