"""PyTorch modules whose forward() takes and returns exactly a component spec's tensors.

diffusers and transformers models return dataclasses and take keyword dicts
(``added_cond_kwargs``); ONNX export needs positional tensors in, a tuple of tensors
out, in the order the spec names them. One thin wrapper per component kind.
"""

from __future__ import annotations

import torch

from ..errors import MissingComponentError
from ..specs import ComponentSpec
from .loader import SDXLModel


class TextEncoderWrapper(torch.nn.Module):
    """input_ids -> penultimate hidden states (+ pooled projected embedding), as SDXL uses them."""

    def __init__(self, encoder: torch.nn.Module, pooled: bool):
        super().__init__()
        self.encoder = encoder
        self.pooled = pooled

    def forward(self, input_ids: torch.Tensor):
        out = self.encoder(input_ids, output_hidden_states=True)
        hidden = out.hidden_states[-2]
        if self.pooled:
            return hidden, out.text_embeds
        return (hidden,)


class UNetWrapper(torch.nn.Module):
    """(sample, timestep, encoder_hidden_states, text_embeds, time_ids) -> noise_pred."""

    def __init__(self, unet: torch.nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states, text_embeds, time_ids):
        return (
            self.unet(
                sample,
                timestep,
                encoder_hidden_states=encoder_hidden_states,
                added_cond_kwargs={"text_embeds": text_embeds, "time_ids": time_ids},
                return_dict=False,
            )[0],
        )


class VAEDecoderWrapper(torch.nn.Module):
    """Scaled latent (already divided by scaling_factor) -> image in [-1, 1] (unclamped)."""

    def __init__(self, vae: torch.nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, latent):
        return (self.vae.decode(latent, return_dict=False)[0],)


class VAEEncoderWrapper(torch.nn.Module):
    """Image in [-1, 1] -> posterior moments (mean, logvar) of the latent Gaussian."""

    def __init__(self, vae: torch.nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, images):
        h = self.vae.encoder(images)
        if getattr(self.vae, "quant_conv", None) is not None:
            h = self.vae.quant_conv(h)
        return (h,)


#: component -> (wrapper class, extra keyword arguments)
WRAPPERS: dict[str, tuple[type[torch.nn.Module], dict]] = {
    "text_encoder": (TextEncoderWrapper, {"pooled": False}),
    "text_encoder_2": (TextEncoderWrapper, {"pooled": True}),
    "unet": (UNetWrapper, {}),
    "refiner_unet": (UNetWrapper, {}),
    "vae_decoder": (VAEDecoderWrapper, {}),
    "vae_encoder": (VAEEncoderWrapper, {}),
}

#: component -> the SDXLModel attribute (model part) it wraps.
COMPONENT_MODULES = {
    "text_encoder": "text_encoder", "text_encoder_2": "text_encoder_2", "unet": "unet",
    "refiner_unet": "refiner_unet", "vae_decoder": "vae", "vae_encoder": "vae",
}


def wrap_module(name: str, module: torch.nn.Module) -> torch.nn.Module:
    """The torch module that computes component ``name`` from one model part (``module``)."""
    if name == "unet_controlnet" or name.startswith("controlnet_"):
        from .controlnet import ControlNetWrapper, UNetResidualWrapper

        return (UNetResidualWrapper if name == "unet_controlnet" else ControlNetWrapper)(module).eval()
    if name not in WRAPPERS:
        raise KeyError(name)
    cls, kwargs = WRAPPERS[name]
    return cls(module, **kwargs).eval()


def wrap(model: SDXLModel, spec: ComponentSpec) -> torch.nn.Module:
    """The torch module that computes ``spec`` from ``model``'s weights."""
    module = getattr(model, COMPONENT_MODULES[spec.name])
    if module is None:
        raise MissingComponentError(f"this model has no {spec.name}", "load one with --refiner SRC")
    return wrap_module(spec.name, module)
