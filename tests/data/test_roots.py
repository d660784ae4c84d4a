"""The data root: a flag beats $DATA_ROOT beats the search roots; downloads never go into the `data` package."""
from __future__ import annotations

import importlib.util
import shutil
import subprocess
from pathlib import Path

import pytest

from msretrieval.data.roots import download_root, resolve_data_root

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def checkout(tmp_path, monkeypatch):
    """A working directory ``tmp/repo`` beside ``tmp/shared/data``, no $DATA_ROOT."""
    (tmp_path / "repo").mkdir()
    monkeypatch.chdir(tmp_path / "repo")
    monkeypatch.delenv("DATA_ROOT", raising=False)
    return tmp_path


def holds_flowers(root: Path) -> None:
    (root / "flowers102").mkdir(parents=True)
    (root / "flowers102" / "labels.csv").write_text("file,class_id\n")


def test_search_order_is_shared_then_data_then_datasets(checkout):
    assert resolve_data_root() == Path("datasets")  # none holds it: where it would be downloaded
    holds_flowers(checkout / "repo" / "datasets")
    assert resolve_data_root() == Path("datasets")
    holds_flowers(checkout / "repo" / "data")
    assert resolve_data_root() == Path("data")
    holds_flowers(checkout / "shared" / "data")
    assert resolve_data_root() == Path("../shared/data")
    assert resolve_data_root(dataset="roxford5k") == Path("datasets")  # looked up per set


def test_a_given_root_beats_the_search(checkout, monkeypatch):
    holds_flowers(checkout / "shared" / "data")
    monkeypatch.setenv("DATA_ROOT", "/env/root")
    assert resolve_data_root() == Path("/env/root") and download_root() == Path("/env/root")
    assert resolve_data_root("/flag") == Path("/flag") and download_root("/flag") == Path("/flag")


def test_downloads_go_to_datasets_even_when_data_holds_sets(checkout):
    holds_flowers(checkout / "repo" / "data")
    assert download_root() == Path("datasets")


def test_prepare_flowers_puts_the_set_in_datasets(checkout):
    from tests.scripts.test_prepare_data import flowers_pack

    pack = flowers_pack(checkout / "pack")
    spec = importlib.util.spec_from_file_location("prepare_flowers102", REPO / "scripts" / "prepare_flowers102.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--from", str(pack), "--no-progress", "-q"]) == 0
    assert (checkout / "repo" / "datasets" / "flowers102").resolve() == pack.resolve()
    assert not (checkout / "repo" / "data").exists()


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_the_makefile_searches_in_the_same_order(checkout):
    def found() -> str:
        done = subprocess.run(["make", "-s", "-f", str(REPO / "Makefile"), "--eval", "where: ; @$(FIND_DATA)",
                               "where"], cwd=checkout / "repo", capture_output=True, text=True, timeout=60)
        return done.stdout.strip()

    assert found() == ""
    holds_flowers(checkout / "repo" / "datasets")
    assert found() == "datasets"
    holds_flowers(checkout / "repo" / "data")
    assert found() == "data"
    holds_flowers(checkout / "shared" / "data")
    assert found() == "../shared/data"
