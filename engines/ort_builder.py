"""The ONNX Runtime twin: what ``build`` produces where TensorRT cannot run.

For each component ONNX Runtime optimizes the exported graph offline
(``SessionOptions.optimized_model_filepath``) at a chosen graph optimization level and
we keep the result, with the session settings the runtime must use, under the same
engine manifest as TensorRT plans. The runtime then skips graph optimization at load.

Level: ``extended`` by default. ``all`` adds layout transformations (NCHWc) that tie the
saved graph to this CPU's vector width, which ONNX Runtime documents as unsafe to reuse on
other hardware; ``extended`` fusions (GELU, LayerNorm, attention, ...) are portable
across machines that run the same ONNX Runtime version with the CPU provider.

Precision: the twin always runs fp32. ONNX Runtime's CPU provider has few fp16 kernels
(it would insert casts around most nodes, slower than fp32) and fp16 would break the
export's parity contract with PyTorch; ``--fp16``/``--bf16`` are recorded as the
requested precision next to the effective one (see ``build``).

Weights go to ``model.onnx.data`` beside ``model.onnx`` (ONNX Runtime's
``session.optimized_model_external_initializers_*`` options), so a full-size UNet over
protobuf's 2 GB limit is saved the same way as the tiny preset.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InvalidRequestError, SDXLExportError
from ..specs import ComponentSpec

log = logging.getLogger(__name__)

LEVELS = ("disable", "basic", "extended", "all")
DEFAULT_LEVEL = "extended"
PROVIDERS = ("CPUExecutionProvider",)
TWIN_FILE = "model.onnx"
TWIN_DATA = "model.onnx.data"
EXTERNAL_MIN_BYTES = 1024


class TwinBuildError(SDXLExportError):
    """ONNX Runtime failed to optimize a graph, or the optimized graph disagrees with it."""


def _level(name: str) -> Any:
    import onnxruntime as ort

    if name not in LEVELS:
        raise InvalidRequestError(f"unknown ONNX Runtime optimization level {name!r}", f"use one of {LEVELS}")
    return {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[name]


def ort_status() -> tuple[bool, str]:
    try:
        import onnxruntime as ort
    except ImportError:
        return False, "onnxruntime is not installed"
    if "CPUExecutionProvider" not in ort.get_available_providers():
        return False, "ONNX Runtime has no CPU execution provider"
    return True, "ok"


def runtime_session_options(level: str) -> dict[str, Any]:
    """How the runtime should open the twin (recorded in the manifest).

    The graph is already optimized at ``level`` (portable fusions); it is opened at
    ``ORT_ENABLE_ALL`` so that ONNX Runtime adds the layout passes (NCHWc convolutions)
    that are specific to the CPU it runs on and that a portable twin cannot hold. Measured
    on the small preset (2-core AMD EPYC, ORT 1.32): VAE decode 330 -> 239 ms, UNet step
    213 -> 205 ms, end to end 5.74 -> 4.82 s (benchmarks/step_bench.py, bench). The fusions
    already applied are not redone; :func:`check_parity` opens the twin the same way.
    """
    return {
        "graph_optimization_level": "ORT_ENABLE_ALL",
        "optimized_offline_at": level,
        "providers": list(PROVIDERS),
        "execution_mode": "ORT_SEQUENTIAL",
    }


def build_twin(onnx_path: Path, out_dir: Path, level: str = DEFAULT_LEVEL) -> list[Path]:
    """Optimize ``onnx_path`` into ``out_dir/model.onnx`` (+ data); return the files written."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = _level(level)
    so.optimized_model_filepath = str(out_dir / TWIN_FILE)
    so.add_session_config_entry("session.optimized_model_external_initializers_file_name", TWIN_DATA)
    so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes",
                                str(EXTERNAL_MIN_BYTES))
    so.log_severity_level = 3
    try:
        ort.InferenceSession(str(onnx_path), sess_options=so, providers=list(PROVIDERS))
    except Exception as exc:  # noqa: BLE001 -- ORT raises its own types (Fail, InvalidGraph, ...)
        raise TwinBuildError(f"ONNX Runtime could not optimize {onnx_path} ({type(exc).__name__}: {exc})",
                             "re-export it with `sdxl-export export`, or try --ort-optimization basic") from None
    files = [p for p in (out_dir / TWIN_FILE, out_dir / TWIN_DATA) if p.is_file()]
    if not files or files[0].name != TWIN_FILE:
        raise TwinBuildError(f"ONNX Runtime wrote no optimized graph for {onnx_path}", "report this as a bug")
    return files


def open_twin(path: Path, session_options: dict[str, Any]) -> Any:
    """An InferenceSession over a twin, opened as the runtime would (used to check it)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, session_options["graph_optimization_level"])
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=so, providers=list(session_options["providers"]))


def reference_outputs(source: Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """The exported graph's outputs in ONNX Runtime on the CPU with every optimisation off: the
    reference a built engine (the twin, an OpenVINO IR) is checked against."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    return list(ort.InferenceSession(str(source), sess_options=so, providers=list(PROVIDERS)).run(None, feeds))


def check_parity(source: Path, twin: Path, spec: ComponentSpec, shape: tuple[int, int, int],
                 session_options: dict[str, Any]) -> dict[str, Any]:
    """Run source and twin graphs on the same inputs; raise if they differ beyond the spec's tolerance.

    Graph fusions reorder float arithmetic, so the twin is held to the same tolerance the
    export is held to against PyTorch.
    """

    t0 = time.perf_counter()
    feeds = spec.example_inputs(*shape, seed=1)
    ref = reference_outputs(source, feeds)
    got = open_twin(twin, session_options).run(None, feeds)
    errors: dict[str, float] = {}
    tol = spec.tolerance
    for name, a, b in zip(spec.output_names, ref, got):
        if a.shape != b.shape:
            raise TwinBuildError(f"{spec.name}: twin output {name} has shape {b.shape}, expected {a.shape}",
                                 "report this as a bug; use --ort-optimization basic meanwhile")
        errors[name] = float(np.max(np.abs(a.astype(np.float64) - b))) if a.size else 0.0
        if not np.allclose(b, a, atol=tol.atol, rtol=tol.rtol):
            raise TwinBuildError(
                f"{spec.name}: optimized graph output {name} differs from the export by {errors[name]:.2e} "
                f"(tolerance atol {tol.atol})", "rebuild with --ort-optimization basic",
            )
    return {"shape": {"batch": shape[0], "height": shape[1], "width": shape[2]}, "max_abs_error": errors,
            "seconds": round(time.perf_counter() - t0, 3)}
