"""--fit-on: fitted methods and whitening on a revisitop set, fitted on another set, end to end through
scripts/evaluate.py (in-process), and the refusal to fit on the benchmark's own images."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from msretrieval.data.revisitop import load_revisitop
from msretrieval.retrieval.evaluation.benchmarks import create_benchmark

from tests.conftest import TINY_MSBD

REPO = Path(__file__).resolve().parents[2]
REVISITOP_KEYS = {f"{metric}_{protocol}" for protocol in ("easy", "medium", "hard")
                  for metric in ("mAP", "mP@1", "mP@5", "mP@10")}


@pytest.fixture
def landmarks(make_revisitop_set, tmp_path, monkeypatch, one_thread):
    """Data root with ``tinya`` (the benchmark: 12 database images, 3 queries) and ``tinyb`` (the fit set:
    4 landmarks x 4 views + 20 distractors + 4 queries = 40 images, enough for 32-bit codes)."""
    make_revisitop_set("tinya", seed=0)
    root = make_revisitop_set("tinyb", seed=1, landmarks=4, views=4, distractors=20)
    config = tmp_path / "msbd_tiny.yaml"
    config.write_text(TINY_MSBD)
    monkeypatch.setenv("MSBD_CONFIG", str(config))
    return root


def _evaluate_main():
    sys.path.insert(0, str(REPO / "scripts"))
    import evaluate

    return evaluate.main


def _evaluate(root: Path, out: Path, *args: str) -> dict:
    code = _evaluate_main()(["--benchmark", "revisitop:tinya", "--data-root", str(root), "--random-init",
                             "--image-size", "96", "--batch-size", "4", "--cache-dir", "", "--out", str(out), *args])
    assert code == 0
    return json.loads(out.read_text())


def _tiny_detector(path: Path) -> Path:
    import torch

    from msretrieval.models.detector import create_detector, save_detector

    torch.manual_seed(0)
    save_detector(create_detector(pretrained=False, min_size=64, max_size=64, rpn_pre_nms_top_n_test=50,
                                  rpn_post_nms_top_n_test=20, representation_size=32, score_threshold=0.0,
                                  nms_threshold=0.4), path)
    return path


def test_every_fitted_method_runs_on_a_revisitop_set_fitted_on_another_one(landmarks, tmp_path):
    detector = _tiny_detector(tmp_path / "det.pth")
    methods = ["gem", "asmk", "r_asmk", "msbd@32", "itq@32"]
    report = _evaluate(landmarks, tmp_path / "out.json", "--fit-on", "revisitop:tinyb", "--detector", str(detector),
                       "--max-regions", "2", *[flag for name in methods for flag in ("--method", name)])
    assert report["benchmark"] == "tinya"
    results = {result["method"]: result for result in report["results"]}
    assert list(results) == methods
    fit_set = create_benchmark("revisitop:tinya", landmarks, fit_on="revisitop:tinyb").fit_set()
    for name, result in results.items():
        assert set(result["metrics"]) == REVISITOP_KEYS, name
        assert np.isfinite(list(result["metrics"].values())).all(), name
        if name == "gem":  # not fitted: no fit set to record
            assert "fit_set" not in result["config"]
            continue
        # tinyb: 4 landmark groups (queries + views) and 20 distractors with a label each -> 24 classes
        assert result["config"]["fit_set"] == {"spec": "revisitop:tinyb", "name": "tinyb", "images": 40,
                                               "classes": 24, "fingerprint": fit_set.fingerprint}, name


@pytest.mark.parametrize("kind, dims", [("lw", "8"), ("pca", None)])
def test_whitening_is_learned_on_the_fit_set_and_recorded(landmarks, tmp_path, kind, dims):
    extra = ["--whiten-dims", dims] if dims else []
    report = _evaluate(landmarks, tmp_path / "out.json", "--method", "gem", "--fit-on", "revisitop:tinyb",
                       "--whiten", kind, *extra)
    result = report["results"][0]
    assert np.isfinite(list(result["metrics"].values())).all()
    # PCA-whitening: at most N - 1 = 39 directions of the 40 fit images (1280-D GeM)
    assert result["config"]["whitening"]["kind"] == kind
    assert result["config"]["whitening"]["dims"] == (8 if dims else 39)
    assert result["config"]["whitening"]["fit_set"]["spec"] == "revisitop:tinyb"


def _error_lines(capsys, argv) -> list[str]:
    from msretrieval.utils.cli import run_cli

    main = _evaluate_main()
    assert run_cli(lambda: main(argv)) == 2
    return [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def test_fitting_on_the_benchmark_itself_is_refused_in_one_line(landmarks, capsys):
    lines = _error_lines(capsys, ["--benchmark", "revisitop:tinya", "--data-root", str(landmarks), "--method", "asmk",
                                  "--fit-on", "revisitop:tinya", "--random-init", "--cache-dir", ""])
    # all 15 images of tinya (12 database + 3 queries) are its own
    assert len(lines) == 1 and lines[0].startswith("error: the fit set revisitop:tinya shares 15 of its 15 images "
                                                   "with benchmark tinya's database and queries"), lines
    assert lines[0].endswith("; .... Fit on images the benchmark does not evaluate (another set)")


def test_a_copy_of_a_benchmark_image_under_another_name_is_refused(landmarks, tmp_path, capsys):
    """A csv fit set with one copied query image (other name, other folder) among tinyb's images."""
    tinyb = load_revisitop(landmarks, "tinyb")
    copy = tmp_path / "elsewhere" / "renamed.jpg"
    copy.parent.mkdir()
    query = load_revisitop(landmarks, "tinya").query_paths[1]
    shutil.copyfile(query, copy)
    manifest = tmp_path / "fit.csv"
    rows = [f"{path},{i % 3}" for i, path in enumerate(tinyb.database_paths)] + [f"{copy},0"]
    manifest.write_text("file,class_id\n" + "\n".join(rows) + "\n")
    lines = _error_lines(capsys, ["--benchmark", "revisitop:tinya", "--data-root", str(landmarks), "--method", "gem",
                                  "--fit-on", f"csv:{manifest}", "--whiten", "pca", "--random-init", "--cache-dir", ""])
    assert lines == [f"error: the fit set csv:{manifest} shares 1 of its 37 images with benchmark tinya's database "
                     f"and queries (by path or identical bytes): {copy} (same bytes as {query}). Fit on images the "
                     f"benchmark does not evaluate (another set)"]
    # the same set without the copy is accepted
    manifest.write_text("file,class_id\n" + "\n".join(rows[:-1]) + "\n")
    assert create_benchmark("revisitop:tinya", landmarks, fit_on=f"csv:{manifest}").fit_set().spec == f"csv:{manifest}"


def test_the_fit_set_is_in_the_cache_key_of_fitted_methods_only(landmarks, tmp_path):
    from msretrieval.retrieval.evaluation.harness import EvalSettings, _cache_keys
    from msretrieval.retrieval.descriptors.methods import RetrievalMethod

    class Fitted(RetrievalMethod):
        def needs_fit(self):
            return True

    tinyb = load_revisitop(landmarks, "tinyb")
    manifest = tmp_path / "fit.csv"
    manifest.write_text("file,class_id\n" + "".join(f"{p},0\n" for p in tinyb.database_paths))
    keys = [_cache_keys([RetrievalMethod("plain"), Fitted("fitted")],
                        create_benchmark("revisitop:tinya", landmarks, fit_on=spec), EvalSettings())
            for spec in ("revisitop:tinyb", f"csv:{manifest}")]
    assert keys[0][0] == keys[1][0]                                   # plain: the fit set does not matter
    assert keys[0][1]["database"] != keys[1][1]["database"] and keys[0][1]["query"] != keys[1][1]["query"]


def test_whitening_is_refused_for_methods_it_does_not_apply_to(landmarks):
    from msretrieval.retrieval.search.binary import HammingScores
    from msretrieval.retrieval.evaluation.harness import EvalSettings, _whiten
    from msretrieval.retrieval.descriptors.methods import RetrievalMethod

    class Fitted(RetrievalMethod):
        def needs_fit(self):
            return True

    class Codes(RetrievalMethod):
        descriptor_kind = "binary"

        def scores(self, queries, database):
            return HammingScores(queries, database)

    bench = create_benchmark("revisitop:tinya", landmarks, fit_on="revisitop:tinyb")
    rows = np.eye(3, dtype=np.float32)
    with pytest.raises(ValueError, match="whitening applies to methods that are not fitted themselves; fitted is"):
        _whiten(Fitted("fitted"), rows, rows, bench, EvalSettings(whiten="pca"), cache=None)
    codes = np.zeros((3, 2), dtype=np.uint8)
    with pytest.raises(ValueError, match="whitening applies to float descriptors ranked by inner product; method "
                                         "codes is not one"):
        _whiten(Codes("codes"), codes, codes, bench, EvalSettings(whiten="lw"), cache=None)
