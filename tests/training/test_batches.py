"""Batch sources: P x K batches for in-batch mining, Algorithm 1's mining rounds and pool."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from msretrieval.miners import Algorithm1Miner, MiningSchedule
from msretrieval.training.batches import MAX_EMPTY_MINING_ROUNDS, ClassBalancedBatches, MiningPoolBatches

LABELS = np.repeat(np.arange(10), 6)


def test_class_balanced_batches_cross_epochs_and_resume():
    batches = ClassBalancedBatches(LABELS, 4, 3, seed=1)
    drawn = [batches.next(step).indices for step in range(12)]  # 5 batches an epoch: crosses two epochs
    assert all(len(b) == 12 and len(set(LABELS[b])) == 4 for b in drawn)
    resumed = ClassBalancedBatches(LABELS, 4, 3, seed=1)
    for step in range(7):
        resumed.next(step)
    state = resumed.state_dict()
    again = ClassBalancedBatches(LABELS, 4, 3, seed=1)
    again.load_state_dict(state)
    assert [again.next(s).indices for s in range(7, 12)] == drawn[7:]


def pool_batches(miner, embed, classes=4, per_class=3):
    schedule = MiningSchedule.from_config([{"semi_hard_probability": 1.0}])
    return MiningPoolBatches(LABELS, miner, schedule, triplets_per_step=2, classes=classes, per_class=per_class,
                             seed=0, embed=embed)


def test_mining_rounds_use_p_by_k_mining_batches_and_serve_fixed_triplets():
    seen = []

    def embed(indices):
        seen.append(indices)
        return torch.nn.functional.normalize(torch.randn(len(indices), 8, generator=torch.Generator().manual_seed(
            len(seen))), dim=1)

    batches = pool_batches(Algorithm1Miner(one_per_class=False, seed=0), embed)
    first = batches.next(0)
    assert len(seen) == 1 and len(seen[0]) == 12 and len(set(LABELS[seen[0]])) == 4
    assert first.mining_stats["num_queries"] == 12 and len(first.indices) == 6
    anchors, positives, negatives = first.triplets  # indices laid out [anchors, positives, negatives]
    assert anchors.tolist() == [0, 1] and positives.tolist() == [2, 3] and negatives.tolist() == [4, 5]
    assert LABELS[first.indices[0]] == LABELS[first.indices[2]] != LABELS[first.indices[4]]


def test_rounds_without_triplets_draw_new_mining_batches_then_stop():
    seen = []
    miner = Algorithm1Miner(one_per_class=False, loss_band=(50.0, 51.0), seed=0)  # no loss is ever that large
    batches = pool_batches(miner, lambda indices: (seen.append(tuple(indices)), torch.randn(len(indices), 4))[1])
    with pytest.raises(RuntimeError, match=f"{MAX_EMPTY_MINING_ROUNDS} mining rounds in a row found no triplet"):
        batches.next(0)
    assert len(seen) == MAX_EMPTY_MINING_ROUNDS and len(set(seen)) == MAX_EMPTY_MINING_ROUNDS


def test_with_gradient_accumulation_the_pool_counts_steps_not_micro_batches(tmp_path, one_thread):
    """train.triplets_per_step and mining.refresh_every are per optimiser step: with grad_accum = 2, a step's
    4 triplets come as 2 micro-batches of 2, and refresh_every = 1 mines once a step (issue 24: they counted
    micro-batches, so each step took 8 triplets and mined twice)."""
    from tests.training.synthetic import run_steps, start_trainer, tiny_config, write_set

    manifest = write_set(tmp_path / "data", per_class=6)[0]
    config = tiny_config(tmp_path / "run", manifest, steps=2, grad_accum=2, triplets_per_step=4)
    config["mining"].update(miner="algorithm1", refresh_every=1, classes=3, per_class=6)  # 18 images: >= 4 triplets
    trainer = start_trainer(tmp_path, config)
    rounds, micro_batches = [], []
    refresh, draw = trainer.batches.refresh, trainer.batches.next
    trainer.batches.refresh = lambda step: rounds.append(step) or refresh(step)
    trainer.batches.next = lambda step: micro_batches.append((step, len((batch := draw(step)).indices))) or batch
    run_steps(trainer, 2)
    assert rounds == [0, 1]
    assert micro_batches == [(0, 6), (0, 6), (1, 6), (1, 6)]  # 2 triplets of 3 images each


def test_triplets_per_step_must_split_evenly_over_micro_batches(tmp_path):
    from msretrieval.training.config import resolve_config
    from msretrieval.utils.config import ConfigError
    from tests.training.synthetic import tiny_config, write_config, write_set

    manifest = write_set(tmp_path / "data")[0]
    config = tiny_config(tmp_path / "run", manifest, grad_accum=2, triplets_per_step=5)
    config["mining"]["miner"] = "algorithm1"
    with pytest.raises(ConfigError, match=r"^train.triplets_per_step \(5\) must be a multiple of train.grad_accum "
                                          r"\(2\): a step's triplets are split evenly over its micro-batches$"):
        resolve_config(write_config(tmp_path / "c.yaml", config))


def test_in_batch_triplets_never_pair_an_image_with_itself(tmp_path, one_thread):
    """The first class keeps 2 images and K = 4, so each of them appears twice in every batch (with its own
    augmentation). A miner sees labels only: here one that returns every valid triplet of the batch, repeats included. The
    trainer keeps no triplet whose anchor and positive are the same dataset image, and keeps all the others
    (issue 24: small GLDv2 classes gave (i, i, n) triplets)."""
    from tests.training.synthetic import run_steps, start_trainer, tiny_config, write_set

    manifest = write_set(tmp_path / "data", per_class=4)[0]
    rows = manifest.read_text().splitlines()
    class_column = rows[0].split(",").index("class_id")
    first = [row for row in rows[1:] if row.split(",")[class_column] == "1"]  # the first class
    manifest.write_text("\n".join([rows[0], *first[:2], *(r for r in rows[1:] if r not in first)]) + "\n")
    config = tiny_config(tmp_path / "run", manifest, steps=2)
    config["mining"].update(classes_per_batch=3, images_per_class=4, memory=0)  # the batch alone (memory: test_memory)
    trainer = start_trainer(tmp_path, config)

    class EveryTriplet:
        last_stats: dict = {}
        semi_hard_probability = hard_threshold = 0.0  # set by the mining schedule each step

        def __call__(self, embeddings, labels):
            same = labels[:, None] == labels[None, :]
            a, p, n = [torch.tensor(t) for t in zip(*[(a, p, n) for a in range(len(labels)) for p in range(len(labels))
                                                     for n in range(len(labels))
                                                     if a != p and same[a, p] and not same[a, n]])]
            return a, p, n

    trainer.miner = EveryTriplet()
    batches, kept = [], []
    next_batch, loss = trainer.batches.next, trainer.loss.forward
    trainer.batches.next = lambda step: (lambda batch: batches.append(batch.indices) or batch)(next_batch(step))
    trainer.loss.forward = lambda embeddings, labels, triplets, *reference: kept.append(
        [t.tolist() for t in triplets]) or loss(embeddings, labels, triplets, *reference)
    run_steps(trainer, 2)
    assert len(kept) == 2
    for indices, (anchors, positives, negatives) in zip(batches, kept):
        labels = trainer.labels[indices]
        expected = [(a, p, n) for a in range(12) for p in range(12) for n in range(12)
                    if a != p and labels[a] == labels[p] != labels[n] and indices[a] != indices[p]]
        assert sorted(zip(anchors, positives, negatives)) == expected
        assert any(indices[a] == indices[p] for a in range(12) for p in range(12) if a != p)  # repeats were there
