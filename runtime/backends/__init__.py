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

from .base import ComponentRunner, RunnerClosedError
from .registry import BACKENDS, ComponentContext, backend_available, create_runner, resolve_backend

__all__ = ["BACKENDS", "ComponentContext", "ComponentRunner", "RunnerClosedError", "backend_available",
           "create_runner", "resolve_backend"]
