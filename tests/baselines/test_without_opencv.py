"""The ``cpu`` install has no OpenCV (it is the ``baselines`` extra): every entry point must still import and
evaluate the other methods, and MSBD must say in one line which extra it needs."""
import subprocess
import sys

from tests.conftest import REPO


def run_without_opencv(code: str) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter where ``import cv2`` fails, as in an environment without the package
    (``sys.modules[name] = None`` makes ``import name`` raise ImportError)."""
    return subprocess.run([sys.executable, "-c", "import sys; sys.modules['cv2'] = None; " + code], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def test_the_catalogue_and_evaluate_import_without_opencv():
    result = run_without_opencv(
        "import runpy; sys.argv = ['evaluate.py', '--help']; "
        "from msretrieval.retrieval.evaluation.catalogue import available_methods; "
        "names = available_methods(); assert 'gem' in names and 'msbd' in names, names; "
        "runpy.run_path('scripts/evaluate.py', run_name='__main__')")
    assert result.returncode == 0, result.stderr
    assert "--method" in result.stdout


def test_msbd_without_opencv_is_one_line_naming_the_extra():
    result = run_without_opencv(
        "from msretrieval.baselines.msbd.proposals import multi_scale_boxes, create_proposer; "
        "import numpy as np; from msretrieval.utils.cli import run_cli; "
        "sys.exit(run_cli(lambda: multi_scale_boxes(np.zeros((32, 32, 3), np.uint8), create_proposer('grid'), "
        "16, (1.0,), 4)))")
    assert result.returncode == 2
    assert result.stderr == ("error: the MSBD baseline needs OpenCV (import of cv2 halted; None in sys.modules): "
                             "pip install 'msretrieval[baselines]' (opencv-contrib-python-headless)\n")
