"""utils.cli.setup_logging: the one logging set-up of every entry point."""
import subprocess
import sys

from tests.conftest import REPO


def test_faiss_loader_notes_stay_out_of_the_log_and_ours_stay_in():
    """FAISS's loader logs, at INFO, a ModuleNotFoundError text for every CPU-specific build it cannot import;
    a user reading our INFO log must not see those, and our own INFO lines must remain."""
    code = ("from msretrieval.utils.cli import setup_logging; setup_logging(); import logging; "
            "import faiss; logging.getLogger('msretrieval.test').info('ours')")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "INFO msretrieval.test: ours" in result.stderr
    assert "faiss.loader" not in result.stderr and "ModuleNotFoundError" not in result.stderr
