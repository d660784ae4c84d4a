"""MSBD methods end to end through the harness interface, on generated images and random weights."""
from pathlib import Path

import numpy as np
import pytest
import torch

from msretrieval.baselines.msbd.fen import FEN
from msretrieval.baselines.msbd.finetune import finetune_fen
from msretrieval.baselines.msbd.settings import MSBDSettings
from msretrieval.data.datasets import ImageDataset
from msretrieval.data.manifest import read_csv_manifest
from msretrieval.data.transforms import EvalTransform
from msretrieval.models.backbones import create_backbone
from msretrieval.retrieval.descriptors.extract import extract
from msretrieval.retrieval.evaluation.catalogue import MethodContext, create_method
from msretrieval.utils.config import load_yaml

from tests.conftest import TINY_MSBD

REPO = Path(__file__).resolve().parents[2]



@pytest.fixture
def toy(make_labelled_set, tmp_path, monkeypatch):
    config = tmp_path / "msbd_tiny.yaml"
    config.write_text(TINY_MSBD)
    monkeypatch.setenv("MSBD_CONFIG", str(config))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convolutions: threads only add overhead
    yield read_csv_manifest(make_labelled_set(num_classes=4, per_class=9, size=(40, 32)))
    torch.set_num_threads(threads)


def _dataset(method, images):
    pre = method.preprocessing
    return ImageDataset(images.paths, EvalTransform(size=32, mean=pre.mean, std=pre.std))


def test_all_variants_build_fit_encode_and_score(toy):
    context = MethodContext(backbone="tf_efficientnet_lite0", pretrained=False)
    names = ["msbd_float", "msbd@32", "msbd_h@32", "msbd_s@32", "itq@32"]
    methods = [create_method(name, context) for name in names]
    assert len({id(m.pipeline) for m in methods}) == 1  # one shared pipeline: fitted and extracted once
    for method in methods:
        assert method.needs_fit()
        method.fit(_dataset(method, toy), toy.labels)
    for method in methods:
        descriptors = extract(method, _dataset(method, toy), batch_size=4).descriptors
        assert len(descriptors) == 36
        scores = method.scores(descriptors[:5], descriptors).rows(0, 5).numpy()
        assert scores.shape == (5, 36) and np.isfinite(scores).all()
        # every method ranks the query itself first (ties allowed: two images may share a code)
        assert (scores[np.arange(5), np.arange(5)] == scores.max(1)).all()
        # and its search returns exactly that ranking's top 3, whatever its descriptor rows hold
        top_scores, top_indices = method.search(descriptors[:5], descriptors, 3)
        np.testing.assert_array_equal(top_scores, -np.sort(-scores, axis=1)[:, :3])
        np.testing.assert_array_equal(np.take_along_axis(scores, top_indices, axis=1), top_scores)
        if method.name == "msbd_float":
            assert descriptors.shape[1] == 36
            np.testing.assert_allclose(np.linalg.norm(descriptors, axis=1), 1.0, rtol=1e-5)
        elif method.name in ("msbd_h@32", "itq@32"):
            assert descriptors.dtype == np.uint8 and descriptors.shape[1] == 4
            assert method.descriptor_bytes(descriptors) == 4 and method.descriptor_kind == "binary"
        else:  # codes + 4 class probabilities
            assert descriptors.shape[1] == 4 + 4
            assert method.descriptor_bytes(descriptors) == 4 + 4 * 4
            codes, probs = method.split(descriptors)
            np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-5)
            if method.name == "msbd@32":
                assert np.unpackbits(codes, axis=1).sum(1).max() <= round(0.3 * 32)
    # msbd and msbd_h share the learned codes; only the ranking differs
    codes = [extract(m, _dataset(m, toy)).descriptors for m in methods[1:3]]
    assert np.array_equal(methods[1].split(codes[0])[0], codes[1])


def test_finetuning_changes_the_fen(toy):
    backbone = create_backbone("tf_efficientnet_lite0", pretrained=False)
    fen = FEN(backbone)
    before = [p.detach().clone() for p in fen.parameters()]
    pre = backbone.preprocessing
    dataset = ImageDataset(toy.paths[:8], EvalTransform(size=32, mean=pre.mean, std=pre.std))
    finetune_fen(fen, dataset, toy.labels[:8], steps=2, lr=0.01, batch_size=4)
    assert any(not torch.equal(a, b) for a, b in zip(before, fen.parameters()))
    assert not fen.training


def test_methods_need_fitting_first(toy):
    method = create_method("msbd_h@32", MethodContext(backbone="tf_efficientnet_lite0", pretrained=False))
    with pytest.raises(RuntimeError, match="not fitted"):
        method.encode(_dataset(method, toy)[0][0][None])


def test_paper_config_loads():
    settings = MSBDSettings.from_dict(load_yaml(REPO / "configs" / "msbd_paper.yaml"))
    assert settings.patches == 50 and settings.patch_size == 340 and settings.trials == 1000


def test_fine_tuning_msbd_in_a_together_run_leaves_the_shared_backbone_alone():
    from msretrieval.baselines.msbd.methods import shared_pipeline
    from msretrieval.baselines.msbd.settings import MSBDSettings
    from msretrieval.retrieval.evaluation.catalogue import MethodContext, create_method

    context = MethodContext(backbone="resnet18", pretrained=False, share_backbone=True)
    gem = create_method("gem", context)
    assert shared_pipeline(context, MSBDSettings(finetune_steps=0)).backbone is gem.backbone
    tuned = shared_pipeline(context, MSBDSettings(finetune_steps=5)).backbone
    assert tuned is not gem.backbone
    assert all(torch.equal(a, b) for a, b in zip(tuned.state_dict().values(), gem.backbone.state_dict().values()))


def test_a_csv_benchmark_offers_its_train_rows_for_fitting_and_says_how_when_there_are_none(tmp_path):
    from msretrieval.retrieval.evaluation.benchmarks import create_benchmark

    rows = ["file,class_id,split"] + [f"{s}{i}.jpg,{i % 2},{s}" for s in ("train", "test") for i in range(4)]
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    bench = create_benchmark(f"csv:{tmp_path / 'labels.csv'}:test", tmp_path)
    assert [p.name for p in bench.train_set().paths] == [f"train{i}.jpg" for i in range(4)]
    assert create_benchmark(f"csv:{tmp_path / 'labels.csv'}:train", tmp_path).train_set() is None
    assert create_benchmark(f"csv:{tmp_path / 'labels.csv'}", tmp_path).train_set() is None
