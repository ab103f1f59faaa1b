"""AUTOMATIC1111 web UI API: ``POST /sdapi/v1/txt2img``, ``/sdapi/v1/img2img`` and the lists clients read.

The ``webuiapi`` client (and most SD front ends) send every txt2img field on each call
(hires fix, face restore, subseeds, sampler noise settings, scripts...). The rule here:

* fields we run: ``prompt``, ``negative_prompt``, ``seed`` (-1 = random), ``steps``,
  ``cfg_scale``, ``width``, ``height``, ``sampler_name`` (A1111's names; ``sampler_index`` as
  the older spelling) with the newer ``scheduler`` field, ``batch_size``, ``n_iter``,
  ``refiner_checkpoint``, ``refiner_switch_at``, ``send_images``;
* fields that only act through a feature that is off (every ``hr_*`` while ``enable_hr`` is
  false, ``denoising_strength`` in txt2img, save/grid flags) are accepted whatever their value;
* fields with a web UI default we reproduce are accepted at that default and refused (400,
  naming the field) at any other value: ``enable_hr``, ``restore_faces``, ``tiling``,
  ``subseed_strength``, ``seed_resize_from_*``, ``eta``/``s_*``, ``styles``,
  ``override_settings``, scripts, ``save_images``;
* unknown fields (newer web UI versions add some) are accepted when empty/false/zero and
  refused otherwise. Nothing is silently dropped.

As in the web UI, the refiner runs only when ``refiner_checkpoint`` names it (it is listed by
``/sdapi/v1/sd-models``), switching at ``refiner_switch_at`` (diffusers' ``denoising_end``).
Image i uses ``seed + i``; ``info`` (a JSON string, as the web UI sends it) lists them.

img2img takes the same fields plus ``init_images`` (base64 or data URLs; output i starts from
image ``i % len``, resized to ``width x height`` as the web UI's "Just resize" does) and
``denoising_strength`` (diffusers' ``strength``, default 0.75 as in the web UI). The
inpainting fields are accepted while there is no ``mask`` (they act on the mask only); a
``mask`` is refused (400): there is no inpainting.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .. import __version__
from .. import samplers as catalog
from ..errors import InvalidRequestError
from .common import (
    ParamError,
    ParsedRequest,
    body_dict,
    decode_image,
    get_bool,
    get_float,
    get_int,
    get_str,
    seeds_for,
)
from .limits import MAX_GUIDANCE
from .loras import split_prompt_tags

#: A1111's sampler and schedule-type names: the runtime's catalog (diffusers' own A1111 table).
SAMPLERS = catalog.SAMPLERS
#: A1111 < 1.9 spelled the schedule into the sampler name; these are still accepted and listed.
LEGACY_KARRAS = tuple(f"{s.a1111} Karras" for s in catalog.SAMPLERS
                      if s.a1111 and "karras" in catalog.schedules_for(s.name))

RUN = {"prompt", "negative_prompt", "seed", "steps", "cfg_scale", "width", "height", "sampler_name",
       "sampler_index", "scheduler", "batch_size", "n_iter", "refiner_checkpoint", "refiner_switch_at",
       "send_images", "enable_hr"}
#: Harmless whatever their value (the feature they belong to is off, or they only affect saving).
IGNORED = {"denoising_strength", "firstphase_width", "firstphase_height", "hr_scale", "hr_upscaler",
           "hr_second_pass_steps", "hr_resize_x", "hr_resize_y", "hr_checkpoint_name", "hr_sampler_name",
           "hr_scheduler", "hr_prompt", "hr_negative_prompt", "hr_additional_modules", "do_not_save_samples",
           "do_not_save_grid", "override_settings_restore_afterwards", "subseed", "comments", "force_task_id",
           "disable_extra_networks", "user", "sampler_index"}
#: Field -> values equal to the web UI's default behaviour.
DEFAULTS: dict[str, tuple[Any, ...]] = {
    "restore_faces": (None, False), "tiling": (None, False),
    "subseed_strength": (None, 0, 0.0), "seed_resize_from_h": (None, -1, 0), "seed_resize_from_w": (None, -1, 0),
    "eta": (None, 1.0, 1), "s_churn": (None, 0, 0.0), "s_tmax": (None, 0, 0.0), "s_tmin": (None, 0, 0.0),
    "s_noise": (None, 1, 1.0), "styles": (None, []), "save_images": (None, False),
    "script_name": (None, ""), "script_args": (None, []), "alwayson_scripts": (None, {}),
    "infotext": (None, ""),
}
IMG2IMG_RUN = RUN | {"init_images", "denoising_strength", "mask"}
#: Inpainting settings: they act on the mask only, and a mask is refused.
IMG2IMG_IGNORED = IGNORED | {"mask_blur", "mask_blur_x", "mask_blur_y", "inpainting_fill", "inpaint_full_res",
                             "inpaint_full_res_padding", "inpainting_mask_invert", "mask_round",
                             "image_cfg_scale"}
IMG2IMG_DEFAULTS = {**DEFAULTS, "resize_mode": (None, 0), "initial_noise_multiplier": (None, 1, 1.0),
                    "include_init_images": (None, False), "latent_mask": (None, "")}


def _empty(value: Any) -> bool:
    return value is None or value is False or value == 0 or value == "" or value == [] or value == {}


def sampler_for(name: str | None, schedule: str | None) -> tuple[catalog.Sampler, str]:
    """A1111 sampler name (+ schedule type) -> (sampler, runtime scheduler name)."""
    try:
        return catalog.from_a1111(name, schedule)
    except InvalidRequestError as exc:
        field = "sampler_name" if "sampler" in exc.message else "scheduler"
        # an unknown sampler is a 404, as the web UI answers "Sampler not found"
        code = "sampler_not_found" if field == "sampler_name" else "invalid_value"
        raise ParamError(field, exc.message, exc.hint, code=code) from None


@dataclass(frozen=True)
class Models:
    """The checkpoints this server lists (A1111's ``sd-models``)."""

    base: str
    refiner: str | None
    sha256: str
    controlnets: tuple[str, ...] = ()  # the ControlNets built (names for units' "model")
    #: the model's recorded defaults (``steps``, ``guidance_scale``, ``scheduler``), used when a
    #: request leaves them out (webuiapi always sends them)
    defaults: Mapping[str, Any] | None = None

    def titles(self) -> dict[str, str]:
        out = {self.base: self.title(self.base)}
        if self.refiner:
            out[self.refiner] = self.title(self.refiner)
        return out

    def title(self, name: str) -> str:
        return f"{name} [{self.sha256[:10]}]"


def _check_overrides(value: Any, models: Models) -> None:
    """``override_settings``: only settings that already hold (this model, CLIP skip 1) pass."""
    if value is None:
        return
    if not isinstance(value, dict):
        raise ParamError("override_settings", "'override_settings' must be an object", "pass {}")
    holds = {"sd_model_checkpoint": {models.base, models.title(models.base)}, "CLIP_stop_at_last_layers": {1},
             "sd_vae": {"Automatic", "None", None}, "samples_format": {"png"}}
    for k, v in value.items():
        if k not in holds or v not in holds[k]:
            raise ParamError(f"override_settings.{k}", f"override setting {k}={v!r} is not supported here",
                             f"remove it (this server runs {models.title(models.base)}, CLIP skip 1)")


def _check_fields(body: Mapping[str, Any], models: Models, img2img: bool = False) -> None:
    run, ignored, defaults = (IMG2IMG_RUN, IMG2IMG_IGNORED, IMG2IMG_DEFAULTS) if img2img else (RUN, IGNORED, DEFAULTS)
    for key, value in body.items():
        if key in run or key in ignored:
            continue
        if key == "override_settings":
            _check_overrides(value, models)
            continue
        if key == "alwayson_scripts":  # ControlNet units: serve/controlnet_api.py
            continue
        if key in defaults:
            if value not in defaults[key]:
                raise ParamError(key, f"'{key}' = {value!r} is not supported by this server",
                                 f"leave '{key}' at the web UI default ({defaults[key][1]!r})",
                                 code="unsupported_value")
            continue
        if not _empty(value):
            raise ParamError(key, f"unknown field '{key}' = {value!r}: this server cannot honour it",
                             f"remove '{key}'", code="unknown_parameter")


def parse_img2img(body: Any, *, models: Models, max_images: int) -> tuple[ParsedRequest, dict[str, Any]]:
    """``/sdapi/v1/img2img``: txt2img's fields plus the input images and the strength."""
    body = body_dict(body)
    raw = body.get("init_images")
    if not isinstance(raw, list) or not raw:
        raise ParamError("init_images", "'init_images' must be a non-empty list of base64 images",
                         "send the input image as init_images: [base64 PNG]", code="missing_required")
    strength = get_float(body, "denoising_strength", 0.75, lo=0.0, hi=1.0, lo_open=True)
    parsed, meta = parse_txt2img(body, models=models, max_images=max_images, img2img=True)
    if len(raw) > len(parsed.prompts):  # refused before anything is decoded
        raise ParamError("init_images", f"{len(raw)} init_images for {len(parsed.prompts)} output image(s)",
                         "send at most one input image per output image (batch_size x n_iter)")
    inputs = [decode_image(v, f"init_images[{i}]") for i, v in enumerate(raw)]
    parsed.images = [inputs[i % len(inputs)] for i in range(len(parsed.prompts))]
    parsed.kwargs["strength"] = strength
    if not _empty(body.get("mask")):  # inpainting: serve/workflows_api.py
        from .workflows_api import a1111_mask

        a1111_mask(body, parsed, meta)
    parsed.echo.update(init_images=None, mask=None)  # the web UI leaves them out of "parameters" too
    meta["denoising_strength"] = strength
    return parsed, meta


def parse_txt2img(body: Any, *, models: Models, max_images: int,
                  img2img: bool = False) -> tuple[ParsedRequest, dict[str, Any]]:
    body = body_dict(body)
    _check_fields(body, models, img2img)
    prompt = get_str(body, "prompt", "") or ""
    negative = get_str(body, "negative_prompt", "") or ""
    batch_size = get_int(body, "batch_size", 1, lo=1)
    n_iter = get_int(body, "n_iter", 1, lo=1)
    assert batch_size is not None and n_iter is not None
    n = batch_size * n_iter
    if n > max_images:
        raise ParamError("batch_size", f"batch_size x n_iter = {n} images, at most {max_images} per request",
                         "ask for fewer images")
    recorded = dict(models.defaults or {})
    sampler_name = get_str(body, "sampler_name") or get_str(body, "sampler_index")
    if sampler_name is None and recorded.get("scheduler") and not get_str(body, "scheduler"):
        scheduler = recorded["scheduler"]
        sampler = catalog.BY_NAME[catalog.split_name(scheduler)[0]]
    else:
        sampler, scheduler = sampler_for(sampler_name or "Euler", get_str(body, "scheduler"))
    refiner_name = get_str(body, "refiner_checkpoint")
    use_refiner = False
    if refiner_name not in (None, "", "None"):
        names = {models.refiner, models.title(models.refiner)} if models.refiner else set()
        if refiner_name not in names:
            have = models.title(models.refiner) if models.refiner else "none (this server was built without one)"
            raise ParamError("refiner_checkpoint", f"refiner {refiner_name!r} is not served", f"use {have}")
        use_refiner = True
    switch = get_float(body, "refiner_switch_at", 0.8, lo=0.0, hi=1.0, lo_open=True, hi_open=True)
    steps = get_int(body, "steps", recorded.get("steps", 20), lo=1)
    cfg = get_float(body, "cfg_scale", recorded.get("guidance_scale", 7.0), lo=0.0, hi=MAX_GUIDANCE)
    width = get_int(body, "width", 512, lo=8)
    height = get_int(body, "height", 512, lo=8)
    seed = get_int(body, "seed", -1, lo=-1)
    get_bool(body, "send_images", True)
    kwargs: dict[str, Any] = {"height": height, "width": width, "num_inference_steps": steps,
                              "guidance_scale": cfg, "scheduler": scheduler, "refiner": use_refiner}
    if use_refiner:
        kwargs["denoising_end"] = switch
    # The web UI's extra networks: <lora:name:scale> tags select LoRAs and leave the prompt.
    prompt, tags = split_prompt_tags(prompt)
    if split_prompt_tags(negative)[1]:
        raise ParamError("negative_prompt", "LoRA tags in the negative prompt are not supported",
                         "put <lora:name:scale> tags in the prompt")
    if tags:
        kwargs["loras"] = tags
    from . import controlnet_api

    control = controlnet_api.parse_a1111(body.get("alwayson_scripts"), available=models.controlnets,
                                         height=int(height or 512), width=int(width or 512))
    if control is not None:
        kwargs["controlnets"] = control
    meta_hr: dict[str, Any] = {}
    if img2img and body.get("enable_hr") not in (None, False):
        raise ParamError("enable_hr", "hires fix applies to txt2img", "drop 'enable_hr' from img2img requests",
                         code="unsupported_value")
    if not img2img and body.get("enable_hr") not in (None, False):  # hires fix: serve/workflows_api.py
        from .workflows_api import a1111_hires

        a1111_hires(body, kwargs, meta_hr, prompt=prompt, negative=negative, sampler=sampler.name,
                    scheduler_field=get_str(body, "scheduler"), base_model=models.base)
    parsed = ParsedRequest(prompts=[prompt] * n, negatives=[negative] * n, seeds=seeds_for(seed, n),
                           kwargs=kwargs, echo=dict(body))
    meta = {"sampler": sampler.a1111, "schedule": catalog.schedule_label(scheduler),
            "batch_size": batch_size, "refiner": models.refiner if use_refiner else None, "switch": switch}
    meta.update(meta_hr)
    return parsed, meta


def infotext(prompt: str, negative: str, seed: int, kw: Mapping[str, Any], meta: Mapping[str, Any],
             models: Models) -> str:
    lines = [prompt]
    if negative:
        lines.append(f"Negative prompt: {negative}")
    parts = [f"Steps: {kw['num_inference_steps']}", f"Sampler: {meta['sampler']}",
             f"Schedule type: {meta['schedule']}", f"CFG scale: {kw['guidance_scale']:g}", f"Seed: {seed}",
             f"Size: {kw['width']}x{kw['height']}", f"Model hash: {models.sha256[:10]}", f"Model: {models.base}"]
    if meta.get("denoising_strength") is not None:
        parts.append(f"Denoising strength: {meta['denoising_strength']:g}")
    if meta.get("refiner"):
        parts += [f"Refiner: {models.title(meta['refiner'])}", f"Refiner switch at: {meta['switch']:g}"]
    parts.append(f"Version: sdxl-export {__version__}")
    lines.append(", ".join(parts))
    return "\n".join(lines)


def txt2img_response(images_b64: list[str], parsed: ParsedRequest, meta: Mapping[str, Any],
                     models: Models, send_images: bool) -> dict[str, Any]:
    kw = parsed.kwargs
    negs = parsed.negatives or [""] * len(parsed.prompts)
    info = {
        "prompt": parsed.prompts[0], "all_prompts": parsed.prompts, "negative_prompt": negs[0],
        "all_negative_prompts": negs, "seed": parsed.seeds[0], "all_seeds": parsed.seeds,
        "subseed": parsed.seeds[0], "all_subseeds": parsed.seeds, "subseed_strength": 0,
        "width": kw["width"], "height": kw["height"], "sampler_name": meta["sampler"],
        "scheduler": meta["schedule"], "cfg_scale": kw["guidance_scale"], "steps": kw["num_inference_steps"],
        "batch_size": meta["batch_size"], "restore_faces": False, "face_restoration_model": None,
        "sd_model_name": models.base, "sd_model_hash": models.sha256[:10], "sd_vae_name": None,
        "sd_vae_hash": None, "seed_resize_from_w": -1, "seed_resize_from_h": -1,
        "denoising_strength": meta.get("denoising_strength"),
        "extra_generation_params": ({"Refiner": models.title(meta["refiner"]), "Refiner switch at": meta["switch"]}
                                    if meta.get("refiner") else {}),
        "index_of_first_image": 0, "styles": [], "job_timestamp": time.strftime("%Y%m%d%H%M%S"),
        "clip_skip": 1, "is_using_inpainting_conditioning": False, "version": f"sdxl-export {__version__}",
        "infotexts": [infotext(p, n, s, kw, meta, models) for p, n, s in zip(parsed.prompts, negs, parsed.seeds)],
    }
    if parsed.notes:  # what the server changed (--size-policy nearest), as the web UI has no field for it
        info["sdxl_export_notes"] = list(parsed.notes)
    return {"images": images_b64 if send_images else [], "parameters": parsed.echo, "info": json.dumps(info)}


def loras(names: list[str]) -> list[dict[str, Any]]:
    """``GET /sdapi/v1/loras`` (the web UI's Lora extension): names only, no server paths."""
    return [{"name": n, "alias": n, "path": None, "metadata": {}} for n in names]


def samplers() -> list[dict[str, Any]]:
    """``GET /sdapi/v1/samplers``: every sampler, then A1111 < 1.9's combined Karras names."""
    out = catalog.a1111_samplers()
    out += [{"name": n, "aliases": [], "options": {"scheduler": "karras"}} for n in LEGACY_KARRAS]
    return out


def schedulers() -> list[dict[str, Any]]:
    """``GET /sdapi/v1/schedulers``: Automatic and the schedule types (A1111's shape)."""
    return catalog.a1111_schedulers()


def sd_models(models: Models, folder_name: str) -> list[dict[str, Any]]:
    """The checkpoints; ``filename`` names the artifact folder, never its path on the server."""
    return [{"title": title, "model_name": name, "hash": models.sha256[:10], "sha256": models.sha256,
             "filename": f"{folder_name} ({'refiner' if name == models.refiner else 'base'})", "config": None}
            for name, title in models.titles().items()]


def options(models: Models) -> dict[str, Any]:
    return {"sd_model_checkpoint": models.title(models.base), "sd_checkpoint_hash": models.sha256,
            "sd_vae": "Automatic", "CLIP_stop_at_last_layers": 1, "samples_format": "png",
            "eta_ancestral": 1.0, "eta_ddim": 0.0, "s_churn": 0.0, "s_noise": 1.0, "s_tmin": 0.0}


def check_options(body: Mapping[str, Any], models: Models) -> None:
    """``POST /sdapi/v1/options``: a setting this server reports must keep its value (the
    checkpoint may be named by name or title); other web UI settings (saving, UI layout) do
    not act on API generation and are accepted without effect."""
    current = options(models)
    for key, value in body.items():
        if key == "sd_model_checkpoint":
            if value not in (models.base, models.title(models.base)):
                raise ParamError(key, f"sd_model_checkpoint {value!r} is not served here",
                                 f"use {models.title(models.base)} (GET /sdapi/v1/sd-models)", code="unsupported_value")
        elif key in current and value != current[key] and not (key == "sd_vae" and value in ("None", None)):
            raise ParamError(key, f"setting {key}={value!r} cannot be changed on this server",
                             f"leave it at {current[key]!r}", code="unsupported_value")


def memory() -> dict[str, Any]:
    """``GET /sdapi/v1/memory``: the web UI's shape (RAM in bytes; CUDA from torch when present)."""
    import psutil
    import torch

    vm = psutil.virtual_memory()
    out: dict[str, Any] = {"ram": {"free": vm.available, "used": vm.total - vm.available, "total": vm.total},
                           "cuda": {"error": "no CUDA device"}}
    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        out["cuda"] = {"system": {"free": free, "used": total - free, "total": total},
                       "active": {"current": torch.cuda.memory_allocated(), "peak": torch.cuda.max_memory_allocated()},
                       "reserved": {"current": torch.cuda.memory_reserved(), "peak": torch.cuda.max_memory_reserved()}}
    return out


def png_info(image: Any) -> dict[str, Any]:
    """``POST /sdapi/v1/png-info``: the text chunks of a PNG; ``parameters`` (the web UI's
    infotext) parsed into ``parameters``. The image is never decoded, only its header and text."""
    import base64
    import io

    from PIL import Image, UnidentifiedImageError

    if not isinstance(image, str) or not image:
        raise ParamError("image", "'image' must be a base64 PNG (or a data URL)", "send the PNG as base64")
    data = image.split(",", 1)[1] if image.startswith("data:") and "," in image else image
    try:
        raw = base64.b64decode(data, validate=True)
        with Image.open(io.BytesIO(raw)) as img:
            items = {k: v for k, v in (getattr(img, "text", None) or img.info).items() if isinstance(v, str)}
    except (ValueError, OSError, UnidentifiedImageError, SyntaxError, Image.DecompressionBombError):
        raise ParamError("image", "'image' is not a readable base64 image", "send a PNG as base64") from None
    info = items.pop("parameters", "")
    return {"info": info, "items": items, "parameters": parse_infotext(info)}


def parse_infotext(text: str) -> dict[str, Any]:
    """The web UI's infotext (prompt, ``Negative prompt: ...``, ``Steps: 20, Sampler: ...``) as a dict."""
    if not text:
        return {}
    lines = text.strip().split("\n")
    out: dict[str, Any] = {}
    last = lines[-1] if len(lines) > 1 and ": " in lines[-1] else ""
    body = lines[:-1] if last else lines
    prompt: list[str] = []
    negative: list[str] = []
    in_negative = False
    for line in body:
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[len("Negative prompt:"):].strip()
        (negative if in_negative else prompt).append(line)
    out["Prompt"] = "\n".join(prompt)
    out["Negative prompt"] = "\n".join(negative)
    for part in last.split(", "):
        key, sep, value = part.partition(": ")
        if sep:
            out[key.strip()] = value.strip()
    return out


def progress(snap: Mapping[str, Any], queued: int) -> dict[str, Any]:
    """``GET /sdapi/v1/progress`` from a :class:`~sdxl_export.serve.progress.ProgressTracker` snapshot."""
    running = bool(snap["running"])
    eta = snap.get("eta_s")
    return {"progress": float(snap["progress"]), "eta_relative": float(eta) if eta is not None else 0.0,
            "current_image": snap.get("current_image"), "textinfo": None,
            "state": {"skipped": bool(snap.get("skipped")), "interrupted": bool(snap.get("interrupted")),
                      "stopping_generation": False, "job": snap.get("kind", "") if running else "",
                      "job_count": int(queued) + (1 if running else 0),
                      "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(time.time()))
                      if running else "0", "job_no": 0,
                      "sampling_step": int(snap["step"]), "sampling_steps": int(snap["steps"])}}


def error_body(status: int, message: str, *, kind: str, request_id: str | None = None) -> dict[str, Any]:
    """The web UI's error shape (its API middleware): error, detail, body, errors."""
    out = {"error": kind, "detail": message, "body": "", "errors": message}
    if request_id:
        out["request_id"] = request_id
    return out
