"""Every command caps oneDNN's primitive cache before its first convolution, unless the user set a capacity."""
from __future__ import annotations

import os

from msretrieval.utils.cli import run_cli


def test_a_command_runs_with_onednns_primitive_cache_capped_at_64(monkeypatch):
    monkeypatch.setenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "")  # so that monkeypatch restores the original
    monkeypatch.delenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY")
    seen = []
    assert run_cli(lambda: seen.append(os.environ.get("ONEDNN_PRIMITIVE_CACHE_CAPACITY"))) == 0
    assert seen == ["64"]


def test_a_capacity_the_user_set_is_kept(monkeypatch):
    monkeypatch.setenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "1024")
    seen = []
    assert run_cli(lambda: seen.append(os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"])) == 0
    assert seen == ["1024"]
