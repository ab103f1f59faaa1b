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
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import SDXLExportError
from ..specs import ComponentSpec

log = logging.getLogger(__name__)

IR_FILE = "model.xml"
IR_WEIGHTS = "model.bin"
CACHE_DIR = "cache"
DEVICE = "CPU"
#: /proc/cpuinfo flags recorded with an engine (what decides the kernels OpenVINO picks).
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "avx512_fp16", "amx_bf16", "amx_int8",
             "amx_tile", "amx_fp16")
#: our precision name -> OpenVINO's INFERENCE_PRECISION_HINT value
HINTS = {"fp32": "f32", "bf16": "bf16"}
#: bf16 runs are held to this relative error per component at build time (measured ~2.5% on a
#: small UNet step; the image-level claim is the fidelity gate, runtime/fidelity.py).
BF16_REL_TOL = 0.1


class OpenVinoBuildError(SDXLExportError):
    """OpenVINO failed to convert or compile a graph, or its output disagrees with the export."""


def ov_status() -> tuple[bool, str]:
    try:
        import openvino as ov
    except ImportError:
        return False, "openvino is not installed (pip install openvino, or the [openvino] extra)"
    try:
        if DEVICE not in ov.Core().available_devices:
            return False, "OpenVINO has no CPU device"
    except RuntimeError as exc:  # pragma: no cover - plugin load failures
        return False, f"OpenVINO cannot start its CPU plugin ({exc})"
    return True, f"openvino {ov.__version__}"


def ov_version() -> str:
    import openvino as ov

    return str(ov.__version__)


def cpu_flags() -> list[str]:
    """The :data:`CPU_FLAGS` this CPU has (from /proc/cpuinfo; empty where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    have: set[str] = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            have.update(line.split(":", 1)[1].split())
            break
    return [f for f in CPU_FLAGS if f in have]


def native_bf16() -> tuple[bool, str]:
    """Whether OpenVINO's CPU plugin computes in bf16 natively here, and what says so."""
    import openvino as ov

    caps = list(ov.Core().get_property(DEVICE, "OPTIMIZATION_CAPABILITIES"))
    flags = [f for f in cpu_flags() if "bf16" in f]
    if "BF16" in caps:
        return True, f"OpenVINO CPU capabilities {caps}; CPU flags {flags or 'n/a'}"
    return False, f"this CPU has no native bf16 (no AVX512_BF16/AMX; OpenVINO capabilities {caps})"


def ov_target() -> dict[str, Any]:
    """What an OpenVINO engine is built for (recorded; see :func:`ov_incompatible`)."""
    return {"openvino": ov_version(), "machine": platform.machine(), "system": platform.system(),
            "cpu_flags": cpu_flags(), "bf16": native_bf16()[0]}


def ov_incompatible(target: dict[str, Any], precision: str, here: dict[str, Any] | None = None) -> str | None:
    """Why an engine built for ``target`` must not load here (None when it may).

    The OpenVINO version and machine must match exactly (an IR from another OpenVINO is not
    promised to convert the same way, and the manifest claims what built it). The CPU flags
    must match too: a bf16 engine's fidelity was gated on a CPU with native bf16, and an fp32
    engine's parity on kernels chosen for these flags; another CPU rebuilds (cheap) rather
    than running an unchecked combination.
    """
    here = ov_target() if here is None else here
    for key in ("openvino", "machine", "system"):
        if target.get(key) != here.get(key):
            return f"it was built with {key} {target.get(key)}, this machine has {here.get(key)}"
    if list(target.get("cpu_flags", [])) != list(here.get("cpu_flags", [])):
        return (f"it was built on a CPU with flags {target.get('cpu_flags')}, this CPU has "
                f"{here.get('cpu_flags')}")
    if precision == "bf16" and not here.get("bf16"):
        return "it runs bf16 and this CPU has no native bf16"
    return None


def compile_config(precision: str, cache_dir: Path | None, threads: int = 0) -> dict[str, Any]:
    """Properties for ``Core.compile_model`` (recorded as the engine's session options).

    ``PERFORMANCE_HINT=LATENCY``: one stream using every core for one request -- the
    pipeline runs one component call at a time per request; throughput streams would
    split the cores and slow each call.
    """
    cfg: dict[str, Any] = {"INFERENCE_PRECISION_HINT": HINTS[precision], "PERFORMANCE_HINT": "LATENCY"}
    if cache_dir is not None:
        cfg["CACHE_DIR"] = str(cache_dir)
    if threads:
        cfg["INFERENCE_NUM_THREADS"] = int(threads)
    return cfg


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
