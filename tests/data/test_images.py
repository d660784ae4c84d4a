"""load_image / image_size / ImageDataset on generated awkward files (never real data)."""
from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from msretrieval.data.datasets import ImageDataset, crop_to_box
from msretrieval.data.images import ImageLoadError, image_size, load_image
from msretrieval.data.transforms import EvalTransform

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def _noise_jpeg(path, size=(96, 64), seed=0):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path, quality=90)
    return path


def _close(pixel, colour, tol=40):
    return np.abs(np.asarray(pixel, dtype=int) - np.asarray(colour, dtype=int)).max() <= tol


def _oriented_jpeg(path, orientation, size=(60, 40)):
    """Blue image, red 16x16 block in the stored top-left corner, EXIF orientation tag set."""
    array = np.zeros((size[1], size[0], 3), np.uint8)
    array[:] = BLUE
    array[:16, :16] = RED
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(array).save(path, quality=95, exif=exif)
    return path


# --- unreadable files -------------------------------------------------------------------------------------

def _corrupt(tmp_path):
    path = tmp_path / "corrupt.jpg"
    path.write_bytes(np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    return path


def _truncated(tmp_path):
    full = _noise_jpeg(tmp_path / "full.jpg", size=(128, 128))
    data = full.read_bytes()
    path = tmp_path / "truncated.jpg"
    path.write_bytes(data[: len(data) // 2])
    return path


def _missing(tmp_path):
    return tmp_path / "no_such_dir" / "missing.jpg"


def _directory(tmp_path):
    path = tmp_path / "a_directory.jpg"
    path.mkdir()
    return path


@pytest.mark.parametrize("make", [_corrupt, _truncated, _missing, _directory])
def test_unreadable_file_raises_naming_the_file(tmp_path, make):
    path = make(tmp_path)
    with pytest.raises(ImageLoadError) as info:
        load_image(path)
    assert str(path) in str(info.value)
    assert info.value.path == str(path)


@pytest.mark.parametrize("make", [_corrupt, _truncated, _missing])
def test_unreadable_file_raises_through_dataset(tmp_path, make):
    path = make(tmp_path)
    dataset = ImageDataset([path], transform=EvalTransform(size=32))
    with pytest.raises(ImageLoadError, match="cannot load image") as info:
        dataset[0]
    assert str(path) in str(info.value)


@pytest.mark.parametrize("make", [_corrupt, _missing])
def test_image_size_of_unreadable_file_raises(tmp_path, make):
    path = make(tmp_path)
    with pytest.raises(ImageLoadError) as info:
        image_size(path)
    assert str(path) in str(info.value)


def test_error_survives_dataloader_worker_reraise(tmp_path):
    """DataLoader workers re-raise with ``exc_type(message)`` (torch's ExceptionWrapper): the one-argument form
    must give back an ImageLoadError that still names the file. Exercised in-process: a real worker pool adds
    a flaky 5 s shutdown and tests nothing more."""
    exception_wrapper = pytest.importorskip("torch._utils").ExceptionWrapper
    bad = _corrupt(tmp_path)
    dataset = ImageDataset([_noise_jpeg(tmp_path / "good.jpg"), bad], transform=EvalTransform(size=32))
    dataset[0]
    try:
        dataset[1]
    except ImageLoadError:
        wrapper = exception_wrapper(where="in DataLoader worker process 0")
    with pytest.raises(ImageLoadError) as info:
        wrapper.reraise()
    assert str(bad) in str(info.value)


def test_error_pickles(tmp_path):
    bad = _corrupt(tmp_path)
    with pytest.raises(ImageLoadError) as info:
        load_image(bad)
    copy = pickle.loads(pickle.dumps(info.value))
    assert type(copy) is ImageLoadError and str(copy) == str(info.value)
    assert copy.path == str(bad) and copy.reason == info.value.reason


# --- readable odd files -----------------------------------------------------------------------------------

def test_rgb_jpeg(tmp_path):
    path = _noise_jpeg(tmp_path / "rgb.jpg", size=(70, 30))
    image = load_image(path)
    assert image.mode == "RGB" and image.size == (70, 30)
    assert image_size(path) == (70, 30)


def test_cmyk_jpeg(tmp_path):
    path = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (30, 20), (0, 255, 255, 0)).save(path, quality=95)  # pure red in CMYK
    assert Image.open(path).mode == "CMYK"
    image = load_image(path)
    assert image.mode == "RGB" and image.size == (30, 20)
    assert _close(image.getpixel((15, 10)), RED)


def test_one_pixel_wide_png(tmp_path):
    path = tmp_path / "strip.png"
    column = np.linspace(0, 255, 50).astype(np.uint8)
    Image.fromarray(np.stack([column] * 3, axis=-1)[:, None, :]).save(path)
    image = load_image(path)
    assert image.mode == "RGB" and image.size == (1, 50)
    np.testing.assert_array_equal(np.asarray(image)[:, 0, 1], column)


def test_grayscale_png(tmp_path):
    path = tmp_path / "gray.png"
    values = np.arange(20 * 30, dtype=np.int64).reshape(20, 30) % 256
    Image.fromarray(values.astype(np.uint8), mode="L").save(path)
    image = load_image(path)
    assert image.mode == "RGB" and image.size == (30, 20)
    array = np.asarray(image)
    for channel in range(3):
        np.testing.assert_array_equal(array[..., channel], values)


def test_palette_png_with_transparency_composited_on_white(tmp_path):
    path = tmp_path / "palette.png"
    indices = np.zeros((10, 12), np.uint8)
    indices[:, 6:] = 1
    palette_image = Image.fromarray(indices, mode="P")
    palette_image.putpalette([0, 0, 0, 255, 0, 0] + [0] * (256 * 3 - 6))
    palette_image.save(path, transparency=0)  # index 0 (black) is transparent
    reopened = Image.open(path)
    assert reopened.mode == "P" and "transparency" in reopened.info
    image = load_image(path)
    assert image.mode == "RGB" and image.size == (12, 10)
    assert image.getpixel((0, 0)) == (255, 255, 255)  # transparent -> white, not black
    assert image.getpixel((11, 9)) == RED


def test_rgba_png_composited_on_white(tmp_path):
    path = tmp_path / "rgba.png"
    array = np.zeros((10, 30, 4), np.uint8)
    array[:, :10] = (0, 255, 0, 255)     # opaque green
    array[:, 10:20] = (255, 0, 0, 0)     # fully transparent red
    array[:, 20:] = (0, 0, 255, 128)     # half-transparent blue
    Image.fromarray(array, mode="RGBA").save(path)
    image = load_image(path)
    assert image.mode == "RGB" and image.size == (30, 10)
    assert image.getpixel((5, 5)) == GREEN
    assert image.getpixel((15, 5)) == (255, 255, 255)
    r, g, b = image.getpixel((25, 5))
    assert b == 255 and abs(r - 127) <= 1 and abs(g - 127) <= 1


def test_sixteen_bit_grayscale_png(tmp_path):
    path = tmp_path / "gray16.png"
    values = (np.arange(40 * 50).reshape(40, 50) * 30).astype(np.uint16)  # up to 59970, far above 255
    Image.fromarray(values).save(path)
    assert Image.open(path).mode.startswith("I")
    image = load_image(path)
    assert image.mode == "RGB" and image.size == (50, 40)
    array = np.asarray(image).astype(int)
    assert (array[..., 0] == array[..., 1]).all() and (array[..., 1] == array[..., 2]).all()
    # Scaled to the 8-bit range, not clipped to white: brightest pixel 255, the gradient survives.
    assert array.max() == 255 and array[0, 0, 0] == 0
    assert abs(array[20, 25, 0] - float(values[20, 25]) * 255 / float(values.max())) <= 1
    assert np.all(np.diff(array[..., 0].reshape(-1)) >= 0)


@pytest.mark.parametrize("orientation, corner", [
    (1, "top_left"), (3, "bottom_right"), (6, "top_right"), (8, "bottom_left"),
])
def test_exif_orientation_is_applied(tmp_path, orientation, corner):
    path = _oriented_jpeg(tmp_path / f"orient{orientation}.jpg", orientation)
    expected = (40, 60) if orientation in (6, 8) else (60, 40)
    image = load_image(path)
    assert image.mode == "RGB" and image.size == expected
    assert image_size(path) == expected
    w, h = image.size
    corners = {"top_left": (4, 4), "top_right": (w - 5, 4), "bottom_left": (4, h - 5),
               "bottom_right": (w - 5, h - 5)}
    for name, xy in corners.items():
        assert _close(image.getpixel(xy), RED if name == corner else BLUE), (name, image.getpixel(xy))


def test_exif_orientation_6_rotates_clockwise_exactly(tmp_path):
    """Orientation 6 = rotate the stored pixels 90 degrees clockwise for display."""
    path = tmp_path / "orient6.jpg"
    stored = _oriented_jpeg(path, 6)
    raw = np.asarray(Image.open(stored).convert("RGB"))  # PIL.open alone does not rotate
    assert raw.shape[:2] == (40, 60)
    shown = np.asarray(load_image(path))
    assert shown.shape[:2] == (60, 40)
    np.testing.assert_array_equal(shown, np.rot90(raw, k=-1))


# --- through the dataset ----------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["shorter", "longer"])
def test_one_pixel_wide_image_through_dataset(tmp_path, mode):
    path = tmp_path / "strip.png"
    Image.fromarray(np.full((50, 1, 3), 200, np.uint8)).save(path)
    transform = EvalTransform(size=64, mode=mode)
    tensor, index = ImageDataset([path], transform=transform)[0]
    assert index == 0
    assert tensor.dtype == torch.float32 and tensor.shape[0] == 3
    assert torch.isfinite(tensor).all()
    height, width = tensor.shape[1:]
    assert min(height, width) >= transform.min_side
    assert max(height, width) <= transform.max_aspect * transform.size
    assert height > width


def test_dataset_applies_exif_orientation(tmp_path):
    path = _oriented_jpeg(tmp_path / "o6.jpg", 6)
    image, _ = ImageDataset([path])[0]
    assert image.size == (40, 60)
    tensor, _ = ImageDataset([path], transform=EvalTransform(size=40, mode="shorter"))[0]
    assert tuple(tensor.shape) == (3, 60, 40)


def test_dataset_boxes_crop_and_validate(tmp_path):
    path = _oriented_jpeg(tmp_path / "plain.jpg", 1)
    with pytest.raises(ValueError):
        ImageDataset([path, path], boxes=[(0, 0, 1, 1)])
    dataset = ImageDataset([path, path], boxes=[(0, 0, 16, 16), None])
    assert dataset[0][0].size == (16, 16) and dataset[1][0].size == (60, 40)
    assert _close(dataset[0][0].getpixel((8, 8)), RED)
    # A box reaching outside the image is clipped.
    assert crop_to_box(load_image(path), (-5, -5, 100, 20)).size == (60, 20)
    # An empty box is an error naming the file.
    with pytest.raises(ImageLoadError) as info:
        ImageDataset([path], boxes=[(70, 0, 80, 10)])[0]
    assert str(path) in str(info.value)


def decompression_bomb_png(path, side=40000):
    """A valid PNG header claiming side x side pixels (PIL refuses it as a decompression bomb on open)."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 4))
                     + chunk(b"IEND", b""))
    return path


def test_a_decompression_bomb_is_one_error_naming_the_file_when_sizing_and_loading(tmp_path):
    bomb = decompression_bomb_png(tmp_path / "bomb.png")
    with pytest.raises(Image.DecompressionBombError):
        Image.open(bomb)                     # the file really is what PIL refuses
    for read in (image_size, load_image):
        with pytest.raises(ImageLoadError, match="bomb.png.*DecompressionBombError"):
            read(bomb)
    # batched extraction sizes every image from its header first: the bomb must not end in a traceback there
    from msretrieval.retrieval.descriptors.extract import output_sizes
    dataset = ImageDataset([bomb], EvalTransform(64, "shorter"))
    with pytest.raises(ImageLoadError, match="bomb.png"):
        output_sizes(dataset)


@pytest.mark.parametrize("mode", ["shorter", "longer", "none"])
@pytest.mark.parametrize("box", [(70, 0, 80, 10), (10, 10, 10, 30), (10.4, 0, 10.6, 40)])
def test_an_empty_query_box_is_the_box_error_in_every_resize_mode_and_in_batched_sizing(tmp_path, mode, box):
    from msretrieval.retrieval.descriptors.extract import output_sizes

    path = _oriented_jpeg(tmp_path / "plain.jpg", 1)     # 60 x 40
    dataset = ImageDataset([path], transform=EvalTransform(size=32, mode=mode), boxes=[box])
    for read in (lambda: dataset[0], lambda: output_sizes(dataset)):
        with pytest.raises(ImageLoadError, match=r"plain.jpg.*box .* is empty inside the 60x40 image"):
            read()
