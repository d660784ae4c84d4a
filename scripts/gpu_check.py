#!/usr/bin/env python
"""One command for a CUDA machine: does everything that can use a GPU run on it?

    python scripts/gpu_check.py                 # Flowers-102 from --data-root, else where make main looks
    python scripts/gpu_check.py --allow-cpu     # no GPU: the same checks on the CPU (tries the script itself)

Each check runs an entry point in a subprocess with tiny settings (configs/smoke.yaml: 96 px images, a few
steps; random-init detector) in a temporary folder, and the script ends with a table of check, status
(PASS / FAIL / SKIP) and seconds; a failed check's output follows the table. Exit code 0 when nothing failed.

1. ``train 1 process fp32``: train.py, ``--steps`` steps and the final evaluation (300 test images);
2. ``train 2 processes``: ``accelerate launch --multi_gpu --num_processes 2`` (2 GPUs, or gloo on the CPU),
   the same global batch; per-step losses are compared with the one-process run (printed: GPU kernels are
   not bit-exact);
3. ``train bf16`` / ``train fp16``: mixed precision, finite losses (fp16 needs CUDA, bf16 a GPU that has it;
   bf16 autocast also runs on the CPU);
4. ``evaluate``: scripts/evaluate.py of the trained run (``run:``) on ``--device cuda``;
5. ``export + load``: scripts/export.py, then ``release.load_release`` on the device encodes four images
   (the same descriptors as on the CPU, up to rounding);
6. ``index + search``: scripts/index.py and scripts/search.py with the release; the search runs on the GPU
   when FAISS sees one (FAISS's CUDA build, docs/gpu.md), else on the CPU, and the detail says which;
7. ``FAISS GPU flat + IVF``: ``SearchIndex`` on the GPU against the CPU (flat and IVF-Flat: same neighbours);
   skipped with faiss-cpu;
8. ``detector step`` / ``detector bf16``: scripts/train_detector.py (2 steps on Flowers photos with a central
   box) on ``accelerator.device``, then its checkpoint loaded on the device proposes regions.
"""
from __future__ import annotations

import argparse
import csv
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from msretrieval.data.roots import resolve_data_root
from msretrieval.utils.cli import run_cli
from msretrieval.utils.errors import UserError

REPO = Path(__file__).resolve().parents[1]
STATUSES = ("PASS", "FAIL", "SKIP")


class Skipped(Exception):
    """The check does not apply here; the message says why."""


class CheckFailed(Exception):
    """The check ran and failed; the message is the evidence (a command's last output lines)."""


@dataclass
class Result:
    name: str
    status: str
    seconds: float
    detail: str


def run_check(name: str, check: Callable[[], str]) -> Result:
    """Run one check: its detail line, or SKIP / FAIL with the reason; a bug in a check is a FAIL too."""
    started = time.perf_counter()
    try:
        status, detail = "PASS", check()
    except Skipped as reason:
        status, detail = "SKIP", str(reason)
    except CheckFailed as evidence:
        status, detail = "FAIL", str(evidence)
    except Exception as error:  # noqa: BLE001 - one broken check must not hide the others' results
        status, detail = "FAIL", f"{type(error).__name__}: {error}"
    return Result(name, status, time.perf_counter() - started, detail)


def format_table(results: list[Result]) -> str:
    """check | status | seconds | detail, one line per check; a failure's detail is printed after the table."""
    width = max([len("check")] + [len(r.name) for r in results])
    lines = [f"{'check':<{width}}  status  seconds  detail", f"{'-' * width}  ------  -------  ------"]
    for result in results:
        detail = "see below" if result.status == "FAIL" else result.detail
        lines.append(f"{result.name:<{width}}  {result.status:<6}  {result.seconds:7.1f}  {detail}")
    for result in results:
        if result.status == "FAIL":
            lines += ["", f"--- {result.name} failed:", result.detail.rstrip()]
    return "\n".join(lines)


def run(command: list[str], env: dict) -> str:
    """A command in the repository; its output, or CheckFailed with the last lines of it."""
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    output = done.stdout + done.stderr
    if done.returncode != 0:
        raise CheckFailed(f"exit code {done.returncode}: {' '.join(command)}\n{output[-3000:]}")
    return output


def tb_losses(run_dir: Path) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(run_dir / "tb"))
    events.Reload()
    return [event.value for event in events.Scalars("train/loss")]


def finite_losses(run_dir: Path) -> list[float]:
    values = tb_losses(run_dir)
    if not values or not all(map(math.isfinite, values)):
        raise CheckFailed(f"losses not finite: {values}")
    return values


def rounded(values: list[float]) -> str:
    return str([round(v, 4) for v in values])


def precision_skip(precision: str, gpus: int, bf16_on_gpu: bool) -> str | None:
    """Why a mixed-precision check cannot run on this machine, or None."""
    if precision == "fp16" and gpus == 0:
        return "fp16 autocast needs CUDA (on the CPU accelerate would train in fp32)"
    if precision == "bf16" and gpus and not bf16_on_gpu:
        return "this GPU has no bf16"
    return None


class GpuCheck:
    """The checks, in order, sharing one temporary folder (the trained run feeds evaluate/export/index)."""

    def __init__(self, tmp: Path, data_root: Path, gpus: int, steps: int):
        self.tmp, self.data_root, self.gpus, self.steps = tmp, data_root, gpus, steps
        self.device = "cuda" if gpus else "cpu"
        self.env = {**os.environ, "DATA_ROOT": str(data_root)}
        if gpus == 0:  # accelerate gives each CPU process one thread; the same for the one-process run: same rounding
            self.env["OMP_NUM_THREADS"] = "1"
        self.python = sys.executable
        self.common = ["--config", "configs/smoke.yaml", f"train.steps={steps}", "train.checkpoint_every=1"]
        self.one_losses: list[float] = []

    def photos(self, count: int) -> list[Path]:
        from msretrieval.data.manifest import flowers102
        test = flowers102(self.data_root, "test")
        step = max(1, len(test.paths) // count)
        return [Path(p) for p in test.paths[::step][:count]]

    def need(self, path: Path, check: str) -> None:
        if not path.exists():
            raise Skipped(f"needs '{check}', which did not finish")

    # -- training ---------------------------------------------------------------------------------------------
    def train_one(self) -> str:
        run([self.python, "train.py", *self.common, "--run-dir", str(self.tmp / "one")], self.env)
        self.one_losses = finite_losses(self.tmp / "one")
        return f"losses {rounded(self.one_losses)}"

    def train_two(self) -> str:
        if self.gpus == 1:
            raise Skipped("needs 2 GPUs")
        launch = [self.python, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                  "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
        run([*launch, "train.py", *self.common, "--skip-final-eval", "--run-dir", str(self.tmp / "two")], self.env)
        two = finite_losses(self.tmp / "two")
        if len(two) != len(self.one_losses):
            raise CheckFailed(f"{len(two)} losses from 2 processes, {len(self.one_losses)} from 1")
        gap = max(abs(a - b) for a, b in zip(self.one_losses, two))
        return f"max |loss diff| vs 1 process {gap:.2e}"

    def train_precision(self, precision: str, bf16_on_gpu: bool) -> str:
        reason = precision_skip(precision, self.gpus, bf16_on_gpu)
        if reason:
            raise Skipped(reason)
        run([self.python, "train.py", *self.common, "--skip-final-eval", "--run-dir", str(self.tmp / precision),
             f"train.mixed_precision={precision}"], self.env)
        return f"losses {rounded(finite_losses(self.tmp / precision))}"

    # -- evaluation, release, index -----------------------------------------------------------------------------
    def evaluate(self) -> str:
        import json
        self.need(self.tmp / "one" / "last.pth", "train 1 process fp32")
        out = self.tmp / "evaluate.json"
        run([self.python, "scripts/evaluate.py", "--benchmark", "flowers102", "--method", f"run:{self.tmp / 'one'}",
             "--image-size", "96", "--limit", "200", "--device", self.device, "--cache-dir", "", "--out", str(out)],
            self.env)
        metrics = json.loads(out.read_text())["results"][0]["metrics"]
        return f"{self.device}: " + ", ".join(f"{k} {v:.4f}" for k, v in list(metrics.items())[:2])

    def export_and_load(self) -> str:
        import numpy as np
        from msretrieval.release import load_release
        self.need(self.tmp / "one" / "last.pth", "train 1 process fp32")
        run([self.python, "scripts/export.py", str(self.tmp / "one"), str(self.tmp / "release")], self.env)
        images = self.photos(4)
        on_device = load_release(self.tmp / "release", device=self.device).encode(images, progress=False)
        on_cpu = load_release(self.tmp / "release", device="cpu").encode(images, progress=False)
        norms = np.linalg.norm(on_device, axis=1)
        if not np.isfinite(on_device).all() or not np.allclose(norms, 1, atol=1e-3):
            raise CheckFailed(f"descriptors not finite / unit length: norms {norms}")
        gap = float(np.abs(on_device - on_cpu).max())
        if gap > 1e-2:
            raise CheckFailed(f"{self.device} and CPU descriptors differ by {gap:.2e}")
        return f"{on_device.shape[0]} x {on_device.shape[1]} descriptors on {self.device}, max |diff| vs CPU {gap:.1e}"

    def index_and_search(self) -> str:
        from msretrieval.retrieval.search.index import faiss_gpu_count
        self.need(self.tmp / "release" / "config.json", "export + load")
        folder, queries = self.tmp / "photos", self.tmp / "queries"
        for target, paths in ((folder, self.photos(24)), (queries, self.photos(24)[::8])):
            target.mkdir(exist_ok=True)
            for path in paths:
                (target / path.name).symlink_to(path)
        run([self.python, "scripts/index.py", str(self.tmp / "release"), str(folder), "--out", str(self.tmp / "index"),
             "--device", self.device], self.env)
        search_device = "cuda" if self.gpus and faiss_gpu_count() else "cpu"
        output = run([self.python, "scripts/search.py", str(self.tmp / "index"), str(queries), "--k", "5",
                      "--labels", str(self.data_root / "flowers102" / "labels.csv"), "--device", search_device],
                     self.env)
        where = "FAISS on the GPU" if search_device == "cuda" else \
            "FAISS on the CPU" + (" (FAISS sees no GPU: docs/gpu.md)" if self.gpus else "")
        found = next((line for line in output.splitlines() if "queries against" in line), "")
        return f"{found.split(';')[0]}; {where}"

    def faiss_gpu(self) -> str:
        import numpy as np
        from msretrieval.retrieval.search.index import SearchIndex, faiss_gpu_count
        if faiss_gpu_count() == 0:
            raise Skipped("FAISS sees no GPU (faiss-cpu; GPU FAISS: docs/gpu.md)")
        rows = np.random.default_rng(0).normal(size=(20_000, 64)).astype(np.float32)
        rows /= np.linalg.norm(rows, axis=1, keepdims=True)
        queries = rows[:100] + 0.01
        parts = []
        for factory in ("Flat", "IVF64,Flat"):
            kwargs = {"factory": factory, "nprobe": 8 if factory != "Flat" else None}
            _, cpu = SearchIndex(rows, use_gpu=False, **kwargs).search(queries, 10)
            gpu_index = SearchIndex(rows, use_gpu=True, **kwargs)
            _, gpu = gpu_index.search(queries, 10)
            agreement = float((cpu == gpu).mean())
            if agreement < 0.99:
                raise CheckFailed(f"{factory}: only {agreement:.3f} of the GPU's neighbours are the CPU's")
            parts.append(f"{factory} on {gpu_index.gpus} GPU(s), {agreement:.3f} same neighbours")
        return "; ".join(parts)

    # -- detector ----------------------------------------------------------------------------------------------
    def detector(self, precision: str, bf16_on_gpu: bool) -> str:
        reason = precision_skip(precision, self.gpus, bf16_on_gpu) if precision != "no" else None
        if reason:
            raise Skipped(reason)
        from PIL import Image
        from msretrieval.models.detector import load_detector
        boxes = self.tmp / "boxes.csv"
        if not boxes.exists():  # Flowers photos, one central box each: any boxes make a training step
            with boxes.open("w", newline="") as handle:
                writer = csv.writer(handle)
                writer.writerow(["file", "x1", "y1", "x2", "y2", "split"])
                writer.writerows([[str(p), 0.2, 0.2, 0.8, 0.8, "train"] for p in self.photos(8)])
        out = self.tmp / f"detector-{precision}"
        run([self.python, "scripts/train_detector.py", "--boxes", str(boxes), "--out", str(out), "--steps", "2",
             "--batch-size", "2", "--random-init", "--min-size", "96", "--max-size", "128", "--val-fraction",
             "0.25", "--eval-every", "0", "--log-every", "1", "--device", self.device, "--mixed-precision",
             precision], self.env)
        losses = finite_losses(out)
        detector = load_detector(out / "last.pth", map_location=self.device)
        regions = detector.propose([Image.open(self.photos(1)[0]).convert("RGB")])
        return f"{self.device}: losses {rounded(losses)}; checkpoint loads and proposes {len(regions[0])} region(s)"

    def all(self, bf16_on_gpu: bool) -> list[Result]:
        checks = [("train 1 process fp32", self.train_one),
                  ("train 2 processes", self.train_two),
                  ("train bf16", lambda: self.train_precision("bf16", bf16_on_gpu)),
                  ("train fp16", lambda: self.train_precision("fp16", bf16_on_gpu)),
                  ("evaluate", self.evaluate),
                  ("export + load", self.export_and_load),
                  ("index + search", self.index_and_search),
                  ("FAISS GPU flat + IVF", self.faiss_gpu),
                  ("detector step", lambda: self.detector("no", bf16_on_gpu)),
                  ("detector bf16", lambda: self.detector("bf16", bf16_on_gpu))]
        return [run_check(name, check) for name, check in checks]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", default=None,
                        help="folder holding flowers102/ (default: $DATA_ROOT, ../shared/data, ./data, ./datasets)")
    parser.add_argument("--allow-cpu", action="store_true", help="run on the CPU when no GPU is present")
    parser.add_argument("--steps", type=int, default=2, help="training steps of each train.py run (default 2)")
    args = parser.parse_args(argv)
    import torch

    gpus = torch.cuda.device_count()
    if gpus == 0 and not args.allow_cpu:
        raise UserError("no CUDA device found; run this on a GPU machine (or pass --allow-cpu to try the script)")
    data_root = resolve_data_root(args.data_root).resolve()
    if not (data_root / "flowers102" / "labels.csv").is_file():
        raise UserError(f"Flowers-102 not found under {data_root}; run: python scripts/prepare_flowers102.py")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        checker = GpuCheck(Path(tmp), data_root, gpus, args.steps)
        results = checker.all(bf16_on_gpu=bool(gpus) and torch.cuda.is_bf16_supported())
    device = torch.cuda.get_device_name(0) if gpus else "CPU"
    print(f"device: {device} ({gpus} GPU{'s' if gpus != 1 else ''})")
    print(format_table(results))
    print(f"total {time.perf_counter() - started:.0f} s")
    return 1 if any(result.status == "FAIL" for result in results) else 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
