"""scripts/benchmark.py at its tiny size: every benchmark runs and BENCHMARKS.md has every section with ratios."""
import re
import sys

import pytest

from tests.conftest import REPO

sys.path.insert(0, str(REPO / "scripts"))
import benchmark  # noqa: E402


@pytest.mark.timeout(300)  # every benchmark, several in subprocesses
def test_tiny_run_writes_every_section_with_numeric_ratios(tmp_path, flowers_root, monkeypatch, one_thread):
    import faiss

    # --threads 1 sets torch's (one_thread puts it back), FAISS's and OMP_NUM_THREADS: restored for the next tests
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    faiss_threads = faiss.omp_get_max_threads()
    out = tmp_path / "BENCHMARKS.md"
    try:
        assert benchmark.main(["--tiny", "--threads", "1", "--data-root", str(flowers_root), "--out", str(out)]) == 0
    finally:
        faiss.omp_set_num_threads(faiss_threads)
    text = out.read_text()
    assert "`python scripts/benchmark.py --tiny --threads 1" in text.splitlines()[2]
    for row in ("CPU", "cores", "threads used", "RAM", "GPU", "torch / faiss / timm", "date"):
        assert f"| {row} |" in text
    sections = re.split(r"^## ", text, flags=re.MULTILINE)[1:]
    assert [s.splitlines()[0] for s in sections] == ["Machine", *benchmark.SECTIONS]
    for section in sections[1:]:
        # every benchmark's table has at least one ratio, and a number (not "-") in it
        assert re.search(r"\| \d+\.\d+x \|", section), section
