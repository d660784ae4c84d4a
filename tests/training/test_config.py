"""Run configs: defaults for every key, unknown keys and wrong types rejected before any work, fresh run dirs."""
from __future__ import annotations

import pytest
import yaml

from msretrieval.training.config import merge, resolve_config, unique_run_dir
from msretrieval.utils.config import ConfigError, parse_yaml


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
    ({"loss": {"distill_weight": 0.5}}, "set model.head.hash_bits"),
    ({"model": {"hash_beta": {"final": 10.0, "gamma": 0.05}}}, "model.hash_beta: gamma .* and final .* are both set"),
    ({"model": {"hash_beta": {"final": 10.0}}, "train": {"steps": 200}}, "model.hash_beta: beta cannot rise"),
    ({"model": {"hash_beta": {"step_size": 0}}}, "model.hash_beta: step_size must be >= 1"),
    ({"model": {"head": {"hash_bits": 16}}, "loss": {"distill_weight": -1.0}}, "loss.distill_weight must be >= 0"),
    ({"model": {"head": {"hash_bits": 16}}, "loss": {"distill_weight": "yes"}}, "'loss.distill_weight' must be float"),
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
    from msretrieval.losses.contrastive import CirtorchContrastiveLoss
    from msretrieval.losses.hashing import CSQLoss, DPSHLoss, QuantizedLoss
    from msretrieval.losses.triplet import SquaredEuclideanTripletLoss
    from msretrieval.training.trainer import build_loss

    base = {"name": "triplet", "margin": 0.1, "quantization_weight": None, "balance_weight": None}
    assert type(build_loss(base, None, 5)) is SquaredEuclideanTripletLoss
    quantized = build_loss({**base, "name": "contrastive", "margin": 0.7, "quantization_weight": 0.1}, 16, 5)
    assert isinstance(quantized, QuantizedLoss) and isinstance(quantized.base_loss, CirtorchContrastiveLoss)
    assert quantized.code_scale == 4.0 and quantized.balance_weight == 0.0  # codes / sqrt(16) -> codes
    csq = build_loss({**base, "name": "csq"}, 16, 5)
    assert isinstance(csq, CSQLoss) and tuple(csq.centres.shape) == (5, 16)
    assert isinstance(build_loss({**base, "name": "dpsh", "quantization_weight": 0.2}, 16, 5), DPSHLoss)


# -- values that cannot work: the exact message names the key, the value and what is accepted ------------------
@pytest.mark.parametrize("given, message", [
    ({"train": {"steps": -3}}, "train.steps must be >= 1, got -3"),
    ({"train": {"steps": None}}, "config key 'train.steps' must be int, got null"),
    ({"train": {"max_bad_steps": 0}}, "train.max_bad_steps must be >= 1, got 0"),
    ({"train": {"keep_checkpoints": 0}}, "train.keep_checkpoints must be >= 1, got 0"),
    ({"train": {"keep_checkpoints": 1.5}}, "config key 'train.keep_checkpoints' must be int, got 1.5"),
    ({"train": {"forward_chunk": 0}}, "train.forward_chunk must be >= 1 or null (a whole shard), got 0"),
    ({"train": {"eval_every": -1}}, "train.eval_every must be >= 0 (0: never), got -1"),
    ({"train": {"mixed_precision": "fp8"}}, "train.mixed_precision must be one of ['no', 'fp16', 'bf16'], got 'fp8'"),
    ({"data": {"max_bad_fraction": 1.5}}, "data.max_bad_fraction must be in [0, 1] (0: any unreadable training image "
                                          "stops the run), got 1.5"),
    ({"data": {"max_bad_fraction": "1%"}}, "config key 'data.max_bad_fraction' must be float, got '1%'"),
    ({"data": {"train": "imagenet:train"}}, "data.train must be flowers102[:SPLIT], csv:PATH[:SPLIT] or gldv2:PATH, "
                                           "got 'imagenet:train'"),
    ({"data": {"root": 5}}, "config key 'data.root' must be str, got 5"),
    ({"data": {"workers": -1}}, "data.workers must be >= 0, got -1"),
    ({"mining": {"miner": "semi_hard"}}, "mining.miner must be one of ['algorithm1', 'batch', 'semihard', 'hard'], "
                                         "got 'semi_hard'"),
    ({"loss": {"name": "arcface"}},
     "loss.name must be one of ['triplet', 'contrastive', 'csq', 'dpsh'], got 'arcface'"),
    ({"model": {"architecture": "vit"}},
     "model.architecture must be one of ['gem', 'msnetvlad', 'netvlad'], got 'vit'"),
    ({"model": {"head": {"out_dim": "big"}}}, "config key 'model.head.out_dim' must be int, got 'big'"),
    ({"model": {"head": {"out_dim": 0}}}, "model.head.out_dim must be >= 1 or null (no projection), got 0"),
    ({"mining": {"refresh_every": 0}}, "mining.refresh_every must be >= 1, got 0"),
    ({"mining": {"memory": -1}}, "mining.memory must be >= 0 (0: none), got -1"),
    ({"mining": {"schedule": [{"semi_hard_probability": 2.0}]}},
     "mining.schedule: semi_hard_probability must be in [0, 1], got 2.0 (a list of phases {until_step, "
     "semi_hard_probability, hard_threshold, refresh_every}, the last without until_step)"),
    ({"mining": {"loss_band": [0.5, 0.1]}}, "mining.loss_band must be null or [low, high] with low < high, "
                                            "got [0.5, 0.1]"),
    ({"optim": {"scheduler": "linear"}}, "optim.scheduler must be one of ['cosine', 'constant'], got 'linear'"),
    ({"optim": {"lr": -0.1}}, "optim.lr must be >= 0, got -0.1"),
    ({"eval": {"benchmark": "oxford5k"}}, "eval.benchmark must be flowers102, flowers102-clutter, csv:PATH[:SPLIT] or "
                                          "revisitop:NAME, got 'oxford5k'"),
    ({"eval": {"limit": 0}}, "eval.limit must be >= 1 or null (all), got 0"),
    ({"eval": {"scales": [1.0, -1]}}, "eval.scales must be a list of distinct positive numbers, got [1.0, -1]"),
    ({"seed": -1}, "seed must be >= 0, got -1"),
])
def test_impossible_values_fail_with_the_exact_message(tmp_path, given, message):
    with pytest.raises(ConfigError) as error:
        resolve_config(write(tmp_path, given))
    assert str(error.value) == message


def test_null_is_accepted_where_it_means_something(tmp_path):
    config = resolve_config(write(tmp_path, {"train": {"forward_chunk": None}, "optim": {"head_lr": None},
                                             "eval": {"cache_dir": None}}))
    assert config["train"]["forward_chunk"] is None and config["optim"]["head_lr"] is None


# -- checks against the data, before any image is read or a model is built ----------------------------------------
def data_config(tmp_path, manifest, **mining) -> dict:
    return {"run_dir": str(tmp_path / "run"), "data": {"train": f"csv:{manifest}", "val_classes": 0},
            "mining": {"classes_per_batch": 3, "images_per_class": 2, **mining},
            "eval": {"benchmark": f"csv:{manifest}", "baselines": []}}


@pytest.mark.parametrize("change, message", [
    ({"mining": {"classes_per_batch": 4}},
     "mining.classes_per_batch = 4, but toy has 3 classes with 2 or more images: use at most 3"),
    ({"data": {"val_classes": 1}}, "mining.classes_per_batch = 3, but toy has 2 classes with 2 or more images once "
                                   "data.val_classes = 1 are held out: use at most 2"),
    ({"mining": {"images_per_class": 5}}, "mining.images_per_class = 5, but no training class of toy has more than 4 "
                                          "images (every class would repeat images): use at most 4"),
    ({"mining": {"miner": "algorithm1", "per_class": 6}}, "mining.per_class = 6, but no training class of toy has "
                                                         "more than 4 images (every class would repeat images): use "
                                                         "at most 4"),
    ({"eval": {"baselines": ["gem", "nope"]}}, "eval.baselines: unknown method(s) ['nope']; available: "),
    ({"data": {"train": "csv:{root}/missing.csv"}}, "data.train = 'csv:{root}/missing.csv': {root}/missing.csv "
                                                    "not found"),
    ({"eval": {"benchmark": "csv:{root}/gone.csv:test"}}, "eval.benchmark = 'csv:{root}/gone.csv:test': "
                                                          "{root}/gone.csv not found"),
    ({"data": {"train": "flowers102:train"}}, "data.train = 'flowers102:train' needs {root}/flowers102/labels.csv, "
                                              "which does not exist: the data root is {root} (set it with "
                                              "--data-root, $DATA_ROOT or data.root; scripts/prepare_flowers102.py "
                                              "builds the pack)"),
    ({"eval": {"benchmark": "revisitop:roxford5k"}}, "eval.benchmark = 'revisitop:roxford5k': "
                                                     "{root}/roxford5k/gnd_roxford5k.pkl not found"),
])
def test_configs_that_do_not_fit_the_data_fail_before_any_work(tmp_path, make_labelled_set, monkeypatch, change,
                                                                message):
    import PIL.Image

    import train
    import msretrieval.training.trainer

    manifest = make_labelled_set()  # 3 classes x 4 images, "toy"
    config = data_config(tmp_path, manifest)
    for section, values in change.items():
        config[section].update({k: v.format(root=tmp_path) if isinstance(v, str) else v for k, v in values.items()})
    opened = []
    monkeypatch.setattr(PIL.Image, "open", lambda *a, **k: opened.append(a) or pytest.fail("an image was read"))
    monkeypatch.setattr(msretrieval.training.trainer, "create_model", lambda *a, **k: pytest.fail("a model was built"))
    with pytest.raises(ValueError) as error:
        train.main(["--config", write(tmp_path, config), "--data-root", str(tmp_path)])
    expected = message.format(root=tmp_path)
    assert str(error.value).startswith(expected) if expected.endswith("available: ") else str(error.value) == expected
    assert not opened and not (tmp_path / "run").exists()  # no run directory either


def test_invalid_yaml_is_one_line_naming_the_place(tmp_path):
    from msretrieval.utils.config import ConfigError, load_yaml

    path = tmp_path / "broken.yaml"
    path.write_text("train:\n  steps: [1,\n")
    with pytest.raises(ConfigError) as error:
        load_yaml(path)
    assert str(error.value).startswith(f"{path}: invalid YAML at line 3, column 1: ") and "\n" not in str(error.value)


# -- training images vs the final evaluation's benchmark ------------------------------------------------------------
def _stopped_before_training(tmp_path, monkeypatch, config) -> str:
    """train.main's one-line error for ``config``; no image decoded, no model built, no run directory."""
    import PIL.Image

    import train
    import msretrieval.training.trainer
    from msretrieval.utils.cli import run_cli

    monkeypatch.setattr(PIL.Image, "open", lambda *a, **k: pytest.fail("an image was decoded"))
    monkeypatch.setattr(msretrieval.training.trainer, "create_model", lambda *a, **k: pytest.fail("a model was built"))
    with pytest.raises(ValueError) as error:
        train.main(["--config", write(tmp_path, config), "--data-root", str(tmp_path)])
    assert "\n" not in str(error.value) and not (tmp_path / "run").exists()
    assert run_cli(lambda: train.main(["--config", write(tmp_path, config), "--data-root", str(tmp_path)])) == 2
    return str(error.value)


def test_training_on_a_renamed_copy_of_a_benchmark_image_stops_before_training(tmp_path, make_labelled_set,
                                                                                monkeypatch):
    import csv
    import shutil

    manifest = make_labelled_set()  # 3 classes x 4 images, split "test": the benchmark
    rows = list(csv.DictReader(manifest.open()))
    (tmp_path / "train").mkdir()
    training_rows = []
    for i, row in enumerate(rows):  # 12 training images: 10 generated anew, 2 copies of benchmark images
        target = tmp_path / "train" / f"t{i}.jpg"
        if i in (4, 9):
            shutil.copyfile(manifest.parent / row["file"], target)
        else:
            from PIL import Image
            Image.new("RGB", (48, 40), (i * 20, 255 - i * 20, 7)).save(target)
        training_rows.append(f"{target},{row['class_id']},train")
    train_manifest = tmp_path / "train.csv"
    train_manifest.write_text("file,class_id,split\n" + "\n".join(training_rows) + "\n")
    config = data_config(tmp_path, train_manifest)
    config["eval"]["benchmark"] = f"csv:{manifest}"
    message = _stopped_before_training(tmp_path, monkeypatch, config)
    copies = [f"{tmp_path / 'train' / f't{i}.jpg'} (same bytes as {manifest.parent / rows[i]['file']})" for i in (4, 9)]
    assert message == (f"the training set data.train = csv:{train_manifest} shares 2 of its 12 images with the "
                       f"evaluation benchmark eval.benchmark = csv:{manifest} (by path or identical bytes): "
                       f"{copies[0]}; {copies[1]}. Train on images the benchmark does not evaluate (csv:PATH:train "
                       f"keeps a manifest's train rows), or evaluate on another benchmark")


def test_training_on_the_benchmarks_own_files_stops_naming_the_first_three(tmp_path, make_labelled_set, monkeypatch):
    manifest = make_labelled_set()
    message = _stopped_before_training(tmp_path, monkeypatch, data_config(tmp_path, manifest))  # the same manifest
    first = ", ".join(f"{manifest.parent / 'images' / f'c0_{i}.jpg'}" for i in range(3)).replace(", ", "; ")
    assert message.startswith(f"the training set data.train = csv:{manifest} shares 12 of its 12 images with the "
                              f"evaluation benchmark eval.benchmark = csv:{manifest} (by path or identical bytes): "
                              f"{first}; .... Train on")


def test_a_manifest_without_a_split_says_which_rows_it_trains_on(tmp_path, caplog):
    import logging

    from msretrieval.training.data import load_training_set

    rows = ["file,class_id,split"] + [f"x{i}.jpg,{i % 2},{split}" for i, split in
                                      enumerate(["train"] * 5 + ["test"] * 3 + ["val"] * 2)]
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    (tmp_path / "plain.csv").write_text("file,class_id\na.jpg,1\nb.jpg,2\n")
    with caplog.at_level(logging.INFO, logger="msretrieval.training.data"):
        assert len(load_training_set(f"csv:{tmp_path / 'm.csv'}", tmp_path)) == 10
        assert len(load_training_set(f"csv:{tmp_path / 'm.csv'}:train", tmp_path)) == 5  # a split: nothing said
        assert len(load_training_set(f"csv:{tmp_path / 'plain.csv'}", tmp_path)) == 2
    said = [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "msretrieval.training.data"]
    manifest = tmp_path / "m.csv"
    assert said == [
        ("INFO", f"training on all 10 rows of {manifest}, every split value: 3 test, 5 train, 2 val "
                 f"(csv:PATH:SPLIT keeps one)"),
        ("WARNING", f"the training set csv:{manifest} includes its 3 'test' rows: use csv:{manifest}:train to train "
                    f"on the train rows only"),
        ("INFO", f"training on all 2 rows of {tmp_path / 'plain.csv'} (no split column)")]


def test_end_to_end_hashing_config_is_the_main_job_with_a_hashing_layer():
    """configs/flowers_hash_e2e.yaml: main.yaml's frozen blocks and step budget, from the ImageNet backbone, with
    64 bits, beta reaching 10 by the last step and no distillation term (measured to hurt, docs/hashing.md)."""
    from pathlib import Path

    from msretrieval.models.hashing import BetaSchedule

    configs = Path(__file__).resolve().parents[2] / "configs"
    e2e, main = resolve_config(configs / "flowers_hash_e2e.yaml"), resolve_config(configs / "main.yaml")
    assert e2e["model"]["trainable"] == main["model"]["trainable"] and e2e["train"]["steps"] == main["train"]["steps"]
    assert e2e["model"]["pretrained"] and e2e["model"]["init_from"] is None
    assert e2e["model"]["head"]["hash_bits"] == 64 and e2e["loss"]["distill_weight"] is None
    schedule = BetaSchedule.from_config(e2e["model"]["hash_beta"], e2e["train"]["steps"])
    assert schedule(e2e["train"]["steps"] - 1) == pytest.approx(10.0)
