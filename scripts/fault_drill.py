#!/usr/bin/env python
"""Fault drill: a training run with corrupt images, killed with SIGKILL at random moments and resumed each
time, must end where an undisturbed run on the same images ends.

    python scripts/fault_drill.py --data-root ../shared/data --out runs/fault-drill
    python scripts/fault_drill.py --data-root ../shared/data --out /tmp/drill train.steps=100   # quicker

1. A CSV manifest of the config's training set (``data.train``) in which ``--corrupt-fraction`` of the images
   (drawn only from the classes that train, never the validation classes, whose evaluation is strict) point
   to damaged copies under OUT/corrupt: cut in half, random bytes, a text file named .jpg, an empty file, a
   JPEG header followed by garbage; the drill checks that each really fails to load.
2. The undisturbed run: ``train.py`` with that manifest (``data.max_bad_fraction`` raised above the injected
   fraction), to the end and its final evaluation (the trained model only; baselines off).
3. The disturbed run, the same command: killed with SIGKILL (the whole process group) ``--kills`` times, at
   moments drawn uniformly from ``--kill-window`` times the undisturbed run's wall time on the disturbed run's
   own clock (restarts included; a resumed segment is shorter than the whole run, so delays drawn per segment
   could outlast it), and resumed each time with ``train.py --resume`` (restarted from scratch when the kill
   came before its first checkpoint); then left to finish.
4. The report (printed, and OUT/drill.json; ``--report-only`` prints it again from OUT/progress.json): final test metrics of both runs, the best validation mAP, the
   unreadable-image count of each against the injected count. Passes when every final metric is within
   ``--tolerance`` (0.005) and both counts equal the injected count; the exit code says which.

Everything the runs write stays under OUT (undisturbed/, disturbed/, logs); pass config overrides
(``key.sub=value``) after the options, e.g. a shorter ``train.steps`` for a quick check.
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
from msretrieval.data.images import ImageLoadError, load_image
from msretrieval.data.roots import resolve_data_root
from msretrieval.training.checkpoint import load_resumable
from msretrieval.training.config import DEFAULT_CONFIG, resolve_config
from msretrieval.training.data import load_training_set, split_validation_classes
from msretrieval.utils.cli import positive_int, run_cli
from msretrieval.utils.errors import UserError

log = logging.getLogger("fault_drill")

#: How a copy of an image is damaged (cycled over the chosen images); each must make ``load_image`` fail.
CORRUPTIONS = {
    "truncated": lambda data, rng: data[: len(data) // 2],
    "random_bytes": lambda data, rng: rng.integers(0, 256, len(data), dtype=np.uint8).tobytes(),
    "not_an_image": lambda data, rng: b"this is not a JPEG\n",
    "empty": lambda data, rng: b"",
    "garbage_body": lambda data, rng: data[:2] + rng.integers(0, 256, len(data) - 2, dtype=np.uint8).tobytes(),
}
METRICS = ("mAP", "mAP@R", "R@1", "R@2", "R@4", "R@8")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="training config (default: the main job's)")
    parser.add_argument("--data-root", default=None, help="data sets root (default: $DATA_ROOT, else ./data)")
    parser.add_argument("--out", default="runs/fault-drill", help="folder for the manifest, damaged copies, runs")
    parser.add_argument("--corrupt-fraction", type=float, default=0.05, help="training images damaged")
    parser.add_argument("--kills", type=positive_int, default=5, help="SIGKILLs of the disturbed run")
    parser.add_argument("--kill-window", type=float, nargs=2, default=(0.05, 0.8), metavar=("LOW", "HIGH"),
                        help="kill moments U(LOW, HIGH) x the undisturbed run's wall time, counted from the "
                             "disturbed run's first start")
    parser.add_argument("--tolerance", type=float, default=0.005, help="largest final-metric difference allowed")
    parser.add_argument("--seed", type=int, default=0, help="which images are damaged and when kills come")
    parser.add_argument("--report-only", action="store_true", help="compare the finished runs under --out again")
    parser.add_argument("overrides", nargs="*", help="config overrides key.sub=value for both runs")
    args = parser.parse_intermixed_args(argv)
    if not 0 < args.corrupt_fraction < 0.5:
        raise UserError(f"--corrupt-fraction must lie in (0, 0.5), got {args.corrupt_fraction}")
    low, high = args.kill_window
    if not 0 < low <= high:
        raise UserError(f"--kill-window needs 0 < LOW <= HIGH, got {low} {high}")
    return args


def corrupt_manifest(config: dict, data_root: Path, out: Path, fraction: float, seed: int
                     ) -> tuple[Path, list[str]]:
    """OUT/train.csv: the training set with ``fraction`` of its images replaced by damaged copies (training
    classes only). Returns (manifest, damaged paths)."""
    images = load_training_set(config["data"]["train"], data_root)
    fit, _ = split_validation_classes(images, config["data"]["val_classes"], int(config["seed"]))
    fit_paths = set(map(str, fit.paths))
    candidates = [i for i, path in enumerate(images.paths) if str(path) in fit_paths]
    count = round(fraction * len(images))
    rng = np.random.default_rng(seed)
    chosen = sorted(rng.choice(candidates, size=count, replace=False).tolist())
    damaged_dir = (out / "corrupt").resolve()  # the manifest's relative paths would be read from its folder
    damaged_dir.mkdir(parents=True, exist_ok=True)
    paths = [str(Path(p).resolve()) for p in images.paths]
    damaged = []
    kinds = list(CORRUPTIONS)
    for n, index in enumerate(chosen):
        kind = kinds[n % len(kinds)]
        source = Path(paths[index])
        target = damaged_dir / f"{kind}-{source.name}"
        target.write_bytes(CORRUPTIONS[kind](source.read_bytes(), rng))
        try:
            load_image(target)
        except ImageLoadError:
            pass
        else:
            raise RuntimeError(f"{target} ({kind}) still loads: the drill would not inject what it claims")
        paths[index] = str(target)
        damaged.append(str(target))
    manifest = out / "train.csv"
    with manifest.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file", "class_id", "split"])
        writer.writerows((path, int(label), "train") for path, label in zip(paths, images.labels))
    log.info("%d of %d training images damaged (%s), manifest %s", len(damaged), len(images),
             ", ".join(kinds), manifest)
    return manifest, damaged


def train_command(args, run_dir: Path, manifest: Path, resume: bool) -> list[str]:
    # the undisturbed and the disturbed run get the same overrides; resuming keeps the saved config
    overrides = [f"data.train=csv:{manifest}:train",
                 f"data.max_bad_fraction={min(0.5, 2 * args.corrupt_fraction):.4f}", "eval.baselines=[]",
                 *args.overrides]
    common = [sys.executable, str(REPO / "train.py")]
    if args.data_root:
        common += ["--data-root", str(args.data_root)]
    if resume:
        return [*common, "--resume", str(run_dir)]
    return [*common, "--config", args.config, "--run-dir", str(run_dir), *overrides]


def start(command: list[str], log_path: Path) -> subprocess.Popen:
    handle = log_path.open("a")
    handle.write(f"\n$ {' '.join(command)}\n")
    handle.flush()
    # its own process group: the kill reaches image-loading threads and any child process at once
    return subprocess.Popen(command, cwd=REPO, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)


def finish(process: subprocess.Popen, what: str, log_path: Path) -> None:
    if process.wait() != 0:
        raise RuntimeError(f"{what} failed with exit code {process.returncode}; see {log_path}")


def checkpoint_step(run_dir: Path) -> int | None:
    """The step ``--resume`` would continue from, or None when no checkpoint loads."""
    try:
        return int(load_resumable(run_dir)[2]["step"])
    except (FileNotFoundError, ValueError):
        return None


def disturbed_run(args, run_dir: Path, manifest: Path, undisturbed_seconds: float, log_path: Path,
                  out: Path) -> list[dict]:
    """The run killed ``args.kills`` times and resumed; returns what each kill hit."""
    rng = np.random.default_rng(args.seed + 1)
    # the kill moments on the disturbed run's own clock (restarts included): it needs at least the undisturbed
    # run's time to finish, so every moment before that time comes before the run can end
    moments = np.sort(rng.uniform(*args.kill_window, size=args.kills)) * undisturbed_seconds
    began = time.monotonic()
    kills = []
    resume = False
    while True:
        process = start(train_command(args, run_dir, manifest, resume), log_path)
        if len(kills) == args.kills:
            finish(process, "the disturbed run's last segment", log_path)
            return kills
        delay = max(float(moments[len(kills)]) - (time.monotonic() - began), 1.0)
        try:
            process.wait(timeout=delay)
            finish(process, "a disturbed run segment", log_path)
            log.info("the run ended before kill %d was due; stopping the drill's kills there", len(kills) + 1)
            return kills
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        step = checkpoint_step(run_dir)
        kills.append({"after_seconds": round(delay, 1), "resumable_step": step})
        record(out, "kills", kills)
        log.info("kill %d/%d after %.0f s: the newest checkpoint that loads is at step %s", len(kills), args.kills,
                 delay, step)
        resume = step is not None
        if not resume:  # killed before its first checkpoint: start over in the same folder
            shutil.rmtree(run_dir, ignore_errors=True)


def summary(run_dir: Path) -> dict:
    results = json.loads((run_dir / "results.json").read_text())
    trained = next(row for row in results["results"] if row["method"].endswith("(trained)"))
    training = results["training"]
    return {"metrics": {k: trained["metrics"][k] for k in METRICS if k in trained["metrics"]},
            "best_validation_mAP": training.get("best_validation_mAP"), "bad_images": training.get("bad_images"),
            "skipped_steps": training.get("skipped_steps"), "steps": training.get("steps")}


def record(out: Path, key: str, value) -> None:
    """OUT/progress.json: what the drill has done so far (``--report-only`` rebuilds the report from it)."""
    path = out / "progress.json"
    progress = json.loads(path.read_text()) if path.is_file() else {}
    progress[key] = value
    path.write_text(json.dumps(progress, indent=2))


def _number(value) -> str:
    return "-" if value is None else f"{value:.4f}"


def report(out: Path, kills_asked: int, tolerance: float) -> dict:
    """Compare the two finished runs under ``out`` (OUT/drill.json) and print the table and the checks."""
    progress = json.loads((out / "progress.json").read_text())
    damaged, kills, wall = progress["damaged"], progress.get("kills", []), progress.get("wall_seconds", {})
    runs = {"undisturbed": summary(out / "undisturbed"), "disturbed": summary(out / "disturbed")}
    differences = {k: abs(runs["disturbed"]["metrics"][k] - runs["undisturbed"]["metrics"][k])
                   for k in runs["undisturbed"]["metrics"]}
    checks = {
        f"final metrics within {tolerance}": max(differences.values()) <= tolerance,
        f"kills made: {len(kills)} of {kills_asked}": len(kills) == kills_asked,
        **{f"{name}: unreadable images found = injected ({len(damaged)})": run["bad_images"] == len(damaged)
           for name, run in runs.items()},
    }
    result = {"injected": len(damaged), "kills": kills, "runs": runs, "differences": differences,
              "wall_seconds": wall, "checks": checks, "passed": all(checks.values())}
    (out / "drill.json").write_text(json.dumps(result, indent=2))

    lines = [f"{'':24s}" + "".join(f"{k:>9s}" for k in runs["undisturbed"]["metrics"]) + "  best val  unreadable"]
    for name, run in runs.items():
        lines.append(f"{name:24s}" + "".join(f"{v:9.4f}" for v in run["metrics"].values())
                     + f"  {_number(run['best_validation_mAP']):>8s}  {run['bad_images']:10d}")
    lines.append(f"{'|difference|':24s}" + "".join(f"{v:9.4f}" for v in differences.values()))
    lines.append(f"injected unreadable images: {len(damaged)}; kills (delay s, step resumed from): "
                 + ", ".join(f"{k['after_seconds']:.0f}/{k['resumable_step']}" for k in kills))
    if wall:
        lines.append("wall time: " + ", ".join(f"{name} {seconds / 60:.1f} min" for name, seconds in wall.items()))
    lines += [f"{'PASS' if ok else 'FAIL'}  {check}" for check, ok in checks.items()]
    print("\n".join(lines))
    return result


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    if args.report_only:
        return 0 if report(out, args.kills, args.tolerance)["passed"] else 1
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out} is not empty; give --out a new folder")
    out.mkdir(parents=True, exist_ok=True)
    data_root = resolve_data_root(args.data_root)
    args.data_root = str(data_root)
    config = resolve_config(args.config, args.overrides)
    manifest, damaged = corrupt_manifest(config, data_root, out, args.corrupt_fraction, args.seed)
    record(out, "damaged", damaged)

    log.info("undisturbed run (log: %s)", out / "undisturbed.log")
    tick = time.perf_counter()
    process = start(train_command(args, out / "undisturbed", manifest, False),
                    out / "undisturbed.log")
    finish(process, "the undisturbed run", out / "undisturbed.log")
    undisturbed_seconds = time.perf_counter() - tick
    record(out, "wall_seconds", {"undisturbed": round(undisturbed_seconds, 1)})

    log.info("disturbed run, %d kills (log: %s)", args.kills, out / "disturbed.log")
    tick = time.perf_counter()
    disturbed_run(args, out / "disturbed", manifest, undisturbed_seconds, out / "disturbed.log", out)
    record(out, "wall_seconds", {"undisturbed": round(undisturbed_seconds, 1),
                                 "disturbed": round(time.perf_counter() - tick, 1)})
    return 0 if report(out, args.kills, args.tolerance)["passed"] else 1


if __name__ == "__main__":
    sys.exit(run_cli(main))
