"""The search page: a small web app over an image index (``scripts/serve.py INDEX_DIR``).

One page. The user drops or uploads a query image, or picks an image of the index by its row or path
(``/?pick=17``), and sees the top-k with scores and thumbnails; with labels (a CSV manifest, as for
``scripts/search.py --labels``) each result is marked correct (the query's class) or not. A picked image is
searched with its stored descriptor and left out of its own results, as ``scripts/search.py`` does; an upload is
decoded like any indexed image (``data.images.load_image``) and encoded with the index's release.

Routes: ``GET /`` (the page; ``pick`` and ``k``), ``POST /`` (an upload: ``image``, optional ``k`` and
``label``), the same two under ``/api/search`` answering JSON, and ``GET /thumbnail/{row}``. Thumbnails are
addressed by index row, never by path, so nothing but the index's images can be served. A bad query is a 400
with one line saying what is wrong. :func:`create_app` builds the app without a server (tests use FastAPI's
``TestClient``); opening a bad index directory raises the index's one-line ``UserError``.
"""
from __future__ import annotations

import base64
import functools
import html
import io
import logging
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, File, Form, UploadFile
from fastapi.responses import HTMLResponse, JSONResponse, Response
from PIL import Image
from starlette.concurrency import run_in_threadpool

from msretrieval.data.images import ImageLoadError, load_image
from msretrieval.utils.errors import UserError

from .image_index import Hit, ImageIndex, PathLabels

log = logging.getLogger(__name__)

MAX_K = 100
MAX_UPLOAD_BYTES = 32 * 2**20
THUMBNAIL_SIDE = 224


class QueryError(UserError):
    """A query the page cannot run (not an image, an unknown row, a bad k): answered 400 with this line."""


@dataclass
class Query:
    """What was searched: an indexed image (``row``, ``path``) or an upload (``name``, its thumbnail inline)."""

    name: str
    thumbnail_url: str
    row: int | None = None
    path: str | None = None
    label: int | None = None


class SearchPage:
    """The index, the release that encodes uploads, the labels, and the searches the routes run."""

    def __init__(self, index_dir: str | Path, labels: str | Path | None = None, top_k: int = 10,
                 release: str | Path | None = None, device: str = "cpu"):
        if not 1 <= top_k <= MAX_K:
            raise UserError(f"--top-k must be between 1 and {MAX_K}, got {top_k}")
        self.index = ImageIndex.open(index_dir)
        self.retriever = self.index.load_retriever(release, device=device)
        self.labels = PathLabels(labels) if labels else None
        self.top_k = top_k
        self.images = self.index.meta["images"]
        self.rows_by_path = {entry["path"]: row for row, entry in enumerate(self.images)}
        known = [label for label in map(self.labels.get, self.rows_by_path) if label is not None] if labels else []
        self.labelled, self.classes = len(known), set(known)  # the page offers the indexed classes for an upload
        self.lock = threading.Lock()  # one encoding at a time: the server's worker threads share the model
        self.thumbnail = functools.lru_cache(maxsize=1024)(self._thumbnail)

    # -- queries -----------------------------------------------------------------------------------------------
    def parse_k(self, text: str | None) -> int:
        if text is None or not text.strip():
            return self.top_k
        try:
            k = int(text)
        except ValueError:
            raise QueryError(f"k must be a whole number, got {text!r}") from None
        if not 1 <= k <= MAX_K:
            raise QueryError(f"k must be between 1 and {MAX_K}, got {k}")
        return k

    def pick(self, item: str, k: int) -> tuple[Query, list[Hit]]:
        """Search with an indexed image, given by its row or its path; it is left out of its own results."""
        item = item.strip()
        row = int(item) if item.isdigit() else self.rows_by_path.get(str(Path(item).resolve()))
        if row is None or not 0 <= row < len(self.images):
            raise QueryError(f"{item!r} is neither a row (0 to {len(self.images) - 1}) nor an image of this index")
        path = self.images[row]["path"]
        label = self.labels.get(path) if self.labels else None
        hits = self.index.top_k(self.index.descriptors[row:row + 1], k, exclude=[path], labels=self.labels,
                                query_labels=[label])[0]
        return Query(Path(path).name, f"thumbnail/{row}", row, path, label), hits

    def upload(self, data: bytes, filename: str | None, k: int, label: int | None) -> tuple[Query, list[Hit]]:
        """Search with an uploaded image; ``label``: its class, if the user gave it (marks the results)."""
        name = Path(filename).name if filename else "the upload"
        if not data:
            raise QueryError("no image uploaded: choose or drop an image file")
        if len(data) > MAX_UPLOAD_BYTES:
            raise QueryError(f"{name} is larger than {MAX_UPLOAD_BYTES >> 20} MB")
        image = decode_image(data, name)
        with self.lock:
            descriptor = self.retriever.encode(image)
        hits = self.index.top_k(descriptor, k, labels=self.labels, query_labels=[label])[0]
        return Query(name, "data:image/jpeg;base64," + base64.b64encode(jpeg_thumbnail(image)).decode()), hits

    def _thumbnail(self, row: int) -> bytes | None:
        """A JPEG thumbnail of index row ``row``, or None (not a row, or its file is no longer readable)."""
        if not 0 <= row < len(self.images):
            return None
        try:
            return jpeg_thumbnail(load_image(self.images[row]["path"]))
        except ImageLoadError as error:
            log.warning("thumbnail of row %d: %s", row, error)
            return None

    # -- answers -----------------------------------------------------------------------------------------------
    def as_json(self, query: Query, hits: list[Hit], k: int) -> dict:
        names = self.labels.names if self.labels else {}
        return {"query": {"name": query.name, "row": query.row, "path": query.path, "label": query.label,
                          "class_name": names.get(query.label)},
                "k": k, "results": [{"rank": rank, "row": hit.row, "path": hit.path, "score": hit.score,
                                     "label": hit.label, "class_name": names.get(hit.label), "correct": hit.correct}
                                    for rank, hit in enumerate(hits, 1)]}

    def render(self, k: int, query: Query | None = None, hits: list[Hit] | None = None,
               error: str | None = None) -> str:
        return render_page(self, k, query, hits or [], error)


def parse_label(text: str | None) -> int | None:
    """The query's class id from the form (empty: unknown)."""
    if text is None or not text.strip():
        return None
    try:
        return int(text)
    except ValueError:
        raise QueryError(f"the query's class must be a class id (a whole number), got {text!r}") from None


def decode_image(data: bytes, name: str) -> Image.Image:
    """An upload as an upright RGB image, read by the same code as indexed images (EXIF, modes, truncation);
    not an image -> :class:`QueryError`."""
    with tempfile.NamedTemporaryFile(suffix=".upload") as handle:
        handle.write(data)
        handle.flush()
        try:
            return load_image(handle.name)
        except ImageLoadError as error:
            reason = (error.reason or "unreadable").split(":")[0]
            raise QueryError(f"{name} is not a readable image ({reason}); upload a JPEG, PNG or WebP file") from None


def jpeg_thumbnail(image: Image.Image) -> bytes:
    image = image.copy()
    image.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()


def create_app(index_dir: str | Path, labels: str | Path | None = None, top_k: int = 10,
               release: str | Path | None = None, device: str = "cpu") -> FastAPI:
    """The search page over ``index_dir`` (made by ``scripts/index.py``); ``labels``: a CSV manifest."""
    page = SearchPage(index_dir, labels=labels, top_k=top_k, release=release, device=device)
    app = FastAPI(title="msretrieval search", docs_url=None, redoc_url=None)
    app.state.page = page

    def run(search, as_json: bool, k_text: str | None) -> Response:
        k = page.top_k
        try:
            k = page.parse_k(k_text)
            query, hits = search(k)
        except QueryError as error:
            if as_json:
                return JSONResponse({"error": str(error)}, status_code=400)
            return HTMLResponse(page.render(k, error=str(error)), status_code=400)
        if as_json:
            return JSONResponse(page.as_json(query, hits, k))
        return HTMLResponse(page.render(k, query, hits))

    def picked(item: str | None, k: str | None, as_json: bool) -> Response:
        if item is None:
            if as_json:
                return JSONResponse({"error": "give ?pick=ROW or ?pick=PATH, or POST an image"}, status_code=400)
            return HTMLResponse(page.render(page.top_k))
        return run(lambda k_: page.pick(item, k_), as_json, k)

    async def uploaded(image: UploadFile | None, k: str | None, label: str | None, as_json: bool) -> Response:
        data = await image.read(MAX_UPLOAD_BYTES + 1) if image is not None else b""
        filename = image.filename if image is not None else None
        # encoding takes a while: off the event loop, so the page's thumbnails keep loading meanwhile
        return await run_in_threadpool(run, lambda k_: page.upload(data, filename, k_, parse_label(label)), as_json, k)

    @app.get("/", response_class=HTMLResponse)
    def page_get(pick: str | None = None, k: str | None = None) -> Response:
        return picked(pick, k, False)

    @app.post("/", response_class=HTMLResponse)
    async def page_post(image: UploadFile | None = File(None), k: str | None = Form(None),
                        label: str | None = Form(None)) -> Response:
        return await uploaded(image, k, label, False)

    @app.get("/api/search")
    def api_get(pick: str | None = None, k: str | None = None) -> Response:
        return picked(pick, k, True)

    @app.post("/api/search")
    async def api_post(image: UploadFile | None = File(None), k: str | None = Form(None),
                       label: str | None = Form(None)) -> Response:
        return await uploaded(image, k, label, True)

    @app.get("/thumbnail/{row}")
    def thumbnail(row: int) -> Response:
        data = page.thumbnail(row)
        if data is None:
            return JSONResponse({"error": f"no image at row {row} of this index"}, status_code=404)
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})

    return app


# -- the page ------------------------------------------------------------------------------------------------
STYLE = """
body { font-family: system-ui, sans-serif; margin: 0; background: #f4f5f7; color: #1d2330; }
header { background: #1d2330; color: #fff; padding: 12px 24px; display: flex; align-items: baseline; gap: 16px; }
header h1 { font-size: 20px; margin: 0; } header span { color: #b8c0d0; font-size: 13px; }
main { padding: 16px 24px; }
.controls { display: flex; gap: 16px; flex-wrap: wrap; align-items: stretch; }
#drop { flex: 1 1 320px; border: 2px dashed #8a94a8; border-radius: 8px; padding: 18px; text-align: center;
        background: #fff; cursor: pointer; }
#drop.over { border-color: #2f6fdf; background: #eef3fd; }
#drop input[type=file] { display: none; }
form.box { background: #fff; border-radius: 8px; padding: 14px 18px; display: flex; gap: 8px; align-items: center;
           flex-wrap: wrap; border: 1px solid #dde1e8; }
input, select, button { font: inherit; padding: 4px 8px; }
input.k { width: 4em; }
.error { background: #fde8e8; border: 1px solid #d33; color: #8a1414; padding: 8px 12px; border-radius: 6px;
         margin-top: 14px; }
.summary { margin: 18px 0 8px; font-size: 15px; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(170px, 1fr)); gap: 12px; }
.card { background: #fff; border: 3px solid #dde1e8; border-radius: 8px; padding: 6px; font-size: 13px;
        overflow: hidden; }
.card.query { border-color: #2f6fdf; }
.card.correct { border-color: #1e9e4a; } .card.wrong { border-color: #d33; }
.card .thumb { height: 150px; display: flex; align-items: center; justify-content: center; background: #eef0f3; }
.card img { max-width: 100%; max-height: 150px; }
.card .line { display: flex; justify-content: space-between; gap: 6px; margin-top: 4px; }
.card .name { color: #5a6478; white-space: nowrap; overflow: hidden; text-overflow: ellipsis; }
.mark { font-weight: bold; font-size: 16px; line-height: 1; }
.correct .mark { color: #1e9e4a; } .wrong .mark { color: #d33; }
"""

SCRIPT = """
const zone = document.getElementById('drop'), input = document.getElementById('image');
zone.addEventListener('dragover', e => { e.preventDefault(); zone.classList.add('over'); });
zone.addEventListener('dragleave', () => zone.classList.remove('over'));
zone.addEventListener('drop', e => { e.preventDefault(); input.files = e.dataTransfer.files; input.form.submit(); });
input.addEventListener('change', () => input.form.submit());
"""


def render_page(page: SearchPage, k: int, query: Query | None, hits: list[Hit], error: str | None) -> str:
    esc = html.escape
    names = page.labels.names if page.labels else {}
    meta = page.index.meta
    about = (f"{len(page.images):,} images · {Path(meta['release']).name} ({page.retriever.dim}"
             f"{' bytes' if page.retriever.binary else '-d'}) · "
             + (f"labels for {page.labelled:,} of them" if page.labels else "no labels"))
    label_field = ""
    if page.labels:
        options = "".join(f'<option value="{c}">{esc(names.get(c, str(c)))}</option>'
                          for c in sorted(page.classes, key=lambda c: (names.get(c, ""), c)))
        label_field = (f'<select name="label" title="the query\'s class, to mark the results">'
                       f'<option value="">class: unknown</option>{options}</select>')
    parts = [f"""<!doctype html><html lang="en"><head><meta charset="utf-8"><title>Image search</title>
<meta name="viewport" content="width=device-width, initial-scale=1"><style>{STYLE}</style></head><body>
<header><h1>Image search</h1><span>{esc(about)}</span></header><main>
<div class="controls">
<form id="upload" method="post" action="./" enctype="multipart/form-data" class="box" style="flex: 1 1 360px">
<label id="drop" for="image">Drop a query image here, or click to choose one
<input type="file" id="image" name="image" accept="image/*"></label>
{label_field}<label>k <input class="k" name="k" value="{k}"></label></form>
<form method="get" action="./" class="box" style="flex: 1 1 360px"><label>or an indexed image, by row or path
<input name="pick" size="24" placeholder="0 to {len(page.images) - 1}"></label>
<input type="hidden" name="k" value="{k}"><button>Search</button></form>
</div>"""]
    if error:
        parts.append(f'<div class="error">{esc(error)}</div>')
    if query is not None:
        judged = [hit.correct for hit in hits if hit.correct is not None]
        tally = f" · {sum(judged)} of {len(judged)} correct" if judged else ""
        parts.append(f'<div class="summary">Top {len(hits)} for <b>{esc(query.name)}</b>{tally}</div>'
                     '<div class="grid">')
        parts.append(card("query", query.thumbnail_url, "query", query.name,
                          names.get(query.label, _label(query.label)), title=query.path or query.name))
        for rank, hit in enumerate(hits, 1):
            state = {True: "correct", False: "wrong", None: ""}[hit.correct]
            mark = {True: "✓", False: "✗", None: ""}[hit.correct]
            parts.append(card(state, f"thumbnail/{hit.row}", f"#{rank} · {hit.score:.4f}", Path(hit.path).name,
                              names.get(hit.label, _label(hit.label)), mark=mark, link=f"./?pick={hit.row}&k={k}",
                              title=hit.path))
        parts.append("</div>")
    parts.append(f"</main><script>{SCRIPT}</script></body></html>")
    return "".join(parts)


def _label(label: int | None) -> str:
    return "" if label is None else f"class {label}"


def card(state: str, image_url: str, heading: str, name: str, class_name: str, mark: str = "",
         link: str | None = None, title: str = "") -> str:
    esc = html.escape
    image = f'<img src="{esc(image_url)}" alt="{esc(name)}">'
    if link:
        image = f'<a href="{esc(link)}" title="search with this image">{image}</a>'
    return (f'<div class="card {state}" title="{esc(title)}"><div class="thumb">{image}</div>'
            f'<div class="line"><b>{esc(heading)}</b><span class="mark">{mark}</span></div>'
            f'<div class="line"><span class="name">{esc(name)}</span><span>{esc(class_name)}</span></div></div>')


__all__ = ["QueryError", "SearchPage", "create_app"]
