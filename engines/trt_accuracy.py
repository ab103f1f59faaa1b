"""Build-time accuracy of a TensorRT plan: every profile run once against the ONNX in ONNX Runtime.

Why: a plan can build and deserialize and still be wrong -- an fp16 layer that overflows
(SDXL's VAE), a tactic with a bug, a profile whose kernels were never exercised. The ONNX
Runtime twin was always compared with the export at build time; TensorRT plans are held
to the same rule, per profile, because each profile has its own kernels.

How: for each profile, one *served* shape (its ``opt`` bucket, else its smallest bucket,
at its smallest batch) -- :func:`check_shapes`; the plan runs it through polygraphy's
``TrtRunner`` (which selects the profile and owns its buffers), the source ONNX through
ONNX Runtime's CPU provider with graph optimizations off (the most literal reading of the
graph, as the twin parity check does); :func:`compare_outputs` holds the difference to the
precision's tolerance with polygraphy's element-wise rule ``|got - ref| <= atol + rtol *
|ref|`` (the tolerances are ours: polygraphy's defaults, 1e-5, are for fp32 without TF32).
Any NaN/Inf fails, and for a VAE the error says so and names ``--vae-precision fp32``.

The result goes into the engine manifest (``validation.accuracy``). The comparison and
the shape choice are plain Python, tested on CPU; :func:`check_engine` needs TensorRT.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import SDXLExportError
from ..specs import ComponentSpec, Tolerance
from .planner import PlannedProfile

log = logging.getLogger(__name__)

#: Per effective precision: what a correct plan may differ from fp32 ONNX Runtime by.
#: fp32 plans run TF32 (10-bit mantissa) unless built otherwise; fp16 and bf16 are coarser.
PRECISION_TOLERANCE: dict[str, Tolerance] = {
    "fp32": Tolerance(atol=1e-2, rtol=1e-2),
    "fp16": Tolerance(atol=5e-2, rtol=5e-2),
    "bf16": Tolerance(atol=1e-1, rtol=1e-1),
}

VAE_KINDS = ("vae_decoder", "vae_encoder")


class EngineAccuracyError(SDXLExportError):
    """A freshly built TensorRT plan disagrees with its ONNX beyond its precision's tolerance."""


def tolerance_for(spec: ComponentSpec, precision: str) -> Tolerance:
    """The looser of the component's export tolerance and the precision's."""
    p = PRECISION_TOLERANCE[precision]
    return Tolerance(atol=max(spec.tolerance.atol, p.atol), rtol=max(spec.tolerance.rtol, p.rtol))


def check_shapes(profiles: Sequence[PlannedProfile], spec: ComponentSpec) -> list[tuple[int, int, int, int]]:
    """``(profile, batch, height, width)`` per profile: a shape the profile was planned to serve."""
    out = []
    for i, p in enumerate(profiles):
        if not p.buckets or not p.batch_sizes:
            raise EngineAccuracyError(f"{spec.name}: profile {i} serves no bucket or batch size",
                                      "report this as a bug (the planner made an empty profile)")
        bucket = p.opt_bucket if p.opt_bucket in p.buckets else min(p.buckets, key=lambda b: b.height * b.width)
        batch = min(p.batch_sizes)
        if not p.covers(spec.input_shapes(batch, bucket.height, bucket.width)):
            raise EngineAccuracyError(f"{spec.name}: profile {i} does not cover its own bucket {bucket} at batch "
                                      f"{batch}", "report this as a bug (planner and spec disagree)")
        out.append((i, batch, bucket.height, bucket.width))
    return out


def compare_outputs(spec: ComponentSpec, precision: str, ref: Mapping[str, np.ndarray],
                    got: Mapping[str, np.ndarray], *, where: str = "") -> dict[str, float]:
    """Max abs error per output; :class:`EngineAccuracyError` on NaN/Inf or beyond tolerance."""
    tol = tolerance_for(spec, precision)
    is_vae = spec.kind in VAE_KINDS
    errors: dict[str, float] = {}
    for name in spec.output_names:
        if name not in got:
            raise EngineAccuracyError(f"{spec.name}: the TensorRT plan has no output {name!r}",
                                      "rebuild from this export with `sdxl-export build`")
        a = np.asarray(ref[name], dtype=np.float64)
        b = np.asarray(got[name], dtype=np.float64)
        if a.shape != b.shape:
            raise EngineAccuracyError(f"{spec.name}{where}: TensorRT output {name} has shape {b.shape}, "
                                      f"ONNX Runtime {a.shape}", "report this as a bug")
        if not np.isfinite(b).all():
            hint = ("rebuild with --vae-precision fp32 (SDXL's VAE overflows in fp16)" if is_vae
                    else "rebuild this component with --precision fp32")
            raise EngineAccuracyError(f"{spec.name}{where}: the {precision} TensorRT plan produced NaN/Inf in "
                                      f"{name}", hint)
        diff = np.abs(a - b)
        errors[name] = float(diff.max()) if diff.size else 0.0
        bound = tol.atol + tol.rtol * np.abs(a)
        if diff.size and not bool((diff <= bound).all()):
            worst = float((diff - bound).max())
            raise EngineAccuracyError(
                f"{spec.name}{where}: the {precision} TensorRT plan differs from the ONNX by {errors[name]:.2e} "
                f"in {name} (tolerance atol {tol.atol:g} + rtol {tol.rtol:g} x |ref|, exceeded by {worst:.2e})",
                "rebuild with --precision fp32 (and --vae-precision fp32), or report the layer "
                "(`polygraphy run --trt --onnxrt` on the ONNX finds it)")
    return errors


def _reference_session(onnx_path: Path) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    return ort.InferenceSession(str(onnx_path), sess_options=so, providers=["CPUExecutionProvider"])


def check_engine(engine: Any, onnx_path: Path, spec: ComponentSpec, profiles: Sequence[PlannedProfile],
                 precision: str) -> dict[str, Any]:
    """Run ``engine`` (a deserialized ``trt.ICudaEngine``) once per profile against the ONNX.

    Returns what the manifest records; raises :class:`EngineAccuracyError` (needs TensorRT
    and a GPU).
    """
    from polygraphy.backend.trt import TrtRunner

    t0 = time.perf_counter()
    session = _reference_session(onnx_path)
    results = []
    for index, batch, height, width in check_shapes(profiles, spec):
        feeds = spec.example_inputs(batch, height, width, seed=1)
        ref = dict(zip(spec.output_names, session.run(list(spec.output_names), feeds)))
        with TrtRunner(engine, optimization_profile=index) as runner:
            got = {k: np.asarray(v) for k, v in runner.infer(feeds).items()}
        where = f" (profile {index}, batch {batch}, {height}x{width})"
        errors = compare_outputs(spec, precision, ref, got, where=where)
        log.info("%s%s: TensorRT %s vs ONNX Runtime max abs error %s", spec.name, where, precision,
                 ", ".join(f"{k} {v:.1e}" for k, v in errors.items()))
        results.append({"profile": index, "batch": batch, "height": height, "width": width,
                        "max_abs_error": errors})
    tol = tolerance_for(spec, precision)
    return {"reference": "onnxruntime CPU, optimizations off", "precision": precision,
            "tolerance": {"atol": tol.atol, "rtol": tol.rtol}, "profiles": results,
            "seconds": round(time.perf_counter() - t0, 2)}


__all__ = [
    "PRECISION_TOLERANCE",
    "EngineAccuracyError",
    "check_engine",
    "check_shapes",
    "compare_outputs",
    "tolerance_for",
]
