"""Atomic writes: a failure while writing (a full disk, a kill) leaves the previous file, or no folder at all."""
from __future__ import annotations

import errno
import json
import os
import subprocess
import sys

import pytest

from msretrieval.retrieval.evaluation.harness import write_report
from msretrieval.utils import files
from msretrieval.utils.config import load_yaml, save_yaml
from msretrieval.utils.files import atomic_directory, atomic_write_text


def disk_full(*args):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_atomic_directory_appears_only_when_complete(tmp_path):
    target = tmp_path / "release"
    with atomic_directory(target) as building:
        (building / "a.txt").write_text("a")
        assert not target.exists() and building.parent == tmp_path and building.name.startswith(".release.")
    assert [p.name for p in target.iterdir()] == ["a.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["release"]  # no partial sibling left


def test_an_error_inside_atomic_directory_leaves_nothing(tmp_path):
    target = tmp_path / "release"
    with pytest.raises(RuntimeError):
        with atomic_directory(target) as building:
            (building / "a.txt").write_text("a")
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []


def test_atomic_directory_fills_an_empty_folder_and_refuses_a_full_one(tmp_path):
    (tmp_path / "empty").mkdir()
    with atomic_directory(tmp_path / "empty") as building:
        (building / "a.txt").write_text("a")
    assert (tmp_path / "empty" / "a.txt").read_text() == "a"
    with pytest.raises(FileExistsError, match="appeared and is not empty"):
        with atomic_directory(tmp_path / "empty") as building:
            (building / "b.txt").write_text("b")
    assert [p.name for p in (tmp_path / "empty").iterdir()] == ["a.txt"]


def test_a_killed_builders_leftover_is_removed_by_the_next_build(tmp_path):
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(done.stdout)  # this process has exited: its partial folder is garbage
    stale = tmp_path / f".release.partial-{dead}"
    (stale / "sub").mkdir(parents=True)
    alive = tmp_path / f".release.partial-{os.getppid()}"  # a running process's build is left alone
    alive.mkdir()
    with atomic_directory(tmp_path / "release"):
        pass
    assert sorted(p.name for p in tmp_path.iterdir()) == [alive.name, "release"]


@pytest.mark.parametrize("write, read", [
    (lambda path, value: save_yaml({"value": value}, path), lambda path: load_yaml(path)["value"]),
    (lambda path, value: write_report({"value": value}, path), lambda path: json.loads(path.read_text())["value"]),
    (lambda path, value: atomic_write_text(path, str(value)), lambda path: int(path.read_text())),
], ids=["config.yaml", "results.json", "text"])
def test_a_full_disk_while_writing_keeps_the_previous_file(tmp_path, monkeypatch, write, read):
    path = tmp_path / "out"
    write(path, 1)
    monkeypatch.setattr(files.os, "fsync", disk_full)  # the new bytes cannot be made durable
    with pytest.raises(OSError) as raised:
        write(path, 2)
    assert raised.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert read(path) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # the temporary is gone
