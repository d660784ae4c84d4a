#!/usr/bin/env python
"""One command for a CUDA machine: does training and evaluation run on the GPU(s)?

    python scripts/gpu_check.py                    # needs Flowers-102 under --data-root / $DATA_ROOT / ./data

Runs configs/smoke.yaml through train.py in fresh run directories and prints a verdict per check:
  1. one process, fp32: 2 training steps + a final evaluation (300 test images) on the GPU;
  2. two processes (`accelerate launch --multi_gpu --num_processes 2`, needs 2 GPUs): the same global batch,
     per-step losses compared with the one-process run (GPU kernels are not bit-exact: printed, not required
     to be equal);
  3. mixed precision fp16 and bf16 (bf16 if the GPU supports it): 2 steps each, finite losses.
``--allow-cpu`` runs the same checks on the CPU (gloo for the two processes), to try the script itself.
"""
from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

def losses(run_dir: Path) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(run_dir / "tb"))
    events.Reload()
    return [event.value for event in events.Scalars("train/loss")]


def run(command: list[str], env: dict) -> tuple[bool, str]:
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    return done.returncode == 0, (done.stdout + done.stderr)[-2000:]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", default=None, help="folder holding flowers102/ (default: $DATA_ROOT, ./data)")
    parser.add_argument("--allow-cpu", action="store_true", help="run on the CPU when no GPU is present")
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args(argv)
    import torch

    gpus = torch.cuda.device_count()
    if gpus == 0 and not args.allow_cpu:
        print("no CUDA device found; run this on a GPU machine (or pass --allow-cpu to try the script)")
        return 2
    data_root = Path(args.data_root or os.environ.get("DATA_ROOT") or "data")
    if not (data_root / "flowers102" / "labels.csv").is_file():
        print(f"Flowers-102 not found under {data_root}; run: python scripts/prepare_flowers102.py")
        return 2
    env = {**os.environ, "DATA_ROOT": str(data_root)}
    if gpus == 0:  # accelerate gives each CPU process one thread; the same for the one-process run: same rounding
        env["OMP_NUM_THREADS"] = "1"
    common = ["--config", "configs/smoke.yaml", f"train.steps={args.steps}", "train.checkpoint_every=1"]
    verdicts: list[tuple[str, bool, str]] = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ok, output = run([sys.executable, "train.py", *common, "--run-dir", str(tmp / "one")], env)
        one = losses(tmp / "one") if ok else []
        detail = f"losses {[round(v, 6) for v in one]}" if ok else output
        verdicts.append(("1 process, fp32, train + evaluate", ok and all(map(math.isfinite, one)), detail))

        if gpus >= 2 or (gpus == 0 and args.allow_cpu):
            launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                      "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
            ok, output = run([*launch, "train.py", *common, "--skip-final-eval", "--run-dir", str(tmp / "two")], env)
            two = losses(tmp / "two") if ok else []
            if ok and len(two) == len(one):
                gap = max(abs(a - b) for a, b in zip(one, two))
                verdicts.append(("2 processes, same global batch", True, f"max |loss diff| vs 1 process {gap:.2e}"))
            else:
                verdicts.append(("2 processes, same global batch", False, output))
        else:
            verdicts.append(("2 processes, same global batch", True, "skipped: fewer than 2 GPUs"))

        precisions = ["fp16", "bf16"] if gpus else ["bf16"]
        if gpus and not torch.cuda.is_bf16_supported():
            precisions = ["fp16"]
        for precision in precisions:
            ok, output = run([sys.executable, "train.py", *common, "--skip-final-eval", "--run-dir",
                              str(tmp / precision), f"train.mixed_precision={precision}"], env)
            values = losses(tmp / precision) if ok else []
            verdicts.append((f"mixed precision {precision}", ok and all(map(math.isfinite, values)),
                             f"losses {[round(v, 6) for v in values]}" if ok else output))
    device = torch.cuda.get_device_name(0) if gpus else "CPU"
    print(f"device: {device} ({gpus} GPU{'s' if gpus != 1 else ''})")
    for name, ok, detail in verdicts:
        print(f"[{'PASS' if ok else 'FAIL'}] {name}: {detail}")
    return 0 if all(ok for _, ok, _ in verdicts) else 1


if __name__ == "__main__":
    sys.exit(main())
