"""MSBD feature side: VLAD soft assignment by hand, proposals, saliency and FEN on generated inputs."""
import numpy as np
import pytest
import torch

from msretrieval.baselines.msbd.fen import FEN, fen_taps
from msretrieval.models.pca import PCA
from msretrieval.baselines.msbd.proposals import create_proposer, multi_scale_boxes
from msretrieval.baselines.msbd.saliency import create_saliency
from msretrieval.baselines.msbd.settings import MSBDSettings
from msretrieval.baselines.msbd.vlad import Codebook, soft_assignment, soft_vlad
from msretrieval.models.backbones import create_backbone
from msretrieval.utils.config import ConfigError


def _image(height=90, width=120):
    """A bright disc on a dark textured background: something for detectors to find."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 60, (height, width, 3)).astype(np.uint8)
    yy, xx = np.mgrid[:height, :width]
    image[(yy - 45) ** 2 + (xx - 70) ** 2 < 20 ** 2] = (230, 200, 40)
    return image


def test_soft_assignment_by_hand():
    centroids = torch.tensor([[0.0, 0.0], [1.0, 0.0], [5.0, 0.0]])
    x = torch.tensor([[0.25, 0.0]])
    w = soft_assignment(x, centroids, nearest=2, sigma2=0.5)
    # squared distances 0.0625 and 0.5625 to the two nearest words; exp(-d / (2 * 0.5)) normalised
    e0, e1 = np.exp(-0.0625), np.exp(-0.5625)
    np.testing.assert_allclose(w.numpy(), [[e0 / (e0 + e1), e1 / (e0 + e1), 0.0]], rtol=1e-6)


def test_soft_vlad_by_hand():
    centroids = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    x = torch.tensor([[0.5, 0.0], [0.0, 2.0], [3.0, 3.0]])
    owners = torch.tensor([0, 0, 1])
    vlad = soft_vlad(x, owners, 3, centroids, nearest=1, sigma2=1.0)  # nearest=1: hard assignment
    # image 0: (0.5, 0) -> word 0 (tie with word 1 broken to the first), residual (0.5, 0) -> (1, 0);
    #          (0, 2) -> word 2, residual (0, 1) -> (0, 1); two unit blocks, then the global L2
    s = 1 / np.sqrt(2)
    np.testing.assert_allclose(vlad[0].numpy(), [s, 0, 0, 0, 0, s], atol=1e-6)
    # image 1: (3, 3) -> word 1 or 2 (equal distance, the first): residual (2, 3) normalised
    np.testing.assert_allclose(vlad[1].numpy(), [0, 0, 2 / np.sqrt(13), 3 / np.sqrt(13), 0, 0], atol=1e-6)
    assert not vlad[2].any()  # no patches: zero vector, never NaN


def test_codebook_fit_and_intra_normalised_blocks():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 4)).astype(np.float32)
    book = Codebook.fit(x, words=5)
    assert book.centroids.shape == (5, 4) and book.sigma2 > 0
    vlad = soft_vlad(torch.from_numpy(x), torch.zeros(200, dtype=torch.long), 1, book.centroids, 3, book.sigma2)
    blocks = vlad.reshape(5, 4).norm(dim=1)
    np.testing.assert_allclose(blocks.numpy(), np.full(5, 1 / np.sqrt(5)), rtol=1e-5)


@pytest.mark.parametrize("name", ["selective_search", "grid"])
def test_proposals_give_boxes_inside_the_image(name):
    image = _image()
    proposer = create_proposer(name)
    boxes = multi_scale_boxes(image, proposer, side=64, scales=(1.25, 1.0, 0.75), count=5)
    assert boxes.ndim == 2 and boxes.shape[1] == 4 and 1 <= len(boxes) <= 5
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all()
    assert (boxes[:, 2] <= 120).all() and (boxes[:, 3] <= 90).all()
    assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()


def test_proposals_unknown_name_and_missing_edge_model():
    with pytest.raises(ValueError, match="available"):
        create_proposer("nope")
    with pytest.raises(ValueError, match="model"):
        create_proposer("edge_boxes")


@pytest.mark.parametrize("name", ["spectral_residual", "fine_grained"])
def test_saliency_maps_match_the_image(name):
    saliency = create_saliency(name)(_image())
    assert saliency.shape == (90, 120) and saliency.dtype == np.float32
    assert saliency.min() >= 0 and saliency.max() <= 1


def test_fen_concatenates_three_normalised_layers():
    backbone = create_backbone("resnet18", pretrained=False).eval()
    fen = FEN(backbone)
    assert fen.taps == fen_taps("resnet18") and fen.dim == 128 + 256 + 512
    with torch.no_grad():
        out = fen(torch.randn(2, 3, 64, 80))
    assert out.shape == (2, fen.dim)
    np.testing.assert_allclose(out.norm(dim=1).numpy(), 1.0, rtol=1e-5)
    assert fen_taps("vgg16") == ("conv5_1", "conv5_3", "pool5")
    assert fen_taps("tf_efficientnet_lite0") == ("blocks5_expand", "blocks6", "features")


def test_pca_caps_dims_by_the_data():
    pca = PCA.fit(torch.randn(10, 30), dims=16)
    assert pca.basis.shape == (30, 9)
    np.testing.assert_allclose(pca(torch.randn(3, 30)).norm(dim=1).numpy(), 1.0, rtol=1e-5)


def test_settings_from_yaml(tmp_path, monkeypatch):
    path = tmp_path / "msbd.yaml"
    path.write_text("patches: 3\nscales: [1.0]\n")
    monkeypatch.setenv("MSBD_CONFIG", str(path))
    settings = MSBDSettings.from_env()
    assert settings.patches == 3 and settings.scales == (1.0,)
    path.write_text("pathces: 3\n")
    with pytest.raises(ConfigError, match="pathces"):
        MSBDSettings.from_env()


def test_a_missing_opencv_saliency_module_breaks_only_the_salient_branch(monkeypatch):
    import subprocess
    import sys
    from pathlib import Path

    import cv2

    from msretrieval.baselines.msbd.saliency import SaliencyUnavailable, create_saliency

    monkeypatch.delattr(cv2, "saliency")
    with pytest.raises(SaliencyUnavailable, match="opencv-contrib-python-headless"):
        create_saliency("spectral_residual")
    # a fresh process without cv2.saliency still imports every method (gem, msbd's registry) and lists them
    repo = Path(__file__).resolve().parents[2]
    code = ("import cv2, sys; del cv2.saliency; sys.path.insert(0, '.');"
            "from msretrieval.retrieval.evaluation.catalogue import available_methods; names = available_methods();"
            "assert 'gem' in names and 'msbd' in names, names")
    result = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
