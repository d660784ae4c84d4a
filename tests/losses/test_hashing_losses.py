"""Deep hashing losses against hand-computed values from the papers' definitions, plus tiny training runs."""
from __future__ import annotations

import logging
import math

import pytest
import torch
import torch.nn.functional as F
from pytorch_metric_learning.reducers import MeanReducer, SumReducer
from torch import nn

from msretrieval.losses import (LOSS_NAMES, CirtorchContrastiveLoss, CSQLoss, DPSHLoss, QuantizedLoss,
                                SimilarityDistillation, SquaredEuclideanTripletLoss, bit_balance, create_loss,
                                hadamard_matrix, hash_centres, quantization_errors, similarity_distillation)
from msretrieval.miners import create_miner
from msretrieval.models.hashing import BetaSchedule, HashHead


def t(values, dtype=torch.float64):
    return torch.tensor(values, dtype=dtype)


def idx(*values):
    return torch.tensor(values, dtype=torch.long)


def hamming(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise Hamming distances between {-1, +1} codes, counted bit by bit."""
    return (a[:, None, :] != b[None, :, :]).sum(-1)




# --- shared terms -----------------------------------------------------------------------------------------

# Three 2-bit relaxed codes used below.
CODES = [[0.5, -1.0], [1.0, 0.0], [-0.5, 0.5]]
# (|u| - 1)^2 per bit: [0.25, 0], [0, 1], [0.25, 0.25] -> per code 0.125, 0.5, 0.25; mean 0.875 / 3.
# Batch mean per bit: (0.5 + 1 - 0.5) / 3 = 1/3 and (-1 + 0 + 0.5) / 3 = -1/6 -> balance (1/9 + 1/36) / 2 = 5/72.


def test_quantization_error_and_bit_balance_hand_computed():
    torch.testing.assert_close(quantization_errors(t(CODES)), t([0.125, 0.5, 0.25]))
    assert bit_balance(t(CODES)).item() == pytest.approx(5 / 72)
    assert bit_balance(t([[1.0, -1.0], [-1.0, 1.0]])).item() == 0.0        # every bit split in half
    assert quantization_errors(t([[1.0, -1.0]])).item() == 0.0               # binary codes


# --- QuantizedLoss ---------------------------------------------------------------------------------------

def test_quantized_triplet_hand_computed():
    # Triplet (0, 1, 2), squared L2: d(0,1) = 0.5^2 + 1^2 = 1.25, d(0,2) = 1^2 + 1.5^2 = 3.25;
    # margin 2.5: max(2.5 + 1.25 - 3.25, 0) = 0.5.  Total = 0.5 + 0.5 * 0.875/3 + 2 * 5/72.
    loss = QuantizedLoss(SquaredEuclideanTripletLoss(margin=2.5), quantization_weight=0.5, balance_weight=2.0)
    value = loss(t(CODES), indices_tuple=(idx(0), idx(1), idx(2)))
    assert value.item() == pytest.approx(0.5 + 0.5 * 0.875 / 3 + 2 * 5 / 72)
    assert loss.last_terms == pytest.approx({"metric": 0.5, "quantization": 0.875 / 3, "balance": 5 / 72})


def test_quantized_loss_returns_its_terms_as_a_pml_loss_dict():
    loss = QuantizedLoss(SquaredEuclideanTripletLoss(margin=2.5), quantization_weight=0.5, balance_weight=2.0)
    codes = t(CODES)
    terms = loss.compute_loss(codes, None, (idx(0), idx(1), idx(2)), codes, None)
    assert set(terms) == {"metric_loss", "quantization_loss", "balance_loss"}
    assert terms["metric_loss"]["reduction_type"] == "already_reduced"
    torch.testing.assert_close(terms["quantization_loss"]["losses"], 0.5 * t([0.125, 0.5, 0.25]))   # weighted
    assert terms["quantization_loss"]["reduction_type"] == "element"
    assert terms["balance_loss"]["losses"].item() == pytest.approx(2 * 5 / 72)


def test_quantized_contrastive_keeps_the_base_loss_and_its_reducer():
    # Contrastive with its default sum reducer: 0.22 on these points (see test_losses); codes are the points.
    points, labels = t([[0.0, 0.0], [0.3, 0.0], [0.0, 0.4]]), idx(0, 0, 1)
    # (|u| - 1)^2: [1, 1], [0.49, 1], [1, 0.36] -> per code 1, 0.745, 0.68; mean 2.425 / 3.
    loss = QuantizedLoss(CirtorchContrastiveLoss(), quantization_weight=0.1, balance_weight=0.0)
    assert loss(points, labels).item() == pytest.approx(0.22 + 0.1 * 2.425 / 3)
    assert loss.margin == 0.7 and loss.distance is loss.base_loss.distance


def test_quantized_loss_feeds_a_miner_built_for_it():
    loss = create_loss("triplet", margin=8.0, quantization_weight=0.1)
    miner = create_miner("hard", loss, seed=0)
    codes = torch.tanh(torch.randn(12, 16, generator=torch.Generator().manual_seed(0)))
    labels = torch.arange(12) // 3
    triplets = miner(codes, labels)
    assert len(triplets[0]) > 0
    assert torch.isfinite(loss(codes, labels, triplets))


def test_quantized_loss_rejects_bad_weights():
    with pytest.raises(ValueError, match="quantization_weight"):
        QuantizedLoss(SquaredEuclideanTripletLoss(), quantization_weight=-1.0, balance_weight=0.0)
    with pytest.raises(ValueError, match="balance_weight"):
        QuantizedLoss(SquaredEuclideanTripletLoss(), quantization_weight=0.0, balance_weight=math.nan)


# --- CSQ ---------------------------------------------------------------------------------------------------

def test_hadamard_matrix_is_sylvesters():
    assert hadamard_matrix(2).tolist() == [[1, 1], [1, -1]]
    h = hadamard_matrix(16)
    torch.testing.assert_close(h @ h.T, 16 * torch.eye(16))       # rows orthogonal
    with pytest.raises(ValueError, match="power-of-two"):
        hadamard_matrix(12)


def test_csq_centres_are_hadamard_rows_each_followed_by_its_negation():
    # H_4 (Sylvester) rows h_0 .. h_3, in the order h_0, -h_0, h_1, -h_1, ...
    h4 = [[1, 1, 1, 1], [1, -1, 1, -1], [1, 1, -1, -1], [1, -1, -1, 1]]
    assert hash_centres(4, 8).tolist() == [code for row in h4 for code in (row, [-v for v in row])]
    assert hash_centres(4, 3).tolist() == [h4[0], [-1, -1, -1, -1], h4[1]]


@pytest.mark.parametrize("bits, num_classes", [(64, 2), (64, 10), (64, 45), (64, 128), (4, 3), (48, 2), (48, 7),
                                               (8, 17)])
def test_no_bit_is_the_same_in_every_centre(bits, num_classes):
    """Issue 25: rows of H_K taken in order all start with +1, so bit 0 (and, with 10 classes of 64 bits, 3 more)
    was +1 in every centre and wasted. Each bit is now +1 in half of the centres (one more or less when odd)."""
    centres = hash_centres(bits, num_classes)
    per_bit = centres.sum(dim=0)                                   # (+1s) - (-1s) of each bit over the centres
    assert per_bit.abs().max() == num_classes % 2
    assert len(centres.unique(dim=0)) == num_classes


@pytest.mark.parametrize("bits", [8, 64])
def test_hadamard_centres_are_plus_minus_one_and_exactly_half_the_bits_apart(bits):
    # 2K centres: h_i and -h_i are K apart (antipodal pairs 2i, 2i + 1), any other two K / 2
    for count in (bits, 2 * bits):
        centres = hash_centres(bits, count)
        assert set(centres.unique().tolist()) == {-1.0, 1.0}
        distances = hamming(centres, centres)
        pair = torch.arange(count) // 2
        antipodal = (pair[:, None] == pair[None, :]) & ~torch.eye(count, dtype=torch.bool)
        others = ~antipodal & ~torch.eye(count, dtype=torch.bool)
        assert (distances[others] == bits // 2).all() and (distances[antipodal] == bits).all()


def test_bernoulli_centres_when_bits_is_not_a_power_of_two_or_classes_exceed_2k(caplog):
    with caplog.at_level(logging.WARNING, logger="msretrieval.losses.hashing"):
        centres = hash_centres(48, 10, seed=3)
    assert "not a power of two" in caplog.text and "Bernoulli" in caplog.text
    assert centres.shape == (10, 48) and set(centres.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(centres, hash_centres(48, 10, seed=3))            # fixed seed: the same in every run
    assert not torch.equal(centres, hash_centres(48, 10, seed=4))
    many = hash_centres(8, 17)              # 17 > 2 * 8 Hadamard centres; equal centres are redrawn
    assert many.shape == (17, 8) and len(many.unique(dim=0)) == 17
    with pytest.raises(ValueError, match="coincide"):
        hash_centres(1, 3)                  # only two 1-bit codes exist


def test_csq_hand_computed():
    # 2 bits, 3 classes: centres h_0, -h_0, h_1 of H_2: c_0 = (1, 1), c_1 = (-1, -1), c_2 = (1, -1).
    # BCE((u + 1)/2, (c + 1)/2) per bit = -log((1 + c u) / 2):
    #   u = (0.5, -0.5), c_0: -log(0.75), -log(0.25)  -> mean -log(0.1875) / 2
    #   u = (0.0,  0.6), c_2: -log(0.5),  -log(0.2)   -> mean -log(0.1) / 2
    # central = -(log 0.1875 + log 0.1) / 4 = -log(0.01875) / 4
    # quantization: [0.25, 0.25] -> 0.25; [1, 0.16] -> 0.58; mean 0.415.
    loss = CSQLoss(bits=2, num_classes=3, quantization_weight=0.1)
    value = loss(t([[0.5, -0.5], [0.0, 0.6]]), idx(0, 2))
    central = -math.log(0.01875) / 4
    assert value.item() == pytest.approx(central + 0.1 * 0.415)
    assert loss.last_terms == pytest.approx({"central": central, "quantization": 0.415})


def test_csq_equals_the_authors_bce_formula_on_random_codes():
    # Authors' train.py: nn.BCELoss()(0.5 * (y + 1), 0.5 * (centre + 1)) + lambda * mean((|y| - 1)^2).
    generator = torch.Generator().manual_seed(0)
    codes = torch.tanh(2 * torch.randn(20, 32, generator=generator, dtype=torch.float64))
    labels = torch.randint(0, 50, (20,), generator=generator)
    centres = hash_centres(32, 50)[labels].double()
    expected = F.binary_cross_entropy(0.5 * (codes + 1), 0.5 * (centres + 1)) + 1e-4 * ((codes.abs() - 1) ** 2).mean()
    torch.testing.assert_close(CSQLoss(32, 50)(codes, labels), expected)
    summed = CSQLoss(32, 50, reducer=SumReducer())(codes, labels)          # per-code terms summed over the batch
    torch.testing.assert_close(summed, 20 * expected)


def test_csq_saturated_wrong_bit_is_finite():
    codes = t([[1.0, -1.0]]).requires_grad_()
    value = CSQLoss(2, 1)(codes, idx(0))                   # centre (1, 1): the second bit is exactly wrong
    value.backward()
    assert math.isfinite(value.item()) and value.item() > 10
    assert torch.isfinite(codes.grad).all()


def test_csq_errors():
    loss = CSQLoss(bits=8, num_classes=3)
    codes = torch.zeros(2, 8)
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        loss(codes, idx(0, 3))
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        loss(codes, idx(-1, 0))
    with pytest.raises(ValueError, match="integer"):
        loss(codes, torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        loss(torch.full((2, 8), 1.5), idx(0, 1))
    with pytest.raises(ValueError, match="8-bit"):
        loss(torch.zeros(2, 16), idx(0, 1))
    with pytest.raises(ValueError, match="indices_tuple"):
        loss(codes, idx(0, 1), indices_tuple=(idx(0), idx(1), idx(0)))
    with pytest.raises(ValueError, match="labels"):
        loss(codes)
    with pytest.raises(ValueError, match="1D"):                              # single-label only
        loss(codes, torch.tensor([[1, 0, 0], [0, 1, 0]]))
    with pytest.raises(ValueError, match="quantization_weight"):
        CSQLoss(8, 3, quantization_weight=-1.0)
    with pytest.raises(ValueError, match="num_classes"):
        CSQLoss(8, 0)


def test_csq_centres_are_not_saved_with_the_state_dict():
    loss = CSQLoss(8, 4)
    assert "centres" not in loss.state_dict()
    assert loss.centres.shape == (4, 8)


# --- DPSH --------------------------------------------------------------------------------------------------

# u_0 = (1, 0), u_1 = (0.5, 0.5), u_2 = (-1, 0.5); labels 0, 0, 1.
DPSH_CODES, DPSH_LABELS = [[1.0, 0.0], [0.5, 0.5], [-1.0, 0.5]], idx(0, 0, 1)
# theta = <u_i, u_j> / 2:  (0,1) 0.5/2 = 0.25 (s = 1);  (0,2) -1/2 = -0.5 (s = 0);  (1,2) -0.25/2 = -0.125 (s = 0).
# pair loss log(1 + e^theta) - s theta.
PAIR_01 = math.log(1 + math.exp(0.25)) - 0.25
PAIR_02 = math.log(1 + math.exp(-0.5))
PAIR_12 = math.log(1 + math.exp(-0.125))
# ||u - sign u||^2 / K with sign(0) = +1: u_0: (0 + 1) / 2 = 0.5; u_1: (0.25 + 0.25) / 2 = 0.25;
# u_2: (0 + 0.25) / 2 = 0.125.  Mean 0.875 / 3.
DPSH_QUANTIZATION = [0.5, 0.25, 0.125]


def test_dpsh_hand_computed_over_all_pairs():
    # Ordered pairs i != j count each unordered pair twice: the mean over the 6 is the mean over the 3.
    loss = DPSHLoss(eta=0.1)
    value = loss(t(DPSH_CODES), DPSH_LABELS)
    likelihood = (PAIR_01 + PAIR_02 + PAIR_12) / 3
    assert value.item() == pytest.approx(likelihood + 0.1 * sum(DPSH_QUANTIZATION) / 3)
    assert loss.last_terms == pytest.approx({"likelihood": likelihood, "quantization": 0.875 / 3})


def test_dpsh_sum_reducer_counts_ordered_pairs():
    value = DPSHLoss(eta=0.1, reducer=SumReducer())(t(DPSH_CODES), DPSH_LABELS)
    assert value.item() == pytest.approx(2 * (PAIR_01 + PAIR_02 + PAIR_12) + 0.1 * sum(DPSH_QUANTIZATION))


def test_dpsh_on_given_pairs_and_triplets():
    pairs = (idx(0), idx(1), idx(1), idx(2))                  # positive (0, 1), negative (1, 2)
    expected = (PAIR_01 + PAIR_12) / 2 + 0.1 * sum(DPSH_QUANTIZATION) / 3
    assert DPSHLoss()(t(DPSH_CODES), indices_tuple=pairs).item() == pytest.approx(expected)
    triplet = (idx(0), idx(1), idx(2))                        # pairs (0, 1) and (0, 2)
    expected = (PAIR_01 + PAIR_02) / 2 + 0.1 * sum(DPSH_QUANTIZATION) / 3
    assert DPSHLoss()(t(DPSH_CODES), DPSH_LABELS, triplet).item() == pytest.approx(expected)


def test_dpsh_is_stable_for_large_inner_products():
    # theta = +-900: log(1 + e^900) overflows; softplus does not. Both pairs are right, so the
    # likelihood is ~0; the codes are 29 away from +-1: ||u - sign u||^2 / K = 29^2.
    codes = t([[30.0, 30.0], [30.0, 30.0], [-30.0, -30.0]]).requires_grad_()
    value = DPSHLoss(eta=0.1)(codes, idx(0, 0, 1))
    assert value.item() == pytest.approx(0.1 * 29 ** 2)
    value.backward()
    assert torch.isfinite(codes.grad).all()


def test_dpsh_single_code_has_only_the_quantization_term():
    value = DPSHLoss(eta=1.0)(t([[0.5, -0.5]]), idx(0))
    assert value.item() == pytest.approx(0.25)
    with pytest.raises(ValueError, match="eta"):
        DPSHLoss(eta=-0.1)


# --- similarity distillation ---------------------------------------------------------------------------------

# Codes u_0 = (1, 0), u_1 = (0.5, 0.5), u_2 = (-1, 0.5) (K = 2):
#   u_i . u_j / 2 = 0.25 (0, 1), -0.5 (0, 2), -0.125 (1, 2).
# Descriptors (1, 0), (0, 2), (3, 4): cosines 0 (0, 1), 0.6 (0, 2), 0.8 (1, 2).
# Errors 0.25, -1.1, -0.925; squares 0.0625, 1.21, 0.855625: mean over the pairs 2.128125 / 3 = 0.709375.
# d/du_0 of (1/3) sum_{i<j} e_ij^2 = (2/3) (e_01 u_1 + e_02 u_2) / 2 = (0.25 (0.5, 0.5) - 1.1 (-1, 0.5)) / 3
#   = (1.225, -0.425) / 3.
DISTILL_CODES, DISTILL_DESCRIPTORS = [[1.0, 0.0], [0.5, 0.5], [-1.0, 0.5]], [[1.0, 0.0], [0.0, 2.0], [3.0, 4.0]]


def test_similarity_distillation_hand_computed():
    assert similarity_distillation(t(DISTILL_CODES), t(DISTILL_DESCRIPTORS)).item() == pytest.approx(0.709375)
    term = SimilarityDistillation(2.0)
    assert term(t(DISTILL_CODES), t(DISTILL_DESCRIPTORS)).item() == pytest.approx(2 * 0.709375)
    assert term.last_terms == pytest.approx({"distill": 0.709375})      # unweighted, as the losses' terms
    assert similarity_distillation(t([[1.0, -1.0]]), t([[0.3, 0.4]])).item() == 0.0   # one code: no pair


def test_similarity_distillation_trains_the_codes_only():
    """The float descriptors are targets: no gradient reaches them through their similarities."""
    codes, descriptors = t(DISTILL_CODES).requires_grad_(), t(DISTILL_DESCRIPTORS).requires_grad_()
    similarity_distillation(codes, descriptors).backward()
    assert descriptors.grad is None
    torch.testing.assert_close(codes.grad[0], t([1.225, -0.425]) / 3)


def test_similarity_distillation_rejects_bad_weights():
    for weight in (-0.1, math.inf, math.nan):
        with pytest.raises(ValueError, match="distill_weight"):
            SimilarityDistillation(weight)


# --- all losses ------------------------------------------------------------------------------------------------

LOSS_BUILDERS = {
    "quantized_triplet": lambda: QuantizedLoss(SquaredEuclideanTripletLoss(margin=8.0), 0.1, 0.1),
    "quantized_contrastive": lambda: QuantizedLoss(CirtorchContrastiveLoss(margin=4.0), 0.1, 0.1),
    "csq": lambda: CSQLoss(16, 4),
    "dpsh": lambda: DPSHLoss(),
}


@pytest.mark.parametrize("name", LOSS_BUILDERS)
def test_gradients_flow_to_the_head(name):
    head = HashHead(8, 16).train()
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(0))
    value = LOSS_BUILDERS[name]()(head(x), torch.arange(16) % 4)
    value.backward()
    for parameter in head.parameters():
        assert torch.isfinite(parameter.grad).all() and parameter.grad.abs().sum() > 0


# --- factory -------------------------------------------------------------------------------------------------

def test_factory_registers_the_hashing_losses():
    assert {"csq", "dpsh"} <= set(LOSS_NAMES)
    csq = create_loss("csq", bits=64, num_classes=10, quantization_weight=1e-3)
    assert isinstance(csq, CSQLoss) and csq.quantization_weight == 1e-3 and csq.centres.shape == (10, 64)
    assert create_loss("csq", bits=64, num_classes=10).quantization_weight == 1e-4
    dpsh = create_loss("dpsh", quantization_weight=0.5, reducer="sum")
    assert isinstance(dpsh, DPSHLoss) and dpsh.eta == 0.5
    assert all(isinstance(r, SumReducer) for r in dpsh.reducer.reducers.values())
    assert create_loss("dpsh").eta == 0.1


def test_factory_wraps_metric_losses_only_when_asked():
    assert isinstance(create_loss("triplet"), SquaredEuclideanTripletLoss)
    wrapped = create_loss("triplet", margin=8.0, reducer="mean", balance_weight=0.2)
    assert isinstance(wrapped, QuantizedLoss) and isinstance(wrapped.base_loss, SquaredEuclideanTripletLoss)
    assert (wrapped.quantization_weight, wrapped.balance_weight, wrapped.margin) == (0.0, 0.2, 8.0)
    assert isinstance(wrapped.base_loss.reducer, MeanReducer)
    contrastive = create_loss("contrastive", quantization_weight=0.1)
    assert isinstance(contrastive.base_loss, CirtorchContrastiveLoss) and contrastive.balance_weight == 0.0


def test_factory_rejects_options_a_loss_does_not_take():
    with pytest.raises(ValueError, match="needs bits and num_classes"):
        create_loss("csq", bits=64)
    with pytest.raises(ValueError, match="takes no margin"):
        create_loss("csq", margin=0.1, bits=64, num_classes=10)
    with pytest.raises(ValueError, match="takes no balance_weight"):
        create_loss("dpsh", balance_weight=0.1)
    with pytest.raises(ValueError, match="takes no bits, num_classes"):
        create_loss("dpsh", bits=64, num_classes=10)
    with pytest.raises(ValueError, match="takes no bits"):
        create_loss("triplet", bits=64)


# --- tiny training runs ---------------------------------------------------------------------------------------

def gaussian_classes(generator: torch.Generator, num_classes: int = 3, per_class: int = 16, dim: int = 16):
    """A sampler of (features, labels): class means ~ N(0, I), unit noise, so the classes overlap a little."""
    means = torch.randn(num_classes, dim, generator=generator)
    labels = torch.arange(num_classes).repeat_interleave(per_class)

    def sample() -> tuple[torch.Tensor, torch.Tensor]:
        return means[labels] + torch.randn(len(labels), dim, generator=generator), labels
    return sample


def within_over_between(model: nn.Module, features: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean Hamming distance of eval-mode codes within a class over the mean between classes."""
    model.eval()
    with torch.no_grad():
        distances = hamming(model(features), model(features)).double()
    same = labels[:, None] == labels[None, :]
    within = distances[same & ~torch.eye(len(labels), dtype=torch.bool)].mean()
    return (within / distances[~same].mean()).item()


TRAINED_LOSSES = {
    "csq": lambda: CSQLoss(bits=16, num_classes=3),
    # Margin 16 on squared distances of 16-bit codes: 4 bits of separation (Hamming h is 4h apart).
    "triplet_quantized": lambda: QuantizedLoss(SquaredEuclideanTripletLoss(margin=16.0), 0.1, 0.1),
    "dpsh": lambda: DPSHLoss(),
}


@pytest.mark.parametrize("name", TRAINED_LOSSES)
def test_a_few_steps_separate_gaussian_classes_in_hamming_space(name, one_thread):
    torch.manual_seed(0)                                          # the layers' initialisation
    sample = gaussian_classes(torch.Generator().manual_seed(0))
    model = nn.Sequential(nn.Linear(16, 32), HashHead(32, 16))
    held_out = sample()
    before = within_over_between(model, *held_out)
    loss, schedule = TRAINED_LOSSES[name](), BetaSchedule(step_size=1)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for step in range(50):
        model.train()
        schedule.apply(model[1], step)
        features, labels = sample()
        value = loss(model(features), labels)
        optimizer.zero_grad()
        value.backward()
        optimizer.step()
    after = within_over_between(model, *held_out)
    # Random hyperplanes already keep some locality (ratio ~0.7 here); training must do far better.
    assert before > 0.5
    assert after < 0.25
