"""train.py end to end on tiny generated sets: outputs, self-describing checkpoints, exact resumption, no test
image read before the final evaluation, run directories never reused."""
import csv
import json

import PIL.Image
import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import train
from msretrieval.models.retrieval_net import create_model, load_model
from msretrieval.training.trainer import Trainer


def tiny_config(tmp_path, manifest, miner="batch", **train_overrides) -> dict:
    """A few steps of a randomly initialised ResNet-18 + MS-NetVLAD at 64 px on real photos (fast on a CPU);
    half of the triplets hard, so the loss is not zero."""
    return {
        "run_dir": str(tmp_path / "run"),
        "data": {"train": f"csv:{manifest}", "train_size": 64, "workers": 1, "val_classes": 0},
        "model": {"backbone": "resnet18", "pretrained": False, "trainable": ["backbone.model.layer4", "head"],
                  "init_images": 12, "head": {"num_clusters": 4}},
        "mining": {"miner": miner, "schedule": [{"semi_hard_probability": 0.5, "hard_threshold": 20}],
                   "classes_per_batch": 3, "images_per_class": 2, "classes": 3, "per_class": 4,
                   "refresh_every": 2},
        "train": {"steps": 6, "triplets_per_step": 2, "checkpoint_every": 3, "log_every": 1,
                  "triplet_grid_every": 1, "eval_every": 0, **train_overrides},
        "eval": {"benchmark": f"csv:{manifest}", "image_size": 64, "batch_size": 4, "baselines": ["gem"],
                 "cache_dir": ""},
    }


def write(tmp_path, config) -> str:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def scalars(run_dir, tag) -> list[float]:
    events = EventAccumulator(str(run_dir / "tb"))
    events.Reload()
    return [event.value for event in events.Scalars(tag)]


@pytest.mark.parametrize("miner", ["batch", "algorithm1"])
def test_run_writes_config_checkpoints_tensorboard_and_results(tmp_path, flowers_subset, miner):
    manifest = flowers_subset({"train": [1, 2, 3], "test": [60, 61]})
    config = tiny_config(tmp_path, manifest, miner)
    # the final evaluation's benchmark must not hold training images (training/config.py)
    config["data"]["train"], config["eval"]["benchmark"] = f"csv:{manifest}:train", f"csv:{manifest}:test"
    assert train.main(["--config", write(tmp_path, config)]) == 0
    run = tmp_path / "run"
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["train"]["steps"] == 6 and saved["optim"]["lr"] == 0.0001  # resolved: defaults filled in
    results = json.loads((run / "results.json").read_text())
    assert [r["method"] for r in results["results"]] == ["gem", "msnetvlad (trained)"]
    assert set(results["results"][1]["metrics"]) >= {"mAP", "mAP@R", "R@1"}
    model = load_model(run / "last.pth")  # needs no training flags
    assert model.config()["backbone"] == "resnet18" and model.config()["head"] == {"num_clusters": 4, "whiten": False}
    tags = set(EventAccumulator(str(run / "tb")).Reload().Tags()["scalars"])
    assert {"train/loss", "batch/mean_pos_distance", "batch/mean_neg_distance", "mining/mean_pos_distance",
            "mining/mean_neg_distance"} <= tags
    if miner == "algorithm1":
        assert {"mining/num_case_a", "mining/num_case_b", "mining/num_case_c"} <= tags
    else:  # the schedule's probability 0.5 reaches the in-batch miner: both kinds of triplets are mined
        assert sum(scalars(run, "mining/num_hard_triplets")) > 0
        assert sum(scalars(run, "mining/num_semi_hard_triplets")) > 0
    grid = EventAccumulator(str(run / "tb")).Reload().Images("mining/triplets")[0]
    assert grid.width == 3 * 96 + 4 * 2  # rows of (anchor, positive, negative) 96-px thumbnails


@pytest.mark.parametrize("grad_accum", [1, 2])
@pytest.mark.parametrize("miner, memory", [("batch", 0), ("algorithm1", 0), ("batch", 10)])
def test_killed_run_resumes_to_the_uninterrupted_weights(tmp_path, flowers_subset, monkeypatch, grad_accum,
                                                         miner, memory):
    """memory: the cross-batch memory's embeddings travel in the checkpoint (else steps 4-6 mine less)."""
    manifest = flowers_subset({"train": [1, 2, 3]})
    (tmp_path / "a").mkdir()
    straight = tiny_config(tmp_path / "a", manifest, miner, grad_accum=grad_accum)
    straight["mining"]["memory"] = memory
    assert train.main(["--config", write(tmp_path / "a", straight), "--skip-final-eval"]) == 0
    expected = torch.load(tmp_path / "a" / "run" / "last.pth", weights_only=True)["state_dict"]

    (tmp_path / "b").mkdir()
    crashed = tiny_config(tmp_path / "b", manifest, miner, grad_accum=grad_accum)
    crashed["mining"]["memory"] = memory
    original = Trainer.train_step

    def crash_at_step_five(self):
        if self.step == 4:
            raise KeyboardInterrupt  # stands in for SIGKILL after the step-3 checkpoint
        return original(self)

    monkeypatch.setattr(Trainer, "train_step", crash_at_step_five)
    with pytest.raises(KeyboardInterrupt):
        train.main(["--config", write(tmp_path / "b", crashed), "--skip-final-eval"])
    assert torch.load(tmp_path / "b" / "run" / "last.pth", weights_only=True)["training_state"]["step"] == 3
    monkeypatch.setattr(Trainer, "train_step", original)
    assert train.main(["--resume", str(tmp_path / "b" / "run"), "--skip-final-eval"]) == 0
    resumed = torch.load(tmp_path / "b" / "run" / "last.pth", weights_only=True)
    assert resumed["training_state"]["step"] == 6
    for key, value in expected.items():
        assert torch.equal(resumed["state_dict"][key], value), key
    assert scalars(tmp_path / "b" / "run", "train/loss")[-3:] == scalars(tmp_path / "a" / "run", "train/loss")[-3:]


def test_only_the_trainable_modules_change(tmp_path, flowers_subset):
    config = tiny_config(tmp_path, flowers_subset({"train": [1, 2, 3]}))
    assert train.main(["--config", write(tmp_path, config), "--skip-final-eval"]) == 0
    trained = load_model(tmp_path / "run" / "last.pth").state_dict()
    torch.manual_seed(0)  # train.py seeds (0) before building the model: this is its initial network
    initial = create_model("msnetvlad", backbone="resnet18", num_clusters=4).state_dict()
    frozen = [k for k in initial if k.startswith("backbone.") and not k.startswith("backbone.model.layer4.")]
    assert frozen and all(torch.equal(trained[k], initial[k]) for k in frozen)
    assert not torch.equal(trained["backbone.model.layer4.1.conv2.weight"],
                           initial["backbone.model.layer4.1.conv2.weight"])


def test_no_test_image_is_read_before_the_final_evaluation(tmp_path, flowers_subset, monkeypatch):
    manifest = flowers_subset({"train": [1, 2, 3, 4], "test": [60, 61]}, per_class=4)
    config = tiny_config(tmp_path, manifest, "algorithm1", eval_every=3)
    config["data"].update(train=f"csv:{manifest}:train", val_classes=1)
    config["mining"].update(classes=3)
    config["eval"]["benchmark"] = f"csv:{manifest}:test"
    opened, phase = [], {"final": False}
    real_open = PIL.Image.open
    monkeypatch.setattr(PIL.Image, "open", lambda fp, *a, **k: (opened.append((phase["final"], str(fp))),
                                                                real_open(fp, *a, **k))[1])
    import msretrieval.training.cli as command  # train.py's main lives there

    real_final = command.final_evaluation

    def final_evaluation(*args, **kwargs):
        phase["final"] = True
        return real_final(*args, **kwargs)

    monkeypatch.setattr(command, "final_evaluation", final_evaluation)
    assert train.main(["--config", write(tmp_path, config)]) == 0
    test_files = {row["file"] for row in csv.DictReader(manifest.open()) if row["split"] == "test"}
    before = {path for final, path in opened if not final}
    assert before and not before & test_files  # training and validation read only training images
    assert {path for final, path in opened if final} & test_files  # the spy sees the final evaluation
    assert (tmp_path / "run" / "best.pth").is_file()  # chosen on the held-out training class


def test_a_finished_run_directory_is_never_reused(tmp_path, flowers_subset):
    config = tiny_config(tmp_path, flowers_subset({"train": [1, 2, 3]}), steps=1)
    for _ in range(2):
        assert train.main(["--config", write(tmp_path, config), "--skip-final-eval"]) == 0
    assert (tmp_path / "run" / "last.pth").is_file() and (tmp_path / "run-2" / "last.pth").is_file()
    assert yaml.safe_load((tmp_path / "run-2" / "config.yaml").read_text())["run_dir"] == str(tmp_path / "run-2")


def test_trainable_name_matching_nothing_is_an_error(tmp_path, flowers_subset):
    config = tiny_config(tmp_path, flowers_subset({"train": [1, 2, 3]}))
    config["model"]["trainable"] = ["model.layer4", "head"]  # missing the "backbone." prefix
    with pytest.raises(ValueError, match="'model.layer4' matches no parameter"):
        train.main(["--config", write(tmp_path, config), "--skip-final-eval"])


def test_chunked_forward_gives_the_gradient_of_one_pass(tmp_path, flowers_subset):
    """train.forward_chunk (gradient caching): embeddings without gradient, then chunk by chunk with it. In train
    mode, as in a step: BatchNorm's frozen statistics make a chunk of 2 embed as the whole batch does."""
    from accelerate import Accelerator
    from msretrieval.training.config import resolve_config
    from msretrieval.training.optimization import set_train_mode

    config = resolve_config(write(tmp_path, tiny_config(tmp_path, flowers_subset({"train": [1, 2, 3]}))))
    trainer = Trainer(config, tmp_path / "run", tmp_path, Accelerator(cpu=True))
    trainer.setup(None)
    set_train_mode(trainer.model)  # what train_step does before its forward passes
    batch = trainer.batches.next(0)
    images = trainer.images.load(batch.indices, seeds=list(range(len(batch.indices))))
    labels = torch.as_tensor(trainer.labels[batch.indices])
    mined = []

    def batch_loss(embeddings, descriptors):  # the one pass's triplets, reused by the chunked pass: the same loss
        if not mined:
            mined.append(trainer.miner(embeddings.detach(), labels))
        return trainer.loss(embeddings, labels, mined[0])

    losses, gradients = [], []
    for chunk in (None, 2):
        trainer.config["train"]["forward_chunk"] = chunk
        trainer.optimizer.zero_grad(set_to_none=True)
        loss, _ = trainer.forward_backward(images, len(images), batch_loss, 1.0, True)
        losses.append(float(loss))
        gradients.append({n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None})
    assert losses[0] > 0 and gradients[0].keys() == gradients[1].keys() and len(gradients[0]) > 10
    for name, grad in gradients[0].items():  # equal up to float rounding (conv results depend on batch size)
        assert (gradients[1][name] - grad).norm() <= 1e-4 * grad.norm() + 1e-9, name
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)


def test_fine_tuning_starts_from_the_release_and_keeps_its_network(tmp_path, flowers_subset):
    from msretrieval.release.export import export_release
    from safetensors.torch import load_file

    torch.manual_seed(0)
    released = create_model("msnetvlad", backbone="resnet18", num_clusters=3, out_dim=8, whiten=True).eval()
    with torch.no_grad():
        released.head.initialise([released.feature_map(torch.rand(16, 3, 96, 96))])
    export_release(released, tmp_path / "release", image_size=80, graph=False)
    config = tiny_config(tmp_path, flowers_subset({"train": [1, 2, 3]}), steps=1)
    config["optim"] = {"lr": 0.0, "head_lr": 0.0}  # one step that changes nothing: the start is the release
    assert train.main(["--config", write(tmp_path, config), "--init-from", str(tmp_path / "release"),
                       "--skip-final-eval"]) == 0
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["model"]["init_from"] == str(tmp_path / "release")
    assert (saved["model"]["architecture"], saved["model"]["head"]["num_clusters"], saved["model"]["head"]["out_dim"],
            saved["model"]["head"]["whiten"], saved["eval"]["image_size"]) == ("msnetvlad", 3, 8, True, 80)
    start = load_file(str(tmp_path / "release" / "model.safetensors"))
    after = torch.load(tmp_path / "run" / "last.pth", weights_only=True)["state_dict"]
    assert set(after) == set(start) and all(torch.equal(after[k], start[k]) for k in start)  # no head re-set-up
    config["optim"] = {"lr": 0.001, "head_lr": 0.001}
    config["run_dir"] = str(tmp_path / "run2")
    assert train.main(["--config", write(tmp_path, config), "--init-from", str(tmp_path / "release"),
                       "--skip-final-eval"]) == 0
    trained = torch.load(tmp_path / "run2" / "last.pth", weights_only=True)["state_dict"]
    assert not torch.equal(trained["head.projection.linear.weight"], start["head.projection.linear.weight"])
    pre = load_model(tmp_path / "run2" / "last.pth").preprocessing  # the release's, with its input size
    assert (pre.mean, pre.std, pre.input_size) == (released.preprocessing.mean, released.preprocessing.std, 80)
