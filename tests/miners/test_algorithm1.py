"""Algorithm-1 miner: hand-computed cases, agreement with the authors' rule, stats, schedule, pool."""
from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest
import torch
from pytorch_metric_learning.losses import TripletMarginLoss

from msretrieval.miners import Algorithm1Miner, MiningPhase, MiningPool, MiningSchedule


def mine_one(points, labels, query, semi_hard, threshold=None, loss_band=None):
    """Triplets for one explicit query and draw on hand-made points (1-D lists or 2-D rows)."""
    embeddings = torch.tensor(points, dtype=torch.float32).reshape(len(points), -1)
    labels = torch.tensor(labels)
    miner = Algorithm1Miner(hard_threshold=threshold, loss_band=loss_band, seed=0)
    anchors, positives, negatives = miner.triplets_for_queries(
        embeddings, labels, embeddings, labels, torch.tensor([query]), torch.tensor([semi_hard]))
    return [tuple(map(int, t)) for t in zip(anchors, positives, negatives)], miner.last_stats


def authors_rule(embeddings, labels, ref_emb, ref_labels, query, semi_hard, threshold, exclude_self,
                 margin=0.1, loss_band=None):
    """One query, written from the authors' scan (fede-vaccaro/NetVlad, open_dataset_utils.py): the ranking
    starts with the query itself at j = 0 (when it is part of the reference set); walk it once."""
    distances = ((np.asarray(ref_emb, np.float64) - np.asarray(embeddings, np.float64)[query]) ** 2).sum(axis=1)
    others = sorted((i for i in range(len(ref_labels)) if not (exclude_self and i == query)),
                    key=lambda i: (distances[i], i))
    row = ([query] if exclude_self else []) + others
    anchor_label = labels[query]
    j_neg = j_pos = -1
    for j, item in enumerate(row):
        same = ref_labels[item] == anchor_label
        if j_pos == -1 and j_neg == -1 and same:
            continue
        elif j_neg == -1 and not same:
            j_neg = j
            if j_neg > (1 if exclude_self else 0) and semi_hard:
                j_pos = j_neg - 1
        elif j_neg != -1 and same:
            j_pos = j
        if j_pos != -1 and j_neg != -1 and (threshold is None or j_pos - j_neg < threshold):
            loss = margin + distances[row[j_pos]] - distances[row[j_neg]]
            if loss_band is not None and not loss_band[0] < loss < loss_band[1]:
                return None
            return query, row[j_pos], row[j_neg]
        if j_neg != -1 and j_pos == -1 and threshold is not None and j - j_neg == threshold:
            return None  # case C: no positive within t ranks of the first negative
    return None


def reference_triplets(embeddings, labels, ref_emb, ref_labels, queries, semi_hard, threshold, exclude_self,
                       one_per_class=False, loss_band=None):
    """The authors' rule for each query in order; one_per_class keeps each class's first triplet."""
    labels, ref_labels = np.asarray(labels), np.asarray(ref_labels)
    triplets, mined_classes = [], set()
    for query, semi in zip(np.asarray(queries).tolist(), np.asarray(semi_hard).tolist()):
        triplet = authors_rule(embeddings, labels, ref_emb, ref_labels, query, semi, threshold, exclude_self,
                               loss_band=loss_band)
        if triplet is None or (one_per_class and labels[query] in mined_classes):
            continue
        mined_classes.add(labels[query])
        triplets.append(triplet)
    return triplets


def random_problem(seed, num_classes=80, dim=6, grid=False, spread=1.5):
    """Classes of 1..6 members around random centres (scale ``spread``, noise 1); ``grid`` gives small
    integer coordinates instead, so many distances are equal and the tie order matters."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 7, num_classes)
    labels = np.repeat(np.arange(num_classes), sizes)
    if grid:
        centres = rng.integers(0, 3, (num_classes, dim)) * 2
        embeddings = (centres[labels] + rng.integers(0, 2, (len(labels), dim))).astype(np.float64)
    else:
        embeddings = rng.normal(size=(num_classes, dim))[labels] * spread + rng.normal(size=(len(labels), dim))
    order = rng.permutation(len(labels))
    return torch.from_numpy(embeddings[order]), torch.from_numpy(labels[order])


def as_list(indices_tuple):
    return [tuple(map(int, t)) for t in zip(*indices_tuple)]


# --- hand-computed cases --------------------------------------------------------------------------------------
# Ranks below are among the other samples (the query removed), counted from 0; the authors' j is rank + 1.

def test_case_a_takes_last_positive_before_first_negative():
    # ranking: 1(d1,+) 2(d4,+) 3(d9,-) 4(d100,+): first negative at rank 2
    triplets, stats = mine_one([0, 1, 2, 3, 10], [0, 0, 0, 1, 0], query=0, semi_hard=True)
    assert triplets == [(0, 2, 3)]
    assert (stats["num_case_a"], stats["num_case_b"], stats["num_case_c"]) == (1, 0, 0)
    assert stats["mean_pos_distance"] == 4 and stats["mean_neg_distance"] == 9


def test_case_a_needs_only_one_positive_before_the_first_negative():
    # 1(+) 2(-) 3(+): the authors' j_neg = 2 > 1, so case A with the positive right before the negative
    triplets, stats = mine_one([0, 1, 2, 3], [0, 0, 1, 0], 0, semi_hard=True)
    assert triplets == [(0, 1, 2)] and stats["num_case_a"] == 1


def test_hard_draw_takes_first_positive_after_first_negative():
    triplets, stats = mine_one([0, 1, 2, 3, 10], [0, 0, 0, 1, 0], query=0, semi_hard=False)
    assert triplets == [(0, 4, 3)]
    assert (stats["num_case_a"], stats["num_case_b"]) == (0, 1)


def test_2d_case_a_and_b():
    points = [[0, 0], [1, 0], [0, 1], [1, 1], [2, 2], [3, 0]]
    labels = [0, 0, 0, 1, 0, 1]  # ranking: 1(d1,+) 2(d1,+) 3(d2,-) 4(d8,+) 5(d9,-)
    assert mine_one(points, labels, 0, semi_hard=True)[0] == [(0, 2, 3)]
    assert mine_one(points, labels, 0, semi_hard=False)[0] == [(0, 4, 3)]


def test_semi_hard_draw_falls_back_to_case_b_when_the_first_neighbour_is_negative():
    triplets, stats = mine_one([0, 1, 2, 3], [0, 1, 0, 0], 0, semi_hard=True)  # 1(-) 2(+) 3(+)
    assert triplets == [(0, 2, 1)] and stats["num_case_b"] == 1


def test_case_c_threshold_counts_from_the_first_negative():
    # 1(+) 2(-) 3(-) 4(-) 5(+): first negative at rank 1, hard positive at rank 4: 3 ranks after it
    points, labels = [0, 1, 2, 3, 4, 5], [0, 0, 1, 1, 1, 0]
    triplets, stats = mine_one(points, labels, 0, semi_hard=False, threshold=3)
    assert triplets == [] and stats["num_case_c"] == 1 and stats["num_triplets"] == 0
    assert math.isnan(stats["mean_pos_distance"])
    assert mine_one(points, labels, 0, semi_hard=False, threshold=4)[0] == [(0, 5, 2)]
    assert mine_one(points, labels, 0, semi_hard=False, threshold=None)[0] == [(0, 5, 2)]
    # an absolute rank limit of 3 would keep nothing either, but of 4 (rank 4) it would: relative differs at 3+1
    assert mine_one([0, 1, 2, 3, 4, 5], [0, 1, 1, 1, 0, 0], 0, semi_hard=False, threshold=4)[0] == [(0, 4, 1)]
    # a semi-hard draw whose case A is impossible falls back to case B under the same threshold
    assert mine_one([0, 1, 2, 3, 4, 5], [0, 1, 1, 1, 1, 0], 0, semi_hard=True, threshold=4)[0] == []


def test_threshold_never_drops_case_a():
    assert mine_one([0, 1, 2, 3, 10], [0, 0, 0, 1, 0], 0, semi_hard=True, threshold=1)[0] == [(0, 2, 3)]
    assert mine_one([0, 1, 2, 3, 10], [0, 0, 0, 1, 0], 0, semi_hard=False, threshold=1)[0] == []


def test_hard_draw_without_hard_positive_gives_no_triplet():
    # 1(+) 2(+) 3(-): case A would be possible, but a hard draw has no positive after the negative
    triplets, stats = mine_one([0, 1, 2, 3], [0, 0, 0, 1], 0, semi_hard=False)
    assert triplets == [] and stats["num_without_triplet"] == 1


def test_loss_band_keeps_only_triplets_whose_loss_lies_inside():
    # case A: d(q,p) = 4, d(q,n) = 9: loss 0.1 + 4 - 9 < 0
    assert mine_one([0, 1, 2, 3, 10], [0, 0, 0, 1, 0], 0, semi_hard=True, loss_band=(-10, 0))[0] == [(0, 2, 3)]
    triplets, stats = mine_one([0, 1, 2, 3, 10], [0, 0, 0, 1, 0], 0, semi_hard=True, loss_band=(0.09, 0.11))
    assert triplets == [] and stats["num_outside_loss_band"] == 1


@pytest.mark.parametrize("semi_hard", [True, False])
@pytest.mark.parametrize("points, labels", [
    ([0, 1, 2], [0, 0, 0]),   # no negative
    ([0, 1, 2], [5, 0, 0]),   # singleton class
])
def test_queries_without_a_triplet(points, labels, semi_hard):
    triplets, stats = mine_one(points, labels, 0, semi_hard=semi_hard)
    assert triplets == [] and stats["num_without_triplet"] == 1 and stats["num_queries"] == 1


@pytest.mark.parametrize("size", [0, 1, 2])
def test_degenerate_batches_give_no_triplets(size):
    miner = Algorithm1Miner(seed=0)
    anchors, _, _ = miner(torch.zeros(size, 4), torch.arange(size))
    assert len(anchors) == 0 and miner.num_without_triplet == miner.num_queries == size


def test_equal_distances_rank_by_index():
    # 1(-), 2(+), 3(+) all at distance 1: the stable order puts the negative first and the hard positive at 2
    assert mine_one([0, 1, -1, 1], [0, 1, 0, 0], 0, semi_hard=True)[0] == [(0, 2, 1)]


# --- agreement with the authors' rule -------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("grid", [False, True])
@pytest.mark.parametrize("threshold", [None, 3])
def test_vectorised_equals_authors_rule_for_every_query(seed, grid, threshold):
    embeddings, labels = random_problem(seed, grid=grid)
    miner = Algorithm1Miner(hard_threshold=threshold, one_per_class=False, seed=seed)
    queries = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    draws = torch.rand(len(queries), generator=torch.Generator().manual_seed(seed)) < 0.5
    mined = miner.triplets_for_queries(embeddings, labels, embeddings, labels, queries, draws)
    expected = reference_triplets(embeddings, labels, embeddings, labels, queries, draws, threshold, True)
    assert as_list(mined) == expected
    assert miner.num_case_a and miner.num_case_b and (threshold is None or miner.num_case_c)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("probability", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("one_per_class", [True, False])
def test_mine_equals_authors_rule_with_the_same_draws(seed, probability, one_per_class):
    embeddings, labels = random_problem(seed + 10, num_classes=150, grid=seed == 2)
    miner = Algorithm1Miner(semi_hard_probability=probability, hard_threshold=5, one_per_class=one_per_class,
                            seed=seed)
    twin = torch.Generator().manual_seed(seed)  # the miner's stream: query order, then one draw per query
    queries = torch.randperm(len(labels), generator=twin)
    draws = torch.rand(len(queries), generator=twin) < probability
    expected = reference_triplets(embeddings, labels, embeddings, labels, queries, draws, 5, True, one_per_class)
    assert as_list(miner(embeddings, labels)) == expected


def test_loss_band_equals_authors_rule():
    embeddings, labels = random_problem(21, num_classes=100, spread=0.6)
    miner = Algorithm1Miner(hard_threshold=4, loss_band=(0.0, 3.0), one_per_class=False, seed=0)
    queries = torch.arange(len(labels))
    draws = torch.arange(len(labels)) % 2 == 0
    mined = miner.triplets_for_queries(embeddings, labels, embeddings, labels, queries, draws)
    expected = reference_triplets(embeddings, labels, embeddings, labels, queries, draws, 4, True,
                                  loss_band=(0.0, 3.0))
    assert as_list(mined) == expected and miner.num_outside_loss_band > 0


@pytest.mark.parametrize("seed", range(2))
def test_separate_reference_set_is_ranked_without_self_exclusion(seed):
    embeddings, labels = random_problem(seed, num_classes=40)
    ref_emb, ref_labels = random_problem(seed + 100, num_classes=40)
    miner = Algorithm1Miner(seed=seed, one_per_class=False)
    queries = torch.arange(len(labels))
    draws = miner.draw_semi_hard(len(queries))
    mined = miner.triplets_for_queries(embeddings, labels, ref_emb, ref_labels, queries, draws)
    assert as_list(mined) == reference_triplets(embeddings, labels, ref_emb, ref_labels, queries, draws, None,
                                                False)


def test_probability_forces_each_mode():
    embeddings, labels = random_problem(7, num_classes=300)
    semi = Algorithm1Miner(semi_hard_probability=1.0, one_per_class=False, seed=0)
    semi(embeddings, labels)
    assert semi.num_semi_hard_chosen == semi.num_queries
    hard = Algorithm1Miner(semi_hard_probability=0.0, one_per_class=False, seed=0)
    hard(embeddings, labels)
    assert hard.num_semi_hard_chosen == 0 and hard.num_case_a == 0
    assert hard.num_case_b > semi.num_case_b and semi.num_case_a > 0


# --- structure of the output --------------------------------------------------------------------------------

def test_one_triplet_per_class_and_label_constraints():
    embeddings, labels = random_problem(3, num_classes=150)
    miner = Algorithm1Miner(seed=1)
    anchors, positives, negatives = miner(embeddings, labels)
    assert all(t.dtype == torch.long for t in (anchors, positives, negatives))
    assert len(set(labels[anchors].tolist())) == len(anchors)
    assert miner.num_queries == len(labels)  # every sample is tried, in random order
    assert torch.all(labels[anchors] == labels[positives]) and torch.all(anchors != positives)
    assert torch.all(labels[anchors] != labels[negatives])
    assert miner.num_class_already_mined > 0 and miner.last_is_case_a.sum() == miner.num_case_a


def test_a_class_whose_first_query_has_no_triplet_gets_one_from_another_query():
    # t = 1. Query 0 (class 0) sees 3 (class 1) first and its next positive one rank later: case C, nothing.
    # Queries 1 and 2 (class 0) see each other first: case A. Class 1 has no triplet at all.
    points, labels = torch.tensor([[0.0], [10.0], [10.1], [0.05], [20.0]]), torch.tensor([0, 0, 0, 1, 1])
    for seed in range(8):  # query 0 comes first for some seeds
        miner = Algorithm1Miner(semi_hard_probability=1.0, hard_threshold=1, seed=seed)
        anchors, positives, _ = miner(points, labels)
        assert anchors.tolist() in ([1], [2]) and positives.tolist() == [3 - anchors.item()]


def test_singleton_classes_give_no_triplet():
    embeddings, labels = random_problem(4, num_classes=150)
    counts = torch.bincount(labels)
    assert (counts == 1).sum() > 10
    miner = Algorithm1Miner(seed=0)
    anchors, _, _ = miner(embeddings, labels)
    assert torch.all(counts[labels[anchors]] >= 2)
    assert miner.num_without_triplet >= int((counts == 1).sum())


def test_stats_add_up_and_distances_are_squared():
    embeddings, labels = random_problem(5, num_classes=512)
    miner = Algorithm1Miner(hard_threshold=3, one_per_class=False, seed=2)
    anchors, positives, negatives = miner(embeddings, labels)
    stats = miner.last_stats
    assert stats["num_case_a"] + stats["num_case_b"] + stats["num_case_c"] + stats["num_without_triplet"] \
        == stats["num_queries"] == len(labels)
    assert stats["num_triplets"] == stats["num_case_a"] + stats["num_case_b"] == len(anchors)
    assert stats["num_case_c"] > 0 and 0.4 * len(labels) < stats["num_semi_hard_chosen"] < 0.6 * len(labels)
    pos = ((embeddings[anchors] - embeddings[positives]) ** 2).sum(1).mean().item()
    neg = ((embeddings[anchors] - embeddings[negatives]) ** 2).sum(1).mean().item()
    assert stats["mean_pos_distance"] == pytest.approx(pos) and stats["mean_neg_distance"] == pytest.approx(neg)
    per_class = Algorithm1Miner(hard_threshold=3, seed=2)
    per_class(embeddings, labels)
    assert per_class.num_case_a + per_class.num_case_b + per_class.num_case_c + per_class.num_without_triplet \
        + per_class.num_class_already_mined == per_class.num_queries


def test_pml_triplet_loss_accepts_the_tuples():
    embeddings, labels = random_problem(6, num_classes=64)
    embeddings = torch.nn.functional.normalize(embeddings.float(), dim=1).requires_grad_()
    indices = Algorithm1Miner(seed=0)(embeddings, labels)
    loss = TripletMarginLoss(margin=0.1)(embeddings, labels, indices)
    loss.backward()
    assert torch.isfinite(loss) and embeddings.grad.abs().sum() > 0


def test_seed_and_state_dict_reproduce_the_mining():
    embeddings, labels = random_problem(8)
    first, second = Algorithm1Miner(seed=11), Algorithm1Miner(seed=11)
    assert as_list(first(embeddings, labels)) == as_list(second(embeddings, labels))
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    expected = as_list(first(embeddings, labels))
    resumed = Algorithm1Miner(seed=99)
    resumed.load_state_dict(torch.load(io.BytesIO(buffer.getvalue()), weights_only=True))
    assert as_list(resumed(embeddings, labels)) == expected


def test_invalid_parameters_are_rejected():
    with pytest.raises(ValueError):
        Algorithm1Miner(semi_hard_probability=1.5)
    with pytest.raises(ValueError):
        Algorithm1Miner(hard_threshold=0)
    with pytest.raises(ValueError):
        Algorithm1Miner(loss_band=(0.2, 0.1))
    with pytest.raises(ValueError):
        Algorithm1Miner(seed=0, generator=torch.Generator())
    with pytest.raises(TypeError):
        Algorithm1Miner(distance=object())


# --- schedule ------------------------------------------------------------------------------------------------

SCHEDULE = [{"until_step": 200, "semi_hard_probability": 1.0, "hard_threshold": None},
            {"until_step": 600, "semi_hard_probability": 0.5, "hard_threshold": 64, "refresh_every": 4},
            {"semi_hard_probability": 0.0, "hard_threshold": 64}]


def test_schedule_switches_phase_at_until_step():
    schedule = MiningSchedule.from_config({"phases": SCHEDULE, "refresh_every": 8})
    miner, pool = Algorithm1Miner(seed=0), MiningPool(triplets_per_batch=4)
    expected = {0: (1.0, None, 8), 199: (1.0, None, 8), 200: (0.5, 64, 4), 599: (0.5, 64, 4),
                600: (0.0, 64, 8), 10**6: (0.0, 64, 8)}
    for step, values in expected.items():
        phase = schedule.apply(miner, step, pool)
        assert (miner.semi_hard_probability, miner.hard_threshold, pool.refresh_every) == values
        assert phase == schedule.phase_at(step)
    assert MiningSchedule.from_config(SCHEDULE) == schedule
    assert schedule.phases[0] == MiningPhase(semi_hard_probability=1.0, until_step=200)


def test_schedule_past_last_until_step_keeps_last_phase():
    schedule = MiningSchedule.from_config([{"until_step": 10, "semi_hard_probability": 0.2}])
    assert schedule.phase_at(50).semi_hard_probability == 0.2


@pytest.mark.parametrize("config", [
    [{"semi_hard_probability": 1.0}, {"until_step": 5, "semi_hard_probability": 0.5}],
    [{"until_step": 9, "semi_hard_probability": 1.0}, {"until_step": 9, "semi_hard_probability": 0.5}],
    [{"until_step": 9, "semi_hard_probabilty": 1.0}],
    [{"semi_hard_probability": 2.0}],
    {"phases": [{"semi_hard_probability": 1.0}], "refresh_evry": 8},
    [],
])
def test_schedule_rejects_bad_configs(config):
    with pytest.raises(ValueError):
        MiningSchedule.from_config(config)


# --- pool ----------------------------------------------------------------------------------------------------

def mined_tuple(num_triplets):
    positions = torch.arange(3 * num_triplets).view(3, num_triplets)
    return positions[0], positions[1], positions[2]


def test_pool_yields_dataset_indices_until_refresh():
    pool = MiningPool(triplets_per_batch=2, refresh_every=2, shuffle=False)
    assert pool.refresh_due
    dataset_indices = np.arange(1000, 1015)
    assert pool.refill(dataset_indices, mined_tuple(5)) == 5
    assert not pool.refresh_due
    batch = pool.next_batch()
    assert batch == [1000, 1001, 1005, 1006, 1010, 1011]  # [anchors, positives, negatives]
    a, p, n = MiningPool.indices_tuple(len(batch))
    assert [batch[i] for i in a] == [1000, 1001] and [batch[i] for i in n] == [1010, 1011]
    pool.next_batch()
    assert pool.refresh_due and pool.remaining == 1  # refresh_every reached
    pool.refresh_every = 8
    assert pool.next_batch() == [1004, 1009, 1014] and pool.refresh_due  # exhausted
    with pytest.raises(RuntimeError):
        pool.next_batch()


def test_pool_state_round_trip_resumes_exactly():
    pool = MiningPool(triplets_per_batch=3, refresh_every=8, seed=5)
    pool.refill(torch.arange(500, 530), mined_tuple(10))
    pool.next_batch()
    pool.next_batch()
    state = json.loads(json.dumps(pool.state_dict()))  # plain types only
    buffer = io.BytesIO()
    torch.save(pool.state_dict(), buffer)
    for restored_state in (state, torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)):
        resumed = MiningPool(triplets_per_batch=1, seed=0)
        resumed.load_state_dict(restored_state)
        assert resumed.state_dict() == pool.state_dict()
    resumed = MiningPool(triplets_per_batch=1, seed=0)
    resumed.load_state_dict(state)
    while not pool.refresh_due:
        assert resumed.next_batch() == pool.next_batch()
    assert resumed.refresh_due
    pool.refill(torch.arange(500, 530), mined_tuple(10))
    resumed.refill(torch.arange(500, 530), mined_tuple(10))
    assert resumed.triplets == pool.triplets  # the next shuffle continues the same random stream


def test_pool_serves_full_batches_then_asks_for_a_refresh():
    from msretrieval.miners.pool import MiningPool
    pool = MiningPool(triplets_per_batch=4, refresh_every=8, shuffle=False)
    assert pool.refresh_due
    pool.refill(list(range(30)), (torch.arange(10), torch.arange(10, 20), torch.arange(20, 30)))
    assert not pool.refresh_due and len(pool.next_batch()) == 12 and len(pool.next_batch()) == 12
    assert pool.remaining == 2 and pool.refresh_due  # 2 left: not a full batch, re-mine
    pool.refill([0, 1, 2], (torch.tensor([0]), torch.tensor([1]), torch.tensor([2])))
    assert pool.next_batch() == [0, 1, 2]  # a round with fewer than T triplets serves one short batch
