"""Control-map preprocessors that need no model weights, with the A1111 ControlNet extension's meaning.

``canny`` (OpenCV ``Canny(img, threshold_a, threshold_b)``, A1111's low/high thresholds, default
100/200), ``invert`` (255 - image: white-background line art to a map), ``tile_resample``
(downsample by ``threshold_a``, A1111's "Down Sampling Rate", default 1.0) and ``none`` (the
image already is a control map). Preprocessors that need weights (depth, pose, lineart, ...)
are a named error listing what we have.

Sizes as the extension does them: the detector runs with the image's short side resized to
``processor_res`` (``pixel_perfect``: the resolution the target size implies for the
``resize_mode``), and the detected map is brought to the target size by ``resize_mode``:
"Just Resize" (stretch), "Crop and Resize" (cover, centre crop) or "Resize and Fill" (fit,
centred, the rest filled with the map's median border colour).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image

from ..errors import InvalidRequestError

#: module name -> canonical (A1111 names and ours)
MODULES = {"none": "none", "canny": "canny", "invert": "invert",
           "invert (from white bg & black line)": "invert", "tile_resample": "tile_resample"}
#: A1111 preprocessors we know but cannot run (they need model weights).
NEED_WEIGHTS = ("depth_midas", "depth_zoe", "depth_leres", "depth_anything", "openpose", "openpose_full",
                "dw_openpose_full", "lineart_realistic", "lineart_anime", "lineart_coarse", "softedge_hed",
                "softedge_pidinet", "scribble_hed", "seg_ofade20k", "normal_bae", "mlsd", "shuffle",
                "reference_only", "ip-adapter_clip_sdxl", "tile_colorfix", "blur_gaussian", "recolor_luminance")
#: resize_mode: A1111 names, legacy names and the 0/1/2 old clients send
RESIZE_MODES = {"just resize": "just_resize", "resize": "just_resize", "0": "just_resize",
                "crop and resize": "crop", "inner fit": "crop", "inner_fit": "crop", "1": "crop",
                "resize and fill": "fill", "outer fit": "fill", "outer_fit": "fill", "2": "fill"}


class UnknownPreprocessorError(InvalidRequestError):
    """A preprocessor (module) we do not have, or one that needs model weights."""


#: A1111's processor-resolution slider tops out at 2048. Larger only costs memory: a 64x64 image at
#: 100000 would be resized to a 30 GB array before any check of the request's size could help.
MAX_PROCESSOR_RES = 2048


class PreprocessorArgumentError(InvalidRequestError):
    """A preprocessor argument out of its range (``param`` names it: processor_res, threshold_a/_b)."""

    def __init__(self, param: str, message: str, hint: str):
        super().__init__(message, hint)
        self.param = param


def _threshold_value(name: str, value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(float(value)):
        raise PreprocessorArgumentError(name, f"{name} must be a finite number, got {value!r}",
                                        f"send a number for {name} (-1: the preprocessor's default)")
    return float(value)


def module_list() -> list[str]:
    return ["none", "canny", "invert", "tile_resample"]


def canonical_module(module: Any) -> str:
    name = str(module if module is not None else "none").strip().lower()
    if name in MODULES:
        return MODULES[name]
    if name in NEED_WEIGHTS or any(name.startswith(p.split("_")[0] + "_") for p in NEED_WEIGHTS):
        raise UnknownPreprocessorError(
            f"preprocessor {module!r} needs model weights, which this server does not load",
            f"send a ready control map with module \"none\", or use one of: {', '.join(module_list())}")
    raise UnknownPreprocessorError(f"unknown preprocessor {module!r}", f"use one of: {', '.join(module_list())}")


def canonical_resize_mode(mode: Any) -> str:
    key = str(mode if mode is not None else "Crop and Resize").strip().lower()
    if key not in RESIZE_MODES:
        raise InvalidRequestError(f"unknown resize_mode {mode!r}",
                                  'use "Just Resize", "Crop and Resize" or "Resize and Fill" (or 0, 1, 2)')
    return RESIZE_MODES[key]


def _rgb(image: Any) -> np.ndarray:
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, -1)
    if arr.dtype != np.uint8:
        arr = np.clip(arr * 255.0 + 0.5, 0, 255).astype(np.uint8)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4):
        raise InvalidRequestError(f"a control image must be (H, W, 3), got {arr.shape}", "send an RGB image")
    return np.ascontiguousarray(arr[:, :, :3])


def _resize(arr: np.ndarray, w: int, h: int) -> np.ndarray:
    import cv2

    interp = cv2.INTER_AREA if w * h < arr.shape[0] * arr.shape[1] else cv2.INTER_CUBIC
    return cv2.resize(arr, (max(1, w), max(1, h)), interpolation=interp)


def pixel_perfect_resolution(raw_h: int, raw_w: int, target_h: int, target_w: int, mode: str) -> int:
    """The extension's pixel-perfect processor resolution for this image, target and resize mode."""
    k0, k1 = target_h / raw_h, target_w / raw_w
    k = min(k0, k1) if mode == "fill" else max(k0, k1)
    return int(np.round(k * min(raw_h, raw_w)))


def detect(image: Any, module: Any, *, processor_res: int = 512, threshold_a: float | None = None,
           threshold_b: float | None = None) -> np.ndarray:
    """Run a preprocessor at ``processor_res`` (short side); the detected map (H, W, 3) uint8."""
    name = canonical_module(module)
    arr = _rgb(image)
    if name == "none":
        return arr
    if name == "invert":
        return 255 - arr
    h, w = arr.shape[:2]
    threshold_a, threshold_b = _threshold_value("threshold_a", threshold_a), _threshold_value("threshold_b", threshold_b)
    if processor_res is not None and (isinstance(processor_res, bool) or not isinstance(processor_res, (int, float))
                                      or not np.isfinite(float(processor_res))):
        raise PreprocessorArgumentError("processor_res", f"processor_res must be a number, got {processor_res!r}",
                                        f"send 64..{MAX_PROCESSOR_RES} (-1: the image's own size)")
    res = int(processor_res) if processor_res and int(processor_res) > 0 else min(h, w)
    if res > MAX_PROCESSOR_RES:
        raise PreprocessorArgumentError("processor_res", f"processor_res {res} is over {MAX_PROCESSOR_RES}",
                                        f"send 64..{MAX_PROCESSOR_RES} (A1111's range), or -1 for the image's own size")
    k = res / min(h, w)
    work = _resize(arr, round(w * k), round(h * k))
    if name == "canny":
        import cv2

        lo = 100.0 if threshold_a is None or threshold_a < 0 else float(threshold_a)  # A1111's defaults
        hi = 200.0 if threshold_b is None or threshold_b < 0 else float(threshold_b)
        edges = cv2.Canny(work, lo, hi)
        return np.stack([edges] * 3, -1)
    # tile_resample: downsample by the rate (threshold_a, >= 1)
    rate = 1.0 if threshold_a is None or threshold_a < 1 else float(threshold_a)
    hh, ww = work.shape[:2]
    if int(min(hh, ww) / rate) < 1:
        raise PreprocessorArgumentError("threshold_a", f"tile_resample's down-sampling rate {rate:g} leaves no pixel "
                                        f"of a {hh}x{ww} map", "send a rate (threshold_a) between 1 and 8")
    return _resize(work, int(ww / rate), int(hh / rate))


def fit(detected: np.ndarray, height: int, width: int, resize_mode: Any) -> np.ndarray:
    """The detected map at ``height x width`` by the extension's resize mode."""
    mode = canonical_resize_mode(resize_mode)
    h0, w0 = detected.shape[:2]
    if mode == "just_resize":
        return _resize(detected, width, height)
    k0, k1 = height / h0, width / w0
    if mode == "crop":
        k = max(k0, k1)
        m = _resize(detected, int(np.ceil(w0 * k)), int(np.ceil(h0 * k)))
        nh, nw = m.shape[:2]
        top, left = (nh - height) // 2, (nw - width) // 2
        return np.ascontiguousarray(m[top:top + height, left:left + width])
    k = min(k0, k1)
    borders = np.concatenate([detected[0], detected[-1], detected[:, 0], detected[:, -1]], axis=0)
    color = np.median(borders, axis=0).astype(detected.dtype)
    out = np.tile(color[None, None], (height, width, 1))
    m = _resize(detected, int(w0 * k), int(h0 * k))
    nh, nw = m.shape[:2]
    top, left = max(0, (height - nh) // 2), max(0, (width - nw) // 2)
    out[top:top + nh, left:left + nw] = m[:height, :width]
    return out


def control_map(image: Any, module: Any, height: int, width: int, *, resize_mode: Any = "Crop and Resize",
                processor_res: int = 512, threshold_a: float | None = None, threshold_b: float | None = None,
                pixel_perfect: bool = False) -> Image.Image:
    """The control map a unit asks for, at the call's size (PIL RGB)."""
    arr = _rgb(image)
    if pixel_perfect:
        processor_res = min(MAX_PROCESSOR_RES, pixel_perfect_resolution(arr.shape[0], arr.shape[1], height, width,
                                                                         canonical_resize_mode(resize_mode)))
    detected = detect(arr, module, processor_res=processor_res, threshold_a=threshold_a, threshold_b=threshold_b)
    return Image.fromarray(fit(detected, height, width, resize_mode))


#: public names (``sdxl_export.runtime.detect_control`` / ``preprocessor_list``)
detect_control = detect
preprocessor_list = module_list
