"""LoRA files: checked, hashed, and turned into per-parameter weight deltas by diffusers' own loader.

Why diffusers' loader and not our own key mapping: community LoRAs come as diffusers/PEFT
files (``save_lora_weights``) and as kohya/A1111 files (``lora_unet_*``, ``lora_te1_*``,
``lora_te2_*`` with alphas). diffusers' ``StableDiffusionXLPipeline.load_lora_weights``
converts both (block renumbering, alphas) and injects peft layers; the meaning of a LoRA
set is what ``set_adapters(names, weights)`` + ``fuse_lora`` then do:
``W = W0 + sum_i scale_i * dW_i`` with ``dW_i`` peft's ``get_delta_weight`` at weight 1.

So the deltas are read off peft's layers: the LoRA is loaded into *skeletons* of the three
modules it may touch (built from the configs on the meta device, then given uninitialised
CPU storage -- never written, so the pages are never touched and a full-size UNet skeleton
costs no resident memory). Only the small LoRA factors are real; each layer's
``get_delta_weight`` is exactly the delta ``fuse_lora`` would add.

Safetensors only: the file is read with ``safetensors`` before diffusers sees it (a dict is
passed on), so a pickle is never unpickled.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import re
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..artifacts import sha256_file
from ..errors import InvalidLoraError

log = logging.getLogger(__name__)

#: The model parts an SDXL LoRA can touch (diffusers' SDXL ``_lora_loadable_modules``).
LORA_PARTS = ("text_encoder", "text_encoder_2", "unet")
#: A scale beyond this is a typo, not a style: refused.
MAX_ABS_SCALE = 10.0
#: First bytes of pickle / torch-zip checkpoints.
_PICKLE_MAGIC = (b"\x80", b"PK\x03\x04")
_LOAD_LOCK = threading.Lock()  # diffusers/peft loaders mutate global logging state

class LowRank:
    """``dW = up @ down`` kept as its two factors (peft's Linear ``get_delta_weight`` with the
    scaling folded into ``down``): a rank-r delta of an (o, i) weight costs r * (o + i) numbers,
    not o * i -- what the switcher's cache holds between switches."""

    __slots__ = ("down", "up")

    def __init__(self, up: torch.Tensor, down: torch.Tensor):
        self.up, self.down = up, down

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.up.shape[0]), int(self.down.shape[1])

    def nbytes(self) -> int:
        return self.up.numel() * self.up.element_size() + self.down.numel() * self.down.element_size()


Delta = torch.Tensor | LowRank
Deltas = dict[str, dict[str, Delta]]  # part -> parameter name -> dW at scale 1


def dense(delta: Delta) -> torch.Tensor:
    """A delta as a full tensor (computed when a switch needs it, not kept)."""
    return delta.up @ delta.down if isinstance(delta, LowRank) else delta


def deltas_bytes(deltas: Deltas) -> int:
    """Bytes one LoRA's deltas hold."""
    return sum(d.nbytes() if isinstance(d, LowRank) else d.numel() * d.element_size()
               for part in deltas.values() for d in part.values())


def _delta_of(mod: Any, adapter: str) -> Delta:
    """One peft layer's delta at weight 1: low-rank factors for a plain Linear LoRA (no DoRA,
    no fan-in/fan-out transpose), else peft's own dense ``get_delta_weight``."""
    from torch import nn

    plain = (isinstance(mod.lora_A[adapter], nn.Linear) and isinstance(mod.lora_B[adapter], nn.Linear)
             and not getattr(mod, "fan_in_fan_out", False) and not getattr(mod, "use_dora", {}).get(adapter, False)
             and mod.get_base_layer().weight.dim() == 2)
    if plain:
        up = mod.lora_B[adapter].weight.detach().to(torch.float32).clone()
        down = (mod.lora_A[adapter].weight.detach().to(torch.float32) * float(mod.scaling[adapter])).clone()
        return LowRank(up, down)
    return mod.get_delta_weight(adapter).detach().clone()  # type: ignore[no-any-return]


@dataclass(frozen=True)
class LoraFile:
    """One checked LoRA file: where, its content hash, and what it touches (after loading)."""

    path: Path
    sha256: str

    @property
    def name(self) -> str:
        return self.path.stem


def check_scale(scale: Any, what: str) -> float:
    """A LoRA scale: a finite number with ``|scale| <= MAX_ABS_SCALE``."""
    try:
        value = float(scale)
    except (TypeError, ValueError):
        raise InvalidLoraError(f"LoRA scale {scale!r} of {what} is not a number",
                               "pass a number such as 0.8") from None
    if not math.isfinite(value) or abs(value) > MAX_ABS_SCALE:
        raise InvalidLoraError(f"LoRA scale {scale!r} of {what} is not a finite number within "
                               f"+-{MAX_ABS_SCALE:g}", "pass a scale such as 0.8 (1.0 is the LoRA as trained)")
    return value


def parse_lora_arg(text: str) -> tuple[str, float]:
    """``FILE[:SCALE]`` (CLI) -> ``(FILE, scale)``; the scale defaults to 1.0.

    The last ``:`` splits only when what follows is a number, so ``C:\\x.safetensors`` and
    paths with colons stay whole. The scale is checked where it is used (one named error).
    """
    head, sep, tail = text.rpartition(":")
    if sep and head:
        try:
            float(tail)
        except ValueError:
            return text, 1.0
        return head, float(tail)
    return text, 1.0


#: A LoRA *name*: a file name in the LoRA folder without ``.safetensors`` (no separators, no
#: leading dot: never a path).
LORA_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 ._()+-]{0,127}$")


def is_lora_name(name: str | Path) -> bool:
    return isinstance(name, str) and bool(LORA_NAME.match(name)) and ".." not in name


def available_loras(lora_dir: str | Path | None) -> list[str]:
    """Names of the LoRA files in ``lora_dir`` (sorted; ``[]`` without a folder)."""
    if lora_dir is None or not Path(lora_dir).is_dir():
        return []
    return sorted(p.stem for p in Path(lora_dir).glob("*.safetensors") if p.is_file() and is_lora_name(p.stem))


def resolve_lora(name: str | Path, lora_dir: str | Path | None = None, *, allow_paths: bool = True) -> LoraFile:
    """The one LoRA resolver (the CLI, ``SDXLPipeline`` and the server use it).

    A *name* (:func:`is_lora_name`: ``style`` or ``style.safetensors``) is looked up in
    ``lora_dir`` first -- never in the working directory first. Otherwise, and only when
    ``allow_paths`` (library and CLI callers; never HTTP), ``name`` is a file path.
    """
    text = str(name)
    candidates: list[Path] = []
    if lora_dir is not None and is_lora_name(text):
        folder = Path(lora_dir)
        candidates += [folder / f"{text}.safetensors", folder / text] if not text.endswith(".safetensors") \
            else [folder / text]
    if allow_paths:
        candidates.append(Path(name))
    found = next((p for p in candidates if p.is_file()), None)
    if found is None:
        where = f" in the LoRA folder {lora_dir}" if lora_dir is not None else ""
        hint = ("pass the path of a .safetensors LoRA file" if allow_paths else
                f"use one of: {', '.join(available_loras(lora_dir)) or 'none'}")
        raise InvalidLoraError(f"LoRA {text!r} does not exist{where}", hint)
    with found.open("rb") as f:
        head = f.read(4)
    if found.suffix.lower() != ".safetensors" or head.startswith(_PICKLE_MAGIC):
        raise InvalidLoraError(f"LoRA {found} is not a safetensors file (pickle checkpoints can run code)",
                               "convert it to .safetensors (or download the .safetensors version)")
    path = found.resolve()
    st = path.stat()
    return LoraFile(path, _content_hash(str(path), st.st_size, st.st_mtime_ns))


@functools.lru_cache(maxsize=256)
def _content_hash(path: str, size: int, mtime_ns: int) -> str:
    """sha256 of a LoRA file, hashed once per (path, size, mtime): a call or a served batch that
    names a LoRA resolves it every time, and hashing a 200 MB file each time would cost more
    than the switch. A rewritten file has a new size or mtime, so it is hashed again."""
    return sha256_file(Path(path))


def lora_deltas(lora: LoraFile, configs: Mapping[str, Any]) -> Deltas:
    """``{part: {parameter: dW}}`` of one LoRA at scale 1, through diffusers' SDXL loader.

    ``configs``: the ``config`` objects of ``text_encoder``, ``text_encoder_2`` (transformers)
    and ``unet`` (diffusers) of the model the LoRA is meant for. Raises
    :class:`InvalidLoraError` for an unreadable file and for one that does not fit the model
    (keys that name no layer, shapes that differ: e.g. an SD 1.5 LoRA on SDXL).
    """
    from peft.tuners.lora import LoraLayer
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = load_file(str(lora.path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise InvalidLoraError(f"LoRA {lora.path} cannot be read as safetensors ({exc})",
                               "re-download or re-save the file") from None
    weights = [k for k in state if "alpha" not in k.rsplit(".", 1)[-1] and "dora_scale" not in k]
    if not weights:
        raise InvalidLoraError(f"LoRA {lora.path} holds no LoRA weights", "pass an SDXL LoRA file")
    pipe = _skeleton(configs)
    adapter = "sdxl_export"
    try:
        with _LOAD_LOCK, _quiet():
            pipe.load_lora_weights(state, adapter_name=adapter, low_cpu_mem_usage=True)
    except (ValueError, RuntimeError, KeyError, TypeError, IndexError) as exc:
        raise InvalidLoraError(f"LoRA {lora.path} does not fit this SDXL model: {_first_line(exc)}",
                               "use a LoRA trained for SDXL (an SD 1.5 or SD 2 LoRA does not fit)") from None
    out: Deltas = {}
    loaded = 0
    for part in LORA_PARTS:
        module = getattr(pipe, part)
        for mod_name, mod in module.named_modules():
            if isinstance(mod, LoraLayer) and adapter in mod.lora_A:
                factors = [mod.lora_A[adapter].weight, mod.lora_B[adapter].weight]
                if any(f.is_meta for f in factors):
                    raise InvalidLoraError(f"LoRA {lora.path}: layer {part}.{mod_name} was not loaded",
                                           "use a LoRA trained for SDXL")
                loaded += len(factors)
                with torch.no_grad():
                    out.setdefault(part, {})[f"{mod_name}.weight"] = _delta_of(mod, adapter)
    if loaded < len(weights):
        raise InvalidLoraError(
            f"LoRA {lora.path}: {len(weights) - loaded} of its {len(weights)} weights name no layer of this "
            "SDXL model", "use a LoRA trained for SDXL (an SD 1.5 or SD 2 LoRA does not fit)")
    if not out:
        raise InvalidLoraError(f"LoRA {lora.path} touches no layer of this SDXL model", "pass an SDXL LoRA file")
    log.info("LoRA %s (%s): %s", lora.name, lora.sha256[:12],
             ", ".join(f"{p} {len(d)} weights" for p, d in out.items()))
    return out


def config_objects(configs: Mapping[str, Any]) -> dict[str, Any]:
    """Config dicts (as the manifest and ModelSource give them) -> what the skeletons take."""
    from transformers import CLIPTextConfig

    out: dict[str, Any] = {p: dict(c) for p, c in configs.items()}
    for part in ("text_encoder", "text_encoder_2"):
        if isinstance(out.get(part), dict):
            out[part] = CLIPTextConfig.from_dict(out[part])
    return out


def _skeleton(configs: Mapping[str, Any]) -> Any:
    """A diffusers SDXL pipeline whose three LoRA targets have uninitialised, untouched storage."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(configs["unet"])
        te = CLIPTextModel(configs["text_encoder"])
        te2 = CLIPTextModelWithProjection(configs["text_encoder_2"])
    for m in (unet, te, te2):
        m.to_empty(device="cpu")
        m.requires_grad_(False)
    return StableDiffusionXLPipeline(vae=None, text_encoder=te, text_encoder_2=te2, tokenizer=None,
                                     tokenizer_2=None, unet=unet, scheduler=None)


def fuse_into(module: torch.nn.Module, deltas: list[tuple[Mapping[str, Delta], float]]) -> int:
    """Add ``scale * dW`` of each LoRA into ``module``'s parameters, in order (``fuse_lora``)."""
    params = dict(module.named_parameters())
    with torch.no_grad():
        for delta, scale in deltas:
            for name, d in delta.items():
                p = params[name]
                p.add_(dense(d).to(p.dtype) * scale)
    return sum(len(d) for d, _ in deltas)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """diffusers/transformers narrate the skeletons' missing base weights: not ours to print."""
    from diffusers.utils import logging as d_logging
    from transformers.utils import logging as t_logging

    d_level, t_level = d_logging.get_verbosity(), t_logging.get_verbosity()
    bars = t_logging.is_progress_bar_enabled()
    d_logging.set_verbosity_error()
    t_logging.set_verbosity_error()
    t_logging.disable_progress_bar()
    try:
        yield
    finally:
        d_logging.set_verbosity(d_level)
        t_logging.set_verbosity(t_level)
        if bars:
            t_logging.enable_progress_bar()


__all__ = [
    "LORA_NAME",
    "LORA_PARTS",
    "MAX_ABS_SCALE",
    "Deltas",
    "LoraFile",
    "LowRank",
    "available_loras",
    "check_scale",
    "config_objects",
    "deltas_bytes",
    "dense",
    "fuse_into",
    "is_lora_name",
    "lora_deltas",
    "parse_lora_arg",
    "resolve_lora",
]
