"""HashHead (tanh relaxation / sign codes) and HashNet's beta schedule against hand-computed values."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from msretrieval.models.hashing import BetaSchedule, HashHead, codes_of_output, sign_codes
from msretrieval.retrieval.search.binary import hamming_distances, pack_bits


def head_with(weight, bias, beta: float = 1.0) -> HashHead:
    weight = torch.as_tensor(weight, dtype=torch.float32)
    head = HashHead(weight.shape[1], weight.shape[0], beta=beta)
    with torch.no_grad():
        head.linear.weight.copy_(weight)
        head.linear.bias.copy_(torch.as_tensor(bias, dtype=torch.float32))
    return head


# --- HashHead -------------------------------------------------------------------------------------------

def test_training_output_is_tanh_of_beta_times_the_linear_map():
    # 8 bits from 1 input: logits = w * x + b; x = 1, w = 0.1 * k, b = -0.3  ->  logits 0.1 k - 0.3.
    head = head_with([[0.1 * k] for k in range(8)], [-0.3] * 8, beta=2.0).train()
    out = head(torch.ones(1, 1))
    expected = [math.tanh(2.0 * (0.1 * k - 0.3)) for k in range(8)]
    torch.testing.assert_close(out[0], torch.tensor(expected))
    assert out.dtype == torch.float32


def test_training_output_is_strictly_inside_the_cube():
    head = HashHead(16, 32).train()
    out = head(torch.randn(64, 16, generator=torch.Generator().manual_seed(0)))
    assert out.shape == (64, 32)
    assert (out.abs() < 1).all() and (out.abs() > 0).any()


def test_eval_output_is_exactly_plus_minus_one_and_sign_zero_is_plus_one():
    # Zero weights: the logits are the biases; 0 must give +1 (torch.sign would give 0).
    bias = [0.0, 1.0, -1.0, 0.0, 2.0, -2.0, 0.5, -0.5]
    head = head_with(torch.zeros(8, 3), bias).eval()
    out = head(torch.randn(2, 3))
    expected = torch.tensor([1.0, 1.0, -1.0, 1.0, 1.0, -1.0, 1.0, -1.0])
    assert torch.equal(out, expected.expand(2, 8))
    assert torch.equal(head.codes(torch.randn(2, 3)), (expected > 0).expand(2, 8))


def test_eval_codes_are_the_signs_of_the_training_output():
    head = HashHead(16, 24)
    x = torch.randn(32, 16, generator=torch.Generator().manual_seed(1))
    relaxed = head.train()(x)
    codes = head.eval()(x)
    assert set(codes.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(codes, torch.where(relaxed >= 0, 1.0, -1.0))
    assert torch.equal(head.codes(x), codes > 0)       # codes() does not depend on the mode
    assert head.train().codes(x).dtype == torch.bool


def test_codes_pack_into_bytes_and_their_hamming_distance_is_the_sign_code_distance():
    head = HashHead(8, 32).eval()
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(2))
    packed = pack_bits(head.codes(x).numpy())
    assert packed.shape == (5, 4) and packed.dtype == np.uint8
    signs = head(x)
    # For {-1, +1} codes: Hamming = (K - <b_i, b_j>) / 2.
    expected = ((32 - signs @ signs.T) / 2).numpy().astype(np.int32)
    assert np.array_equal(hamming_distances(packed, packed), expected)


def test_beta_is_a_plain_attribute_set_from_outside():
    head = head_with([[1.0]] * 8, [0.0] * 8).train()
    assert head.beta == 1.0
    assert all("beta" not in name for name, _ in head.named_parameters())
    assert not any("beta" in key for key in head.state_dict())
    head.beta = 3.0
    assert head(torch.tensor([[0.2]]))[0, 0].item() == pytest.approx(math.tanh(0.6))
    for bad in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="beta"):
            head.beta = bad


def test_bad_head_arguments():
    with pytest.raises(ValueError, match="multiple of 8"):
        HashHead(16, 12)
    with pytest.raises(ValueError, match="bits must be >= 1"):
        HashHead(16, 0)
    with pytest.raises(ValueError, match="in_dim"):
        HashHead(0, 8)
    with pytest.raises(ValueError, match="beta"):
        HashHead(16, 8, beta=0.0)


def test_sign_codes_keep_dtype_and_map_zero_to_plus_one():
    x = torch.tensor([-0.0, 0.0, -1e-30, 3.0], dtype=torch.float64)
    assert sign_codes(x).tolist() == [1.0, 1.0, -1.0, 1.0] and sign_codes(x).dtype == torch.float64


@pytest.mark.parametrize("bits", [24, 96])
def test_codes_of_a_saturated_output_stay_in_the_cube(bits):
    # A network's output is u / sqrt(K) in float32; scaled back, a saturated bit is 1.0000001192092896 at 24
    # and 96 bits (the float32 after 1.0), which CSQ refuses.
    output = torch.tensor([1.0, -1.0, 0.5]) * bits ** -0.5
    assert (output * bits ** 0.5)[0].item() == 1.0000001192092896
    codes = codes_of_output(output, bits)
    assert codes[:2].tolist() == [1.0, -1.0] and codes[2].item() == pytest.approx(0.5, abs=1e-7)


# --- BetaSchedule -------------------------------------------------------------------------------------------

def test_smooth_schedule_hand_computed():
    schedule = BetaSchedule(step_size=1)   # beta = (1 + 0.005 step) ** 0.5
    assert schedule(0) == 1.0
    assert schedule(200) == pytest.approx(math.sqrt(2))     # 1 + 0.005 * 200 = 2
    assert schedule(600) == pytest.approx(2.0)              # 1 + 3 = 4
    assert schedule(1000) == pytest.approx(math.sqrt(6))    # 1 + 5 = 6
    # beta0 = 2, gamma = 0.01, power = 1: 2 * (1 + 0.5) = 3 at step 50.
    assert BetaSchedule(beta0=2.0, gamma=0.01, power=1.0, step_size=1)(50) == pytest.approx(3.0)


def test_default_schedule_is_hashnets_staircase():
    # HashNet recomputes its scale every 200 iterations: beta stays at the last multiple of 200.
    schedule = BetaSchedule()
    assert (schedule.beta0, schedule.gamma, schedule.power, schedule.step_size) == (1.0, 0.005, 0.5, 200)
    assert schedule(199) == 1.0
    assert schedule(200) == pytest.approx(math.sqrt(2)) and schedule(399) == pytest.approx(math.sqrt(2))
    assert schedule(400) == pytest.approx(math.sqrt(3))      # 1 + 0.005 * 400 = 3
    assert schedule(1099) == pytest.approx(math.sqrt(6))     # last update at 1000: 1 + 5 = 6


def test_schedule_is_a_pure_function_of_the_step_so_a_resumed_run_gets_the_same_beta():
    head = HashHead(4, 8)
    schedule = BetaSchedule()
    for step in range(651):                                  # the first run, up to step 650
        schedule.apply(head, step)
    resumed_head = HashHead(4, 8)                            # a new process resuming at step 650
    assert BetaSchedule().apply(resumed_head, 650) == head.beta == pytest.approx(math.sqrt(4))  # 1 + 0.005 * 600
    steps = [0, 5, 200, 650, 1234]
    assert [schedule(s) for s in steps] == [schedule(s) for s in reversed(steps)][::-1]


def test_bad_schedule_arguments():
    with pytest.raises(ValueError, match="step must be >= 0"):
        BetaSchedule()(-1)
    with pytest.raises(ValueError, match="step_size"):
        BetaSchedule(step_size=0)
    with pytest.raises(ValueError, match="beta0"):
        BetaSchedule(beta0=0.0)
    with pytest.raises(ValueError, match="gamma"):
        BetaSchedule(gamma=-0.1)
    with pytest.raises(ValueError, match="power"):
        BetaSchedule(power=math.nan)


def test_schedule_reaching_a_final_beta_hand_computed():
    # final 10 at step 99, smooth: gamma = (10 ** 2 - 1) / 99 = 1, beta = (1 + step) ** 0.5
    schedule = BetaSchedule.reaching(10.0, last_step=99, step_size=1)
    assert schedule.gamma == pytest.approx(1.0)
    assert [schedule(s) for s in (0, 3, 15, 99)] == pytest.approx([1.0, 2.0, 4.0, 10.0])
    # 300 steps, updated every 25: the last update is at 275, gamma = 99 / 275 = 0.36
    staircase = BetaSchedule.reaching(10.0, last_step=299, step_size=25)
    assert staircase.gamma == pytest.approx(0.36)
    assert [staircase(s) for s in (24, 25, 100, 274, 275, 299)] == pytest.approx(
        [1.0, math.sqrt(10), math.sqrt(37), math.sqrt(1 + 0.36 * 250), 10.0, 10.0])
    # beta0 = 2, power 1: 2 * (1 + gamma * 50) = 8 -> gamma = 0.06
    assert BetaSchedule.reaching(8.0, 50, beta0=2.0, power=1.0, step_size=10).gamma == pytest.approx(0.06)
    assert BetaSchedule.reaching(2.0, 50, beta0=2.0).gamma == 0.0                  # already there


def test_schedule_from_the_config():
    hashnet = {"beta0": 1.0, "gamma": None, "power": 0.5, "step_size": 200, "final": None}
    assert BetaSchedule.from_config(hashnet, 300) == BetaSchedule()             # gamma null: HashNet's 0.005
    assert BetaSchedule.from_config({**hashnet, "gamma": 0.05}, 300).gamma == 0.05
    # final 10 by step 299 with updates every 200 steps: gamma = 99 / 200
    assert BetaSchedule.from_config({**hashnet, "final": 10.0}, 300) == BetaSchedule(1.0, 0.495, 0.5, 200)
    assert BetaSchedule.from_config({"beta0": 1.0, "gamma": 0.005, "power": 0.5, "step_size": 200}, 300) \
        == BetaSchedule()                                                            # a config saved before final
    with pytest.raises(ValueError, match="both set"):
        BetaSchedule.from_config({**hashnet, "gamma": 0.05, "final": 10.0}, 300)
    with pytest.raises(ValueError, match="no update before the last step"):
        BetaSchedule.from_config({**hashnet, "final": 10.0}, 200)                   # last step 199 < 200
    with pytest.raises(ValueError, match=">= beta0"):
        BetaSchedule.reaching(0.5, 99)
    with pytest.raises(ValueError, match="power is 0"):
        BetaSchedule.reaching(10.0, 99, power=0.0, step_size=1)
    with pytest.raises(ValueError, match="step_size"):
        BetaSchedule.reaching(10.0, 99, step_size=0)
