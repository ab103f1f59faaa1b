"""Load an SDXL model (base + optional refiner) from a preset, a diffusers folder, a
single-file checkpoint (:mod:`.single_file`) or a hub id, optionally with a separate VAE.

Two steps, so that work is only done when it is needed:

* :func:`resolve_source` checks a source and fingerprints it *without loading weights*:
  a preset from its config and seed, a folder from its files. It reads configs only, so
  the exporter can decide that an artifact folder is up to date in well under a second,
  and it raises every bad-input error (unknown preset, missing component, pickle-only
  checkpoint, a base UNet passed as refiner) before anything is written.
* :meth:`ModelSource.load_part` then builds or loads one part at a time (a text encoder,
  a UNet, the VAE ...), so an export holds one component in memory, not the whole model.
  :meth:`ModelSource.load` gives the whole :class:`SDXLModel` (diffusers pipelines, tests).

Loading never unpickles: weights come from safetensors only, and a folder whose weights
are only pickle checkpoints (.bin/.pt/.ckpt) is refused with :class:`UnsafeCheckpointError`.

A separate VAE (``vae=``: a diffusers VAE folder, a model folder with ``vae/``, a
single file or a preset) replaces the base's VAE part; it is part of the identity.

The refiner shares text_encoder_2 and the VAE with the base, exactly as diffusers'
documented base+refiner example does (``text_encoder_2=base.text_encoder_2,
vae=base.vae``); only its UNet and scheduler config are read from the refiner folder.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import errors
from ..specs import MAX_TOKENS, ModelDims
from . import presets as _presets

if TYPE_CHECKING:  # torch is imported where weights are built: fingerprinting needs none of it
    import torch

log = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
BASE_FOLDERS = ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "unet", "vae", "scheduler")
REFINER_FOLDERS = ("unet", "scheduler")
#: Sub-folders that hold weights (and must hold them as safetensors).
WEIGHT_FOLDERS = ("text_encoder", "text_encoder_2", "unet", "vae")

#: The parts a model is loaded and fingerprinted by. A refiner adds the last two.
BASE_PARTS = ("tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2", "unet", "vae", "scheduler")
REFINER_PARTS = ("refiner_unet", "refiner_scheduler")
#: part -> the folder it lives in inside a diffusers base (or, for refiner_*, refiner) folder.
PART_FOLDERS = {p: p for p in BASE_PARTS} | {"refiner_unet": "unet", "refiner_scheduler": "scheduler"}
#: Seed offsets of the embedded presets' modules (``torch.manual_seed(seed * 1000 + offset)``).
PRESET_SEED_OFFSETS = {"text_encoder": 1, "text_encoder_2": 2, "unet": 3, "vae": 4, "refiner_unet": 5}
#: Config entries that bookkeeping changes (save_pretrained sets architectures/dtype), not the model.
VOLATILE_CONFIG_KEYS = ("architectures", "dtype", "torch_dtype", "transformers_version", "name_or_path")
#: SDXL's micro-conditioning: 6 time ids for the base, 5 (aesthetic score) for the refiner.
BASE_TIME_IDS, REFINER_TIME_IDS = 6, 5


def _sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "none"


@dataclass
class SDXLModel:
    """The PyTorch components of an SDXL base (+ refiner), and where they came from."""

    tokenizer: Any
    tokenizer_2: Any
    text_encoder: torch.nn.Module
    text_encoder_2: torch.nn.Module
    unet: torch.nn.Module
    vae: torch.nn.Module
    scheduler_config: dict[str, Any]
    refiner_unet: torch.nn.Module | None = None
    refiner_scheduler_config: dict[str, Any] | None = None
    #: {"kind": "preset"|"folder"|"hub", "id", "refiner", "fingerprint", "parts": {part: sha256}}
    source: dict[str, Any] = field(default_factory=dict)

    @property
    def has_refiner(self) -> bool:
        return self.refiner_unet is not None

    def dims(self) -> ModelDims:
        return dims_from_configs(
            _config_dict(self.text_encoder), _config_dict(self.text_encoder_2), _config_dict(self.unet),
            _config_dict(self.vae), _config_dict(self.refiner_unet) if self.refiner_unet is not None else None,
        )

    # ---- diffusers pipelines over the very same weights (the reference) -------------
    def base_pipeline(self, scheduler: Any | None = None):
        from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

        return StableDiffusionXLPipeline(
            vae=self.vae,
            text_encoder=self.text_encoder,
            text_encoder_2=self.text_encoder_2,
            tokenizer=self.tokenizer,
            tokenizer_2=self.tokenizer_2,
            unet=self.unet,
            scheduler=scheduler or EulerDiscreteScheduler.from_config(self.scheduler_config),
            force_zeros_for_empty_prompt=True,
            add_watermarker=False,
        )

    def refiner_pipeline(self, scheduler: Any | None = None):
        from diffusers import EulerDiscreteScheduler, StableDiffusionXLImg2ImgPipeline

        if self.refiner_unet is None:
            raise errors.MissingComponentError("this model has no refiner", "load one with --refiner SRC")
        return StableDiffusionXLImg2ImgPipeline(
            vae=self.vae,
            text_encoder=None,
            text_encoder_2=self.text_encoder_2,
            tokenizer=None,
            tokenizer_2=self.tokenizer_2,
            unet=self.refiner_unet,
            scheduler=scheduler
            or EulerDiscreteScheduler.from_config(self.refiner_scheduler_config or self.scheduler_config),
            requires_aesthetics_score=True,
            force_zeros_for_empty_prompt=False,
            add_watermarker=False,
        )

    def save_pretrained(self, base_dir: str | Path, refiner_dir: str | Path | None = None) -> None:
        """Write diffusers folders (safetensors) that :func:`load_model` reads back."""
        self.base_pipeline().save_pretrained(str(base_dir), safe_serialization=True)
        if refiner_dir is not None and self.refiner_unet is not None:
            self.refiner_pipeline().save_pretrained(str(refiner_dir), safe_serialization=True)


def _config_dict(module: Any) -> dict[str, Any]:
    """A transformers (PretrainedConfig) or diffusers (FrozenDict) module config as a dict."""
    cfg = module.config
    return cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)


# ---- dims and SDXL checks, from configs alone ------------------------------------------------
def dims_from_configs(
    te1: Mapping[str, Any], te2: Mapping[str, Any], unet: Mapping[str, Any], vae: Mapping[str, Any],
    refiner: Mapping[str, Any] | None = None, where: str = "model", refiner_where: str = "the refiner",
) -> ModelDims:
    """The numbers the component specs derive from, checked to be an SDXL base (+ refiner).

    Raises :class:`ModelSourceError` for configs that are not SDXL's (an SD 1.5 UNet, a
    base UNet passed as refiner, encoders whose widths do not add up to the context dim).
    """

    def bad(what: str, role: str = "base") -> errors.ModelSourceError:
        return errors.ModelSourceError(
            f"{where if role == 'base' else refiner_where} is not an SDXL {role}: {what}",
            "pass an SDXL base as --model and an SDXL refiner as --refiner (or --no-refiner)",
        )

    hidden1, hidden2 = int(te1["hidden_size"]), int(te2["hidden_size"])
    pooled = int(te2["projection_dim"])

    def time_ids(cfg: Mapping[str, Any], role: str) -> int:
        if cfg.get("addition_embed_type") != "text_time":
            raise bad(f"its UNet has addition_embed_type {cfg.get('addition_embed_type')!r}, "
                      "not 'text_time'", role)
        step = int(cfg["addition_time_embed_dim"])
        extra = int(cfg["projection_class_embeddings_input_dim"]) - pooled
        if extra <= 0 or extra % step:
            raise bad(f"its UNet's projection input {cfg['projection_class_embeddings_input_dim']} "
                      f"is not pooled dim {pooled} + a multiple of {step}", role)
        return extra // step

    n_base = time_ids(unet, "base")
    if n_base != BASE_TIME_IDS:
        raise bad(f"its UNet takes {n_base} time ids, SDXL's base takes {BASE_TIME_IDS}")
    if int(unet["cross_attention_dim"]) != hidden1 + hidden2:
        raise bad(f"UNet context dim {unet['cross_attention_dim']} != text encoder widths {hidden1} + {hidden2}")
    n_ref = None
    if refiner is not None:
        n_ref = time_ids(refiner, "refiner")
        if n_ref != REFINER_TIME_IDS:
            raise bad(f"its UNet takes {n_ref} time ids; SDXL's refiner takes {REFINER_TIME_IDS} "
                      "(aesthetic score) -- is it a base model?", "refiner")
        if int(refiner["cross_attention_dim"]) != hidden2:
            raise bad(f"its UNet context dim {refiner['cross_attention_dim']} != text_encoder_2 width "
                      f"{hidden2} of the base", "refiner")
    latent = int(vae.get("latent_channels", 4))
    # The base may be an inpainting UNet (diffusers' layout: latents + mask + masked-image
    # latents = 2 * latent + 1 channels, e.g. SDXL inpainting 0.1); the refiner may not.
    unet_in = int(unet.get("in_channels", 4))
    if unet_in not in (latent, 2 * latent + 1):
        raise bad(f"its UNet takes {unet_in} channels; the VAE has {latent} (an inpainting UNet "
                  f"takes {2 * latent + 1})")
    if refiner is not None and int(refiner.get("in_channels", 4)) != latent:
        raise bad(f"its UNet takes {refiner.get('in_channels')} channels, the VAE has {latent}", "refiner")
    return ModelDims(
        vocab_size=int(te1["vocab_size"]),
        text_hidden=hidden1,
        text2_hidden=hidden2,
        pooled_dim=pooled,
        unet_context=int(unet["cross_attention_dim"]),
        unet_time_ids=n_base,
        refiner_context=int(refiner["cross_attention_dim"]) if refiner is not None else None,
        refiner_time_ids=n_ref,
        latent_channels=latent,
        vae_scale=2 ** (len(vae["block_out_channels"]) - 1),
        sample_size=int(unet["sample_size"]),
        unet_in_channels=unet_in if unet_in != latent else None,
    )


# ---- fingerprints --------------------------------------------------------------------------
def folder_fingerprint(path: Path) -> str:
    """Identity of a diffusers (sub)folder: its configs' content and its weights' name/size/mtime.

    Hashing multi-GB weights on every run would cost minutes; size + mtime_ns changes
    whenever a file is rewritten, which is what incremental export needs to notice.
    Hidden files (``.cache`` of hub downloads, ``.DS_Store``) are not part of a model.
    """
    items: list[Any] = []
    for p in sorted(path.rglob("*")):
        rel = p.relative_to(path)
        if not p.is_file() or any(s.startswith(".") for s in rel.parts):
            continue
        if p.suffix in (".json", ".txt"):
            items.append((rel.as_posix(), hashlib.sha256(p.read_bytes()).hexdigest()))
        else:
            st = p.stat()
            items.append((rel.as_posix(), st.st_size, st.st_mtime_ns))
    return _sha(items)


def preset_part_fingerprint(name: str, part: str) -> str:
    """Identity of one part of an embedded preset, computed without building it.

    A preset's weights are a function of its config, its seed and the code that
    initialises them (torch's RNG, diffusers' and transformers' init), so all of those
    are in the fingerprint; a new version of any of them means a new model.
    """
    cfg = _presets.get_preset(name)
    if part in ("tokenizer", "tokenizer_2"):
        section: Any = _preset_tokenizer_identity(name)
    elif part in ("scheduler", "refiner_scheduler"):
        section = cfg.scheduler
    else:
        section = {**getattr(cfg, part), "vocab_size": _preset_vocab_size(name)}
    return _sha({
        "preset": name, "part": part, "revision": _presets.PRESET_REVISION, "seed": cfg.seed,
        "offset": PRESET_SEED_OFFSETS.get(part), "config": section,
        "torch": _version("torch").split("+")[0], "diffusers": _version("diffusers"),
        "transformers": _version("transformers"),
    })


# ---- sources ---------------------------------------------------------------------------------
@dataclass
class ModelSource:
    """A checked, fingerprinted model source whose weights are not loaded yet.

    ``origins`` maps each part to ``("preset", name)``, ``("folder", Path)`` (the
    diffusers folder holding it), ``("subfolder", Path)`` (the component's own folder: a
    stand-alone VAE), ``("file", SingleFile)`` or ``("loaded", SDXLModel)``.
    """

    kind: str
    id: str
    refiner: str | None
    origins: dict[str, tuple[str, Any]]
    fingerprints: dict[str, str]
    #: the separate VAE replacing the base's (``--vae``), None for the model's own
    vae: str | None = None
    #: the UNet file/folder replacing the base UNet (``--unet``), None for the model's own
    unet: str | None = None
    #: the native size in pixels (``--native-size``: SDXL-Turbo's 512 from a single file, whose
    #: configs are SDXL's), None for the UNet config's ``sample_size`` x the VAE's scale
    native_size: int | None = None

    @property
    def has_refiner(self) -> bool:
        return "refiner_unet" in self.origins

    @property
    def identity(self) -> dict[str, Any]:
        """The manifest's ``source``: what was exported, and its fingerprint (whole and per part)."""
        ident = {"kind": self.kind, "id": self.id, "refiner": self.refiner,
                 "fingerprint": _sha(self.fingerprints), "parts": dict(self.fingerprints)}
        return (ident | ({"vae": self.vae} if self.vae else {}) | ({"unet": self.unet} if self.unet else {})
                | ({"native_size": self.native_size} if self.native_size else {}))

    def part_config(self, part: str) -> dict[str, Any]:
        """The config dict of a model part (text encoders, UNets, VAE), read without weights.

        Presets and diffusers folders need no library import for this (diffusers writes
        every init argument); transformers omits values equal to its defaults, which are
        filled in from ``CLIPTextConfig`` only when one is missing.
        """
        cfg = self._part_config(part)
        if part == "unet" and self.native_size:
            scale = 2 ** (len(self._part_config("vae")["block_out_channels"]) - 1)
            cfg = {**cfg, "sample_size": self.native_size // scale}
        return cfg

    def _part_config(self, part: str) -> dict[str, Any]:
        origin, where = self.origins[part]
        if origin == "loaded":
            return _config_dict(getattr(where, part))
        if origin == "preset":
            cfg = dict(getattr(_presets.get_preset(where), part))
            if part.startswith("text_encoder"):
                cfg["vocab_size"] = _preset_vocab_size(where)
            return cfg
        if origin == "file":
            return where.part_config(part)
        if origin == "unet_file":
            return dict(where.config)
        sub = where if origin == "subfolder" else where / PART_FOLDERS[part]
        cfg = _read_config(lambda: json.loads((sub / "config.json").read_text()), sub)
        if part.startswith("text_encoder") and not {"vocab_size", "hidden_size", "projection_dim"} <= set(cfg):
            from transformers import CLIPTextConfig

            cfg = {**CLIPTextConfig().to_dict(), **cfg}
        return cfg

    def dims(self) -> ModelDims:
        """ModelDims from configs alone (checked to be SDXL): the specs need nothing else."""
        ref = self.part_config("refiner_unet") if self.has_refiner else None
        try:
            return dims_from_configs(
                self.part_config("text_encoder"), self.part_config("text_encoder_2"),
                self.part_config("unet"), self.part_config("vae"), ref,
                where=f"{self.kind} {self.id!r}", refiner_where=f"refiner {self.refiner!r}",
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise errors.ModelSourceError(
                f"{self.kind} {self.id!r}: a component config lacks or mangles {exc}",
                "re-save the model with diffusers' save_pretrained",
            ) from None

    def load_part(self, part: str) -> Any:
        """Build or load one part: a module (eval, no grad), a tokenizer or a scheduler config."""
        origin, where = self.origins[part]
        if origin == "loaded":
            attr = {"scheduler": "scheduler_config", "refiner_scheduler": "refiner_scheduler_config"}.get(part, part)
            return getattr(where, attr)
        if origin == "preset":
            return _build_preset_part(where, part)
        if origin == "file":
            from .single_file import load_file_part

            return load_file_part(where, part)
        if origin == "unet_file":
            return where.load()
        return _load_folder_part(where if origin == "subfolder" else where / PART_FOLDERS[part], part)

    def load(self) -> SDXLModel:
        """Every part, as one :class:`SDXLModel`."""
        parts = {p: self.load_part(p) for p in self.origins}
        return SDXLModel(
            tokenizer=parts["tokenizer"], tokenizer_2=parts["tokenizer_2"],
            text_encoder=parts["text_encoder"], text_encoder_2=parts["text_encoder_2"],
            unet=parts["unet"], vae=parts["vae"], scheduler_config=parts["scheduler"],
            refiner_unet=parts.get("refiner_unet"), refiner_scheduler_config=parts.get("refiner_scheduler"),
            source=self.identity,
        )

    @classmethod
    def from_model(cls, model: SDXLModel) -> ModelSource:
        """Wrap an already loaded model; its recorded ``source`` gives the fingerprints.

        A model modified after loading keeps its old fingerprint: export a fresh one. A
        model with no recorded source (built by hand) is fingerprinted from its content.
        """
        parts = BASE_PARTS + (REFINER_PARTS if model.has_refiner else ())
        src = dict(model.source)
        recorded = src.get("parts") or {}
        whole = src.get("fingerprint")
        fps = {p: recorded.get(p) or (_sha([whole, p]) if whole else content_fingerprint(model, p)) for p in parts}
        return cls(kind=str(src.get("kind", "loaded")), id=str(src.get("id", "in-memory model")),
                   refiner=src.get("refiner") if model.has_refiner else None,
                   origins={p: ("loaded", model) for p in parts}, fingerprints=fps, vae=src.get("vae"),
                   unet=src.get("unet"), native_size=src.get("native_size"))


def content_fingerprint(model: SDXLModel, part: str) -> str:
    """sha256 of one part's content: every weight's bytes, a tokenizer's vocab, a config."""
    obj = getattr(model, {"scheduler": "scheduler_config", "refiner_scheduler": "refiner_scheduler_config"}.get(
        part, part))
    h = hashlib.sha256(part.encode())
    if hasattr(obj, "state_dict"):
        import torch

        cfg = {k: v for k, v in _config_dict(obj).items() if not k.startswith("_") and k not in VOLATILE_CONFIG_KEYS}
        h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
        for name, tensor in sorted(obj.state_dict().items()):
            h.update(name.encode())
            h.update(str(tuple(tensor.shape)).encode() + str(tensor.dtype).encode())
            h.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    elif hasattr(obj, "get_vocab"):
        h.update(json.dumps([obj.get_vocab(), obj.pad_token, obj.model_max_length], sort_keys=True).encode())
    else:
        h.update(json.dumps(obj, sort_keys=True, default=str).encode())
    return h.hexdigest()


def _read_config(read: Any, where: Path) -> dict[str, Any]:
    try:
        return dict(read())
    except (OSError, ValueError) as exc:
        raise errors.ModelSourceError(
            f"cannot read the config of {where} ({type(exc).__name__})",
            "re-save the model with diffusers' save_pretrained",
        ) from None


def _preset_vocab_size(name: str) -> int:
    from .clip_vocab import CLIP_VOCAB_SIZE, build_vocab

    return CLIP_VOCAB_SIZE if name == "sdxl" else len(build_vocab()[0])


def _preset_tokenizer_identity(name: str) -> Any:
    """The ``sdxl`` preset uses CLIP's real tokenizers (its merge list's sha256); tiny/small their own."""
    from .clip_vocab import build_vocab, clip_vocab_sha

    return {"clip_bpe": clip_vocab_sha()} if name == "sdxl" else build_vocab()


def _build_preset_part(name: str, part: str) -> Any:
    """One part of an embedded preset, seeded exactly as the whole-model build seeds it."""
    cfg = _presets.get_preset(name)
    if part in ("tokenizer", "tokenizer_2"):
        from .clip_vocab import clip_tokenizers, make_tokenizers

        pair = clip_tokenizers(MAX_TOKENS) if name == "sdxl" else make_tokenizers(MAX_TOKENS)
        return pair[0 if part == "tokenizer" else 1]
    if part in ("scheduler", "refiner_scheduler"):
        return dict(cfg.scheduler)
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    log.info("building %s of preset %r (seeded weights, no download)", part, name)
    torch.manual_seed(cfg.seed * 1000 + PRESET_SEED_OFFSETS[part])
    if part == "text_encoder":
        mod: Any = CLIPTextModel(CLIPTextConfig(vocab_size=_preset_vocab_size(name), **cfg.text_encoder))
    elif part == "text_encoder_2":
        mod = CLIPTextModelWithProjection(CLIPTextConfig(vocab_size=_preset_vocab_size(name), **cfg.text_encoder_2))
    elif part == "vae":
        mod = AutoencoderKL(**cfg.vae)
    else:
        mod = UNet2DConditionModel(**getattr(cfg, part))
    return mod.eval().requires_grad_(False)


def _load_folder_part(sub: Path, part: str) -> Any:
    """One part from its diffusers (sub)folder (safetensors only); load failures are named errors."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    if part in ("scheduler", "refiner_scheduler"):
        return _read_config(lambda: json.loads((sub / "scheduler_config.json").read_text()), sub)
    loaders: dict[str, Any] = {
        "tokenizer": CLIPTokenizer, "tokenizer_2": CLIPTokenizer, "text_encoder": CLIPTextModel,
        "text_encoder_2": CLIPTextModelWithProjection, "unet": UNet2DConditionModel,
        "refiner_unet": UNet2DConditionModel, "vae": AutoencoderKL,
    }
    cls = loaders[part]
    log.info("loading %s from %s", part, sub)
    try:
        if part.startswith("tokenizer"):
            return cls.from_pretrained(str(sub))
        return cls.from_pretrained(str(sub), use_safetensors=True).eval().requires_grad_(False)
    except Exception as exc:  # noqa: BLE001 -- safetensors, config and shape errors alike: a named error
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise errors.ModelSourceError(
            f"cannot load {part} from {sub}: {first}",
            "re-save the model with diffusers' save_pretrained(..., safe_serialization=True)",
        ) from None


def _check_folder(path: Path, needed: tuple[str, ...], role: str) -> None:
    if not (path / "model_index.json").is_file():
        raise errors.ModelSourceError(
            f"{path} is not a diffusers model folder (no model_index.json)",
            f"pass a folder written by save_pretrained as the {role}, a preset name, or a hub id",
        )
    missing = [c for c in needed if not (path / c).is_dir()]
    if missing:
        raise errors.MissingComponentError(
            f"{role} folder {path} is missing {', '.join(missing)}",
            "re-save the model with diffusers' save_pretrained so every component is present",
        )
    for c in needed:
        _check_folder_weights(path / c, c, f"{role} folder {path}: {c}/")


def _check_folder_weights(sub: Path, c: str, where: str) -> None:
    """A component folder: its config, and weights as safetensors (pickle-only is refused)."""
    if c in WEIGHT_FOLDERS and not (sub / "config.json").is_file():
        raise errors.MissingComponentError(
            f"{where}config.json is missing",
            "re-save the model with diffusers' save_pretrained so every component is present",
        )
    weights = [p for p in sub.iterdir() if p.suffix in PICKLE_SUFFIXES + (".safetensors",)]
    if weights and not any(p.suffix == ".safetensors" for p in weights):
        raise errors.UnsafeCheckpointError(
            f"{sub} has only pickle weights ({', '.join(sorted(p.name for p in weights))})",
            "convert it to safetensors (save_pretrained(..., safe_serialization=True)); "
            "sdxl-export never unpickles checkpoints",
        )
    if c in WEIGHT_FOLDERS and not weights:
        raise errors.MissingComponentError(
            f"{where} has no weights (*.safetensors)",
            "re-save the model with diffusers' save_pretrained(..., safe_serialization=True)",
        )


def _resolve(src: str, role: str) -> tuple[str, Path | None]:
    """('preset', None) | ('folder', path) | ('file', path) | ('hub', local snapshot path)."""
    if src in _presets.PRESETS:
        return "preset", None
    p = Path(src).expanduser()
    if p.exists():
        return ("folder" if p.is_dir() else "file"), p
    if src.count("/") == 1 and not src.startswith((".", "/", "~")) and all(src.split("/")):
        return "hub", _download(src, role)
    raise errors.ModelSourceError(
        f"{role} {src!r} is neither a preset, an existing folder or file, nor a hub id",
        f"use one of {', '.join(_presets.preset_names())}, a diffusers folder, a .safetensors checkpoint, "
        "or ORG/NAME",
    )


def _download(repo_id: str, role: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        log.info("fetching %s from the hub (safetensors + configs only)", repo_id)
        return Path(snapshot_download(
            repo_id, allow_patterns=["*.json", "*.txt", "*.safetensors"],
            ignore_patterns=["*.fp16.safetensors", "*.ckpt", "*.bin"],
        ))
    except Exception as exc:  # noqa: BLE001 -- network, auth, missing repo: all say the same to the user
        raise errors.ModelSourceError(
            f"cannot fetch {role} {repo_id!r} from the hub ({type(exc).__name__})",
            "check the id and network, or download it and pass the local folder",
        ) from None


def _file_fingerprint(sf: Any, part: str) -> str:
    """A single file's part: the file's name/size/mtime, the configs and the converter's version."""
    from .clip_vocab import CLIP_VOCAB_SIZE, build_vocab, clip_vocab_sha

    if part in ("tokenizer", "tokenizer_2"):
        section: Any = {"clip_bpe": clip_vocab_sha()} if sf.vocab_size == CLIP_VOCAB_SIZE else build_vocab()
    elif part in ("scheduler", "refiner_scheduler"):
        section = _presets.get_preset(sf.preset).scheduler
    else:
        section = sf.part_config(part)
    return _sha({"file": sf.fingerprint(), "part": part, "config": section, "diffusers": _version("diffusers")})


def _source_parts(src: str, role: str, parts: tuple[str, ...]) -> tuple[str, str, dict[str, tuple[str, Any]],
                                                                           dict[str, str]]:
    """(kind, id, origins, fingerprints) of ``parts`` of one source given as ``role``."""
    kind, path = _resolve(src, {"base": "model"}.get(role, role))
    origins: dict[str, tuple[str, Any]] = {}
    fps: dict[str, str] = {}
    if kind == "preset":
        for part in parts:
            origins[part], fps[part] = ("preset", src), preset_part_fingerprint(src, part)
        return kind, src, origins, fps
    assert path is not None
    if kind == "file":
        from .single_file import inspect_file

        sf = inspect_file(path, role)
        for part in parts:
            origins[part], fps[part] = ("file", sf), _file_fingerprint(sf, part)
    elif role == "vae" and (path / "config.json").is_file():  # a stand-alone VAE folder
        _check_folder_weights(path, "vae", f"VAE folder {path}: ")
        origins["vae"], fps["vae"] = ("subfolder", path), folder_fingerprint(path)
    else:
        _check_folder(path, {"base": BASE_FOLDERS, "refiner": REFINER_FOLDERS}.get(role, ("vae",)),
                      {"base": "base model"}.get(role, role))
        for part in parts:
            origins[part], fps[part] = ("folder", path), folder_fingerprint(path / PART_FOLDERS[part])
    return kind, (src if kind == "hub" else str(path.resolve())), origins, fps


def resolve_source(model: str = "tiny", refiner: str | None = "same", with_refiner: bool = True,
                   vae: str | None = None, unet: str | None = None, native_size: int | None = None) -> ModelSource:
    """Check and fingerprint a base (+ refiner) (+ separate VAE) source without loading any weights.

    ``model``/``refiner``: a preset, a diffusers folder, a single-file ``.safetensors``
    checkpoint or a hub id. ``refiner="same"`` means: the preset's own refiner for a
    preset, no refiner for anything else unless one is named (SDXL's refiner is a
    separate checkpoint). ``vae``: a VAE replacing the base's (a diffusers VAE folder, a
    model folder with ``vae/``, a single file or a preset), recorded in the identity.
    ``unet``: a UNet file or folder replacing the base UNet (:mod:`.unet_file`), likewise.
    ``native_size``: the model's native size in pixels when its configs do not say it (SDXL-Turbo
    as a single file is read with SDXL's configs, 1024; it was trained at 512), likewise.
    """
    kind, ident, origins, fps = _source_parts(model, "base", BASE_PARTS)
    unet_id = None
    if unet is not None:
        from .unet_file import unet_origin

        base_cfg = ModelSource(kind=kind, id=ident, refiner=None, origins=origins, fingerprints=fps).part_config("unet")
        unet_id, origins["unet"], fps["unet"] = unet_origin(str(unet), base_cfg)
    refiner_id: str | None = None
    rsrc = None if not with_refiner or refiner is None else model if refiner == "same" else str(refiner)
    if refiner == "same" and kind != "preset":
        log.info("no refiner named for %s: the base only (pass --refiner SRC for one)", model)
        rsrc = None
    if rsrc is not None:
        _, refiner_id, r_origins, r_fps = _source_parts(rsrc, "refiner", REFINER_PARTS)
        origins |= r_origins
        fps |= r_fps
    vae_id = None
    if vae is not None:
        _, vae_id, v_origins, v_fps = _source_parts(str(vae), "vae", ("vae",))
        origins |= v_origins
        fps |= v_fps
    source = ModelSource(kind=kind, id=ident, refiner=refiner_id, origins=origins, fingerprints=fps, vae=vae_id,
                         unet=unet_id, native_size=_check_native(native_size))
    source.dims()  # configs must describe an SDXL base (+ refiner): fail now, not mid-export
    return source


def _check_native(native_size: Any) -> int | None:
    if native_size is None:
        return None
    if isinstance(native_size, bool) or not isinstance(native_size, int) or native_size < 64 or native_size % 64:
        raise errors.ModelSourceError(f"native size must be a multiple of 64 pixels, got {native_size!r}",
                                      "pass e.g. --native-size 512 (SDXL-Turbo) or leave it out (the configs' size)")
    return int(native_size)


def load_model(model: str = "tiny", refiner: str | None = "same", with_refiner: bool = True,
               vae: str | None = None, unet: str | None = None) -> SDXLModel:
    """Load base (+ refiner) from a preset, a diffusers folder, a single file or a hub id (+ a VAE, a UNet)."""
    return resolve_source(model, refiner, with_refiner, vae, unet).load()


def build_preset(name: str = "tiny", with_refiner: bool = True) -> SDXLModel:
    """Build an embedded preset from its seed; no file is read or downloaded."""
    if name not in _presets.PRESETS:
        raise errors.ModelSourceError(
            f"unknown preset {name!r}",
            f"use one of {', '.join(_presets.preset_names())}, a diffusers folder, or a hub id",
        )
    return resolve_source(name, "same", with_refiner).load()


__all__ = [
    "ModelSource", "SDXLModel", "build_preset", "dims_from_configs", "folder_fingerprint", "load_model",
    "preset_part_fingerprint", "resolve_source",
]
