"""The runtime: base+refiner sampling over an artifact folder, behind one backend seam.

    from sdxl_export.runtime import SDXLPipeline
    pipe = SDXLPipeline.from_artifacts("sdxl-artifacts", backend="auto")
    out = pipe("a lighthouse at dawn", seed=0)
    out.images[0].save("out.png"); print(out.timings.summary_lines())

Two sides: the sampling core here (:mod:`.pipeline`, :mod:`.schedulers`, :mod:`.prompts`,
:mod:`.request`, :mod:`.img2img`) and the engines it drives in :mod:`.backends` (a module or
package per backend, the CUDA machinery in :mod:`.backends.cuda`). Names are imported lazily, so
``import sdxl_export.runtime.backends.base`` (what every backend does) pulls in neither diffusers
nor the pipeline.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "SDXLPipeline": "pipeline",
    "SDXLPipelineOutput": "pipeline",
    "StageTimings": "timing",
    "scheduler_names": "schedulers",
    "read_artifacts": "artifact_reader",
    "read_image": "img2img",
    "ComponentRunner": "backends.base",
    "resolve_backend": "backends",
    "find_upscaler": "hires",
    "UPSCALERS": "hires",
    "BACKENDS": "backends",
    "backend_help": "backends",
    "available_controlnets": "controlnet",
    "control_map": "control_preprocess",
    "detect_control": "control_preprocess",
    "preprocessor_list": "control_preprocess",
    "UNetCalibration": "calibration",
    "calibration_prompts": "calibration",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
