"""train.py end to end on a tiny generated set: outputs, self-describing checkpoints, exact resumption."""
import json

import pytest
import torch
import yaml

from accelerate.utils import set_seed
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import train
from models.retrieval_net import load_model


def _config(tmp_path, manifest, **train_overrides) -> dict:
    config = yaml.safe_load((train.DEFAULT_CONFIG.parent / "smoke.yaml").read_text())
    config["run_dir"] = str(tmp_path / "run")
    config["data"].update(train=f"csv:{manifest}", train_size=64, workers=1)
    config["model"].update(backbone="resnet18", pretrained=False, trainable=["backbone.model.layer4", "head"], init_images=12,
                           head={"num_clusters": 4, "local_dim": 8, "out_dim": 8})
    config["mining"].update(classes=3, per_class=4)
    config["train"].update(steps=6, triplets_per_step=2, checkpoint_every=3, log_every=1, **train_overrides)
    config["eval"].update(benchmark=f"csv:{manifest}", image_size=64, baselines=["gem"], cache_dir=None)
    return config


def _write(tmp_path, config) -> str:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def test_run_writes_config_checkpoints_tensorboard_and_results(tmp_path, make_labelled_set):
    torch.manual_seed(0)
    config = _config(tmp_path, make_labelled_set(num_classes=3, per_class=5))
    assert train.main(["--config", _write(tmp_path, config)]) == 0
    run = tmp_path / "run"
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["steps"] == 6
    results = json.loads((run / "results.json").read_text())
    assert [r["method"] for r in results["results"]] == ["gem", "msnetvlad (trained)"]
    assert set(results["results"][1]["metrics"]) >= {"mAP", "mAP@R", "R@1"}
    model = load_model(run / "last.pth")  # needs no training flags
    assert model.out_dim == 8 and model.config()["backbone"] == "resnet18"
    events = EventAccumulator(str(run / "tb"))
    events.Reload()
    assert {"train/loss", "mining/num_case_a", "mining/num_case_b", "mining/mean_neg_distance"} <= set(
        events.Tags()["scalars"])
    grid = events.Images("mining/triplets")[0]  # rows of (anchor, positive, negative) thumbnails
    assert (grid.width, grid.height) == (3 * 96 + 4 * 2, 3 * 96 + 4 * 2)  # one triplet per class, 3 classes


def test_killed_run_resumes_to_the_uninterrupted_weights(tmp_path, make_labelled_set, monkeypatch):
    manifest = make_labelled_set(num_classes=3, per_class=5)
    straight = _config(tmp_path / "a", manifest)
    (tmp_path / "a").mkdir()
    assert train.main(["--config", _write(tmp_path / "a", straight), "--skip-final-eval"]) == 0
    expected = torch.load(tmp_path / "a" / "run" / "last.pth", weights_only=False)["state_dict"]

    crashed = _config(tmp_path / "b", manifest)
    (tmp_path / "b").mkdir()
    original = train.Trainer.train_step

    def crash_at_step_five(self):
        if self.step == 4:
            raise KeyboardInterrupt  # stands in for SIGKILL after the step-3 checkpoint
        return original(self)

    monkeypatch.setattr(train.Trainer, "train_step", crash_at_step_five)
    with pytest.raises(KeyboardInterrupt):
        train.main(["--config", _write(tmp_path / "b", crashed), "--skip-final-eval"])
    assert torch.load(tmp_path / "b" / "run" / "last.pth", weights_only=False)["training_state"]["step"] == 3
    monkeypatch.setattr(train.Trainer, "train_step", original)
    assert train.main(["--resume", str(tmp_path / "b" / "run"), "--skip-final-eval"]) == 0
    resumed = torch.load(tmp_path / "b" / "run" / "last.pth", weights_only=False)
    assert resumed["training_state"]["step"] == 6
    for key, value in expected.items():
        assert torch.equal(resumed["state_dict"][key], value), key


def test_cached_prefix_trains_only_the_stages_after_the_frozen_prefix(tmp_path, make_labelled_set):
    config = _config(tmp_path, make_labelled_set(num_classes=3, per_class=5), inputs="cached_prefix")
    assert train.main(["--config", _write(tmp_path, config), "--skip-final-eval"]) == 0
    trained = load_model(tmp_path / "run" / "last.pth").state_dict()
    set_seed(0)  # train.py seeds before building the model: this is its initial network
    initial = train.create_model("msnetvlad", backbone="resnet18", **config["model"]["head"]).state_dict()
    frozen = [k for k in initial if k.startswith("backbone.") and not k.startswith("backbone.model.layer4.")]
    assert frozen and all(torch.equal(trained[k], initial[k]) for k in frozen)
    assert not torch.equal(trained["backbone.model.layer4.1.conv2.weight"], initial["backbone.model.layer4.1.conv2.weight"])


def test_trainable_name_matching_nothing_is_an_error(tmp_path, make_labelled_set):
    config = _config(tmp_path, make_labelled_set(num_classes=3, per_class=5))
    config["model"]["trainable"] = ["model.layer4", "head"]  # missing the "backbone." prefix
    with pytest.raises(ValueError, match="'model.layer4' matches no parameter"):
        train.main(["--config", _write(tmp_path, config), "--skip-final-eval"])
