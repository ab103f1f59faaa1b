"""A UNet-only file or folder replacing the base UNet (``--unet``): SDXL-Lightning, DMD2, ...

Distilled few-step SDXL models are often shipped as the UNet alone:
``sdxl_lightning_4step_unet.safetensors`` is a diffusers ``UNet2DConditionModel`` state dict
(ByteDance's model card loads it with ``unet.load_state_dict(load_file(...))`` into a UNet
built from the SDXL base's config). Here the same: the UNet's config is the base model's own
(read from the base source, nothing fetched), the weights come from the file, every weight of
the UNet must be in it. A file in the original (SGM/A1111) layout (``model.diffusion_model.*``
or bare ``input_blocks.*`` keys) is converted with diffusers' ``convert_ldm_unet_checkpoint``.
A folder is a diffusers UNet folder (``config.json`` + safetensors) or a model folder with
``unet/``; its own config is used.

Refused with named errors: pickle files (.bin/.pt; convert them to safetensors), a refiner
UNet, a UNet of another width, and UNets with a guidance embedding (``time_cond_proj_dim``,
the original LCM-SDXL UNet): the exported UNet takes no ``timestep_cond`` input.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import errors

log = logging.getLogger(__name__)

LDM_PREFIX = "model.diffusion_model."


@dataclass(frozen=True)
class UnetFile:
    """A checked UNet-only safetensors file and the (base) config it is loaded with."""

    path: Path
    layout: str  # "diffusers" | "ldm"
    config: dict[str, Any] = field(hash=False)
    shapes: dict[str, tuple[int, ...]] = field(hash=False, repr=False)

    def fingerprint(self) -> str:
        """Name, size, mtime (as for a folder's weights), the layout and the config it is read with."""
        st = self.path.stat()
        obj = {"file": self.path.name, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "layout": self.layout,
               "config": self.config}
        return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()

    def load(self) -> Any:
        """The UNet: base config, this file's weights (all of them), fp32, eval, no grad."""
        import torch
        from diffusers import UNet2DConditionModel
        from safetensors import safe_open

        log.info("loading the base UNet from %s (%s layout, the base model's config)", self.path, self.layout)
        with torch.device("meta"):
            model = UNet2DConditionModel.from_config(self.config)
        with safe_open(str(self.path), framework="pt") as fh:
            sd = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 -- safe_open is not iterable
        sd = {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}
        if self.layout == "ldm":
            from diffusers.loaders import single_file_utils as sfu

            sd = sfu.convert_ldm_unet_checkpoint({k if k.startswith(LDM_PREFIX) else LDM_PREFIX + k: v
                                                  for k, v in sd.items()}, dict(model.config))
        wanted = set(model.state_dict())
        missing = sorted(wanted - set(sd))
        if missing:
            raise errors.ModelSourceError(
                f"{self.path}: the UNet lacks {len(missing)} of {len(wanted)} weights (e.g. {missing[0]})",
                "pass a complete SDXL UNet state dict (e.g. sdxl_lightning_4step_unet.safetensors)")
        extra = sorted(set(sd) - wanted)
        if extra:
            log.info("%s: %d entries not used (e.g. %s)", self.path.name, len(extra), extra[0])
        try:
            model.load_state_dict({k: sd[k] for k in wanted}, strict=True, assign=True)
        except RuntimeError as exc:
            raise errors.ModelSourceError(
                f"{self.path}: the UNet does not fit the base model's config ({str(exc).splitlines()[1].strip()})",
                "pass a UNet of the same architecture as --model (an SDXL base UNet)") from None
        return model.eval().requires_grad_(False)


def _check_no_guidance_embedding(cfg: dict[str, Any], where: Path) -> None:
    if cfg.get("time_cond_proj_dim") is not None:
        raise errors.ModelSourceError(
            f"{where}: this UNet takes a guidance embedding (time_cond_proj_dim={cfg['time_cond_proj_dim']}, "
            "as the original LCM-SDXL UNet); the exported UNet has no timestep_cond input",
            "use LCM-LoRA (lcm-lora-sdxl) with the lcm scheduler, or a UNet without time_cond_proj_dim")


def inspect_unet_file(path: Path, base_config: dict[str, Any]) -> UnetFile:
    """Check a UNet-only file from its safetensors header (no weights read)."""
    from .single_file import read_header

    if path.suffix != ".safetensors":
        raise errors.UnsafeCheckpointError(
            f"{path} is not a .safetensors file",
            "convert it to safetensors (safetensors.torch.save_file(torch.load(f))) in a trusted environment; "
            "sdxl-export never unpickles .bin/.pt/.ckpt")
    shapes = read_header(path)
    if "conv_in.weight" in shapes:
        layout, conv, add = "diffusers", "conv_in.weight", "add_embedding.linear_1.weight"
        if "time_embedding.cond_proj.weight" in shapes:
            _check_no_guidance_embedding({"time_cond_proj_dim": shapes["time_embedding.cond_proj.weight"][1]}, path)
    else:
        pre = LDM_PREFIX if any(k.startswith(LDM_PREFIX) for k in shapes) else ""
        layout, conv, add = "ldm", pre + "input_blocks.0.0.weight", pre + "label_emb.0.0.weight"
        if conv not in shapes:
            raise errors.ModelSourceError(
                f"{path} is not a UNet state dict (no conv_in.weight or input_blocks.0.0.weight)",
                "pass a diffusers UNet .safetensors (e.g. sdxl_lightning_4step_unet.safetensors), a UNet folder, "
                "or a whole checkpoint as --model")
    want_conv = (int(base_config["block_out_channels"][0]), int(base_config.get("in_channels", 4)))
    got_conv = tuple(shapes[conv][:2])
    want_add = int(base_config.get("projection_class_embeddings_input_dim") or 0)
    got_add = shapes.get(add, (0, 0))[1] if len(shapes.get(add, ())) > 1 else None
    if got_conv != want_conv or (want_add and got_add != want_add):
        raise errors.ModelSourceError(
            f"{path}: a UNet with first block {got_conv} and conditioning {got_add}, the base model's has "
            f"{want_conv} and {want_add}" + (" (a refiner UNet?)" if got_add and got_add < want_add else ""),
            "pass a UNet of the base model's architecture (an SDXL base UNet)")
    return UnetFile(path=path, layout=layout, config=dict(base_config), shapes=shapes)


def unet_origin(src: str, base_config: dict[str, Any]) -> tuple[str, tuple[str, Any], str]:
    """(identity, origin, fingerprint) of ``--unet SRC``: a file, a UNet folder or a model folder."""
    from .loader import _check_folder_weights, folder_fingerprint

    path = Path(src).expanduser()
    if not path.exists():
        raise errors.ModelSourceError(f"--unet {src!r} does not exist",
                                      "pass a UNet .safetensors file, a UNet folder (config.json) or a model folder")
    ident = str(path.resolve())
    if path.is_file():
        uf = inspect_unet_file(path, base_config)
        return ident, ("unet_file", uf), uf.fingerprint()
    sub = path if (path / "config.json").is_file() else path / "unet"
    if not (sub / "config.json").is_file():
        raise errors.ModelSourceError(f"{path} has no config.json and no unet/ folder",
                                      "pass a diffusers UNet folder (save_pretrained) or a .safetensors UNet file")
    _check_folder_weights(sub, "unet", f"UNet folder {sub}: ")
    cfg = json.loads((sub / "config.json").read_text())
    _check_no_guidance_embedding(cfg, sub)
    return ident, ("subfolder", sub), folder_fingerprint(sub)
