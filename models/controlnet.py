"""SDXL ControlNets as users have them: sources, configs, checks, and the traced wrappers.

A ControlNet source is
  * a diffusers folder (``ControlNetModel.save_pretrained``: ``config.json`` + safetensors);
  * a single ``.safetensors`` file holding a diffusers-format state dict (how most SDXL
    ControlNets are shared): its config is inferred from the base model's UNet config (what
    ``ControlNetModel.from_unet`` would build) plus what the weights' shapes say (transformer
    depth per level, conditioning-embedding channels); nothing is fetched;
  * ``preset:NAME`` -- the embedded preset's seeded ControlNet (tests, benchmarks).
Its name is the folder or file stem (``preset:tiny`` -> ``tiny-seeded``).

Everything is checked before any export work: safetensors only, a readable file, and an SDXL
ControlNet that fits the base UNet (context width, pooled dim, time ids, levels): an SD 1.5
ControlNet on SDXL is a named error saying so.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import ModelSourceError, UnsafeCheckpointError

log = logging.getLogger(__name__)

#: Component names: ``controlnet_<name>``; names are safe as folder names.
PREFIX = "controlnet_"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
#: Seed offset of the presets' ControlNet (the base parts use 0..N in the loader).
PRESET_SEED_OFFSET = 97
#: Std of the seeded zero-convolutions of the preset ControlNet (from_unet leaves them zero).
PRESET_ZERO_CONV_STD = 0.05


class ControlNetSourceError(ModelSourceError):
    """A ControlNet file or folder that cannot be used (missing, unsafe, truncated, not SDXL)."""


def component_name(name: str) -> str:
    return PREFIX + name


def is_controlnet(component: str) -> bool:
    return component.startswith(PREFIX)


def controlnet_of(component: str) -> str:
    return component[len(PREFIX):]


# ---- residual layout ----------------------------------------------------------------------------
def residual_layout(cfg: Mapping[str, Any]) -> tuple[list[tuple[int, int]], int]:
    """Per down residual (channels, level), and the mid residual's channels, of a UNet/ControlNet
    config -- in the order diffusers' ``down_block_res_samples`` holds them."""
    chans = list(cfg["block_out_channels"])
    layers = cfg.get("layers_per_block", 2)
    out = [(int(chans[0]), 0)]
    for i, c in enumerate(chans):
        n = layers if isinstance(layers, int) else layers[i]
        out += [(int(c), i)] * int(n)
        if i < len(chans) - 1:
            out.append((int(c), i + 1))
    return out, int(chans[-1])


# ---- sources --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ControlNetSource:
    """A checked ControlNet source, weights not loaded. ``kind``: folder | file | preset."""

    name: str
    kind: str
    path: Path | None
    preset: str | None
    fingerprint: str

    @property
    def component(self) -> str:
        return component_name(self.name)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "path": str(self.path) if self.path else None,
                "preset": self.preset, "fingerprint": self.fingerprint}


def _fix_sources() -> str:
    return ("pass --controlnet DIR (a diffusers ControlNetModel folder: config.json + "
            "diffusion_pytorch_model.safetensors) or --controlnet FILE.safetensors")


def _stat_fp(p: Path) -> list[Any]:
    st = p.stat()
    return [p.name, st.st_size, st.st_mtime_ns]


def resolve_controlnet(src: str | Path, name: str | None = None) -> ControlNetSource:
    """Check one ``--controlnet`` argument without loading weights (named errors, nothing written)."""
    text = str(src)
    if text.startswith("preset:"):
        from . import presets

        preset = text.split(":", 1)[1]
        if preset not in presets.preset_names():
            raise ControlNetSourceError(f"unknown preset ControlNet {text!r}",
                                        f"use preset:{' or preset:'.join(presets.preset_names())}")
        cn_name = name or f"{preset}-seeded"
        fp = _sha({"preset": preset, "seed_offset": PRESET_SEED_OFFSET, "std": PRESET_ZERO_CONV_STD,
                   "unet": presets.get_preset(preset).unet, "revision": presets.PRESET_REVISION,
                   "torch": torch.__version__.split("+")[0]})
        return _named(ControlNetSource(cn_name, "preset", None, preset, fp))
    path = Path(text).expanduser()
    if not path.exists():
        raise ControlNetSourceError(f"ControlNet {path} does not exist", _fix_sources())
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ControlNetSourceError(f"ControlNet folder {path} has no config.json", _fix_sources())
        weights = sorted(path.glob("*.safetensors"))
        if not weights:
            unsafe = [p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt")]
            if unsafe:
                raise UnsafeCheckpointError(f"ControlNet folder {path} holds only pickle weights ({unsafe[0]})",
                                            "convert them to safetensors (pickle files can run code; we never load them)")
            raise ControlNetSourceError(f"ControlNet folder {path} holds no .safetensors weights", _fix_sources())
        items = [hashlib.sha256((path / "config.json").read_bytes()).hexdigest()] + [_stat_fp(p) for p in weights]
        return _named(ControlNetSource(name or path.name, "folder", path.resolve(), None, _sha(items)))
    if path.suffix != ".safetensors":
        if path.suffix in (".bin", ".pt", ".pth", ".ckpt"):
            raise UnsafeCheckpointError(f"ControlNet {path} is a pickle checkpoint",
                                        "convert it to .safetensors (pickle files can run code; we never load them)")
        raise ControlNetSourceError(f"ControlNet {path} is not a .safetensors file or a diffusers folder",
                                    _fix_sources())
    _check_safetensors(path)
    return _named(ControlNetSource(name or path.stem, "file", path.resolve(), None, _sha(_stat_fp(path))))


def _named(src: ControlNetSource) -> ControlNetSource:
    if not NAME_RE.match(src.name):
        raise ControlNetSourceError(f"ControlNet name {src.name!r} is not usable as a name",
                                    "rename the folder/file to letters, digits, '.', '_' or '-' (up to 64)")
    return src


def _sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _check_safetensors(path: Path) -> list[str]:
    """The tensor names of a safetensors file whose header and size are intact (truncation caught)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
            # The header lists every tensor's byte range: the file must hold the last one.
            import struct

            with open(path, "rb") as raw:
                n = struct.unpack("<Q", raw.read(8))[0]
                header = json.loads(raw.read(n))
            end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
            if path.stat().st_size < 8 + n + end:
                raise ValueError(f"file is {path.stat().st_size} bytes, its header needs {8 + n + end}")
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own SafetensorError / OSError variants
        raise ControlNetSourceError(f"ControlNet {path} is not a readable safetensors file ({exc})",
                                    "download it again (it looks truncated or corrupt)") from None
    return keys


# ---- configs ----------------------------------------------------------------------------------
def _controlnet_init_keys() -> set[str]:
    from diffusers import ControlNetModel

    return set(inspect.signature(ControlNetModel.__init__).parameters) - {"self"}


def config_from_unet(unet_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The ControlNet config ``ControlNetModel.from_unet`` builds from this UNet config."""
    keys = _controlnet_init_keys() - {"conditioning_channels", "conditioning_embedding_out_channels",
                                      "controlnet_conditioning_channel_order", "global_pool_conditions"}
    return {k: v for k, v in unet_cfg.items() if k in keys}


def infer_config(state: Mapping[str, Any], unet_cfg: Mapping[str, Any], where: str) -> dict[str, Any]:
    """A single file's config: the base UNet's, with what its weights' shapes say instead."""
    if any(k.startswith("control_model.") or ".input_blocks." in k for k in list(state)[:50]):
        raise ControlNetSourceError(
            f"ControlNet {where} is in the original (control_model.*) layout",
            "convert it to diffusers' layout (ControlNetModel.from_single_file + save_pretrained) and pass the folder")
    if "controlnet_cond_embedding.conv_in.weight" not in state:
        raise ControlNetSourceError(f"{where} holds no ControlNet weights (no controlnet_cond_embedding.*)",
                                    "pass a ControlNet, not a UNet, LoRA or other model")
    cfg = config_from_unet(unet_cfg)
    n_levels = len(cfg["block_out_channels"])
    depth = []
    for i in range(n_levels):
        ks = [int(m.group(1)) for k in state
              if (m := re.match(rf"down_blocks\.{i}\.attentions\.0\.transformer_blocks\.(\d+)\.", k))]
        depth.append(max(ks) + 1 if ks else 1)
    if any(re.match(r"down_blocks\.\d+\.attentions\.", k) for k in state):
        cfg["transformer_layers_per_block"] = depth
    conv_in = state["controlnet_cond_embedding.conv_in.weight"]
    chans = [int(conv_in.shape[0])]
    j = 1
    while f"controlnet_cond_embedding.blocks.{j}.weight" in state:
        chans.append(int(state[f"controlnet_cond_embedding.blocks.{j}.weight"].shape[0]))
        j += 2
    cfg["conditioning_embedding_out_channels"] = chans
    cfg["conditioning_channels"] = int(conv_in.shape[1])
    return cfg


def check_fits(cfg: Mapping[str, Any], unet_cfg: Mapping[str, Any], name: str) -> None:
    """Refuse a ControlNet whose residuals the base UNet cannot take (SD 1.5 / SD 2 on SDXL, ...)."""
    problems = []
    for key, what in (("cross_attention_dim", "text context width"), ("addition_embed_type", "added conditioning"),
                      ("projection_class_embeddings_input_dim", "pooled + time-id embedding width"),
                      ("block_out_channels", "level widths"), ("layers_per_block", "layers per level")):
        a, b = cfg.get(key), unet_cfg.get(key)
        if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
            a = list(a) if isinstance(a, (list, tuple)) else a
            b = list(b) if isinstance(b, (list, tuple)) else b
        if a != b:
            problems.append(f"{what} {key}={a!r}, the base UNet has {b!r}")
    if problems:
        sd15 = cfg.get("cross_attention_dim") in (768, 1024) and cfg.get("addition_embed_type") is None
        raise ControlNetSourceError(
            f"ControlNet {name!r} does not fit this SDXL base UNet ({'; '.join(problems)})"
            + (": it is an SD 1.x/2.x ControlNet" if sd15 else ""),
            "use a ControlNet trained for SDXL (for this base model)")
    levels = len(cfg["block_out_channels"])
    emb = cfg.get("conditioning_embedding_out_channels") or (16, 32, 96, 256)
    if 2 ** (len(emb) - 1) != 8:
        raise ControlNetSourceError(f"ControlNet {name!r}: its conditioning embedding downsamples "
                                    f"{2 ** (len(emb) - 1)}x, the VAE 8x", "use a ControlNet for this model family")
    del levels


def read_config(src: ControlNetSource, unet_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The ControlNet's config (without loading weights, except a single file's header shapes)."""
    if src.kind == "preset":
        from diffusers import ControlNetModel

        cfg = {**config_from_unet(unet_cfg), "conditioning_embedding_out_channels": (16, 32, 96, 256)}
        keys = _controlnet_init_keys()
        cfg = {k: v for k, v in cfg.items() if k in keys}
        del ControlNetModel
    elif src.kind == "folder":
        assert src.path is not None
        try:
            cfg = json.loads((src.path / "config.json").read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ControlNetSourceError(f"{src.path / 'config.json'} is not valid JSON ({exc})",
                                        "re-save the ControlNet with save_pretrained") from None
        if cfg.get("_class_name") not in (None, "ControlNetModel"):
            raise ControlNetSourceError(f"{src.path} is a {cfg.get('_class_name')}, not a ControlNetModel",
                                        "pass a diffusers ControlNetModel folder (union/XS variants are not supported)")
        keys = _controlnet_init_keys()
        cfg = {k: v for k, v in cfg.items() if k in keys}
    else:
        assert src.path is not None
        from safetensors import safe_open

        with safe_open(str(src.path), framework="pt") as f:
            shapes = {k: _Shape(tuple(f.get_slice(k).get_shape())) for k in f.keys()}  # noqa: SIM118 - a safetensors handle, not a dict
        cfg = infer_config(shapes, unet_cfg, str(src.path))
    check_fits(cfg, unet_cfg, src.name)
    return cfg


@dataclass(frozen=True)
class _Shape:
    shape: tuple[int, ...]


def load_controlnet(src: ControlNetSource, unet_cfg: Mapping[str, Any], unet: Any = None) -> Any:
    """The ``ControlNetModel`` (eval, fp32, no grad). Presets are built from ``unet`` (the base UNet)."""
    from diffusers import ControlNetModel

    if src.kind == "preset":
        if unet is None:
            from .loader import _build_preset_part

            unet = _build_preset_part(src.preset or "tiny", "unet")
        return preset_controlnet(unet, seed=PRESET_SEED_OFFSET)
    cfg = read_config(src, unet_cfg)
    assert src.path is not None
    from safetensors.torch import load_file

    files = [src.path] if src.kind == "file" else sorted(src.path.glob("*.safetensors"))
    state: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            state.update(load_file(str(f)))
        except Exception as exc:  # noqa: BLE001 - safetensors' errors are not one class
            raise ControlNetSourceError(f"cannot read ControlNet weights {f} ({exc})",
                                        "download it again (it looks truncated or corrupt)") from None
    model: Any = ControlNetModel(**cfg)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        raise ControlNetSourceError(f"ControlNet {src.name!r}: weights do not fit its config ({str(exc)[:300]})",
                                    "pass an SDXL ControlNet for this base model, with its own config.json") from None
    if missing or unexpected:
        raise ControlNetSourceError(
            f"ControlNet {src.name!r}: {len(missing)} weights missing, {len(unexpected)} unexpected "
            f"(e.g. {(missing or unexpected)[0]})", "pass an SDXL ControlNet (diffusers layout) for this base model")
    return model.to(torch.float32).eval().requires_grad_(False)


def preset_controlnet(unet: Any, seed: int = PRESET_SEED_OFFSET) -> Any:
    """A seeded ControlNet for a preset UNet: ``from_unet`` with its zero convolutions randomized
    (else every residual is zero and every test would compare zeros)."""
    from diffusers import ControlNetModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        cn = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32, 96, 256))
    g = torch.Generator().manual_seed(seed)
    zeroed = [cn.controlnet_cond_embedding.conv_out, cn.controlnet_mid_block, *cn.controlnet_down_blocks]
    with torch.no_grad():
        for mod in zeroed:
            for p in mod.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * PRESET_ZERO_CONV_STD)
    return cn.to(torch.float32).eval().requires_grad_(False)


def save_preset_controlnet(preset: str, out: str | Path, *, single_file: bool = False,
                           seed: int = PRESET_SEED_OFFSET) -> Path:
    """Write the preset's seeded ControlNet as a user would have it (a folder, or one .safetensors)."""
    from .loader import _build_preset_part

    cn = preset_controlnet(_build_preset_part(preset, "unet"), seed=seed)
    out = Path(out)
    if single_file:
        from safetensors.torch import save_file

        out.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in cn.state_dict().items()}, str(out))
    else:
        cn.save_pretrained(str(out), safe_serialization=True)
    return out


# ---- wrappers (the traced graphs) -----------------------------------------------------------------
class ControlNetWrapper(torch.nn.Module):
    """(sample, timestep, context, text_embeds, time_ids, controlnet_cond, conditioning_scale)
    -> the residuals, ``residual_k * conditioning_scale[k]``.

    diffusers scales inside ``ControlNetModel.forward`` (``sample * conditioning_scale``, guess
    mode: ``* logspace(-1, 0, n) * scale``); here the module runs at scale 1.0 (``x * 1.0`` is x)
    and the graph multiplies by the per-residual scale tensor: the same float32 products, and a
    scale or window change needs no rebuild.
    """

    def __init__(self, controlnet: torch.nn.Module):
        super().__init__()
        self.controlnet = controlnet

    def forward(self, sample, timestep, encoder_hidden_states, text_embeds, time_ids, controlnet_cond,
                conditioning_scale):
        down, mid = self.controlnet(
            sample, timestep, encoder_hidden_states=encoder_hidden_states, controlnet_cond=controlnet_cond,
            conditioning_scale=1.0, guess_mode=False,
            added_cond_kwargs={"text_embeds": text_embeds, "time_ids": time_ids}, return_dict=False)
        n = len(down)
        return tuple(d * conditioning_scale[k] for k, d in enumerate(down)) + (mid * conditioning_scale[n],)


class UNetResidualWrapper(torch.nn.Module):
    """The base UNet with ControlNet residuals: (plain inputs..., down_residual_0.., mid_residual)."""

    def __init__(self, unet: torch.nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states, text_embeds, time_ids, *residuals):
        return (
            self.unet(
                sample, timestep, encoder_hidden_states=encoder_hidden_states,
                added_cond_kwargs={"text_embeds": text_embeds, "time_ids": time_ids},
                down_block_additional_residuals=list(residuals[:-1]),
                mid_block_additional_residual=residuals[-1], return_dict=False,
            )[0],
        )


__all__ = ["ControlNetSource", "ControlNetSourceError", "ControlNetWrapper", "UNetResidualWrapper",
           "component_name", "config_from_unet", "controlnet_of", "is_controlnet", "load_controlnet",
           "preset_controlnet", "read_config", "residual_layout", "resolve_controlnet", "save_preset_controlnet"]
