"""ClassBalancedBatchSampler: P x K structure, long tail, determinism, resuming, replicas, DataLoader."""
from __future__ import annotations

import itertools
from collections import Counter

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from msretrieval.data.samplers import ClassBalancedBatchSampler, class_members, plan_epoch_classes

# Long-tailed: class 5 and 6 have one image (skipped with min_per_class=2), 3 and 4 fewer than K = 4.
CLASS_SIZES = {0: 10, 1: 8, 2: 6, 3: 3, 4: 2, 5: 1, 6: 1, 7: 5, 8: 4, 9: 7, 10: 12, 11: 4}


def long_tail_labels(seed: int = 0) -> np.ndarray:
    labels = np.concatenate([np.full(n, c) for c, n in CLASS_SIZES.items()])
    return np.random.default_rng(seed).permutation(labels)


def sampler(**kwargs) -> ClassBalancedBatchSampler:
    options = dict(labels=long_tail_labels(), classes_per_batch=4, images_per_class=4, num_batches=8, seed=7)
    options.update(kwargs)
    return ClassBalancedBatchSampler(**options)


def epoch_batches(s: ClassBalancedBatchSampler, epoch: int) -> list[list[int]]:
    s.set_epoch(epoch)
    return list(s)


def test_batches_are_p_classes_times_k_images():
    labels = long_tail_labels()
    s = sampler()
    batches = epoch_batches(s, 0)
    assert len(batches) == len(s) == 8
    # Default epoch: images of the eligible classes // (P K).
    assert len(sampler(num_batches=None)) == (sum(CLASS_SIZES.values()) - 2) // 16
    for batch in batches:
        assert len(batch) == 16 == s.batch_size
        groups = np.asarray(batch).reshape(4, 4)
        group_labels = labels[groups]
        assert (group_labels == group_labels[:, :1]).all(), "each group of K indices is one class"
        classes = group_labels[:, 0]
        assert len(set(classes)) == 4, "P distinct classes"
        assert not {5, 6} & set(classes), "single-image classes are skipped"
        for group, c in zip(groups, classes):
            members = set(np.flatnonzero(labels == c))
            if CLASS_SIZES[c] >= 4:
                assert len(set(group)) == 4, "large classes are sampled without replacement"
            else:
                assert set(group) == members, "small classes show every image, topped up with replacement"


def test_every_eligible_class_appears_before_any_repeats():
    s = sampler(num_batches=30)
    labels = long_tail_labels()
    first_pass = [labels[b[0::4]] for b in epoch_batches(s, 0)]
    classes = np.concatenate(first_pass)
    eligible = sorted(c for c, n in CLASS_SIZES.items() if n >= 2)
    # 10 eligible classes, 4 per batch: every class is used in each window of 10 consecutive slots, up to the
    # boundary adjustment, so over 30 batches (12 passes) the counts are balanced within one.
    counts = Counter(classes.tolist())
    assert sorted(counts) == eligible
    assert max(counts.values()) - min(counts.values()) <= 1
    assert sorted(classes[:10].tolist()) == eligible


def test_plan_epoch_classes_keeps_batches_distinct_across_passes():
    rng = np.random.default_rng(0)
    plan = plan_epoch_classes(np.arange(5), classes_per_batch=3, num_batches=50, rng=rng)
    assert all(len(set(row)) == 3 for row in plan)
    counts = Counter(plan.reshape(-1).tolist())
    assert max(counts.values()) - min(counts.values()) <= 1


def test_min_per_class_and_small_classes():
    s = sampler(min_per_class=4)
    labels = long_tail_labels()
    used = {int(labels[i]) for batch in epoch_batches(s, 0) for i in batch}
    assert used <= {c for c, n in CLASS_SIZES.items() if n >= 4}
    with pytest.raises(ValueError, match="only 3 classes"):
        sampler(min_per_class=8)


def test_same_seed_and_epoch_give_the_same_batches_other_epochs_and_seeds_differ():
    first, second = epoch_batches(sampler(), 3), epoch_batches(sampler(), 3)
    assert first == second
    assert epoch_batches(sampler(), 4) != first
    assert epoch_batches(sampler(seed=8), 3) != first
    s = sampler()
    assert epoch_batches(s, 0) == epoch_batches(s, 0), "a finished epoch restarts from its first batch"


@pytest.mark.parametrize("consumed", [0, 1, 3, 5])
def test_state_round_trip_mid_epoch_continues_with_identical_batches(consumed):
    uninterrupted = epoch_batches(sampler(), 2) + epoch_batches(sampler(), 3)
    s = sampler()
    s.set_epoch(2)
    iterator = iter(s)
    head = [next(iterator) for _ in range(consumed)]
    state = s.state_dict()
    assert (state["epoch"], state["position"]) == (2, consumed)

    resumed = sampler(seed=0)          # the seed comes from the state
    resumed.load_state_dict(state)
    resumed.set_epoch(2)               # the training loop calls it again: same epoch keeps the position
    rest = list(resumed)
    resumed.set_epoch(3)
    assert head + rest + list(resumed) == uninterrupted


def test_state_dict_with_prefetching_loader_uses_the_consumed_count():
    s = sampler()
    s.set_epoch(1)
    full = list(s)
    iterator = iter(s)
    for _ in range(4):               # a loader prefetched 4 batches, the loop consumed 2
        next(iterator)
    state = s.state_dict(batches_consumed=2)
    resumed = sampler()
    resumed.load_state_dict(state)
    assert list(resumed) == full[2:]
    with pytest.raises(ValueError, match="outside the epoch"):
        s.state_dict(batches_consumed=len(s) + 1)


def test_loading_a_state_from_another_configuration_fails():
    state = sampler().state_dict()
    with pytest.raises(ValueError, match="classes_per_batch"):
        sampler(classes_per_batch=2).load_state_dict(state)
    with pytest.raises(ValueError, match="num_batches"):
        sampler(num_batches=3).load_state_dict(state)


@pytest.mark.parametrize("num_replicas", [2, 4])
def test_replicas_get_disjoint_whole_class_parts_whose_union_is_the_global_batch(num_replicas):
    labels = long_tail_labels()
    global_batches = epoch_batches(sampler(), 1)
    parts = [epoch_batches(sampler(num_replicas=num_replicas, rank=r), 1) for r in range(num_replicas)]
    for b, batch in enumerate(global_batches):
        pieces = [part[b] for part in parts]
        assert all(len(p) == 16 // num_replicas for p in pieces)
        assert list(itertools.chain(*pieces)) == batch
        piece_classes = [set(labels[p].tolist()) for p in pieces]
        for i, j in itertools.combinations(range(num_replicas), 2):
            assert not piece_classes[i] & piece_classes[j], "a class belongs to one replica only"
        for p in pieces:
            assert all(n == 4 for n in Counter(labels[p].tolist()).values()), "K images per class"


def test_invalid_arguments():
    with pytest.raises(ValueError, match="whole classes"):
        sampler(num_replicas=3)
    with pytest.raises(ValueError, match="rank"):
        sampler(num_replicas=2, rank=2)
    with pytest.raises(ValueError, match="P >= 1"):
        sampler(images_per_class=0)
    with pytest.raises(ValueError, match="num_batches"):
        sampler(num_batches=0)
    with pytest.raises(ValueError, match="one-dimensional"):
        class_members(np.zeros((2, 2)))


class IndexDataset(Dataset):
    def __init__(self, labels):
        self.labels = labels

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        return torch.tensor(index), int(self.labels[index])


def test_works_as_dataloader_batch_sampler():
    labels = long_tail_labels()
    s = sampler()
    loader = DataLoader(IndexDataset(labels), batch_sampler=s)
    s.set_epoch(5)
    loaded = [indices.tolist() for indices, _ in loader]
    assert loaded == epoch_batches(sampler(), 5)
    indices, batch_labels = next(iter(loader))
    assert batch_labels.tolist() == labels[indices.numpy()].tolist()
    assert len(loader) == len(s)
