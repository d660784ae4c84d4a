"""Hash networks in the real training loop (issue 25): CSQ once bits saturate, Algorithm 1 mining on the relaxed
codes the loss sees, every miner on a hash network, and the distillation term's targets. Tiny CPU runs
(ResNet-18 + GeM at 64 px, random weights, :mod:`tests.training.synthetic`)."""
from __future__ import annotations

import csv
import math

import pytest
import torch

from tests.training.synthetic import run_steps, start_trainer, tiny_config, write_set


def hash_config(tmp_path, bits: int, per_class: int, mixed: bool = False, **model) -> dict:
    """3 classes x ``per_class`` images; ITQ to ``bits`` bits needs 2 x bits images to start from. ``mixed``: each
    class holds images of every colour (write_set's classes differ in colour), so hard triplets exist."""
    manifest = write_set(tmp_path / "data", per_class=per_class)[0]
    if mixed:
        rows = list(csv.DictReader(manifest.open()))
        with manifest.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows({**row, "class_id": index % 3 + 1} for index, row in enumerate(rows))
    config = tiny_config(tmp_path / "run", manifest, steps=2)
    config["model"].update(head={"hash_bits": bits}, init_images=3 * per_class, **model)
    return config


@pytest.mark.parametrize("bits", [24, 96])
def test_csq_trains_on_saturated_codes(tmp_path, bits, one_thread):
    """A saturated bit (tanh = +-1) scaled to the network's output u / sqrt(K) and back is +-1.0000001 in float32
    at 24 and 96 bits; CSQ's [-1, 1] check stopped such runs mid-way."""
    config = hash_config(tmp_path, bits, per_class=2 * bits // 3, hash_beta={"beta0": 1e4})  # beta 1e4: saturated
    config["loss"] = {"name": "csq"}
    trainer = start_trainer(tmp_path, config)
    values = trainer.train_step()
    trainer.close()
    assert math.isfinite(values["train/loss"]) and values["hash/beta"] == 1e4


def test_algorithm1_mines_the_relaxed_codes_the_loss_sees(tmp_path, one_thread):
    """Algorithm 1's mining round embeds in eval mode, where a hashing layer gives sign codes (squared distances
    all multiples of 4 / K, ties everywhere); the loss then sees tanh(beta x). The round must rank by the
    latter: the mined embeddings are the training forward of the same (unaugmented) images."""
    from msretrieval.miners.algorithm1 import squared_euclidean
    from msretrieval.training.optimization import set_train_mode

    bits = 16
    config = hash_config(tmp_path, bits, per_class=12)
    config["mining"].update(miner="algorithm1", refresh_every=1, classes=3, per_class=4)
    trainer = start_trainer(tmp_path, config)
    model, embed, rounds = trainer.unwrapped, trainer.batches.embed, []

    def recorded(indices):
        rounds.append((indices, embed(indices)))
        assert model.training and model.head.hash.training  # the round runs inside the step, in train mode
        return rounds[-1][1]

    trainer.batches.embed = recorded
    try:
        trainer.train_step()
        assert model.training and model.head.hash.training
        indices, mined = rounds[0]
        set_train_mode(model)
        with torch.no_grad():
            expected = model(trainer.images.load(indices))
    finally:
        trainer.close()
    torch.testing.assert_close(mined, expected)
    quarter_bits = squared_euclidean(mined, mined) * bits / 4       # Hamming distances for sign codes
    assert (quarter_bits - quarter_bits.round()).abs().max() > 0.1


@pytest.mark.parametrize("miner", ["algorithm1", "batch", "semihard", "hard"])
def test_a_hash_network_trains_with_each_miner(tmp_path, miner, one_thread):
    """Three steps of triplet training with quantization and bit-balance terms: every loss finite, some
    triplet active (the metric term above zero), and the hashing layer moved."""
    config = hash_config(tmp_path, 8, per_class=6, mixed=True)
    config["mining"].update(miner=miner, images_per_class=3)
    if miner == "algorithm1":
        config["mining"].update(refresh_every=1, classes=3, per_class=4)
        config["train"]["triplets_per_step"] = 3
    config["loss"] = {"margin": 0.5, "quantization_weight": 0.1, "balance_weight": 0.1}
    torch.manual_seed(0)  # the network's random initialisation
    trainer = start_trainer(tmp_path, config)
    start = trainer.unwrapped.head.hash.linear.weight.detach().clone()
    steps = []
    try:
        for _ in range(3):
            steps.append(trainer.train_step())
            trainer.step += 1
    finally:
        trainer.close()
    assert all(math.isfinite(values["train/loss"]) for values in steps)
    assert max(values["loss/metric"] for values in steps) > 0
    assert not torch.equal(trainer.unwrapped.head.hash.linear.weight, start)


@pytest.mark.parametrize("loss", [{"name": "triplet"}, {"name": "csq"}])
def test_distillation_targets_are_the_float_descriptors_and_get_no_gradient(tmp_path, loss, one_thread):
    """loss.distill_weight: the term sees the step's codes and the float descriptors of the same pass, and those
    are targets: the gradient reaching a descriptor is only what flows back through the hashing layer
    (grad_x = grad_logits @ W for logits = x W^T + b), none through its own similarities."""
    from msretrieval.losses import similarity_distillation

    config = hash_config(tmp_path, 8, per_class=6)
    config["loss"] = {**loss, "distill_weight": 1.0}
    trainer = start_trainer(tmp_path, config)
    linear, seen = trainer.unwrapped.head.hash.linear, {}

    def keep_gradients(module, inputs, output):
        seen["descriptors"], seen["logits"], seen["weight"] = inputs[0], output, module.weight.detach().clone()
        inputs[0].register_hook(lambda grad: seen.__setitem__("descriptor_grad", grad))
        output.register_hook(lambda grad: seen.__setitem__("logit_grad", grad))

    linear.register_forward_hook(keep_gradients)
    try:
        values = trainer.train_step()
    finally:
        trainer.close()
    codes = torch.tanh(trainer.unwrapped.head.hash.beta * seen["logits"].detach())
    assert values["loss/distill"] == pytest.approx(float(similarity_distillation(codes, seen["descriptors"])))
    assert values["loss/distill"] > 0
    torch.testing.assert_close(seen["descriptor_grad"], seen["logit_grad"] @ seen["weight"])  # W before the step


def test_beta_reaches_the_configured_final_value_at_the_last_step(tmp_path, one_thread):
    """model.hash_beta.final over train.steps = 3, updated every step: gamma = (10 ** 2 - 1) / 2 = 49.5."""
    config = hash_config(tmp_path, 8, per_class=6, hash_beta={"final": 10.0, "step_size": 1})
    config["train"]["steps"] = 3
    trainer = start_trainer(tmp_path, config)
    betas = []
    try:
        for _ in range(3):
            betas.append(trainer.train_step()["hash/beta"])
            trainer.step += 1
    finally:
        trainer.close()
    assert betas == pytest.approx([1.0, math.sqrt(50.5), 10.0])
