"""sdxl-export: a deployment compiler for Stable Diffusion XL.

Data flows one way: a model (``sdxl_export.models``) is exported to ONNX plus a
manifest (``sdxl_export.export``), built into engines (``sdxl_export.engines``:
TensorRT plans, or ONNX Runtime sessions where there is no TensorRT), and run by a
thin sampler (``sdxl_export.runtime``) that reads only those artifacts.

The component specs in ``sdxl_export.specs`` are the single source of truth for
tensor names, dtypes and symbolic dims across all three stages.
"""

from __future__ import annotations

import logging

__version__ = "0.1.0"

#: Version of the on-disk artifact format (export manifest + engine manifest).
#: A reader refuses a folder written with a different major version.
ARTIFACT_FORMAT_VERSION = "1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = ["ARTIFACT_FORMAT_VERSION", "__version__"]
