"""The final table: the trained network, frozen, next to the unsupervised baselines on the test benchmark.

This is the only place a training run reads the test images, and it runs after training has finished.
"""
from __future__ import annotations

import logging
from pathlib import Path

from msretrieval.retrieval.evaluation.benchmarks import create_benchmark
from msretrieval.retrieval.evaluation.harness import EvalSettings, evaluate_method, evaluate_methods, report
from msretrieval.retrieval.evaluation.catalogue import MethodContext, create_method
from msretrieval.retrieval.descriptors.trained import TrainedModelMethod

log = logging.getLogger(__name__)


def descriptor_scales(config: dict) -> tuple[float, ...]:
    """The trained network's descriptor scales (``eval.scales``); a hashing network's codes are of scale 1."""
    return (1.0,) if config["model"]["head"]["hash_bits"] else tuple(config["eval"]["scales"])


def final_evaluation(config: dict, run_dir: Path, data_root: Path, device: str = "cpu") -> dict:
    """Baselines (one shared pass, pretrained weights of the run's backbone) and ``run:RUN_DIR`` (best.pth,
    chosen on the validation classes, else last.pth) on ``eval.benchmark``; the report dict of the harness."""
    ecfg, mcfg = config["eval"], config["model"]
    # eval.limit: N images of a labelled benchmark, dealt over its classes (quick checks; null = all)
    benchmark = create_benchmark(ecfg["benchmark"], data_root, limit=ecfg["limit"])
    settings = EvalSettings(image_size=ecfg["image_size"], batch_size=ecfg["batch_size"], device=device,
                            num_workers=ecfg["workers"], cache_dir=ecfg["cache_dir"])
    context = MethodContext(backbone=mcfg["backbone"], pretrained=mcfg["pretrained"], weights=mcfg["weights"],
                            share_backbone=True)
    baselines = [create_method(name, context) for name in ecfg["baselines"]]
    results = evaluate_methods(baselines, benchmark, settings, together=True) if baselines else []
    trained = TrainedModelMethod.from_spec(f"run:{run_dir}", scales=descriptor_scales(config))
    log.info("evaluating %s", trained.checkpoint)
    trained.name = f"{mcfg['architecture']} (trained)"
    results.append(evaluate_method(trained, benchmark, settings))
    return report(benchmark, results)
