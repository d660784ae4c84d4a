import numpy as np
import pytest
import torch
import torch.nn.functional as F

from msretrieval.models.netvlad import NetVLAD, multiscale_columns, single_scale_columns
from msretrieval.models.retrieval_net import create_model, load_model, save_model


def test_multiscale_columns_are_stride1_max_pools_of_both_windows():
    fmap = torch.arange(2 * 4 * 5, dtype=torch.float32).reshape(1, 2, 4, 5)
    cols = multiscale_columns(fmap)
    assert cols.shape == (1, 3 * 4 + 2 * 3, 2)
    # First column: max over the top-left 2x2 window; first 3x3 column follows the 12 2x2 columns.
    assert torch.equal(cols[0, 0], fmap[0, :, :2, :2].amax((-2, -1)))
    assert torch.equal(cols[0, 12], fmap[0, :, :3, :3].amax((-2, -1)))
    assert single_scale_columns(fmap).shape == (1, 20, 2)


def test_tiny_maps_fall_back_to_global_max():
    fmap = torch.rand(2, 3, 1, 2)
    cols = multiscale_columns(fmap)
    assert cols.shape == (2, 1 + 1, 3)
    assert torch.equal(cols[:, 0], fmap.amax((-2, -1)))


def test_netvlad_matches_a_direct_computation():
    torch.manual_seed(0)
    vlad = NetVLAD(dim=4, num_clusters=3)
    x = torch.randn(2, 6, 4)
    out = vlad(x)
    xn = F.normalize(x, dim=2)
    expected = []
    for b in range(2):
        a = F.softmax(xn[b] @ vlad.assign.weight.T, dim=1)  # (N, K)
        v = torch.stack([(a[:, k:k + 1] * (xn[b] - vlad.centroids[k])).sum(0) for k in range(3)])
        expected.append(F.normalize(F.normalize(v, dim=1).flatten(), dim=0))
    assert torch.allclose(out, torch.stack(expected), atol=1e-6)
    assert torch.allclose(out.norm(dim=1), torch.ones(2))


def test_kmeans_initialisation_sets_centroids_and_alpha():
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((4, 8)) * 5
    data = np.concatenate([c + rng.standard_normal((50, 8)) * 0.1 for c in centres]).astype(np.float32)
    vlad = NetVLAD(dim=8, num_clusters=4)
    vlad.init_from_descriptors(data)
    assert bool(vlad.initialized)
    found = F.normalize(vlad.centroids, dim=1)
    truth = F.normalize(torch.from_numpy(centres).float(), dim=1)
    assert (found @ truth.T).max(dim=1).values.min() > 0.99  # every true centre recovered
    # alpha makes assignments nearly hard on the training data
    soft = F.softmax(F.normalize(torch.from_numpy(data), dim=1) @ vlad.assign.weight.T, dim=1)
    assert soft.max(dim=1).values.mean() > 0.9


def test_model_checkpoint_describes_itself(tmp_path):
    torch.manual_seed(0)
    model = create_model("msnetvlad", backbone="resnet18", num_clusters=4, out_dim=16).eval()
    images = torch.randn(2, 3, 64, 80)
    with torch.no_grad():
        expected = model(images)
    save_model(model, tmp_path / "m.pth")
    loaded = load_model(tmp_path / "m.pth")
    assert loaded.config()["head"] == {"num_clusters": 4, "out_dim": 16}
    with torch.no_grad():
        assert torch.allclose(loaded(images), expected, atol=1e-6)
    assert expected.shape == (2, 16)


def test_msnetvlad_aggregates_max_pooled_raw_activations_without_reduction():
    """The paper's pipeline on the backbone's own map: 2x2 and 3x3 stride-1 max-pools of the raw post-ReLU
    activations -> NetVLAD (columns of the full channel count) -> intra-normalisation -> L2."""
    torch.manual_seed(0)
    model = create_model("msnetvlad", backbone="resnet18", num_clusters=3).eval()
    images = torch.randn(1, 3, 160, 192)
    with torch.no_grad():
        fmap = model.backbone.forward_features(images)  # (1, 512, 5, 6), after ReLU
        out = model(images)
    assert fmap.min() >= 0 and out.shape == (1, 3 * 512)
    columns = []
    for k in (2, 3):
        for y in range(fmap.shape[2] - k + 1):
            for x in range(fmap.shape[3] - k + 1):
                columns.append(fmap[0, :, y:y + k, x:x + k].amax(dim=(1, 2)))
    columns = F.normalize(torch.stack(columns), dim=1)  # (4*5 + 3*4, 512)
    assert len(columns) == 32
    vlad = model.head.vlad
    a = F.softmax(columns @ vlad.assign.weight.T, dim=1)
    v = torch.stack([(a[:, k:k + 1] * (columns - vlad.centroids[k])).sum(0) for k in range(3)])
    expected = F.normalize(F.normalize(v, dim=1).flatten(), dim=0)
    assert torch.allclose(out[0], expected, atol=1e-5)
    assert not any(isinstance(m, torch.nn.Conv2d) for m in model.head.modules())  # no reduction before pooling


def test_head_initialisation_clusters_columns_then_fits_the_projection_pca():
    torch.manual_seed(0)
    model = create_model("msnetvlad", backbone="resnet18", num_clusters=4, out_dim=8, whiten=True).eval()
    with torch.no_grad():
        fmaps = [model.backbone.forward_features(torch.randn(8, 3, 128, 128)) for _ in range(3)]
        model.head.initialise(fmaps)
        assert bool(model.head.vlad.initialized)
        aggregated = torch.cat([model.head.aggregate(f) for f in fmaps])
        projected = model.head.projection.linear(aggregated).double()
    # PCA-whitening of the 24 training descriptors: centred, unit variance, uncorrelated
    assert torch.allclose(projected.mean(0), torch.zeros(8, dtype=torch.float64), atol=1e-4)
    assert torch.allclose(torch.cov(projected.T), torch.eye(8, dtype=torch.float64), atol=1e-3)
    too_few = create_model("gem", backbone="resnet18", out_dim=16).eval()
    with torch.no_grad(), pytest.raises(ValueError, match="at least 32 training descriptors"):
        too_few.head.initialise([too_few.backbone.forward_features(torch.randn(8, 3, 64, 64))])


def test_head_options_of_other_architectures_are_ignored_and_unknown_ones_rejected():
    assert create_model("gem", backbone="resnet18", num_clusters=8).config()["head"] == {}
    assert create_model("netvlad", backbone="resnet18", num_clusters=2, p=4.0).config()["head"] == {"num_clusters": 2}
    with pytest.raises(ValueError, match="unknown head option"):
        create_model("gem", backbone="resnet18", local_dim=8)


def test_aggregation_runs_in_float32_under_bf16_autocast():
    """Under autocast NetVLAD aggregates in float32, as the head's comment said (issue 24: the matmuls ran in
    bf16 again once autocast saw them): the same feature map gives bit-identical descriptors with and without
    CPU bf16 autocast."""
    from msretrieval.models.retrieval_net import NetVLADHead

    torch.manual_seed(0)
    net_head = NetVLADHead(16, num_clusters=4)
    fmap = torch.randn(2, 16, 7, 9)
    plain = net_head.aggregate(fmap)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = net_head.aggregate(fmap.bfloat16())
    assert mixed.dtype == torch.float32
    assert torch.equal(mixed, net_head.aggregate(fmap.bfloat16().float()))
    assert not torch.equal(plain, net_head.aggregate(fmap.bfloat16().float()))  # bf16 input rounding alone
