"""Sharded row arrays: whole shards only, resume skips finished shards, rows read back exactly."""
from __future__ import annotations

import numpy as np
import pytest

from msretrieval.retrieval.search.shards import ShardedArray, ShardWriter, shard_path, shard_ranges


def test_ranges_cover_every_row_once():
    assert shard_ranges(7, 3) == [range(0, 3), range(3, 6), range(6, 7)]
    assert shard_ranges(6, 3) == [range(0, 3), range(3, 6)]
    with pytest.raises(ValueError):
        shard_ranges(5, 0)


def test_rows_written_out_of_order_read_back_exactly(tmp_path):
    data = np.arange(7 * 2, dtype=np.float32).reshape(7, 2)
    writer = ShardWriter(tmp_path, count=7, shard_rows=3)
    for index in (2, 0, 1):
        assert not writer.complete()
        writer.write(index, data[writer.ranges[index].start:writer.ranges[index].stop])
    assert writer.complete() and writer.pending() == []
    array = ShardedArray(tmp_path)
    assert array.shape == (7, 2) and array.nbytes == data.nbytes
    np.testing.assert_array_equal(array.to_array(), data)
    np.testing.assert_array_equal(array.rows(2, 5), data[2:5])
    np.testing.assert_array_equal(array.rows(6, 9), data[6:7])
    assert array.rows(4, 4).shape == (0, 2)
    assert [start for start, _ in array.blocks()] == [0, 3, 6]
    assert isinstance(array.shard(0), np.memmap)


def test_a_restarted_writer_keeps_finished_shards_and_refuses_wrong_sizes(tmp_path):
    data = np.ones((5, 3), dtype=np.float16)
    ShardWriter(tmp_path, count=5, shard_rows=2).write(1, data[2:4])
    again = ShardWriter(tmp_path, count=5, shard_rows=2)
    assert again.pending() == [0, 2]
    with pytest.raises(ValueError, match="shard 0 holds rows 0..1"):
        again.write(0, data[:3])
    with pytest.raises(ValueError, match="2 of 3 shards are missing"):
        ShardedArray(tmp_path)
    assert not list(tmp_path.glob(".*.tmp"))


def test_another_layout_starts_over(tmp_path):
    ShardWriter(tmp_path, count=5, shard_rows=2).write(0, np.zeros((2, 1)))
    writer = ShardWriter(tmp_path, count=6, shard_rows=2)
    assert writer.pending() == [0, 1, 2] and not shard_path(tmp_path, 0).exists()


def test_shards_of_another_origin_start_over_and_the_origin_is_read_back(tmp_path, caplog):
    ShardWriter(tmp_path, count=5, shard_rows=2, origin="fit-a").write(0, np.zeros((2, 1)))
    assert ShardWriter(tmp_path, count=5, shard_rows=2, origin="fit-a").pending() == [1, 2]  # same fit: resumed
    with caplog.at_level("WARNING", logger="msretrieval.retrieval.search.shards"):
        writer = ShardWriter(tmp_path, count=5, shard_rows=2, origin="fit-b")
    assert writer.pending() == [0, 1, 2] and "another fit (origin fit-a; this extraction's is fit-b)" in caplog.text
    for index, rows in enumerate(((0, 1), (2, 3), (4,))):
        writer.write(index, np.array(rows, dtype=np.float32)[:, None])
    assert ShardedArray(tmp_path).origin == "fit-b"
    # a folder written before origins were recorded: its rows have no origin, so only an unfitted writer resumes
    layout = tmp_path / "layout.json"
    layout.write_text(layout.read_text().replace(', "origin": "fit-b"', ""))
    assert ShardedArray(tmp_path).origin is None
    assert ShardWriter(tmp_path, count=5, shard_rows=2).pending() == []
    assert ShardWriter(tmp_path, count=5, shard_rows=2, origin="fit-b").pending() == [0, 1, 2]
