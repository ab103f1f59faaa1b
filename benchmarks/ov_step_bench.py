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
        # One image's step: its guidance halves (batch 1 each) as two requests on two streams at once
        # (the ONNX Runtime twin's one-thread-session split, here with OpenVINO streams).
        f"{precision} guidance halves on 2 streams at once (per step)": {
            "config": {**hint, "PERFORMANCE_HINT": "THROUGHPUT", "NUM_STREAMS": 2}, "halves": True},
    }


def _halves(feeds: dict[str, Any]) -> list[dict[str, Any]]:
    """The batch split in two (inputs whose first dim is the batch; the timestep is shared)."""
    batch = feeds["sample"].shape[0]
    return [{k: (v[i * batch // 2:(i + 1) * batch // 2] if v.shape[:1] == (batch,) else v)
             for k, v in feeds.items()} for i in range(2)]


def run(artifacts: Path, component: str, height: int, width: int, batch: int, rounds: int,
        precision: str, ir: Path | None = None) -> dict[str, Any]:
    """``ir``: an OpenVINO IR to measure instead of the component's ONNX export (e.g. its int8 engine,
    ``engines/openvino/unet/model.xml``)."""
    import openvino as ov

    from ..runtime.artifact_reader import read_artifacts

    arts = read_artifacts(artifacts)
    spec = arts.specs[component]
    onnx_path = Path(ir) if ir is not None else arts.onnx_path(component)
    feeds = spec.example_inputs(batch, height, width, seed=0)
    core = ov.Core()
    compiled: dict[str, tuple[Any, int, list[dict[str, Any]]]] = {}
    configs = _configs(precision)
    if batch < 2 or batch % 2:
        configs = {n: c for n, c in configs.items() if not c.get("halves")}
    for name, c in configs.items():
        model = core.read_model(str(onnx_path))
        if c.get("static"):
            model.reshape({n: list(v.shape) for n, v in feeds.items()})
        parts = _halves(feeds) if c.get("halves") else [feeds] * int(c.get("parallel", 1))
        compiled[name] = (core.compile_model(model, "CPU", c["config"]), len(parts) if not c.get("halves") else 1,
                          parts)
    times: dict[str, list[float]] = {n: [] for n in compiled}
    for name, (cm, _per, parts) in compiled.items():  # one unmeasured call each: first-shape costs
        for part in parts:
            cm.create_infer_request().infer(part)
    for _ in range(rounds):
        for name, (cm, per, parts) in compiled.items():
            reqs = [cm.create_infer_request() for _ in parts]
            t0 = time.perf_counter()
            if len(parts) == 1:
                reqs[0].infer(parts[0])
            else:
                for r, part in zip(reqs, parts):
                    r.start_async(part)
                for r in reqs:
                    r.wait()
            times[name].append((time.perf_counter() - t0) / per)
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
    return {"component": component, "ir": str(ir) if ir else None, "shape": [batch, height, width], "rounds": rounds,
            "precision": precision,
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
    p.add_argument("--ir", type=Path, default=None, metavar="XML",
                   help="measure this OpenVINO IR instead of the export (e.g. the int8 engine's model.xml)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    h, _, w = args.size.partition("x")
    result = run(args.artifacts, args.component, int(h), int(w), args.batch, args.rounds, args.precision, args.ir)
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
