"""In-batch miner: the definitions of semi-hard and hard triplets, per-anchor draws, agreement with the loss."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from msretrieval.losses import create_loss
from msretrieval.miners import BatchTripletMiner, MiningSchedule, create_miner, follows_schedule


def reference(embeddings, labels, margin, semi_hard_anchor):
    """Every (a, p, n) of the batch by the definitions on squared Euclidean distance."""
    x = np.asarray(embeddings, np.float64)
    d = ((x[:, None] - x[None]) ** 2).sum(-1)
    labels = np.asarray(labels)
    out = set()
    for a, p, n in itertools.product(range(len(x)), repeat=3):
        if a == p or labels[a] != labels[p] or labels[a] == labels[n]:
            continue
        semi = d[a, p] < d[a, n] <= d[a, p] + margin
        hard = d[a, n] <= d[a, p]
        if (semi if semi_hard_anchor[a] else hard):
            out.add((a, p, n))
    return out


def batch(seed, classes=4, per_class=4, dim=3):
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(classes), per_class)
    x = rng.normal(size=(classes, dim))[labels] * 0.3 + rng.normal(size=(len(labels), dim)) * 0.25
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return torch.tensor(x, dtype=torch.float32), torch.tensor(labels)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("probability", [0.0, 0.5, 1.0])
def test_triplets_follow_the_definitions_per_anchor_draw(seed, probability):
    embeddings, labels = batch(seed)
    loss = create_loss("triplet", margin=0.3)
    miner = BatchTripletMiner(loss.distance, loss.margin, probability, seed=seed)
    draws = torch.rand(len(labels), generator=torch.Generator().manual_seed(seed)) < probability
    a, p, n = miner(embeddings, labels)
    mined = set(zip(a.tolist(), p.tolist(), n.tolist()))
    assert len(mined) == len(a)
    assert mined == reference(embeddings, labels, 0.3, draws.numpy())
    assert miner.num_semi_hard_triplets + miner.num_hard_triplets == len(a) > 0


def test_semihard_triplets_have_loss_between_zero_and_the_margin_of_the_loss():
    embeddings, labels = batch(5, classes=6)
    loss = create_loss("triplet", margin=0.2)
    a, p, n = create_miner("semihard", loss, seed=0)(embeddings, labels)
    d = lambda i, j: ((embeddings[i] - embeddings[j]) ** 2).sum(1)  # noqa: E731
    terms = 0.2 + d(a, p) - d(a, n)
    assert len(a) and torch.all(terms > 0) and torch.all(terms < 0.2 + 1e-6)
    hard_a, hard_p, hard_n = create_miner("hard", loss, seed=0)(embeddings, labels)
    assert len(hard_a) and torch.all(d(hard_a, hard_p) >= d(hard_a, hard_n))


def test_stats_are_squared_distances_of_the_returned_triplets():
    embeddings, labels = batch(1)
    miner = create_miner("batch", create_loss("triplet"), seed=0)
    miner.semi_hard_probability = 0.5
    a, p, n = miner(embeddings, labels)
    pos = ((embeddings[a] - embeddings[p]) ** 2).sum(1).mean().item()
    neg = ((embeddings[a] - embeddings[n]) ** 2).sum(1).mean().item()
    assert miner.mean_pos_distance == pytest.approx(pos, abs=1e-6)
    assert miner.mean_neg_distance == pytest.approx(neg, abs=1e-6)


def test_schedule_drives_the_batch_miner_and_pinned_names_ignore_it():
    schedule = MiningSchedule.from_config([{"until_step": 10, "semi_hard_probability": 1.0},
                                           {"semi_hard_probability": 0.25, "hard_threshold": 5}])
    miner = create_miner("batch", create_loss("triplet"), seed=0)
    schedule.apply(miner, 12)
    assert miner.semi_hard_probability == 0.25 and not hasattr(miner, "hard_threshold")
    assert follows_schedule("batch") and follows_schedule("algorithm1")
    assert not follows_schedule("semihard") and not follows_schedule("hard")
    assert create_miner("hard", create_loss("triplet"), seed=0).semi_hard_probability == 0.0


def test_state_dict_resumes_the_draws():
    embeddings, labels = batch(2)
    miner = create_miner("batch", create_loss("triplet"), seed=3)
    miner.semi_hard_probability = 0.5
    state = miner.state_dict()
    first = [t.tolist() for t in miner(embeddings, labels)]
    other = create_miner("batch", create_loss("triplet"), seed=99)
    other.semi_hard_probability = 0.5
    other.load_state_dict(state)
    assert [t.tolist() for t in other(embeddings, labels)] == first


def test_unknown_miner_name():
    with pytest.raises(ValueError, match="unknown miner 'semi_hard'"):
        create_miner("semi_hard", create_loss("triplet"), seed=0)
