"""Unreadable training images (a truncated JPEG, a text file named .jpg, a missing file) are skipped, counted and
replaced by readable images of the same class; too many stop the run with one line naming them. Evaluation
stays strict."""
from __future__ import annotations

import json
import logging

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import train
from msretrieval.data.images import ImageLoadError, load_image
from msretrieval.data.manifest import read_csv_manifest
from tests.training.synthetic import tiny_config, write_config, write_set
from msretrieval.training.data import BadTrainingData, ImageBatches
from msretrieval.utils.cli import run_cli

BROKEN = {"c0_1.jpg": "truncated", "c1_2.jpg": "not_an_image", "c2_0.jpg": "missing"}


@pytest.fixture
def broken_set(tmp_path):
    return write_set(tmp_path / "data", broken=BROKEN)


def loader(manifest, **kwargs) -> ImageBatches:
    return ImageBatches(read_csv_manifest(manifest), 32, (0.5,) * 3, (0.5,) * 3, torch.device("cpu"), workers=2,
                        **kwargs)


def test_unreadable_images_are_replaced_by_readable_ones_of_their_class(broken_set, caplog, one_thread):
    manifest, damaged = broken_set
    images = loader(manifest)
    labels, paths = images.images.labels, [str(p) for p in images.images.paths]
    bad = {paths.index(str(p)) for p in damaged}
    # class 0: c0_0, c0_1 (truncated); class 1: c1_1, c1_2 (text); class 2: c2_0 (missing), c2_1
    batch = [0, 1, 5, 6, 8, 9]
    seeds = [11, 12, 13, 14, 15, 16]
    with caplog.at_level(logging.WARNING, logger="msretrieval.training.data"):
        first = images.load(batch, seeds)
        stand_ins = list(images.last_indices)
        again = images.load(batch, seeds)  # known-unreadable files are not read (nor logged) again
    assert first.shape == (6, 3, 32, 32) and torch.equal(first, again)
    assert set(images.bad) == bad and len(images.bad) == len(BROKEN)  # the count is the number injected
    assert images.bad_paths() == [paths[i] for i in sorted(bad)]
    assert all(str(p) in " ".join(r.getMessage() for r in caplog.records) for p in damaged)
    assert len(caplog.records) == len(BROKEN)  # once per file
    for position, (original, used) in enumerate(zip(batch, stand_ins)):
        assert labels[used] == labels[original]  # same class: the P x K labels hold
        if original in bad:
            assert used not in batch and used not in bad  # another member of the class, not a batch-mate
        else:
            assert used == original
    # the stand-in is a function of the seed and of which files are readable, not of when they were found
    informed = loader(manifest)
    for index in bad:
        informed.mark_bad(index, "known", found_here=False)
    assert torch.equal(informed.load(batch, seeds), first) and informed.last_indices == stand_ins
    assert informed.new_bad == []


def test_a_class_whose_files_are_all_unreadable_stops_the_run(tmp_path, one_thread):
    manifest, _ = write_set(tmp_path / "data", broken={f"c1_{i}.jpg": "truncated" for i in range(4)})
    images = loader(manifest)
    with pytest.raises(BadTrainingData, match=r"training class 2 has no readable image left: all 4 of its files "
                                              r"are unreadable \(.*c1_0.jpg, .*c1_1.jpg, .*c1_2.jpg, \.\.\.\)"):
        images.load([4, 5, 0])
    assert len(images.bad) == 4


def test_training_skips_them_counts_them_and_reports_them(tmp_path, broken_set, caplog, one_thread):
    manifest, damaged = broken_set
    # the final evaluation reads a clean set (evaluation is strict), other images than the training ones (a copy
    # of them would be refused: training/config.py)
    clean, _ = write_set(tmp_path / "clean", seed=1)
    config = tiny_config(tmp_path / "run", manifest, steps=3)
    config["data"]["max_bad_fraction"] = 0.25  # 3 of 12 images: allowed
    config["mining"]["images_per_class"] = 4  # every batch holds every image: all three are met at step 1
    config["eval"]["benchmark"] = f"csv:{clean}"
    with caplog.at_level(logging.WARNING):
        assert train.main(["--config", write_config(tmp_path / "c.yaml", config)]) == 0
    run = tmp_path / "run"
    events = EventAccumulator(str(run / "tb")).Reload()
    counts = [event.value for event in events.Scalars("data/bad_images")]
    assert counts[-1] == len(BROKEN) == len(damaged)  # the count equals the number injected
    assert sorted(line.split("\t")[0] for line in (run / "bad_images.txt").read_text().splitlines()) == \
        sorted(map(str, damaged))
    training = json.loads((run / "results.json").read_text())["training"]
    assert training["bad_images"] == len(BROKEN) and sorted(training["bad_image_paths"]) == sorted(map(str, damaged))
    skipped = [r.getMessage() for r in caplog.records if r.getMessage().startswith("unreadable training image")]
    assert sorted(skipped) == sorted(set(skipped)) and len(skipped) == len(BROKEN)  # logged once per file
    assert any("3 unreadable training image(s) were skipped" in r.getMessage() for r in caplog.records)
    state = torch.load(run / "last.pth", weights_only=True)["training_state"]
    assert state["step"] == 3 and len(state["reliability"]["bad_images"]) == len(BROKEN)


def test_too_many_unreadable_images_stop_the_run_in_one_line(tmp_path, broken_set, capsys, one_thread):
    manifest, damaged = broken_set
    config = tiny_config(tmp_path / "run", manifest, steps=3)
    config["data"]["max_bad_fraction"] = 0.1  # 1 of 12 allowed
    config["mining"]["images_per_class"] = 4
    path = write_config(tmp_path / "c.yaml", config)
    with pytest.raises(BadTrainingData) as stopped:
        train.main(["--config", path, "--skip-final-eval"])
    message = str(stopped.value)
    assert message.startswith("3 of the 12 training images are unreadable, more than data.max_bad_fraction = 0.1 "
                              "allows (1): ")
    assert all(str(p) in message for p in damaged) and "\n" not in message
    assert message.endswith("no checkpoint was written")  # stopped in the first step
    config["run_dir"] = str(tmp_path / "run-cli")
    assert run_cli(lambda: train.main(["--config", write_config(tmp_path / "c.yaml", config),
                                       "--skip-final-eval"])) == 2
    assert capsys.readouterr().err.strip().startswith("error: 3 of the 12 training images are unreadable")


def test_evaluation_still_refuses_an_unreadable_image(broken_set):
    _, damaged = broken_set
    for path in damaged:
        with pytest.raises(ImageLoadError, match=f"cannot load image {path}"):
            load_image(path)


def test_the_scan_counts_files_no_batch_draws_and_stops_before_step_one(tmp_path, one_thread):
    """Five images per class, batches of 3 x 2 for one step: most files are never drawn, yet all damaged ones
    are counted (data.scan_images); with too many, the run stops before its first step."""
    broken = {"c0_4.jpg": "truncated", "c1_3.jpg": "not_an_image", "c2_4.jpg": "missing"}
    manifest, damaged = write_set(tmp_path / "data", per_class=5, broken=broken)
    config = tiny_config(tmp_path / "run", manifest, steps=1)
    config["data"]["max_bad_fraction"] = 0.25
    config["model"]["init_images"] = 2
    assert train.main(["--config", write_config(tmp_path / "c.yaml", config), "--skip-final-eval"]) == 0
    state = torch.load(tmp_path / "run" / "last.pth", weights_only=True)["training_state"]
    assert sorted(path for _, path, _ in state["reliability"]["bad_images"]) == sorted(map(str, damaged))
    config["run_dir"], config["data"]["max_bad_fraction"] = str(tmp_path / "run2"), 0.1
    with pytest.raises(BadTrainingData, match="^3 of the 15 training images are unreadable.*no checkpoint"):
        train.main(["--config", write_config(tmp_path / "c2.yaml", config), "--skip-final-eval"])
    config["run_dir"], config["data"]["scan_images"] = str(tmp_path / "run3"), False  # found only when drawn
    config["data"]["max_bad_fraction"] = 0.25
    assert train.main(["--config", write_config(tmp_path / "c3.yaml", config), "--skip-final-eval"]) == 0
    state = torch.load(tmp_path / "run3" / "last.pth", weights_only=True)["training_state"]
    assert len(state["reliability"]["bad_images"]) < 3
