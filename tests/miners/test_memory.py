"""The cross-batch memory (miners/memory.py) and in-batch mining over it, with values worked out by hand."""
from __future__ import annotations

import pytest
import torch

from msretrieval.losses import create_loss
from msretrieval.miners import create_miner
from msretrieval.miners.memory import EmbeddingMemory
from msretrieval.training.batches import without_self_pairs


def rows(*values):
    return torch.tensor(values, dtype=torch.float32)


def test_the_memory_keeps_the_last_rows_oldest_first():
    memory = EmbeddingMemory(3)
    assert len(memory) == 0
    memory.add(rows([1.0], [2.0]), torch.tensor([0, 0]), torch.tensor([10, 11]))
    memory.add(rows([3.0], [4.0]), torch.tensor([1, 1]), torch.tensor([12, 13]))
    assert len(memory) == 3
    assert memory.embeddings.flatten().tolist() == [2.0, 3.0, 4.0]
    assert memory.labels.tolist() == [0, 1, 1] and memory.indices.tolist() == [11, 12, 13]


def test_the_reference_set_is_the_batch_with_its_gradient_then_the_memory():
    memory = EmbeddingMemory(4)
    batch = rows([1.0, 0.0], [0.0, 1.0]).requires_grad_(True)
    assert memory.reference(batch, torch.tensor([0, 1]), torch.tensor([5, 6]))[0] is batch  # empty: the batch
    memory.add(batch * 2, torch.tensor([0, 1]), torch.tensor([5, 6]))
    assert not memory.embeddings.requires_grad  # stored detached: no graph kept across steps
    reference, labels, indices = memory.reference(batch, torch.tensor([2, 3]), torch.tensor([7, 8]))
    assert reference.tolist() == [[1.0, 0.0], [0.0, 1.0], [2.0, 0.0], [0.0, 2.0]]
    assert labels.tolist() == [2, 3, 0, 1] and indices.tolist() == [7, 8, 5, 6]
    reference.sum().backward()
    assert batch.grad.tolist() == [[1.0, 1.0], [1.0, 1.0]]


def test_the_memory_gives_hard_triplets_a_separated_batch_lacks_and_never_pairs_an_image_with_itself():
    """Batch: image 0 (class 0) at x = 0, image 1 (class 1) at x = 10: no hard triplet (d(a, n) <= d(a, p)).
    Memory: an older copy of image 0 at x = 2, image 2 (class 0) at x = 3, image 3 (class 1) at x = 1.
    Squared distances from anchor image 0: positives its copy (4: the same image, dropped, though (0, copy, 3)
    is hard) and image 2 (9), negative image 3 (1): hard is (0, image 2, image 3). From anchor image 1
    (x = 10): positive image 3 (81), negatives image 2 (49), image 0's copy (64) and image 0 (100): hard are
    (1, 3, 2) and (1, 3, copy of 0)."""
    miner = create_miner("hard", create_loss("triplet"), seed=0)
    batch, labels, indices = rows([0.0], [10.0]), torch.tensor([0, 1]), torch.tensor([0, 1])
    assert len(miner(batch, labels)[0]) == 0
    memory = EmbeddingMemory(8)
    memory.add(rows([2.0], [3.0], [1.0]), torch.tensor([0, 0, 1]), torch.tensor([0, 2, 3]))
    reference, reference_labels, reference_indices = memory.reference(batch, labels, indices)
    mined = miner(batch, labels, reference, reference_labels)
    assert len(mined[0]) == 4  # (0, copy of 0, 3) among them
    anchors, positives, negatives = without_self_pairs(mined, indices, reference_indices)
    found = sorted(zip(indices[anchors].tolist(), reference_indices[positives].tolist(),
                       reference_indices[negatives].tolist()))
    assert found == [(0, 2, 3), (1, 3, 0), (1, 3, 2)]
    loss = create_loss("triplet")(batch, labels, (anchors, positives, negatives), reference, reference_labels)
    assert loss.item() == pytest.approx(((0.1 + 9 - 1) + (0.1 + 81 - 64) + (0.1 + 81 - 49)) / 3)


def test_the_memory_travels_in_a_checkpoint():
    memory = EmbeddingMemory(2)
    assert EmbeddingMemory(2).load_state_dict(memory.state_dict()) is None  # an empty memory stays empty
    memory.add(rows([1.0], [2.0]), torch.tensor([0, 1]), torch.tensor([4, 5]))
    restored = EmbeddingMemory(2)
    restored.load_state_dict(memory.state_dict())
    assert torch.equal(restored.embeddings, memory.embeddings) and restored.indices.tolist() == [4, 5]
    with pytest.raises(ValueError, match="the checkpoint's memory holds 2 embeddings, this run's 3"):
        EmbeddingMemory(3).load_state_dict(memory.state_dict())
