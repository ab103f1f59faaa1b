"""Test utility: write an SDXLModel as a single-file checkpoint in the original (SGM) layout.

The inverse of diffusers' single-file key mapping (``convert_ldm_unet_checkpoint``,
``convert_ldm_vae_checkpoint``, ``convert_ldm_clip_checkpoint``,
``convert_open_clip_checkpoint``), written from the SGM layout Stability's
``sd_xl_base_1.0.safetensors`` uses, so that tests can make base, refiner and VAE files
from a preset's weights and check that loading them gives the same model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

UNET_RESNET = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"),
               ("conv2", "out_layers.3"), ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection"))
UNET_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
            "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
            "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
VAE_ATTN = (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out"))
BIGG_LAYER = (("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"),
              ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj"))


def _sub(name: str, pairs: tuple[tuple[str, str], ...]) -> str:
    for new, old in pairs:
        name = name.replace(new, old)
    return name


def unet_to_ldm(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """diffusers UNet2DConditionModel -> ``model.diffusion_model.*``."""
    per = unet.config.layers_per_block + 1
    out: dict[str, torch.Tensor] = {}
    for key, t in unet.state_dict().items():
        p = key.split(".")
        head, mod = p[0], key.rsplit(".", 1)[0]
        if mod in UNET_TOP:
            new = UNET_TOP[mod] + "." + p[-1]
        elif head == "down_blocks" and p[2] == "downsamplers":
            new = f"input_blocks.{per * int(p[1]) + per}.0.op.{p[-1]}"
        elif head == "down_blocks":
            b, kind, j = int(p[1]), p[2], int(p[3])
            new = f"input_blocks.{per * b + j + 1}.{0 if kind == 'resnets' else 1}.{'.'.join(p[4:])}"
        elif head == "up_blocks" and p[2] == "upsamplers":
            b = int(p[1])
            has_attn = getattr(unet.up_blocks[b], "attentions", None) is not None
            new = f"output_blocks.{per * b + per - 1}.{2 if has_attn else 1}.conv.{p[-1]}"
        elif head == "up_blocks":
            b, kind = int(p[1]), p[2]
            new = f"output_blocks.{per * b + int(p[3])}.{0 if kind == 'resnets' else 1}.{'.'.join(p[4:])}"
        elif head == "mid_block":
            idx = {"resnets": {0: 0, 1: 2}, "attentions": {0: 1}}[p[1]][int(p[2])]
            new = f"middle_block.{idx}.{'.'.join(p[3:])}"
        else:
            raise KeyError(f"unmapped UNet key {key}")
        if head in ("down_blocks", "up_blocks", "mid_block") and (".resnets." in key):
            new = _sub(new, UNET_RESNET)
        out["model.diffusion_model." + new] = t
    return out


def vae_to_ldm(vae: torch.nn.Module, prefix: str = "first_stage_model.") -> dict[str, torch.Tensor]:
    """diffusers AutoencoderKL -> ``first_stage_model.*`` (or no prefix: a stand-alone VAE file)."""
    n_levels = len(vae.config.block_out_channels)
    out: dict[str, torch.Tensor] = {}
    for key, t in vae.state_dict().items():
        p = key.split(".")
        new = key.replace("conv_norm_out", "norm_out")
        if len(p) > 2 and p[1] in ("down_blocks", "up_blocks"):
            level = int(p[2]) if p[1] == "down_blocks" else n_levels - 1 - int(p[2])
            word = "down" if p[1] == "down_blocks" else "up"
            if p[3] == "resnets":
                new = f"{p[0]}.{word}.{level}.block.{p[4]}.{'.'.join(p[5:])}"
            else:  # downsamplers.0.conv / upsamplers.0.conv
                new = f"{p[0]}.{word}.{level}.{'downsample' if word == 'down' else 'upsample'}.{'.'.join(p[5:])}"
        elif len(p) > 2 and p[1] == "mid_block":
            if p[2] == "resnets":
                new = f"{p[0]}.mid.block_{int(p[3]) + 1}.{'.'.join(p[4:])}"
            else:
                new = f"{p[0]}.mid.attn_1." + _sub(".".join(p[4:]), VAE_ATTN)
                if t.ndim == 2:
                    t = t[:, :, None, None]  # the original attention is a 1x1 conv
        out[prefix + new.replace("conv_shortcut", "nin_shortcut")] = t
    return out


def clip_l_to_ldm(te: torch.nn.Module) -> dict[str, torch.Tensor]:
    """transformers CLIPTextModel -> ``conditioner.embedders.0.transformer.text_model.*`` (+ position_ids)."""
    out = {"conditioner.embedders.0.transformer." + (k if k.startswith("text_model.") else "text_model." + k): t
           for k, t in te.state_dict().items()}
    n = te.config.max_position_embeddings
    out["conditioner.embedders.0.transformer.text_model.embeddings.position_ids"] = torch.arange(n)[None]
    return out


def bigg_to_ldm(te2: torch.nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    """transformers CLIPTextModelWithProjection -> OpenCLIP's layout (fused q/k/v, [hidden, proj] projection)."""
    sd = {k.removeprefix("text_model."): v for k, v in te2.state_dict().items()}
    out = {prefix + "token_embedding.weight": sd.pop("embeddings.token_embedding.weight"),
           prefix + "positional_embedding": sd.pop("embeddings.position_embedding.weight"),
           prefix + "ln_final.weight": sd.pop("final_layer_norm.weight"),
           prefix + "ln_final.bias": sd.pop("final_layer_norm.bias"),
           prefix + "text_projection": sd.pop("text_projection.weight").T.contiguous()}
    for i in range(te2.config.num_hidden_layers):
        lp = f"encoder.layers.{i}."
        for w in ("weight", "bias"):
            out[f"{prefix}transformer.resblocks.{i}.attn.in_proj_{w}"] = torch.cat(
                [sd.pop(f"{lp}self_attn.{q}_proj.{w}") for q in "qkv"])
    for k, v in sd.items():
        if k.startswith("encoder.layers."):
            i, rest = k.split(".")[2], ".".join(k.split(".")[3:])
            out[f"{prefix}transformer.resblocks.{i}.{_sub(rest, BIGG_LAYER)}"] = v
        elif k != "embeddings.position_ids":
            raise KeyError(f"unmapped text_encoder_2 key {k}")
    return out


def write_single_file(model: Any, path: Path, role: str = "base", dtype: torch.dtype | None = None) -> Path:
    """Write ``model``'s base (or refiner) as one SGM-layout safetensors file; return ``path``."""
    if role == "base":
        sd = {**clip_l_to_ldm(model.text_encoder), **bigg_to_ldm(model.text_encoder_2, "conditioner.embedders.1.model."),
              **unet_to_ldm(model.unet), **vae_to_ldm(model.vae)}
    elif role == "refiner":
        sd = {**bigg_to_ldm(model.text_encoder_2, "conditioner.embedders.0.model."),
              **unet_to_ldm(model.refiner_unet), **vae_to_ldm(model.vae)}
    elif role == "vae":
        sd = vae_to_ldm(model.vae, prefix="")
    else:
        raise ValueError(role)
    sd = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous() for k, v in sd.items()}
    save_file(sd, str(path))
    return path
