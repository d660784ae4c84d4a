"""scripts/index.py --keep-floats and scripts/search.py --asymmetric / --rerank R on a tiny hashing release:
a release's query projections, the floats kept beside the codes, and the rankings the flags give."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from msretrieval.release import load_release
from msretrieval.release.export import export_release
from msretrieval.retrieval.search.binary import AsymmetricScores
from msretrieval.retrieval.search.scores import InnerProductScores

from tests.conftest import run_script
from tests.models.test_hashing_net import hashing_net


@pytest.fixture
def hashing_index(tmp_path, one_thread):
    """(release dir, photos dir, index dir built with --keep-floats, the release's model)."""
    model = hashing_net(16)
    export_release(model, tmp_path / "rel", image_size=64, graph=False)
    rng = np.random.default_rng(2)
    (tmp_path / "photos").mkdir()
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (64, 80, 3), dtype=np.uint8)).save(tmp_path / "photos" / f"{i}.png")
    return tmp_path / "rel", tmp_path / "photos", tmp_path / "idx", model


def test_release_encodes_query_projections_and_floats(hashing_index):
    release, photos, _, model = hashing_index
    retriever = load_release(release)
    images = torch.rand(3, 3, 64, 64)
    codes, projection, floats = retriever.encode_outputs(images, ("descriptor", "projection", "floats"))
    np.testing.assert_array_equal(retriever.encode_queries(images), projection)
    np.testing.assert_array_equal(retriever.encode(images, output="floats"), floats)
    mean, std = (torch.tensor(v)[:, None, None] for v in (model.preprocessing.mean, model.preprocessing.std))
    expected_projection, expected_floats = model.code_parts(torch.stack([(image - mean) / std for image in images]))
    np.testing.assert_allclose(projection, expected_projection.numpy(), atol=1e-5)
    np.testing.assert_allclose(floats, expected_floats.numpy(), atol=1e-5)
    np.testing.assert_array_equal(codes, retriever.encode(images))
    assert projection.shape == (3, 16) and floats.shape == (3, 512) and codes.shape == (3, 2)


def _results(index_dir, capsys, *flags) -> list[list[str]]:
    code, _, err = run_script("search", [index_dir, index_dir.parent / "photos", "--k", "5",
                                         "--json", index_dir / "out.json", *flags], capsys)
    assert code == 0, err
    found = json.loads((index_dir / "out.json").read_text())
    assert found["search"] == {"asymmetric": "--asymmetric" in flags,
                               "rerank": int(flags[flags.index("--rerank") + 1]) if "--rerank" in flags else None,
                               "fast_scan": "--fast-scan" in flags}
    return [[hit["path"] for hit in query["results"]] for query in found["queries"]]


def test_search_cli_scores_codes_asymmetrically_and_reranks_by_the_floats_kept(hashing_index, capsys):
    release, photos, index_dir, _ = hashing_index
    code, out, err = run_script("index", [release, photos, "--out", index_dir, "--keep-floats"], capsys)
    assert code == 0, err
    retriever = load_release(release)
    paths = sorted(str(p.resolve()) for p in photos.glob("*.png"))
    codes, projection, floats = retriever.encode_outputs(paths, ("descriptor", "projection", "floats"))
    np.testing.assert_array_equal(np.load(index_dir / "floats.npy"), floats)  # the floats on disk, by row
    assert json.loads((index_dir / "index.json").read_text())["floats"] is True

    def expected(scores) -> list[list[str]]:  # each query's ranking of the others (itself left out)
        _, rows = scores.top_k(6)
        return [[paths[r] for r in row if r != q][:5] for q, row in enumerate(rows)]

    assert _results(index_dir, capsys, "--asymmetric") == expected(AsymmetricScores(projection, codes))
    assert _results(index_dir, capsys, "--rerank", "6") == expected(InnerProductScores(floats, floats))
    assert _results(index_dir, capsys, "--rerank", "6", "--asymmetric") == expected(InnerProductScores(floats, floats))
    assert _results(index_dir, capsys, "--rerank", "6", "--asymmetric", "--fast-scan") == \
        expected(InnerProductScores(floats, floats))
    # a shortlist of 3 by FAISS's fast scan: the exact asymmetric shortlist's (no near-equal scores here)
    assert _results(index_dir, capsys, "--rerank", "3", "--asymmetric", "--fast-scan") == \
        _results(index_dir, capsys, "--rerank", "3", "--asymmetric")
    shortlisted = _results(index_dir, capsys, "--rerank", "2")  # 2 candidates, one of which may be the query
    assert all(1 <= len(hits) <= 2 for hits in shortlisted)


def test_rerank_needs_an_index_that_kept_its_floats(hashing_index, capsys):
    release, photos, index_dir, _ = hashing_index
    assert run_script("index", [release, photos, "--out", index_dir], capsys)[0] == 0
    code, _, err = run_script("search", [index_dir, photos, "--rerank", "3"], capsys)
    assert code != 0 and "keeps no float descriptors to re-rank with" in err and "--keep-floats" in err
    code, _, err = run_script("index", [release, photos, "--out", index_dir, "--keep-floats"], capsys)
    assert code != 0 and "float setting" in err


@pytest.mark.parametrize("flags", [["--fast-scan"], ["--fast-scan", "--rerank", "2"], ["--fast-scan", "--asymmetric"]])
def test_fast_scan_without_its_two_stage_search_is_one_clear_error(hashing_index, capsys, flags):
    release, photos, index_dir, _ = hashing_index
    code, _, err = run_script("search", [index_dir, photos, *flags], capsys)
    assert code == 2 and err.strip().splitlines()[-1].endswith("--fast-scan takes the asymmetric shortlist of a "
                                                               "two-stage search: it needs --asymmetric and --rerank")
