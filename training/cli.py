"""The training command (``train.py``, ``msretrieval-train``): train a retrieval network end to end, then
evaluate it frozen next to the unsupervised baselines.

    python train.py --config configs/main.yaml        # the main job (make main; configs/default.yaml: the defaults)
    python train.py --config configs/smoke.yaml train.steps=100 mining.miner=algorithm1
    python train.py --resume runs/flowers102          # continue a run exactly where its newest checkpoint left it
    accelerate launch --multi_gpu --num_processes 2 train.py --config configs/smoke.yaml

The loop lives in ``training/`` (``training.trainer.Trainer``); this script reads the config, picks the run
directory, runs the trainer and prints the final table (also written to RUN_DIR/results.json). The resolved
config is saved as RUN_DIR/config.yaml; TensorBoard logs go to RUN_DIR/tb.

The config is checked against the data (``training.config.check_inputs``) before a run directory is made, an
image is read or a model is built. SIGINT / SIGTERM during training write a checkpoint and exit with 128 +
the signal number (130 / 143) and a line saying how to resume; a run stopped by unreadable training images, a
diverged loss or a full disk exits with 2 and a one-line reason (for a full disk: the file it was writing and
the ``python train.py --resume RUN_DIR`` command that continues from the intact checkpoint). Under
``accelerate launch``, a process that dies or stops responding ends all of them: the others' collectives fail
(at once, or after ``train.collective_timeout`` seconds) with one line each (``training.distributed.PeerFailure``),
exit code 2.
"""
from __future__ import annotations

import argparse
import logging
import resource
import signal
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, set_seed

from msretrieval.data.roots import resolve_data_root
from msretrieval.retrieval.evaluation.harness import format_table, write_report
from msretrieval.training.checkpoint import LAST, load_resumable
from msretrieval.training.config import DEFAULT_CONFIG, check_inputs, resolve_config, unique_run_dir
from msretrieval.training.distributed import peer_failures_stop_the_run, process_group_kwargs
from msretrieval.training.evaluation import final_evaluation
from msretrieval.training.trainer import Trainer
from msretrieval.utils.cli import command_line, full_disk_stops_the_run, run_cli
from msretrieval.utils.config import save_yaml

log = logging.getLogger("train")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML config (default: configs/default.yaml)")
    parser.add_argument("--run-dir", default=None, help="output folder (default: the config's run_dir)")
    parser.add_argument("--data-root", default=None, help="data sets root (default: $DATA_ROOT, else the first of "
                        "../shared/data, ./data, ./datasets that holds the set)")
    parser.add_argument("--resume", default=None, help="run directory (its newest checkpoint that loads) or a "
                        "checkpoint file to resume")
    parser.add_argument("--init-from", default=None, help="fine-tune a release directory (scripts/export.py) "
                        "or a .pth; its architecture, head and input size are kept (= model.init_from=PATH)")
    parser.add_argument("--skip-final-eval", action="store_true", help="train only")
    parser.add_argument("overrides", nargs="*", help="config overrides key.sub=value")
    return parser.parse_intermixed_args(argv)  # overrides may come before or after the options


def peak_memory_gb() -> float:
    """Peak resident memory of this process (Linux reports KiB). Children are left out: a forked child's
    peak counts the pages it shares with this process, so it would report this process's size again."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def continue_after_full_disk(trainer: Trainer | None, run_dir: Path, argv: list[str] | None) -> str:
    """What a full disk leaves intact and the command that continues: the resume command once a checkpoint
    exists, else the original command."""
    if trainer is None or trainer.last_saved_step is None:
        return f"no checkpoint was written yet: free space, then run again: {command_line('train.py', argv)}"
    return (f"the last checkpoint, {run_dir / LAST} (step {trainer.last_saved_step}), is intact: free space, then "
            f"resume with: python train.py --resume {run_dir}")


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    resume_from = None
    if args.resume:
        resume_from, _, state = load_resumable(args.resume)
        log.info("resuming from %s (step %d)", resume_from, state["step"])
        config = resolve_config(base=state["config"], overrides=args.overrides)
    else:
        config = resolve_config(args.config, args.overrides, init_from=args.init_from)
    data_root = resolve_data_root(args.data_root or config["data"]["root"])
    images = check_inputs(config, data_root, final_eval=not args.skip_final_eval)  # before any real work
    timeout = config["train"]["collective_timeout"]
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=config["train"]["mixed_precision"],
                              kwargs_handlers=[process_group_kwargs(timeout)])
    if resume_from is not None:
        run_dir = resume_from.parent
    else:
        chosen = [unique_run_dir(args.run_dir or config["run_dir"])] if accelerator.is_main_process else [None]
        run_dir = Path(broadcast_object_list(chosen)[0])  # every process writes to the same new directory
    trainer = None
    with full_disk_stops_the_run("training", lambda: continue_after_full_disk(trainer, run_dir, argv)):
        if accelerator.is_main_process:
            run_dir.mkdir(parents=True, exist_ok=True)
            save_yaml({**config, "run_dir": str(run_dir)}, run_dir / "config.yaml")
        set_seed(int(config["seed"]))
        trainer = Trainer(config, run_dir, data_root, accelerator, images=images)
        return train_and_evaluate(trainer, resume_from, args, data_root, accelerator, started)


def train_and_evaluate(trainer: Trainer, resume_from: Path | None, args: argparse.Namespace, data_root: Path,
                       accelerator: Accelerator, started: float) -> int:
    """Train (from scratch or ``resume_from``), then evaluate on the main process; returns the exit code."""
    config, run_dir, timeout = trainer.config, trainer.run_dir, trainer.config["train"]["collective_timeout"]
    # a dead or silent process ends every process with one line instead of a hang
    with peer_failures_stop_the_run(accelerator.process_index, accelerator.num_processes, timeout,
                                    note=trainer.checkpoint_note):
        try:
            trainer.setup(resume_from)
            trainer.fit()
        finally:
            trainer.close()
        accelerator.wait_for_everyone()
    if trainer.interrupted:
        code = 128 + int(signal.Signals[trainer.interrupted])
        message = (f"training interrupted by {trainer.interrupted} at step {trainer.step}/{config['train']['steps']}; "
                   f"checkpoint {run_dir / LAST}; resume with: python train.py --resume {run_dir}")
        if accelerator.is_main_process:
            print(message, file=sys.stderr)
        accelerator.end_training()
        return code
    timing = trainer.timing
    log.info("training: %.1f min of steps (%.1f img/s), %.1f min of validation", timing["train_seconds"] / 60,
             timing["images"] / max(timing["train_seconds"], 1e-9), timing["validation_seconds"] / 60)
    if accelerator.is_main_process and not args.skip_final_eval:
        summary = final_evaluation(config, run_dir, data_root, device=str(accelerator.device))
        summary["training"] = {"run_dir": str(run_dir), "steps": trainer.step, **timing,
                               "best_validation_mAP": trainer.best if trainer.val_set is not None else None,
                               **trainer.reliability_report()}
        write_report(summary, run_dir / "results.json")
        print(format_table(summary, columns=["mAP", "mAP@R", "R@1", "R@2", "R@4", "R@8"]))
    log.info("wall time %.1f min; peak memory %.2f GB", (time.perf_counter() - started) / 60, peak_memory_gb())
    accelerator.end_training()
    return 0


def cli() -> int:
    """Console entry point."""
    return run_cli(main)
