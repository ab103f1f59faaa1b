"""Native API: ``POST /v1/generate`` takes every runtime argument by its runtime name.

Body: ``prompt`` (text or a list), ``negative_prompt`` (text, a list, or absent = SDXL's zero
negative conditioning), ``num_images_per_prompt``, ``height``, ``width``,
``num_inference_steps``, ``guidance_scale``, ``denoising_end``, ``refiner``, ``seed``,
``scheduler``, ``original_size``, ``crops_coords_top_left``, ``target_size``,
``aesthetic_score``, ``negative_aesthetic_score``; img2img: ``image`` (base64 or a data URL;
every output starts from it, at its size unless ``height``/``width`` resize it), ``strength``
(default 0.3, diffusers'), ``refiner_only``; inpainting: ``mask_image`` (alias ``mask``; white =
repaint; with ``image``; strength default 0.9999 as diffusers'), ``padding_mask_crop``; ``loras``: ``{name: scale}``,
names of files in the server's ``--lora-dir``. Images come in diffusers' order (each
prompt's images together); image i uses ``seed + i``. The answer carries the images (base64
PNG), every seed, and the queue wait, batch size and per-stage timings of each image's call.
"""

from __future__ import annotations

from typing import Any

from .common import (
    ParamError,
    ParsedRequest,
    body_dict,
    decode_image,
    get_bool,
    get_float,
    get_int,
    get_str,
    reject_unknown,
    seeds_for,
)
from .limits import FLOAT_BOUNDS

KNOWN = {"loras", "prompt", "negative_prompt", "num_images_per_prompt", "height", "width", "num_inference_steps",
         "guidance_scale", "denoising_end", "refiner", "seed", "scheduler", "original_size",
         "crops_coords_top_left", "target_size", "aesthetic_score", "negative_aesthetic_score", "image",
         "strength", "refiner_only", "mask", "mask_image", "padding_mask_crop", "controlnets", "eta", "timesteps",
         "sigmas"}


def _texts(body: dict[str, Any], key: str) -> list[str] | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return list(value)
    raise ParamError(key, f"'{key}' must be a string or a non-empty list of strings", f"pass '{key}' as text")


def schedule_fields(body: dict[str, Any]) -> dict[str, Any]:
    """``eta`` (a number >= 0) and a custom schedule: ``timesteps`` (integers) or ``sigmas``
    (numbers), as diffusers' SDXL pipelines take them; the runtime checks the rest."""
    out: dict[str, Any] = {}
    eta = get_float(body, "eta", None, lo=0.0)
    if eta is not None:
        out["eta"] = eta
    for key, kind in (("timesteps", int), ("sigmas", (int, float))):
        value = body.get(key)
        if value is None:
            continue
        if (not isinstance(value, list) or not value
                or not all(isinstance(v, kind) and not isinstance(v, bool) for v in value)):
            raise ParamError(key, f"'{key}' must be a non-empty list of {'integers' if kind is int else 'numbers'}",
                             f"pass e.g. {'[999, 749, 499, 249]' if kind is int else '[14.6, 3.0, 0.9, 0.2]'}")
        out[key] = [kind(v) if kind is int else float(v) for v in value]
    return out


def _pair(body: dict[str, Any], key: str) -> tuple[int, int] | None:
    value = body.get(key)
    if value is None:
        return None
    if (isinstance(value, list) and len(value) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)):
        return int(value[0]), int(value[1])
    raise ParamError(key, f"'{key}' must be [height, width] (two non-negative integers)", f"pass '{key}' as [h, w]")


def parse(body: Any, *, has_refiner: bool, max_images: int) -> ParsedRequest:
    body = body_dict(body)
    reject_unknown(body, KNOWN, where="/v1/generate")
    prompts = _texts(body, "prompt")
    if prompts is None:
        raise ParamError("prompt", "'prompt' is required", "pass 'prompt' as text", code="missing_required")
    negatives = _texts(body, "negative_prompt")
    if negatives is not None and len(negatives) == 1 and len(prompts) > 1:
        negatives = negatives * len(prompts)
    if negatives is not None and len(negatives) != len(prompts):
        raise ParamError("negative_prompt", f"{len(negatives)} negative prompts for {len(prompts)} prompts",
                         "pass one negative prompt, or one per prompt")
    per = get_int(body, "num_images_per_prompt", 1, lo=1, hi=max_images)
    assert per is not None
    n = len(prompts) * per
    if n > max_images:
        raise ParamError("num_images_per_prompt", f"{n} images requested, at most {max_images} per request",
                         "ask for fewer images")
    kwargs: dict[str, Any] = {"refiner": get_bool(body, "refiner", has_refiner)}
    image = decode_image(body["image"], "image") if body.get("image") is not None else None
    mask = _mask(body, image, kwargs)
    strength = get_float(body, "strength", None, lo=0.0, hi=1.0, lo_open=True)
    if strength is not None:
        kwargs["strength"] = strength
    if get_bool(body, "refiner_only", False):
        kwargs["refiner_only"] = True
        kwargs["refiner"] = True
    for key in ("height", "width", "num_inference_steps"):
        value = get_int(body, key, None, lo=1)
        if value is not None:
            kwargs[key] = value
    for key in ("guidance_scale", "aesthetic_score", "negative_aesthetic_score"):
        lo, hi = FLOAT_BOUNDS[key]
        number = get_float(body, key, None, lo=lo, hi=hi)
        if number is not None:
            kwargs[key] = number
    d = get_float(body, "denoising_end", None, lo=0.0, hi=1.0, lo_open=True, hi_open=True)
    if d is not None:
        kwargs["denoising_end"] = d
    scheduler = get_str(body, "scheduler")
    if scheduler is not None:
        kwargs["scheduler"] = scheduler
    kwargs.update(schedule_fields(body))
    for key in ("original_size", "crops_coords_top_left", "target_size"):
        pair = _pair(body, key)
        if pair is not None:
            kwargs[key] = pair
    expanded = [p for p in prompts for _ in range(per)]
    negs = None if negatives is None else [q for q in negatives for _ in range(per)]
    if body.get("loras") is not None:
        kwargs["loras"] = body["loras"]  # names in the server's LoRA folder, checked at admission
    if body.get("controlnets") not in (None, []):  # checked at admission (serve/controlnet_api.py)
        kwargs["controlnets"] = {"native": body["controlnets"]}
    seed = get_int(body, "seed", None, lo=-1)
    return ParsedRequest(prompts=expanded, negatives=negs, seeds=seeds_for(seed, n), kwargs=kwargs,
                         echo={k: body[k] for k in body if k not in ("prompt", "negative_prompt", "image", "controlnets")},
                         images=None if image is None else [image] * n, masks=None if mask is None else [mask] * n)


def _mask(body: dict[str, Any], image: Any, kwargs: dict[str, Any]) -> Any:
    """Inpainting (diffusers' ``StableDiffusionXLInpaintPipeline``): ``mask_image`` (alias ``mask``),
    white = repaint, with ``image``; ``padding_mask_crop`` crops around the mask and pastes back."""
    keys = [k for k in ("mask_image", "mask") if body.get(k) is not None]
    if len(keys) > 1:
        raise ParamError("mask", "both 'mask_image' and 'mask' were sent", "send the mask once, as 'mask_image'")
    padding = get_int(body, "padding_mask_crop", None, lo=0, hi=4096)
    if not keys:
        if padding is not None:
            raise ParamError("padding_mask_crop", "'padding_mask_crop' needs a mask",
                             "send 'mask_image' (white = repaint) with 'image', or drop 'padding_mask_crop'")
        return None
    if image is None:
        raise ParamError(keys[0], f"'{keys[0]}' needs the image it masks", "send 'image' (base64) with the mask")
    if padding is not None:
        kwargs["padding_mask_crop"] = padding
    return decode_image(body[keys[0]], keys[0])
