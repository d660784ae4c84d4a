"""GPU FAISS: with a GPU build, float indexes (flat and IVF) move to the GPU and return the CPU's results;
"auto" stays on the CPU without one; asking for the GPU without one is one clear error.

This machine has faiss-cpu (no GPU functions), so the GPU build is faked: ``get_num_gpus`` reports GPUs and the
cloners record what they were given and hand back the CPU index itself, which is what a real clone computes
(flat and IVF-Flat keep float32 on the GPU). What is checked is our side: the path taken, the options, the
parameters set through the GPU parameter space, and that results come from the cloned index."""
import json
import logging

import faiss
import numpy as np
import pytest

from msretrieval.release.image_index import ImageIndex, build_faiss
from msretrieval.retrieval.search.index import FaissGpuMissing, SearchIndex, faiss_gpu_count, to_gpus
from msretrieval.retrieval.search.sharded_search import exact_search
from msretrieval.utils.errors import UserError


class FakeOptions:
    """GpuClonerOptions / GpuMultipleClonerOptions as far as we use them."""
    useFloat16 = None
    shard = None


class Searched:
    """A 'GPU' index: the CPU index, counting the searches that go through it."""

    def __init__(self, index):
        self.inner, self.searches = index, 0
        self.ntotal = index.ntotal

    def search(self, queries, k):
        self.searches += 1
        return self.inner.search(queries, k)


@pytest.fixture
def fake_gpus(monkeypatch):
    """Make FAISS look like its GPU build with ``n`` GPUs; returns the record of clones."""
    clones = []

    def install(n: int, refuse: bool = False):
        def clone(index, options, how):
            if refuse:
                raise RuntimeError("Error in faiss::Index* faiss::gpu::ToGpuCloner::clone_Index at "
                                   "GpuCloner.cpp:123: This index type is not implemented on GPU.")
            clones.append({"how": how, "kind": type(faiss.downcast_index(index)).__name__,
                           "float16": options.useFloat16, "shard": options.shard})
            clones[-1]["index"] = Searched(index)
            return clones[-1]["index"]

        monkeypatch.setattr(faiss, "get_num_gpus", lambda: n)
        monkeypatch.setattr(faiss, "StandardGpuResources", object, raising=False)
        monkeypatch.setattr(faiss, "GpuClonerOptions", FakeOptions, raising=False)
        monkeypatch.setattr(faiss, "GpuMultipleClonerOptions", FakeOptions, raising=False)
        monkeypatch.setattr(faiss, "index_cpu_to_gpu",
                            lambda resources, device, index, options: clone(index, options, f"device {device}"),
                            raising=False)
        monkeypatch.setattr(faiss, "index_cpu_to_all_gpus",
                            lambda index, co=None: clone(index, co, "all"), raising=False)
        # the GPU parameter space reaches into GPU indexes; the fake clone is the CPU index underneath
        monkeypatch.setattr(faiss, "GpuParameterSpace", lambda: Unwrapping(), raising=False)
        return clones

    return install


class Unwrapping:
    def set_index_parameter(self, index, name, value):
        faiss.ParameterSpace().set_index_parameter(getattr(index, "inner", index), name, value)


def vectors(count, dim=32, seed=0):
    rows = np.random.default_rng(seed).normal(size=(count, dim)).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


@pytest.mark.parametrize("factory, kind, nprobe", [("Flat", "IndexFlat", None), ("IVF16,Flat", "IndexIVFFlat", 3)])
def test_flat_and_ivf_indexes_move_to_one_gpu_and_give_the_cpu_results(fake_gpus, caplog, factory, kind, nprobe):
    database, queries = vectors(1200), vectors(25, seed=1)
    cpu = SearchIndex(database, use_gpu=False, factory=factory, nprobe=nprobe)
    clones = fake_gpus(1)
    with caplog.at_level(logging.INFO, logger="msretrieval.retrieval.search.index"):
        gpu = SearchIndex(database, factory=factory, nprobe=nprobe)  # use_gpu="auto"
    assert [{k: v for k, v in c.items() if k != "index"} for c in clones] == \
        [{"how": "device 0", "kind": kind, "float16": False, "shard": None}]
    assert gpu.gpus == 1 and cpu.gpus == 0 and gpu.index is clones[0]["index"]
    assert f"FAISS {factory} index on 1 GPU(s)" in caplog.text
    if nprobe is not None:  # set through the GPU parameter space, on the cloned index
        assert faiss.extract_index_ivf(clones[0]["index"].inner).nprobe == 3
    scores, indices = gpu.search(queries, 10)
    assert clones[0]["index"].searches == 1  # the search ran on the clone
    expected_scores, expected_indices = cpu.search(queries, 10)
    np.testing.assert_array_equal(indices, expected_indices)
    np.testing.assert_array_equal(scores, expected_scores)


def test_ivf_pq_uses_half_precision_and_several_gpus_share_the_rows(fake_gpus, caplog):
    database = vectors(3000)
    clones = fake_gpus(2)
    with caplog.at_level(logging.DEBUG, logger="msretrieval.retrieval.search.index"):  # an explicit choice logs at DEBUG
        index = SearchIndex(database, factory="IVF16,PQ8np", use_gpu=True, nprobe=2)
        flat = SearchIndex(database, use_gpu=True)
    assert [(c["how"], c["kind"], c["float16"], c["shard"]) for c in clones] == \
        [("all", "IndexIVFPQ", True, True), ("all", "IndexFlat", False, True)]
    assert index.gpus == flat.gpus == 2 and "on 2 GPU(s) (sharded)" in caplog.text
    assert {record.levelno for record in caplog.records} == {logging.DEBUG}


def test_auto_stays_on_the_cpu_without_gpu_faiss(caplog):
    assert faiss_gpu_count() == 0  # faiss-cpu: the case every user without faiss-gpu is in
    database = vectors(200)
    with caplog.at_level(logging.INFO, logger="msretrieval.retrieval.search.index"):
        index = SearchIndex(database, factory="IVF4,Flat")
    assert index.gpus == 0 and isinstance(index.index, faiss.IndexIVFFlat)
    assert "FAISS IVF4,Flat index on the CPU (FAISS sees no GPU)" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO):
        scores, indices = exact_search(vectors(5, seed=2), database, 3)  # "auto" too, decided once for all shards
    assert indices.shape == (5, 3)
    assert [r.getMessage() for r in caplog.records] == ["exact search shard by shard on the CPU (FAISS sees no GPU)"]


def test_asking_for_the_gpu_without_gpu_faiss_is_one_clear_error(monkeypatch):
    with pytest.raises(FaissGpuMissing, match=r"FAISS sees no GPU: .*requirements-gpu\.txt") as error:
        SearchIndex(vectors(50), use_gpu=True)
    assert "\n" not in str(error.value) and isinstance(error.value, UserError)
    monkeypatch.delattr(faiss, "get_num_gpus")  # a FAISS build without the function at all
    assert faiss_gpu_count() == 0
    with pytest.raises(FaissGpuMissing):
        exact_search(vectors(2), vectors(50), 3, use_gpu=True)
    with pytest.raises(ValueError, match="use_gpu must be one of"):
        to_gpus(faiss.IndexFlatIP(4), use_gpu="yes")
    with pytest.raises(UserError, match="packed binary codes are searched on the CPU"):
        SearchIndex(np.zeros((4, 8), dtype=np.uint8), "hamming", use_gpu=True)


def test_an_index_faiss_cannot_clone_falls_back_or_errors(fake_gpus, caplog):
    fake_gpus(1, refuse=True)
    database = vectors(300)
    with caplog.at_level(logging.INFO, logger="msretrieval.retrieval.search.index"):
        index = SearchIndex(database, factory="HNSW8")
    assert index.gpus == 0 and "on the CPU (FAISS cannot move it to the GPU: This index type is not " \
                                 "implemented on GPU.)" in caplog.text
    with pytest.raises(UserError, match=r"^FAISS HNSW8 index cannot move to the GPU \(This index type"):
        SearchIndex(database, factory="HNSW8", use_gpu=True)


def write_image_index(directory, descriptors):
    index, parameters = build_faiss(descriptors, "Flat")
    meta = {"release": "r", "weights_sha256": "w", "factory": "Flat", "index": parameters, "binary": False,
            "dim": descriptors.shape[1], "folder": "f",
            "images": [{"path": f"/images/{i}.jpg", "stamp": [1, 2]} for i in range(len(descriptors))]}
    directory.mkdir()
    ImageIndex._write(directory, meta, descriptors, index)
    return meta


def test_an_image_index_is_searched_on_the_gpu_when_asked(tmp_path, fake_gpus, monkeypatch):
    descriptors, queries = vectors(40), vectors(3, seed=5)
    write_image_index(tmp_path / "index", descriptors)
    on_cpu = ImageIndex.open(tmp_path / "index")
    with pytest.raises(FaissGpuMissing):
        ImageIndex.open(tmp_path / "index", use_gpu=True)
    assert json.loads((tmp_path / "index" / "index.json").read_text())["factory"] == "Flat"
    clones = fake_gpus(1)
    on_gpu = ImageIndex.open(tmp_path / "index", use_gpu=True)
    assert on_gpu.gpus == 1 and on_cpu.gpus == 0 and clones[0]["kind"] == "IndexFlatIP"  # as read from disk
    scores, rows = on_gpu.search(queries, 5)
    expected_scores, expected_rows = on_cpu.search(queries, 5)
    np.testing.assert_array_equal(rows, expected_rows)
    np.testing.assert_array_equal(scores, expected_scores)
    assert clones[0]["index"].searches == 1
    monkeypatch.setattr(clones[0]["index"], "ntotal", 5000)
    with pytest.raises(UserError, match="at most 2048 neighbours"):
        on_gpu.search(queries, 3000)


def test_search_script_with_device_cuda_needs_gpu_faiss(tmp_path, capsys):
    import importlib.util
    from pathlib import Path

    from msretrieval.utils.cli import run_cli

    write_image_index(tmp_path / "index", vectors(10))
    path = Path(__file__).resolve().parents[2] / "scripts" / "search.py"
    spec = importlib.util.spec_from_file_location("search_script", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    query = tmp_path / "q.jpg"
    query.write_bytes(b"")
    assert run_cli(lambda: script.main([str(tmp_path / "index"), str(query), "--device", "cuda"])) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: GPU search was asked for but FAISS sees no GPU") and error.count("\n") == 1


def test_the_sharded_exact_search_puts_every_shard_on_the_gpu(tmp_path, fake_gpus, caplog):
    from tests.retrieval.test_large_index import write_shards

    database, queries = vectors(300), vectors(4, seed=3)
    sharded = write_shards(tmp_path / "shards", database, 100)
    expected = exact_search(queries, database, 7, use_gpu=False)
    clones = fake_gpus(1)
    with caplog.at_level(logging.INFO, logger="msretrieval.retrieval"):
        scores, indices = exact_search(queries, sharded, 7)
    assert len(clones) == 3 and all(c["index"].searches == 1 for c in clones)  # one GPU index a shard
    assert [r.getMessage() for r in caplog.records] == ["exact search shard by shard on the GPU"]
    np.testing.assert_array_equal(indices, expected[1])
    np.testing.assert_array_equal(scores, expected[0])
