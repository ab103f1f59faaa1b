"""TensorRT availability, in one place: the builder, the engine store, the runtime, the
benchmarks and the tests all ask here whether TensorRT is usable and which version it is.

Why one module: "is TensorRT here" has three traps, and each copy of the check got a
different subset right. ``import tensorrt`` succeeds with only ``tensorrt-stubs``
installed (a namespace package with no ``Builder``); a real TensorRT older than
:data:`MIN_VERSION` imports fine but lacks the V2 memory APIs the runtime uses
(``device_memory_size_v2``, ``set_device_memory(ptr, size)``); and TensorRT without a
CUDA GPU can do nothing.

:func:`deserialize_engine` is the one place a plan is turned into an engine (build-time
check, build-time accuracy run and runtime load), so the rule for version-compatible
plans -- they carry their own lean runtime, which TensorRT runs only when the runtime is
told the plan is trusted (``engine_host_code_allowed``, as polygraphy's
``EngineFromBytes`` does) -- cannot be forgotten by one caller.

Type-checked with mypy against tensorrt-stubs (``tests/test_engines_typecheck.py``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .errors import BackendUnavailableError, StaleEngineError

if TYPE_CHECKING:  # pragma: no cover
    import tensorrt as trt

log = logging.getLogger(__name__)

#: Oldest TensorRT we run: the V2 device-memory APIs appeared in 10.1.
MIN_VERSION = (10, 1)

_INSTALL_HINT = "pip install 'tensorrt>=10.1' (NVIDIA GPU), or use --backend onnxruntime"


@dataclass(frozen=True)
class GpuInfo:
    """The GPU an engine is built for: TensorRT plans are specific to it."""

    name: str
    compute_capability: str  # "8.9"

    def to_dict(self) -> dict[str, str]:
        return {"name": self.name, "compute_capability": self.compute_capability}


def version_tuple(text: str) -> tuple[int, ...]:
    """``"10.3.0.26"`` -> ``(10, 3, 0, 26)``; non-digits in a part are dropped (``"10.0b"`` -> 10, 0)."""
    out = []
    for part in text.split("."):
        digits = "".join(ch for ch in part if ch.isdigit())
        out.append(int(digits) if digits else 0)
    return tuple(out)


def load_tensorrt() -> Any:
    """The real ``tensorrt`` module (>= :data:`MIN_VERSION`), or :class:`BackendUnavailableError`."""
    try:
        import tensorrt as trt_module
    except ImportError:
        raise BackendUnavailableError("TensorRT is not installed", _INSTALL_HINT) from None
    if not hasattr(trt_module, "Builder"):
        raise BackendUnavailableError("only TensorRT type stubs are installed, not TensorRT", _INSTALL_HINT)
    version = str(getattr(trt_module, "__version__", "0"))
    if version_tuple(version)[:2] < MIN_VERSION:
        raise BackendUnavailableError(
            f"TensorRT {version} is installed; sdxl-export needs >= {'.'.join(map(str, MIN_VERSION))} "
            "(the V2 device-memory APIs)", _INSTALL_HINT)
    return trt_module


def trt_version() -> str | None:
    """The usable TensorRT's version, or None."""
    try:
        return str(load_tensorrt().__version__)
    except BackendUnavailableError:
        return None


def gpu_info(device: int = 0) -> GpuInfo | None:
    """Name and compute capability of a CUDA device (None without a usable CUDA GPU)."""
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        major, minor = torch.cuda.get_device_capability(device)
        return GpuInfo(torch.cuda.get_device_name(device), f"{major}.{minor}")
    except Exception:  # noqa: BLE001 -- a broken driver is "no GPU" for our purposes
        return None


def trt_status() -> tuple[bool, str]:
    """(usable, what): ``(True, "TensorRT 10.x")`` or ``(False, why not)``."""
    try:
        trt_module = load_tensorrt()
    except BackendUnavailableError as exc:
        return False, exc.message
    if gpu_info() is None:
        return False, "no CUDA GPU is visible (torch.cuda.is_available() is False)"
    return True, f"TensorRT {trt_module.__version__}"


def deserialize_engine(data: Any, *, version_compatible: bool, what: str) -> tuple[trt.Runtime, trt.ICudaEngine]:
    """``(runtime, engine)`` for a serialized plan (bytes, a memoryview or TensorRT's IHostMemory).

    The runtime is returned because the engine must not outlive it. A version-compatible
    plan embeds TensorRT's lean runtime, which TensorRT loads only when the runtime allows
    host code; our own plans are trusted (the manifest hash was checked before). Raises
    :class:`StaleEngineError` when TensorRT refuses the plan (it returns None and logs why).
    """
    load_tensorrt()
    import tensorrt as trt

    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    if version_compatible:
        runtime.engine_host_code_allowed = True
    engine: trt.ICudaEngine | None = runtime.deserialize_cuda_engine(data)
    if engine is None:
        raise StaleEngineError(f"TensorRT {trt.__version__} could not deserialize {what}",
                               "rebuild it with `sdxl-export build` on this machine (rerun with -v for TensorRT's log)")
    return runtime, engine


__all__ = ["MIN_VERSION", "GpuInfo", "deserialize_engine", "gpu_info", "load_tensorrt", "trt_status", "trt_version",
           "version_tuple"]
