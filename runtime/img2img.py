"""Image-to-image inputs: reading images, diffusers' preprocessing, the VAE encode, the noise.

What ``StableDiffusionXLImg2ImgPipeline`` does before its denoising loop, on exported
components: ``VaeImageProcessor.preprocess`` (diffusers' own, so sizes, resizing and the
[0, 1] -> [-1, 1] mapping are its), the VAE encode in fp32 through the ``vae_encoder``
component, a *sample* of the latent Gaussian drawn with the caller's generator (diffusers'
``retrieve_latents`` default; diffusers' own ``DiagonalGaussianDistribution`` over the
exported moments), the scaling (``latents_mean``/``latents_std`` when the VAE config has
them), the batch expansion, then ``scheduler.add_noise`` with ``randn_tensor`` from the same
generator at the first timestep. The order of generator draws is diffusers' order, so the
same seed gives diffusers' image.

Images arrive from users, files and HTTP bodies; every way one can be unusable is an
:class:`~sdxl_export.errors.InvalidImageError` that says what was wrong.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers.utils.torch_utils import randn_tensor

from ..errors import InvalidImageError, NumericalError
from .backends.base import ComponentRunner

log = logging.getLogger(__name__)

#: diffusers' ``StableDiffusionXLImg2ImgPipeline`` default strength.
DEFAULT_STRENGTH = 0.3

_IMAGE_HINT = "pass a PIL image, an (H, W, 3) array (uint8, or float in [0, 1]), a (3, H, W) tensor, or a list of them"


def read_image(source: str | Path | bytes, what: str = "image", max_pixels: int | None = None) -> Any:
    """Decode an image file (path or bytes) to an RGB PIL image, fully read now.

    PIL opens lazily; ``load()`` forces the decode so a truncated or corrupt file fails
    here with a named error, not later inside preprocessing. ``max_pixels``: refuse an image
    whose header declares more pixels, before decoding it (a server's cap; PIL's own
    decompression-bomb refusal is a named error too).
    """
    from PIL import Image, UnidentifiedImageError

    try:
        if isinstance(source, (bytes, bytearray)):
            img = Image.open(io.BytesIO(source))
        else:
            img = Image.open(Path(source))
        if max_pixels is not None and img.size[0] * img.size[1] > max_pixels:
            w, h = img.size
            raise InvalidImageError(f"{what} is {w}x{h} ({w * h} pixels), over the cap of {max_pixels} pixels",
                                    "send a smaller image (resize it first)")
        img.load()
    except InvalidImageError:
        raise
    except Image.DecompressionBombError as exc:
        raise InvalidImageError(f"{what}: refused to decode ({exc})", "send a smaller image") from None
    except FileNotFoundError:
        raise InvalidImageError(f"{what} file {source} does not exist", "pass the path of a PNG/JPEG/WebP file")
    except IsADirectoryError:
        raise InvalidImageError(f"{what} {source} is a folder, not an image", "pass an image file") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        name = "the uploaded image" if isinstance(source, (bytes, bytearray)) else str(source)
        raise InvalidImageError(f"{what}: cannot decode {name} ({exc})",
                                "pass an uncorrupted PNG, JPEG or WebP image") from None
    return img if img.mode == "RGB" else img.convert("RGB")


def _as_processor_input(image: Any) -> Any:
    """What ``VaeImageProcessor`` takes, checked: RGB PIL images, float arrays/tensors.

    Two conveniences over diffusers, both equal to what it does for PIL input: a path is
    read as an image, and a uint8 array is divided by 255 (``pil_to_numpy``). Non-RGB PIL
    images (RGBA, L) are converted to RGB, where diffusers would fail inside the VAE.
    """
    from PIL import Image

    if isinstance(image, (str, Path)):
        return read_image(image)
    if isinstance(image, Image.Image):
        return image if image.mode == "RGB" else image.convert("RGB")
    if isinstance(image, np.ndarray):
        if image.dtype == np.uint8:
            image = image.astype(np.float32) / 255.0
        if not np.issubdtype(image.dtype, np.floating) or image.ndim not in (3, 4) or image.shape[-1] != 3:
            raise InvalidImageError(f"an image array must be (H, W, 3) or (N, H, W, 3), uint8 or float; got "
                                    f"{image.dtype} {tuple(image.shape)}", _IMAGE_HINT)
        return image.astype(np.float32)
    if isinstance(image, torch.Tensor):
        if not image.is_floating_point() or image.dim() not in (3, 4) or image.shape[-3] != 3:
            raise InvalidImageError(f"an image tensor must be float (3, H, W) or (N, 3, H, W); got "
                                    f"{image.dtype} {tuple(image.shape)}", _IMAGE_HINT)
        return image.detach().to("cpu", torch.float32)
    raise InvalidImageError(f"image must be an image, not {type(image).__name__}", _IMAGE_HINT)


def is_latents(image: Any, latent_channels: int = 4) -> bool:
    """An ``(N, C_latent, h, w)`` float tensor: latents, which diffusers' img2img takes as they are
    (no VAE encode, no resize; e.g. a first pass's ``output_type="latent"``, hires fix)."""
    return (isinstance(image, torch.Tensor) and image.dim() == 4 and image.is_floating_point()
            and int(image.shape[1]) == latent_channels)


def latents_input(image: torch.Tensor) -> torch.Tensor:
    """Latents given as img2img's ``image`` (:func:`is_latents`): used as they are, as in diffusers."""
    out = image.detach().to("cpu", torch.float32)
    if not bool(torch.isfinite(out).all()):
        raise InvalidImageError("the latents have NaN/Inf values", "pass finite latents")
    return out


def preprocess(processor: Any, image: Any, height: int | None = None, width: int | None = None) -> torch.Tensor:
    """``(N, 3, H, W)`` float32 in [-1, 1]: diffusers' ``VaeImageProcessor.preprocess``.

    Without ``height``/``width`` the image keeps its size (rounded down to a multiple of the
    VAE scale, as diffusers' img2img does); with them it is resized to that size.
    """
    items = image if isinstance(image, (list, tuple)) else [image]
    if not items:
        raise InvalidImageError("image is an empty list", _IMAGE_HINT)
    items = [_as_processor_input(x) for x in items]
    if any(isinstance(x, np.ndarray) and x.ndim == 4 for x in items):
        items = [np.concatenate([x if x.ndim == 4 else x[None] for x in items])]
    if any(isinstance(x, torch.Tensor) and x.dim() == 4 for x in items):
        items = [torch.cat([x if x.dim() == 4 else x[None] for x in items])]
    kinds = {type(x) for x in items}
    if len(kinds) > 1:
        raise InvalidImageError("a batch of images mixes kinds (" + ", ".join(sorted(k.__name__ for k in kinds))
                                + ")", "pass all images as PIL images, or all as arrays, or all as tensors")
    arg = items if len(items) > 1 else items[0]
    try:
        out = processor.preprocess(arg, height=height, width=width)
    except (ValueError, TypeError, RuntimeError) as exc:
        raise InvalidImageError(f"image cannot be preprocessed ({exc})", _IMAGE_HINT) from None
    out = out.to(torch.float32)
    if out.shape[-1] < 1 or out.shape[-2] < 1:
        raise InvalidImageError(f"the image is too small ({tuple(out.shape[-2:])} after rounding to the VAE scale)",
                                "pass an image of at least 8x8 pixels")
    if not bool(torch.isfinite(out).all()):
        raise InvalidImageError("the image has NaN/Inf values", "pass finite pixel values in [0, 1]")
    return out


def encode_batch(n_images: int, batch: int, generator: Any) -> int:
    """How many images the VAE encodes: the image batch, or one per generator (diffusers)."""
    return batch if isinstance(generator, list) else n_images


def check_image_batch(n_images: int, batch: int) -> None:
    """diffusers' rule: the image batch must divide the latent batch (prompts x images each)."""
    if n_images > batch or batch % n_images:
        raise InvalidImageError(f"{n_images} images for {batch} outputs (prompts x images per prompt)",
                                "pass one image, or as many images as prompts (or a divisor of the batch)")


def encode(runner: ComponentRunner, image: torch.Tensor, *, generator: Any, batch: int, vae: Any,
           latent_channels: int, device: torch.device, timings: Any) -> torch.Tensor:
    """``prepare_latents`` up to the noise: VAE encode (fp32), sample, scale, expand to ``batch``."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    image = image.to(device=device, dtype=torch.float32)
    if isinstance(generator, list):  # one encode per generator, the image repeated to the batch
        if image.shape[0] < batch:
            image = torch.cat([image] * (batch // image.shape[0]), dim=0)
        parts = [image[i: i + 1] for i in range(batch)]
        gens = list(generator)
    else:
        parts, gens = [image], [generator]
    latents = []
    for part, gen in zip(parts, gens):
        with timings.measure("vae_encoder"):
            moments = runner({"images": part.contiguous()})["moments"]
        if not bool(torch.isfinite(moments).all()):
            raise NumericalError("the VAE encode produced NaN/Inf",
                                 "encode in fp32: rebuild the vae_encoder engine with --vae-precision fp32")
        latents.append(DiagonalGaussianDistribution(moments.to(torch.float32)).sample(gen))
    init = torch.cat(latents, dim=0)
    if vae.latents_mean is not None and vae.latents_std is not None:
        c = latent_channels
        mean = torch.tensor(vae.latents_mean).view(1, c, 1, 1).to(init.device, init.dtype)
        std = torch.tensor(vae.latents_std).view(1, c, 1, 1).to(init.device, init.dtype)
        init = (init - mean) * vae.scaling_factor / std
    else:
        init = vae.scaling_factor * init
    if batch > init.shape[0]:
        init = torch.cat([init] * (batch // init.shape[0]), dim=0)
    return init


def add_noise(scheduler: Any, init: torch.Tensor, timesteps: torch.Tensor, generator: Any) -> torch.Tensor:
    """Noise the image latents to the first timestep, drawing the noise from ``generator``."""
    noise = randn_tensor(tuple(init.shape), generator=generator, device=init.device, dtype=init.dtype)
    return scheduler.add_noise(init, noise, timesteps[:1].repeat(init.shape[0]))
