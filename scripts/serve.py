#!/usr/bin/env python
"""Serve a search page over an image index (scripts/index.py): drop or upload a query, see the top-k.

    python scripts/serve.py indexes/photos                                   # http://127.0.0.1:8000/
    python scripts/serve.py indexes/flowers --labels data/flowers102/labels.csv --top-k 12 --port 8080

The page shows the top-k with scores and thumbnails; open ``/?pick=ROW`` (or click a result) to search with an
indexed image, which is left out of its own results. With ``--labels`` (a CSV manifest with ``file`` and
``class_id`` columns, as for scripts/search.py) results are marked correct (the query's class) or not; an
upload's class can be chosen on the page. Needs the ``demo`` packages: fastapi, uvicorn, python-multipart.
Listens on 127.0.0.1 only unless ``--host`` says otherwise: the page serves thumbnails of every indexed image.
"""
from __future__ import annotations

import argparse
import logging
import sys

from msretrieval.utils.cli import positive_int, run_cli
from msretrieval.utils.errors import UserError

log = logging.getLogger("serve")

DEMO_PACKAGES = ("fastapi", "uvicorn", "multipart", "python_multipart")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("index", help="index directory made by scripts/index.py")
    parser.add_argument("--labels", default=None, help="CSV manifest (file, class_id) to mark results correct")
    parser.add_argument("--top-k", type=positive_int, default=10, help="results per query (default 10)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=positive_int, default=8000, help="port (default 8000)")
    parser.add_argument("--release", default=None, help="encode uploads with this release instead of the index's")
    parser.add_argument("--device", default="cpu")
    return parser.parse_args(argv)


def build_app(args: argparse.Namespace):
    try:
        from msretrieval.release.search_page import create_app
    except ModuleNotFoundError as error:
        if (error.name or "").split(".")[0] not in DEMO_PACKAGES:
            raise
        raise UserError(f"the search page needs {error.name}: pip install fastapi uvicorn python-multipart") from None
    return create_app(args.index, labels=args.labels, top_k=args.top_k, release=args.release, device=args.device)


def main(argv=None) -> int:
    args = parse_args(argv)
    app = build_app(args)  # a bad index, release or manifest stops here, in one line, before the server starts
    import uvicorn

    log.info("search page on http://%s:%d/", args.host, args.port)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
