"""ControlNet over HTTP: the A1111 ControlNet extension's API and the native ``controlnets`` field.

A1111 (what ``webuiapi``'s ``ControlNetUnit.to_dict()`` sends, and the older aliases):
``alwayson_scripts: {"ControlNet" | "controlnet": {"args": [unit, ...]}}``; a unit has
``enabled``, ``image`` (alias ``input_image``; raw base64 or a data URL, or ``{"image": ..}``),
``module``, ``model`` (with or without a `` [hash]`` suffix), ``weight``, ``resize_mode``,
``processor_res``, ``threshold_a``/``threshold_b``, ``guidance_start``/``guidance_end`` (old
``guidance`` = end), ``control_mode``, ``pixel_perfect``, ``low_vram``/``lowvram`` (ignored),
``hr_option`` and ``save_detected_map`` (ignored: no hires pass, nothing saved). An empty
``args`` list (webuiapi sends it on every request once it saw "controlnet m2m" in
``/sdapi/v1/scripts``) or only disabled units is no ControlNet.

``control_mode`` "Balanced" (0) is diffusers' ControlNet. The extension's "My prompt is more
important" (1: residuals scaled by 0.825^(12-k) and ControlNet on the conditional half) and
"ControlNet is more important" (2: the conditional half only, without diffusers' guess-mode
logspace) are not what any diffusers pipeline computes: a 400 naming them, never a silent
approximation. A ``mask`` (inpaint units) is refused the same way.

Native ``/v1/generate``: ``controlnets: [{model, image, scale, start, end, guess_mode, module}]``
(guess_mode must agree across entries: it is one per call, as in diffusers).

Jobs carry their control maps (at the output size); the batch key holds the ControlNet set
(names, scales, windows, guess mode), so requests with different sets never share a call.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

from .common import ParamError, decode_image

VERSION = 2  # what GET /controlnet/version answers (the extension's API version our units follow)
SCRIPT_NAME = "controlnet m2m"  # webuiapi looks for it in /sdapi/v1/scripts' txt2img list
CONTROL_MODES = {"balanced": 0, "0": 0, "my prompt is more important": 1, "1": 1,
                 "controlnet is more important": 2, "2": 2}
IGNORED = {"low_vram", "lowvram", "hr_option", "save_detected_map", "processor_res", "threshold_a",
           "threshold_b", "pixel_perfect", "resize_mode", "module", "mask"}
UNIT_FIELDS = {"enabled", "image", "input_image", "module", "model", "weight", "resize_mode", "processor_res",
               "threshold_a", "threshold_b", "guidance_start", "guidance_end", "guidance", "control_mode",
               "pixel_perfect", "low_vram", "lowvram", "hr_option", "save_detected_map", "mask", "guessmode"}
_HASH = re.compile(r"\s*\[[0-9a-fA-F]{6,}\]\s*$")


def _num(unit: Mapping[str, Any], key: str, default: float, where: str, lo: float | None = None,
         hi: float | None = None) -> float:
    v = unit.get(key, default)
    if v is None:
        v = default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(float(v)):
        raise ParamError(f"{where}.{key}", f"'{where}.{key}' must be a finite number, got {v!r}",
                         f"send a number for {key}")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise ParamError(f"{where}.{key}", f"'{where}.{key}' = {v} is outside [{lo}, {hi}]",
                         f"send {key} in [{lo}, {hi}]")
    return float(v)


def model_name(model: Any, available: Sequence[str], where: str) -> str:
    name = _HASH.sub("", str(model or "")).strip()
    if name in available:
        return name
    raise ParamError(f"{where}.model", f"ControlNet model {model!r} is not served; this server has: "
                     f"{', '.join(available) or 'none'}",
                     "use a name from GET /controlnet/model_list" if available else
                     "build the server's artifacts with --controlnet DIR|FILE")


def _image(unit: Mapping[str, Any], where: str) -> Any:
    raw = unit.get("image")
    if raw in (None, ""):
        raw = unit.get("input_image")
    if isinstance(raw, Mapping):  # {"image": b64, "mask": b64} of the extension's UI format
        if raw.get("mask") not in (None, ""):
            raise ParamError(f"{where}.image.mask", "a ControlNet unit mask is not supported by this server",
                             "send the control image without a mask")
        raw = raw.get("image")
    if raw in (None, ""):
        raise ParamError(f"{where}.image", f"'{where}' has no image", "send the control image as 'image' (base64)")
    return decode_image(raw, f"{where}.image")


def _unit_map(unit: Mapping[str, Any], where: str, height: int, width: int, *, module_key: str = "module",
              resize_default: Any = "Crop and Resize") -> Any:
    """The unit's control map at the output size (its preprocessor and A1111 resize rules)."""
    from ..errors import InvalidRequestError
    from ..runtime import control_map

    img = _image(unit, where)
    try:
        return control_map(
            img, unit.get(module_key) or "none", height, width,
            resize_mode=unit.get("resize_mode") if unit.get("resize_mode") is not None else resize_default,
            processor_res=int(_num(unit, "processor_res", 512, where)) if unit.get("processor_res", 512) != -1
            else 512,
            threshold_a=_threshold(unit, "threshold_a", where), threshold_b=_threshold(unit, "threshold_b", where),
            pixel_perfect=bool(unit.get("pixel_perfect", False)))
    except ParamError:
        raise
    except InvalidRequestError as exc:
        key = getattr(exc, "param", None) or (
            "module" if "preprocessor" in exc.message else "resize_mode" if "resize_mode" in exc.message else "image")
        raise ParamError(f"{where}.{key}", exc.message, exc.hint) from None


def _threshold(unit: Mapping[str, Any], key: str, where: str) -> float | None:
    """The extension's threshold as sent; -1 (or absent) means the module's default."""
    if unit.get(key) is None:
        return None
    v = _num(unit, key, -1, where)
    return None if v < 0 else v


def parse_a1111(scripts: Any, *, available: Sequence[str], height: int, width: int) -> dict[str, Any] | None:
    """``alwayson_scripts`` -> the call's ControlNet (None: no enabled unit). ParamError on bad input."""
    if scripts in (None, {}):
        return None
    if not isinstance(scripts, Mapping):
        raise ParamError("alwayson_scripts", "'alwayson_scripts' must be an object", "send {\"ControlNet\": ...}")
    units: list[Any] = []
    for key, value in scripts.items():
        if key.lower() != "controlnet":
            if value in (None, {}, {"args": []}):
                continue
            raise ParamError(f"alwayson_scripts.{key}", f"script {key!r} is not supported by this server",
                             "remove it (this server runs ControlNet only)", code="unsupported_value")
        args = value.get("args", []) if isinstance(value, Mapping) else value
        if not isinstance(args, list):
            raise ParamError(f"alwayson_scripts.{key}.args", "ControlNet 'args' must be a list of units",
                             "send {\"args\": [unit, ...]}")
        units += [(f"alwayson_scripts.{key}.args[{i}]", u) for i, u in enumerate(args)]
    out: dict[str, Any] = {"names": [], "images": [], "scales": [], "starts": [], "ends": [], "guess_mode": False}
    for where, unit in units:
        if not isinstance(unit, Mapping):
            raise ParamError(where, f"'{where}' must be an object (a ControlNet unit)", "send the unit as a JSON object")
        if unit.get("enabled", True) is False:
            continue
        unknown = [k for k in unit if k not in UNIT_FIELDS]
        if unknown:
            raise ParamError(f"{where}.{unknown[0]}", f"unknown ControlNet unit field '{unknown[0]}'",
                             f"remove '{unknown[0]}'", code="unknown_parameter")
        if unit.get("mask") not in (None, ""):
            raise ParamError(f"{where}.mask", "a ControlNet unit mask is not supported by this server",
                             "send the control image without a mask", code="unsupported_value")
        mode = CONTROL_MODES.get(str(unit.get("control_mode", 0)).strip().lower())
        if unit.get("guessmode") not in (None, False, 0):
            mode = 2
        if mode != 0:
            raise ParamError(f"{where}.control_mode",
                             f"control_mode {unit.get('control_mode')!r} cannot be honoured exactly: "
                             "only \"Balanced\" (diffusers' ControlNet) is supported",
                             "send control_mode \"Balanced\" (0)", code="unsupported_value")
        out["names"].append(model_name(unit.get("model"), available, where))
        out["scales"].append(_num(unit, "weight", 1.0, where, 0.0, 2.0))
        start = _num(unit, "guidance_start", 0.0, where, 0.0, 1.0)
        end = _num(unit, "guidance_end", _num(unit, "guidance", 1.0, where, 0.0, 1.0), where, 0.0, 1.0)
        if not start < end:
            raise ParamError(f"{where}.guidance_start", f"guidance_start {start} is not below guidance_end {end}",
                             "send guidance_start < guidance_end")
        out["starts"].append(start)
        out["ends"].append(end)
        out["images"].append(_unit_map(unit, where, height, width, resize_default="Crop and Resize"))
    return out if out["names"] else None


NATIVE_FIELDS = {"model", "image", "scale", "start", "end", "guess_mode", "module", "resize_mode",
                 "processor_res", "threshold_a", "threshold_b", "pixel_perfect"}


def parse_native(value: Any, *, available: Sequence[str], height: int, width: int) -> dict[str, Any] | None:
    """``controlnets: [{model, image, scale, start, end, guess_mode, module}]`` of /v1/generate."""
    if value in (None, []):
        return None
    if not isinstance(value, list):
        raise ParamError("controlnets", "'controlnets' must be a list", "send [{\"model\": NAME, \"image\": b64}]")
    out: dict[str, Any] = {"names": [], "images": [], "scales": [], "starts": [], "ends": [], "guess_mode": False}
    guess: set[bool] = set()
    for i, u in enumerate(value):
        where = f"controlnets[{i}]"
        if not isinstance(u, Mapping):
            raise ParamError(where, f"'{where}' must be an object", "send {\"model\": NAME, \"image\": b64}")
        unknown = [k for k in u if k not in NATIVE_FIELDS]
        if unknown:
            raise ParamError(f"{where}.{unknown[0]}", f"unknown field '{where}.{unknown[0]}'",
                             f"use: {', '.join(sorted(NATIVE_FIELDS))}", code="unknown_parameter")
        out["names"].append(model_name(u.get("model"), available, where))
        out["scales"].append(_num(u, "scale", 1.0, where))
        start, end = _num(u, "start", 0.0, where, 0.0, 1.0), _num(u, "end", 1.0, where, 0.0, 1.0)
        if not start < end:
            raise ParamError(f"{where}.start", f"start {start} is not below end {end}", "send start < end")
        out["starts"].append(start)
        out["ends"].append(end)
        g = u.get("guess_mode", False)
        if not isinstance(g, bool):
            raise ParamError(f"{where}.guess_mode", "'guess_mode' must be true or false", "send a boolean")
        guess.add(g)
        out["images"].append(_unit_map(u, where, height, width, resize_default="Just Resize"))
    if len(guess) > 1:
        raise ParamError("controlnets", "guess_mode differs between ControlNets: it is one per call",
                         "send the same guess_mode in every entry")
    out["guess_mode"] = guess.pop() if guess else False
    return out


def admit(control: Any, pipe: Any, kwargs: dict[str, Any]) -> dict[str, Any] | None:
    """A request's ControlNet at admission: native entries are parsed here (the served names and,
    without height/width, the first control image's size -- diffusers' default -- are known here)."""
    if not (isinstance(control, Mapping) and "native" in control):
        return control  # type: ignore[return-value]
    from ..runtime import available_controlnets as available

    raw = control["native"]
    h, w = kwargs.get("height"), kwargs.get("width")
    if (h is None or w is None) and isinstance(raw, list) and raw and isinstance(raw[0], Mapping):
        first = _image(raw[0], "controlnets[0]")
        s = pipe.vae_scale
        h, w = h or first.height // s * s, w or first.width // s * s
        kwargs.setdefault("height", h)
        kwargs.setdefault("width", w)
    return parse_native(raw, available=available(pipe.runners), height=int(h or pipe.native_size),
                        width=int(w or pipe.native_size))


def call_kwargs(spec: Mapping[str, Any] | None, images: Sequence[Any] | None = None) -> dict[str, Any]:
    """Pipeline keyword arguments of a parsed ControlNet spec (``images``: per ControlNet, one per output)."""
    if not spec:
        return {}
    per = images if images is not None else spec["images"]
    multi = len(spec["names"]) > 1
    return {"control_image": list(per) if multi else per[0],
            "controlnet": list(spec["names"]) if multi else spec["names"][0],
            "controlnet_conditioning_scale": list(spec["scales"]) if multi else spec["scales"][0],
            "control_guidance_start": list(spec["starts"]) if multi else spec["starts"][0],
            "control_guidance_end": list(spec["ends"]) if multi else spec["ends"][0],
            "guess_mode": bool(spec["guess_mode"])}


def batch_key(spec: Mapping[str, Any] | None) -> tuple[Any, ...]:
    """What calls must share to batch: names, scales, windows, guess mode (the images are per job)."""
    if not spec:
        return ()
    return (tuple(zip(spec["names"], spec["scales"], spec["starts"], spec["ends"])), bool(spec["guess_mode"]))


def chunk_kwargs(jobs: Sequence[Any]) -> dict[str, Any]:
    """One pipeline call's ControlNet arguments: each job's maps (a batch per ControlNet)."""
    key = jobs[0].params.controlnets
    if not key:
        return {}
    units, guess = key
    spec = {"names": [u[0] for u in units], "scales": [u[1] for u in units], "starts": [u[2] for u in units],
            "ends": [u[3] for u in units], "guess_mode": guess}
    per = [[j.control_images[k] for j in jobs] for k in range(len(units))]
    return call_kwargs(spec, per)


def scripts(pipe: Any) -> list[str]:
    """``/sdapi/v1/scripts`` entries: "controlnet m2m" when ControlNets are built (webuiapi's test)."""
    from ..runtime import available_controlnets

    return [SCRIPT_NAME] if pipe is not None and available_controlnets(pipe.runners) else []


# ---- the extension's own routes ---------------------------------------------------------------------
def register(app: Any, get_pipe: Any, guarded: Any) -> None:
    """``GET /controlnet/version|model_list|module_list``, ``POST /controlnet/detect``."""
    from fastapi import Request

    from ..runtime import available_controlnets as available
    from ..runtime import detect_control, preprocessor_list
    from .common import png_b64
    from .schemas import ControlNetDetected, ControlNetDetectRequest, body_doc

    @app.get("/controlnet/version")
    @guarded
    async def cn_version(request: Request) -> Any:
        return {"version": VERSION}

    @app.get("/controlnet/model_list")
    @guarded
    async def cn_models(request: Request) -> Any:
        pipe = get_pipe()
        return {"model_list": available(pipe.runners) if pipe is not None else []}

    @app.get("/controlnet/module_list")
    @guarded
    async def cn_modules(request: Request) -> Any:
        return {"module_list": preprocessor_list()}

    @app.post("/controlnet/detect", response_model=ControlNetDetected, openapi_extra=body_doc(ControlNetDetectRequest))
    @guarded
    async def cn_detect(request: Request) -> Any:
        from starlette.concurrency import run_in_threadpool

        from ..errors import InvalidRequestError
        from .common import body_dict, loads_json

        body = body_dict(loads_json(await request.body()))  # bad JSON: a 400, not a 500

        def work() -> list[str]:
            imgs = body.get("controlnet_images")
            if not isinstance(imgs, list) or not imgs:
                raise ParamError("controlnet_images", "'controlnet_images' must be a non-empty list of base64 images",
                                 "send the images to preprocess")
            out = []
            for i, raw in enumerate(imgs):
                img = decode_image(raw, f"controlnet_images[{i}]")
                res = body.get("controlnet_processor_res", 512)
                try:
                    m = detect_control(img, body.get("controlnet_module", "none"),
                                       processor_res=512 if res is None or res == -1 else res,
                                       threshold_a=body.get("controlnet_threshold_a"),
                                       threshold_b=body.get("controlnet_threshold_b"))
                except InvalidRequestError as exc:
                    raise ParamError("controlnet_" + (getattr(exc, "param", None) or "module"), exc.message,
                                     exc.hint) from None
                from PIL import Image

                out.append(png_b64(Image.fromarray(m)))
            return out

        return {"images": await run_in_threadpool(work), "info": "Success"}
