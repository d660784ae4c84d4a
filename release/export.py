"""Write a release directory from a trained network (see the package doc for what it holds).

``export_release(model, out_dir, ...)`` takes the network and plain records of its training and evaluation;
``scripts/export.py RUN_DIR OUT_DIR`` gathers those records from a run directory.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import subprocess
from pathlib import Path

import torch
from safetensors.torch import save_file

from msretrieval.models.retrieval_net import RetrievalNet
from msretrieval.utils.files import sha256_file

from .format import CARD_FILE, CONFIG_FILE, GRAPH_FILE, RELEASE_FORMAT, WEIGHTS_FILE
from .load import release_config

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
#: the exported graph accepts any batch size and image sides in this range (pixels); the lower end keeps
#: the last map of a stride-32 backbone at 4+ positions a side, so both pooled maps of MS-NetVLAD exist
GRAPH_SIDE_RANGE = (128, 2048)


def code_version() -> str:
    """``git describe`` of this repository (``-dirty`` if it has uncommitted changes), else ``unknown``."""
    try:
        done = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=12"], cwd=REPO,
                              capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return done.stdout.strip() if done.returncode == 0 and done.stdout.strip() else "unknown"


def same_padding(size, kernel_size: int, stride: int, dilation: int):
    """TensorFlow "SAME" padding in integer arithmetic: equal to timm's ``get_same_padding`` for every int,
    but on a symbolic size it stays a small expression. timm's ``math.ceil(size / stride)`` and ``max(.., 0)``
    nest a float ceiling and a Max into every later layer's size, and tf_efficientnet's stride-2 layers made
    the expression tree so large that a dynamic-size export did not finish in 10 minutes (5 s with this)."""
    total = ((size + stride - 1) // stride - 1) * stride + (kernel_size - 1) * dilation + 1 - size
    if (kernel_size - 1) * dilation + 1 >= stride:  # total >= span - stride >= 0: the max() is a no-op
        return total
    return torch.sym_max(total, 0) if isinstance(total, torch.SymInt) else max(total, 0)


@contextlib.contextmanager
def _integer_same_padding():
    """timm's dynamic "same" padding (``pad_same``, used by tf_* backbones' convolutions and pools) computes
    its amounts with :func:`same_padding` while the graph is traced; restored afterwards."""
    from timm.layers import padding

    original = padding.get_same_padding
    padding.get_same_padding = same_padding
    try:
        yield
    finally:
        padding.get_same_padding = original


def export_graph(model: RetrievalNet, path: Path) -> None:
    """A ``torch.export`` program of the network: (N, 3, H, W) normalised images -> (N, D) descriptors, for
    any N and any H, W in :data:`GRAPH_SIDE_RANGE`; loads with ``torch.export.load(path).module()``."""
    dims = {0: torch.export.Dim("batch", min=1, max=1024),
            2: torch.export.Dim("height", min=GRAPH_SIDE_RANGE[0], max=GRAPH_SIDE_RANGE[1]),
            3: torch.export.Dim("width", min=GRAPH_SIDE_RANGE[0], max=GRAPH_SIDE_RANGE[1])}
    example = torch.zeros(2, 3, 224, 256)  # sizes far from the range's ends: no 0/1 specialisation
    with _integer_same_padding():
        program = torch.export.export(model.eval(), (example,), dynamic_shapes=({**dims},), strict=False)
    torch.export.save(program, str(path))


def _readable_by_all(path: Path) -> None:
    """safetensors writes its file owner-only (0600); a release is meant to be shared: the umask decides."""
    umask = os.umask(0)
    os.umask(umask)
    path.chmod(0o666 & ~umask)


def model_card(config: dict) -> str:
    """README.md of a release: what the model is, how to use it, how it was trained and how it scored."""
    model, spec, descriptor = config["model"], config["input"], config["descriptor"]
    head = ", ".join(f"{k}={v}" for k, v in model["head"].items()) or "defaults"
    lines = [f"# {config['name']}", "",
             f"{model['architecture']} on {model['backbone']} ({head}): " + (
                 f"{descriptor['bits']}-bit binary codes packed in {descriptor['dim']} bytes (uint8), compared by "
                 "Hamming distance." if descriptor.get("binary") else
                 f"{descriptor['dim']}-d L2-normalised {descriptor['dtype']} descriptors, compared by inner "
                 "product."), "",
             "## Use", "", "```python",
             "from msretrieval.release import load_release    # torch, timm, safetensors...; no training code, no FAISS",
             f"retriever = load_release(\"{config['name']}\")",
             "descriptors = retriever.encode([\"query.jpg\", \"db1.jpg\"])   # " + (
                 "(N, bytes) uint8 packed codes" if descriptor.get("binary") else "(N, D) float32"),
             "# or: torch.hub.load(REPO_DIR, \"retriever\", source=\"local\", release=PATH)",
             "```", "",
             f"Input: RGB, {spec['resize']} side resized to {spec['image_size']} px ({spec['interpolation']}, "
             f"aspect ratio kept, no crop), normalised with mean {spec['mean']} and std {spec['std']}.", ""]
    if config["files"].get("graph"):
        lines += [f"`{GRAPH_FILE}` needs torch alone: `torch.export.load(\"{GRAPH_FILE}\").module()(images)` "
                  f"on normalised (N, 3, H, W) images, H and W in {list(GRAPH_SIDE_RANGE)}" + (
                      "; it outputs the codes as +-1/sqrt(bits) floats (bit = value > 0, packed with "
                      "`numpy.packbits`)." if descriptor.get("binary") else "."), ""]
    training = config.get("training") or {}
    if training:
        lines += ["## Training", ""]
        lines += [f"- {key.replace('_', ' ')}: {value:.4f}" if isinstance(value, float) else
                  f"- {key.replace('_', ' ')}: {value}" for key, value in training.items()
                  if not isinstance(value, (dict, list)) and value is not None]
        for key in ("classes", "validation_classes"):
            if training.get(key):
                lines += [f"- {key.replace('_', ' ')} ({len(training[key])}): {', '.join(map(str, training[key]))}"]
        lines.append("")
    evaluation = config.get("evaluation") or {}
    if evaluation.get("table"):
        columns = [c for c in ("mAP", "mAP@R", "R@1", "R@2", "R@4", "R@8") if c in evaluation["table"][0]["metrics"]]
        lines += ["## Evaluation", "", f"Benchmark `{evaluation['benchmark']}` (this model: "
                  f"`{evaluation['method']}`; the others are unsupervised baselines evaluated alongside).", "",
                  "| method | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
        for row in evaluation["table"]:
            lines.append(f"| {row['method']} | " + " | ".join(f"{row['metrics'][c]:.4f}" for c in columns) + " |")
        lines.append("")
    lines += ["## Files", "", f"- `{WEIGHTS_FILE}`: SHA-256 `{config['weights_sha256']}` (checked on load)",
              f"- `{CONFIG_FILE}`: everything above, machine-readable", f"- code version: `{config['code_version']}`",
              f"- format: `{config['format']}`", ""]
    return "\n".join(lines)


def export_release(model: RetrievalNet, out_dir: str | Path, image_size: int, resize: str = "shorter",
                   training: dict | None = None, evaluation: dict | None = None, graph: bool = True) -> Path:
    """Write ``out_dir`` (created; an existing non-empty directory is an error) and return it.

    ``image_size`` / ``resize``: the evaluation input the model was measured with (the release encodes the
    same way). ``training``: plain record (data, classes, steps...); ``evaluation``: ``{"benchmark",
    "method", "table": [{"method", "metrics"}]}``."""
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} exists and is not empty; export into a new directory")
    out_dir.mkdir(parents=True, exist_ok=True)
    model = model.eval().cpu()
    state = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
    save_file(state, str(out_dir / WEIGHTS_FILE), metadata={"format": RELEASE_FORMAT})
    _readable_by_all(out_dir / WEIGHTS_FILE)
    config = {"format": RELEASE_FORMAT, "name": out_dir.name, **release_config(model.config(), resize)}
    config["input"]["image_size"] = int(image_size)
    config.update({"training": training or {}, "evaluation": evaluation or {}, "code_version": code_version(),
                   "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                   "weights_sha256": sha256_file(out_dir / WEIGHTS_FILE),
                   "files": {"weights": WEIGHTS_FILE, "graph": GRAPH_FILE if graph else None}})
    if graph:
        export_graph(model, out_dir / GRAPH_FILE)
    (out_dir / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    (out_dir / CARD_FILE).write_text(model_card(config))
    log.info("release written to %s (%s, weights SHA-256 %s)", out_dir,
             f"{config['descriptor']['bits']}-bit codes" if config["descriptor"]["binary"] else
             f"{config['descriptor']['dim']}-d descriptors", config["weights_sha256"][:12])
    return out_dir
