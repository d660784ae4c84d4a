"""scripts/bench_binary_search.py on a small database: it runs, and its numbers are sane."""
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "bench_binary_search.py"


def test_small_benchmark_reports_sane_numbers(tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPT), "--database", "5000", "--queries", "100", "--repeats", "1",
                           "--threads", "1", "--json", str(tmp_path / "bench.json")],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr
    result = json.loads((tmp_path / "bench.json").read_text())
    assert result["binary"]["database_bytes"] == 5000 * 8 and result["float"]["database_bytes"] == 5000 * 2048
    assert result["memory_ratio"] == 256
    for kind in ("binary", "float"):
        assert 0 < result[kind]["search_seconds"] < 60 and result[kind]["cpu_seconds"] >= 0
    assert result["time_ratio"] == result["float"]["search_seconds"] / result["binary"]["search_seconds"]
    growth = result["float"]["rss_growth_bytes"]
    assert growth is None or growth > 0.5 * result["float"]["database_bytes"]  # the flat index holds the vectors
    assert "database memory 256x" in done.stdout and "IndexBinaryFlat" in done.stdout


def test_bad_code_length_is_one_clear_error():
    done = subprocess.run([sys.executable, str(SCRIPT), "--bits", "12"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].endswith("--bits must be a positive multiple of 8 (codes are packed "
                                                         "into bytes), got 12")
