"""resized_shape and EvalTransform with hand-computed values."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from msretrieval.data.transforms import RESIZE_MODES, EvalTransform, resized_shape, to_normalized_tensor


@pytest.mark.parametrize("width, height, size, mode, expected", [
    # shorter side -> size: 300 * 224/300 = 224, 400 * 224/300 = 298.67 -> 299
    (400, 300, 224, "shorter", (299, 224)),
    (300, 400, 224, "shorter", (224, 299)),
    (224, 224, 224, "shorter", (224, 224)),
    (100, 50, 200, "shorter", (400, 200)),           # upscaling
    # longer side -> size: 400 * 0.56 = 224, 300 * 0.56 = 168
    (400, 300, 224, "longer", (224, 168)),
    (300, 400, 224, "longer", (168, 224)),
    (1024, 768, 512, "longer", (512, 384)),
    (50, 100, 200, "longer", (100, 200)),            # upscaling
    # none keeps the image (size ignored)
    (400, 300, 224, "none", (400, 300)),
    (123, 45, 7, "none", (123, 45)),
])
def test_resized_shape_regular(width, height, size, mode, expected):
    assert resized_shape(width, height, size, mode) == expected


@pytest.mark.parametrize("width, height, size, mode, kwargs, expected", [
    # shorter: 100x1000 -> scale 2.24 would make 2240 > 4*224 = 896: capped, scale 0.896 -> 89.6 -> 90
    (100, 1000, 224, "shorter", {}, (90, 896)),
    (1000, 100, 224, "shorter", {}, (896, 90)),
    # 1-pixel-wide: cap -> scale 896/50, width 17.92 -> 18 -> min_side 32
    (1, 50, 224, "shorter", {}, (32, 896)),
    (1, 1, 224, "shorter", {}, (224, 224)),
    # longer: 1000x10 -> 224 x 2.24 -> 2 -> min_side 32
    (1000, 10, 224, "longer", {}, (224, 32)),
    (1, 50, 64, "longer", {}, (32, 64)),
    # none: only min_side applies
    (1, 50, 224, "none", {}, (32, 50)),
    (5, 3, 224, "none", {}, (32, 32)),
    # custom caps: max_aspect 2 -> longest 200; 10x100 shorter -> scale 10 capped to 2 -> (20, 200)
    (10, 100, 100, "shorter", {"max_aspect": 2.0, "min_side": 8}, (20, 200)),
    (10, 100, 100, "shorter", {"max_aspect": 2.0, "min_side": 25}, (25, 200)),
    (3, 400, 100, "longer", {"min_side": 1}, (1, 100)),     # 0.75 -> 1
    # the cap never binds for the longer mode with max_aspect >= 1
    (100, 1000, 50, "longer", {"max_aspect": 1.0, "min_side": 1}, (5, 50)),
])
def test_resized_shape_degenerate_caps(width, height, size, mode, kwargs, expected):
    assert resized_shape(width, height, size, mode, **kwargs) == expected


@pytest.mark.parametrize("mode", ["shorter", "longer"])
@pytest.mark.parametrize("width, height", [(1, 1), (1, 50), (50, 1), (1, 10_000), (7, 3000), (640, 480)])
def test_resized_shape_bounds(mode, width, height):
    size = 128
    new_w, new_h = resized_shape(width, height, size, mode)
    assert min(new_w, new_h) >= 32
    assert max(new_w, new_h) <= 4 * size


@pytest.mark.parametrize("mode", ["short", "", "Shorter", None])
def test_invalid_mode(mode):
    with pytest.raises(ValueError, match="resize mode"):
        resized_shape(10, 10, 10, mode)
    with pytest.raises(ValueError, match="resize mode"):
        EvalTransform(size=10, mode=mode)


@pytest.mark.parametrize("size", [0, -3])
def test_invalid_size(size):
    with pytest.raises(ValueError, match="size"):
        EvalTransform(size=size)


def test_modes_constant():
    assert RESIZE_MODES == ("shorter", "longer", "shorter_max", "longer_max", "none")


def test_output_size_and_describe():
    transform = EvalTransform(size=224, mode="longer")
    assert transform.output_size(400, 300) == (224, 168)
    assert transform.describe() == "longer224-bilinear"
    assert EvalTransform(size=300, interpolation="bicubic").describe() == "shorter300-bicubic"


def test_invalid_interpolation():
    with pytest.raises(ValueError, match="interpolation"):
        EvalTransform(size=10, interpolation="cubic")


@pytest.mark.parametrize("interpolation", ["nearest", "bilinear", "bicubic", "lanczos"])
def test_interpolations_keep_shape_and_constant(interpolation):
    image = Image.new("RGB", (40, 32), (100, 150, 200))
    tensor = EvalTransform(size=64, interpolation=interpolation, mean=(0, 0, 0), std=(1, 1, 1))(image)
    assert tuple(tensor.shape) == (3, 64, 80)
    np.testing.assert_allclose(tensor[:, 10, 10].numpy(), np.array([100, 150, 200]) / 255, atol=1.01 / 255)


@pytest.mark.parametrize("size, expected_hw", [(32, (32, 40)), (64, (64, 80))])
def test_normalisation_of_constant_image(size, expected_hw):
    colour = (128, 64, 255)
    image = Image.new("RGB", (40, 32), colour)
    transform = EvalTransform(size=size, mode="shorter")
    tensor = transform(image)
    assert tensor.dtype == torch.float32
    assert tuple(tensor.shape) == (3, *expected_hw)
    mean, std = np.array(transform.mean), np.array(transform.std)
    expected = (np.array(colour) / 255.0 - mean) / std
    # (128/255 - 0.485)/0.229 = 0.0740, (64/255 - 0.456)/0.224 = -0.9152, (1 - 0.406)/0.225 = 2.64
    np.testing.assert_allclose(expected, [0.07404, -0.91527, 2.64], atol=1e-4)
    values = tensor.reshape(3, -1).numpy()
    tolerance = 1e-5 if expected_hw == (32, 40) else 1.01 / 255 / std.min()  # resampling may round by 1
    for channel in range(3):
        np.testing.assert_allclose(values[channel], expected[channel], atol=tolerance)


def test_custom_normalisation():
    image = Image.new("RGB", (8, 8), (255, 0, 51))
    tensor = EvalTransform(size=8, mean=(0.5, 0.5, 0.5), std=(0.5, 0.25, 0.1), min_side=1)(image)
    np.testing.assert_allclose(tensor[:, 0, 0].numpy(), [1.0, -2.0, -3.0], atol=1e-6)


def test_transform_resizes_to_output_size():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8))
    for mode, shape in [("shorter", (3, 224, 299)), ("longer", (3, 168, 224)), ("none", (3, 300, 400))]:
        assert tuple(EvalTransform(size=224, mode=mode)(image).shape) == shape


def test_to_normalized_tensor_equals_torchvision_to_the_bit():
    from torchvision.transforms import functional as TF

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (37, 53, 3), dtype=np.uint8))
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    ours = to_normalized_tensor(image, mean, std)
    assert ours.shape == (3, 37, 53) and ours.dtype == torch.float32
    assert torch.equal(ours, TF.normalize(TF.to_tensor(image), mean, std))
    with pytest.raises(ValueError, match="RGB"):
        to_normalized_tensor(image.convert("L"), mean, std)


def test_normalising_a_stacked_uint8_batch_equals_the_per_image_transform_to_the_bit_and_is_channels_last():
    rng = np.random.default_rng(1)
    images = [Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)) for _ in range(3)]
    transform = EvalTransform(size=32, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    pixels = [transform.pixels(image) for image in images]
    assert pixels[0].dtype == torch.uint8 and pixels[0].shape == (32, 40, 3)
    batch = transform.normalize(torch.stack(pixels))
    assert batch.shape == (3, 3, 32, 40) and batch.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(batch, torch.stack([transform(image) for image in images]))
    with pytest.raises(ValueError, match="uint8"):
        transform.normalize(batch)
