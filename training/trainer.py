"""The training loop: a retrieval network, triplets from a miner, one optimiser step at a time.

Per optimiser step, for each of ``grad_accum`` micro-batches: the global batch (every process computes the
same one) is split into contiguous shards; each process loads and embeds its shard on
``accelerator.device``; the embeddings are gathered in global order with gradients
(``training.distributed``), so every process mines the same triplets (process 0's, broadcast, so that
devices rounding differently cannot make them differ) and computes the loss of the whole batch, exactly as a
single process would. The loss's reducer therefore averages over the *global* non-zero
triplets, and 1 and N processes give the same loss and the same update.

Checkpoints (``step-N.pth`` with ``last.pth`` naming the newest, and ``best.pth`` by validation mAP) hold the
model in its self-describing format plus the whole training state (optimiser, scheduler, batch source and
miner, RNGs, step, unreadable files and skipped steps), so a resumed run continues exactly. Validation uses
classes held out of the training set; the test benchmark is not read here.

Reliability (docs/reliability.md):

- an unreadable training image is skipped and a readable one of its class takes its place
  (``training.data.ImageBatches``); more than ``data.max_bad_fraction`` of the training images unreadable
  stops the run (:class:`training.data.BadTrainingData`);
- a step whose loss or gradient is not finite changes nothing (no optimiser step; the learning-rate schedule
  still advances with the step count); ``train.max_bad_steps`` of them in a row stop the run
  (:class:`TrainingDiverged`). Checkpoints are not written during such a run of bad steps (a due one waits
  for the next good step), so ``last.pth`` stays the last checkpoint before it. Under fp16 the GradScaler
  skips steps with overflowing gradients itself (that is how it calibrates), so only the loss is checked;
- SIGINT / SIGTERM during :meth:`Trainer.fit` finish the current step, write ``last.pth`` and return with
  ``interrupted`` set (a second signal stops at once). In a distributed run the stop request and the
  unreadable files found by each process are shared after every step, so all processes agree.
"""
from __future__ import annotations

import contextlib
import logging
import math
import signal
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from torch.utils.tensorboard import SummaryWriter
from torchvision.transforms.functional import center_crop
from torchvision.utils import make_grid
from tqdm.auto import tqdm

from msretrieval.data.manifest import LabelledImageSet
from msretrieval.data.transforms import EvalTransform
from msretrieval.losses import create_loss
from msretrieval.losses.factory import HASHING_LOSSES
from msretrieval.losses.hashing import QuantizedLoss, SimilarityDistillation
from msretrieval.miners import MiningPhase, MiningSchedule, create_miner, follows_schedule
from msretrieval.miners.memory import EmbeddingMemory
from msretrieval.models.hashing import BetaSchedule, codes_of_output
from msretrieval.models.retrieval_net import RetrievalNet, create_model
from msretrieval.retrieval.evaluation.benchmarks import LabelledBenchmark
from msretrieval.retrieval.evaluation.harness import EvalSettings, evaluate_method
from msretrieval.release.load import load_release
from msretrieval.retrieval.descriptors.trained import TrainedModelMethod
from msretrieval.utils.cli import RunStopped
from msretrieval.utils.memory import release_free_memory

from .batches import Batch, ClassBalancedBatches, MiningPoolBatches, without_self_pairs
from .checkpoint import (LAST, atomic_write, load_training_state, rng_state, save_checkpoint, save_step_checkpoint,
                         set_rng_state)
from .data import BadTrainingData, ImageBatches, derived_seed, load_training_set, split_validation_classes
from .distributed import broadcast_from_main, gather_rows, gather_with_grad, shard_slice
from .evaluation import descriptor_scales
from .optimization import build_optimizer, freeze, mining_mode, set_train_mode

log = logging.getLogger(__name__)
#: What stops training gracefully (the first time; a second one stops at once).
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingDiverged(RunStopped):
    """``train.max_bad_steps`` optimiser steps in a row had a non-finite loss or gradient."""


def build_loss(lcfg: dict, hash_bits: int | None, num_classes: int):
    """The config's loss; on a hashing network with quantization / bit-balance terms (``QuantizedLoss``
    around triplet / contrastive, whose embeddings are the codes scaled by 1/sqrt(bits)) or CSQ / DPSH."""
    name, quantization, balance = lcfg["name"], lcfg["quantization_weight"], lcfg["balance_weight"]
    if name in HASHING_LOSSES:
        csq = name == "csq"  # dpsh needs neither the code length nor the classes
        return create_loss(name, quantization_weight=quantization, bits=hash_bits if csq else None,
                           num_classes=num_classes if csq else None)
    loss = create_loss(name, margin=lcfg["margin"])
    if quantization is None and balance is None:
        return loss
    return QuantizedLoss(loss, quantization or 0.0, balance or 0.0, code_scale=hash_bits ** 0.5)


def pair_distances(embeddings: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """Mean squared distance over all positive pairs and over all negative pairs of a batch."""
    dist = torch.cdist(embeddings, embeddings).pow(2)
    same = labels[:, None] == labels[None, :]
    positive = same & ~torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    mean = lambda mask: float(dist[mask].mean()) if bool(mask.any()) else float("nan")  # noqa: E731
    return mean(positive), mean(~same)


class Trainer:
    def __init__(self, config: dict, run_dir: Path, data_root: Path, accelerator: Accelerator,
                 images: LabelledImageSet | None = None):
        """``images``: the training set if already read (``training.config.check_inputs``), else read here."""
        self.config, self.run_dir, self.accelerator = config, Path(run_dir), accelerator
        self.device = accelerator.device
        self.seed = int(config["seed"])
        dcfg, mcfg, tcfg, mining = config["data"], config["model"], config["train"], config["mining"]
        images = images if images is not None else load_training_set(dcfg["train"], data_root)
        self.train_set, self.val_set = split_validation_classes(images, dcfg["val_classes"], self.seed)
        self.labels = np.asarray(self.train_set.labels)
        log.info("training on %d images of %d classes%s", len(self.train_set), self.train_set.num_classes,
                 f"; validating on {len(self.val_set)} images of {self.val_set.num_classes} held-out classes"
                 if self.val_set is not None else "; no validation classes (last checkpoint is evaluated)")
        self.new_hash_head = False
        if mcfg["init_from"]:  # weights, head set-up and preprocessing of a release (config adopted its shape)
            self.model = load_release(mcfg["init_from"]).model
            if mcfg["head"]["hash_bits"] and self.model.hash_bits is None:  # a float release learns to hash
                self.model.add_hash_head(mcfg["head"]["hash_bits"])
                self.new_hash_head = True
        else:
            self.model = create_model(mcfg["architecture"], backbone=mcfg["backbone"],
                                      pretrained=mcfg["pretrained"], weights=mcfg["weights"], **mcfg["head"])
        trainable = freeze(self.model, mcfg["trainable"])
        log.info("trainable parameters: %d of %d", sum(p.numel() for p in trainable),
                 sum(p.numel() for p in self.model.parameters()))
        self.model.to(self.device, memory_format=torch.channels_last)
        pre = self.model.preprocessing
        self.images = ImageBatches(self.train_set, dcfg["train_size"], pre.mean, pre.std, self.device,
                                   dcfg["workers"], dcfg["crop_scale"], dcfg["keep_decoded"], seed=self.seed)
        #: unreadable training images tolerated (more stop the run)
        self.max_bad_images = math.floor(dcfg["max_bad_fraction"] * len(self.train_set) + 1e-9)
        self.hash_bits = self.model.hash_bits
        self.beta_schedule = BetaSchedule.from_config(mcfg["hash_beta"], tcfg["steps"]) if self.hash_bits else None
        self.loss = build_loss(config["loss"], self.hash_bits, self.train_set.num_classes)
        distill = config["loss"]["distill_weight"]  # hashing only (config validation)
        #: the codes' similarities follow the float descriptors' (``loss.distill_weight``), or None
        self.distill = SimilarityDistillation(distill) if distill is not None else None
        # csq / dpsh train the codes u themselves from class labels (no triplets): labels as 0..C-1
        self.code_loss = config["loss"]["name"] in HASHING_LOSSES
        self.class_index = np.searchsorted(np.unique(self.labels), self.labels)
        # csq / dpsh use no triplets: the (idle) miner keeps the checkpoint and schedule code uniform
        miner_loss = create_loss("triplet", margin=config["loss"]["margin"]) if self.code_loss else self.loss
        self.miner = create_miner(mining["miner"], miner_loss, self.seed, one_per_class=mining["one_per_class"],
                                  loss_band=mining["loss_band"])
        self.schedule = MiningSchedule.from_config({"phases": mining["schedule"],
                                                    "refresh_every": mining["refresh_every"]})
        if not follows_schedule(mining["miner"]):  # semihard / hard pin the probability
            self.schedule = MiningSchedule((MiningPhase(self.miner.semi_hard_probability),))
        if mining["miner"] == "algorithm1":
            self.batches = MiningPoolBatches(self.labels, self.miner, self.schedule, tcfg["triplets_per_step"],
                                             mining["classes"], mining["per_class"], self.seed, self.embed_plain,
                                             agree=broadcast_from_main, micro_batches=tcfg["grad_accum"])
        else:
            self.batches = ClassBalancedBatches(self.labels, mining["classes_per_batch"],
                                                mining["images_per_class"], self.seed)
        #: in-batch mining also over past batches' embeddings (Algorithm 1 mines its own mining batch, and csq /
        #: dpsh use no triplets: neither has one)
        in_batch = isinstance(self.batches, ClassBalancedBatches) and not self.code_loss
        self.memory = EmbeddingMemory(mining["memory"]) if mining["memory"] and in_batch else None
        self.step = 0
        self.best = -1.0
        self.timing = {"train_seconds": 0.0, "images": 0, "validation_seconds": 0.0}
        self.skipped_steps = 0      # optimiser steps skipped for a non-finite loss or gradient, in all
        self.bad_streak = 0         # ... and in a row up to the current step
        self.last_saved_step: int | None = None
        self.stop_signal: int | None = None  # set by a SIGINT / SIGTERM handler during fit()
        self.interrupted: str | None = None  # the signal's name once fit() stopped for it
        self._logged_counts = (0, 0)          # (unreadable images, skipped steps) last sent to TensorBoard
        self.writer = SummaryWriter(str(run_dir / "tb")) if accelerator.is_main_process else None
        self.optimizer = self.scheduler = None

    # -- state -----------------------------------------------------------------------------------------------
    @property
    def unwrapped(self) -> RetrievalNet:
        return self.accelerator.unwrap_model(self.model)

    def training_state(self) -> dict:
        scaler = self.accelerator.scaler
        return {"step": self.step, "best": self.best, "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "batches": self.batches.state_dict(),
                "miner": self.miner.state_dict(), "memory": self.memory.state_dict() if self.memory else None,
                "scaler": scaler.state_dict() if scaler is not None else None,
                "rng": rng_state(), "config": self.config,
                "reliability": {"bad_images": [[index, str(self.train_set.paths[index]), reason]
                                               for index, reason in self.images.bad.items()],
                                "skipped_steps": self.skipped_steps, "bad_streak": self.bad_streak}}

    def save(self, name: str, metrics: dict | None = None) -> None:
        if self.accelerator.is_main_process:
            save_checkpoint(self.run_dir / name, self.unwrapped, self.training_state(), metrics)

    def checkpoint(self) -> None:
        """``step-N.pth`` and ``last.pth`` -> it, keeping the newest ``train.keep_checkpoints``."""
        if self.accelerator.is_main_process:
            save_step_checkpoint(self.run_dir, self.step, self.unwrapped, self.training_state(),
                                 self.config["train"]["keep_checkpoints"])
        self.last_saved_step = self.step

    def restore_reliability(self, saved: dict) -> None:
        """Unreadable files and skipped steps of the run so far (checkpoints written before they existed have
        none): a resumed run keeps skipping the files found unreadable, so it continues exactly."""
        for index, path, reason in saved.get("bad_images", []):
            if index < len(self.train_set) and str(self.train_set.paths[index]) == path:
                self.images.mark_bad(index, reason, found_here=False)
        self.skipped_steps, self.bad_streak = saved.get("skipped_steps", 0), saved.get("bad_streak", 0)

    def setup(self, resume_from: Path | None = None) -> None:
        if resume_from is None and self.accelerator.is_main_process:
            # DDP copies the main process's parameters to the others in prepare()
            if not self.config["model"]["init_from"]:
                self.initialise_head()
            elif self.new_hash_head:
                self.initialise_head(hash_only=True)
        self.optimizer, self.scheduler = build_optimizer(self.model, self.config["optim"],
                                                         self.config["train"]["steps"])
        scaler_state = None
        if resume_from is not None:
            state_dict, state = load_training_state(resume_from)
            self.model.load_state_dict(state_dict)
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.batches.load_state_dict(state["batches"])
            self.miner.load_state_dict(state["miner"])
            if self.memory is not None:
                self.memory.load_state_dict(state["memory"], self.device)
            set_rng_state(state["rng"])
            self.step, self.best, scaler_state = state["step"], state["best"], state["scaler"]
            self.restore_reliability(state.get("reliability", {}))
            self.last_saved_step = self.step
            log.info("resumed from %s at step %d", resume_from, self.step)
        if self.config["data"]["scan_images"]:  # all unreadable files counted before step 1
            acc = self.accelerator
            mine = np.arange(len(self.train_set))[shard_slice(len(self.train_set), acc.process_index,
                                                              acc.num_processes)]
            found = self.images.scan(mine)
            log.info("checked %d training images: %d unreadable", len(mine), found)
        self.model, self.optimizer = self.accelerator.prepare(self.model, self.optimizer)
        if scaler_state is not None and self.accelerator.scaler is not None:  # fp16's loss scale
            self.accelerator.scaler.load_state_dict(scaler_state)

    @torch.no_grad()
    def initialise_head(self, hash_only: bool = False) -> None:
        """k-means centroids (NetVLAD), the projection's PCA and the hashing layer's PCA from unaugmented
        training images (``hash_only``: the hashing layer added to a released network)."""
        count = min(self.config["model"]["init_images"], len(self.train_set))
        indices = np.random.default_rng(self.seed).choice(len(self.train_set), size=count, replace=False)
        self.model.eval()
        fmaps = [self.model.feature_map(self.images.load(indices[s:s + 32], batch=indices))
                 for s in tqdm(range(0, count, 32), desc="head set-up", unit="batch", leave=False,
                                disable=None)]
        if hash_only:
            self.model.head.initialise_hash(fmaps)
        else:
            self.model.head.initialise(fmaps)

    # -- embedding ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def embed_plain(self, indices: np.ndarray) -> torch.Tensor:
        """Unaugmented embeddings of ``indices`` (a mining batch), sharded over processes and gathered; the
        same (N, D) device tensor on every process. A hashing network gives its relaxed training codes
        (:func:`training.optimization.mining_mode`)."""
        acc = self.accelerator
        mine = np.asarray(indices)[shard_slice(len(indices), acc.process_index, acc.num_processes)]
        model = self.unwrapped
        chunk = self.config["train"]["forward_chunk"] or 64
        with mining_mode(model), acc.autocast():
            parts = [model(self.images.load(mine[s:s + chunk], batch=indices)).float()
                     for s in range(0, len(mine), chunk)]
        local = torch.cat(parts) if parts else torch.zeros(0, model.out_dim, device=self.device)
        return gather_rows(local, len(indices))

    # -- one optimiser step -----------------------------------------------------------------------------------
    def train_step(self) -> dict:
        acc, accum = self.accelerator, self.config["train"]["grad_accum"]
        set_train_mode(self.model)
        values: dict[str, float] = {"train/loss": 0.0}
        if isinstance(self.batches, ClassBalancedBatches):  # Algorithm 1 applies it at each mining round
            self.schedule.apply(self.miner, self.step)
        if self.beta_schedule is not None:
            values["hash/beta"] = self.beta_schedule.apply(self.unwrapped.head.hash, self.step)
        for micro in range(accum):
            batch = self.batches.next(self.step)
            values.update({f"mining/{k}": float(v) for k, v in batch.mining_stats.items()})
            count = len(batch.indices)
            rows = shard_slice(count, acc.process_index, acc.num_processes)
            seeds = [derived_seed(self.seed, self.step, micro, position) for position in range(count)]
            images = self.images.load(batch.indices[rows], seeds[rows], batch=batch.indices)
            labels = torch.as_tensor(self.labels[batch.indices], device=self.device)
            indices = torch.as_tensor(np.asarray(batch.indices), device=self.device)

            def batch_loss(embeddings: torch.Tensor, descriptors: torch.Tensor | None) -> torch.Tensor:
                """The loss of the whole (gathered) batch: the configured loss, plus the distillation term on
                the batch's codes and float descriptors."""
                loss = configured_loss(embeddings)
                if self.distill is None:
                    return loss
                return loss + self.distill(codes_of_output(embeddings, self.hash_bits), descriptors)

            def configured_loss(embeddings: torch.Tensor) -> torch.Tensor:
                """The configured loss of the whole batch, with this batch's triplets."""
                if self.code_loss:  # the network outputs u / sqrt(bits)
                    classes = torch.as_tensor(self.class_index[batch.indices], device=self.device)
                    return self.loss(codes_of_output(embeddings, self.hash_bits), classes)
                if batch.triplets is not None:
                    triplets = tuple(t.to(self.device) for t in batch.triplets)
                    self._last_triplets = [indices[t] for t in triplets]
                    return self.loss(embeddings, labels, triplets)
                if self.memory is None:  # the batch is its own reference set
                    mined = broadcast_from_main(self.miner(embeddings.detach(), labels))
                    reference, reference_labels, reference_indices = None, None, indices
                else:  # anchors from the batch; positives and negatives from the batch, then the memory
                    reference, reference_labels, reference_indices = self.memory.reference(embeddings, labels,
                                                                                           indices)
                    mined = broadcast_from_main(self.miner(embeddings.detach(), labels, reference.detach(),
                                                           reference_labels))
                    values["mining/memory_size"] = len(self.memory)
                triplets = without_self_pairs(mined, indices, reference_indices)
                values.update({f"mining/{k}": float(v) for k, v in self.miner.last_stats.items()})
                values["mining/num_triplets"] = len(triplets[0])  # what the loss gets (self-pairs dropped)
                self._last_triplets = [indices[triplets[0]], reference_indices[triplets[1]],
                                       reference_indices[triplets[2]]]  # as dataset indices
                return self.loss(embeddings, labels, triplets, reference, reference_labels)

            loss, embeddings = self.forward_backward(images, count, batch_loss, scale=1 / accum,
                                                     last_micro_batch=micro == accum - 1)
            values["train/loss"] += float(loss) / accum
            if self.memory is not None:
                self.memory.add(embeddings, labels, indices)
            values.update({f"loss/{k}": v for k, v in getattr(self.loss, "last_terms", {}).items()})
            if self.distill is not None:
                values.update({f"loss/{k}": v for k, v in self.distill.last_terms.items()})
            positive, negative = pair_distances(embeddings, labels)
            values.update({"batch/mean_pos_distance": positive, "batch/mean_neg_distance": negative})
            self.timing["images"] += count
        problem = self.numerical_problem(values["train/loss"])
        if problem is None:
            self.optimizer.step()
            self.bad_streak = 0
        else:  # parameters and optimiser state stay as they are
            self.skipped_steps += 1
            self.bad_streak += 1
            log.warning("step %d: %s; optimiser step skipped (%d in a row, train.max_bad_steps = %d)", self.step + 1,
                        problem, self.bad_streak, self.config["train"]["max_bad_steps"])
        with warnings.catch_warnings():  # the schedule follows the step count, skipped steps included
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step", category=UserWarning)
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        values["train/skipped_steps"] = self.skipped_steps
        return values

    def numerical_problem(self, loss: float) -> str | None:
        """Why this step's update must not be applied (a non-finite loss or gradient), or None. The loss is
        the whole batch's and the gradients are already averaged over processes, so every process agrees."""
        if not math.isfinite(loss):
            return f"the loss is {loss}"
        if self.accelerator.scaler is not None:  # fp16: the GradScaler skips overflowing steps itself
            return None
        named = [(name, p.grad) for name, p in self.unwrapped.named_parameters() if p.grad is not None]
        if not named:
            return None
        finite = torch.stack([torch.isfinite(grad).all() for _, grad in named])
        if bool(finite.all()):
            return None
        bad = [name for (name, _), ok in zip(named, finite.tolist()) if not ok]
        return f"non-finite gradient in {len(bad)} parameter tensor(s) ({', '.join(bad[:3])})"

    def forward_backward(self, images: torch.Tensor, count: int, batch_loss, scale: float,
                         last_micro_batch: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Embed this process's shard, gather the global batch, backpropagate ``scale * batch_loss(embeddings,
        descriptors)`` (``descriptors``: the float descriptors of the same pass for the distillation term, else
        None; gathered without gradient). Returns the loss and the gathered embeddings (both detached).

        ``train.forward_chunk`` = c smaller than the shard bounds activation memory to c images: the shard is
        first embedded without gradient, the loss's gradient with respect to those embeddings is computed,
        and each chunk is then embedded again with gradient and backpropagated with its part of that
        gradient (gradient caching, Gao et al. 2021): the same gradient as one pass, one extra forward pass
        without gradient. A convolution's float rounding depends slightly on its batch size, so a
        one-process run with c = the per-process shard reproduces an N-process run bit for bit."""
        acc = self.accelerator
        chunk = self.config["train"]["forward_chunk"]
        sync = contextlib.nullcontext if last_micro_batch else (lambda: acc.no_sync(self.model))
        if not chunk or chunk >= len(images):
            with sync():
                local, local_descriptors = self.embed(images)
                embeddings = gather_with_grad(local, count)
                loss = batch_loss(embeddings, self.gather_descriptors(local_descriptors, count))
                acc.backward(loss * scale)
            return loss.detach(), embeddings.detach()
        starts = range(0, len(images), chunk)
        with torch.no_grad():
            parts = [self.embed(images[s:s + chunk]) for s in starts]
        cached = torch.cat([output for output, _ in parts])
        descriptors = None if self.distill is None else torch.cat([descriptor for _, descriptor in parts])
        cached.requires_grad_(True)
        embeddings = gather_with_grad(cached, count)
        loss = batch_loss(embeddings, self.gather_descriptors(descriptors, count))
        acc.backward(loss * scale)  # d loss / d cached (scaled by fp16's GradScaler if one is active)
        for i, s in enumerate(starts):
            with (sync() if i == len(starts) - 1 else acc.no_sync(self.model)):
                with acc.autocast():
                    part = self.model(images[s:s + chunk]).float()
                part.backward(cached.grad[s:s + chunk])
        return loss.detach(), embeddings.detach()

    def embed(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The network's output for ``images`` (float32) and, when the distillation term needs them, the float
        descriptors of the same pass (else None)."""
        with self.accelerator.autocast():
            if self.distill is None:
                return self.model(images).float(), None
            output, descriptors = self.model(images, with_descriptor=True)
        return output.float(), descriptors.float()

    @staticmethod
    def gather_descriptors(local: torch.Tensor | None, count: int) -> torch.Tensor | None:
        return None if local is None else gather_rows(local, count)

    # -- the loop ---------------------------------------------------------------------------------------------
    def fit(self) -> None:
        """Train up to ``train.steps``. Returns early, with ``interrupted`` set and ``last.pth`` written, after
        a SIGINT / SIGTERM; raises :class:`TrainingDiverged` / :class:`BadTrainingData` (a :class:`RunStopped`)
        when the run cannot go on."""
        tcfg = self.config["train"]
        steps = tcfg["steps"]
        progress = tqdm(total=steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True,
                        disable=None if self.accelerator.is_main_process else True)  # None: off unless a terminal
        previous_handlers = self._catch_stop_signals()
        checkpoint_due = False
        try:
            self.share_events()  # unreadable files met while setting up the head
            while self.step < steps:
                tick = time.perf_counter()
                values = self.train_step()
                self.timing["train_seconds"] += time.perf_counter() - tick
                self.step += 1
                progress.update(1)
                progress.set_postfix(loss=f"{values['train/loss']:.4f}")
                stop = self.share_events()
                values["data/bad_images"] = len(self.images.bad)
                counts = (len(self.images.bad), self.skipped_steps)  # logged whenever they change
                if self.step % tcfg["log_every"] == 0 or self.step == 1 or counts != self._logged_counts:
                    values["train/lr"] = self.scheduler.get_last_lr()[0]
                    values["train/images_per_second"] = self.timing["images"] / max(self.timing["train_seconds"], 1e-9)
                    self.log_scalars(values)
                    self._logged_counts = counts
                if self.bad_streak >= tcfg["max_bad_steps"]:
                    raise TrainingDiverged(self.diverged_message())
                if tcfg["triplet_grid_every"] and (self.step - 1) % tcfg["triplet_grid_every"] == 0:
                    self.log_triplet_grid()
                if self.val_set is not None and ((tcfg["eval_every"] and self.step % tcfg["eval_every"] == 0)
                                                 or self.step == steps):
                    self.validate()
                checkpoint_due |= self.step % tcfg["checkpoint_every"] == 0 or self.step == steps
                # during a run of skipped steps a due checkpoint waits for the next good step (or the end)
                if checkpoint_due and (self.bad_streak == 0 or self.step == steps):
                    self.checkpoint()
                    checkpoint_due = False
                    log.info("step %d/%d: loss %.4f, %.1f img/s", self.step, steps, values["train/loss"],
                             self.timing["images"] / max(self.timing["train_seconds"], 1e-9))
                if stop is None and self.accelerator.num_processes == 1:
                    stop = self.stop_signal  # one received during validation or the checkpoint
                if stop:
                    if self.last_saved_step != self.step:
                        self.checkpoint()
                    self.interrupted = signal.Signals(stop).name
                    log.warning("%s: stopped after step %d/%d; %s is written", self.interrupted, self.step, steps,
                                self.run_dir / LAST)
                    break
        finally:
            for signum, handler in previous_handlers.items():
                signal.signal(signum, handler)
            progress.close()
            if self.writer is not None:
                self.writer.flush()  # the last events would otherwise be lost when the process ends
        self.report_reliability()

    def _catch_stop_signals(self) -> dict:
        """The first SIGINT / SIGTERM asks the loop to stop after the current step; a second one stops at once
        (KeyboardInterrupt). Returns the handlers to put back. Only the main thread can set handlers."""
        if threading.current_thread() is not threading.main_thread():
            return {}

        def on_signal(signum, frame):
            if self.stop_signal is not None:
                raise KeyboardInterrupt
            self.stop_signal = signum
            log.warning("%s received: finishing step %d, then writing a checkpoint and stopping (send it again to "
                        "stop at once, without a checkpoint)", signal.Signals(signum).name, self.step + 1)

        previous = {}
        for signum in STOP_SIGNALS:
            previous[signum] = signal.getsignal(signum)
            signal.signal(signum, on_signal)
        return previous

    def share_events(self) -> int | None:
        """After each step: the unreadable files every process found (merged into every process's record,
        listed in RUN_DIR/bad_images.txt) and any stop signal (so all processes stop at the same step).
        Raises :class:`BadTrainingData` beyond ``data.max_bad_fraction``. Returns the stop signal or None."""
        local = {"bad": [(index, self.images.bad[index]) for index in self.images.new_bad],
                 "signal": self.stop_signal}
        self.images.new_bad.clear()
        everyone = gather_object([local]) if self.accelerator.num_processes > 1 else [local]
        for events in everyone:
            for index, reason in events["bad"]:
                self.images.mark_bad(index, reason, found_here=False)
        if any(events["bad"] for events in everyone) and self.accelerator.is_main_process:
            listing = "".join(f"{path}\t{reason}\n" for path, reason in zip(self.images.bad_paths(),
                                                                               self.images.bad.values()))
            atomic_write(self.run_dir / "bad_images.txt", lambda handle: handle.write(listing.encode()))
        if len(self.images.bad) > self.max_bad_images:
            raise BadTrainingData(self.too_many_bad_message())
        return next((events["signal"] for events in everyone if events["signal"]), None)

    def too_many_bad_message(self) -> str:
        paths, total = self.images.bad_paths(), len(self.train_set)
        fraction = self.config["data"]["max_bad_fraction"]
        shown = ", ".join(paths[:3]) + (", ..." if len(paths) > 3 else "")
        return (f"{len(paths)} of the {total} training images are unreadable, more than data.max_bad_fraction = "
                f"{fraction} allows ({self.max_bad_images}): {shown} (all in {self.run_dir / 'bad_images.txt'}); "
                f"{self.checkpoint_note()}")

    def diverged_message(self) -> str:
        return (f"stopping at step {self.step}: {self.bad_streak} optimiser steps in a row had a non-finite loss or "
                f"gradient and were skipped (train.max_bad_steps = {self.config['train']['max_bad_steps']}); "
                f"{self.checkpoint_note()}")

    def checkpoint_note(self) -> str:
        if self.last_saved_step is None:
            return "no checkpoint was written"
        return (f"the last checkpoint, {self.run_dir / LAST} (step {self.last_saved_step}), is intact: fix the cause, "
                f"then resume with --resume {self.run_dir}")

    def reliability_report(self) -> dict:
        """For results.json: unreadable training images (count, the first 100 paths) and skipped steps."""
        paths = self.images.bad_paths()
        return {"bad_images": len(paths), "bad_image_paths": paths[:100],
                "bad_image_list": str(self.run_dir / "bad_images.txt") if paths else None,
                "skipped_steps": self.skipped_steps}

    def report_reliability(self) -> None:
        paths = self.images.bad_paths()
        if paths:
            log.warning("%d unreadable training image(s) were skipped (listed in %s): %s%s", len(paths),
                        self.run_dir / "bad_images.txt", ", ".join(paths[:5]), ", ..." if len(paths) > 5 else "")
        if self.skipped_steps:
            log.warning("%d optimiser step(s) were skipped for a non-finite loss or gradient", self.skipped_steps)

    def validate(self) -> None:
        """Retrieval on the held-out validation classes; ``best.pth`` keeps the best mAP so far."""
        tick = time.perf_counter()
        if self.accelerator.is_main_process:
            ecfg = self.config["eval"]
            benchmark = LabelledBenchmark(name="validation", images=self.val_set)
            method = TrainedModelMethod(self.unwrapped, name="model", scales=descriptor_scales(self.config))
            settings = EvalSettings(image_size=ecfg["image_size"], batch_size=ecfg["batch_size"],
                                    device=str(self.device), cache_dir=None, num_workers=ecfg["workers"])
            metrics = evaluate_method(method, benchmark, settings).metrics
            self.log_scalars({f"val/{k}": v for k, v in metrics.items()})
            log.info("step %d: validation mAP %.4f, R@1 %.4f", self.step, metrics["mAP"], metrics["R@1"])
            if metrics["mAP"] > self.best:
                self.best = metrics["mAP"]
                self.save("best.pth", metrics)
        self.accelerator.wait_for_everyone()
        release_free_memory()
        self.timing["validation_seconds"] += time.perf_counter() - tick

    # -- logging ----------------------------------------------------------------------------------------------
    def log_scalars(self, values: dict) -> None:
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(key, value, self.step)

    def log_triplet_grid(self, count: int = 4, size: int = 96) -> None:
        """TensorBoard image: triplets of the last step, one row each (anchor, positive, negative)."""
        if self.writer is None or not hasattr(self, "_last_triplets"):
            return
        rows = list(zip(*(t.tolist() for t in self._last_triplets)))[:count]
        if not rows:
            return
        thumbnail = EvalTransform(size, "shorter", (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
        decoded = [self.images.decode_or_none(index) for row in rows for index in row]
        tiles = [center_crop(thumbnail(image), [size, size]) if image is not None
                 else torch.zeros(3, size, size) for image in decoded]  # black: an unreadable file
        self.writer.add_image("mining/triplets", make_grid(tiles, nrow=3, padding=2), self.step)

    def close(self) -> None:
        self.images.close()
        self.images.decoded = None
        if self.writer is not None:
            self.writer.close()
        release_free_memory()
