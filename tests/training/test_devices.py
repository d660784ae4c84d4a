"""Every tensor of a training step lives on ``accelerator.device``: model inputs, labels, embeddings, gathered
mining embeddings and mined triplets. On this CPU-only machine the device is the CPU, so the step is also run
with its tensors recorded; the loading path is checked against another device (``meta``) directly, and
``scripts/gpu_check.py`` runs the real thing on CUDA."""
from __future__ import annotations

import torch
import yaml

import train
from msretrieval.data.manifest import read_csv_manifest
from msretrieval.training.data import ImageBatches
from msretrieval.training.distributed import gather_rows
from msretrieval.training.trainer import Trainer


def test_batches_are_built_on_the_requested_device(flowers_subset):
    images = read_csv_manifest(flowers_subset({"train": [1, 2]}, per_class=2))
    loader = ImageBatches(images, 64, (0.5,) * 3, (0.5,) * 3, torch.device("meta"), workers=1)
    for batch in (loader.load([0, 1, 2]), loader.load([0, 3], seeds=[1, 2]), loader.load([])):
        assert batch.device.type == "meta" and batch.shape[1:] == (3, 64, 64)
    assert loader.load([0, 1]).is_contiguous(memory_format=torch.channels_last)  # NHWC, the fast CPU layout
    assert gather_rows(torch.zeros(3, 4, device="meta"), 3).device.type == "meta"


def test_every_tensor_of_a_step_is_on_the_accelerator_device(tmp_path, flowers_subset, monkeypatch):
    manifest = flowers_subset({"train": [1, 2, 3]}, per_class=4)
    seen: list[tuple[str, torch.device]] = []
    original_step = Trainer.train_step

    def recording_step(self):
        device = self.accelerator.device
        hook = self.model.register_forward_pre_hook(lambda _m, args: seen.append(("input", args[0].device)))
        loss_forward = self.loss.forward
        self.loss.forward = lambda e, l, t: (seen.extend([("embeddings", e.device), ("labels", l.device)]
                                                         + [("triplets", x.device) for x in t]),
                                            loss_forward(e, l, t))[1]
        try:
            return original_step(self)
        finally:
            hook.remove()
            self.loss.forward = loss_forward
            assert all(where == device for _, where in seen), seen

    embed = Trainer.embed_plain
    monkeypatch.setattr(Trainer, "train_step", recording_step)
    monkeypatch.setattr(Trainer, "embed_plain",
                        lambda self, i: (lambda out: (seen.append(("mining", out.device)), out)[1])(embed(self, i)))
    config = {"run_dir": str(tmp_path / "run"),
              "data": {"train": f"csv:{manifest}", "train_size": 64, "workers": 1, "val_classes": 0},
              "model": {"backbone": "resnet18", "pretrained": False, "init_images": 8, "head": {"num_clusters": 2}},
              "mining": {"miner": "algorithm1", "classes": 3, "per_class": 4},
              "train": {"steps": 2, "triplets_per_step": 2, "checkpoint_every": 2}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    assert train.main(["--config", str(tmp_path / "c.yaml"), "--skip-final-eval"]) == 0
    assert {kind for kind, _ in seen} == {"input", "embeddings", "labels", "triplets", "mining"}
