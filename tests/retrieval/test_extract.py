"""retrieval.descriptors.extract: the batches the networks see are the transform's values, whatever the batch size."""
import numpy as np
import torch
from PIL import Image

from msretrieval.data.datasets import ImageDataset
from msretrieval.data.images import load_image
from msretrieval.data.transforms import EvalTransform
from msretrieval.retrieval.descriptors.extract import SizeBucketBatchSampler, extract, output_sizes
from msretrieval.retrieval.evaluation.catalogue import MethodContext, create_method


def test_extraction_encodes_exactly_the_transformed_images_in_channels_last_batches(tmp_path, one_thread):
    rng = np.random.default_rng(0)
    paths = []
    for i, (width, height) in enumerate([(40, 30), (80, 60), (40, 30), (30, 50), (40, 30)]):
        path = tmp_path / f"{i}.jpg"
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    method = create_method("gem", MethodContext(backbone="resnet18", pretrained=False)).eval()
    method.to(memory_format=torch.channels_last)
    dataset = ImageDataset(paths, EvalTransform(32, mean=(0.5, 0.4, 0.3), std=(0.2, 0.3, 0.4)))
    expected = np.empty((len(paths), 512), dtype=np.float32)
    with torch.no_grad():
        for batch in SizeBucketBatchSampler(output_sizes(dataset), 2).batches:
            images = torch.stack([dataset.transform(load_image(paths[i])) for i in batch])
            expected[batch] = method.encode(images.contiguous(memory_format=torch.channels_last)).numpy()
    got = extract(method, dataset, batch_size=2).descriptors
    assert np.array_equal(got, expected)
