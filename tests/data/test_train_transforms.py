"""TrainTransform (crop, flip, jitter, normalisation, seeding) and TrainDataset."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from msretrieval.data.images import ImageLoadError
from msretrieval.data.manifest import read_csv_manifest
from msretrieval.data.samplers import ClassBalancedBatchSampler
from msretrieval.data.train_transforms import TrainDataset, TrainTransform, random_resized_crop_box

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def noise_image(width=64, height=48, seed=0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def expected_tensor(image: Image.Image) -> torch.Tensor:
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)
    return (pixels - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]


@pytest.mark.parametrize("width, height", [(64, 48), (30, 90), (300, 200)])
def test_output_is_a_square_normalised_tensor(width, height):
    torch.manual_seed(0)
    out = TrainTransform(32)(noise_image(width, height))
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32


def test_constant_image_is_normalised_per_channel():
    colour = (200, 100, 50)
    out = TrainTransform(24, color_jitter=0.0)(Image.new("RGB", (50, 40), colour))
    expected = (torch.tensor(colour) / 255 - torch.tensor(MEAN)) / torch.tensor(STD)
    torch.testing.assert_close(out.mean(dim=(1, 2)), expected.float(), atol=1e-4, rtol=0)
    assert out.std(dim=(1, 2)).max() < 1e-4


def test_full_crop_without_flip_is_plain_normalisation():
    image = noise_image(32, 32)
    transform = TrainTransform(32, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_probability=0.0)
    torch.testing.assert_close(transform(image), expected_tensor(image))


def test_flip_probability_one_mirrors_the_image():
    image = noise_image(32, 32)
    transform = TrainTransform(32, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_probability=1.0)
    torch.testing.assert_close(transform(image), expected_tensor(image).flip(-1))


def test_seeded_by_torch_rng():
    image = noise_image(80, 60)
    transform = TrainTransform(32, color_jitter=0.2)
    torch.manual_seed(5)
    first = transform(image)
    torch.manual_seed(5)
    assert torch.equal(transform(image), first)
    torch.manual_seed(6)
    assert not torch.equal(transform(image), first)
    assert not torch.equal(transform(image), transform(image)), "successive calls draw new crops"


def test_explicit_generator_makes_the_call_independent_of_the_global_rng():
    image = noise_image(80, 60)
    transform = TrainTransform(32, color_jitter=0.3)
    first = transform(image, torch.Generator().manual_seed(11))
    torch.manual_seed(123)
    torch.rand(7)
    assert torch.equal(transform(image, torch.Generator().manual_seed(11)), first)
    assert not torch.equal(transform(image, torch.Generator().manual_seed(12)), first)


def test_crop_boxes_respect_scale_ratio_and_bounds():
    generator = torch.Generator().manual_seed(0)
    for _ in range(200):
        top, left, h, w = random_resized_crop_box(120, 80, (0.5, 1.0), (3 / 4, 4 / 3), generator)
        assert 0 <= top and top + h <= 80 and 0 <= left and left + w <= 120
        assert 0.5 - 0.03 <= h * w / (120 * 80) <= 1.0 + 1e-9
        assert 3 / 4 - 0.05 <= w / h <= 4 / 3 + 0.05
    # A strip cannot hold such a crop: the fallback is the central crop with the closest allowed ratio.
    assert random_resized_crop_box(1000, 10, (0.9, 1.0), (3 / 4, 4 / 3), generator) == (0, 493, 10, 13)


def test_invalid_parameters():
    for kwargs in ({"size": 0}, {"size": 8, "scale": (0.0, 1.0)}, {"size": 8, "scale": (0.9, 0.5)},
                   {"size": 8, "flip_probability": 1.5}, {"size": 8, "color_jitter": -0.1},
                   {"size": 8, "ratio": (2.0, 1.0)}):
        with pytest.raises(ValueError):
            TrainTransform(**kwargs)
    assert TrainTransform(16).describe() == "rrc16-scale0.5-1-flip0.5"


def test_train_dataset_items_and_loader(make_labelled_set):
    images = read_csv_manifest(make_labelled_set(num_classes=3, per_class=4))
    dataset = TrainDataset(images, TrainTransform(16))
    tensor, label, index = dataset[5]
    assert tensor.shape == (3, 16, 16) and label == images.labels[5] and index == 5
    assert len(dataset) == 12
    sampler = ClassBalancedBatchSampler(images.labels, classes_per_batch=2, images_per_class=3, seed=1)
    torch.manual_seed(0)
    tensors, labels, indices = next(iter(DataLoader(dataset, batch_sampler=sampler)))
    assert tensors.shape == (6, 3, 16, 16)
    assert labels.tolist() == images.labels[indices.numpy()].tolist()


def test_train_dataset_names_a_bad_file(make_labelled_set):
    images = read_csv_manifest(make_labelled_set(num_classes=2, per_class=2))
    images.paths[1].write_bytes(b"not a jpeg")
    dataset = TrainDataset(images, TrainTransform(16))
    with pytest.raises(ImageLoadError, match=images.paths[1].name):
        dataset[1]
    image, label, index = TrainDataset(images)[0]
    assert isinstance(image, Image.Image) and (label, index) == (images.labels[0], 0)
