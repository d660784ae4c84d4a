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


def test_two_stage_rows_on_clustered_data(tmp_path):
    """Codes derive from the floats: the shortlist finds the float top k far better than Hamming alone, the
    whole database as shortlist finds all of it, and the rows hold codes, not floats."""
    done = subprocess.run([sys.executable, str(SCRIPT), "--database", "3000", "--queries", "50", "--repeats", "1",
                           "--threads", "1", "--dim", "64", "--bits", "32", "--fit-sample", "1000",
                           "--shortlists", "20,3000", "--asym-shortlists", "20", "--tmp-dir", str(tmp_path),
                           "--json", str(tmp_path / "bench.json")],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr
    part = json.loads((tmp_path / "bench.json").read_text())["two_stage"]
    rows = {row["name"]: row for row in part["rows"]}
    assert list(rows) == ["flat float (exact)", "Hamming flat", "two-stage R=20", "two-stage R=3000",
                          "two-stage R=20 asym fast-scan"]
    assert part["data"] == {"clusters": 30, "cluster_size": 100, "decay": 1.0, "noise": 0.5, "codes": "itq",
                            "fit_sample": 1000, "asymmetric_fast_scan": True, "float_file_bytes": 3000 * 64 * 4 + 128}
    assert rows["flat float (exact)"]["recall"] == 1 and rows["flat float (exact)"]["database_bytes"] == 3000 * 256
    assert rows["two-stage R=3000"]["recall"] == 1
    assert rows["two-stage R=20"]["recall"] > rows["Hamming flat"]["recall"]
    assert rows["two-stage R=20 asym fast-scan"]["recall"] > rows["two-stage R=20"]["recall"]
    for name in ("Hamming flat", "two-stage R=20", "two-stage R=3000", "two-stage R=20 asym fast-scan"):
        assert rows[name]["database_bytes"] == 3000 * 4
    assert not list(tmp_path.glob("bench-two-stage-*"))  # the float file is removed
    assert "two-stage R=20" in done.stdout and "recall@10" in done.stdout
