"""Hashing networks: codes scaled to unit length, PCA-hash start, self-describing checkpoints, the harness
method (packed codes, Hamming ranking), ITQ on a float network, and hashing releases."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from msretrieval.models.retrieval_net import create_model, load_model, save_model
from msretrieval.retrieval.search.binary import HammingScores, hamming_distances, pack_bits
from msretrieval.retrieval.descriptors.trained import (PROJECTED_SPEC, ITQTrainedMethod, PCATrainedMethod,
                                                       TrainedModelMethod)


def hashing_net(bits=16, seed=0):
    torch.manual_seed(seed)
    model = create_model("gem", backbone="resnet18", hash_bits=bits).eval()
    with torch.no_grad():
        model.head.initialise([model.feature_map(torch.rand(60, 3, 64, 64))])
    return model


def test_eval_output_is_the_sign_code_over_sqrt_bits_and_training_output_is_relaxed():
    model = hashing_net(16)
    images = torch.rand(5, 3, 64, 64)
    with torch.no_grad():
        codes = model.eval()(images)
        bits = model.codes(images)
        model.head.train()  # the hashing layer only: BatchNorm would change the features in train mode
        relaxed = model(images)
    assert model.out_dim == 16 and model.hash_bits == 16 and model.config()["head"]["hash_bits"] == 16
    assert set(codes.unique().tolist()) <= {-0.25, 0.25}  # 1 / sqrt(16)
    assert torch.equal(codes > 0, bits)
    assert torch.allclose(codes.norm(dim=1), torch.ones(5))
    assert relaxed.abs().max() <= 0.25 and torch.equal(relaxed >= 0, bits)  # tanh keeps the signs
    assert len(relaxed.unique()) > 2  # relaxed, not binary


def test_hash_layer_starts_as_itq_of_the_descriptors():
    """ITQ (Gong & Lazebnik): the projection spans the top principal axes of the training descriptors, and the
    rotation makes the codes fit the projected data better than the plain PCA signs do (||B - V R||^2)."""
    from msretrieval.models.hashing import HashHead

    torch.manual_seed(0)
    x = torch.randn(200, 12, dtype=torch.float64) @ torch.randn(12, 12, dtype=torch.float64)
    head = HashHead(12, 8)
    head.init_itq(x)
    w = head.linear.weight.detach().double()
    centred = (x - x.mean(0)).numpy()
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    top = vt[:8]
    residual = w.numpy() - (w.numpy() @ top.T) @ top  # rows of W inside span(top 8 axes)
    assert np.abs(residual).max() < 1e-5 * np.abs(w.numpy()).max()
    pre = (x.float() @ head.linear.weight.T + head.linear.bias).detach()
    assert abs(float(pre.std(0).mean()) - 1.0) < 1e-3  # unit mean variance before tanh
    v = centred @ top.T
    scale = np.linalg.norm(w.numpy(), axis=1).mean()
    rotated = (centred @ w.numpy().T) / scale  # V R (R orthogonal, up to the global scale)

    def quantisation_loss(p):
        return float(((np.where(p >= 0, 1.0, -1.0)) - p).__pow__(2).sum())

    assert quantisation_loss(rotated) < quantisation_loss(v)
    codes = head.codes(x.float()).numpy()
    assert np.array_equal(codes, pre.numpy() >= 0)


def test_checkpoint_rebuilds_the_hashing_network(tmp_path):
    model = hashing_net(24)
    save_model(model, tmp_path / "m.pth")
    loaded = load_model(tmp_path / "m.pth")
    images = torch.rand(3, 3, 64, 64)
    assert loaded.hash_bits == 24 and torch.equal(loaded.codes(images), model.codes(images))


def test_float_network_gains_a_hash_head():
    torch.manual_seed(0)
    model = create_model("gem", backbone="resnet18").eval()
    model.add_hash_head(16)
    assert model.hash_bits == 16 and model.out_dim == 16 and model.config()["head"]["hash_bits"] == 16
    with pytest.raises(ValueError, match="already hashes"):
        model.add_hash_head(8)
    with pytest.raises(ValueError, match="multiple of 8"):
        create_model("gem", backbone="resnet18", hash_bits=12)


def test_harness_method_stores_packed_codes_and_ranks_by_hamming():
    model = hashing_net(16)
    method = TrainedModelMethod(model, "hash")
    images = torch.rand(6, 3, 64, 64)
    codes = method.encode(images).numpy()
    assert codes.dtype == np.uint8 and codes.shape == (6, 2) and method.descriptor_bytes(codes) == 2
    assert np.array_equal(codes, pack_bits(model.codes(images).numpy()))
    scores = method.scores(codes, codes)
    assert isinstance(scores, HammingScores)
    assert np.array_equal(-scores.rows(0, 6).numpy(), hamming_distances(codes, codes))


def float_net_and_images(tmp_path, count=40):
    from msretrieval.data.datasets import ImageDataset
    from msretrieval.data.transforms import EvalTransform

    torch.manual_seed(0)
    model = create_model("gem", backbone="resnet18", out_dim=32).eval()
    model.head.initialise([model.feature_map(torch.rand(70, 3, 64, 64))])
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        path = tmp_path / f"{i}.png"
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    pre = model.preprocessing
    return model, ImageDataset(paths, EvalTransform(64, "shorter", pre.mean, pre.std))


def test_itq_on_a_float_network_gives_codes_of_the_requested_length(tmp_path):
    model, images = float_net_and_images(tmp_path)
    method = ITQTrainedMethod(model, "itq@16:test", None, bits=16)
    assert method.needs_fit()
    with pytest.raises(RuntimeError, match="not fitted"):
        method.encode(torch.rand(1, 3, 64, 64))
    method.fit(images)
    queries = torch.rand(4, 3, 64, 64)
    codes = method.encode(queries).numpy()
    assert codes.dtype == np.uint8 and codes.shape == (4, 2)
    # the seed alone decides the codes, whatever the global generator did before
    again, other = ITQTrainedMethod(model, "x", None, bits=16), ITQTrainedMethod(model, "y", None, bits=16, seed=1)
    torch.manual_seed(123)
    again.fit(images)
    other.fit(images)
    assert np.array_equal(again.encode(queries).numpy(), codes)
    assert not np.array_equal(other.itq.projection, again.itq.projection)
    with pytest.raises(ValueError, match="multiple of 8"):
        ITQTrainedMethod(model, "itq@12:test", None, bits=12)
    with pytest.raises(ValueError, match="already hashes"):
        ITQTrainedMethod(hashing_net(16), "itq@16:test", None, bits=16)


def test_pca_method_is_the_principal_projection_of_the_training_descriptors(tmp_path):
    model, images = float_net_and_images(tmp_path)
    method = PCATrainedMethod(model, "pca@8:test", None, dims=8)
    assert method.needs_fit() and method.descriptor_kind == "float32"
    method.fit(images)
    with torch.no_grad():
        train = torch.cat([model(images[i][0][None]) for i in range(len(images))]).double().numpy()
        queries = torch.rand(3, 3, 64, 64)
        query_descriptors = model(queries).double().numpy()
    # reference: numpy SVD of the centred (already L2-normalised) training descriptors
    train = train / np.linalg.norm(train, axis=1, keepdims=True)
    mean = train.mean(0)
    _, _, vt = np.linalg.svd(train - mean, full_matrices=False)
    reference = (query_descriptors / np.linalg.norm(query_descriptors, axis=1, keepdims=True) - mean) @ vt[:8].T
    reference /= np.linalg.norm(reference, axis=1, keepdims=True)
    got = method.encode(queries).double().numpy()
    # principal directions are defined up to sign: compare |cos| per dimension
    assert got.shape == (3, 8)
    np.testing.assert_allclose(np.abs(got), np.abs(reference), atol=2e-3)
    signs = np.sign(got[0] * reference[0])
    np.testing.assert_allclose(got * signs, reference, atol=2e-3)
    with pytest.raises(ValueError, match="1 to 32"):
        PCATrainedMethod(model, "pca@64:test", None, dims=64)


@pytest.mark.parametrize("spec, parts", [
    ("itq@64:run:runs/a", ("itq", "64", None, "run:runs/a")),
    ("itq@64s3:model:w.pth", ("itq", "64", "3", "model:w.pth")),
    ("pca@128:run:/x/y", ("pca", "128", None, "run:/x/y")),
    ("itq@64:runs/a", None), ("lsh@64:run:a", None), ("itq@s3:run:a", None)])
def test_projected_method_specs(spec, parts):
    match = PROJECTED_SPEC.fullmatch(spec)
    assert (match.group("kind", "dims", "seed", "target") if match else None) == parts


def test_hashing_release_encodes_packed_codes(tmp_path):
    from msretrieval.release import load_release
    from msretrieval.release.export import export_release

    model = hashing_net(16)
    export_release(model, tmp_path / "rel", image_size=64, graph=False)
    retriever = load_release(tmp_path / "rel")
    assert retriever.binary and retriever.config["descriptor"] == {
        "dim": 2, "dtype": "uint8", "bits": 16, "binary": True, "similarity": "hamming"}
    images = torch.rand(3, 3, 64, 64)
    codes = retriever.encode(images)
    normalised = torch.stack([(img - torch.tensor(model.preprocessing.mean)[:, None, None])
                              / torch.tensor(model.preprocessing.std)[:, None, None] for img in images])
    assert codes.dtype == np.uint8 and codes.shape == (3, 2)
    assert np.array_equal(codes, pack_bits(model.codes(normalised).numpy()))
    assert "16-bit binary codes packed in 2 bytes" in (tmp_path / "rel" / "README.md").read_text()


def test_folder_index_of_a_hashing_release_is_a_binary_faiss_index(tmp_path):
    from msretrieval.release import load_release
    from msretrieval.release.export import export_release
    from msretrieval.release.image_index import ImageIndex

    export_release(hashing_net(16), tmp_path / "rel", image_size=64, graph=False)
    retriever = load_release(tmp_path / "rel")
    rng = np.random.default_rng(1)
    (tmp_path / "photos").mkdir()
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (64, 80, 3), dtype=np.uint8)).save(tmp_path / "photos" / f"{i}.png")
    index, update = ImageIndex.update(tmp_path / "idx", tmp_path / "photos", retriever, tmp_path / "rel")
    assert update.added == 6 and index.descriptors.dtype == np.uint8 and index.meta["binary"]
    reopened = ImageIndex.open(tmp_path / "idx")
    scores, rows = reopened.search(reopened.descriptors, 6)
    expected = -hamming_distances(index.descriptors, index.descriptors)
    for q in range(6):
        assert np.array_equal(scores[q], np.sort(expected[q])[::-1])  # exact Hamming ranking
        assert scores[q][0] == 0


def test_projected_methods_of_one_checkpoint_share_the_model_and_its_training_descriptors(tmp_path, monkeypatch):
    import msretrieval.retrieval.descriptors.extract

    model, images = float_net_and_images(tmp_path, count=20)
    save_model(model, tmp_path / "float.pth")
    shared = {}
    itq = TrainedModelMethod.from_spec(f"itq@16:model:{tmp_path / 'float.pth'}", shared=shared)
    pca = TrainedModelMethod.from_spec(f"pca@8:model:{tmp_path / 'float.pth'}", shared=shared)
    other = TrainedModelMethod.from_spec(f"pca@8:model:{tmp_path / 'float.pth'}")
    assert isinstance(itq, ITQTrainedMethod) and isinstance(pca, PCATrainedMethod)
    assert itq.model is pca.model and other.model is not pca.model
    calls = []
    real_extract = msretrieval.retrieval.descriptors.extract.extract
    monkeypatch.setattr(msretrieval.retrieval.descriptors.extract, "extract",
                        lambda *a, **k: calls.append(1) or real_extract(*a, **k))
    itq.fit(images)
    pca.fit(images)
    assert len(calls) == 1
    other.fit(images)
    assert len(calls) == 2
    np.testing.assert_allclose(other.encode(torch.rand(2, 3, 64, 64)).shape, (2, 8))


def test_projected_methods_extracted_together_run_the_shared_backbone_once_per_batch(tmp_path):
    from msretrieval.data.datasets import ImageDataset
    from msretrieval.data.transforms import EvalTransform
    from msretrieval.retrieval.descriptors.extract import extract_together

    model, images = float_net_and_images(tmp_path, count=12)
    save_model(model, tmp_path / "float.pth")
    shared = {}
    methods = [TrainedModelMethod.from_spec(f"{kind}:model:{tmp_path / 'float.pth'}", shared=shared)
               for kind in ("pca@8", "itq@8", "pca@4")]
    for method in methods:
        method.fit(images)
    alone = [extract_together([m], images, batch_size=4)[0].descriptors for m in methods]
    calls = []
    backbone = methods[0].model.backbone
    first_conv = next(m for m in backbone.model.modules() if isinstance(m, torch.nn.Conv2d))
    handle = first_conv.register_forward_hook(lambda *args: calls.append(1))
    joint = extract_together(methods, images, batch_size=4)
    handle.remove()
    assert len(calls) == 3                       # 12 images, batches of 4: one backbone pass each
    for a, b in zip(alone, joint):
        np.testing.assert_array_equal(a, b.descriptors)
