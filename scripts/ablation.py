#!/usr/bin/env python
"""Run train.py once per variant of a config and print one table (validation mAP, test mAP and R@1,
training minutes).

    python scripts/ablation.py                          # the rows of docs/training.md (configs/main.yaml)
    python scripts/ablation.py --variant "gem: model.architecture=gem" --variant "K16: model.head.num_clusters=16"

Each variant is ``NAME: override override ...`` applied to ``--config`` (default: the main job). The
baselines are left out of the variants' final evaluations (they do not change); every run gets its own run
directory under ``--out`` and its results.json is read back. Runs one after another: each uses the whole
machine, and the training minutes are only comparable when nothing else runs.
"""
from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
from msretrieval.utils.cli import run_cli
from msretrieval.utils.errors import UserError

DEFAULT_VARIANTS = [
    "main job (configs/main.yaml):",
    "no cross-batch memory: mining.memory=0",
    "memory 1024: mining.memory=1024",
    "all blocks trained: model.trainable=[all]",
    "descriptor at scale 1: eval.scales=[1.0]",
    "descriptor at 3 scales: eval.scales=[1.0,0.7071,1.4142]",
    "gem: model.architecture=gem",
    "netvlad: model.architecture=netvlad",
    "algorithm1: mining.miner=algorithm1 mining.memory=0",
    "semihard: mining.miner=semihard",
    "hard: mining.miner=hard",
    "train 128 px: data.train_size=128",
    "train 192 px: data.train_size=192",
]


def parse_variant(text: str) -> tuple[str, list[str]]:
    name, sep, overrides = text.partition(":")
    if not sep or not name.strip():
        raise UserError(f"a variant is 'NAME: key=value ...', got {text!r}")
    return name.strip(), shlex.split(overrides)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO / "configs" / "main.yaml"))
    parser.add_argument("--variant", action="append",
                        help="NAME: overrides (repeatable; default: the ablation of docs/training.md)")
    parser.add_argument("--out", default="runs/ablation", help="parent folder of the runs")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--table", default=None, help="also write the markdown table to this file")
    parser.add_argument("overrides", nargs="*", help="overrides applied to every variant")
    args = parser.parse_intermixed_args(argv)
    rows = []
    for text in args.variant or DEFAULT_VARIANTS:
        name, overrides = parse_variant(text)
        run_dir = Path(args.out) / "".join(c if c.isalnum() else "-" for c in name).strip("-")
        command = [sys.executable, str(REPO / "train.py"), "--config", args.config, "--run-dir", str(run_dir),
                   "eval.baselines=[]", *args.overrides, *overrides]
        if args.data_root:
            command += ["--data-root", args.data_root]
        print(f"== {name}: {' '.join(overrides) or '(config as is)'}", flush=True)
        if subprocess.run(command, cwd=REPO).returncode != 0:
            rows.append((name, None, None, None, None))
            continue
        # train.py never reuses a directory: the run is the newest folder with this name
        candidates = sorted(Path(run_dir).parent.glob(Path(run_dir).name + "*"), key=lambda p: p.stat().st_mtime)
        results = json.loads((candidates[-1] / "results.json").read_text())
        metrics = results["results"][-1]["metrics"]
        minutes = results["training"]["train_seconds"] / 60
        rows.append((name, results["training"]["best_validation_mAP"], metrics["mAP"], metrics["R@1"], minutes))
    table = ["| variant | validation mAP (best) | test mAP | test R@1 | training min |", "|---|---|---|---|---|"]
    for name, val, mean_ap, recall, minutes in rows:
        cells = ["failed"] * 4 if mean_ap is None else [
            "-" if val is None else f"{val:.4f}", f"{mean_ap:.4f}", f"{recall:.4f}", f"{minutes:.1f}"]
        table.append(f"| {name} | " + " | ".join(cells) + " |")
    print("\n".join(table))
    if args.table:
        Path(args.table).write_text("\n".join(table) + "\n")
    return 0 if all(row[2] is not None for row in rows) else 1


if __name__ == "__main__":
    sys.exit(run_cli(main))
