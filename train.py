#!/usr/bin/env python
"""Train a retrieval network end to end, then evaluate it frozen next to the unsupervised baselines.

    python train.py                                   # the main job (configs/default.yaml)
    python train.py --config configs/x.yaml train.steps=100 model.head.out_dim=256
    python train.py --resume runs/flowers102-msnetvlad
    accelerate launch --multi_gpu --num_processes 2 train.py --config configs/small.yaml

Each step trains on triplets mined by the paper's Algorithm 1 (or an in-batch PML miner); the mining batch
is embedded by all processes and gathered, so every process mines the same triplets and trains on its own
share of them. The resolved config is saved as RUN_DIR/config.yaml; checkpoints (RUN_DIR/last.pth,
best.pth) describe themselves and resume exactly (model, optimiser, scheduler, mining pool, RNGs, step);
TensorBoard logs go to RUN_DIR/tb; the final table is printed and written to RUN_DIR/results.json.
"""
from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import gather, set_seed
from torch.utils.tensorboard import SummaryWriter
from torchvision.transforms.functional import center_crop
from torchvision.utils import make_grid
from tqdm.auto import tqdm

from data.images import load_image
from data.roots import resolve_data_root
from data.transforms import EvalTransform
from losses import create_loss
from miners import Algorithm1Miner
from miners.pool import MiningPool
from miners.schedule import MiningSchedule
from models.retrieval_net import RetrievalNet, create_model
from retrieval.benchmarks import create_benchmark
from retrieval.harness import EvalSettings, evaluate_method, evaluate_methods, format_table, report, write_report
from retrieval.methods import MethodContext, create_method
from retrieval.trained import TrainedModelMethod
from training.checkpoint import load_training_state, rng_state, save_checkpoint, set_rng_state
from training.data import derived_seed, load_training_set
from training.inputs import create_inputs
from utils.cli import run_cli
from utils.config import apply_overrides, get, load_yaml, save_yaml

log = logging.getLogger("train")
DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "default.yaml"


# ------------------------------------------------------------------------------------------------ model set-up

def freeze(model: RetrievalNet, trainable_prefixes: list[str]) -> list[torch.nn.Parameter]:
    """Train only parameters under the given module names (``all``: everything); BatchNorm statistics stay
    frozen (eval mode). A name that matches no parameter is an error: a typo would silently freeze it."""
    def under(name: str, prefix: str) -> bool:
        return name == prefix or name.startswith(prefix + ".")

    names = [name for name, _ in model.named_parameters()]
    if "all" not in trainable_prefixes:
        for prefix in trainable_prefixes:
            if not any(under(name, prefix) for name in names):
                top = sorted({".".join(name.split(".")[:3]) for name in names})[:10]
                raise ValueError(f"model.trainable: {prefix!r} matches no parameter (names look like {top})")
    trainable = []
    for name, parameter in model.named_parameters():
        keep = "all" in trainable_prefixes or any(under(name, p) for p in trainable_prefixes)
        parameter.requires_grad_(keep)
        if keep:
            trainable.append(parameter)
    return trainable


def set_train_mode(model: torch.nn.Module) -> None:
    """Train mode, but BatchNorm layers keep their ImageNet statistics (batches of triplets are tiny)."""
    model.train()
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.eval()


@torch.no_grad()
def initialise_head(model: RetrievalNet, maps: list[torch.Tensor]) -> None:
    """PCA / k-means / PCA-whitening initialisation of the head from training feature maps."""
    model.eval()
    head = model.head
    if hasattr(head, "init_reduction_pca"):
        columns = torch.cat([m[0].flatten(1).T for m in maps])
        head.init_reduction_pca(columns)
        local = torch.cat([head.local_descriptors(m)[0] for m in maps])
        head.vlad.init_from_descriptors(local)
    if getattr(head, "projection", None) is not None:
        head.projection.init_pca_whitening(torch.cat([head.pre_projection(m) for m in maps]))


def build_optimizer(model: RetrievalNet, config: dict) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    head_params = [p for p in model.head.parameters() if p.requires_grad]
    head_ids = {id(p) for p in head_params}
    trunk_params = [p for p in model.parameters() if p.requires_grad and id(p) not in head_ids]
    optim = config["optim"]
    groups = [{"params": trunk_params, "lr": optim["lr"]}, {"params": head_params, "lr": optim.get("head_lr", optim["lr"])}]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], weight_decay=optim.get("weight_decay", 0.0))
    steps, warmup = config["train"]["steps"], optim.get("warmup_steps", 0)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if optim.get("scheduler", "cosine") == "constant":
            return 1.0
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# ------------------------------------------------------------------------------------------------ mining

def mining_batch(labels: np.ndarray, classes: int, per_class: int, seed: int) -> np.ndarray:
    """Dataset indices of a mining batch: ``classes`` classes x ``per_class`` images (seeded, reproducible)."""
    rng = np.random.default_rng(seed)
    unique = np.unique(labels)
    chosen = rng.choice(unique, size=min(classes, len(unique)), replace=False)
    picks = []
    for label in chosen:
        members = np.flatnonzero(labels == label)
        picks.append(rng.choice(members, size=min(per_class, len(members)), replace=False))
    return np.concatenate(picks)


def shard(items: list, rank: int, world: int) -> list:
    return items[rank::world]


# ------------------------------------------------------------------------------------------------ training

class Trainer:
    def __init__(self, config: dict, run_dir: Path, data_root: Path, accelerator: Accelerator):
        self.config, self.run_dir, self.data_root, self.accelerator = config, run_dir, data_root, accelerator
        self.seed = int(config.get("seed", 0))
        self.images = load_training_set(config["data"]["train"], data_root)
        self.labels = np.asarray(self.images.labels)
        mcfg = config["model"]
        self.model = create_model(mcfg["architecture"], backbone=mcfg["backbone"], pretrained=mcfg.get("pretrained", True),
                                  weights=mcfg.get("weights"), **(mcfg.get("head") or {}))
        trainable = freeze(self.model, mcfg["trainable"])
        self.inputs = create_inputs(config["train"].get("inputs", "images"), self.images, self.model,
                                    config["data"]["train_size"],
                                    config["data"].get("workers", 2))
        log.info("trainable parameters: %d of %d", sum(p.numel() for p in trainable),
                 sum(p.numel() for p in self.model.parameters()))
        self.loss = create_loss(config["loss"]["name"], margin=config["loss"]["margin"])
        self.schedule = MiningSchedule(tuple(config["mining"]["schedule"]), config["mining"]["refresh_every"])
        self.miner_name = config["mining"]["miner"]
        if self.miner_name != "algorithm1":
            raise ValueError(f"mining.miner {self.miner_name!r}: train.py drives the paper's algorithm1 miner; "
                             "in-batch miners (miners.create_online_miner) plug into the loss directly")
        self.miner = Algorithm1Miner(seed=self.seed, one_per_class=config["mining"].get("one_per_class", True))
        self.pool = MiningPool(config["train"]["triplets_per_step"], config["mining"]["refresh_every"], seed=self.seed)
        self.step = 0
        self.best = -1.0
        self.timing = {"mining_seconds": 0.0, "step_seconds": 0.0, "images": 0}
        self.writer = SummaryWriter(str(run_dir / "tb")) if accelerator.is_main_process else None

    # -- state -----------------------------------------------------------------------------------------
    def training_state(self) -> dict:
        return {"step": self.step, "best": self.best, "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "pool": self.pool.state_dict(),
                "miner": self.miner.state_dict(),
                "rng": rng_state(), "config": self.config}

    def resume(self, path: Path) -> None:
        state_dict, state = load_training_state(path)
        self.model.load_state_dict(state_dict)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.pool.load_state_dict(state["pool"])
        self.miner.load_state_dict(state["miner"])
        set_rng_state(state["rng"])
        self.step, self.best = state["step"], state["best"]
        log.info("resumed from %s at step %d", path, self.step)

    def save(self, name: str, metrics: dict | None = None) -> None:
        if self.accelerator.is_main_process:
            save_checkpoint(self.run_dir / name, self.accelerator.unwrap_model(self.model), self.training_state(), metrics)

    # -- set-up ----------------------------------------------------------------------------------------
    def setup(self, resume_from: Path | None) -> None:
        if resume_from is None:
            count = min(self.config["model"].get("init_images", 600), len(self.images))
            indices = np.random.default_rng(self.seed).choice(len(self.images), size=count, replace=False)
            initialise_head(self.model, self.inputs.feature_maps(self.model, indices))
        self.optimizer, self.scheduler = build_optimizer(self.model, self.config)
        if resume_from is not None:
            self.resume(resume_from)
        self.model, self.optimizer = self.accelerator.prepare(self.model, self.optimizer)

    # -- one mining round ------------------------------------------------------------------------------
    @torch.no_grad()
    def refresh(self) -> dict:
        mcfg = self.config["mining"]
        indices = mining_batch(self.labels, mcfg["classes"], mcfg["per_class"], derived_seed(self.seed, self.step, 1))
        acc = self.accelerator
        mine = shard(list(range(len(indices))), acc.process_index, acc.num_processes)
        model = acc.unwrap_model(self.model).eval()
        local = self.inputs.embed(model, indices[mine])
        # Every process gets every embedding in mining-batch order (shards padded to equal length).
        order = torch.tensor(mine + [-1] * (len(shard(list(range(len(indices))), 0, acc.num_processes)) - len(mine)))
        local = torch.cat([local, local.new_zeros(len(order) - len(local), local.shape[1])])
        gathered, positions = gather(local), gather(order)
        embeddings = torch.zeros(len(indices), local.shape[1])
        embeddings[positions[positions >= 0]] = gathered[positions >= 0]
        phase = self.schedule.apply(self.miner, self.step, self.pool)
        triplets = self.miner(embeddings, torch.as_tensor(self.labels[indices]))
        count = self.pool.refill(indices, triplets)
        stats = dict(getattr(self.miner, "last_stats", {}))
        stats.update({"triplets": count, "semi_hard_probability": phase.semi_hard_probability})
        return stats

    # -- one optimisation step --------------------------------------------------------------------------
    def train_step(self) -> tuple[float, int]:
        acc = self.accelerator
        batch = self.pool.next_batch()  # [anchors, positives, negatives], global
        t = len(batch) // 3
        mine = shard(list(range(t)), acc.process_index, acc.num_processes)
        indices = [batch[role * t + i] for role in range(3) for i in mine]
        seeds = [derived_seed(self.seed, self.step, 2, role * t + i) for role in range(3) for i in mine]
        set_train_mode(self.model)
        with acc.accumulate(self.model), acc.autocast():
            embeddings = self.inputs.embed(self.model, indices, seeds)
            loss = self.loss(embeddings, torch.arange(len(indices)), MiningPool.indices_tuple(len(indices)))
            acc.backward(loss)
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad()
        return float(gather(loss.detach()[None]).mean()), len(indices) * acc.num_processes

    def fit(self) -> None:
        steps = self.config["train"]["steps"]
        tcfg = self.config["train"]
        progress = tqdm(total=steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True,
                        disable=not self.accelerator.is_main_process)
        start, images_seen = time.perf_counter(), 0
        while self.step < steps:
            world = self.accelerator.num_processes  # every process needs at least one triplet of a batch
            if self.pool.refresh_due:
                tick = time.perf_counter()
                stats = self.refresh()
                self.timing["mining_seconds"] += time.perf_counter() - tick
                self.log_scalars({f"mining/{k}": v for k, v in stats.items() if isinstance(v, (int, float))})
                grid_every = tcfg.get("triplet_grid_every", 0)
                if grid_every and (self.pool.refills - 1) % grid_every == 0:
                    self.log_triplet_grid()
                if self.pool.remaining < world:
                    log.warning("step %d: the miner found no triplet; re-mining", self.step)
                    continue
            tick = time.perf_counter()
            loss, count = self.train_step()
            self.timing["step_seconds"] += time.perf_counter() - tick
            self.timing["images"] += count
            self.step += 1
            images_seen += count
            progress.update(1)
            progress.set_postfix(loss=f"{loss:.4f}")
            if self.step % tcfg["log_every"] == 0:
                self.log_scalars({"train/loss": loss, "train/lr": self.scheduler.get_last_lr()[0],
                                  "train/images_per_second": images_seen / (time.perf_counter() - start)})
            if tcfg.get("eval_every") and self.step % tcfg["eval_every"] == 0 and self.step < steps:
                self.periodic_eval()
            if self.step % tcfg["checkpoint_every"] == 0 or self.step == steps:
                self.save("last.pth")
        progress.close()
        if self.writer is not None:
            self.writer.flush()  # the last events would otherwise be lost when the process ends

    def log_triplet_grid(self, count: int = 4, size: int = 96) -> None:
        """TensorBoard image: the first mined triplets of the pool, one row each (anchor, positive, negative)."""
        if self.writer is None or not self.pool.triplets:
            return
        thumbnail = EvalTransform(size, "shorter", (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
        tiles = []
        for triplet in self.pool.triplets[:count]:
            for index in triplet:
                image = thumbnail(load_image(self.images.paths[index]))
                tiles.append(center_crop(image, [size, size]))
        self.writer.add_image("mining/triplets", make_grid(tiles, nrow=3, padding=2), self.step)

    def log_scalars(self, values: dict) -> None:
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(key, value, self.step)

    def periodic_eval(self) -> None:
        if not self.accelerator.is_main_process:
            return
        ecfg = self.config["eval"]
        benchmark = create_benchmark(ecfg["benchmark"], self.data_root, limit=self.config["train"].get("eval_limit"))
        method = TrainedModelMethod(self.accelerator.unwrap_model(self.model), name="model")
        result = evaluate_method(method, benchmark, EvalSettings(image_size=ecfg["image_size"], cache_dir=None))
        self.log_scalars({f"eval/{k}": v for k, v in result.metrics.items()})
        if result.metrics.get("mAP", -1) > self.best:
            self.best = result.metrics["mAP"]
            self.save("best.pth", result.metrics)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML config (default: configs/default.yaml)")
    parser.add_argument("--run-dir", default=None, help="output folder (default: the config's run_dir)")
    parser.add_argument("--data-root", default=None, help="data sets root (default: $DATA_ROOT, else ./data)")
    parser.add_argument("--resume", default=None, help="run directory (or checkpoint) to resume")
    parser.add_argument("--skip-final-eval", action="store_true", help="train only")
    parser.add_argument("overrides", nargs="*", help="config overrides key.sub=value")
    return parser.parse_args(argv)


def final_evaluation(trainer: Trainer, data_root: Path) -> dict:
    ecfg = trainer.config["eval"]
    # eval.limit: N images of a labelled benchmark, dealt over its classes (quick checks; null = all)
    benchmark = create_benchmark(ecfg["benchmark"], data_root, limit=ecfg.get("limit"))
    settings = EvalSettings(image_size=ecfg["image_size"], batch_size=ecfg.get("batch_size", 4),
                            cache_dir=ecfg.get("cache_dir", "cache/descriptors"))
    # The baselines share one pretrained backbone and one pass over the images (they are frozen).
    mcfg = trainer.config["model"]
    context = MethodContext(backbone=mcfg["backbone"], pretrained=mcfg.get("pretrained", True),
                            weights=mcfg.get("weights"), share_backbone=True)
    baselines = [create_method(name, context) for name in ecfg["baselines"]]
    results = evaluate_methods(baselines, benchmark, settings, together=True) if baselines else []
    trained = TrainedModelMethod.from_spec(f"run:{trainer.run_dir}")
    trained.name = f"{trainer.config['model']['architecture']} (trained)"
    results.append(evaluate_method(trained, benchmark, settings))
    return report(benchmark, results)


def main(argv=None) -> int:
    args = parse_args(argv)
    resume_from = None
    if args.resume:
        resume_path = Path(args.resume)
        resume_from = resume_path if resume_path.is_file() else resume_path / "last.pth"
        if not resume_from.is_file():
            raise FileNotFoundError(f"nothing to resume: {resume_from} does not exist")
        config = torch.load(resume_from, map_location="cpu", weights_only=False)["training_state"]["config"]
        config = apply_overrides(config, args.overrides)
        run_dir = resume_from.parent
    else:
        config = apply_overrides(load_yaml(args.config), args.overrides)
        run_dir = Path(args.run_dir or config["run_dir"])
    data_root = resolve_data_root(args.data_root or get(config, "data.root"))
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=config["train"]["mixed_precision"],
                              gradient_accumulation_steps=config["train"].get("grad_accum", 1))
    set_seed(int(config.get("seed", 0)))
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_yaml(config, run_dir / "config.yaml")
    trainer = Trainer(config, run_dir, data_root, accelerator)
    trainer.setup(resume_from)
    started = time.perf_counter()
    trainer.fit()
    accelerator.wait_for_everyone()
    log.info("training took %.1f min", (time.perf_counter() - started) / 60)
    if accelerator.is_main_process and not args.skip_final_eval:
        summary = final_evaluation(trainer, data_root)
        write_report(summary, run_dir / "results.json")
        print(format_table(summary, columns=["mAP", "mAP@R", "R@1", "R@2", "R@4", "R@8"]))
    accelerator.end_training()
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
