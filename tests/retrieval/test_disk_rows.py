"""DiskRows: rows of .npy files (one, or the shards of a folder) read by position, as numpy would index them."""
from __future__ import annotations

import numpy as np
import pytest

from msretrieval.retrieval.search.disk_rows import DiskRows
from msretrieval.retrieval.search.shards import ShardedArray, ShardWriter

ROWS = np.arange(7 * 3, dtype=np.float32).reshape(7, 3)  # row r is (3r, 3r + 1, 3r + 2)


def test_rows_of_one_file_and_of_shards(tmp_path):
    np.save(tmp_path / "rows.npy", ROWS)
    writer = ShardWriter(tmp_path / "shards", count=7, shard_rows=3)
    for index, start in enumerate(range(0, 7, 3)):
        writer.write(index, ROWS[start:start + 3])
    for source in (tmp_path / "rows.npy", str(tmp_path / "rows.npy"), ShardedArray(tmp_path / "shards")):
        rows = DiskRows(source)
        assert rows.shape == (7, 3) and len(rows) == 7 and rows.dtype == np.float32
        np.testing.assert_array_equal(rows.take(np.array([0, 2, 3, 6])), [[0, 1, 2], [6, 7, 8], [9, 10, 11],
                                                                          [18, 19, 20]])
        np.testing.assert_array_equal(rows.take(np.array([4, 4, 5])), ROWS[[4, 4, 5]])
        assert rows.take(np.array([], dtype=np.int64)).shape == (0, 3)


def test_rows_out_of_order_or_range_and_bad_files_are_errors(tmp_path):
    np.save(tmp_path / "rows.npy", ROWS)
    rows = DiskRows(tmp_path / "rows.npy")
    for bad in ([2, 1], [-1, 3], [0, 7]):
        with pytest.raises(ValueError, match="ascending row indices in 0..6"):
            rows.take(np.array(bad))
    np.save(tmp_path / "cube.npy", np.zeros((2, 2, 2), np.float32))
    with pytest.raises(ValueError, match="C-ordered 2-D array"):
        DiskRows(tmp_path / "cube.npy")
    data = (tmp_path / "rows.npy").read_bytes()
    (tmp_path / "short.npy").write_bytes(data[:-12])  # the last row's 3 floats are gone
    with pytest.raises(ValueError):  # refused when opened, not at a later read
        DiskRows(tmp_path / "short.npy")
