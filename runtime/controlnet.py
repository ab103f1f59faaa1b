"""ControlNet at run time: diffusers' ``StableDiffusionXLControlNetPipeline`` semantics on our graphs.

What a call means (``pipe(..., control_image=, controlnet=, controlnet_conditioning_scale=,
control_guidance_start=, control_guidance_end=, guess_mode=)``), read from diffusers 0.42's
``pipeline_controlnet_sd_xl.py`` / ``_img2img.py`` and ``MultiControlNetModel``:

* the control image goes through ``VaeImageProcessor(do_convert_rgb=True, do_normalize=False)``
  at the call's size (without ``height``/``width``: the control image's own size, rounded down
  to multiples of 8 -- diffusers' default), repeated to the batch, doubled under guidance;
* step ``i`` of the ``N`` steps of the schedule (the full schedule for text-to-image, before the
  ``denoising_end`` hand-off cut, as diffusers computes ``controlnet_keep``; the strength's
  steps for img2img) keeps ControlNet ``j`` when ``not (i/N < start_j or (i+1)/N > end_j)``; its
  residuals are scaled by ``scale_j * keep``;
* guess mode (or a ControlNet with ``global_pool_conditions``) under guidance: the ControlNets
  run on the conditional half only, with residual ``k`` scaled by ``logspace(-1, 0, K)[k] *
  scale`` (not for global-pool ones), and zeros are concatenated for the unconditional half;
* several ControlNets: their residuals are summed in order (``MultiControlNetModel``).

Our graphs take the per-residual scales as a tensor input (``conditioning_scale``), so the
window, the scales and guess mode need no rebuild. Where every ControlNet's scale is zero at a
step (outside all windows) diffusers still runs them and adds zeros; we run the plain ``unet``
graph instead (``x + 0`` is ``x``), which is the same image and faster.

A :class:`ControlRequest` is checked completely before any component runs; bad input is a
named :class:`InvalidRequestError` (unknown ControlNet, wrong channel count, NaN scale, a window
with start >= end, ...), and nothing changes.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import InvalidImageError, InvalidRequestError
from ..models.controlnet import PREFIX, component_name, controlnet_of
from . import img2img

log = logging.getLogger(__name__)


class UnknownControlNetError(InvalidRequestError):
    """A ControlNet name that this export does not hold (or none built at all)."""


class InvalidControlError(InvalidRequestError):
    """A ControlNet argument out of range or of the wrong shape (scale, window, image channels)."""


# ---- what the export holds ------------------------------------------------------------------------
def component_names(components: Sequence[str]) -> list[str]:
    """The ControlNet components to open: ``unet_controlnet`` and every ``controlnet_<name>``."""
    if "unet_controlnet" not in components:
        return []
    return ["unet_controlnet", *sorted(c for c in components if c.startswith(PREFIX))]


def available(runners: Mapping[str, Any]) -> list[str]:
    """Names of the ControlNets a pipeline has open."""
    if "unet_controlnet" not in runners:
        return []
    return sorted(controlnet_of(n) for n in runners if n.startswith(PREFIX))


#: the public name (``sdxl_export.runtime.available_controlnets``)
available_controlnets = available


# ---- one call's ControlNet arguments ---------------------------------------------------------------
@dataclass(frozen=True)
class ControlUnit:
    name: str
    image: torch.Tensor  # (N, C, H, W) float32 in [0, 1], one per output image
    scale: float
    start: float
    end: float
    global_pool: bool


@dataclass(frozen=True)
class ControlRequest:
    units: tuple[ControlUnit, ...]
    guess_mode: bool

    @property
    def key(self) -> tuple[str, ...]:
        """What a batcher groups by: the ControlNet set (scales/windows/images may differ per call
        only when batched calls are split; see serve/controlnet_api.py)."""
        return tuple(u.name for u in self.units)

    def describe(self) -> dict[str, Any]:
        return {"controlnets": [{"name": u.name, "scale": u.scale, "start": u.start, "end": u.end}
                                for u in self.units], "guess_mode": self.guess_mode}


def _as_list(value: Any, n: int, what: str) -> list[Any]:
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise InvalidControlError(f"{what} has {len(value)} values for {n} ControlNet(s)",
                                      f"pass one {what} per ControlNet, or a single value for all")
        return list(value)
    return [value] * n


def _fraction(x: Any, what: str) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(float(x)):
        raise InvalidControlError(f"{what} must be a finite number, got {x!r}", f"pass {what} in [0, 1]")
    return float(x)


def check_control(runners: Mapping[str, Any], processor: Any, *, control_image: Any, controlnet: Any,
                  scale: Any, start: Any, end: Any, guess_mode: Any, height: int | None, width: int | None,
                  batch: int, images_per_prompt: int) -> ControlRequest | None:
    """Check and normalise one call's ControlNet arguments (diffusers' names and defaults)."""
    if control_image is None:
        if controlnet is not None and controlnet != []:
            raise InvalidControlError("controlnet= was given without control_image=",
                                      "pass the control map(s) as control_image=")
        return None
    have = available(runners)
    if not have:
        raise UnknownControlNetError("this export holds no ControlNet",
                                     "export or build with --controlnet DIR|FILE, then pass its name")
    if controlnet is None:
        if len(have) != 1:
            raise UnknownControlNetError(f"this export holds several ControlNets ({', '.join(have)})",
                                         "name the one(s) to use: controlnet=NAME or [NAMES]")
        names = list(have)
    else:
        names = [controlnet] if isinstance(controlnet, str) else list(controlnet)
        if not names or not all(isinstance(n, str) for n in names):
            raise InvalidControlError("controlnet must be a name or a non-empty list of names",
                                      f"use one of: {', '.join(have)}")
    for n in names:
        if n not in have:
            raise UnknownControlNetError(f"unknown ControlNet {n!r}; this export holds: {', '.join(have)}",
                                         "pass one of those names, or build it with --controlnet DIR|FILE")
    multi = isinstance(controlnet, (list, tuple))
    if multi:
        if not isinstance(control_image, (list, tuple)) or len(control_image) != len(names):
            raise InvalidControlError(f"{len(names)} ControlNets need {len(names)} control images (a list, one "
                                      "image or image batch each)", "pass control_image=[img_for_each_controlnet]")
        images = list(control_image)
    else:
        images = [control_image]
    scales = [_fraction(s, "controlnet_conditioning_scale") for s in
              _as_list(scale, len(names), "controlnet_conditioning_scale")]
    starts = [_fraction(s, "control_guidance_start") for s in _as_list(start, len(names), "control_guidance_start")]
    ends = [_fraction(e, "control_guidance_end") for e in _as_list(end, len(names), "control_guidance_end")]
    for s, e in zip(starts, ends):
        if not (0.0 <= s < e <= 1.0):
            raise InvalidControlError(f"control window start={s} end={e}: need 0 <= start < end <= 1",
                                      "pass control_guidance_start below control_guidance_end, both in [0, 1]")
    if not isinstance(guess_mode, bool):
        raise InvalidControlError(f"guess_mode must be true or false, got {guess_mode!r}", "pass a boolean")
    units = []
    for n, img, s, a, b in zip(names, images, scales, starts, ends):
        spec = runners[component_name(n)].spec
        pixels = preprocess(processor, img, height, width)
        want = int({t.name: t for t in spec.inputs}["controlnet_cond"].shape[1])
        if pixels.shape[1] != want:
            raise InvalidControlError(f"ControlNet {n!r} takes {want}-channel control images, got "
                                      f"{pixels.shape[1]} channels", f"pass an RGB image ({want} channels)")
        n_img = int(pixels.shape[0])
        if n_img == 1:
            pixels = pixels.repeat_interleave(batch, dim=0)
        elif n_img * images_per_prompt == batch:
            pixels = pixels.repeat_interleave(images_per_prompt, dim=0)
        else:
            raise InvalidControlError(f"{n_img} control images for {batch // images_per_prompt} prompt(s)",
                                      "pass one control image, or one per prompt")
        units.append(ControlUnit(n, pixels.contiguous(), s, a, b,
                                 bool(spec.config.get("global_pool_conditions", False))))
    guess = guess_mode or units[0].global_pool  # diffusers: the first ControlNet's flag decides
    return ControlRequest(tuple(units), guess)


def preprocess(processor: Any, image: Any, height: int | None, width: int | None) -> torch.Tensor:
    """diffusers' ``control_image_processor.preprocess`` (no normalisation: [0, 1])."""
    try:
        return img2img.preprocess(processor, image, height, width)
    except InvalidImageError as exc:
        raise InvalidImageError(f"control image: {exc.message}", exc.hint) from None


def control_size(processor: Any, control_image: Any, controlnet: Any) -> tuple[int, int]:
    """The call's size when none is given: the (first) control image's, as diffusers defaults it."""
    first = control_image[0] if isinstance(controlnet, (list, tuple)) and isinstance(
        control_image, (list, tuple)) and control_image else control_image
    px = preprocess(processor, first, None, None)
    return int(px.shape[-2]), int(px.shape[-1])


def control_processor(vae_scale: int) -> Any:
    from diffusers.image_processor import VaeImageProcessor

    return VaeImageProcessor(vae_scale_factor=vae_scale, do_convert_rgb=True, do_normalize=False)


def check_shapes(runners: Mapping[str, Any], control: ControlRequest, batch: int, height: int, width: int,
                 guidance: bool) -> None:
    """Whether the ControlNet engines serve this call (fixed-profile engines list what they serve)."""
    unet_batch = batch * (2 if guidance else 1)
    cn_batch = batch if (control.guess_mode and guidance) else unet_batch
    runners["unet_controlnet"].check_supported(unet_batch, height, width)
    for u in control.units:
        runners[component_name(u.name)].check_supported(cn_batch, height, width)


# ---- the denoising loop's part -----------------------------------------------------------------------
class StepControl:
    """Per call: the ControlNet feeds of each step (built by the pipeline's base stage)."""

    def __init__(self, runners: Mapping[str, Any], control: ControlRequest, total_steps: int, guidance: bool,
                 timings: Any):
        self.runners = runners
        self.control = control
        self.total = total_steps
        self.guidance = guidance
        self.timings = timings
        self.unet = runners["unet_controlnet"]
        n_res = sum(1 for t in self.unet.spec.inputs if t.name.endswith("_residual") or "residual_" in t.name)
        self.n_res = n_res
        self.guess = control.guess_mode and guidance
        self.images = [u.image if self.guess or not guidance else torch.cat([u.image] * 2) for u in control.units]
        self.logspace = torch.logspace(-1, 0, n_res)  # diffusers: len(down_block_res_samples) + 1 values

    def keep(self, i: int) -> list[float]:
        n = self.total
        return [1.0 - float(i / n < u.start or (i + 1) / n > u.end) for u in self.control.units]

    def _scales(self, unit: ControlUnit, cond_scale: float) -> torch.Tensor:
        if self.control.guess_mode and not unit.global_pool:
            return (self.logspace * cond_scale).to(torch.float32)
        return torch.full((self.n_res,), cond_scale, dtype=torch.float32)

    def __call__(self, i: int, feeds: dict[str, torch.Tensor], plain: Any) -> tuple[dict[str, torch.Tensor], Any]:
        """The UNet feeds and runner of step ``i``: residuals added, or the plain UNet when all scales are 0."""
        cond_scales = [u.scale * k for u, k in zip(self.control.units, self.keep(i))]
        if all(s == 0.0 for s in cond_scales):
            return feeds, plain
        if self.guess:
            cn_feeds = {k: v.chunk(2)[1] for k, v in feeds.items() if k != "timestep"}
            cn_feeds["timestep"] = feeds["timestep"]
        else:
            cn_feeds = dict(feeds)
        total: list[torch.Tensor] | None = None
        with self.timings.measure("controlnet"):
            for unit, image, s in zip(self.control.units, self.images, cond_scales):
                out = self.runners[component_name(unit.name)](
                    {**cn_feeds, "controlnet_cond": image.to(feeds["sample"].device),
                     "conditioning_scale": self._scales(unit, s).to(feeds["sample"].device)})
                res = [out[t.name] for t in self.runners[component_name(unit.name)].spec.outputs]
                total = res if total is None else [a + b for a, b in zip(total, res)]
        assert total is not None
        if self.guess:
            total = [torch.cat([torch.zeros_like(r), r]) for r in total]
        names = [t.name for t in self.unet.spec.inputs[len(feeds):]]
        return {**feeds, **{n: r.contiguous() for n, r in zip(names, total)}}, self.unet


__all__ = ["ControlRequest", "ControlUnit", "InvalidControlError", "StepControl", "UnknownControlNetError",
           "available", "available_controlnets", "check_control", "check_shapes", "component_names", "control_processor", "control_size"]
