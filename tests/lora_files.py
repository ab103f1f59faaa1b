"""LoRA files for the tiny preset, made here: peft layers on the presets' own modules, saved in
both formats users have -- diffusers/PEFT (diffusers' ``save_lora_weights``) and kohya/A1111
(``lora_unet_*``/``lora_te1_*``/``lora_te2_*`` keys with ``.alpha``, written below)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


def _adapter(module: torch.nn.Module, targets: list[str], rank: int, alpha: float, seed: int) -> dict[str, Any]:
    """peft LoRA factors for ``module``'s ``targets`` (random A and B: a visible, nonzero delta)."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    m = copy.deepcopy(module)
    torch.manual_seed(seed)
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights=False), m)
    state = get_peft_model_state_dict(m)
    with torch.no_grad():  # B small: a style change, not noise
        return {k: (v * 0.5 if "lora_B" in k else v).contiguous() for k, v in state.items()}


def diffusers_lora(model: Any, path: Path, *, seed: int, text_encoder: bool = True,
                   text_encoder_2: bool = False) -> Path:
    """A diffusers-format file (UNet + chosen text encoders) written by diffusers itself."""
    from diffusers import StableDiffusionXLPipeline
    from diffusers.utils import convert_state_dict_to_diffusers

    layers = {"unet_lora_layers": convert_state_dict_to_diffusers(_adapter(model.unet, UNET_TARGETS, 4, 4, seed))}
    if text_encoder:
        layers["text_encoder_lora_layers"] = convert_state_dict_to_diffusers(
            _adapter(model.text_encoder, TEXT_TARGETS, 4, 4, seed + 1))
    if text_encoder_2:
        layers["text_encoder_2_lora_layers"] = convert_state_dict_to_diffusers(
            _adapter(model.text_encoder_2, TEXT_TARGETS, 4, 4, seed + 2))
    StableDiffusionXLPipeline.save_lora_weights(str(path.parent), weight_name=path.name, **layers)
    return path


def kohya_lora(model: Any, path: Path, *, seed: int, rank: int = 4, alpha: float = 2.0,
               text_encoder: bool = False, text_encoder_2: bool = True) -> Path:
    """A kohya/A1111-format file: ``lora_<prefix>_<module_path_with_underscores>.lora_down/up/alpha``."""
    parts = [("lora_unet", model.unet, UNET_TARGETS)]
    if text_encoder:
        parts.append(("lora_te1", model.text_encoder, TEXT_TARGETS))
    if text_encoder_2:
        parts.append(("lora_te2", model.text_encoder_2, TEXT_TARGETS))
    out: dict[str, torch.Tensor] = {}
    for i, (prefix, module, targets) in enumerate(parts):
        for key, value in _adapter(module, targets, rank, alpha, seed + i).items():
            layer, kind = key.rsplit(".lora_", 1)
            name = f"{prefix}_{layer.replace('.', '_')}"
            out[f"{name}.lora_down.weight" if kind.startswith("A") else f"{name}.lora_up.weight"] = value
            out[f"{name}.alpha"] = torch.tensor(float(alpha))
    save_file(out, str(path))
    return path


def sd15_shaped_lora(path: Path) -> Path:
    """Keys of an SD 1.5 LoRA (a down block SDXL's first level lacks, 320/768 widths)."""
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    save_file({f"{name}.lora_down.weight": torch.randn(4, 768), f"{name}.lora_up.weight": torch.randn(320, 4),
               f"{name}.alpha": torch.tensor(4.0)}, str(path))
    return path
