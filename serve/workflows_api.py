"""Inpainting and hires fix over HTTP: A1111's img2img mask fields and txt2img ``enable_hr``,
``GET /sdapi/v1/upscalers`` and ``/sdapi/v1/latent-upscale-modes``, OpenAI ``POST
/v1/images/edits`` (multipart, as the ``openai`` client's ``images.edit`` sends it).

Semantics (docs/inpainting-and-hires.md has the long form):

* Sampling is diffusers' inpainting everywhere (:mod:`sdxl_export.runtime.inpaint`): the mask
  is binarised at 0.5 and the re-noised image latents are blended into x_t outside it. A1111
  instead blends the clean image latent into its sampler's x0 prediction; we do not
  reproduce that. The A1111 fields act before and after sampling as the web UI's do:
  ``mask_round`` (threshold at 128), ``inpainting_mask_invert``, ``mask_blur``/``_x``/``_y``
  (the web UI's ``cv2.GaussianBlur`` kernels), ``inpainting_fill`` 0 ("fill": the web UI's
  blurred-colour fill of the masked area) or 1 ("original"), ``inpaint_full_res`` +
  ``inpaint_full_res_padding`` (diffusers' ``padding_mask_crop``: crop around the mask at
  ``width x height``, paste back into the original), and the web UI's paste-back of the
  original outside the (blurred) mask. ``inpainting_fill`` 2/3 (latent noise/nothing),
  ``initial_noise_multiplier`` != 1 and ``resize_mode`` != 0 are 400s naming the field.
* Hires fix (``enable_hr``): :mod:`sdxl_export.runtime.hires`, with A1111's names for the
  upscalers; the second pass runs ``hr_second_pass_steps`` (or ``steps``) denoising steps, of
  a schedule of ``ceil(steps / denoising_strength)`` (A1111's "fix steps" rule). A different
  ``hr_prompt``, sampler, schedule or checkpoint for the second pass is a 400 naming it.
* OpenAI edits: the mask's alpha-0 pixels (or, without a mask, the image's own) are the area
  to redraw; ``strength`` (default diffusers' 0.9999) and the generations' extra fields apply.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Mapping
from typing import Any

from .common import ParamError, ParsedRequest, decode_image, get_bool, get_float, get_int, get_str

#: The web UI's non-latent upscalers that need no weights (its "None" is a Lanczos resize).
PIXEL_UPSCALERS = ("None", "Lanczos", "Nearest")


# ---- A1111 img2img inpainting --------------------------------------------------------------------
def _binary(mask: Any, round_it: bool) -> Any:
    """The web UI's ``create_binary_mask``: grayscale, thresholded at 128 when ``mask_round``."""
    m = mask.convert("L")
    return m.point(lambda x: 255 if x > 128 else 0) if round_it else m


def _blur(mask: Any, bx: int, by: int) -> Any:
    """The web UI's mask blur: separable ``cv2.GaussianBlur`` with its kernel sizes."""
    import cv2
    import numpy as np
    from PIL import Image

    arr = np.array(mask)
    if bx > 0:
        arr = cv2.GaussianBlur(arr, (2 * int(2.5 * bx + 0.5) + 1, 1), bx)
    if by > 0:
        arr = cv2.GaussianBlur(arr, (1, 2 * int(2.5 * by + 0.5) + 1), by)
    return Image.fromarray(arr)


def fill(image: Any, mask: Any) -> Any:
    """The web UI's ``inpainting_fill=0``: the masked area filled with blurred surrounding colours."""
    from PIL import Image, ImageFilter, ImageOps

    image_mod = Image.new("RGBA", (image.width, image.height))
    image_masked = Image.new("RGBa", (image.width, image.height))
    image_masked.paste(image.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask.convert("L")))
    image_masked = image_masked.convert("RGBa")
    for radius, repeats in [(256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1)]:
        blurred = image_masked.filter(ImageFilter.GaussianBlur(radius)).convert("RGBA")
        for _ in range(repeats):
            image_mod.alpha_composite(blurred)
    return image_mod.convert("RGB")


def a1111_mask(body: Mapping[str, Any], parsed: ParsedRequest, meta: dict[str, Any]) -> None:
    """Turn an A1111 img2img request with a ``mask`` into an inpainting request (in place)."""
    from diffusers.image_processor import VaeImageProcessor
    from PIL import Image, ImageOps

    mask = decode_image(body.get("mask"), "mask")
    invert = get_int(body, "inpainting_mask_invert", 0, lo=0, hi=1)
    round_it = get_bool(body, "mask_round", True)
    blur = get_int(body, "mask_blur", None, lo=0, hi=64)
    bx = blur if blur is not None else get_int(body, "mask_blur_x", 4, lo=0, hi=64)
    by = blur if blur is not None else get_int(body, "mask_blur_y", 4, lo=0, hi=64)
    fill_mode = get_int(body, "inpainting_fill", 0, lo=0, hi=3)
    if fill_mode in (2, 3):
        what = "latent noise" if fill_mode == 2 else "latent nothing"
        raise ParamError("inpainting_fill", f"inpainting_fill={fill_mode} ({what}) is not supported by this server",
                         "use 0 (fill) or 1 (original); denoising_strength 1.0 starts the masked area from noise",
                         code="unsupported_value")
    full_res = body.get("inpaint_full_res", True)
    if full_res in (0, 1) and not isinstance(full_res, bool):
        full_res = bool(full_res)
    if not isinstance(full_res, bool):
        raise ParamError("inpaint_full_res", f"'inpaint_full_res' must be true/false (or 0/1), got {full_res!r}",
                         "pass true (inpaint only the masked area) or false (the whole picture)")
    padding = get_int(body, "inpaint_full_res_padding", 0, lo=0, hi=1024)
    m = _binary(mask, bool(round_it))
    if invert:
        m = ImageOps.invert(m)
    m = _blur(m, int(bx or 0), int(by or 0))
    if not m.getbbox():
        raise ParamError("mask", "the mask is empty: it selects no pixel to repaint",
                         "paint the area to redraw white on black (or set inpainting_mask_invert)")
    images = parsed.images or []
    originals = list(images)
    if fill_mode == 0:
        filled: dict[int, Any] = {}
        parsed.images = [filled.setdefault(id(im), fill(im, m.resize(im.size, Image.LANCZOS)))
                         for im in images]
    parsed.masks = [m] * len(images)
    kw = parsed.kwargs
    if full_res:  # the pipeline crops around the mask and pastes back over the original itself
        kw["padding_mask_crop"] = int(padding or 0)
    else:
        h, w = kw["height"], kw["width"]
        proc = VaeImageProcessor(vae_scale_factor=8)
        import numpy as np

        over = m.resize((w, h), Image.LANCZOS)
        over = Image.fromarray(np.clip(np.asarray(over, dtype=np.float32) * 2, 0, 255).astype(np.uint8))

        def post(i: int, out: Any) -> Any:
            orig = originals[i].resize(out.size, Image.LANCZOS) if originals[i].size != out.size else originals[i]
            return proc.apply_overlay(over, orig, out)

        parsed.post = post
    meta.update(inpaint=True, mask_blur=(bx, by), inpainting_fill=fill_mode, inpaint_full_res=full_res)


# ---- A1111 txt2img hires fix ---------------------------------------------------------------------
def a1111_hires(body: Mapping[str, Any], kwargs: dict[str, Any], meta: dict[str, Any], *, prompt: str,
                negative: str, sampler: str, scheduler_field: str | None, base_model: str) -> None:
    """``enable_hr: true``: the hires-fix pipeline keywords (in ``kwargs``), or a 400 naming a field."""
    from ..errors import UnknownUpscalerError
    from ..runtime import find_upscaler

    if not get_bool(body, "enable_hr", False):
        return
    strength = get_float(body, "denoising_strength", 0.7, lo=0.0, hi=1.0, lo_open=True)
    assert strength is not None
    try:
        up = find_upscaler(get_str(body, "hr_upscaler", "Latent") or "Latent")
    except UnknownUpscalerError as exc:
        raise ParamError("hr_upscaler", f"hr_upscaler: {exc.message}", exc.hint, code="unsupported_value") from None
    for key, same in (("hr_prompt", prompt), ("hr_negative_prompt", negative)):
        v = get_str(body, key, "")
        if v not in ("", None, same):
            raise ParamError(key, f"a second-pass {key} different from the first pass's is not supported",
                             f"leave '{key}' empty (the first pass's is used)", code="unsupported_value")
    v = get_str(body, "hr_sampler_name")
    if v not in (None, "", "Use same sampler", sampler):
        raise ParamError("hr_sampler_name", f"a second-pass sampler ({v!r}) other than {sampler!r} is not supported",
                         "leave 'hr_sampler_name' out", code="unsupported_value")
    v = get_str(body, "hr_scheduler")
    if v not in (None, "", "Use same scheduler", scheduler_field):
        raise ParamError("hr_scheduler", f"a second-pass schedule type ({v!r}) is not supported",
                         "leave 'hr_scheduler' out", code="unsupported_value")
    v = get_str(body, "hr_checkpoint_name")
    if v not in (None, "", "Use same checkpoint", base_model):
        raise ParamError("hr_checkpoint_name", f"checkpoint {v!r} is not served for the second pass",
                         "leave 'hr_checkpoint_name' out", code="unsupported_value")
    h, w = int(kwargs["height"]), int(kwargs["width"])
    rx = get_int(body, "hr_resize_x", 0, lo=0) or 0
    ry = get_int(body, "hr_resize_y", 0, lo=0) or 0
    if rx or ry:
        tw = rx or (ry * w // h)
        th = ry or (rx * h // w)
        kwargs["hires_size"] = (th // 8 * 8, tw // 8 * 8)
    else:
        scale = get_float(body, "hr_scale", 2.0, lo=1.0, hi=8.0)
        kwargs["hires_scale"] = scale
    want = get_int(body, "hr_second_pass_steps", 0, lo=0) or int(kwargs["num_inference_steps"])
    n = math.ceil(want / min(strength, 0.999))
    while int(n * strength) < want:
        n += 1
    kwargs.update(hires_upscaler=up.name, hires_steps=n, hires_strength=strength)
    meta.update(hires={"upscaler": up.a1111, "scale": kwargs.get("hires_scale"), "steps": want,
                       "resize": kwargs.get("hires_size")}, denoising_strength=strength)


def upscalers() -> list[dict[str, Any]]:
    """``GET /sdapi/v1/upscalers``: the web UI's shape; only upscalers that need no weights."""
    return [{"name": n, "model_name": None, "model_path": None, "model_url": None, "scale": 4}
            for n in PIXEL_UPSCALERS]


def latent_upscale_modes() -> list[dict[str, str]]:
    from ..runtime import UPSCALERS

    return [{"name": u.a1111} for u in UPSCALERS if u.kind == "latent"]


# ---- OpenAI edits ----------------------------------------------------------------------------------
#: Form fields the ``openai`` client sends as text, and how we read them.
_FORM_INTS = ("n", "seed", "steps")
_FORM_FLOATS = ("guidance_scale", "denoising_end", "strength")
_FORM_BOOLS = ("refiner",)
EDIT_ONLY = {"input_fidelity": (None, "low", "high")}


def _read_upload(raw: bytes, key: str) -> Any:
    from PIL import Image, UnidentifiedImageError

    try:
        img = Image.open(io.BytesIO(raw))
        img.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ParamError(key, f"'{key}' is not a readable image ({exc})", f"upload '{key}' as a PNG") from None
    return img


def _coerce(fields: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in fields.items():
        try:
            if k in _FORM_INTS:
                out[k] = int(v)
            elif k in _FORM_FLOATS:
                out[k] = float(v)
            elif k in _FORM_BOOLS:
                if v.lower() not in ("true", "false", "1", "0"):
                    raise ValueError(v)
                out[k] = v.lower() in ("true", "1")
            else:
                out[k] = v
        except ValueError:
            raise ParamError(k, f"'{k}' = {v!r} is not a {'number' if k not in _FORM_BOOLS else 'boolean'}",
                             f"send '{k}' as a {'number' if k not in _FORM_BOOLS else 'boolean'}") from None
    return out


def parse_edit(fields: Mapping[str, str], files: Mapping[str, list[bytes]], *, model_ids: list[str],
               has_refiner: bool, max_images: int) -> ParsedRequest:
    """``POST /v1/images/edits`` -> an inpainting request (the generations fields + ``strength``)."""
    from . import openai_api

    body = _coerce(fields)
    for key, allowed in EDIT_ONLY.items():
        if body.pop(key, None) not in allowed:
            raise ParamError(key, f"'{key}' = {fields.get(key)!r} is not supported by this server",
                             f"leave '{key}' out", code="unsupported_value")
    strength = body.pop("strength", None)
    if strength is not None and not 0.0 < strength <= 1.0:
        raise ParamError("strength", f"'strength' must be in (0, 1], got {strength}", "pass e.g. 0.9999 or 0.6")
    for key in body:
        if key in ("image", "image[]", "mask"):
            raise ParamError(key, f"'{key}' must be uploaded as a file", f"send '{key}' as a PNG file part")
    parsed = openai_api.parse(body, model_ids=model_ids, has_refiner=has_refiner, max_images=max_images)
    uploads = files.get("image") or files.get("image[]") or []
    if len(uploads) != 1:
        raise ParamError("image", f"{len(uploads)} images uploaded; this server edits exactly one",
                         "upload one PNG as 'image'", code="missing_required" if not uploads else "invalid_value")
    image = _read_upload(uploads[0], "image")
    masks = files.get("mask") or []
    if len(masks) > 1:
        raise ParamError("mask", "several masks uploaded", "upload one PNG as 'mask'")
    if masks:
        source = _read_upload(masks[0], "mask")
        if "A" not in source.getbands():
            raise ParamError("mask", "the mask has no alpha channel: its transparent pixels say where to edit",
                             "upload an RGBA PNG whose fully transparent pixels mark the area to redraw")
    else:
        source = image
        if "A" not in image.getbands() and not (image.mode == "P" and "transparency" in image.info):
            raise ParamError("image", "no mask was sent and the image has no transparent pixels to redraw",
                             "upload a mask (alpha 0 = edit), or an image whose area to redraw is transparent")
    alpha = source.convert("RGBA").getchannel("A")
    mask = alpha.point(lambda a: 255 if a == 0 else 0)
    if not mask.getbbox():
        raise ParamError("mask" if masks else "image", "nothing to edit: no pixel is fully transparent",
                         "make the area to redraw fully transparent (alpha 0)")
    rgb = image.convert("RGB")
    n = len(parsed.prompts)
    parsed.images = [rgb] * n
    parsed.masks = [mask] * n
    if strength is not None:
        parsed.kwargs["strength"] = strength
    parsed.echo.update(strength=strength)
    return parsed


# ---- routes ----------------------------------------------------------------------------------------
def register(app: Any, *, generate: Callable[..., Any], encode: Callable[..., Any], guarded: Callable[..., Any],
             service: Callable[[], Any], config: Any) -> None:
    """Add ``/v1/images/edits``, ``/sdapi/v1/upscalers`` and ``/sdapi/v1/latent-upscale-modes``."""
    from fastapi import Request
    from starlette.datastructures import UploadFile

    from . import openai_api

    @app.post("/v1/images/edits")
    @guarded
    async def images_edits(request: Request) -> Any:
        svc = service()
        svc.check_ready()
        ctype = request.headers.get("content-type", "")
        if not ctype.startswith("multipart/form-data"):
            raise ParamError("body", "images/edits takes multipart/form-data (image and mask as files)",
                             "send it as the openai client's images.edit does")
        await request.body()  # read (and size-capped) once; the form parser reads the cached body
        try:
            form = await request.form(max_files=4, max_fields=64)
        except Exception as exc:  # noqa: BLE001 -- a malformed multipart body is the client's
            raise ParamError("body", f"the multipart body cannot be parsed ({type(exc).__name__})",
                             "send multipart/form-data as the openai client does") from None
        fields: dict[str, str] = {}
        files: dict[str, list[bytes]] = {}
        for key, value in form.multi_items():
            if isinstance(value, UploadFile):
                files.setdefault(key, []).append(await value.read())
            else:
                fields[key] = str(value)

        def parse(_body: Any, svc: Any) -> ParsedRequest:
            return parse_edit(fields, files, model_ids=[config.served_model_name],
                              has_refiner=bool(svc.pipe is not None and svc.pipe.has_refiner),
                              max_images=config.max_images_per_request)

        results = await generate(request, parse, json_body=False)
        return openai_api.response(await encode(results), [r.seed for r in results])

    @app.get("/sdapi/v1/upscalers")
    @guarded
    async def list_upscalers(request: Request) -> Any:
        return upscalers()

    @app.get("/sdapi/v1/latent-upscale-modes")
    @guarded
    async def list_latent_modes(request: Request) -> Any:
        return latent_upscale_modes()
