#!/usr/bin/env python
"""Search an index (scripts/index.py) with query images; write the top-k as JSON and a PNG contact sheet.

    python scripts/search.py indexes/photos query1.jpg query2.jpg --k 8 --sheet sheet.png
    python scripts/search.py indexes/flowers queries/ --labels data/flowers102/labels.csv --sheet sheet.png

Queries are image files or folders of them. The release the index was built with encodes them (its path
is in the index; ``--release`` overrides it). A query that is itself in the index is left out of its own
results. With ``--labels`` (a CSV manifest with ``file`` and ``class_id`` columns, paths relative to it),
results are marked correct (same class) or not, and the JSON and the sheet say so. Prints the time per
query (encoding and search). ``--device cuda`` encodes on the GPU and searches a float index on the GPU(s) too,
which needs FAISS's CUDA build (docs/gpu.md; without it: one error line).

An index of packed codes (a hashing release) can be searched two better ways: ``--asymmetric`` scores each
query's float projection against the codes as {-1, +1} (the database stays binary, the query is not
binarised), and ``--rerank R`` (an index built with ``scripts/index.py --keep-floats``) re-ranks a shortlist of
R images found by the codes (Hamming, or asymmetric with ``--asymmetric``) by the float descriptors, read
from disk for the shortlisted images only. Scores are then those inner products. On a large index,
``--asymmetric --rerank R --fast-scan`` takes the asymmetric shortlist with FAISS's fast scan: several times
faster than the exact asymmetric scan and than a Hamming scan, and a much better shortlist of R than Hamming
distance (docs/hashing.md).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from msretrieval.release.image_index import ImageIndex, PathLabels, list_images
from msretrieval.retrieval.evaluation.contact_sheet import SheetRow, contact_sheet
from msretrieval.utils.cli import run_cli
from msretrieval.utils.errors import UserError
from msretrieval.utils.files import atomic_write_text

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
    parser.add_argument("--asymmetric", action="store_true",
                        help="binary index: score the queries' float projections against the codes (finer than "
                             "Hamming; with --rerank: the shortlist's first stage)")
    parser.add_argument("--rerank", type=int, default=None, metavar="R",
                        help="binary index built with --keep-floats: re-rank a shortlist of R by the float "
                             "descriptors on disk (at most R results a query)")
    parser.add_argument("--fast-scan", action="store_true",
                        help="with --asymmetric --rerank R: take the shortlist by FAISS's fast scan (approximate "
                             "asymmetric order, fast on large indexes)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda: encoding and FAISS search")
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
    if args.rerank is not None and args.rerank < 1:
        raise UserError(f"--rerank must be >= 1, got {args.rerank}")
    if args.fast_scan and not (args.asymmetric and args.rerank):
        raise UserError("--fast-scan takes the asymmetric shortlist of a two-stage search: it needs --asymmetric "
                        "and --rerank")
    index = ImageIndex.open(args.index, use_gpu=args.device.startswith("cuda"))
    retriever = index.load_retriever(args.release, device=args.device)
    queries = query_paths(args.queries)
    labels = PathLabels(args.labels) if args.labels else None
    query_labels = [labels.get(query) if labels else None for query in queries]
    started = time.perf_counter()
    outputs = ["projection" if args.asymmetric else "descriptor"] + (["floats"] if args.rerank else [])
    if (args.asymmetric or args.rerank) and not retriever.binary:
        raise UserError("--asymmetric and --rerank search the packed codes of a hashing release; this index holds "
                        "float descriptors, searched exactly already")
    descriptors, *floats = retriever.encode_outputs(queries, outputs, batch_size=args.batch_size)
    encoded = time.perf_counter()
    hits = index.top_k(descriptors, args.k, exclude=[str(q) for q in queries], labels=labels,
                       query_labels=query_labels, asymmetric=args.asymmetric, rerank=args.rerank,
                       query_floats=floats[0] if floats else None, fast_scan=args.fast_scan)
    searched = time.perf_counter()
    output, sheet_rows = [], []
    for q, (query, query_label) in enumerate(zip(queries, query_labels)):
        results = [{"path": hit.path, "score": round(hit.score, 6),
                    **({"label": hit.label, "correct": hit.correct} if hit.correct is not None else {})}
                   for hit in hits[q]]
        output.append({"query": str(query), **({"label": query_label} if query_label is not None else {}),
                       "results": results})
        if q < args.sheet_rows:
            correct = [hit.correct for hit in hits[q]] if query_label is not None else None
            sheet_rows.append(SheetRow(query, [Path(hit.path) for hit in hits[q]], [hit.score for hit in hits[q]],
                                       correct))
    size = len(index.meta["images"])
    timing = {"queries": len(queries), "encode_ms_per_query": 1000 * (encoded - started) / len(queries),
              "search_ms_per_query": 1000 * (searched - encoded) / len(queries), "index_size": size}
    json_path = Path(args.json) if args.json else Path(args.index) / "search.json"
    search = {"asymmetric": args.asymmetric, "rerank": args.rerank, "fast_scan": args.fast_scan}
    atomic_write_text(json_path, json.dumps({"index": str(args.index), "k": args.k, "search": search, "timing": timing,
                                             "queries": output}, indent=1))
    judged = [r["correct"] for q in output for r in q["results"][:1] if "correct" in r]
    print(f"{len(queries)} queries against {size} images: encoding {timing['encode_ms_per_query']:.1f} ms "
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
