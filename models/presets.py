"""Embedded SDXL presets: the SDXL architecture built in code from a seed.

``tiny``  SDXL's structure at tiny width (the default everywhere: tests, CI, first run).
``small`` the same structure wide enough that one 512x512 image takes seconds on a
          2-core CPU (the benchmark preset).
``sdxl``  the full-size architecture of stabilityai/stable-diffusion-xl-base-1.0 and
          -refiner-1.0 with random weights, for scale tests and GPU benchmarks.

Each preset has everything SDXL has: a CLIP-L-like and a CLIP-bigG-like text encoder
(the latter with a projection whose pooled dim differs from both hidden dims), a base
UNet with ``text_time`` conditioning and 6 time ids, a 4-level refiner UNet with
text_encoder_2 context only and 5 time ids (aesthetic score), an AutoencoderKL with
SDXL's scaling factor and 8x downsampling, SDXL's scheduler config and two offline
tokenizers. Nothing is downloaded.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

#: Bump when a preset's configs or seeding change: it is part of the model identity,
#: so exports of the old preset are rebuilt.
PRESET_REVISION = 1

SDXL_SCHEDULER = {
    "_class_name": "EulerDiscreteScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "interpolation_type": "linear",
    "use_karras_sigmas": False,
    "clip_sample": False,
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
}


@dataclass(frozen=True)
class PresetConfig:
    """Configs of every component of one embedded preset."""

    name: str
    text_encoder: dict[str, Any]
    text_encoder_2: dict[str, Any]
    unet: dict[str, Any]
    refiner_unet: dict[str, Any]
    vae: dict[str, Any]
    scheduler: dict[str, Any] = field(default_factory=lambda: dict(SDXL_SCHEDULER))
    seed: int = 0


def _text(hidden: int, layers: int, heads: int, inter: int, proj: int, act: str) -> dict[str, Any]:
    # vocab_size is filled in from the tokenizer for the embedded presets.
    return {
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "projection_dim": proj,
        "max_position_embeddings": 77,
        "hidden_act": act,
        "layer_norm_eps": 1e-5,
        # eos_token_id=2 selects CLIP's legacy pooling at argmax(input_ids): our vocab,
        # like CLIP's, puts <|endoftext|> at the highest id.
        "bos_token_id": 0,
        "eos_token_id": 2,
        "pad_token_id": 1,
    }


def _unet(
    down: tuple[str, ...], up: tuple[str, ...], n_time_ids: int, channels: tuple[int, ...],
    depth: int | tuple[int, ...], heads: tuple[int, ...], context: int, pooled: int, time_dim: int,
    sample_size: int, groups: int = 32,
) -> dict[str, Any]:
    """A ``text_time``-conditioned UNet2DConditionModel config (SDXL's base and refiner)."""
    return {
        "sample_size": sample_size,
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": down,
        "up_block_types": up,
        "block_out_channels": channels,
        "layers_per_block": 2,
        "transformer_layers_per_block": depth,
        "attention_head_dim": heads,
        "cross_attention_dim": context,
        "norm_num_groups": groups,
        "use_linear_projection": True,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": time_dim,
        # pooled text_embeds + one Fourier embedding per time id
        "projection_class_embeddings_input_dim": n_time_ids * time_dim + pooled,
    }


def _base_unet(channels: tuple[int, ...], depth: tuple[int, ...], heads: tuple[int, ...], context: int,
               pooled: int, time_dim: int, sample_size: int, groups: int = 32) -> dict[str, Any]:
    """Base: 3 levels, no attention at the first, 6 time ids (orig, crop, target sizes)."""
    return _unet(("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), 6,
                 channels, depth, heads, context, pooled, time_dim, sample_size, groups)


def _refiner_unet(channels: tuple[int, ...], depth: int, heads: tuple[int, ...], context: int, pooled: int,
                  time_dim: int, sample_size: int, groups: int = 32) -> dict[str, Any]:
    """Refiner: 4 levels, attention in the middle two, 5 time ids (aesthetic score last)."""
    return _unet(("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                 ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), 5,
                 channels, depth, heads, context, pooled, time_dim, sample_size, groups)


def _vae(channels: tuple[int, ...], layers: int, groups: int, sample_size: int) -> dict[str, Any]:
    return {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ("DownEncoderBlock2D",) * 4,
        "up_block_types": ("UpDecoderBlock2D",) * 4,
        "block_out_channels": channels,
        "layers_per_block": layers,
        "latent_channels": 4,
        "norm_num_groups": groups,
        "sample_size": sample_size,
        "scaling_factor": 0.13025,
        "force_upcast": True,
    }


PRESETS: dict[str, PresetConfig] = {
    "tiny": PresetConfig(
        name="tiny",
        text_encoder=_text(hidden=32, layers=2, heads=4, inter=64, proj=32, act="quick_gelu"),
        text_encoder_2=_text(hidden=64, layers=3, heads=4, inter=128, proj=48, act="gelu"),
        # native size 256 px (32x32 latents): SDXL's buckets scaled by 1/4.
        unet=_base_unet((32, 64, 128), (1, 1, 2), (2, 4, 8), 32 + 64, 48, 8, sample_size=32),
        refiner_unet=_refiner_unet((32, 64, 64, 128), 1, (2, 4, 4, 8), 64, 48, 8, sample_size=32),
        vae=_vae((8, 16, 32, 32), 1, 8, sample_size=256),
    ),
    "small": PresetConfig(
        name="small",
        text_encoder=_text(hidden=256, layers=4, heads=4, inter=1024, proj=256, act="quick_gelu"),
        text_encoder_2=_text(hidden=384, layers=6, heads=6, inter=1536, proj=320, act="gelu"),
        # SDXL at 1/10 width (32 = 320/10), same transformer depth pattern as the tiny
        # preset; native 512 px (64x64 latents). Sized so one 512x512 base+refiner image,
        # 20 steps, is ~420 GFLOP: a few seconds on a 2-core CPU (see benchmarks/).
        unet=_base_unet((32, 64, 128), (1, 2, 4), (1, 2, 4), 256 + 384, 320, 64, sample_size=64, groups=8),
        refiner_unet=_refiner_unet(
            (32, 64, 128, 128), 2, (1, 2, 4, 4), 384, 320, 64, sample_size=64, groups=8
        ),
        vae=_vae((16, 32, 64, 64), 1, 8, sample_size=512),
    ),
    "sdxl": PresetConfig(
        name="sdxl",
        text_encoder=_text(hidden=768, layers=12, heads=12, inter=3072, proj=768, act="quick_gelu"),
        text_encoder_2=_text(hidden=1280, layers=32, heads=20, inter=5120, proj=1280, act="gelu"),
        unet=_base_unet((320, 640, 1280), (1, 2, 10), (5, 10, 20), 2048, 1280, 256, sample_size=128),
        refiner_unet=_refiner_unet(
            (384, 768, 1536, 1536), 4, (6, 12, 24, 24), 1280, 1280, 256, sample_size=128
        ),
        vae=_vae((128, 256, 512, 512), 2, 32, sample_size=1024),
    ),
}


def _inpainting_variant(name: str) -> PresetConfig:
    """``NAME-inpaint``: preset NAME with a 9-channel inpainting base UNet (diffusers' layout,
    as SDXL inpainting 0.1: latents + mask + masked-image latents); text encoders, VAE and
    refiner are NAME's, seeded the same, so their weights are NAME's too."""
    base = PRESETS[name]
    unet = dict(base.unet, in_channels=2 * int(base.vae["latent_channels"]) + 1)
    return PresetConfig(name=f"{name}-inpaint", text_encoder=base.text_encoder, text_encoder_2=base.text_encoder_2,
                        unet=unet, refiner_unet=base.refiner_unet, vae=base.vae, scheduler=dict(base.scheduler),
                        seed=base.seed)


# After the plain presets: a single-file checkpoint is matched against them in this order.
PRESETS.update({f"{n}-inpaint": _inpainting_variant(n) for n in ("tiny", "small")})


def preset_names() -> tuple[str, ...]:
    return tuple(PRESETS)


def get_preset(name: str) -> PresetConfig:
    return copy.deepcopy(PRESETS[name])
