"""`.gitignore` keeps what the README's commands write out of git, and keeps the source in."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# outputs of the README's commands (train, evaluate, export, index, search, prepare_flowers102, data.clutter)
WRITTEN = ["runs/flowers102/last.pth", "runs/flowers102/config.yaml", "runs/flowers102/results.json",
           "cache/descriptors/flowers102/x.npy", "releases/flowers102/model.safetensors",
           "releases/flowers102/model.pt2", "releases/flowers102/README.md", "releases/.flowers102.partial-123/x",
           "indexes/photos/index.faiss", "indexes/photos/index.json", "sheet.png", "model.pt2",
           "datasets/flowers102/labels.csv", "datasets/.downloads/flowers102/102flowers.tgz",
           "data/flowers102-clutter/boxes.csv", "runs/flowers102/.last.pth.tmp"]
SOURCE = ["data/__init__.py", "data/roots.py", "README.md", "configs/default.yaml", "docs/img/figure.png"]


def ignored(paths: list[str]) -> set[str]:
    done = subprocess.run(["git", "check-ignore", "--no-index", "--stdin"], input="\n".join(paths), cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode in (0, 1), done.stderr  # 1: none of them is ignored
    return set(done.stdout.split())


@pytest.mark.skipif(shutil.which("git") is None or not (REPO / ".git").exists(), reason="needs git and a checkout")
def test_outputs_are_ignored_and_source_is_not():
    assert ignored(WRITTEN) == set(WRITTEN)
    assert ignored(SOURCE) == set()
