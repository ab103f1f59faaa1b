"""Read an artifact folder for the runtime: manifest, specs, tokenizers, configs.

The runtime reads artifacts only, never the exporter: everything it needs (component
specs, native size, scheduler configs, VAE scaling) comes from ``manifest.json`` and
the asset folders it lists. Every way a folder can be unusable -- missing, not ours,
written by an incompatible version, an interrupted export, a missing component or
file -- is a named error whose hint is the command that fixes it.
"""

from __future__ import annotations

import functools
import json
import logging
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..artifacts import EXPORT_MANIFEST, FORMAT_EXPORT, read_manifest, sha256_file
from ..errors import ArtifactError, CorruptArtifactError, MissingComponentError
from ..specs import ComponentSpec

log = logging.getLogger(__name__)

#: Components every text-to-image call needs; ``refiner_unet`` is optional.
REQUIRED_COMPONENTS = ("text_encoder", "text_encoder_2", "unet", "vae_decoder")
REQUIRED_ASSETS = ("tokenizer", "tokenizer_2", "scheduler")

#: SDXL's VAE scaling factor, used only when an old export recorded none (logged).
SDXL_VAE_SCALING_FACTOR = 0.13025


@dataclass(frozen=True)
class VaeConfig:
    """What the latent -> pixel hand-off needs from the VAE config (as diffusers reads it)."""

    scaling_factor: float
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None
    source: str = "manifest"


def export_fix(root: Path) -> str:
    return f"run `sdxl-export export --out {shlex.quote(str(root))}`"


class Artifacts:
    """A checked export folder. Cheap to build: ONNX files are opened by the backends."""

    def __init__(self, root: Path, manifest: dict[str, Any]):
        self.root = root
        self.manifest = manifest
        self.components: dict[str, dict[str, Any]] = dict(manifest.get("components") or {})
        self.assets: dict[str, dict[str, Any]] = dict(manifest.get("assets") or {})
        try:
            self.specs = {n: ComponentSpec.from_dict(c["spec"]) for n, c in self.components.items()}
            self.native_size = int(manifest.get("native_size") or manifest["model"]["sample_size"] * 8)
        except (KeyError, TypeError, ValueError) as exc:
            raise CorruptArtifactError(
                f"{root / EXPORT_MANIFEST} is malformed ({type(exc).__name__}: {exc})", export_fix(root)
            ) from None

    @property
    def random_weight_preset(self) -> str | None:
        """The embedded preset this export was made from (``tiny``, ``small``, ``sdxl``), or None.

        The presets have seeded *random* weights: they exist to exercise every path offline, and
        their images are coloured noise. ``run`` and ``serve`` say so (:func:`random_weights_note`).
        """
        src = self.manifest.get("source") or {}
        return str(src.get("id")) if src.get("kind") == "preset" else None

    # ---- components -------------------------------------------------------------------------
    @property
    def has_refiner(self) -> bool:
        return "refiner_unet" in self.components

    def component(self, name: str) -> dict[str, Any]:
        entry = self.components.get(name)
        if entry is None:
            hint = export_fix(self.root)
            if name == "refiner_unet":
                hint = "run without the refiner (refiner=False, --no-refiner), or export with a refiner"
            raise MissingComponentError(f"{self.root} has no exported {name}", hint)
        return entry

    def check_files(self, name: str, hashes: bool = False) -> None:
        """Every file of ``name`` exists (and, with ``hashes``, matches its sha256).

        Hashing multi-GB graphs costs seconds, so by default only presence and (when
        recorded) total size are checked; ``hashes=True`` does the full check.
        """
        entry = self.component(name)
        files: dict[str, str] = entry.get("files") or {entry.get("file", ""): ""}
        total = 0
        for rel, digest in files.items():
            p = self.root / rel
            if not rel or not p.is_file():
                raise MissingComponentError(f"{name}: {p} is missing", export_fix(self.root))
            total += p.stat().st_size
            if hashes and digest and sha256_file(p) != digest:
                raise CorruptArtifactError(
                    f"{name}: {p} does not match its manifest hash (corrupt or modified)", export_fix(self.root)
                )
        size = entry.get("size_bytes")
        if size is not None and int(size) != total:
            raise CorruptArtifactError(
                f"{name}: files are {total} bytes, the manifest says {size} (truncated or modified)",
                export_fix(self.root),
            )

    def onnx_path(self, name: str) -> Path:
        return self.root / self.component(name)["file"]

    # ---- assets -------------------------------------------------------------------------------
    def asset_dir(self, name: str) -> Path:
        entry = self.assets.get(name)
        path = self.root / (entry.get("dir", name) if entry else name)
        if entry is None or not path.is_dir():
            raise MissingComponentError(f"{self.root} has no {name} folder", export_fix(self.root))
        return path

    def tokenizer(self, name: str) -> Any:
        from transformers import CLIPTokenizer

        path = self.asset_dir(name)
        try:
            return CLIPTokenizer.from_pretrained(str(path))
        except (OSError, ValueError) as exc:
            raise CorruptArtifactError(f"cannot load {path} ({type(exc).__name__})", export_fix(self.root)) from None

    def scheduler_config(self, refiner: bool = False) -> dict[str, Any]:
        name = "refiner_scheduler" if refiner and "refiner_scheduler" in self.assets else "scheduler"
        return self._json(self.asset_dir(name) / "scheduler_config.json")

    @functools.cached_property
    def vae(self) -> VaeConfig:
        """Scaling factor (and latents mean/std) from the manifest, else the VAE's config.json."""
        cfg: dict[str, Any] = {}
        source = ""
        spec_cfg = dict(self.specs["vae_decoder"].config) if "vae_decoder" in self.specs else {}
        if "scaling_factor" in spec_cfg:
            cfg, source = spec_cfg, "manifest"
        elif isinstance(self.manifest.get("vae"), dict):
            cfg, source = self.manifest["vae"], "manifest"
        elif "torch/vae" in self.assets and (self.root / "torch/vae/config.json").is_file():
            cfg, source = self._json(self.root / "torch/vae/config.json"), "torch/vae/config.json"
        if "scaling_factor" not in cfg:
            log.warning("%s records no VAE scaling factor: using SDXL's %s", self.root, SDXL_VAE_SCALING_FACTOR)
            return VaeConfig(SDXL_VAE_SCALING_FACTOR, source="default (SDXL)")
        mean, std = cfg.get("latents_mean"), cfg.get("latents_std")
        return VaeConfig(
            scaling_factor=float(cfg["scaling_factor"]),
            latents_mean=tuple(float(x) for x in mean) if mean is not None else None,
            latents_std=tuple(float(x) for x in std) if std is not None else None,
            source=source,
        )

    def _json(self, path: Path) -> dict[str, Any]:
        if not path.is_file():
            raise MissingComponentError(f"{path} is missing", export_fix(self.root))
        try:
            return json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CorruptArtifactError(f"{path} is not valid JSON ({type(exc).__name__})",
                                       export_fix(self.root)) from None

    # ---- engines --------------------------------------------------------------------------------
    @functools.cached_property
    def engine_store(self) -> Any | None:
        """``engines.store.EngineStore`` when the folder has built engines, else None."""
        try:
            from ..engines.store import load_engine_store
        except ModuleNotFoundError as exc:
            if exc.name and exc.name.startswith("sdxl_export.engines"):
                return None
            raise
        return load_engine_store(self.root)


def random_weights_note(arts: Artifacts) -> str | None:
    """One line for users of a random-weight preset export (None for a real checkpoint)."""
    name = arts.random_weight_preset
    if name is None:
        return None
    return (f"note: {arts.root} is the embedded '{name}' preset, whose weights are random (it exists to run every "
            f"path offline), so its images are coloured noise; for real images build a checkpoint: "
            f"sdxl-export build --model PATH (a diffusers folder or an SDXL .safetensors file) --fp16")


def read_artifacts(path: str | Path, *, with_refiner: bool = True) -> Artifacts:
    """Open and check an export folder; raise a named error if it cannot be run."""
    root = Path(path).expanduser()
    if not root.exists():
        raise ArtifactError(f"artifact folder {root} does not exist",
                            f"{export_fix(root)} first, or pass the folder export wrote (--artifacts DIR)")
    if not root.is_dir():
        raise ArtifactError(f"{root} is a file, not an artifact folder", "pass the folder export wrote (--artifacts DIR)")
    root = root.resolve()
    manifest = read_manifest(root / EXPORT_MANIFEST, FORMAT_EXPORT, export_fix(root))
    if not manifest.get("complete"):
        raise ArtifactError(f"{root} holds an interrupted export (manifest complete=false)",
                            f"{export_fix(root)} to finish it (finished components are kept)")
    arts = Artifacts(root, manifest)
    for name in REQUIRED_COMPONENTS:
        arts.check_files(name)
    if with_refiner and arts.has_refiner:
        arts.check_files("refiner_unet")
    for name in REQUIRED_ASSETS:
        arts.asset_dir(name)
    return arts
