"""Backend registry: name -> factory that opens one component from an artifact folder.

Each backend module exposes ``available() -> tuple[bool, str]`` (and why not) and
``create(ctx: ComponentContext) -> ComponentRunner``. Modules are imported lazily, so
a machine without TensorRT or CUDA never imports them. :func:`resolve_backend` is the one
place ``backend="auto"`` is decided (log line + ``pipeline.backend``): TensorRT where
TensorRT engines were built and TensorRT is usable, else OpenVINO where OpenVINO engines
were built, OpenVINO is installed and there is no CUDA GPU, else ONNX Runtime. ``torch`` is
never picked by ``auto``: it is the eager reference, chosen by name.
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ...errors import BackendUnavailableError, InvalidRequestError
from ...specs import ComponentSpec

if TYPE_CHECKING:
    from .base import ComponentRunner

log = logging.getLogger(__name__)

#: name -> module implementing available()/create().
BACKENDS: dict[str, str] = {
    "tensorrt": "sdxl_export.runtime.backends.tensorrt",
    "onnxruntime": "sdxl_export.runtime.backends.onnxruntime",
    "openvino": "sdxl_export.runtime.backends.openvino",
    "torch": "sdxl_export.runtime.backends.torch",
}

#: What ``--backend auto`` means, for every command's help (the rule :func:`resolve_backend` applies).
AUTO_RULE = ("auto: TensorRT engines where built and usable, else OpenVINO engines where built on a machine "
             "without a CUDA GPU, else ONNX Runtime; torch only by name")


def backend_help() -> str:
    """The ``--backend`` help text: every backend name and what ``auto`` picks."""
    return f"auto, {', '.join(BACKENDS)} ({AUTO_RULE}; default auto)"


@dataclass
class ComponentContext:
    """Everything a backend needs to open one component (read from the artifacts)."""

    artifacts: Path
    name: str
    spec: ComponentSpec
    export_entry: dict[str, Any]  # the component's record in the export manifest
    engine_entry: Any | None = None  # engines.store.EngineEntry when an engine was built
    device: str = "cpu"  # "cpu" | "cuda" | "cuda:N"
    options: dict[str, Any] = field(default_factory=dict)


def _module(name: str):
    if name not in BACKENDS:
        raise InvalidRequestError(
            f"unknown backend {name!r}", f"use one of: auto, {', '.join(BACKENDS)}"
        )
    try:
        return importlib.import_module(BACKENDS[name])
    except ModuleNotFoundError as exc:
        if exc.name == BACKENDS[name]:
            return None
        raise


def backend_available(name: str) -> tuple[bool, str]:
    mod = _module(name)
    if mod is None:
        return False, f"the {name} backend is not part of this build"
    ok, why = mod.available()
    return bool(ok), str(why)


def resolve_backend(name: str, store: Any | None = None) -> str:
    """The backend to run with: ``name`` checked, or ``"auto"`` decided from ``store``.

    ``store`` is the artifact folder's :class:`~sdxl_export.engines.store.EngineStore` (None
    without ``engines/``). ``auto``: TensorRT when the store holds TensorRT engines and
    TensorRT is usable here (else a warning saying why not), then OpenVINO when it holds
    OpenVINO engines (none of them int8: those are opt-in) on a machine without a CUDA GPU,
    otherwise ONNX Runtime.
    """
    if name == "auto":
        entries = getattr(store, "entries", None) or {}
        if any(getattr(e, "backend", None) == "tensorrt" for e in entries.values()):
            ok, why = backend_available("tensorrt")
            if ok:
                log.info("backend auto -> tensorrt (TensorRT engines built and TensorRT usable)")
                return "tensorrt"
            log.warning("TensorRT engines are built but not usable here (%s): using onnxruntime", why)
        ov_entries = getattr(store, "openvino_entries", None) or {}
        int8 = sorted(n for n, e in ov_entries.items() if getattr(e, "precision", None) == "int8")
        if int8:
            # int8 is opt-in: no image-level gate has passed it here (see engines/ov_int8.py).
            log.info("OpenVINO int8 engines are built (%s) but `auto` does not pick them: pass --backend openvino "
                     "to run them", ", ".join(int8))
        elif ov_entries:
            import torch

            ok, why = backend_available("openvino")
            if ok and not torch.cuda.is_available():
                log.info("backend auto -> openvino (OpenVINO engines built, CPU machine)")
                return "openvino"
            log.warning("OpenVINO engines are built but not used here (%s): using onnxruntime",
                        why if not ok else "a CUDA GPU is present")
        ok, why = backend_available("onnxruntime")
        if not ok:
            raise BackendUnavailableError(f"no backend is available (onnxruntime: {why})", "pip install onnxruntime")
        log.info("backend auto -> onnxruntime")
        return "onnxruntime"
    ok, why = backend_available(name)
    if not ok:
        raise BackendUnavailableError(f"backend {name!r} is not available: {why}",
                                      "pick another --backend, or install what it needs (see README)")
    return name


def create_runner(backend: str, ctx: ComponentContext) -> ComponentRunner:
    mod = _module(backend)
    if mod is None:
        raise BackendUnavailableError(f"backend {backend!r} is not part of this build", "use --backend onnxruntime")
    return mod.create(ctx)
