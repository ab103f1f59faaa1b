"""Microbenchmark of ONE component call (e.g. one UNet step): torch eager vs ORT settings.

This is how the ONNX Runtime settings of the runtime and of the engine builder were
chosen: every configuration runs the same inputs, interleaved round-robin (A B C A B C
...), and is reported as its median, its minimum, its ratio to PyTorch eager fp32 (the
diffusers baseline's compute) and its max abs error against PyTorch.

Two clocks:

``wall``    perf_counter, with the threads each configuration asks for: what a user
            waits for, but on a shared machine other processes' load lands in it.
``thread``  ``time.thread_time`` of the calling thread with every configuration forced
            to ONE thread (torch and ORT both run their kernels in the calling thread):
            CPU time is what the configuration costs, so other processes' load mostly
            cancels (they still share caches and memory bandwidth). Use it to compare
            graph-level options; use ``wall`` for thread settings.

    python -m sdxl_export.benchmarks.step_bench --artifacts DIR --component unet \\
        --size 512x512 --batch 2 --rounds 7 --clock thread --json unet_step.json
"""

from __future__ import annotations

import functools
import json
import logging
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InvalidRequestError

log = logging.getLogger(__name__)

#: ORT level names as the engine builder spells them -> SessionOptions enum names.
LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED",
          "layout": "ORT_ENABLE_LAYOUT", "all": "ORT_ENABLE_ALL"}


@dataclass(frozen=True)
class OrtConfig:
    """One ONNX Runtime configuration of a component (graph + session options)."""

    name: str
    level: str = "all"
    threads: int | None = None  # None: every core (the runtime's default)
    spinning: bool = False
    static_shapes: bool = False  # free-dimension overrides to the benchmarked shape
    #: "export" (the exported graph), or "twin:<level>": the graph saved after ORT optimized it
    #: offline at <level> (what ``sdxl-export build`` does), opened at ``level``.
    graph: str = "export"
    config_entries: dict[str, str] = field(default_factory=dict)
    #: > 1: split the batch into this many chunks run concurrently by one-thread sessions
    #: (the ``batch_parallel`` runner option proposed for the ORT backend). Wall clock only.
    lanes: int = 1
    note: str = ""


#: The configurations measured for the README's tuning table, in the order they are tried.
CONFIGS: tuple[OrtConfig, ...] = (
    OrtConfig("ort disable_all", level="disable", note="no graph optimization"),
    OrtConfig("ort basic", level="basic", note="constant folding, redundant node removal"),
    OrtConfig("ort extended", level="extended", note="+ GELU/LayerNorm/attention/MatMul fusions"),
    OrtConfig("ort all", level="all", note="+ NCHWc layout for convolutions (runtime default)"),
    OrtConfig("ort all + static shapes", level="all", static_shapes=True, note="free-dim overrides per bucket"),
    OrtConfig("ort all + spinning", level="all", spinning=True, note="intra-op workers busy-wait"),
    OrtConfig("ort all 1 thread", level="all", threads=1),
    OrtConfig("ort all + batch split 2x1 thread", level="all", lanes=2,
              note="CFG halves concurrently in two one-thread sessions"),
    OrtConfig("twin(extended) opened disable_all", graph="twin:extended", level="disable",
              note="what `build` writes and the runtime opens today"),
    OrtConfig("twin(extended) opened all", graph="twin:extended", level="all",
              note="offline fusions + online NCHWc layout"),
)


def _session_options(cfg: OrtConfig, dims: dict[str, int], force_threads: int | None) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, LEVELS[cfg.level])
    so.log_severity_level = 3
    threads = force_threads if force_threads is not None else (1 if cfg.lanes > 1 else cfg.threads)
    if threads:
        so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if cfg.spinning else "0")
    for k, v in cfg.config_entries.items():
        so.add_session_config_entry(k, v)
    if cfg.static_shapes:
        for name, value in dims.items():
            so.add_free_dimension_override_by_name(name, value)
    return so


def save_twin(source: Path, out: Path, level: str) -> Path:
    """The graph ONNX Runtime writes after optimizing ``source`` offline at ``level``."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, LEVELS[level])
    so.optimized_model_filepath = str(out)
    so.log_severity_level = 3
    so.add_session_config_entry("session.optimized_model_external_initializers_file_name", out.name + ".data")
    so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    ort.InferenceSession(str(source), so, providers=["CPUExecutionProvider"])
    return out


def lane_call(sessions: list[Any], feeds: dict[str, np.ndarray], batched: set[str], pool: Any) -> Callable[[], Any]:
    """Run equal batch chunks of ``feeds`` concurrently, one per session; concatenate outputs."""
    n = len(sessions)
    batch = next(feeds[k] for k in batched).shape[0]
    if batch % n:
        raise InvalidRequestError(f"batch {batch} does not split into {n} lanes", "use an even --batch")
    step = batch // n
    chunks = [{k: a[i * step:(i + 1) * step] if k in batched else a for k, a in feeds.items()} for i in range(n)]

    def call() -> list[np.ndarray]:
        futures = [pool.submit(s.run, None, c) for s, c in zip(sessions, chunks)]
        parts = [f.result() for f in futures]
        return [np.concatenate([p[j] for p in parts]) for j in range(len(parts[0]))]

    return call


def interleaved(calls: dict[str, Callable[[], Any]], rounds: int, clock: Callable[[], float]) -> dict[str, list[float]]:
    """``rounds`` times: call each in turn once; the times per name."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            t0 = clock()
            call()
            times[name].append(clock() - t0)
    return times


def run_step_bench(artifacts: str | Path, component: str = "unet", height: int | None = None,
                   width: int | None = None, batch: int | None = None, rounds: int = 7, clock: str = "wall",
                   configs: Sequence[OrtConfig] = CONFIGS) -> dict[str, Any]:
    """Benchmark ``component`` once per round per configuration; see the module docstring."""
    import onnxruntime as ort
    import torch

    from ..models.wrappers import wrap
    from ..runtime import read_artifacts
    from .baseline import load_reference_model
    from .stats import machine_info

    if clock not in ("wall", "thread"):
        raise InvalidRequestError(f"unknown clock {clock!r}", "use --clock wall or --clock thread")
    arts = read_artifacts(artifacts)
    if component not in arts.specs:
        raise InvalidRequestError(f"{component!r} is not a component of {arts.root}",
                                  f"use one of {', '.join(arts.specs)}")
    spec = arts.specs[component]
    height = height or arts.native_size
    width = width or arts.native_size
    batch = batch or (2 if spec.kind == "unet" else 1)  # the UNets run at 2x the prompt batch under guidance
    feeds = spec.example_inputs(batch, height, width, seed=0)
    dims = {k: v for k, v in spec.dims_for(batch, height, width).items() if k in spec.symbolic_dims()}
    force = 1 if clock == "thread" else None
    timer = time.thread_time if clock == "thread" else time.perf_counter
    threads_before = torch.get_num_threads()
    if force:
        torch.set_num_threads(1)
    try:
        module = wrap(load_reference_model(arts.root), spec)
        args = [torch.from_numpy(feeds[n]) for n in spec.input_names]
        with torch.no_grad():
            reference = [o.numpy() for o in module(*args)]

        def run_torch() -> Any:
            with torch.no_grad():
                return module(*args)

        calls: dict[str, Callable[[], Any]] = {"torch eager fp32": run_torch}
        errors: dict[str, float] = {"torch eager fp32": 0.0}
        load_s: dict[str, float] = {}
        batched = {t.name for t in spec.inputs if t.shape and t.shape[0] == "batch"}
        pool = ThreadPoolExecutor(max(c.lanes for c in configs) if configs else 1)
        if clock == "thread":
            configs = [c for c in configs if c.lanes == 1]  # lane threads' CPU time is not the caller's
        with pool, tempfile.TemporaryDirectory(prefix="step-bench-") as tmp:
            twins: dict[str, Path] = {}
            for cfg in configs:
                path = arts.onnx_path(component)
                if cfg.graph.startswith("twin:"):
                    lvl = cfg.graph.split(":", 1)[1]
                    if lvl not in twins:
                        twins[lvl] = save_twin(path, Path(tmp) / f"twin-{lvl}.onnx", lvl)
                    path = twins[lvl]
                t0 = time.perf_counter()
                sessions = [ort.InferenceSession(str(path), _session_options(cfg, dims, force),
                                                 providers=["CPUExecutionProvider"]) for _ in range(cfg.lanes)]
                load_s[cfg.name] = time.perf_counter() - t0
                if cfg.lanes > 1:
                    calls[cfg.name] = lane_call(sessions, feeds, batched, pool)
                else:
                    calls[cfg.name] = functools.partial(sessions[0].run, None, feeds)
                outs = calls[cfg.name]()
                errors[cfg.name] = max(float(np.abs(o - r).max()) for o, r in zip(outs, reference))
            for call in calls.values():  # one warm-up each, outside the measurement
                call()
            times = interleaved(calls, rounds, timer)
    finally:
        torch.set_num_threads(threads_before)
    base = statistics.median(times["torch eager fp32"])
    notes = {c.name: c.note for c in configs}
    rows = [{"config": name, "median_ms": statistics.median(t) * 1e3, "min_ms": min(t) * 1e3,
             "speedup_vs_torch": base / statistics.median(t), "max_abs_error": errors[name],
             "load_seconds": load_s.get(name), "note": notes.get(name, ""), "runs_ms": [x * 1e3 for x in t]}
            for name, t in times.items()]
    return {"component": component, "height": height, "width": width, "batch": batch, "rounds": rounds,
            "clock": clock, "artifacts": str(arts.root), "machine": machine_info(), "rows": rows}


def markdown(result: dict[str, Any]) -> str:
    lines = [(f"{result['component']} at {result['height']}x{result['width']}, batch {result['batch']}, "
             f"{result['rounds']} interleaved rounds, clock {result['clock']}"),
             "", "| config | median ms | min ms | x vs torch | max abs err | note |", "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['config']} | {r['median_ms']:.1f} | {r['min_ms']:.1f} | {r['speedup_vs_torch']:.2f} | "
                     f"{r['max_abs_error']:.1e} | {r['note']} |")
    load = result["machine"].get("load_average")
    lines.append(f"\nload average at the end: {load[0]:.2f}" if load else "")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    from ..buckets import Bucket
    from ..cli_common import Parser
    from ..errors import SDXLExportError
    from ..logs import setup_logging

    p = Parser(prog="python -m sdxl_export.benchmarks.step_bench", description=__doc__.split("\n")[0])
    p.add_argument("--artifacts", type=Path, required=True)
    p.add_argument("--component", default="unet")
    p.add_argument("--size", default=None, help="HxW pixels (default: native)")
    p.add_argument("--batch", type=int, default=None, help="default 2 for UNets (guidance), else 1")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--clock", choices=("wall", "thread"), default="wall")
    p.add_argument("--configs", default=None, help="comma-separated config names (default: all)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    setup_logging(0)
    try:
        h = w = None
        if args.size:
            b = Bucket.parse(args.size)
            h, w = b.height, b.width
        configs = CONFIGS
        if args.configs:
            wanted = [c.strip() for c in args.configs.split(",")]
            unknown = set(wanted) - {c.name for c in CONFIGS}
            if unknown:
                raise InvalidRequestError(f"unknown configs {sorted(unknown)}",
                                          f"use names from: {', '.join(c.name for c in CONFIGS)}")
            configs = tuple(c for c in CONFIGS if c.name in wanted)
        result = run_step_bench(args.artifacts, args.component, h, w, args.batch, args.rounds, args.clock, configs)
    except SDXLExportError as exc:
        print(f"step_bench: error: {exc.one_line()}", file=sys.stderr)
        return 2
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(result))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
