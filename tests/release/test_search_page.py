"""The search page (release/search_page.py, scripts/serve.py) through FastAPI's TestClient on a 12-image index:
rankings equal the inner products of the stored descriptors, marks follow the labels, thumbnails are served
for index rows only, and bad queries or index directories are answered in one line."""
from __future__ import annotations

import importlib.util
import io
import re
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from msretrieval.release import load_release
from msretrieval.release.image_index import ImageIndex
from msretrieval.release.search_page import MAX_K, THUMBNAIL_SIDE, create_app
from tests.conftest import write_labelled_set

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def site(tmp_path_factory, tiny_release):
    """(client with labels, client without, index, manifest): 3 colour classes x 4 images (toy/images/cC_I.jpg)."""
    root = tmp_path_factory.mktemp("page")
    manifest = write_labelled_set(root, num_classes=3, per_class=4)
    index, _ = ImageIndex.update(root / "idx", manifest.parent / "images", load_release(tiny_release), tiny_release)
    labelled = TestClient(create_app(root / "idx", labels=manifest, top_k=4))
    plain = TestClient(create_app(root / "idx"))
    return labelled, plain, index, manifest


def row_of(index: ImageIndex, name: str) -> int:
    return [p.name for p in index.paths].index(name)


def expected_rows(index: ImageIndex, row: int, k: int, leave_out: bool) -> list[int]:
    """The ranking by hand: inner products of the stored (L2-normalised) descriptors, best first."""
    order = np.argsort(-(index.descriptors @ index.descriptors[row]), kind="stable").tolist()
    return [r for r in order if not (leave_out and r == row)][:k]


def class_of(path: str) -> int:
    """The class id write_labelled_set gives cC_I.jpg: C + 1."""
    return int(re.match(r"c(\d+)_", Path(path).name).group(1)) + 1


def test_the_page_loads_with_an_upload_form_and_the_labels_classes(site):
    labelled, plain, _, _ = site
    page = labelled.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'enctype="multipart/form-data"' in page.text and 'type="file"' in page.text
    assert "12 images" in page.text and "labels for 12 of them" in page.text
    assert re.findall(r'<option value="(\d+)">', page.text) == ["1", "2", "3"]
    assert 'class="card' not in page.text  # no query yet, no results
    assert "no labels" in plain.get("/").text and "<select" not in plain.get("/").text


def test_an_uploaded_indexed_image_finds_itself_first_then_ranks_by_inner_product(site):
    labelled, _, index, manifest = site
    row = row_of(index, "c1_2.jpg")
    data = (manifest.parent / "images" / "c1_2.jpg").read_bytes()
    answer = labelled.post("/api/search", files={"image": ("c1_2.jpg", data, "image/jpeg")}, data={"k": "5"})
    assert answer.status_code == 200, answer.text
    results = answer.json()["results"]
    assert [r["row"] for r in results] == expected_rows(index, row, 5, leave_out=False)
    assert results[0]["row"] == row and results[0]["score"] == pytest.approx(1, abs=1e-5)
    np.testing.assert_allclose([r["score"] for r in results],
                               index.descriptors[[r["row"] for r in results]] @ index.descriptors[row], atol=1e-5)
    assert [r["rank"] for r in results] == [1, 2, 3, 4, 5]
    assert all(r["correct"] is None for r in results)  # the upload's class was not given
    # the page: the query card and k result cards, each thumbnail by row
    page = labelled.post("/", files={"image": ("c1_2.jpg", data, "image/jpeg")}, data={"k": "5"})
    assert page.status_code == 200 and page.text.count('class="card') == 1 + 5
    assert re.findall(r'src="thumbnail/(\d+)"', page.text) == [str(r["row"]) for r in results]
    assert page.text.count('src="data:image/jpeg;base64,') == 1
    # the default k is the app's top_k
    default = labelled.post("/api/search", files={"image": ("q.jpg", data, "image/jpeg")})
    assert default.json()["k"] == 4 and len(default.json()["results"]) == 4


def test_picking_an_indexed_image_by_row_or_path_leaves_it_out_of_its_results(site):
    _, plain, index, _ = site
    row = row_of(index, "c2_0.jpg")
    by_row = plain.get("/api/search", params={"pick": str(row), "k": "3"}).json()
    by_path = plain.get("/api/search", params={"pick": str(index.paths[row]), "k": "3"}).json()
    assert by_row == by_path
    assert by_row["query"]["row"] == row and by_row["query"]["label"] is None
    assert [r["row"] for r in by_row["results"]] == expected_rows(index, row, 3, leave_out=True)
    page = plain.get("/", params={"pick": str(row), "k": "3"})
    assert page.status_code == 200 and page.text.count('class="card') == 1 + 3
    assert f'src="thumbnail/{row}"' in page.text  # the query's own thumbnail


def test_results_are_marked_correct_when_the_query_class_is_known(site):
    labelled, plain, index, manifest = site
    row = row_of(index, "c0_1.jpg")
    answer = labelled.get("/api/search", params={"pick": str(row), "k": "11"}).json()
    assert answer["query"]["label"] == 1
    assert [r["label"] for r in answer["results"]] == [class_of(r["path"]) for r in answer["results"]]
    assert [r["correct"] for r in answer["results"]] == [class_of(r["path"]) == 1 for r in answer["results"]]
    assert sum(r["correct"] for r in answer["results"]) == 3  # all 11 others: 3 of class 1
    page = labelled.get("/", params={"pick": str(row), "k": "11"}).text
    assert page.count('class="card correct"') == 3 and page.count('class="card wrong"') == 8
    assert "3 of 11 correct" in page
    # an upload is marked by the class the user chose for it
    data = (manifest.parent / "images" / "c2_3.jpg").read_bytes()
    upload = labelled.post("/api/search", files={"image": ("x.jpg", data, "image/jpeg")}, data={"k": "6", "label": "3"})
    results = upload.json()["results"]
    assert [r["correct"] for r in results] == [class_of(r["path"]) == 3 for r in results]
    # without labels: no labels, no marks
    unlabelled = plain.get("/api/search", params={"pick": str(row), "k": "11"}).json()["results"]
    assert {(r["label"], r["correct"]) for r in unlabelled} == {(None, None)}
    assert 'card correct' not in plain.get("/", params={"pick": str(row)}).text


def test_thumbnails_are_served_for_index_rows_only(site):
    labelled, _, index, _ = site
    answer = labelled.get("/thumbnail/0")
    assert answer.status_code == 200 and answer.headers["content-type"] == "image/jpeg"
    with Image.open(io.BytesIO(answer.content)) as thumbnail:
        assert thumbnail.size == (48, 40)  # a small image is not enlarged (THUMBNAIL_SIDE is the bound)
    assert THUMBNAIL_SIDE >= 48
    for outside in ("/thumbnail/12", "/thumbnail/-1", "/thumbnail/..%2F..%2F..%2Fetc%2Fpasswd",
                    "/thumbnail/%2e%2e/%2e%2e/etc/passwd", f"/thumbnail/{index.paths[0]}"):
        refused = labelled.get(outside)
        assert refused.status_code in (404, 422) and b"root:" not in refused.content, outside
    assert labelled.get("/thumbnail/12").json() == {"error": "no image at row 12 of this index"}
    # picking a file that is not in the index is refused too
    answer = labelled.get("/api/search", params={"pick": "/etc/passwd"})
    assert answer.status_code == 400
    assert answer.json()["error"] == "'/etc/passwd' is neither a row (0 to 11) nor an image of this index"


def test_a_bad_query_is_a_400_with_one_line(site):
    labelled, _, _, _ = site
    answer = labelled.post("/api/search", files={"image": ("notes.txt", b"not an image at all", "text/plain")})
    assert answer.status_code == 400
    assert answer.json() == {"error": "notes.txt is not a readable image (UnidentifiedImageError); "
                                      "upload a JPEG, PNG or WebP file"}
    page = labelled.post("/", files={"image": ("notes.txt", b"not an image at all", "text/plain")})
    assert page.status_code == 400 and '<div class="error">notes.txt is not a readable image' in page.text
    cases = [({"files": {"image": ("e.jpg", b"", "image/jpeg")}}, "no image uploaded: choose or drop an image file"),
             ({"data": {"k": "2"}}, "no image uploaded: choose or drop an image file")]
    for request, message in cases:
        answer = labelled.post("/api/search", **request)
        assert (answer.status_code, answer.json()) == (400, {"error": message})
    for k, message in (("0", f"k must be between 1 and {MAX_K}, got 0"),
                       ("ten", "k must be a whole number, got 'ten'")):
        answer = labelled.get("/api/search", params={"pick": "0", "k": k})
        assert (answer.status_code, answer.json()) == (400, {"error": message})
    for answer in (labelled.get("/api/search", params={"pick": "0", "k": "0"}),
                   labelled.post("/api/search", files={"image": ("n.txt", b"x", "text/plain")})):
        assert "\n" not in answer.json()["error"]


def test_serve_script_reports_a_bad_index_dir_in_one_line(tmp_path, capsys):
    from msretrieval.utils.cli import run_cli

    spec = importlib.util.spec_from_file_location("serve_script", REPO / "scripts" / "serve.py")
    serve = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(serve)
    assert run_cli(lambda: serve.main([str(tmp_path / "missing")])) == 2
    error = capsys.readouterr().err
    missing = tmp_path / "missing" / "index.json"
    assert error == f"error: {missing} not found: build the index with scripts/index.py first\n"
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "index.json").write_text("{not json")
    assert run_cli(lambda: serve.main([str(tmp_path / "broken")])) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"error: {tmp_path / 'broken'} is not a readable image index") and error.count("\n") == 1
    args = serve.parse_args(["idx"])
    assert (args.host, args.port, args.top_k, args.labels) == ("127.0.0.1", 8000, 10, None)
