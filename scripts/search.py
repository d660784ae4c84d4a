#!/usr/bin/env python
"""Search an index (scripts/index.py) with query images; write the top-k as JSON and a PNG contact sheet.

    python scripts/search.py indexes/photos query1.jpg query2.jpg --k 8 --sheet sheet.png
    python scripts/search.py indexes/flowers queries/ --labels data/flowers102/labels.csv --sheet sheet.png

Queries are image files or folders of them. The release the index was built with encodes them (its path
is in the index; ``--release`` overrides it). A query that is itself in the index is left out of its own
results. With ``--labels`` (a CSV manifest with ``file`` and ``class_id`` columns, paths relative to it),
results are marked correct (same class) or not, and the JSON and the sheet say so. Prints the time per
query (encoding and search).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from msretrieval.data.manifest import read_csv_manifest
from msretrieval.release import load_release
from msretrieval.release.image_index import ImageIndex, list_images
from msretrieval.retrieval.evaluation.contact_sheet import SheetRow, contact_sheet
from msretrieval.utils.cli import run_cli
from msretrieval.utils.errors import UserError

log = logging.getLogger("search")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("index", help="index directory made by scripts/index.py")
    parser.add_argument("queries", nargs="+", help="query image files or folders")
    parser.add_argument("--k", type=int, default=10, help="results per query (default 10)")
    parser.add_argument("--json", default=None, help="write the results here (default: INDEX/search.json)")
    parser.add_argument("--sheet", default=None, help="write a PNG contact sheet here")
    parser.add_argument("--sheet-rows", type=int, default=12, help="queries drawn on the sheet (default 12)")
    parser.add_argument("--labels", default=None, help="CSV manifest (file, class_id) to mark results correct")
    parser.add_argument("--release", default=None, help="encode queries with this release instead of the index's")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    return parser.parse_args(argv)


def query_paths(items: list[str]) -> list[Path]:
    paths = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            paths += list_images(path)
        elif path.is_file():
            paths.append(path.resolve())
        else:
            raise FileNotFoundError(f"query not found: {item}")
    return paths


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.k < 1:
        raise UserError(f"--k must be >= 1, got {args.k}")
    index = ImageIndex.open(args.index)
    retriever = load_release(args.release or index.meta["release"], device=args.device)
    if retriever.config["weights_sha256"] != index.meta["weights_sha256"]:
        raise UserError(f"the release's weights differ from those {args.index} was built with")
    queries = query_paths(args.queries)
    labels = {}
    if args.labels:
        manifest = read_csv_manifest(args.labels)
        labels = {str(p.resolve()): int(label) for p, label in zip(manifest.paths, manifest.labels)}
    started = time.perf_counter()
    descriptors = retriever.encode(queries, batch_size=args.batch_size)
    encoded = time.perf_counter()
    scores, rows = index.search(descriptors, args.k + 1)  # one more: the query itself may be in the index
    searched = time.perf_counter()
    paths = [str(p) for p in index.paths]
    output, sheet_rows = [], []
    for q, query in enumerate(queries):
        hits = [(paths[r], float(s)) for s, r in zip(scores[q], rows[q]) if r >= 0 and paths[r] != str(query)]
        hits = hits[:args.k]
        query_label = labels.get(str(query))
        results = []
        for path, score in hits:
            entry = {"path": path, "score": round(score, 6)}
            if query_label is not None and path in labels:
                entry.update(label=labels[path], correct=labels[path] == query_label)
            results.append(entry)
        output.append({"query": str(query), **({"label": query_label} if query_label is not None else {}),
                       "results": results})
        if q < args.sheet_rows:
            correct = [r.get("correct") for r in results] if query_label is not None else None
            sheet_rows.append(SheetRow(query, [Path(p) for p, _ in hits], [s for _, s in hits], correct))
    timing = {"queries": len(queries), "encode_ms_per_query": 1000 * (encoded - started) / len(queries),
              "search_ms_per_query": 1000 * (searched - encoded) / len(queries), "index_size": len(paths)}
    json_path = Path(args.json) if args.json else Path(args.index) / "search.json"
    json_path.write_text(json.dumps({"index": str(args.index), "k": args.k, "timing": timing, "queries": output},
                                    indent=1))
    judged = [r["correct"] for q in output for r in q["results"][:1] if "correct" in r]
    print(f"{len(queries)} queries against {len(paths)} images: encoding {timing['encode_ms_per_query']:.1f} ms "
          f"and search {timing['search_ms_per_query']:.2f} ms per query; results in {json_path}"
          + (f"; top-1 correct {sum(judged) / len(judged):.3f} ({len(judged)} labelled queries)" if judged else ""))
    if args.sheet:
        print(f"contact sheet: {contact_sheet(sheet_rows, args.sheet)}")
    return 0


def cli() -> int:
    """Console entry point."""
    return run_cli(main)


if __name__ == "__main__":
    sys.exit(cli())
