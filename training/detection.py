"""Training and evaluation of the landmark detector (``models.detector``) on a box CSV (``data.boxes``).

The loop behind ``scripts/train_detector.py``:

* **Data**: rows of split ``train`` train; ``val_fraction`` of those *images* (seeded) are held out for
  validation; split ``test`` is read only by the final evaluation (``eval_split="test"``), of the best
  checkpoint. Images are resized as the detector's own transform would (shorter side ``min_size``, longer at
  most ``max_size``) when loaded; horizontal flips with probability 0.5.
* **Order**: the batch of step s is fixed by (seed, s) alone (a seeded permutation per epoch, flips from a
  per-step generator), so a resumed run sees the same batches; the global torch RNG (the RPN's and RoI
  heads' sampling) is checkpointed too.
* **Optimiser**: AdamW (lr 2e-4, weight decay 1e-4) by default, or SGD (momentum 0.9); linear warm-up, then
  cosine decay to 0 at the last step; gradients clipped to norm 10.
* **Validation** every ``eval_every`` steps, at step 0 (the untrained model) and at the end: AP@0.5 and recall
  of all detections (score > 0, NMS at the config's threshold, at most 100 per image; the full-image region is
  not a detection), plus the recall of what ``propose`` keeps (score > 0.3, at most 4). ``best.pth`` keeps the
  best validation AP; ``last.pth`` is written at every evaluation (atomically) and resumes the run.
* **Logs**: TensorBoard scalars in RUN_DIR/tb (the four Faster R-CNN losses, their sum, learning rate,
  images/s, validation and test metrics), ``logging`` lines, a tqdm bar on terminals; ``results.json`` at the
  end.
"""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torch.utils.tensorboard import SummaryWriter
from tqdm.auto import tqdm

from msretrieval.data.boxes import BoxImage, read_box_csv
from msretrieval.data.images import load_image
from msretrieval.models.boxes import detection_metrics
from msretrieval.models.detector import (DetectorConfig, LandmarkDetector, atomic_save, build_detector,
                                         detector_from_checkpoint, detector_payload, read_detector_checkpoint)
from msretrieval.utils.errors import UserError

log = logging.getLogger(__name__)

#: Flags of a run and their defaults (``scripts/train_detector.py`` exposes them all).
DEFAULTS = {
    "boxes": None, "image_root": None, "test_boxes": None, "skip_missing": False,
    "steps": 600, "batch_size": 4, "optimizer": "adamw", "lr": 2e-4, "weight_decay": 1e-4, "momentum": 0.9,
    "warmup": 20, "grad_clip": 10.0, "val_fraction": 0.1, "eval_every": 100, "eval_split": None, "seed": 0,
    "backbone": "tf_efficientnet_lite0", "pretrained": True, "weights": None, "tap": "blocks4",
    "min_size": 320, "max_size": 512, "frozen_blocks": 2, "workers": 0, "log_every": 10,
}
#: What may change when a run is resumed (everything else defines the run).
RESUMABLE_OVERRIDES = ("steps", "eval_every", "eval_split", "workers", "log_every")
#: Detection settings of the validation/test AP.
EVAL_MAX_DETECTIONS = 100


@dataclass
class Splits:
    train: list[BoxImage]
    val: list[BoxImage]
    test: list[BoxImage]


def load_splits(options: dict) -> Splits:
    """The box CSV(s) -> train / validation (held-out train images) / test images."""
    images = read_box_csv(options["boxes"], options["image_root"], skip_missing=options["skip_missing"])
    if options["test_boxes"]:
        test_images = read_box_csv(options["test_boxes"], options["image_root"], default_split="test",
                                   skip_missing=options["skip_missing"])
        for image in test_images:
            image.split = "test"
        images = images + test_images
    train = [image for image in images if image.split == "train"]
    test = [image for image in images if image.split == "test"]
    if not train:
        splits = sorted({image.split for image in images})
        raise UserError(f"{options['boxes']}: no image of split 'train' (splits found: {splits})")
    fraction = float(options["val_fraction"])
    if not 0.0 <= fraction < 1.0:
        raise UserError(f"val_fraction must lie in [0, 1), got {fraction}")
    order = np.random.default_rng(options["seed"]).permutation(len(train))
    num_val = int(round(fraction * len(train)))
    if fraction > 0 and num_val == 0 and len(train) > 1:
        num_val = 1
    if num_val >= len(train):
        raise UserError(f"val_fraction {fraction} leaves no training image of {len(train)}")
    val_ids = set(order[:num_val].tolist())
    return Splits(train=[im for i, im in enumerate(train) if i not in val_ids],
                  val=[im for i, im in enumerate(train) if i in val_ids], test=test)


def resize_for(image: Image.Image, min_size: int, max_size: int) -> Image.Image:
    """The size GeneralizedRCNNTransform would resize to (shorter side min_size, longer <= max_size), done
    once at loading so large photos do not travel at full size; never upsamples (the transform does)."""
    width, height = image.size
    scale = min(min_size / min(width, height), max_size / max(width, height))
    if scale >= 1.0:
        return image
    return image.resize((max(1, round(width * scale)), max(1, round(height * scale))), Image.BILINEAR)


def load_sample(image: BoxImage, min_size: int, max_size: int, flip: bool) -> tuple[torch.Tensor, dict]:
    """(3, H, W) tensor in [0, 1] and its Faster R-CNN target (pixel boxes, labels 1)."""
    picture = resize_for(load_image(image.path), min_size, max_size)
    tensor = TF.to_tensor(picture)
    boxes = torch.from_numpy(image.boxes.astype(np.float32)).reshape(-1, 4)
    if flip:
        tensor = tensor.flip(-1)
        boxes = torch.stack([1 - boxes[:, 2], boxes[:, 1], 1 - boxes[:, 0], boxes[:, 3]], dim=1)
    height, width = tensor.shape[-2:]
    boxes = boxes * torch.tensor([width, height, width, height], dtype=torch.float32)
    return tensor, {"boxes": boxes, "labels": torch.ones(len(boxes), dtype=torch.int64)}


class StepBatches(torch.utils.data.Dataset):
    """Item s = the whole batch of step s (image indices from the epoch's seeded permutation, flips from a
    per-step generator): a stateless order that resumes exactly, loadable by DataLoader workers."""

    def __init__(self, images: list[BoxImage], batch_size: int, seed: int, min_size: int, max_size: int,
                 first_step: int, last_step: int):
        self.images, self.batch_size, self.seed = images, batch_size, seed
        self.min_size, self.max_size = min_size, max_size
        self.first_step, self.last_step = first_step, last_step

    def __len__(self) -> int:
        return max(0, self.last_step - self.first_step)

    def indices(self, step: int) -> list[int]:
        n = len(self.images)
        positions = range(step * self.batch_size, (step + 1) * self.batch_size)
        permutations: dict[int, np.ndarray] = {}
        chosen = []
        for position in positions:
            epoch = position // n
            if epoch not in permutations:
                permutations[epoch] = np.random.default_rng([self.seed, epoch]).permutation(n)
            chosen.append(int(permutations[epoch][position % n]))
        return chosen

    def __getitem__(self, item: int):
        step = self.first_step + item
        flips = np.random.default_rng([self.seed, 1_000_003, step]).random(self.batch_size) < 0.5
        samples = [load_sample(self.images[i], self.min_size, self.max_size, bool(f))
                   for i, f in zip(self.indices(step), flips)]
        return [s[0] for s in samples], [s[1] for s in samples]


def evaluate_detector(detector: LandmarkDetector, images: list[BoxImage], batch_size: int = 8,
                      desc: str = "evaluate") -> dict:
    """AP@0.5 / recall of all detections and the recall/precision of ``propose``'s regions on ``images``."""
    config = detector.config
    predictions, truth = [], []
    for start in tqdm(range(0, len(images), batch_size), desc=desc, unit="batch", leave=False, disable=None):
        chunk = images[start:start + batch_size]
        pictures = [resize_for(load_image(image.path), config.min_size, config.max_size) for image in chunk]
        predictions += detector.detect(pictures, score_threshold=0.0, nms_threshold=config.nms_threshold,
                                       max_detections=EVAL_MAX_DETECTIONS, batch_size=batch_size)
        truth += [image.boxes for image in chunk]
    full = detection_metrics(predictions, truth, iou=0.5)
    kept = []
    for boxes, scores in predictions:  # what propose() returns (besides the full image)
        keep = np.nonzero(scores > config.score_threshold)[0][: config.max_boxes]
        kept.append((boxes[keep], scores[keep]))
    proposed = detection_metrics(kept, truth, iou=0.5)
    return {"ap50": full.ap, "recall50": full.recall, "proposal_recall50": proposed.recall,
            "proposal_precision50": proposed.precision,
            "proposals_per_image": proposed.num_predictions / max(len(images), 1),
            "images": len(images), "boxes": full.num_ground_truth}


def _lr_factor(step: int, warmup: int, steps: int) -> float:
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _optimizer(detector: LandmarkDetector, options: dict) -> torch.optim.Optimizer:
    parameters = [p for p in detector.parameters() if p.requires_grad]
    if options["optimizer"] == "adamw":
        return torch.optim.AdamW(parameters, lr=options["lr"], weight_decay=options["weight_decay"])
    if options["optimizer"] == "sgd":
        return torch.optim.SGD(parameters, lr=options["lr"], momentum=options["momentum"],
                               weight_decay=options["weight_decay"])
    raise UserError(f"unknown optimizer {options['optimizer']!r} (adamw or sgd)")


def _finite(metrics: dict) -> dict:
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}


class DetectorTrainer:
    """One run in ``run_dir``: ``DetectorTrainer.start(run_dir, options)`` or ``.resume(run_dir, overrides)``,
    then ``fit()`` and ``finish()``."""

    def __init__(self, run_dir: Path, options: dict, detector: LandmarkDetector, state: dict | None = None,
                 splits: Splits | None = None):
        self.run_dir, self.options, self.detector = run_dir, options, detector
        self.splits = splits if splits is not None else load_splits(options)
        log.info("images: %d train, %d validation, %d test (boxes: %d, %d, %d)",
                 *(len(s) for s in (self.splits.train, self.splits.val, self.splits.test)),
                 *(sum(len(im.boxes) for im in s) for s in (self.splits.train, self.splits.val, self.splits.test)))
        self.optimizer = _optimizer(detector, options)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: _lr_factor(step, int(options["warmup"]), int(options["steps"])))
        self.step, self.best_ap, self.best_step = 0, -math.inf, None
        self.history: list[dict] = []
        self.timing = {"train_seconds": 0.0, "images": 0, "eval_seconds": 0.0}
        if state is not None:
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.step, self.best_step = int(state["step"]), state["best_step"]
            self.best_ap = -math.inf if state["best_ap"] is None else float(state["best_ap"])
            self.history, self.timing = list(state["history"]), dict(state["timing"])
            torch.set_rng_state(state["torch_rng"])
        self.writer = SummaryWriter(str(run_dir / "tb"))

    # -- construction -----------------------------------------------------------------------------------------
    @classmethod
    def start(cls, run_dir: str | Path, options: dict) -> "DetectorTrainer":
        options = {**DEFAULTS, **options}
        unknown = set(options) - set(DEFAULTS)
        if unknown:
            raise ValueError(f"unknown option(s) {sorted(unknown)}")
        if not options["boxes"]:
            raise UserError("a box CSV is needed (--boxes)")
        run_dir = Path(run_dir)
        if run_dir.exists() and any(run_dir.iterdir()):
            raise FileExistsError(f"{run_dir} exists and is not empty: pick a new --out, or --resume it")
        splits = load_splits(options)  # bad data fails before anything is written
        run_dir.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(int(options["seed"]))
        config = DetectorConfig(backbone=options["backbone"], tap=options["tap"], min_size=int(options["min_size"]),
                                max_size=int(options["max_size"]), frozen_blocks=int(options["frozen_blocks"]))
        detector = build_detector(config, pretrained=bool(options["pretrained"]), weights=options["weights"])
        log.info("detector: %s (%s weights), tap %s, anchors %s, %d trainable parameters", config.backbone,
                 detector.weights_tag, config.tap, list(config.anchor_sizes),
                 sum(p.numel() for p in detector.parameters() if p.requires_grad))
        (run_dir / "options.json").write_text(json.dumps(options, indent=2, default=str) + "\n")
        return cls(run_dir, options, detector, splits=splits)

    @classmethod
    def resume(cls, run_dir: str | Path, overrides: dict | None = None) -> "DetectorTrainer":
        run_dir = Path(run_dir)
        path = run_dir if run_dir.is_file() else run_dir / "last.pth"
        if not path.is_file():
            raise FileNotFoundError(f"nothing to resume: {path} does not exist")
        checkpoint = read_detector_checkpoint(path)
        state = checkpoint.get("training_state")
        if not isinstance(state, dict):
            raise UserError(f"{path} is not a resumable training checkpoint (no training state)")
        options = dict(state["options"])
        for key, value in (overrides or {}).items():
            if key not in RESUMABLE_OVERRIDES:
                raise UserError(f"--{key.replace('_', '-')} cannot change when resuming (only "
                                 f"{', '.join(RESUMABLE_OVERRIDES)})")
            options[key] = value
        if int(options["steps"]) < int(state["step"]):
            raise UserError(f"{path} is at step {state['step']}, beyond --steps {options['steps']}")
        detector = detector_from_checkpoint(checkpoint)
        log.info("resuming %s at step %d of %d", path, state["step"], options["steps"])
        return cls(path.parent, options, detector, state)

    # -- checkpoints ------------------------------------------------------------------------------------------
    def training_state(self) -> dict:
        return {"step": self.step, "options": {k: v for k, v in self.options.items()},
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "best_ap": None if not math.isfinite(self.best_ap) else self.best_ap, "best_step": self.best_step,
                "history": self.history, "timing": self.timing, "torch_rng": torch.get_rng_state()}

    def save(self, name: str, metrics: dict | None = None) -> None:
        payload = detector_payload(self.detector, {"training_state": self.training_state(),
                                                   "metrics": _finite(metrics or {})})
        atomic_save(payload, self.run_dir / name)

    # -- the loop ---------------------------------------------------------------------------------------------
    def fit(self) -> None:
        options, config = self.options, self.detector.config
        steps, eval_every = int(options["steps"]), int(options["eval_every"])
        if self.step == 0 and self.splits.val:
            self.validate()
        batches = StepBatches(self.splits.train, int(options["batch_size"]), int(options["seed"]), config.min_size,
                              config.max_size, self.step, steps)
        # Its own generator: creating the iterator must not draw from the global RNG (resumed runs would then
        # sample different RPN anchors than uninterrupted ones).
        loader = torch.utils.data.DataLoader(batches, batch_size=None, shuffle=False,
                                             num_workers=int(options["workers"]),
                                             generator=torch.Generator().manual_seed(int(options["seed"])))
        progress = tqdm(total=steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True, disable=None)
        self.detector.train()
        for images, targets in loader:
            tick = time.perf_counter()
            losses = self.detector(images, targets)
            loss = sum(losses.values())
            if not torch.isfinite(loss):
                raise FloatingPointError(f"step {self.step + 1}: loss is {loss.item()} "
                                         f"({ {k: v.item() for k, v in losses.items()} }); lower --lr")
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(
                [p for p in self.detector.parameters() if p.requires_grad], float(options["grad_clip"]))
            self.optimizer.step()
            self.scheduler.step()
            self.timing["train_seconds"] += time.perf_counter() - tick
            self.timing["images"] += len(images)
            self.step += 1
            progress.update(1)
            progress.set_postfix(loss=f"{loss.item():.3f}")
            if self.step % int(options["log_every"]) == 0 or self.step == 1:
                values = {f"train/{k}": v.item() for k, v in losses.items()}
                values["train/loss"] = loss.item()
                values["train/lr"] = self.scheduler.get_last_lr()[0]
                values["train/images_per_second"] = self.timing["images"] / max(self.timing["train_seconds"], 1e-9)
                self.log_scalars(values)
            if (eval_every and self.step % eval_every == 0) or self.step == steps:
                if self.splits.val:
                    self.validate()
                self.save("last.pth")
                log.info("step %d/%d: loss %.4f, %.2f steps/s (%.1f images/s)", self.step, steps, loss.item(),
                         self.step_rate(), self.timing["images"] / max(self.timing["train_seconds"], 1e-9))
                self.detector.train()
        progress.close()
        self.writer.flush()

    def step_rate(self) -> float:
        trained_steps = self.timing["images"] / max(int(self.options["batch_size"]), 1)
        return trained_steps / max(self.timing["train_seconds"], 1e-9)

    def validate(self) -> dict:
        tick = time.perf_counter()
        metrics = evaluate_detector(self.detector, self.splits.val, desc="validation")
        self.timing["eval_seconds"] += time.perf_counter() - tick
        self.log_scalars({f"val/{k}": v for k, v in metrics.items() if k not in ("images", "boxes")})
        self.history.append({"step": self.step, **_finite(metrics)})
        log.info("step %d: validation AP@0.5 %.4f, recall %.4f, proposal recall %.4f (%.2f regions/image)",
                 self.step, metrics["ap50"], metrics["recall50"], metrics["proposal_recall50"],
                 metrics["proposals_per_image"])
        if metrics["ap50"] > self.best_ap:
            self.best_ap, self.best_step = metrics["ap50"], self.step
            self.save("best.pth", metrics)
        return metrics

    def log_scalars(self, values: dict) -> None:
        for key, value in values.items():
            if isinstance(value, (int, float)) and math.isfinite(value):
                self.writer.add_scalar(key, value, self.step)

    def finish(self) -> dict:
        """The final record (results.json); with ``eval_split="test"`` the best checkpoint (else the last) is
        evaluated on the test images, once."""
        results = {
            "steps": self.step, "best_step": self.best_step,
            "best_val_ap50": None if not math.isfinite(self.best_ap) else self.best_ap,
            "validation": self.history,
            "train_seconds": round(self.timing["train_seconds"], 1),
            "eval_seconds": round(self.timing["eval_seconds"], 1),
            "steps_per_second": self.step_rate(),
            "images_per_second": self.timing["images"] / max(self.timing["train_seconds"], 1e-9),
            "config": self.detector.config.to_dict(), "options": self.options,
        }
        split = self.options["eval_split"]
        if split:
            if split != "test":
                raise UserError(f"eval_split must be 'test' (or unset), got {split!r}")
            if not self.splits.test:
                raise UserError("--eval-split test: the box CSV has no image of split 'test'")
            chosen = self.run_dir / ("best.pth" if (self.run_dir / "best.pth").is_file() else "last.pth")
            detector = detector_from_checkpoint(read_detector_checkpoint(chosen))
            tick = time.perf_counter()
            metrics = evaluate_detector(detector, self.splits.test, desc="test")
            results["test"] = {"checkpoint": chosen.name, **_finite(metrics),
                               "seconds": round(time.perf_counter() - tick, 1)}
            self.log_scalars({f"test/{k}": v for k, v in metrics.items() if k not in ("images", "boxes")})
            log.info("test (%s): AP@0.5 %.4f, recall %.4f, proposal recall %.4f on %d images", chosen.name,
                     metrics["ap50"], metrics["recall50"], metrics["proposal_recall50"], metrics["images"])
        self.writer.close()
        (self.run_dir / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
        return results
