"""The engines the sampling loop drives: one package per backend behind one seam.

- :mod:`.base`: :class:`ComponentRunner`, the seam (lifecycle, name/dtype/shape checks on every call).
- :mod:`.registry`: backend name -> module, :func:`resolve_backend` (the one place ``auto`` is
  decided), :func:`create_runner`, :class:`ComponentContext`.
- :mod:`.onnxruntime`, :mod:`.openvino`, :mod:`.torch`: one module a backend.
- :mod:`.tensorrt`: the TensorRT runner, its execution contexts and its refitter.
- :mod:`.cuda`: the CUDA machinery the GPU backends share (lanes: streams + scratch; graphs).

Backend modules are imported lazily (by the registry), so a machine without TensorRT, CUDA or
OpenVINO never imports them; importing this package pulls in neither diffusers nor a backend.
"""

from __future__ import annotations

import importlib
from typing import Any

# Lazy, like sdxl_export.runtime: the registry (and the CLI's --backend help) needs no torch;
# ComponentRunner does.
_EXPORTS = {
    "ComponentRunner": "base", "RunnerClosedError": "base",
    "BACKENDS": "registry", "AUTO_RULE": "registry", "ComponentContext": "registry",
    "backend_available": "registry", "backend_help": "registry", "create_runner": "registry",
    "resolve_backend": "registry",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
