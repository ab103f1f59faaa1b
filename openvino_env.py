"""OpenVINO on this machine, in one place: whether it is usable, what an engine is built for and may
load on, and how a component is compiled (the runtime policy the build and the runtime share).

Like :mod:`sdxl_export.tensorrt_env`, it sits below both ``engines/`` (which builds and checks IR)
and ``runtime/backends/openvino`` (which loads it): the build compiles each engine once with
exactly the configuration the runtime will use (:func:`compile_config`), so that its parity check
and the compile cache it fills are those of the runtime, and ``engines/`` never imports the runtime.

Precision: OpenVINO's CPU plugin picks bf16 *by default* on a CPU that has it, so the runtime
always sets ``INFERENCE_PRECISION_HINT`` explicitly (:data:`HINTS`). An engine records the
OpenVINO version, the machine and the CPU flags that decide its kernels (:func:`ov_target`);
:func:`ov_incompatible` says why one must not load here.
"""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Any

CACHE_DIR = "cache"
DEVICE = "CPU"
#: /proc/cpuinfo flags recorded with an engine (what decides the kernels OpenVINO picks).
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "avx512_fp16", "amx_bf16", "amx_int8",
             "amx_tile", "amx_fp16")
#: our precision name -> OpenVINO's INFERENCE_PRECISION_HINT value
HINTS = {"fp32": "f32", "bf16": "bf16", "int8": "f32"}  # int8: quantized ops int8, the rest fp32


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
