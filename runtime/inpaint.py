"""Inpainting: diffusers' ``StableDiffusionXLInpaintPipeline`` on exported components.

What a call with ``image=`` and ``mask_image=`` means, step for step as diffusers 0.4x does it:

* the image through ``VaeImageProcessor.preprocess`` and the mask through diffusers' mask
  processor (grayscale, no normalisation, binarised at 0.5), both at ``(height, width)``: a
  mask of another size than the image is resized exactly as diffusers resizes it;
  ``padding_mask_crop=PX`` crops both around the mask (``get_crop_region``, ``resize_mode
  ="fill"``) and pastes the result back over the original (``apply_overlay``);
* ``masked_image = image * (mask < 0.5)``; the timesteps at ``strength`` (default 0.9999,
  diffusers'; ``strength=1.0`` starts from pure noise, anything less from the noised image);
* the generator draws in diffusers' order: the image's latent sample (a 4-channel UNet
  always; a 9-channel one unless ``strength=1.0``), the noise, then the masked image's
  latent sample (a 9-channel UNet feeds it to the UNet; for a 4-channel UNet only the draw
  is made, so that ancestral samplers and the refiner see the same generator state);
* the loop: a **4-channel** UNet denoises the latents as txt2img does, and after every step
  but the last the image latents re-noised to the next timestep are blended in outside the
  mask (``latents = (1 - mask) * init + mask * latents``; the last step blends the clean
  image latents); a **9-channel** inpainting UNet gets ``cat([latents, mask,
  masked_image_latents])`` as its input and no blending;
* base + refiner (diffusers' documented hand-off): the base inpaints down to
  ``denoising_end`` and returns latents; the refiner (a 4-channel UNet) inpaints from
  ``denoising_start`` on those latents with the same mask: one more noise draw, then the
  same blending against the base's latents.

The per-step work is a hook (:class:`MaskHook`) given to the pipeline's one denoising loop,
so inpainting stays exactly the loop every other workflow runs.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from diffusers.utils.torch_utils import randn_tensor

from ..errors import (
    InpaintingModelError,
    InvalidImageError,
    InvalidMaskError,
    InvalidRequestError,
    NumericalError,
)
from . import img2img
from .schedulers import cut_at_end, strength_timesteps

if TYPE_CHECKING:
    from .pipeline import SDXLPipeline, SDXLPipelineOutput
    from .request import SampleRequest
    from .timing import StageTimings

log = logging.getLogger(__name__)

#: diffusers' ``StableDiffusionXLInpaintPipeline`` default strength.
DEFAULT_STRENGTH = 0.9999

_MASK_HINT = ("pass a PIL image or a file (white = repaint, black = keep), an (H, W) array (uint8, or float "
              "in [0, 1]), an (H, W) / (1, H, W) / (N, 1, H, W) float tensor, or a list of them")


@dataclass
class InpaintInputs:
    """The preprocessed inputs of one inpainting call.

    ``image``: (N, 3, H, W) in [-1, 1]; ``mask``: (M, 1, H, W) in {0, 1} (1 = repaint);
    ``crop``: diffusers' ``crops_coords`` (x1, y1, x2, y2) with ``padding_mask_crop``, and then
    ``original``/``mask_pil``: the PIL images and masks the results are pasted back over (one per
    input image: a batch of (image, mask) pairs is each pair cropped alone).
    """

    image: torch.Tensor
    mask: torch.Tensor
    crop: tuple[int, int, int, int] | None = None
    original: Any = None
    mask_pil: Any = None
    #: with padding_mask_crop: one crop (and original, mask) per image of the batch
    crops: list[tuple[int, int, int, int]] | None = None

    @property
    def masked_image(self) -> torch.Tensor:
        return self.image * (self.mask < 0.5)


def mask_processor(vae_scale: int) -> Any:
    """diffusers' inpainting mask processor (the one ``StableDiffusionXLInpaintPipeline`` builds)."""
    from diffusers.image_processor import VaeImageProcessor

    return VaeImageProcessor(vae_scale_factor=vae_scale, do_normalize=False, do_binarize=True,
                             do_convert_grayscale=True)


def _mask_item(mask: Any) -> Any:
    """One mask as the mask processor takes it; a path is read, a uint8 array divided by 255."""
    from PIL import Image

    if isinstance(mask, (str, Path, bytes, bytearray)):
        return img2img.read_image(mask, what="mask")
    if isinstance(mask, Image.Image):
        return mask
    if isinstance(mask, np.ndarray):
        if mask.dtype == np.uint8:
            mask = mask.astype(np.float32) / 255.0
        if not np.issubdtype(mask.dtype, np.floating) or mask.ndim not in (2, 3):
            raise InvalidMaskError(f"a mask array must be (H, W) or (H, W, 1), uint8 or float; got "
                                   f"{mask.dtype} {tuple(mask.shape)}", _MASK_HINT)
        return mask.astype(np.float32) if mask.ndim == 3 else mask.astype(np.float32)[:, :, None]
    if isinstance(mask, torch.Tensor):
        if not mask.is_floating_point() or mask.dim() not in (2, 3, 4):
            raise InvalidMaskError(f"a mask tensor must be float (H, W), (1, H, W) or (N, 1, H, W); got "
                                   f"{mask.dtype} {tuple(mask.shape)}", _MASK_HINT)
        mask = mask.detach().to("cpu", torch.float32)
        return mask[None, None] if mask.dim() == 2 else mask[None] if mask.dim() == 3 else mask
    raise InvalidMaskError(f"mask_image must be an image, not {type(mask).__name__}", _MASK_HINT)


def _preprocess_mask(processor: Any, mask: Any, height: int, width: int, *, crop: Any = None,
                     resize_mode: str = "default") -> torch.Tensor:
    items = [_mask_item(m) for m in (mask if isinstance(mask, (list, tuple)) else [mask])]
    if not items:
        raise InvalidMaskError("mask_image is an empty list", _MASK_HINT)
    if any(isinstance(x, torch.Tensor) for x in items):
        if not all(isinstance(x, torch.Tensor) for x in items):
            raise InvalidMaskError("a batch of masks mixes kinds", "pass all masks as PIL images, or all as tensors")
        items = [torch.cat(items)]
    arg = items if len(items) > 1 else items[0]
    try:
        out = processor.preprocess(arg, height=height, width=width, crops_coords=crop, resize_mode=resize_mode)
    except (ValueError, TypeError, RuntimeError) as exc:
        raise InvalidMaskError(f"mask_image cannot be preprocessed ({exc})", _MASK_HINT) from None
    out = out.to(torch.float32)
    if tuple(out.shape[-2:]) != (height, width) or out.shape[1] != 1:
        raise InvalidMaskError(f"the mask preprocessed to {tuple(out.shape)}, not (N, 1, {height}, {width})",
                               _MASK_HINT)
    if not bool((out > 0).any()):
        raise InvalidMaskError("the mask is empty: it selects no pixel to repaint",
                               "paint the area to redraw white (>= 0.5) on black, or use img2img without a mask")
    return out


def prepare_inputs(image_processor: Any, vae_scale: int, image: Any, mask: Any, height: int | None,
                   width: int | None, padding_mask_crop: Any) -> InpaintInputs:
    """Image and mask as diffusers' inpaint pipeline preprocesses them (see the module docstring).

    Without ``height``/``width`` the output has the image's size (rounded down to the VAE scale,
    as our img2img): diffusers' inpaint pipeline would default to the UNet's native size.
    """
    from PIL import Image

    if image is None:
        raise InvalidImageError("mask_image was given without an image to inpaint",
                                "pass image= (--image FILE) with the mask, or drop the mask")
    mproc = mask_processor(vae_scale)
    if padding_mask_crop is None:
        pixels = img2img.preprocess(image_processor, image, height, width)
        h, w = int(pixels.shape[-2]), int(pixels.shape[-1])
        return InpaintInputs(image=pixels, mask=_preprocess_mask(mproc, mask, h, w))
    if isinstance(padding_mask_crop, bool) or not isinstance(padding_mask_crop, int) or padding_mask_crop < 0:
        raise InvalidRequestError(f"padding_mask_crop must be an integer >= 0 (pixels), got {padding_mask_crop!r}",
                                  "pass the margin around the mask, e.g. 32, or None to inpaint the whole image")
    images = [img2img.read_image(x) if isinstance(x, (str, Path)) else x
              for x in (image if isinstance(image, (list, tuple)) else [image])]
    masks = [img2img.read_image(x, what="mask") if isinstance(x, (str, Path)) else x
             for x in (mask if isinstance(mask, (list, tuple)) else [mask])]
    if not all(isinstance(x, Image.Image) for x in images + masks) or len(masks) not in (1, len(images)):
        raise InvalidImageError("padding_mask_crop needs PIL images (or files) and one PIL mask (or one per image)",
                                "pass image and mask as PIL images or files, or drop padding_mask_crop")
    images = [x if x.mode == "RGB" else x.convert("RGB") for x in images]
    if height is None or width is None:
        dh, dw = image_processor.get_default_height_width(images[0], height, width)
        height, width = height or dh, width or dw
    # One crop per (image, mask) pair: a batch of pairs is each pair alone (diffusers takes one).
    pixels, mks, crops, originals, mask_pils = [], [], [], [], []
    for k, img in enumerate(images):
        m = masks[k % len(masks)]
        if m.size != img.size:  # the crop region is found on the mask; paste-back needs the image's size
            m = m.resize(img.size, Image.NEAREST)
        if not m.convert("L").getbbox():
            raise InvalidMaskError("the mask is empty: it selects no pixel to repaint",
                                   "paint the area to redraw white on black, or use img2img without a mask")
        crop = tuple(int(v) for v in mproc.get_crop_region(m, width, height, pad=padding_mask_crop))
        try:
            px = image_processor.preprocess(img, height=height, width=width, crops_coords=crop,
                                            resize_mode="fill").to(torch.float32)
        except (ValueError, TypeError, RuntimeError) as exc:
            raise InvalidImageError(f"image cannot be preprocessed ({exc})", "pass an RGB image") from None
        pixels.append(px)
        mks.append(_preprocess_mask(mproc, m, int(px.shape[-2]), int(px.shape[-1]), crop=crop, resize_mode="fill"))
        crops.append(crop)
        originals.append(img)
        mask_pils.append(m)
    return InpaintInputs(image=torch.cat(pixels), mask=torch.cat(mks), crop=crops[0], original=originals,
                         mask_pil=mask_pils, crops=crops)


def check(pipe: SDXLPipeline, req: SampleRequest, inputs: InpaintInputs) -> SampleRequest:
    """Rules diffusers leaves to crash later; ``req`` carries the inputs from here on."""
    n_img, n_mask = int(inputs.image.shape[0]), int(inputs.mask.shape[0])
    if n_mask not in (1, n_img) and n_img != 1:
        raise InvalidMaskError(f"{n_mask} masks for {n_img} images", "pass one mask, or one mask per image")
    img2img.check_image_batch(max(n_img, n_mask), req.batch)
    if req.refiner_only:
        raise InvalidRequestError("refiner_only does not inpaint: the refiner alone runs img2img",
                                  "drop refiner_only to inpaint (base, then the refiner from denoising_end)")
    if inputs.crop is not None and req.output_type not in ("pil", "np"):
        raise InvalidRequestError(f"padding_mask_crop pastes a PIL image back; output_type {req.output_type!r} "
                                  "cannot hold it", "use output_type 'pil' or 'np', or drop padding_mask_crop")
    req.inpaint = inputs
    return req


def check_not_inpainting_model(pipe: SDXLPipeline, refiner_only: bool) -> None:
    """A 9-channel UNet needs a mask: txt2img/img2img on it is a named error (diffusers would crash)."""
    if pipe.unet_in_channels != pipe.latent_channels and not refiner_only:
        raise InpaintingModelError(
            f"the base UNet of {pipe.artifacts.root} is an inpainting UNet ({pipe.unet_in_channels} input "
            "channels): it needs an image and a mask", "pass image= and mask_image= (--image FILE --mask FILE), "
            "or export a text-to-image SDXL base for txt2img")


class MaskHook:
    """The pipeline loop's per-step inpainting work (shared by nothing: one per call and stage).

    ``model_input``: a 9-channel UNet's ``cat([latents, mask, masked_image_latents])``;
    ``after_step``: a 4-channel UNet's blend of the (re-noised) image latents outside the mask.
    """

    def __init__(self, mask: torch.Tensor, *, guidance: bool, masked_latents: torch.Tensor | None = None,
                 image_latents: torch.Tensor | None = None, noise: torch.Tensor | None = None):
        self.mask = mask
        self.concat = None
        if masked_latents is not None:
            both = torch.cat([mask, masked_latents], dim=1)
            self.concat = torch.cat([both] * 2) if guidance else both
        self.image_latents, self.noise = image_latents, noise

    def model_input(self, model_in: torch.Tensor) -> torch.Tensor:
        return model_in if self.concat is None else torch.cat([model_in, self.concat], dim=1)

    def after_step(self, sched: Any, latents: torch.Tensor, i: int, timesteps: torch.Tensor) -> torch.Tensor:
        if self.image_latents is None:
            return latents
        init = self.image_latents
        if i < len(timesteps) - 1:
            init = sched.add_noise(init, self.noise, timesteps[i + 1: i + 2].reshape(1))
        return (1 - self.mask) * init + self.mask * latents


def _encode(pipe: SDXLPipeline, pixels: torch.Tensor, req: SampleRequest, timings: StageTimings) -> torch.Tensor:
    """diffusers' ``_encode_vae_image`` (one sample per image; a generator list: image i with
    generator i), then repeated to the batch."""
    n = int(pixels.shape[0])
    gen = req.generator[:n] if isinstance(req.generator, list) else req.generator
    lat = img2img.encode(pipe.runners["vae_encoder"], pixels, generator=gen, batch=n, vae=pipe.vae_config,
                         latent_channels=pipe.latent_channels, device=pipe.device, timings=timings)
    return lat.repeat(req.batch // n, 1, 1, 1) if req.batch > n else lat


def _draw_like_encode(pipe: SDXLPipeline, n: int, latent_hw: tuple[int, int], req: SampleRequest) -> None:
    """The generator draws of one latent sample of ``n`` images, without the VAE (see module doc)."""
    gen = req.generator[:n] if isinstance(req.generator, list) else req.generator
    randn_tensor((n, pipe.latent_channels, *latent_hw), generator=gen, device=pipe.device, dtype=torch.float32)


def _latent_mask(mask: torch.Tensor, batch: int, latent_hw: tuple[int, int], device: torch.device) -> torch.Tensor:
    m = torch.nn.functional.interpolate(mask, size=latent_hw).to(device=device, dtype=torch.float32)
    return m.repeat(batch // m.shape[0], 1, 1, 1) if m.shape[0] < batch else m


def generate(pipe: SDXLPipeline, req: SampleRequest, *, timings: StageTimings, t0: float) -> SDXLPipelineOutput:
    """One inpainting call (base, then the refiner hand-off when ``req.refiner``)."""
    from .pipeline import SDXLPipelineOutput, _all_finite

    inp: InpaintInputs = req.inpaint
    dev, batch = pipe.device, req.batch
    nine = pipe.unet_in_channels != pipe.latent_channels
    latent_hw = (req.height // pipe.vae_scale, req.width // pipe.vae_scale)
    enc = pipe.encoder.encode(req.prompts, req.negatives, guidance=req.guidance, refiner=req.refiner,
                              timings=timings, base=True)
    sched = pipe._schedulers(req.scheduler)
    timesteps = strength_timesteps(sched, req.steps, dev, req.strength)
    from_noise = req.strength == 1.0
    image_latents = None
    if not nine or not from_noise:
        image_latents = _encode(pipe, inp.image, req, timings)
    noise = randn_tensor((batch, pipe.latent_channels, *latent_hw), generator=req.generator, device=dev,
                         dtype=torch.float32)
    if from_noise:
        latents = noise * sched.init_noise_sigma
    else:
        assert image_latents is not None
        latents = sched.add_noise(image_latents, noise, timesteps[:1].repeat(batch))
    mask = _latent_mask(inp.mask, batch, latent_hw, dev)
    masked = inp.masked_image
    if nine:
        hook = MaskHook(mask, guidance=req.guidance, masked_latents=_encode(pipe, masked, req, timings))
    else:
        _draw_like_encode(pipe, int(masked.shape[0]), latent_hw, req)
        hook = MaskHook(mask, guidance=req.guidance, image_latents=image_latents, noise=noise)
    timesteps = cut_at_end(sched, timesteps, req.denoising_end if req.refiner else None)
    embeds, pooled = pipe._conditioning(enc.base_embeds, enc.base_pooled, enc.base_neg_embeds,
                                        enc.base_neg_pooled, req)
    ids = torch.tensor([list(req.original_size + req.crops_coords_top_left + req.target_size)], dtype=torch.float32)
    ids = torch.cat([ids, ids], dim=0) if req.guidance else ids
    time_ids = ids.to(dev).repeat(batch, 1)
    latents = pipe._denoise(pipe.runners["unet"], "unet", sched, timesteps, latents, (embeds, pooled, time_ids),
                            req, timings, hook=hook)
    base_steps, refiner_steps = len(timesteps), 0
    if req.refiner:  # diffusers' refiner inpaint from denoising_start: one noise draw, blend vs the base latents
        noise = randn_tensor(tuple(latents.shape), generator=req.generator, device=dev, dtype=torch.float32)
        rhook = MaskHook(mask, guidance=req.guidance, image_latents=latents.to(dev, torch.float32), noise=noise)
        latents, refiner_steps = pipe._refine(req, enc, latents, timings, hook=rhook)
    if not _all_finite(latents):
        raise NumericalError("the UNets produced NaN/Inf latents",
                             "run the UNets in fp32 or rebuild their engines with --precision fp32")
    if req.output_type == "latent":
        images = latents
    elif inp.crop is None:
        images = pipe._decode(latents, req.output_type, timings)
    else:
        pil = pipe._decode(latents, "pil", timings)
        n = len(inp.original)
        pil = [pipe._image_processor.apply_overlay(inp.mask_pil[k % n], inp.original[k % n], im, inp.crops[k % n])
               for k, im in enumerate(pil)]
        images = pil if req.output_type == "pil" else pipe._image_processor.pil_to_numpy(pil)
    timings.total = time.perf_counter() - t0
    info = {"backend": pipe.backend, "device": str(dev), "scheduler": req.scheduler, "height": req.height,
            "width": req.width, "base_steps": base_steps, "refiner_steps": refiner_steps, "guidance": req.guidance,
            "batch": batch, "img2img": True, "strength": req.strength, "refiner_only": False, "inpaint": True,
            "inpainting_unet": nine, "mask_crop": list(inp.crop) if inp.crop is not None else None}
    return SDXLPipelineOutput(images=images, latents=latents, timings=timings, seed=req.seed, info=info)

