"""Hires fix: a first pass at ``height x width``, an upscale, an img2img pass at the target size.

One call (``pipe(..., hires_scale=2)``) is, by definition, this composition of diffusers'
pipelines on the same weights, with one generator carried through (as base -> refiner):

1. the txt2img call as asked (base, + the refiner hand-off when ``refiner=True``), with
   ``output_type="latent"`` for a latent upscaler or ``"pil"`` for a pixel one;
2. the upscale to the target ``(H, W)`` (``hires_size``, or ``int(h * scale)`` rounded down to
   a multiple of 8): latent upscalers are ``torch.nn.functional.interpolate`` on the latents
   (A1111's "Latent" modes: bilinear, bicubic, nearest, nearest-exact, with/without
   antialiasing); pixel upscalers are PIL's ``resize`` (Lanczos, nearest);
3. ``StableDiffusionXLImg2ImgPipeline`` on the base at ``(H, W)`` with ``hires_strength`` and
   ``hires_steps`` (diffusers' ``num_inference_steps``: it runs ``int(steps * strength)`` of
   them); latents go in as latents (diffusers' img2img takes them without a VAE encode).

Everything is checked before the first pass runs: both passes' arguments, the upscaler, and
that the engines serve the target size (a size outside every built profile is an
:class:`~sdxl_export.errors.UnsupportedShapeError` naming the served sizes).
"""

from __future__ import annotations

import logging
import secrets
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ..errors import InvalidRequestError, UnknownUpscalerError, UnsupportedShapeError

if TYPE_CHECKING:
    from .pipeline import SDXLPipeline, SDXLPipelineOutput

log = logging.getLogger(__name__)

#: A1111's default hires denoising strength (the web UI's and webuiapi's 0.7).
DEFAULT_STRENGTH = 0.7


@dataclass(frozen=True)
class Upscaler:
    name: str  # ours
    a1111: str  # the web UI's name
    kind: str  # "latent" | "pixel"
    mode: str  # interpolate mode, or the PIL resample filter
    antialias: bool = False


UPSCALERS = (
    Upscaler("latent", "Latent", "latent", "bilinear"),
    Upscaler("latent-antialiased", "Latent (antialiased)", "latent", "bilinear", True),
    Upscaler("latent-bicubic", "Latent (bicubic)", "latent", "bicubic"),
    Upscaler("latent-bicubic-antialiased", "Latent (bicubic antialiased)", "latent", "bicubic", True),
    Upscaler("latent-nearest", "Latent (nearest)", "latent", "nearest"),
    Upscaler("latent-nearest-exact", "Latent (nearest-exact)", "latent", "nearest-exact"),
    Upscaler("lanczos", "Lanczos", "pixel", "lanczos"),
    Upscaler("nearest", "Nearest", "pixel", "nearest"),
)
#: Upscalers of the web UI that run a model (weights we do not ship): named, then refused.
WEIGHTED = ("ESRGAN_4x", "R-ESRGAN 4x+", "R-ESRGAN 4x+ Anime6B", "LDSR", "ScuNET", "ScuNET PSNR", "SwinIR_4x",
            "DAT x2", "DAT x3", "DAT x4", "HAT")
_WEIGHTED_MARKS = ("esrgan", "ldsr", "scunet", "swinir", "dat", "hat", "4x", "2x", "3x", "gan")


def upscaler_names() -> list[str]:
    return [u.name for u in UPSCALERS]


def find_upscaler(name: Any) -> Upscaler:
    """Our name or the web UI's (case-insensitive; ``None`` is the web UI's "None": Lanczos resize)."""
    key = str(name).strip().lower()
    if key == "none":
        key = "lanczos"
    for u in UPSCALERS:
        if key in (u.name, u.a1111.lower()):
            return u
    ours = ", ".join(f"{u.name} ({u.a1111})" for u in UPSCALERS)
    if any(m in key for m in _WEIGHTED_MARKS):
        raise UnknownUpscalerError(f"upscaler {name!r} runs a model (ESRGAN family) whose weights are not shipped",
                                   f"use one of ours, which need no weights: {ours}")
    raise UnknownUpscalerError(f"unknown upscaler {name!r}", f"use one of: {ours}")


@dataclass(frozen=True)
class HiresFix:
    """The hires-fix settings of one call (checked)."""

    upscaler: Upscaler
    scale: float | None
    size: tuple[int, int] | None
    steps: int | None
    strength: float

    @classmethod
    def make(cls, *, scale: Any = None, size: Any = None, upscaler: Any = "latent", steps: Any = None,
             strength: Any = None) -> HiresFix:
        if scale is not None and size is not None:
            raise InvalidRequestError("pass hires_scale or hires_size, not both",
                                      "hires_scale=2 doubles both sides; hires_size=(H, W) names the target")
        if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))
                                  or not 1.0 <= float(scale) <= 8.0):
            raise InvalidRequestError(f"hires_scale must be a number in [1, 8], got {scale!r}",
                                      "pass e.g. 1.5 or 2")
        if size is not None and not (isinstance(size, (tuple, list)) and len(size) == 2
                                     and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size)):
            raise InvalidRequestError(f"hires_size must be (height, width) in pixels, got {size!r}",
                                      "pass e.g. (512, 512)")
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
            raise InvalidRequestError(f"hires_steps must be an integer >= 1, got {steps!r}",
                                      "pass the second pass's steps, or None for the first pass's")
        s = DEFAULT_STRENGTH if strength is None else strength
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not 0.0 < float(s) <= 1.0:
            raise InvalidRequestError(f"hires_strength must be in (0, 1], got {strength!r}",
                                      "pass the second pass's denoising strength, e.g. 0.5")
        return cls(find_upscaler(upscaler), None if scale is None else float(scale),
                   None if size is None else (int(size[0]), int(size[1])), steps, float(s))

    def target(self, height: int, width: int, vae_scale: int) -> tuple[int, int]:
        if self.size is not None:
            return self.size
        assert self.scale is not None
        return (int(height * self.scale) // vae_scale * vae_scale, int(width * self.scale) // vae_scale * vae_scale)


def upscale(fix: HiresFix, first: Any, size: tuple[int, int], vae_scale: int) -> Any:
    """The upscale step: latents -> latents (interpolate) or PIL images -> PIL images (resize)."""
    h, w = size
    u = fix.upscaler
    if u.kind == "latent":
        return torch.nn.functional.interpolate(first, size=(h // vae_scale, w // vae_scale), mode=u.mode,
                                               antialias=u.antialias)
    from PIL import Image

    resample = {"lanczos": Image.LANCZOS, "nearest": Image.NEAREST}[u.mode]
    return [im.resize((w, h), resample=resample) for im in first]


HIRES_KEYS = ("hires_scale", "hires_size", "hires_upscaler", "hires_steps", "hires_strength")


def split_kwargs(kwargs: dict[str, Any]) -> tuple[dict[str, Any], HiresFix | None]:
    """``(the call's other keywords, its hires fix or None)`` from one call's keywords."""
    hi = {k: kwargs.pop(k) for k in HIRES_KEYS if k in kwargs}
    if hi.get("hires_scale") is None and hi.get("hires_size") is None:
        if any(hi.get(k) is not None for k in ("hires_steps", "hires_strength")):
            raise InvalidRequestError("hires_steps/hires_strength need hires_scale or hires_size",
                                      "pass hires_scale (e.g. 2) to run the hires fix, or drop them")
        return kwargs, None
    return kwargs, HiresFix.make(scale=hi.get("hires_scale"), size=hi.get("hires_size"),
                                 upscaler=hi.get("hires_upscaler", "latent"), steps=hi.get("hires_steps"),
                                 strength=hi.get("hires_strength"))


@dataclass
class HiresPlan:
    """A checked hires call: the first pass's keywords, the second's, the target size."""

    first: dict[str, Any]
    second: dict[str, Any]
    size: tuple[int, int]
    first_size: tuple[int, int]
    steps: int
    norm: dict[str, Any]


def check(pipe: SDXLPipeline, kw: dict[str, Any], fix: HiresFix) -> HiresPlan:
    """Every check of both passes (named errors), before any work (module docstring)."""
    for k in ("image", "mask_image", "padding_mask_crop", "strength"):
        if kw.get(k) is not None:
            raise InvalidRequestError(f"hires fix is text-to-image; {k} cannot go with it",
                                      "drop hires_* for img2img/inpainting, or drop " + k)
    if kw.get("refiner_only"):
        raise InvalidRequestError("hires fix is text-to-image; refiner_only cannot go with it", "drop refiner_only")
    first_kw = {k: v for k, v in kw.items() if k not in ("loras", "callback_on_step_end")}
    first_kw["output_type"] = "latent" if fix.upscaler.kind == "latent" else "pil"
    probe_seed = {"seed": 0, "generator": None} if kw.get("seed") is None and kw.get("generator") is None else {}
    norm = pipe.check_call(**dict(first_kw, **probe_seed))
    height, width = norm["height"], norm["width"]
    size = fix.target(height, width, pipe.vae_scale)
    if size[0] % pipe.vae_scale or size[1] % pipe.vae_scale or min(size) < pipe.vae_scale:
        raise InvalidRequestError(f"the hires target {size[0]}x{size[1]} is not made of multiples of {pipe.vae_scale}",
                                  f"pass hires_size as multiples of {pipe.vae_scale}")
    steps = fix.steps or int(norm["steps"])  # the first pass's (a model's recorded default included)
    second_kw = _second_kwargs(kw, size, steps, fix)
    probe = (torch.zeros(1, pipe.latent_channels, size[0] // pipe.vae_scale, size[1] // pipe.vae_scale)
             if fix.upscaler.kind == "latent" else torch.zeros(1, 3, *size))
    try:
        pipe.check_call(**dict(second_kw, image=probe, seed=0, generator=None))
    except UnsupportedShapeError as exc:
        served = pipe.served_sizes() or []
        raise UnsupportedShapeError(
            f"the hires target {size[0]}x{size[1]} is a size the built engines do not serve ({exc.message})",
            "rebuild the engines with --hires-scale covering it (or --buckets), or pick a served target: "
            + (", ".join(f"{h}x{w}" for h, w in served) or "none")) from None
    norm = dict(norm, output_type=kw.get("output_type", "pil"),
                hires={"upscaler": fix.upscaler.name, "target": list(size), "steps": steps, "strength": fix.strength})
    return HiresPlan(first_kw, second_kw, size, (height, width), steps, norm)


def run(pipe: SDXLPipeline, kw: dict[str, Any], fix: HiresFix) -> SDXLPipelineOutput:
    """First pass, upscale, second pass (module docstring); every check before any work."""
    t0 = time.perf_counter()
    plan = check(pipe, kw, fix)
    generator, seed = kw.get("generator"), kw.get("seed")
    if generator is None:  # seed=S is generator=torch.Generator("cpu").manual_seed(S), carried into pass 2
        seed = secrets.randbits(63) if seed is None else int(seed)
        generator = torch.Generator("cpu").manual_seed(seed)
    on_step = kw.get("callback_on_step_end")  # both passes report steps (and can be stopped)
    first = pipe(**dict(plan.first, seed=None, generator=generator, loras=kw.get("loras"),
                        callback_on_step_end=on_step))
    t1 = time.perf_counter()
    up = upscale(fix, first.latents if fix.upscaler.kind == "latent" else first.images, plan.size, pipe.vae_scale)
    t_up = time.perf_counter() - t1
    second = pipe(**dict(plan.second, image=up, seed=None, generator=generator, loras=kw.get("loras"),
                         callback_on_step_end=on_step))
    for stage, secs in first.timings.stages.items():
        second.timings.stages[stage] = secs + second.timings.stages.get(stage, [])
    second.timings.total = time.perf_counter() - t0
    second.seed = seed
    second.info.update(
        hires={"upscaler": fix.upscaler.name, "first_size": list(plan.first_size), "target": list(plan.size),
               "steps": plan.steps, "strength": fix.strength, "first_pass_s": round(first.timings.total, 4),
               "upscale_s": round(t_up, 4), "first_steps": first.info["base_steps"] + first.info["refiner_steps"]},
        img2img=False, strength=None)
    return second


def _second_kwargs(kw: dict[str, Any], size: tuple[int, int], steps: int, fix: HiresFix) -> dict[str, Any]:
    """The img2img pass: base only, at the target size (its own micro-conditioning sizes)."""
    defaults = {"negative_prompt": None, "guidance_scale": 5.0, "num_images_per_prompt": 1, "scheduler": "euler",
                "crops_coords_top_left": (0, 0), "output_type": "pil"}  # the pipeline's (check_call passes few)
    out = {k: kw.get(k, d) for k, d in defaults.items()}
    out["prompt"] = kw["prompt"]
    out["eta"] = kw.get("eta", 0.0)  # custom timesteps/sigmas belong to the first pass's schedule only
    out.update(height=size[0], width=size[1], num_inference_steps=steps, strength=fix.strength, refiner=False)
    return out
