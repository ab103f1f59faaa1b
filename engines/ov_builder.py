"""OpenVINO engines: the CPU fast path, built beside the ONNX Runtime twin.

For each component OpenVINO converts the exported ONNX (``openvino.convert_model``) and we
save its IR (``model.xml`` + ``model.bin``, ``openvino.save_model`` with
``compress_to_fp16=False`` -- the default would store fp16 weights and break the fp32
parity contract) into an atomically replaced folder, ``engines/openvino/<component>/``.
The build then compiles it once for this CPU with a ``CACHE_DIR`` (``engines/openvino/cache``),
so the runtime's first ``compile_model`` loads the cached blob instead of recompiling.
The cache is not part of an engine's hashed files: OpenVINO keys and checks its own
entries (version, device, properties), so a foreign or stale cache entry is ignored, not
trusted.

Precision: OpenVINO's CPU plugin picks bf16 *by default* on a CPU that has it (this
EPYC reports ``INFERENCE_PRECISION_HINT = bfloat16`` out of the box), so the runtime
always sets the hint explicitly: ``f32`` for fp32 engines (the exact path) and ``bf16``
where ``--fp16``/``--bf16`` asked for reduced precision and the CPU has native bf16
(``BF16`` in the plugin's ``OPTIMIZATION_CAPABILITIES``: AVX512_BF16 or AMX). Where it has
none the build says so and records fp32. The VAE follows ``--vae-precision`` (fp32 by
default), as on the GPU.

The target recorded with each engine is the OpenVINO version, the machine and the CPU's
flags that matter to it (``/proc/cpuinfo``: avx2, avx512f, avx512_bf16, avx512_vnni,
amx_*); see :func:`ov_incompatible` for what must match before loading.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import SDXLExportError
from ..openvino_env import (  # noqa: F401 -- re-exported: the build's callers use them from here
    CACHE_DIR,
    DEVICE,
    compile_config,
    cpu_flags,
    native_bf16,
    ov_incompatible,
    ov_status,
    ov_target,
    ov_version,
)
from ..specs import ComponentSpec

log = logging.getLogger(__name__)

IR_FILE = "model.xml"
IR_WEIGHTS = "model.bin"
#: bf16 runs are held to this relative error per component at build time (measured ~2.5% on a
#: small UNet step; the image-level claim is the fidelity gate, runtime/fidelity.py).
BF16_REL_TOL = 0.1


class OpenVinoBuildError(SDXLExportError):
    """OpenVINO failed to convert or compile a graph, or its output disagrees with the export."""


def build_ir(onnx_path: Path, out_dir: Path) -> list[Path]:
    """Convert ``onnx_path`` to ``out_dir/model.xml`` + ``model.bin`` (fp32 weights); return the files."""
    import openvino as ov

    try:
        model = ov.convert_model(str(onnx_path))
        ov.save_model(model, str(out_dir / IR_FILE), compress_to_fp16=False)
    except Exception as exc:  # noqa: BLE001 -- OpenVINO raises its own types (OpConversionFailure, ...)
        raise OpenVinoBuildError(f"OpenVINO could not convert {onnx_path} ({type(exc).__name__}: "
                                 f"{str(exc)[:300]})", "re-export it with `sdxl-export export`") from None
    files = [out_dir / IR_FILE, out_dir / IR_WEIGHTS]
    if not all(p.is_file() for p in files):
        raise OpenVinoBuildError(f"OpenVINO wrote no IR for {onnx_path}", "report this as a bug")
    return files


def compile_ir(xml: Path, config: dict[str, Any]) -> Any:
    import openvino as ov

    try:
        return ov.Core().compile_model(str(xml), DEVICE, config)
    except Exception as exc:  # noqa: BLE001
        raise OpenVinoBuildError(f"OpenVINO could not compile {xml} ({type(exc).__name__}: {str(exc)[:300]})",
                                 "rebuild it with `sdxl-export build --backend openvino`") from None


def check_parity(source: Path, xml: Path, spec: ComponentSpec, shape: tuple[int, int, int], precision: str,
                 config: dict[str, Any]) -> dict[str, Any]:
    """Run the export (ONNX Runtime, no optimization) and the compiled IR on the same inputs.

    fp32 is held to the spec's tolerance (the export's own contract against PyTorch); bf16 to
    :data:`BF16_REL_TOL` relative to the output's scale, and never NaN. Compiling here also
    fills the cache dir for the runtime.
    """
    from .ort_builder import reference_outputs

    t0 = time.perf_counter()
    feeds = spec.example_inputs(*shape, seed=1)
    ref = reference_outputs(source, feeds)
    compiled = compile_ir(xml, config)
    request = compiled.create_infer_request()
    result = request.infer(feeds)
    got = [np.asarray(result[compiled.output(name)]) for name in spec.output_names]
    errors: dict[str, float] = {}
    tol = spec.tolerance
    for name, a, b in zip(spec.output_names, ref, got):
        if a.shape != b.shape:
            raise OpenVinoBuildError(f"{spec.name}: OpenVINO output {name} has shape {b.shape}, expected {a.shape}",
                                     "report this as a bug; use --backend onnxruntime meanwhile")
        if not np.all(np.isfinite(b)):
            raise OpenVinoBuildError(f"{spec.name}: OpenVINO ({precision}) output {name} is not finite",
                                     "build fp32 (without --fp16/--bf16)")
        err = float(np.max(np.abs(a.astype(np.float64) - b))) if a.size else 0.0
        errors[name] = err
        scale = float(np.max(np.abs(a))) if a.size else 0.0
        ok = np.allclose(b, a, atol=tol.atol, rtol=tol.rtol) if precision == "fp32" \
            else err <= BF16_REL_TOL * max(scale, 1e-6)
        if not ok:
            raise OpenVinoBuildError(
                f"{spec.name}: OpenVINO ({precision}) output {name} differs from the export by {err:.2e} "
                f"(output scale {scale:.2e})", "build with --backend onnxruntime, or fp32")
    return {"shape": {"batch": shape[0], "height": shape[1], "width": shape[2]}, "max_abs_error": errors,
            "precision": precision, "seconds": round(time.perf_counter() - t0, 3)}
