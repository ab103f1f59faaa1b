"""Component specs for planning, without loading (or exporting) any weights.

``sdxl-export plan`` must be instant even for the full-size ``sdxl`` preset, whose
PyTorch weights would take ~14 GB to instantiate. Shapes only depend on a handful of
config numbers (:class:`~sdxl_export.specs.ModelDims`), so we read them from, in order:
the export manifest in ``--out`` when it was exported from the same source, the
embedded preset's configs, or a diffusers folder's ``config.json`` files. ``build``
never uses this: it plans from the export manifest it has just brought up to date.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..artifacts import EXPORT_MANIFEST, FORMAT_EXPORT, read_manifest
from ..errors import ArtifactError, ModelSourceError
from ..models import presets as _presets
from ..specs import ComponentSpec, ModelDims, component_specs, specs_from_dicts

log = logging.getLogger(__name__)


def dims_from_configs(
    te1: Mapping[str, Any], te2: Mapping[str, Any], unet: Mapping[str, Any], vae: Mapping[str, Any],
    refiner: Mapping[str, Any] | None, vocab_size: int | None = None,
) -> ModelDims:
    """The same arithmetic as ``SDXLModel.dims()``, on plain config dicts."""
    pooled = int(te2["projection_dim"])

    def n_time_ids(u: Mapping[str, Any]) -> int:
        return (int(u["projection_class_embeddings_input_dim"]) - pooled) // int(u["addition_time_embed_dim"])

    return ModelDims(
        vocab_size=int(vocab_size if vocab_size is not None else te1.get("vocab_size", 49408)),
        text_hidden=int(te1["hidden_size"]),
        text2_hidden=int(te2["hidden_size"]),
        pooled_dim=pooled,
        unet_context=int(unet["cross_attention_dim"]),
        unet_time_ids=n_time_ids(unet),
        refiner_context=int(refiner["cross_attention_dim"]) if refiner is not None else None,
        refiner_time_ids=n_time_ids(refiner) if refiner is not None else None,
        latent_channels=int(vae.get("latent_channels", 4)),
        vae_scale=2 ** (len(vae["block_out_channels"]) - 1),
        sample_size=int(unet["sample_size"]),
        unet_in_channels=(None if int(unet.get("in_channels", 4)) == int(vae.get("latent_channels", 4))
                          else int(unet["in_channels"])),
    )


def _read(path: Path) -> dict[str, Any]:
    try:
        return dict(json.loads(path.read_text()))
    except (OSError, ValueError):
        raise ModelSourceError(f"cannot read {path}", "pass a diffusers folder written by save_pretrained") from None


def _preset_unet(name: str) -> dict[str, Any]:
    return _presets.get_preset(name).refiner_unet


def _refiner_config(model: str, refiner: str | None, with_refiner: bool) -> dict[str, Any] | None:
    if not with_refiner or refiner is None:
        return None
    if refiner == "same" or refiner == model:
        return _preset_unet(model) if model in _presets.PRESETS else None
    if refiner in _presets.PRESETS:
        return _preset_unet(refiner)
    p = Path(refiner).expanduser()
    if p.is_dir():
        return _read(p / "unet" / "config.json")
    raise ModelSourceError(f"cannot plan for refiner {refiner!r} without exporting it",
                           "run `sdxl-export export` first, or pass a preset or a local folder")


def dims_for_source(model: str, refiner: str | None = "same", with_refiner: bool = True) -> ModelDims:
    """ModelDims of a preset or a diffusers folder from its configs alone."""
    if any(s not in (None, "same") and Path(s).expanduser().is_file() for s in (model, refiner)):
        from ..models.loader import resolve_source  # single files: their headers (no weights) and configs

        return resolve_source(model, refiner, with_refiner).dims()
    ref = _refiner_config(model, refiner, with_refiner)
    if model in _presets.PRESETS:
        cfg = _presets.get_preset(model)
        # The presets' vocab size comes from their tokenizer (seconds to build); no shape
        # depends on it, so the plan records 0 = unknown.
        return dims_from_configs(cfg.text_encoder, cfg.text_encoder_2, cfg.unet, cfg.vae, ref, vocab_size=0)
    p = Path(model).expanduser()
    if p.is_dir():
        return dims_from_configs(
            _read(p / "text_encoder" / "config.json"), _read(p / "text_encoder_2" / "config.json"),
            _read(p / "unet" / "config.json"), _read(p / "vae" / "config.json"), ref,
        )
    raise ModelSourceError(
        f"cannot plan for {model!r} without exporting it (not a preset or a local folder)",
        f"run `sdxl-export export --model {model}` first, then `sdxl-export plan --model {model} --out DIR`",
    )


def _source_matches(source: Mapping[str, Any], model: str, refiner: str | None, with_refiner: bool) -> bool:
    kind, ident = source.get("kind"), source.get("id")
    if kind in ("folder", "file"):
        same = Path(model).expanduser().resolve() == Path(str(ident)).resolve()
    else:
        same = ident == model
    has_ref = source.get("refiner") is not None
    if not with_refiner or refiner is None:
        return same and not has_ref
    if refiner == "same":
        return same and has_ref == (kind == "preset")
    return same and has_ref


def specs_for_plan(
    model: str, refiner: str | None, with_refiner: bool, out: Path | None
) -> tuple[dict[str, ComponentSpec], int, str]:
    """(specs, native size, where they came from) for ``model``."""
    if out is not None and (out / EXPORT_MANIFEST).is_file():
        try:
            m = read_manifest(out / EXPORT_MANIFEST, FORMAT_EXPORT, "sdxl-export export")
        except ArtifactError as exc:
            log.debug("ignoring export manifest in %s: %s", out, exc.message)
        else:
            if m.get("complete") and _source_matches(m.get("source", {}), model, refiner, with_refiner):
                specs = specs_from_dicts(c["spec"] for c in m["components"].values())
                return specs, int(m["native_size"]), f"export manifest {out / EXPORT_MANIFEST}"
    dims = dims_for_source(model, refiner, with_refiner)
    return component_specs(dims, with_refiner=dims.refiner_context is not None), dims.native_size, "model configs"
