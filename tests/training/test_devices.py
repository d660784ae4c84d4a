"""Every tensor of a training step lives on ``accelerator.device``: the network's weights, model inputs, labels,
embeddings, mining embeddings and mined triplets.

On this CPU-only machine the accelerator's device is the CPU, where a tensor that was never placed lives too,
so a step run there cannot tell a placement from a missing one. The step therefore runs on a stand-in device:
``accelerator.device`` is :data:`STAND_IN`, and :class:`StandInDevice` turns every placement on it (``.to(d)``,
``device=d``) into a CPU tensor of class :class:`OnStandIn`, which reports the stand-in as its device and passes
it on to whatever is computed from it. A tensor that was never placed stays a plain CPU tensor; an operation
mixing the two is recorded as the device mismatch it would be on a GPU. ``scripts/gpu_check.py`` runs the real
thing on CUDA."""
from __future__ import annotations

import numpy as np
import torch
from accelerate import Accelerator
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

import train
from msretrieval.data.manifest import read_csv_manifest
from msretrieval.training.data import ImageBatches
from msretrieval.training.distributed import gather_rows
from msretrieval.training.trainer import Trainer
from tests.training.synthetic import write_config, write_set

#: a device type nothing here treats specially (``torch.is_autocast_enabled("meta")``, in NetVLAD, raises)
STAND_IN = torch.device("privateuseone")


class OnStandIn(torch.Tensor):
    """A CPU tensor placed on the stand-in device. torch's default ``__torch_function__`` gives results of this
    class to any operation with one among its arguments, so derived tensors are on the stand-in too."""

    @property
    def device(self) -> torch.device:
        return STAND_IN


def _is_stand_in(value) -> bool:
    return isinstance(value, (str, torch.device)) and str(value) == str(STAND_IN)


class StandInDevice(TorchFunctionMode):
    """Placements on :data:`STAND_IN` give :class:`OnStandIn` CPU tensors, placements elsewhere plain ones.

    ``Module.to`` keeps each parameter object and replaces its data, so the parameters it moved are recorded
    (``placed``) rather than retyped. ``mismatches``: operations that mixed stand-in and plain tensors (plain
    0-dim tensors excepted: CPU scalars mix with any device; parameters excepted: hooks check them), and
    ``.numpy()`` of a stand-in tensor (a device tensor must be copied to the host first)."""

    # copies between devices are allowed, as on a GPU
    CROSS_DEVICE = {torch.Tensor.copy_, torch.Tensor.__setitem__}

    def __init__(self):
        super().__init__()
        self.placed: dict[int, nn.Parameter] = {}
        self.mismatches: list[str] = []

    @staticmethod
    def target(func, args, kwargs) -> torch.device | None:
        """Where the call places its result: ``device=``, ``.to(device)`` / ``.to(tensor)``, ``.cpu()``; None
        for any other call."""
        if func is torch.Tensor.cpu:
            return torch.device("cpu")
        if kwargs.get("device") is not None:
            return torch.device(kwargs["device"])
        if func is torch.Tensor.to:
            for value in args[1:]:
                if isinstance(value, torch.Tensor):
                    return STAND_IN if isinstance(value, OnStandIn) else value.device
                if isinstance(value, (str, torch.device)):
                    return torch.device(value)
        return None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        target = self.target(func, args, kwargs)
        if target is None:
            self.check(func, args, kwargs)
            return func(*args, **kwargs)
        # the placement itself runs on the CPU; its result is then typed by where it went
        args = tuple("cpu" if _is_stand_in(value) else value for value in args)
        kwargs = {key: "cpu" if key == "device" and _is_stand_in(value) else value for key, value in kwargs.items()}
        with torch._C.DisableTorchFunctionSubclass():
            result = func(*args, **kwargs)
        if target != STAND_IN:
            return result.as_subclass(torch.Tensor) if isinstance(result, OnStandIn) else result
        if isinstance(args[0] if args else None, nn.Parameter):
            self.placed[id(args[0])] = args[0]
        return result.as_subclass(OnStandIn)

    def check(self, func, args, kwargs) -> None:
        name = getattr(func, "__name__", repr(func))
        with torch._C.DisableTorchFunctionSubclass():
            if func is torch.Tensor.numpy and isinstance(args[0], OnStandIn):
                self.mismatches.append(f"numpy() of a device tensor {tuple(args[0].shape)}")
            if func in self.CROSS_DEVICE:
                return
            tensors = [t for t in tree_flatten((args, kwargs))[0]
                       if isinstance(t, torch.Tensor) and not isinstance(t, nn.Parameter)]
            placed = [isinstance(t, OnStandIn) for t in tensors]
            if any(placed) and any(not p and t.dim() > 0 for p, t in zip(placed, tensors)):
                where = [(tuple(t.shape), "device" if p else "cpu") for t, p in zip(tensors, placed)]
                self.mismatches.append(f"{name} of {where}")

    def on_device(self, tensor: torch.Tensor) -> bool:
        return isinstance(tensor, OnStandIn) or id(tensor) in self.placed


def test_batches_are_built_on_the_requested_device(flowers_subset):
    images = read_csv_manifest(flowers_subset({"train": [1, 2]}, per_class=2))
    loader = ImageBatches(images, 64, (0.5,) * 3, (0.5,) * 3, torch.device("meta"), workers=1)
    for batch in (loader.load([0, 1, 2]), loader.load([0, 3], seeds=[1, 2]), loader.load([])):
        assert batch.device.type == "meta" and batch.shape[1:] == (3, 64, 64)
    assert loader.load([0, 1]).is_contiguous(memory_format=torch.channels_last)  # NHWC, the fast CPU layout
    assert gather_rows(torch.zeros(3, 4, device="meta"), 3).device.type == "meta"


def test_every_tensor_of_a_run_is_on_the_accelerator_device(tmp_path, monkeypatch, one_thread):
    """Two Algorithm-1 steps of train.py on the stand-in device: each layer's weights, buffers and inputs
    (head set-up, mining rounds and gradient passes), the loss's embeddings, labels and triplets, and the
    mining embeddings (an empty shard's too) are on it, and no operation mixed devices."""
    manifest = write_set(tmp_path / "data", per_class=4)[0]
    mode = StandInDevice()
    seen: list[tuple[str, bool]] = []  # (what, on the device)

    def check_layer(module, args, kwargs):
        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        seen.extend([("layer input", mode.on_device(t)) for t in inputs]
                    + [("weight", mode.on_device(p)) for p in module.parameters(recurse=False)]
                    + [("buffer", mode.on_device(b)) for b in module.buffers(recurse=False)])

    setup, embed, step = Trainer.setup, Trainer.embed_plain, Trainer.train_step

    def setup_with_checks(self, resume_from=None):
        for module in self.model.modules():  # before the head's set-up, the first forward
            if list(module.parameters(recurse=False)) or list(module.buffers(recurse=False)):
                module.register_forward_pre_hook(check_layer, with_kwargs=True)
        loss_forward = self.loss.forward

        def checked_loss(embeddings, labels, triplets):
            seen.extend([("embeddings", mode.on_device(embeddings)), ("labels", mode.on_device(labels))]
                        + [("triplets", mode.on_device(t)) for t in triplets])
            return loss_forward(embeddings, labels, triplets)

        self.loss.forward = checked_loss
        return setup(self, resume_from)

    def checked_embed(self, indices):
        embeddings = embed(self, indices)
        seen.append(("mining embeddings", mode.on_device(embeddings)))
        return embeddings

    def step_with_an_empty_shard(self):
        # a process whose shard of a mining batch is empty still returns a device tensor (it is gathered)
        self.embed_plain(np.zeros(0, dtype=np.int64))
        return step(self)

    monkeypatch.setattr(Accelerator, "device", property(lambda self: STAND_IN))
    monkeypatch.setattr(Trainer, "setup", setup_with_checks)
    monkeypatch.setattr(Trainer, "embed_plain", checked_embed)
    monkeypatch.setattr(Trainer, "train_step", step_with_an_empty_shard)
    config = {"run_dir": str(tmp_path / "run"),
              "data": {"train": f"csv:{manifest}", "train_size": 64, "workers": 1, "val_classes": 0},
              "model": {"backbone": "resnet18", "pretrained": False, "init_images": 8, "head": {"num_clusters": 2}},
              "mining": {"miner": "algorithm1", "classes": 3, "per_class": 4},
              "train": {"steps": 2, "triplets_per_step": 2, "checkpoint_every": 2}}
    with mode:
        assert train.main(["--config", write_config(tmp_path / "c.yaml", config), "--skip-final-eval"]) == 0
    assert [what for what, on_device in seen if not on_device] == []
    assert mode.mismatches == []
    assert {what for what, _ in seen} == {"layer input", "weight", "buffer", "embeddings", "labels", "triplets",
                                          "mining embeddings"}
