"""Validation of one sampling request, before any component runs.

Each bad argument is an :class:`InvalidRequestError` whose hint says what to pass
instead; the CLI prints it on one line. The checks are the ones diffusers' SDXL
pipelines make (sizes divisible by 8, matching negative batch, ...) plus the ones it
leaves to crash later (steps < 1, negative guidance, ``denoising_end`` outside (0, 1)).
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..buckets import nearest_bucket
from ..errors import InvalidRequestError
from .schedulers import canonical_name

OUTPUT_TYPES = ("pil", "np", "pt", "latent")


@dataclass
class SampleRequest:
    """A checked, normalised request (prompt batch as lists, sizes as int tuples)."""

    prompts: list[str]
    negatives: list[str] | None
    height: int
    width: int
    steps: int
    guidance_scale: float
    denoising_end: float
    refiner: bool
    generator: Any
    seed: int | None
    images_per_prompt: int
    scheduler: str
    original_size: tuple[int, int]
    crops_coords_top_left: tuple[int, int]
    target_size: tuple[int, int]
    aesthetic_score: float
    negative_aesthetic_score: float
    output_type: str
    #: img2img: the preprocessed image batch (N, 3, H, W) in [-1, 1], its strength, and whether
    #: the refiner alone denoises it (no base). None for text-to-image.
    image: torch.Tensor | None = None
    strength: float = 1.0
    refiner_only: bool = False
    #: ``callback_on_step_end(pipe, i, t, callback_kwargs)`` (diffusers' shape), called after
    #: every denoising step of either stage; may return ``{"latents": ...}``, may raise to stop.
    on_step: Any = None
    #: inpainting: the preprocessed image, mask and crop (:class:`~.inpaint.InpaintInputs`), else None.
    inpaint: Any = None
    #: ControlNet: the checked runtime.controlnet.ControlRequest, None without ControlNet.
    control: Any = None
    #: diffusers' ``eta`` (schedulers whose ``step`` takes it) and custom ``timesteps``/``sigmas``
    eta: float = 0.0
    timesteps: list[int] | None = None
    sigmas: list[float] | None = None

    @property
    def custom_schedule(self) -> dict[str, Any]:
        """The custom schedule as keyword arguments of :mod:`.schedulers`' timestep helpers."""
        return {"timesteps": self.timesteps, "sigmas": self.sigmas}

    @property
    def batch(self) -> int:
        """Latent batch: prompts x images per prompt."""
        return len(self.prompts) * self.images_per_prompt

    @property
    def guidance(self) -> bool:
        """Classifier-free guidance runs when the scale is above 1 (diffusers' rule)."""
        return self.guidance_scale > 1.0


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _prompt_list(value: Any, what: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)) and value and all(isinstance(p, str) for p in value):
        return list(value)
    raise InvalidRequestError(f"{what} must be a string or a non-empty list of strings, got {type(value).__name__}",
                              f"pass {what} as text, or a list of texts for a batch")


def _pair(value: Any, what: str, minimum: int) -> tuple[int, int]:
    if (isinstance(value, (tuple, list)) and len(value) == 2 and all(_is_int(v) for v in value)
            and all(v >= minimum for v in value)):
        return int(value[0]), int(value[1])
    raise InvalidRequestError(f"{what} must be two integers >= {minimum} (height, width), got {value!r}",
                              f"pass {what} as a (height, width) tuple")


def _finite(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidRequestError(f"{what} must be a finite number, got {value!r}", f"pass a number as {what}")
    return float(value)


def check_size(height: Any, width: Any, vae_scale: int, native: int) -> tuple[int, int]:
    if not (_is_int(height) and _is_int(width)) or height <= 0 or width <= 0:
        raise InvalidRequestError(f"height and width must be positive integers, got {height!r}x{width!r}",
                                  f"pass sizes such as {native}x{native}")
    if height % vae_scale or width % vae_scale:
        b = nearest_bucket(height, width, native)
        raise InvalidRequestError(
            f"height and width must be multiples of {vae_scale}, got {height}x{width}",
            f"use the nearest SDXL bucket {b} (run --bucket, pipe.nearest_size) or round to a multiple of {vae_scale}",
        )
    return int(height), int(width)


def check_request(
    *, prompt: Any, negative_prompt: Any, height: Any, width: Any, num_inference_steps: Any,
    guidance_scale: Any, denoising_end: Any, refiner: bool, seed: Any, generator: Any,
    num_images_per_prompt: Any, scheduler: str, original_size: Any, crops_coords_top_left: Any,
    target_size: Any, aesthetic_score: Any, negative_aesthetic_score: Any, output_type: str,
    native: int, vae_scale: int,
) -> SampleRequest:
    prompts = _prompt_list(prompt, "prompt")
    negatives = None
    if negative_prompt is not None:
        negatives = _prompt_list(negative_prompt, "negative_prompt")
        if isinstance(negative_prompt, str):
            negatives = negatives * len(prompts)
        if len(negatives) != len(prompts):
            raise InvalidRequestError(
                f"negative_prompt has {len(negatives)} entries but prompt has {len(prompts)}",
                "pass one negative prompt per prompt, or a single string for all",
            )
    h, w = check_size(native if height is None else height, native if width is None else width,
                      vae_scale, native)
    if not _is_int(num_inference_steps) or num_inference_steps < 1:
        raise InvalidRequestError(f"num_inference_steps must be an integer >= 1, got {num_inference_steps!r}",
                                  "pass steps >= 1 (SDXL's usual: 30-50)")
    g = _finite(guidance_scale, "guidance_scale")
    if g < 0:
        raise InvalidRequestError(f"guidance_scale must be >= 0, got {g}",
                                  "pass a guidance scale >= 0 (SDXL default 5.0; <= 1 disables guidance)")
    d = _finite(denoising_end, "denoising_end")
    if not 0.0 < d < 1.0:
        raise InvalidRequestError(f"denoising_end must be strictly between 0 and 1, got {d}",
                                  "pass a fraction such as 0.8 (base denoises 80%, the refiner the rest)")
    if not _is_int(num_images_per_prompt) or num_images_per_prompt < 1:
        raise InvalidRequestError(f"num_images_per_prompt must be an integer >= 1, got {num_images_per_prompt!r}",
                                  "pass 1 or more")
    if output_type not in OUTPUT_TYPES:
        raise InvalidRequestError(f"unknown output_type {output_type!r}", f"use one of: {', '.join(OUTPUT_TYPES)}")
    if seed is not None and generator is not None:
        raise InvalidRequestError("pass either seed or generator, not both",
                                  "seed=S is generator=torch.Generator('cpu').manual_seed(S)")
    if seed is not None and (not _is_int(seed) or not 0 <= seed < 2**64):
        raise InvalidRequestError(f"seed must be an integer in [0, 2**64), got {seed!r}", "pass a non-negative int")
    if generator is None:
        if seed is None:
            seed = secrets.randbits(63)
        generator = torch.Generator("cpu").manual_seed(int(seed))
    elif not isinstance(generator, torch.Generator) and not (
            isinstance(generator, (list, tuple)) and all(isinstance(x, torch.Generator) for x in generator)):
        raise InvalidRequestError(f"generator must be a torch.Generator, got {type(generator).__name__}",
                                  "pass torch.Generator('cpu').manual_seed(S), or seed=S")
    batch = len(prompts) * num_images_per_prompt
    if isinstance(generator, (list, tuple)) and len(generator) != batch:
        raise InvalidRequestError(f"{len(generator)} generators for {batch} images",
                                  "pass one generator per image, or a single one")
    orig = _pair(original_size, "original_size", 1) if original_size is not None else (h, w)
    target = _pair(target_size, "target_size", 1) if target_size is not None else (h, w)
    return SampleRequest(
        prompts=prompts, negatives=negatives, height=h, width=w, steps=int(num_inference_steps),
        guidance_scale=g, denoising_end=d, refiner=bool(refiner),
        generator=list(generator) if isinstance(generator, tuple) else generator, seed=seed,
        images_per_prompt=int(num_images_per_prompt), scheduler=canonical_name(scheduler),
        original_size=orig, crops_coords_top_left=_pair(crops_coords_top_left, "crops_coords_top_left", 0),
        target_size=target, aesthetic_score=_finite(aesthetic_score, "aesthetic_score"),
        negative_aesthetic_score=_finite(negative_aesthetic_score, "negative_aesthetic_score"),
        output_type=output_type,
    )


def check_img2img(req: SampleRequest, *, image: torch.Tensor | None, strength: Any, refiner_only: Any,
                  mask_image: Any, default_strength: float) -> SampleRequest:
    """The img2img arguments, with the rules of diffusers' img2img pipeline plus the ones it
    leaves to crash later (a strength that rounds to no step, an image batch that does not
    divide the output batch)."""
    from ..errors import InvalidImageError
    from .img2img import check_image_batch
    from .schedulers import strength_steps

    if mask_image is not None:
        raise InvalidImageError("a mask was given, but inpainting is not supported",
                                "drop the mask: img2img (image= with strength=) repaints the whole image")
    if image is None:
        if strength is not None:
            raise InvalidRequestError("strength applies to image-to-image only, and no image was given",
                                      "pass image= (--image FILE), or drop strength")
        if refiner_only:
            raise InvalidRequestError("refiner_only needs an image to refine",
                                      "pass image= (--image FILE) with refiner_only=True")
        return req
    s = default_strength if strength is None else _finite(strength, "strength")
    if not 0.0 < s <= 1.0:
        raise InvalidRequestError(f"strength must be in (0, 1], got {s}",
                                  "pass a fraction such as 0.3 (light touch) to 1.0 (repaint everything)")
    if strength_steps(req.steps, s) < 1:
        raise InvalidRequestError(
            f"strength {s} x {req.steps} steps rounds down to no denoising step",
            f"raise strength to >= {1 / req.steps:.3g} or the number of steps to >= {math.ceil(1 / s)}")
    check_image_batch(int(image.shape[0]), req.batch)
    if refiner_only and not req.refiner:
        raise InvalidRequestError("refiner_only=True asks for the refiner, refiner=False turns it off",
                                  "drop refiner=False (--no-refiner) to refine the image")
    req.image, req.strength, req.refiner_only = image, s, bool(refiner_only)
    return req


def repeat_per_image(x: torch.Tensor, n: int) -> torch.Tensor:
    """diffusers' ``repeat(1, n, ...).view(B * n, ...)``: each prompt's rows n times in a row."""
    if n == 1:
        return x
    reps: Sequence[int] = (1, n) + (1,) * (x.dim() - 2)
    return x.repeat(*reps).view(x.shape[0] * n, *x.shape[1:])
