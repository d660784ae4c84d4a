"""scripts/evaluate.py on a data set with broken and unusual files: handled, or one clear error line (its
`main(argv)` in-process, as the command line runs it)."""
import csv
import io
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import load_script, run_script

REPO = Path(__file__).resolve().parents[2]


def _write_set(folder: Path, extra: dict[str, bytes | None]) -> Path:
    """Eight normal images in two classes plus ``extra`` files (None = listed but missing)."""
    (folder / "img").mkdir(parents=True)
    rows = []
    rng = np.random.default_rng(0)
    for i in range(8):
        name = f"img/ok{i}.jpg"
        Image.fromarray(rng.integers(0, 255, (40, 52, 3), dtype=np.uint8)).save(folder / name)
        rows.append((name, i % 2 + 1))
    for name, payload in extra.items():
        if payload is not None:
            (folder / name).write_bytes(payload)
        rows.append((name, 1))
    with (folder / "labels.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file", "class_id"])
        writer.writerows(rows)
    return folder / "labels.csv"


def _encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def _run(manifest: Path, tmp_path: Path, capsys, *extra_args: str) -> tuple[int, str, str]:
    """scripts/evaluate.py with GeM on a random ResNet-18 at 48 px, in-process: (exit code, stdout, stderr)."""
    return run_script("evaluate", ["--benchmark", f"csv:{manifest}", "--method", "gem", "--backbone", "resnet18",
                                   "--random-init", "--image-size", "48", "--cache-dir", "",
                                   "--out", str(tmp_path / "out.json"), *extra_args], capsys)


def test_unusual_but_valid_images_are_evaluated(tmp_path, capsys, one_thread):
    rng = np.random.default_rng(1)
    rgb = Image.fromarray(rng.integers(0, 255, (30, 30, 3), dtype=np.uint8))
    manifest = _write_set(tmp_path / "set", {
        "img/cmyk.jpg": _encode(rgb.convert("CMYK"), "JPEG"),
        "img/one_pixel_wide.png": _encode(Image.new("RGB", (1, 50), (200, 10, 10)), "PNG"),
        "img/gray.png": _encode(rgb.convert("L"), "PNG"),
    })
    returncode, _, stderr = _run(manifest, tmp_path, capsys, "--batch-size", "4", "--workers", "1")
    assert returncode == 0, stderr
    result = json.loads((tmp_path / "out.json").read_text())
    assert result["results"][0]["method"] == "gem"
    assert np.isfinite(list(result["results"][0]["metrics"].values())).all()


@pytest.mark.parametrize("name,payload,workers,batch", [
    ("img/corrupt.jpg", b"\xff\xd8\xff this is not a jpeg" * 10, "0", "1"),
    ("img/missing.jpg", None, "0", "4"),
    ("img/truncated.jpg", "truncated", "1", "1"),  # fails while decoding, inside a DataLoader worker
])
def test_broken_files_stop_with_one_line_naming_the_file(tmp_path, name, payload, workers, batch, capsys, one_thread):
    if payload == "truncated":
        full = _encode(Image.fromarray(np.random.default_rng(2).integers(0, 255, (64, 64, 3), dtype=np.uint8)), "JPEG")
        payload = full[: len(full) // 2]
    manifest = _write_set(tmp_path / "set", {name: payload})
    returncode, _, stderr = _run(manifest, tmp_path, capsys, "--workers", workers, "--batch-size", batch)
    assert returncode == 2
    assert "Traceback" not in stderr
    error_lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and str(tmp_path / "set" / name) in error_lines[0], stderr
    assert not (tmp_path / "out.json").exists()


@pytest.mark.parametrize("flag, value", [("--image-size", "0"), ("--batch-size", "0"), ("--map-at-k", "-3"),
                                         ("--top-k", "-1"), ("--image-size", "big")])
def test_impossible_numbers_are_refused_before_any_work(flag, value):
    sys.path.insert(0, str(REPO / "scripts"))
    import evaluate

    with pytest.raises(SystemExit) as exit_info:
        evaluate.parse_args(["--benchmark", "flowers102", "--method", "gem", flag, value])
    assert exit_info.value.code == 2


def test_settings_refuse_a_zero_image_size_instead_of_using_the_default():
    from msretrieval.retrieval.evaluation.harness import EvalSettings

    with pytest.raises(ValueError, match="image_size must be at least 1"):
        EvalSettings(image_size=0)
    assert EvalSettings(image_size=None).image_size is None


def test_match_kernel_settings_from_the_command_line_reach_the_results_config(tmp_path, capsys, one_thread):
    """--words, --max-features, --scales, --database-scales, --fit-images, --kernel-gamma and --word-budget end in
    the method's config (hence its cache key), end to end. ResNet-18's stride-32 map of a 64-px image has 2 x 2 cells at scale
    1 and 4 x 4 at scale 2: 20 features per image, 7 fitting images give 140 (the PCA to 128 needs > 128)."""
    rng = np.random.default_rng(3)
    folder = tmp_path / "set"
    (folder / "img").mkdir(parents=True)
    rows = []
    for i in range(16):  # 8 test images (classes 1, 2), 8 train images (classes 3, 4)
        name = f"img/{i}.png"
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(folder / name)
        rows.append((name, i % 2 + 1 + 2 * (i >= 8), "train" if i >= 8 else "test"))
    with (folder / "labels.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file", "class_id", "split"])
        writer.writerows(rows)
    returncode, _, stderr = run_script(
        "evaluate", ["--benchmark", f"csv:{folder / 'labels.csv'}:test", "--method", "asmk", "--backbone", "resnet18",
                     "--random-init", "--image-size", "64", "--cache-dir", "", "--words", "4", "--max-features", "40",
                     "--scales", "1,2", "--fit-images", "7", "--kernel-gamma", "one", "--word-budget", "1.5",
                     "--database-scales", "1,2,4", "--out", str(tmp_path / "out.json")], capsys)
    assert returncode == 0, stderr
    config = json.loads((tmp_path / "out.json").read_text())["results"][0]["config"]
    assert (config["words"], config["fit_images"], config["gamma"], config["word_budget"]) == (4, 7, "one", 1.5)
    features = config["local_features"]
    assert (features["max_features"], features["scales"], features["max_features_per"]) == (40, [1.0, 2.0], "scale")
    assert config["database_scales"] == [1.0, 2.0, 4.0]
    # settings only in a method's config (fitted state never keys a cache); the fit set (8 train images, of
    # which the kernel fits on --fit-images 7) is recorded beside them
    assert "fitted_on" not in config and config["fit_set"]["images"] == 8


@pytest.mark.parametrize("flag, value", [("--scales", "1,-2"), ("--scales", "1,1"), ("--scales", "1;2"),
                                         ("--database-scales", "0,1"),
                                         ("--words", "0"), ("--max-features", "0"), ("--fit-images", "0"),
                                         ("--kernel-gamma", "half"), ("--region-size", "-1"),
                                         ("--region-size", "natural")])
def test_impossible_kernel_settings_are_refused_before_any_work(flag, value, capsys):
    sys.path.insert(0, str(REPO / "scripts"))
    import evaluate

    with pytest.raises(SystemExit) as exit_info:
        evaluate.parse_args(["--benchmark", "flowers102", "--method", "asmk", flag, value])
    assert exit_info.value.code == 2
    assert flag in capsys.readouterr().err


def test_region_size_and_scales_parse():
    sys.path.insert(0, str(REPO / "scripts"))
    import evaluate

    args = evaluate.parse_args(["--benchmark", "flowers102", "--method", "r_asmk", "--region-size", "native",
                                "--scales", "1,0.707,1.414", "--database-scales", "1,2"])
    assert args.region_size == "native" and args.scales == (1.0, 0.707, 1.414) and args.database_scales == (1.0, 2.0)
    defaults = evaluate.parse_args(["--benchmark", "flowers102", "--method", "r_asmk"])
    assert (defaults.region_size, defaults.scales, defaults.words, defaults.kernel_gamma) == \
        (224, None, None, "default")


def test_a_full_disk_while_extracting_is_one_line_and_the_same_command_resumes(tmp_path, monkeypatch, capsys):
    import errno
    import re

    from msretrieval.utils import files
    from msretrieval.utils.cli import run_cli

    evaluate = load_script("evaluate")
    manifest = _write_set(tmp_path / "set", {})
    cache = tmp_path / "cache"
    argv = ["--benchmark", f"csv:{manifest}", "--method", "gem", "--backbone", "resnet18", "--random-init",
            "--image-size", "48", "--cache-dir", str(cache), "--workers", "0", "--out", str(tmp_path / "out.json")]
    fsync = files.os.fsync

    def full_in_the_cache(descriptor):
        if os.readlink(f"/proc/self/fd/{descriptor}").startswith(str(cache)):
            raise OSError(errno.ENOSPC, "No space left on device")
        fsync(descriptor)

    monkeypatch.setattr(files.os, "fsync", full_in_the_cache)
    assert run_cli(lambda: evaluate.main(argv)) == 2
    error = capsys.readouterr().err
    command = "python scripts/evaluate.py " + " ".join(argv)  # no argument needs quoting here
    assert re.fullmatch(rf"error: disk full while extracting and evaluating \(writing {re.escape(str(cache))}/\S+: "
                        rf"No space left on device\); the finished shards in {re.escape(str(cache))} are kept: free "
                        rf"space, then resume with the same command: {re.escape(command)}\n", error), error
    monkeypatch.setattr(files.os, "fsync", fsync)
    assert evaluate.main(argv) == 0
    assert json.loads((tmp_path / "out.json").read_text())["results"][0]["method"] == "gem"
