"""scripts/search_large.py at a tiny size: its JSON, recall in range, exact search = numpy brute force."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from msretrieval.retrieval.search.shards import ShardedArray

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "search_large.py"


def run(tmp_path, *extra):
    done = subprocess.run([sys.executable, str(SCRIPT), "--count", "5000", "--dim", "32", "--queries", "50",
                           "--shard-rows", "1200", "--flat-limit", "1000", "--data", str(tmp_path / "db"),
                           "--out", str(tmp_path / "large.json"), *extra],
                          capture_output=True, text=True, cwd=REPO, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    return done, json.loads((tmp_path / "large.json").read_text())


def test_tiny_run_reports_and_exact_search_is_brute_force(tmp_path):
    done, result = run(tmp_path)
    assert (result["count"], result["dim"], result["queries"], result["k"], result["shards"]) == (5000, 32, 50, 10, 5)
    assert result["disk_bytes"] == 5000 * 32 * 4
    approx = result["approximate"]
    assert approx["factory"] == "IVF128,PQ4np" and approx["nlist"] == 128 and approx["nprobe"] == 4
    assert approx["train_size"] == 5000 and approx["m"] == 4
    for seconds in (approx["train_seconds"], approx["add_seconds"], approx["search_seconds"],
                    result["exact"]["search_seconds"]):
        assert 0 <= seconds < 300
    assert 0.0 <= result["recall_at_10"] <= 1.0 and result["speedup"] > 0
    assert result["peak_rss_bytes"] >= max(result["peak_rss_after"].values()) > 0
    assert result["peak_rss_over_disk"] == result["peak_rss_bytes"] / result["disk_bytes"]
    assert "IVF128,PQ4np nprobe=4" in done.stdout and "peak RSS" in done.stdout

    arrays = np.load(tmp_path / "large.npz")
    database = ShardedArray(tmp_path / "db").to_array()
    np.testing.assert_allclose(np.linalg.norm(database, axis=1), 1, rtol=1e-5)
    all_scores = arrays["queries"] @ database.T
    # scores compared, not only indices: FAISS's and numpy's sums may differ in the last bit on near-ties
    np.testing.assert_allclose(arrays["exact_scores"], -np.sort(-all_scores, axis=1)[:, :10], atol=1e-5)
    np.testing.assert_allclose(arrays["exact_scores"], np.take_along_axis(all_scores, arrays["exact_indices"], 1),
                               atol=1e-5)
    # every query is a noisy database row: its own row is the nearest
    assert (arrays["exact_scores"][:, 0] > 0.9).all()

    # a second run reuses the database on disk
    again, second = run(tmp_path, "--nprobe", "128")
    assert "writing" not in again.stderr and second["approximate"]["nprobe"] == 128
    np.testing.assert_array_equal(np.load(tmp_path / "large.npz")["exact_indices"], arrays["exact_indices"])
