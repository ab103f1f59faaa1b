"""Resource limits at the server's edge: nothing a client sends may exhaust the replica.

* Pixels: every output image, on every backend (a dynamic export or the torch backend
  accepts any size), and every decoded input image (init images, masks, control images)
  is capped at ``--max-pixels`` (default: the largest size the engines serve). An upload's
  size is read from its header and refused *before* it is decoded
  (:func:`~sdxl_export.runtime.img2img.read_image` with ``max_pixels``), so a 100 KB PNG
  declaring 900 megapixels costs nothing.
* Numbers: floats are finite and bounded like steps and sizes (:data:`FLOAT_BOUNDS`).
* ``--size-policy nearest``: a size the engines do not serve runs at the nearest served one
  (closest aspect ratio, then closest area), and the response says so.

The cap for the request being parsed travels in :data:`MAX_IMAGE_PIXELS` (a context variable
set around parsing), so every API module and feature that decodes an image through
:func:`~sdxl_export.serve.common.decode_image` honours it without a new argument.
"""

from __future__ import annotations

import contextvars
import math
from collections.abc import Sequence
from typing import Any

from ..errors import InvalidRequestError, UnsupportedShapeError

#: Pixels an uploaded image may have while a request is parsed (set by the app per request);
#: the default bounds library use of ``decode_image`` outside a server.
MAX_IMAGE_PIXELS: contextvars.ContextVar[int] = contextvars.ContextVar("max_image_pixels", default=4096 * 4096)

#: Pipeline float arguments -> inclusive (low, high). Guidance beyond 100 only overflows;
#: aesthetic scores are conditioning values SDXL's refiner saw between 0 and 10.
MAX_GUIDANCE = 100.0
FLOAT_BOUNDS: dict[str, tuple[float, float]] = {
    "guidance_scale": (0.0, MAX_GUIDANCE),
    "aesthetic_score": (-100.0, 100.0),
    "negative_aesthetic_score": (-100.0, 100.0),
    "strength": (0.0, 1.0),
    "denoising_end": (0.0, 1.0),
}

SIZE_POLICIES = ("exact", "nearest")


def check_floats(kwargs: dict[str, Any]) -> None:
    """Every float argument of a request finite and within :data:`FLOAT_BOUNDS`."""
    for key, (lo, hi) in FLOAT_BOUNDS.items():
        value = kwargs.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or not lo <= value <= hi:
            err = InvalidRequestError(f"'{key}' must be a finite number in [{lo:g}, {hi:g}], got {value!r}",
                                      f"pass '{key}' in [{lo:g}, {hi:g}]")
            err.param = key  # type: ignore[attr-defined]
            raise err


def fit_size(height: int, width: int, served: Sequence[tuple[int, int]] | None, *, max_pixels: int,
             policy: str, size_list: str) -> tuple[int, int]:
    """The size a request runs at: itself when served (or any size is), the nearest served size
    under ``policy="nearest"``; over ``max_pixels`` it is refused (or snapped, when nearest)."""
    if served and (height, width) not in served and policy == "nearest":
        return nearest_served(height, width, served)
    if height * width > max_pixels:
        raise UnsupportedShapeError(
            f"size {width}x{height} (width x height) is {height * width} pixels, over this server's cap of "
            f"{max_pixels}", f"ask for at most {max_pixels} pixels ({size_list})")
    return height, width


def nearest_served(height: int, width: int, served: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The served (h, w) closest in aspect ratio (log scale), then in area."""
    def key(hw: tuple[int, int]) -> tuple[float, float]:
        h, w = hw
        return (abs(math.log((h / w) / (height / width))), abs(math.log((h * w) / (height * width))))

    return min(served, key=key)
