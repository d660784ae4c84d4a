"""SCDA on hand-made activation maps, then on real networks (random weights)."""
import numpy as np
import pytest
import torch

from msretrieval.baselines.scda import (SCDA, aggregation_masks, component_boxes, largest_component, scda_layers,
                                        scda_masks, select_and_pool, upsample_mask)
from msretrieval.models.backbones import create_backbone
from msretrieval.retrieval.evaluation.catalogue import MethodContext, create_method


def test_two_blobs_keep_the_larger():
    mask = np.zeros((6, 7), dtype=bool)
    mask[0:2, 0:2] = True          # 4 cells
    mask[3:6, 3:6] = True          # 9 cells
    kept = largest_component(mask)
    assert kept.sum() == 9 and kept[3:6, 3:6].all() and not kept[0:2, 0:2].any()


def test_diagonal_neighbours_are_connected():
    mask = np.eye(4, dtype=bool)   # 4 cells touching only at corners
    mask[0, 3] = True              # a lone cell: none of its 8 neighbours is set
    kept = largest_component(mask)
    assert kept.sum() == 4 and np.array_equal(kept, np.eye(4, dtype=bool))


def test_equal_sizes_pick_the_first_component_in_column_major_order():
    mask = np.zeros((5, 5), dtype=bool)
    mask[0, 3:5] = True            # row-major first, column-major second
    mask[3:5, 0] = True            # column-major first
    kept = largest_component(mask)
    assert kept[3:5, 0].all() and kept.sum() == 2


def test_all_zero_map_falls_back_to_all_positions():
    fmap = torch.zeros(1, 3, 4, 5)
    assert not aggregation_masks(fmap).any()
    last_mask, _ = scda_masks(fmap)
    assert last_mask.all()
    pooled = select_and_pool(fmap, last_mask)
    assert torch.isfinite(pooled).all()


def test_threshold_is_strictly_above_the_mean():
    fmap = torch.tensor([[[[1.0, 1.0], [1.0, 5.0]]]])  # mean 2: only the 5 is selected
    assert aggregation_masks(fmap).tolist() == [[[False, False], [False, True]]]


def test_earlier_mask_is_own_threshold_and_upsampled_component():
    last = torch.zeros(1, 1, 2, 2)
    last[0, 0, 0, 0] = 4.0          # component: top-left cell only
    earlier = torch.zeros(1, 1, 4, 4)
    earlier[0, 0, 0, 1] = 3.0        # inside the upsampled top-left quadrant
    earlier[0, 0, 3, 3] = 3.0        # above its mean but outside the component
    _, early_mask = scda_masks(last, earlier)
    expected = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    expected[0, 0, 0, 1] = True
    assert torch.equal(early_mask, expected)


def test_nearest_upsampling_follows_matlab_imresize_for_odd_sizes():
    # MATLAB imresize(..., 'nearest') maps output x (1-based) to source round(x*n/m + 0.5*(1-n/m)).
    for n, m in [(3, 7), (7, 15), (7, 14), (5, 11)]:
        for source in range(n):
            mask = torch.zeros(1, 1, 1, n, dtype=torch.bool)
            mask[0, 0, 0, source] = True
            matlab = [int(np.floor(x * n / m + 0.5 * (1 - n / m) + 0.5)) for x in range(1, m + 1)]
            expected = [src == source + 1 for src in matlab]
            assert upsample_mask(mask, (1, m))[0, 0, 0].tolist() == expected, (n, m, source)


def test_pooling_uses_selected_descriptors_only():
    fmap = torch.tensor([[[[1.0, 0.0], [0.0, 3.0]], [[2.0, 0.0], [0.0, 0.0]]]])  # C=2
    mask = torch.tensor([[[[True, False], [False, False]]]])
    pooled = select_and_pool(fmap, mask)
    avg = torch.tensor([1.0, 2.0]) / np.sqrt(5)
    assert torch.allclose(pooled[0], torch.cat([avg, avg]))


def test_batched_selection_and_pooling_equal_one_by_one_exactly():
    torch.manual_seed(0)
    last, earlier = torch.rand(5, 8, 6, 7), torch.rand(5, 8, 12, 14)
    lm, em = scda_masks(last, earlier)
    batched = torch.cat([select_and_pool(last, lm), select_and_pool(earlier, em)], 1)
    for i in range(5):
        lmi, emi = scda_masks(last[i:i + 1], earlier[i:i + 1])
        single = torch.cat([select_and_pool(last[i:i + 1], lmi), select_and_pool(earlier[i:i + 1], emi)], 1)
        assert torch.equal(batched[i:i + 1], single)


def test_vgg16_layers_and_4096_dimensions():
    assert scda_layers("vgg16") == ("pool5", "relu5_2")
    method = create_method("scda_flip_plus", MethodContext(backbone="vgg16", pretrained=False)).eval()
    with torch.no_grad():
        out = method.encode(torch.randn(2, 3, 64, 80))
    assert out.shape == (2, 4096)
    assert torch.allclose(out.norm(dim=1), torch.ones(2))


def test_flip_concatenates_scda_plus_of_image_and_mirror():
    backbone = create_backbone("resnet18").eval()
    plus, flip = SCDA(backbone, "scda_plus").eval(), SCDA(backbone, "scda_flip_plus").eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        a, b = plus.describe_images(images), plus.describe_images(images.flip(-1))
        expected = torch.nn.functional.normalize(torch.cat([a, b], 1), dim=1)
        got = flip.encode(images)
    assert torch.allclose(got, expected, atol=1e-6)
    dims = {"scda": 2 * 512, "scda_plus": 2 * 512 + 2 * 256, "scda_flip_plus": 2 * (2 * 512 + 2 * 256)}
    for variant, dim in dims.items():
        with torch.no_grad():
            assert SCDA(backbone, variant).encode(images).shape == (2, dim)


def test_component_boxes_in_image_pixels():
    mask = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    mask[0, 0, 1:3, 2] = True
    np.testing.assert_allclose(component_boxes(mask, [(400, 200)]), [[200, 50, 300, 150]])


def test_unknown_backbone_family_is_a_clear_error():
    with pytest.raises(ValueError, match="no SCDA layer pair"):
        scda_layers("convnext_tiny")
