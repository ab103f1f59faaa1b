"""Microbenchmark of one OpenVINO component call (e.g. one UNet step) under several settings.

What the OpenVINO backend's defaults were checked against (issue: "report what helped and
what did not"): the same inputs, every configuration compiled once, then run interleaved
round-robin (A B C A B C ...); each is reported as its median wall time per call (per image
for the two-stream configuration, which runs two requests at once) and its ratio to the
first configuration, and the compile time with an empty vs a filled cache folder.

    python -m sdxl_export.benchmarks.ov_step_bench --artifacts DIR --component unet \\
        --size 512x512 --batch 2 --rounds 7 --json ov_step.json
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def _configs(precision: str) -> dict[str, dict[str, Any]]:
    hint = {"INFERENCE_PRECISION_HINT": precision}
    return {
        f"{precision} dynamic shapes, latency hint (the backend's default)": {"config": {**hint,
                                                                                     "PERFORMANCE_HINT": "LATENCY"}},
        f"{precision} static reshape to this bucket": {"config": {**hint, "PERFORMANCE_HINT": "LATENCY"},
                                                       "static": True},
        f"{precision} 1 inference thread": {"config": {**hint, "PERFORMANCE_HINT": "LATENCY",
                                                       "INFERENCE_NUM_THREADS": 1}},
        f"{precision} 2 streams, 2 requests at once (per image)": {
            "config": {**hint, "PERFORMANCE_HINT": "THROUGHPUT", "NUM_STREAMS": 2}, "parallel": 2},
    }


def run(artifacts: Path, component: str, height: int, width: int, batch: int, rounds: int,
        precision: str) -> dict[str, Any]:
    import openvino as ov

    from ..runtime.artifact_reader import read_artifacts

    arts = read_artifacts(artifacts)
    spec = arts.specs[component]
    onnx_path = arts.onnx_path(component)
    feeds = spec.example_inputs(batch, height, width, seed=0)
    core = ov.Core()
    compiled: dict[str, tuple[Any, int]] = {}
    for name, c in _configs(precision).items():
        model = core.read_model(str(onnx_path))
        if c.get("static"):
            model.reshape({n: list(v.shape) for n, v in feeds.items()})
        compiled[name] = (core.compile_model(model, "CPU", c["config"]), int(c.get("parallel", 1)))
    times: dict[str, list[float]] = {n: [] for n in compiled}
    for name, (cm, _parallel) in compiled.items():  # one unmeasured call each: first-shape costs
        cm.create_infer_request().infer(feeds)
    for _ in range(rounds):
        for name, (cm, parallel) in compiled.items():
            reqs = [cm.create_infer_request() for _ in range(parallel)]
            t0 = time.perf_counter()
            if parallel == 1:
                reqs[0].infer(feeds)
            else:
                with ThreadPoolExecutor(parallel) as pool:
                    list(pool.map(lambda r: r.infer(feeds), reqs))
            times[name].append((time.perf_counter() - t0) / parallel)
    first = statistics.median(next(iter(times.values())))
    rows = {n: {"median_ms": statistics.median(v) * 1e3, "min_ms": min(v) * 1e3,
                "vs_default": first / statistics.median(v)} for n, v in times.items()}
    cache: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label in ("compile, empty cache", "compile, filled cache"):
            t0 = time.perf_counter()
            core2 = ov.Core()
            core2.compile_model(core2.read_model(str(onnx_path)), "CPU",
                                {"INFERENCE_PRECISION_HINT": precision, "CACHE_DIR": tmp})
            cache[label] = time.perf_counter() - t0
    return {"component": component, "shape": [batch, height, width], "rounds": rounds, "precision": precision,
            "openvino": ov.__version__, "configs": rows, "compile_seconds": cache}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--artifacts", type=Path, required=True)
    p.add_argument("--component", default="unet")
    p.add_argument("--size", default="512x512", help="HxW")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--precision", default="bf16", choices=("bf16", "f32"))
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    h, _, w = args.size.partition("x")
    result = run(args.artifacts, args.component, int(h), int(w), args.batch, args.rounds, args.precision)
    print("| configuration | median ms | min ms | vs default |\n|---|---|---|---|")
    for name, r in result["configs"].items():
        print(f"| {name} | {r['median_ms']:.1f} | {r['min_ms']:.1f} | {r['vs_default']:.2f}x |")
    for label, secs in result["compile_seconds"].items():
        print(f"- {label}: {secs:.2f} s")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
