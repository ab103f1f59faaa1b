"""Single-file SDXL checkpoints (the original SGM / A1111 layout), read offline.

Stability's ``sd_xl_base_1.0.safetensors``, ``sd_xl_refiner_1.0.safetensors``, nearly
every community fine-tune and stand-alone VAEs (``sdxl_vae.safetensors``, the fp16-fix
VAE) come as one safetensors file in the original layout. diffusers' ``from_single_file``
machinery converts them, but it fetches the diffusers configs from the hub. Here the
configs are supplied locally -- the embedded presets' configs (the ``sdxl`` preset's are
stabilityai's base and refiner configs) -- and the conversion is diffusers' own
(``convert_ldm_unet_checkpoint``, ``convert_ldm_vae_checkpoint``,
``convert_ldm_clip_checkpoint``, ``convert_open_clip_checkpoint``). Nothing is fetched.

Two steps, as for folders:

* :func:`inspect_file` reads only the safetensors *header* (names, shapes, offsets): it
  refuses a truncated file, an SD 1.x/2.x checkpoint or a base passed as refiner (and the
  reverse) with named errors, and picks the preset whose configs the shapes match. No
  weights are read, so fingerprinting stays well under a second on a 7 GB file.
* :func:`load_file_part` reads one component's tensors (by key prefix) and converts them
  with diffusers; every parameter of the diffusers module must come from the file.

Tokenizers: a checkpoint has none. A text encoder with CLIP's 49408 tokens gets CLIP's
real tokenizers (:func:`~sdxl_export.models.clip_vocab.clip_tokenizers`); one with the
tiny presets' vocabulary size gets theirs (single files written from those presets).
"""

from __future__ import annotations

import json
import logging
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import errors
from . import presets as _presets

log = logging.getLogger(__name__)

UNET = "model.diffusion_model."
VAE = "first_stage_model."
CLIP_L = "conditioner.embedders.0.transformer."
#: The OpenCLIP bigG encoder: embedder 1 in a base, embedder 0 (the only one) in a refiner.
BIGG = {"base": "conditioner.embedders.1.model.", "refiner": "conditioner.embedders.0.model."}
#: Keys of stand-alone VAE files (no prefix) that a VAE always has.
VAE_ONLY_KEY = "encoder.conv_in.weight"
_MAX_HEADER = 100 * 2**20


@dataclass(frozen=True)
class SingleFile:
    """A checked single-file checkpoint: what it holds and which preset configs describe it."""

    path: Path
    role: str  # "base" | "refiner" | "vae"
    preset: str
    vocab_size: int | None
    #: key -> shape, from the header (no weights read)
    shapes: dict[str, tuple[int, ...]]

    def fingerprint(self) -> dict[str, Any]:
        """Name, size and mtime (as for a folder's weights) and the configs it is read with."""
        st = self.path.stat()
        return {"file": self.path.name, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "role": self.role,
                "configs": self.preset, "vocab_size": self.vocab_size}

    def part_config(self, part: str) -> dict[str, Any]:
        cfg = dict(getattr(_presets.get_preset(self.preset), part))
        if part.startswith("text_encoder"):
            cfg["vocab_size"] = self.vocab_size
        return cfg


def read_header(path: Path) -> dict[str, tuple[int, ...]]:
    """{tensor name: shape} of a safetensors file, checked to be complete.

    The header says where each tensor ends; a file shorter than that was cut off (an
    interrupted download), which loading would otherwise report as an opaque error deep
    inside the conversion.
    """
    def bad(what: str) -> errors.ModelSourceError:
        return errors.ModelSourceError(f"{path} is not a readable safetensors file: {what}",
                                       "download the checkpoint again (the .safetensors file)")

    size = path.stat().st_size
    try:
        with path.open("rb") as fh:
            raw = fh.read(8)
            if len(raw) < 8:
                raise bad(f"{size} bytes")
            (n,) = struct.unpack("<Q", raw)
            if n > min(_MAX_HEADER, size - 8):
                raise bad("the header is cut off or damaged")
            header = json.loads(fh.read(n))
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise bad(type(exc).__name__) from None
    header.pop("__metadata__", None)
    end = max((int(v["data_offsets"][1]) for v in header.values()), default=0)
    if 8 + n + end > size:
        raise bad(f"truncated ({size} bytes, the header needs {8 + n + end})")
    return {k: tuple(int(d) for d in v["shape"]) for k, v in header.items()}


def _role(path: Path, shapes: dict[str, tuple[int, ...]]) -> str:
    keys = shapes.keys()
    has = {p: any(k.startswith(p) for k in keys) for p in (UNET, VAE, CLIP_L, *BIGG.values(), "cond_stage_model.")}
    if has["cond_stage_model."]:
        raise errors.ModelSourceError(
            f"{path} is a Stable Diffusion 1.x/2.x checkpoint (cond_stage_model), not SDXL",
            "pass an SDXL checkpoint (e.g. sd_xl_base_1.0.safetensors)")
    if has[UNET] and has[BIGG["base"]] and has[CLIP_L]:
        return "base"
    if has[UNET] and has[BIGG["refiner"]] and not has[CLIP_L]:
        return "refiner"
    if not has[UNET] and (has[VAE] or VAE_ONLY_KEY in keys):
        return "vae"
    raise errors.ModelSourceError(
        f"{path} is not an SDXL checkpoint (no SDXL UNet + text encoder keys)",
        "pass an SDXL base or refiner .safetensors in the original (SGM/A1111) layout, or a diffusers folder")


def _match_preset(path: Path, role: str, shapes: dict[str, tuple[int, ...]]) -> str:
    """The preset whose configs the checkpoint's shapes match (``sdxl`` for real SDXL files)."""
    def dim(key: str, axis: int) -> int | None:
        s = shapes.get(key)
        return s[axis] if s is not None and len(s) > axis else None

    vae_prefix = VAE if any(k.startswith(VAE) for k in shapes) else ""
    seen = {
        "unet": (dim(UNET + "input_blocks.0.0.weight", 0), dim(UNET + "label_emb.0.0.weight", 1)),
        "vae": dim(vae_prefix + "encoder.conv_in.weight", 0),
        "text": (dim(CLIP_L + "text_model.embeddings.token_embedding.weight", 1),
                 dim(BIGG.get(role, "") + "token_embedding.weight", 1), dim(BIGG.get(role, "") + "text_projection", 1)),
    }
    for name, cfg in _presets.PRESETS.items():
        unet = cfg.refiner_unet if role == "refiner" else cfg.unet
        want = {
            "unet": (unet["block_out_channels"][0], unet["projection_class_embeddings_input_dim"]),
            "vae": cfg.vae["block_out_channels"][0],
            "text": (cfg.text_encoder["hidden_size"] if role == "base" else None,
                     cfg.text_encoder_2["hidden_size"], cfg.text_encoder_2["projection_dim"]),
        }
        checks = ("vae",) if role == "vae" else ("unet", "vae", "text") if role == "base" else ("unet",)
        if all(seen[c] == want[c] for c in checks):
            return name
    raise errors.ModelSourceError(
        f"{path} is an SDXL {role} checkpoint of an unknown architecture (UNet width/conditioning "
        f"{seen['unet']}, VAE width {seen['vae']})",
        "pass a checkpoint with SDXL's architecture, or convert it to a diffusers folder and pass that")


def inspect_file(path: Path, role: str) -> SingleFile:
    """Check a single-file checkpoint given as ``role`` (base/refiner/vae) from its header."""
    if path.suffix != ".safetensors":
        raise errors.UnsafeCheckpointError(
            f"{path} is not a .safetensors file",
            "pass the .safetensors version of the checkpoint; sdxl-export never unpickles .ckpt/.pt/.bin")
    shapes = read_header(path)
    found = _role(path, shapes)
    if role == "vae" and found in ("base", "refiner"):
        found = "vae"  # a whole checkpoint as --vae: its VAE (first_stage_model) is used
    if found != role:
        flag = {"base": "--model", "refiner": "--refiner", "vae": "--vae"}[found]
        raise errors.ModelSourceError(
            f"{path} is an SDXL {found} checkpoint, given as the {role}", f"pass it as {flag} FILE")
    preset = _match_preset(path, role, shapes)
    vocab = None
    if role == "base":
        vocab = shapes[CLIP_L + "text_model.embeddings.token_embedding.weight"][0]
        vocab2 = shapes[BIGG["base"] + "token_embedding.weight"][0]
        if vocab != vocab2 or not _known_vocab(vocab):
            raise errors.ModelSourceError(
                f"{path}: text encoders with {vocab} and {vocab2} tokens; no offline tokenizer has that many "
                "(SDXL's CLIP tokenizer has 49408)", "pass an SDXL checkpoint with CLIP's vocabulary")
    return SingleFile(path=path, role=role, preset=preset, vocab_size=vocab, shapes=shapes)


def _known_vocab(n: int) -> bool:
    from .clip_vocab import CLIP_VOCAB_SIZE, build_vocab

    return n in (CLIP_VOCAB_SIZE, len(build_vocab()[0]))


# ---- loading one component ---------------------------------------------------------------------
def _read_tensors(sf: SingleFile, prefix: str) -> dict[str, Any]:
    from safetensors import safe_open

    keys = [k for k in sf.shapes if k.startswith(prefix)]
    out: dict[str, Any] = {}
    with safe_open(str(sf.path), framework="pt") as fh:
        for k in keys:
            t = fh.get_tensor(k)
            out[k] = t.float() if t.is_floating_point() else t  # fp32 modules, as folders load
    return out


def _load_checked(sf: SingleFile, part: str, model: Any, converted: dict[str, Any], assign: bool) -> Any:
    """Load converted weights; every parameter and buffer the module saves must come from the file."""
    wanted = set(model.state_dict())
    missing = sorted(wanted - set(converted))
    if missing:
        raise errors.ModelSourceError(
            f"{sf.path}: its {part} lacks {len(missing)} of {len(wanted)} weights (e.g. {missing[0]})",
            "pass a complete SDXL checkpoint (download it again if it was cut off)")
    unexpected = sorted(set(converted) - wanted)
    if unexpected:
        log.info("%s: %d %s entries not used (e.g. %s)", sf.path.name, len(unexpected), part, unexpected[0])
    try:
        model.load_state_dict({k: v for k, v in converted.items() if k in wanted}, strict=True, assign=assign)
    except RuntimeError as exc:  # shape mismatches: the file is not what its header claimed to match
        raise errors.ModelSourceError(
            f"{sf.path}: its {part} does not fit the {sf.preset!r} configs ({str(exc).splitlines()[1].strip()})",
            "pass a checkpoint with SDXL's architecture") from None
    return model.eval().requires_grad_(False)


def load_file_part(sf: SingleFile, part: str) -> Any:
    """One component of a single-file checkpoint as a diffusers/transformers module (or tokenizer)."""
    from .clip_vocab import tokenizers_for_vocab

    if part in ("tokenizer", "tokenizer_2"):
        pair = tokenizers_for_vocab(int(sf.vocab_size or 0))
        assert pair is not None  # inspect_file checked the vocabulary size
        return pair[0 if part == "tokenizer" else 1]
    if part in ("scheduler", "refiner_scheduler"):
        return dict(_presets.get_preset(sf.preset).scheduler)
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders import single_file_utils as sfu

    log.info("loading %s from single-file checkpoint %s (%r configs, diffusers' conversion)",
             part, sf.path, sf.preset)
    cfg = sf.part_config(part)
    if part in ("unet", "refiner_unet", "vae"):
        cls = AutoencoderKL if part == "vae" else UNet2DConditionModel
        prefix = UNET if part != "vae" else VAE if any(k.startswith(VAE) for k in sf.shapes) else ""
        with torch.device("meta"):  # no random init of billions of weights that are overwritten at once
            model = cls.from_config(cfg)
        full = dict(model.config)
        ckpt = _read_tensors(sf, prefix)
        if part == "vae":
            converted = sfu.convert_ldm_vae_checkpoint({VAE + k[len(prefix):]: v for k, v in ckpt.items()}, full)
        else:
            converted = sfu.convert_ldm_unet_checkpoint(ckpt, full)
        return _load_checked(sf, part, model, converted, assign=True)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    if part == "text_encoder":
        model = CLIPTextModel(CLIPTextConfig(**cfg))
        converted = sfu.convert_ldm_clip_checkpoint(_read_tensors(sf, CLIP_L))
    else:
        model = CLIPTextModelWithProjection(CLIPTextConfig(**cfg))
        prefix = BIGG[sf.role]
        converted = sfu.convert_open_clip_checkpoint(model, _read_tensors(sf, prefix), prefix=prefix)
    if not hasattr(model, "text_model"):  # transformers >= 5.6 flattened CLIPTextModel (as diffusers handles it)
        converted = {k.removeprefix("text_model."): v for k, v in converted.items()}
    return _load_checked(sf, part, model, converted, assign=False)


__all__ = ["SingleFile", "inspect_file", "load_file_part", "read_header"]
