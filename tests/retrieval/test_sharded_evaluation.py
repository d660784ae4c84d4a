"""The harness's descriptors on disk: shard by shard (the same rows as in memory), resumable after a crash,
keyed so that data sets never mix, looked up before fitting, and shared out over `accelerate launch` processes."""
from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from msretrieval.data.datasets import ImageDataset
from msretrieval.data.manifest import read_csv_manifest
from msretrieval.data.transforms import EvalTransform
from msretrieval.retrieval.evaluation.benchmarks import LabelledBenchmark, create_benchmark
from msretrieval.retrieval.descriptors.extract import extract_shards, extract_together
from msretrieval.retrieval.evaluation.harness import EvalSettings, _cache_keys, evaluate_methods
from msretrieval.retrieval.descriptors.methods import RetrievalMethod
from msretrieval.retrieval.evaluation.catalogue import MethodContext, create_method
from msretrieval.retrieval.search.shards import ShardedArray, ShardWriter
from tests.conftest import REPO, run_script, write_labelled_set


def _drop_rows(manifest, keep: int):
    """Keep the first ``keep`` rows of a manifest (image counts that divide by nothing)."""
    with manifest.open() as handle:
        rows = list(csv.DictReader(handle))
    with manifest.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows[:keep])
    return manifest


def _gem():
    torch.manual_seed(0)
    return create_method("gem", MethodContext(backbone="resnet18", pretrained=False))


def _count_encodes(method: RetrievalMethod) -> list[int]:
    """Batch sizes of every encode call from now on."""
    calls, encode = [], method.encode
    method.encode = lambda images: (calls.append(len(images)), encode(images))[1]
    return calls


def test_sharded_extraction_gives_the_in_memory_rows_whoever_extracts_each_shard(tmp_path, one_thread):
    manifest = _drop_rows(write_labelled_set(tmp_path, num_classes=3, per_class=4), keep=11)
    dataset = ImageDataset(read_csv_manifest(manifest).paths, EvalTransform(32, "shorter"))
    method = _gem()
    # one image size: batches of 3 are the same in memory and in shards of 6 (6 + 5 rows): the same bits
    expected = extract_together([method], dataset, batch_size=3, role="database")[0].descriptors
    writer = ShardWriter(tmp_path / "uniform", count=11, shard_rows=6)
    assert extract_shards([method], dataset, [writer], range(2), batch_size=3, role="database") == 11
    np.testing.assert_array_equal(ShardedArray(tmp_path / "uniform").to_array(), expected)
    # two sizes: size buckets are formed within each shard; a shard's rows do not depend on who extracts it
    from PIL import Image
    Image.open(dataset.paths[0]).resize((40, 64)).save(dataset.paths[0])
    expected = extract_together([method], dataset, batch_size=3, role="database")[0].descriptors
    alone = ShardWriter(tmp_path / "alone", count=11, shard_rows=4)  # shards of 4, 4, 3 rows
    extract_shards([method], dataset, [alone], range(3), batch_size=3, role="database")
    shared = ShardWriter(tmp_path / "shared", count=11, shard_rows=4)
    for rank in (1, 0):  # two "processes", shard s by process s % 2
        extract_shards([method], dataset, [shared], range(rank, 3, 2), batch_size=3, role="database")
    np.testing.assert_array_equal(ShardedArray(tmp_path / "shared").to_array(),
                                  ShardedArray(tmp_path / "alone").to_array())
    # other batch-mates than in memory: equal up to float rounding (BLAS kernels depend on the batch)
    np.testing.assert_allclose(ShardedArray(tmp_path / "alone").to_array(), expected, rtol=1e-5, atol=1e-6)


class _FlakyBenchmark(LabelledBenchmark):
    """Image ``broken`` of the database fails to load while ``failing`` is set (a crash mid-extraction)."""

    broken: int = 9
    failing: bool = True

    def database_dataset(self, transform):
        benchmark = self

        class Flaky(ImageDataset):
            def load(self, index):
                if benchmark.failing and index == benchmark.broken:
                    raise RuntimeError("killed")
                return super().load(index)

        return Flaky(self.database_paths(), transform)


def test_an_interrupted_extraction_resumes_after_its_last_finished_shard(tmp_path, one_thread):
    manifest = _drop_rows(write_labelled_set(tmp_path, num_classes=3, per_class=4), keep=11)
    images = read_csv_manifest(manifest)
    settings = EvalSettings(image_size=32, batch_size=2, shard_rows=4, cache_dir=str(tmp_path / "cache"))
    flaky = _FlakyBenchmark(name="toy", images=images)
    method = _gem()
    calls = _count_encodes(method)
    with pytest.raises(RuntimeError, match="killed"):
        evaluate_methods([method], flaky, settings)
    shards = list((tmp_path / "cache").rglob("shard-*.npy"))
    assert len(shards) == 2 and not list((tmp_path / "cache").rglob("gem-*.npy"))  # rows 0-7 were kept
    calls.clear()
    flaky.failing = False
    resumed = evaluate_methods([method], flaky, settings)[0]
    assert sum(calls) == 3  # only the last shard (rows 8-10) was encoded again
    assert np.isfinite(resumed.images_per_second)
    whole = evaluate_methods([_gem()], LabelledBenchmark(name="toy", images=images),
                             EvalSettings(image_size=32, batch_size=2, shard_rows=4,
                                          cache_dir=str(tmp_path / "fresh")))[0]
    assert resumed.metrics == whole.metrics
    np.testing.assert_array_equal(np.load(next((tmp_path / "cache").rglob("gem-*.npy"))),
                                  np.load(next((tmp_path / "fresh").rglob("gem-*.npy"))))
    assert not list((tmp_path / "cache").rglob("*.shards"))  # the finished array replaced its shards


def _keys(spec: str, root=None) -> dict[str, str]:
    benchmark = create_benchmark(spec, root or "unused")
    return _cache_keys([create_method("gem", MethodContext(backbone="resnet18", pretrained=False))], benchmark,
                       EvalSettings(image_size=32))[0]


def test_cache_keys_tell_data_sets_and_changed_images_apart(tmp_path):
    one = write_labelled_set(tmp_path / "one", num_classes=2, per_class=3, seed=0)
    other_root = write_labelled_set(tmp_path / "two", num_classes=2, per_class=3, seed=0)  # the same set name
    assert _keys(f"csv:{one}") != _keys(f"csv:{other_root}")
    sets = tmp_path / "sets"  # two manifests of one folder, the same size, other images
    sets.mkdir()
    shutil.copytree(one.parent / "images", sets / "images")
    shutil.copy(one, sets / "a.csv")
    rows = list(csv.DictReader((sets / "a.csv").open()))
    rows[0]["file"], rows[1]["file"] = rows[1]["file"], rows[0]["file"]  # order matters too
    rows[2]["file"] = rows[3]["file"]
    with (sets / "b.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    assert create_benchmark(f"csv:{sets / 'a.csv'}", "unused").name == create_benchmark(f"csv:{sets / 'b.csv'}",
                                                                                          "unused").name
    assert _keys(f"csv:{sets / 'a.csv'}") != _keys(f"csv:{sets / 'b.csv'}")
    before = _keys(f"csv:{one}")
    assert _keys(f"csv:{one}") == before
    image = one.parent / "images" / "c0_0.jpg"
    stat = image.stat()
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert _keys(f"csv:{one}") != before


class _Centred(RetrievalMethod):
    """Mean colour minus the training images' mean colour: descriptors that depend on what fit learned."""

    fits = 0

    def __init__(self):
        super().__init__("centred")
        self.mean = None

    def needs_fit(self) -> bool:
        return True

    def fit(self, train_images, labels=None) -> None:
        _Centred.fits += 1
        self.mean = torch.stack([train_images[i][0].mean(dim=(1, 2)) for i in range(len(train_images))]).mean(0)

    def encode(self, images):
        return F.normalize(images.mean(dim=(2, 3)) - self.mean, dim=1)


def test_a_fitted_method_with_a_complete_cache_is_not_fitted_again(tmp_path):
    test = write_labelled_set(tmp_path / "test", num_classes=3, per_class=3, seed=0)
    train = write_labelled_set(tmp_path / "train", num_classes=2, per_class=3, seed=1)
    benchmark = LabelledBenchmark(name="toy", images=read_csv_manifest(test), training=read_csv_manifest(train))
    settings = EvalSettings(image_size=32, batch_size=2, shard_rows=4, cache_dir=str(tmp_path / "cache"))
    _Centred.fits = 0
    first = evaluate_methods([_Centred()], benchmark, settings)[0]
    again = evaluate_methods([_Centred()], benchmark, settings)[0]
    assert _Centred.fits == 1 and again.metrics == first.metrics
    image = benchmark.training.paths[0]  # another training set: another fit, other descriptors
    stat = image.stat()
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    evaluate_methods([_Centred()], benchmark, settings)
    assert _Centred.fits == 2 and len(list((tmp_path / "cache").rglob("centred-*.npy"))) == 2


class _Shifted(_Centred):
    """_Centred with queries described as queries, and a fit that can come out slightly differently with the
    same config and training images (as a PCA does at another thread count)."""

    asymmetric = True
    shift = 0.0

    def fit(self, train_images, labels=None) -> None:
        super().fit(train_images, labels)
        self.mean = self.mean + _Shifted.shift


def test_cached_descriptors_of_another_fit_are_described_again_and_never_paired(tmp_path, caplog):
    test = write_labelled_set(tmp_path / "test", num_classes=3, per_class=3, seed=0)
    train = write_labelled_set(tmp_path / "train", num_classes=2, per_class=3, seed=1)
    benchmark = LabelledBenchmark(name="toy", images=read_csv_manifest(test), training=read_csv_manifest(train))
    cache = tmp_path / "cache"
    settings = EvalSettings(image_size=32, batch_size=2, shard_rows=4, cache_dir=str(cache))

    def states():
        return {path.name.split("-")[1]: json.loads(path.read_text())["fitted_state"]
                for path in cache.rglob("centred-*.json")}

    _Centred.fits, _Shifted.shift = 0, 0.0
    evaluate_methods([_Shifted()], benchmark, settings)
    first = states()
    assert set(first) == {"database", "query"} and len(set(first.values())) == 1
    # the query entry is lost, and this run's fit comes out differently: the cached database rows, made by
    # the other fit, are described again instead of being paired with queries of this fit
    for path in cache.rglob("centred-query-*"):
        path.unlink()
    _Shifted.shift = 0.25
    method = _Shifted()
    with caplog.at_level("WARNING", logger="msretrieval.retrieval.evaluation.harness"):
        result = evaluate_methods([method], benchmark, settings)[0]
    assert "made by another fit" in caplog.text
    assert states() == {"database": method.fitted_state(), "query": method.fitted_state()} != first
    fresh = evaluate_methods([_Shifted()], benchmark, EvalSettings(image_size=32, batch_size=2, cache_dir=None))[0]
    assert result.metrics == fresh.metrics
    # entries of one fit: not fitted again; entries that record no fit (older caches): fitted again
    fits = _Centred.fits
    evaluate_methods([_Shifted()], benchmark, settings)
    assert _Centred.fits == fits
    for path in cache.rglob("centred-database-*.json"):
        meta = json.loads(path.read_text())
        del meta["fitted_state"]
        path.write_text(json.dumps(meta))
    evaluate_methods([_Shifted()], benchmark, settings)
    assert _Centred.fits == fits + 1 and set(states().values()) == {method.fitted_state()}


def test_state_fingerprints_tell_fits_apart_and_refuse_what_they_cannot_hash():
    from msretrieval.models.pca import PCA
    from msretrieval.retrieval.descriptors.methods import state_fingerprint

    pca = PCA(torch.zeros(3), torch.eye(3))
    same = state_fingerprint({"a": np.arange(4.0)}, pca, None, 3, "x")
    assert same == state_fingerprint({"a": np.arange(4.0)}, PCA(torch.zeros(3), torch.eye(3)), None, 3, "x")
    nudged = np.arange(4.0)
    nudged[2] = np.nextafter(nudged[2], 9)  # one bit
    assert state_fingerprint({"a": nudged}, pca, None, 3, "x") != same
    assert state_fingerprint({"a": np.arange(4.0, dtype=np.float32)}, pca, None, 3, "x") != same
    assert state_fingerprint({"a": np.arange(4.0)}, PCA(torch.zeros(3), 2 * torch.eye(3)), None, 3, "x") != same
    with pytest.raises(TypeError, match="object"):
        state_fingerprint(object())


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_processes_give_the_one_process_metrics_and_every_descriptor_once(tmp_path, capsys, one_thread):
    """23 images, batches of 4, shards of 5: shards 0, 2, 4 on process 0 and 1, 3 on process 1."""
    manifest = _drop_rows(write_labelled_set(tmp_path, num_classes=4, per_class=6), keep=23)
    common = ["--benchmark", f"csv:{manifest}", "--method", "gem", "--method", "gap", "--together", "--backbone",
              "resnet18", "--random-init", "--image-size", "32", "--batch-size", "4", "--shard-rows", "5"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0"]
    outputs = {run: ["--cache-dir", str(tmp_path / run), "--out", str(tmp_path / f"{run}.json")] for run in ("one", "two")}
    done = subprocess.run([*launch, "scripts/evaluate.py", *common, *outputs["two"]], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    code, _, stderr = run_script("evaluate", [*common, *outputs["one"]], capsys)  # one process: this one, 1 thread
    assert code == 0, stderr[-3000:]
    one, two = (json.loads((tmp_path / f"{run}.json").read_text())["results"] for run in ("one", "two"))
    assert [r["metrics"] for r in two] == [r["metrics"] for r in one]
    for method in ("gem", "gap"):
        (gathered,), (alone,) = ((tmp_path / run).rglob(f"{method}-*.npy") for run in ("two", "one"))
        assert np.load(gathered).shape[0] == 23
        np.testing.assert_array_equal(np.load(gathered), np.load(alone))
    assert not list((tmp_path / "two").rglob("*.shards"))


class _MeanColourView(RetrievalMethod):
    """Two views of one descriptor (like regional_search_max / _avg): one cache entry under two names."""

    encodes = 0

    def config(self) -> dict:
        return {"name": "mean colour"}

    @property
    def cache_name(self) -> str:
        return "mean_colour"

    def encode(self, images):
        _MeanColourView.encodes += 1
        return F.normalize(images.mean(dim=(2, 3)), dim=1)


def test_methods_sharing_a_cache_entry_extract_it_once_in_a_pass(tmp_path):
    benchmark = create_benchmark(f"csv:{write_labelled_set(tmp_path, num_classes=3, per_class=3)}", tmp_path)
    settings = EvalSettings(image_size=32, batch_size=2, shard_rows=4, cache_dir=str(tmp_path / "cache"))
    _MeanColourView.encodes = 0
    first, second = evaluate_methods([_MeanColourView("view_a"), _MeanColourView("view_b")], benchmark, settings,
                                     together=True)
    assert first.metrics == second.metrics and first.method == "view_a" and second.method == "view_b"
    assert _MeanColourView.encodes == 5  # 9 images in batches of <= 2 (one size), once, not once per method
    assert len(list((tmp_path / "cache").rglob("mean_colour-*.npy"))) == 1


class _ModeRecorder(_MeanColourView):
    modes: list = []

    def needs_fit(self) -> bool:
        return True

    def fit(self, train_images, labels=None) -> None:
        _ModeRecorder.modes.append(self.training)


def test_methods_are_fitted_in_eval_mode(tmp_path):
    test = write_labelled_set(tmp_path / "test", num_classes=2, per_class=2, seed=0)
    train = write_labelled_set(tmp_path / "train", num_classes=2, per_class=2, seed=1)
    benchmark = LabelledBenchmark(name="toy", images=read_csv_manifest(test), training=read_csv_manifest(train))
    method = _ModeRecorder("recorder").train()
    evaluate_methods([method], benchmark, EvalSettings(image_size=32, batch_size=2))
    assert _ModeRecorder.modes == [False]


class _Offset(RetrievalMethod):
    """Mean colour plus an offset that its fit reads from ``_Offset.offset`` (a seeded fit that comes out
    differently in two runs, as a PCA does at another thread count); ``encode`` raises once it has encoded
    ``fail_after`` batches (a killed extraction)."""

    offset = 0.0

    def __init__(self, fail_after: int | None = None):
        super().__init__("offset")
        self.shift, self.fail_after, self.encodes = None, fail_after, 0

    def needs_fit(self) -> bool:
        return True

    def fit(self, train_images, labels=None) -> None:
        self.shift = torch.full((3,), _Offset.offset)

    def encode(self, images):
        if self.fail_after is not None and self.encodes == self.fail_after:
            raise RuntimeError("killed")
        self.encodes += 1
        return images.mean(dim=(2, 3)) + self.shift


def test_a_resumed_extraction_never_mixes_the_shards_of_two_fits(tmp_path, caplog, one_thread):
    test = write_labelled_set(tmp_path / "test", num_classes=3, per_class=4, seed=0)  # 12 images
    train = write_labelled_set(tmp_path / "train", num_classes=2, per_class=2, seed=1)
    benchmark = LabelledBenchmark(name="toy", images=read_csv_manifest(test), training=read_csv_manifest(train))
    cache = tmp_path / "cache"
    # one image size, batches of 4 in shards of 4: one encode per shard (rows 0-3, 4-7, 8-11)
    settings = EvalSettings(image_size=32, batch_size=4, shard_rows=4, cache_dir=str(cache))
    _Offset.offset = 1.0
    with pytest.raises(RuntimeError, match="killed"):
        evaluate_methods([_Offset(fail_after=1)], benchmark, settings)  # rows 0-3 of fit 1 are on disk
    assert len(list(cache.rglob("shard-*.npy"))) == 1
    # resumed in a run whose fit comes out differently: fit 1's shard is dropped, not completed by fit 2
    _Offset.offset = 2.0
    with caplog.at_level("WARNING", logger="msretrieval.retrieval.search.shards"), \
            pytest.raises(RuntimeError, match="killed"):
        evaluate_methods([_Offset(fail_after=1)], benchmark, settings)  # rows 0-3 of fit 2
    assert "another fit" in caplog.text
    resumed = _Offset()
    evaluate_methods([resumed], benchmark, settings)
    assert resumed.encodes == 2  # rows 4-11: the shard of this same fit was kept
    fresh = tmp_path / "fresh"
    evaluate_methods([_Offset()], benchmark, EvalSettings(image_size=32, batch_size=4, shard_rows=4,
                                                          cache_dir=str(fresh)))
    (mixed,), (alone,) = cache.rglob("offset-*.npy"), fresh.rglob("offset-*.npy")
    np.testing.assert_array_equal(np.load(mixed), np.load(alone))  # every row of fit 2
    (meta,) = cache.rglob("offset-*.json")
    assert json.loads(meta.read_text())["fitted_state"] == resumed.fitted_state()


def test_cache_keys_hold_the_cache_format_version(tmp_path, monkeypatch):
    from msretrieval.retrieval.evaluation import descriptor_cache
    manifest = write_labelled_set(tmp_path, num_classes=2, per_class=2)
    before = _keys(f"csv:{manifest}")
    monkeypatch.setattr(descriptor_cache, "CACHE_FORMAT", descriptor_cache.CACHE_FORMAT + 1)
    after = _keys(f"csv:{manifest}")
    assert after.keys() == before.keys() and all(after[role] != before[role] for role in before)
