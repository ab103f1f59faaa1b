"""Engines: optimization-profile planning, TensorRT plans (or the ONNX Runtime twin), the engine store.

``planner``      which shapes each engine serves (static / bucketed / dynamic profiles)
``trt_builder``  one TensorRT plan per component through Polygraphy
``ort_builder``  the ONNX Runtime twin where TensorRT cannot run
``build``        ``sdxl-export build``: export if needed, then build incrementally
``store``        ``engines/manifest.json`` and the checks made before loading (runtime API)

Importing this package pulls in neither TensorRT nor torch.
"""

from .store import EngineEntry, EngineStore, GpuInfo, load_engine_store, select_profile

__all__ = ["EngineEntry", "EngineStore", "GpuInfo", "load_engine_store", "select_profile"]
