"""Run configs: defaults for every key, unknown keys and wrong types rejected before any work, fresh run dirs."""
from __future__ import annotations

import pytest
import yaml

from training.config import merge, resolve_config, unique_run_dir
from utils.config import ConfigError, parse_yaml


def write(tmp_path, data) -> str:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_a_partial_config_is_completed_from_the_defaults(tmp_path):
    config = resolve_config(write(tmp_path, {"train": {"steps": 7}}), ["optim.lr=3e-5"])
    assert config["train"]["steps"] == 7 and config["optim"]["lr"] == 3e-5
    assert config["eval"]["cache_dir"] == "cache/descriptors" and config["model"]["head"]["p"] == 3.0
    assert resolve_config(None, ["model.head.p=4"])["model"]["head"]["p"] == 4


@pytest.mark.parametrize("given, message", [
    ({"trian": {"steps": 3}}, "unknown config key 'trian'"),
    ({"train": {"step": 3}}, "unknown config key 'train.step'"),
    ({"train": {"steps": "ten"}}, "'train.steps' must be int"),
    ({"data": {"val_classes": True}}, "'data.val_classes' must be int"),
    ({"model": {"head": 8}}, "'model.head' must be a section"),
    ({"mining": {"miner": "semi_hard"}}, "mining.miner must be one of"),
    ({"train": {"grad_accum": 0}}, "train.grad_accum must be >= 1"),
    ({"data": {"crop_scale": [0.9, 0.5]}}, "data.crop_scale"),
    ({"train": {"mixed_precision": "fp8"}}, "train.mixed_precision"),
    ({"model": {"head": {"hash_bits": 12}}}, "model.head.hash_bits must be a positive multiple of 8"),
    ({"loss": {"name": "csq"}}, "set model.head.hash_bits"),
    ({"loss": {"quantization_weight": 0.1}}, "set model.head.hash_bits"),
    ({"model": {"head": {"hash_bits": 16}}, "loss": {"name": "dpsh", "balance_weight": 0.1}},
     "takes no loss.balance_weight"),
    ({"model": {"head": {"hash_bits": 16}}, "loss": {"name": "csq"}, "mining": {"miner": "algorithm1"}},
     "no triplets"),
])
def test_bad_configs_fail_naming_the_key(tmp_path, given, message):
    with pytest.raises(ConfigError, match=message):
        resolve_config(write(tmp_path, given))


def test_overrides_must_name_existing_keys():
    with pytest.raises(ConfigError, match="unknown key 'train.stpes'"):
        resolve_config(None, ["train.stpes=3"])


def test_yaml_numbers_in_exponent_form_are_floats():
    assert parse_yaml("3e-5") == 3e-5 and parse_yaml("[1e3, .5]") == [1000.0, 0.5]
    assert parse_yaml("1e5x") == "1e5x" and parse_yaml("2") == 2


def test_lists_replace_the_default_list():
    merged = merge({"a": [1, 2], "b": {"c": 1}}, {"a": [3]})
    assert merged == {"a": [3], "b": {"c": 1}}


def test_run_directories_are_never_reused(tmp_path):
    assert unique_run_dir(tmp_path / "run") == tmp_path / "run"
    (tmp_path / "run").mkdir()
    assert unique_run_dir(tmp_path / "run") == tmp_path / "run"  # empty: fine
    (tmp_path / "run" / "last.pth").write_bytes(b"")
    (tmp_path / "run-2").mkdir()
    (tmp_path / "run-2" / "x").write_bytes(b"")
    assert unique_run_dir(tmp_path / "run") == tmp_path / "run-3"


def test_hashing_losses_are_built_for_the_code_length():
    from losses.contrastive import CirtorchContrastiveLoss
    from losses.hashing import CSQLoss, DPSHLoss, QuantizedLoss
    from losses.triplet import SquaredEuclideanTripletLoss
    from training.trainer import build_loss

    base = {"name": "triplet", "margin": 0.1, "quantization_weight": None, "balance_weight": None}
    assert type(build_loss(base, None, 5)) is SquaredEuclideanTripletLoss
    quantized = build_loss({**base, "name": "contrastive", "margin": 0.7, "quantization_weight": 0.1}, 16, 5)
    assert isinstance(quantized, QuantizedLoss) and isinstance(quantized.base_loss, CirtorchContrastiveLoss)
    assert quantized.code_scale == 4.0 and quantized.balance_weight == 0.0  # codes / sqrt(16) -> codes
    csq = build_loss({**base, "name": "csq"}, 16, 5)
    assert isinstance(csq, CSQLoss) and tuple(csq.centres.shape) == (5, 16)
    assert isinstance(build_loss({**base, "name": "dpsh", "quantization_weight": 0.2}, 16, 5), DPSHLoss)
