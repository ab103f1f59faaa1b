"""Load an SDXL model (base + optional refiner) from a preset, a diffusers folder or a hub id.

Whatever the source, the result is one :class:`SDXLModel`: the PyTorch components the
exporter traces, plus the tokenizers and scheduler config the runtime needs. Loading
never unpickles: weights come from safetensors only, and a folder that only has pickle
checkpoints (.bin/.pt/.ckpt) is refused with :class:`UnsafeCheckpointError`.

The refiner shares text_encoder_2 and the VAE with the base, exactly as diffusers'
documented base+refiner example does (``text_encoder_2=base.text_encoder_2,
vae=base.vae``); only its UNet and scheduler config are read from the refiner folder.
"""

from __future__ import annotations

import hashlib
import json
import logging

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import errors
from ..specs import MAX_TOKENS, ModelDims
from . import presets as _presets
from .clip_vocab import build_vocab, make_tokenizers

log = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
BASE_FOLDERS = ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "unet", "vae", "scheduler")
REFINER_FOLDERS = ("unet", "scheduler")


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
    #: {"kind": "preset"|"folder"|"hub", "id": ..., "refiner": ..., "fingerprint": sha256}
    source: dict[str, Any] = field(default_factory=dict)

    @property
    def has_refiner(self) -> bool:
        return self.refiner_unet is not None

    def dims(self) -> ModelDims:
        te1, te2, unet, vae = (
            self.text_encoder.config, self.text_encoder_2.config, self.unet.config, self.vae.config,
        )
        ref = self.refiner_unet.config if self.refiner_unet is not None else None
        time_dim = unet.addition_time_embed_dim
        return ModelDims(
            vocab_size=int(te1.vocab_size),
            text_hidden=int(te1.hidden_size),
            text2_hidden=int(te2.hidden_size),
            pooled_dim=int(te2.projection_dim),
            unet_context=int(unet.cross_attention_dim),
            unet_time_ids=(int(unet.projection_class_embeddings_input_dim) - int(te2.projection_dim)) // time_dim,
            refiner_context=int(ref.cross_attention_dim) if ref is not None else None,
            refiner_time_ids=(
                (int(ref.projection_class_embeddings_input_dim) - int(te2.projection_dim))
                // ref.addition_time_embed_dim
                if ref is not None
                else None
            ),
            latent_channels=int(vae.latent_channels),
            vae_scale=2 ** (len(vae.block_out_channels) - 1),
            sample_size=int(unet.sample_size),
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


# ---- presets ----------------------------------------------------------------------------
def build_preset(name: str = "tiny", with_refiner: bool = True) -> SDXLModel:
    """Build an embedded preset from its seed; no file is read or downloaded."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    if name not in _presets.PRESETS:
        raise errors.ModelSourceError(
            f"unknown preset {name!r}",
            f"use one of {', '.join(_presets.preset_names())}, a diffusers folder, or a hub id",
        )
    cfg = _presets.get_preset(name)
    vocab, _ = build_vocab()
    vocab_size = 49408 if name == "sdxl" else len(vocab)
    tok1, tok2 = make_tokenizers(MAX_TOKENS)

    def seeded(offset: int) -> None:
        torch.manual_seed(cfg.seed * 1000 + offset)

    log.info("building preset %r (seeded weights, no download)", name)
    seeded(1)
    te1 = CLIPTextModel(CLIPTextConfig(vocab_size=vocab_size, **cfg.text_encoder))
    seeded(2)
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(vocab_size=vocab_size, **cfg.text_encoder_2))
    seeded(3)
    unet = UNet2DConditionModel(**cfg.unet)
    seeded(4)
    vae = AutoencoderKL(**cfg.vae)
    refiner = None
    if with_refiner:
        seeded(5)
        refiner = UNet2DConditionModel(**cfg.refiner_unet)
    for m in (te1, te2, unet, vae, refiner):
        if m is not None:
            m.eval().requires_grad_(False)
    fingerprint = _sha({"preset": name, "revision": _presets.PRESET_REVISION, "refiner": with_refiner,
                        "torch": torch.__version__.split("+")[0]})
    return SDXLModel(
        tokenizer=tok1, tokenizer_2=tok2, text_encoder=te1, text_encoder_2=te2, unet=unet, vae=vae,
        scheduler_config=dict(cfg.scheduler), refiner_unet=refiner,
        refiner_scheduler_config=dict(cfg.scheduler) if with_refiner else None,
        source={"kind": "preset", "id": name, "refiner": name if with_refiner else None,
                "fingerprint": fingerprint},
    )


# ---- folders and hub ids ----------------------------------------------------------------
def _sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def folder_fingerprint(path: Path) -> str:
    """Identity of a diffusers folder: its configs' content and its weights' name/size/mtime.

    Hashing multi-GB weights on every run would cost minutes; size + mtime_ns changes
    whenever a file is rewritten, which is what incremental export needs to notice.
    """
    items = []
    for p in sorted(path.rglob("*")):
        if p.is_file():
            rel = p.relative_to(path).as_posix()
            if p.suffix in (".json", ".txt"):
                items.append((rel, hashlib.sha256(p.read_bytes()).hexdigest()))
            else:
                st = p.stat()
                items.append((rel, st.st_size, st.st_mtime_ns))
    return _sha(items)


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
        sub = path / c
        weights = [p for p in sub.iterdir() if p.suffix in PICKLE_SUFFIXES + (".safetensors",)]
        if weights and not any(p.suffix == ".safetensors" for p in weights):
            raise errors.UnsafeCheckpointError(
                f"{sub} has only pickle weights ({', '.join(p.name for p in weights)})",
                "convert it to safetensors (save_pretrained(..., safe_serialization=True)); "
                "sdxl-export never unpickles checkpoints",
            )


def _load_base_folder(path: Path) -> SDXLModel:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    _check_folder(path, BASE_FOLDERS, "base model")
    log.info("loading base model from %s (safetensors)", path)
    kw: dict[str, Any] = {"use_safetensors": True}
    return SDXLModel(
        tokenizer=CLIPTokenizer.from_pretrained(path / "tokenizer"),
        tokenizer_2=CLIPTokenizer.from_pretrained(path / "tokenizer_2"),
        text_encoder=CLIPTextModel.from_pretrained(path / "text_encoder", **kw).eval(),
        text_encoder_2=CLIPTextModelWithProjection.from_pretrained(path / "text_encoder_2", **kw).eval(),
        unet=UNet2DConditionModel.from_pretrained(path / "unet", **kw).eval(),
        vae=AutoencoderKL.from_pretrained(path / "vae", **kw).eval(),
        scheduler_config=_scheduler_config(path),
        source={"kind": "folder", "id": str(path.resolve()), "fingerprint": folder_fingerprint(path)},
    )


def _scheduler_config(path: Path) -> dict[str, Any]:
    cfg_path = path / "scheduler" / "scheduler_config.json"
    if not cfg_path.is_file():
        raise errors.MissingComponentError(f"{cfg_path} is missing", "re-save the model with save_pretrained")
    return json.loads(cfg_path.read_text())


def _resolve(src: str, role: str) -> tuple[str, Path | None]:
    """('preset', None) | ('folder', path) | ('hub', local snapshot path)."""
    if src in _presets.PRESETS:
        return "preset", None
    p = Path(src).expanduser()
    if p.exists():
        if not p.is_dir():
            raise errors.ModelSourceError(f"{p} is a file, not a diffusers folder",
                                          "pass the folder that save_pretrained wrote")
        return "folder", p
    if src.count("/") == 1 and not src.startswith((".", "/", "~")):
        return "hub", _download(src, role)
    raise errors.ModelSourceError(
        f"{role} {src!r} is neither a preset, an existing folder, nor a hub id",
        f"use one of {', '.join(_presets.preset_names())}, a diffusers folder path, or ORG/NAME",
    )


def _download(repo_id: str, role: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        log.info("fetching %s from the hub (safetensors + configs only)", repo_id)
        return Path(snapshot_download(
            repo_id, allow_patterns=["*.json", "*.txt", "*.safetensors"],
            ignore_patterns=["*.fp16.safetensors", "*.ckpt", "*.bin"],
        ))
    except Exception as exc:  # network, auth, missing repo: all say the same to the user
        raise errors.ModelSourceError(
            f"cannot fetch {role} {repo_id!r} from the hub ({type(exc).__name__})",
            "check the id and network, or download it and pass the local folder",
        ) from None


def load_model(model: str = "tiny", refiner: str | None = "same", with_refiner: bool = True) -> SDXLModel:
    """Load base (+ refiner) from a preset name, a diffusers folder, or a hub id.

    ``refiner="same"`` means: the preset's own refiner for a preset, no refiner for a
    folder or hub id unless one is named (SDXL's refiner is a separate checkpoint).
    """
    kind, path = _resolve(model, "model")
    if kind == "preset":
        want = with_refiner and refiner in ("same", None, model)
        m = build_preset(model, with_refiner=want)
        if with_refiner and refiner not in ("same", None, model):
            _attach_refiner(m, refiner)
        return m
    assert path is not None
    m = _load_base_folder(path)
    m.source["kind"] = kind
    if kind == "hub":
        m.source["id"] = model
    if with_refiner and refiner not in (None, "same"):
        _attach_refiner(m, refiner)
    return m


def _attach_refiner(m: SDXLModel, refiner: str) -> None:
    from diffusers import UNet2DConditionModel

    kind, path = _resolve(refiner, "refiner")
    if kind == "preset":
        r = build_preset(refiner, with_refiner=True)
        m.refiner_unet, m.refiner_scheduler_config = r.refiner_unet, r.refiner_scheduler_config
        fp = r.source["fingerprint"]
    else:
        assert path is not None
        _check_folder(path, REFINER_FOLDERS, "refiner")
        log.info("loading refiner UNet from %s (safetensors)", path)
        m.refiner_unet = UNet2DConditionModel.from_pretrained(path / "unet", use_safetensors=True).eval()
        m.refiner_scheduler_config = _scheduler_config(path)
        fp = folder_fingerprint(path)
    m.refiner_unet.requires_grad_(False)
    m.source["refiner"] = refiner if kind != "folder" else str(Path(refiner).resolve())
    m.source["fingerprint"] = _sha([m.source["fingerprint"], fp])


