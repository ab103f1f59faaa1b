"""Serving: ``sdxl-export serve`` — OpenAI, AUTOMATIC1111 and native HTTP APIs over the runtime.

Embedded (one process, uvicorn) or on Ray Serve (``--ray``; the same app, one replica per
GPU). For your own Ray Serve config::

    serve run sdxl_export.serve:app artifacts=./sdxl-artifacts max_batch_size=4

or in Python::

    from sdxl_export.serve import ServeConfig, build_ray_app, embedded_app
    app, service = embedded_app(ServeConfig(artifacts="sdxl-artifacts"))   # an ASGI app
    ray_app = build_ray_app(ServeConfig(artifacts="sdxl-artifacts"), replicas=2)

The server talks to the runtime's public API only (``SDXLPipeline``). Names are imported
lazily: ``import sdxl_export.serve`` needs neither FastAPI nor Ray.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ServeConfig": ("config", "ServeConfig"),
    "ImageService": ("service", "ImageService"),
    "build_app": ("app", "build_app"),
    "embedded_app": ("server", "embedded_app"),
    "serve_embedded": ("server", "serve_embedded"),
    "build_ray_app": ("ray_app", "build"),
    "SDXLDeployment": ("ray_app", "SDXLDeployment"),
    "app": ("ray_app", "app"),
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        mod, attr = _EXPORTS[name]
        return getattr(importlib.import_module(f"{__name__}.{mod}"), attr)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
