"""Export an SDXL model to a self-contained artifact folder (ONNX + manifest).

The folder holds everything the runtime needs -- one validated ONNX graph per
component, the tokenizers, the scheduler configs, the VAE's scaling, the PyTorch weights
for the reference backend (safetensors) -- and a manifest naming each file with its sha256.

Incremental: each component's and asset's record carries a key (the fingerprint of the
model part it comes from, opset, exporter revision, library versions, spec). The source
is fingerprinted without loading weights (:func:`~sdxl_export.models.loader.resolve_source`),
so a rerun with the same inputs finds every key and hash matching and returns before
any model is built; a rerun after a change re-exports only the parts that changed.

Atomic: every component and asset is written into a temporary folder and renamed into
place; the manifest says ``"complete": false`` from before the first change until the
last file is in, so a process killed mid-export leaves nothing that a reader trusts,
and the rerun resumes from the finished components. One export at a time may write a
folder (an advisory lock on it); bad input is refused before anything is written, and a
failed first export removes the folder it created.
"""

from __future__ import annotations

import contextlib
import json
import logging
import platform
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from .. import __version__
from ..artifacts import (
    DEFAULT_ARTIFACTS,
    ENGINE_DIR,
    EXPORT_MANIFEST,
    FORMAT_EXPORT,
    TMP_PREFIX,
    atomic_dir,
    atomic_write_json,
    folder_lock,
    manifest_header,
    read_manifest,
    sha256_file,
    sha256_json,
)
from ..errors import (
    ArtifactError,
    CorruptArtifactError,
    IncompatibleManifestError,
    OpsetError,
    OutputDirError,
)
from ..lora.files import LORA_PARTS
from ..models.loader import ModelSource, SDXLModel, resolve_source
from ..specs import ComponentSpec, component_specs
from .memory import PeakRSS, release_memory
from .onnx_tools import DEFAULT_OPSET, MAX_OPSET, MIN_OPSET
from .report import human_size

log = logging.getLogger(__name__)

#: Bump when the export procedure changes what it writes: every component re-exports.
#: 3: the parameter -> initializer map of the LoRA-switchable components.
EXPORTER_REVISION = 3
EXPORTER = "torch.onnx (TorchScript, dynamo=False)"

#: component -> the model part whose weights it traces.
COMPONENT_PARTS = {
    "text_encoder": "text_encoder", "text_encoder_2": "text_encoder_2", "unet": "unet",
    "refiner_unet": "refiner_unet", "vae_decoder": "vae", "vae_encoder": "vae",
}
#: PyTorch modules saved for the reference backend (asset ``torch/<part>``).
TORCH_MODULES = ("text_encoder", "text_encoder_2", "unet", "refiner_unet", "vae")
#: Libraries whose version changes what an export writes (part of every key).
KEY_LIBRARIES = ("torch", "onnx", "onnxruntime", "onnx-graphsurgeon", "diffusers", "transformers")
#: VAE config values the runtime needs for the latent <-> pixel hand-off.
VAE_RUNTIME_KEYS = ("scaling_factor", "shift_factor", "latents_mean", "latents_std", "force_upcast")

Progress = Callable[[str, int, int], None]


def library_versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "sdxl_export": __version__}
    for dist in ("torch", "onnx", "onnxruntime", "onnxruntime-gpu", "diffusers", "transformers",
                 "onnx-graphsurgeon", "polygraphy"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


def _fix_cmd(out: Path) -> str:
    return f"run `sdxl-export export --out {out}`"


def check_opset(opset: int) -> int:
    if not isinstance(opset, int) or not MIN_OPSET <= opset <= MAX_OPSET:
        raise OpsetError(
            f"opset {opset} is outside the supported {MIN_OPSET}..{MAX_OPSET}",
            f"pass --opset between {MIN_OPSET} and {MAX_OPSET} (default {DEFAULT_OPSET})",
        )
    return opset


# ---- the output folder ----------------------------------------------------------------------
def prepare_out_dir(out: Path) -> dict[str, Any] | None:
    """Check, without writing, that ``out`` can hold our artifacts; return its manifest if any.

    Refuses a file and a non-empty folder that is not ours (we never write into, or
    delete from, somebody else's folder). An unreadable manifest of ours (corrupt JSON,
    older format) is returned as ``{}`` and an interrupted one as is: the export keeps
    only records whose key and file hashes still match, and redoes the rest.
    """
    if out.exists() and not out.is_dir():
        raise OutputDirError(f"output {out} is a file", "pass a folder path to --out")
    if not out.is_dir():
        return None
    entries = [p for p in out.iterdir() if not p.name.startswith(TMP_PREFIX)]
    if not entries:
        return None
    if not (out / EXPORT_MANIFEST).is_file():
        raise OutputDirError(
            f"output folder {out} is not empty and holds no sdxl-export manifest",
            "pass a new or empty folder to --out (nothing in it was touched)",
        )
    try:
        previous = read_manifest(out / EXPORT_MANIFEST, FORMAT_EXPORT, _fix_cmd(out))
    except (CorruptArtifactError, IncompatibleManifestError) as exc:
        log.warning("previous manifest unusable (%s): exporting everything again", exc.message)
        return {}
    except ArtifactError as exc:
        raise OutputDirError(
            f"output folder {out} holds a manifest.json that this sdxl-export cannot use ({exc.message})",
            "pass a new or empty folder to --out (nothing in it was touched)",
        ) from None
    if not isinstance(previous.get("components"), dict) or not isinstance(previous.get("assets"), dict):
        log.warning("previous manifest of %s is malformed: exporting everything again", out)
        return {}
    return previous


@contextlib.contextmanager
def _writable_locked(out: Path) -> Iterator[bool]:
    """Create ``out`` if needed, check it is writable, hold an exclusive lock on it.

    Yields whether this call created the folder (the caller removes it again when the
    export fails before writing anything trustworthy).
    """
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f"{TMP_PREFIX}write-probe"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise OutputDirError(f"cannot write to {out} ({exc.strerror or exc})",
                             "pass a writable folder to --out") from None
    with folder_lock(out, "export", "wait for it to finish, or pass another --out"):
        yield created


def _clean_own_tmp(out: Path) -> int:
    """Remove ``.tmp-*`` leftovers of interrupted exports (not of other stages, e.g. engines/)."""
    n = 0
    for folder in (out, out / "onnx", out / "torch"):
        if not folder.is_dir():
            continue
        for p in folder.glob(TMP_PREFIX + "*"):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            n += 1
    return n


def _files_ok(root: Path, files: Any) -> bool:
    return isinstance(files, dict) and bool(files) and all(
        (root / rel).is_file() and sha256_file(root / rel) == h for rel, h in files.items()
    )


def _hash_tree(root: Path, sub: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): sha256_file(p) for p in sorted((root / sub).rglob("*")) if p.is_file()}


# ---- the plan: what this export writes, and each item's key -----------------------------------
class ExportPlan:
    """Components and assets an export of ``source`` writes, each with its incremental key."""

    def __init__(self, source: ModelSource, opset: int, validate: bool, torch_weights: bool,
                 loras: Sequence[tuple[str | Path, float]] = (), controlnets: Sequence[str | Path] = ()):
        self.source = source
        self.opset = opset
        self.validate = validate
        self.dims = source.dims()
        self.specs: dict[str, ComponentSpec] = component_specs(self.dims, with_refiner=source.has_refiner)
        self.versions = library_versions()
        fps = source.fingerprints
        base = {"revision": EXPORTER_REVISION, "versions": {k: self.versions.get(k) for k in KEY_LIBRARIES}}
        #: LoRAs fused before export: their deltas, and per part the (sha256, scale) of those touching it.
        self.loras, self.lora_records = _plan_loras(source, loras)
        touching = {p: [[r["sha256"], r["scale"]] for r in self.lora_records if p in r["parts"]]
                    for p in set(fps)}
        lora_key = {p: {"loras": t} if t else {} for p, t in touching.items()}
        self.component_keys = {
            name: sha256_json({**base, "component": name, "part": fps[COMPONENT_PARTS[name]], "opset": opset,
                               "spec": spec.to_dict(), **lora_key[COMPONENT_PARTS[name]]})
            for name, spec in self.specs.items()
        }
        #: asset folder -> the part it is written from
        self.asset_parts = {"tokenizer": "tokenizer", "tokenizer_2": "tokenizer_2", "scheduler": "scheduler"}
        if source.has_refiner:
            self.asset_parts["refiner_scheduler"] = "refiner_scheduler"
        if torch_weights:
            self.asset_parts.update(
                {f"torch/{m}": m for m in TORCH_MODULES if m != "refiner_unet" or source.has_refiner})
        self.asset_keys = {a: sha256_json({**base, "asset": a, "part": fps[p], **lora_key[p]})
                           for a, p in self.asset_parts.items()}
        #: component -> the model part it traces (ControlNets: ``controlnet:<name>``)
        self.parts = dict(COMPONENT_PARTS)
        #: ControlNet name -> its checked source (export/controlnet.py)
        self.controlnets: dict[str, Any] = {}
        from . import controlnet as _cn

        _cn.add_to_plan(self, controlnets, lambda name, fp, spec, part: sha256_json(
            {**base, "component": name, "part": fp, "opset": opset, "spec": spec.to_dict(),
             **(lora_key[part] if part else {})}),
                       lambda asset, fp: sha256_json({**base, "asset": asset, "part": fp}))

    def load_part(self, part: str) -> Any:
        """The source's part, with the plan's LoRAs fused in (a copy when the caller owns it)."""
        if part.startswith("controlnet:"):
            from . import controlnet as _cn

            return _cn.load_part(self, part)
        part = part.split("#", 1)[0]  # "unet#controlnet": the UNet again, its own copy (export/controlnet.py)
        obj = self.source.load_part(part)
        deltas = [(d[part], scale) for d, scale in self.loras if part in d]
        if deltas:
            from ..lora.files import fuse_into

            if self.source.origins[part][0] == "loaded":  # the caller's module: not ours to change
                import copy

                obj = copy.deepcopy(obj)
            n = fuse_into(obj, deltas)
            log.info("%s: %d LoRA(s) fused into %d weights", part, len(deltas), n)
        return obj

    def kept(self, out: Path, previous: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """Records of ``previous`` that are still valid: same key, files intact."""
        # A switchable component exported before it recorded its parameter map is redone (the map is
        # what run-time LoRA switching writes through).
        comps = {n: r for n, r in (previous.get("components") or {}).items()
                 if isinstance(r, dict) and self.component_keys.get(n) == r.get("key") and _files_ok(out, r.get("files"))
                 and (not _switchable(self.parts.get(n, "")) or "parameters" in r)}
        assets = {a: r for a, r in (previous.get("assets") or {}).items()
                  if isinstance(r, dict) and self.asset_keys.get(a) == r.get("key") and _files_ok(out, r.get("files"))}
        return comps, assets


# ---- export -------------------------------------------------------------------------------------
def export_model(
    model: SDXLModel | str = "tiny",
    out_dir: str | Path = DEFAULT_ARTIFACTS,
    *,
    refiner: str | None = "same",
    with_refiner: bool = True,
    opset: int = DEFAULT_OPSET,
    validate: bool = True,
    torch_weights: bool = True,
    progress: Progress | None = None,
    vae: str | None = None,
    loras: Sequence[tuple[str | Path, float]] = (),
    unet: str | None = None,
    defaults: Any = None,
    native_size: int | None = None,
    controlnets: Sequence[str | Path] = (),
) -> dict[str, Any]:
    """Export every component of ``model`` into ``out_dir``; return the manifest.

    ``model`` is an :class:`SDXLModel` or a source string (preset name, diffusers
    folder, single-file checkpoint, hub id) resolved with ``refiner``/``with_refiner``/``vae`` by
    :func:`~sdxl_export.models.loader.resolve_source`. The returned dict is the manifest
    plus ``up_to_date`` (nothing was done), ``exported`` and ``kept`` (component names).
    ``loras``: ``(file, scale)`` pairs fused into the weights before export (diffusers'
    ``set_adapters`` + ``fuse_lora``); each file's sha256 and scale are in the keys of the
    components it touches, so changing one re-exports only those.
    """
    check_opset(opset)
    source = ModelSource.from_model(model) if isinstance(model, SDXLModel) else resolve_source(
        model, refiner=refiner, with_refiner=with_refiner, vae=vae, unet=unet, native_size=native_size)
    out = Path(out_dir)
    previous = prepare_out_dir(out)  # refuse a foreign folder before creating or locking anything
    plan = ExportPlan(source, opset, validate, torch_weights, loras, controlnets)
    plan.defaults = defaults.to_dict() if defaults is not None else {}  # recorded sampling defaults
    with _writable_locked(out) as created:
        try:
            return _export(plan, out, previous, progress)
        except BaseException:
            if created and not (out / EXPORT_MANIFEST).exists():
                shutil.rmtree(out, ignore_errors=True)  # nothing of this run is trustworthy
            raise
        finally:
            if out.is_dir():
                _clean_own_tmp(out)


def _export(plan: ExportPlan, out: Path, previous: dict[str, Any] | None, progress: Progress | None) -> dict[str, Any]:
    from ..models.wrappers import wrap_module
    from . import onnx_tools

    n_stale = _clean_own_tmp(out)
    if n_stale:
        log.info("removed %d leftover temporary file(s) of an interrupted export", n_stale)
    source = plan.source
    kept, kept_assets = plan.kept(out, previous or {})
    todo = [n for n in plan.specs if n not in kept]
    # A graph exported earlier without validation is validated now, not exported again.
    unvalidated = [n for n in kept if plan.validate and (kept[n].get("validation") or {}).get("passed") is not True]
    assets_todo = [a for a in plan.asset_parts if a not in kept_assets]
    stale = sorted(set((previous or {}).get("components") or {}) - set(plan.specs))
    stale_assets = sorted(set((previous or {}).get("assets") or {}) - set(plan.asset_parts))

    manifest: dict[str, Any] = {
        **manifest_header(FORMAT_EXPORT),
        "complete": False,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "source": source.identity,
        "model": plan.dims.to_dict(),
        "native_size": plan.dims.native_size,
        "opset": plan.opset,
        "exporter": EXPORTER,
        "exporter_revision": EXPORTER_REVISION,
        "versions": plan.versions,
        "vae": {k: v for k, v in source.part_config("vae").items() if k in VAE_RUNTIME_KEYS and v is not None},
        "components": {n: kept[n] for n in plan.specs if n in kept},
        "assets": {a: kept_assets[a] for a in plan.asset_parts if a in kept_assets},
        "loras": plan.lora_records,
        **({"controlnets": _controlnet_records(plan)} if plan.controlnets else {}),
        "defaults": plan.defaults,
    }
    if previous and previous.get("complete") and not (todo or unvalidated or assets_todo or stale or stale_assets):
        keys = ("source", "vae", "opset", "loras", "controlnets", "defaults")
        same = {k: previous.get(k) or None for k in keys} == {k: manifest.get(k) or None for k in keys}
        if same:
            log.info("%s is up to date (%d components, source %s %s): no export work done",
                     out, len(plan.specs), source.kind, source.id)
            return {**previous, "up_to_date": True, "exported": [], "validated": [], "kept": list(plan.specs)}
    for name in kept:
        log.info("%s: up to date, kept%s", name, " (validating it)" if name in unvalidated else "")

    # From here on the folder changes: a reader must not trust it until the end. A fresh
    # folder has no manifest to revoke; it gets one after its first component.
    if previous is not None:
        atomic_write_json(out / EXPORT_MANIFEST, manifest)
    for name in stale:
        log.info("%s: not part of this export any more, removed", name)
        shutil.rmtree(out / "onnx" / name, ignore_errors=True)
    for asset in stale_assets:
        shutil.rmtree(out / asset, ignore_errors=True)

    # One model part in memory at a time: each is loaded for its first use and dropped
    # after its last (its components, then its torch/<part> weights asset).
    loaded: dict[str, Any] = {}
    uses = [plan.parts[n] for n in todo + unvalidated] + [plan.asset_parts[a] for a in assets_todo]

    def use(part: str) -> Any:
        if part not in loaded:
            loaded[part] = plan.load_part(part)
        return loaded[part]

    def done_with(part: str) -> None:
        uses.remove(part)
        if part not in uses:
            loaded.pop(part, None)

    def release(part: str) -> None:
        """This component is done with its PyTorch module (traced, reference outputs kept):
        write the part's torch/ weights if this was their last use, then drop the module, so
        ONNX Runtime never holds the graph's weights while PyTorch still holds them too."""
        done_with(part)
        torch_asset = next((a for a, p in plan.asset_parts.items() if p == part and a.startswith("torch/")),
                           f"torch/{part}")
        if torch_asset in assets_todo and uses.count(part) == 1 and part in loaded:
            _write_asset(plan, out, manifest, torch_asset, loaded[part])  # while it is in memory
            assets_todo.remove(torch_asset)
            done_with(part)
        release_memory()

    val_shape = validation_shape(plan.dims.native_size)
    for name in unvalidated:
        part = plan.parts[name]
        log.info("%s: validating the kept graph against PyTorch at %s", name, _shape_str(
            {"batch": val_shape[0], "height": val_shape[1], "width": val_shape[2]}))
        t0 = time.perf_counter()
        with PeakRSS() as peak:
            feeds, reference = onnx_tools.reference_outputs(wrap_module(name, use(part)), plan.specs[name], val_shape)
            release(part)
            record = onnx_tools.compare_with_onnxruntime(plan.specs[name], out / kept[name]["file"], val_shape,
                                                         feeds, reference)
        record["seconds"] = round(time.perf_counter() - t0, 2)
        manifest["components"][name] = {**kept[name], "validation": record, "peak_rss_bytes": peak.bytes}
        atomic_write_json(out / EXPORT_MANIFEST, manifest)
    for i, name in enumerate(todo, 1):
        part = plan.parts[name]
        log.info("[%d/%d] %s: exporting to ONNX (opset %d) ...", i, len(todo), name, plan.opset)
        if progress:
            progress(name, i, len(todo))
        with PeakRSS() as peak:
            record = _export_component(plan, out, name, lambda p=part: use(p), val_shape,
                                       lambda p=part: release(p))
        record["peak_rss_bytes"] = peak.bytes
        manifest["components"][name] = record
        atomic_write_json(out / EXPORT_MANIFEST, manifest)
        val = record["validation"]
        errs = val.get("max_abs_error") or {}
        log.info("[%d/%d] %s: done in %.1fs (%s, peak RSS %s)%s", i, len(todo), name,
                 record["export_seconds"] + val.get("seconds", 0.0), human_size(record["size_bytes"]),
                 human_size(peak.bytes),
                 f", validated at {_shape_str(val['shape'])}: max abs error {max(errs.values()):.2e}" if errs else "")
    for asset in list(assets_todo):
        _write_asset(plan, out, manifest, asset, use(plan.asset_parts[asset]))
        done_with(plan.asset_parts[asset])
    loaded.clear()

    manifest["components"] = {n: manifest["components"][n] for n in plan.specs}
    manifest["assets"] = {a: manifest["assets"][a] for a in plan.asset_parts}
    peaks = [r.get("peak_rss_bytes") or 0 for n, r in manifest["components"].items() if n in todo or n in unvalidated]
    if peaks:  # parts load inside component windows (an asset-only rerun may load one outside)
        manifest["peak_rss_bytes"] = max(peaks)
    manifest["complete"] = True
    atomic_write_json(out / EXPORT_MANIFEST, manifest)
    if (out / ENGINE_DIR).is_dir() and todo:
        log.info("engines in %s were built from the previous export: `sdxl-export build` rebuilds them",
                 out / ENGINE_DIR)
    log.info("export complete: %s (%d components: %d exported, %d kept)", out, len(plan.specs), len(todo), len(kept))
    return {**manifest, "up_to_date": False, "exported": todo, "validated": unvalidated,
            "kept": [n for n in plan.specs if n in kept]}


#: Validation pixels at most (~0.4 Mpx): enough to prove the dynamic axes at any size, small
#: enough that SDXL's VAE attention (tokens^2 scores, materialised by the ONNX graph) stays
#: far below a GB. At 1024 px the 768x1344 bucket becomes 448x832 (batch 2).
MAX_VALIDATION_PIXELS = 640 * 640


def validation_shape(native: int) -> tuple[int, int, int]:
    """(batch, height, width) validated at: unlike the traced shape in all three dims.

    Batch 2 (classifier-free guidance) and SDXL's 768x1344 bucket scaled to the model's
    native size: non-square, and not a multiple of the traced size. Above
    :data:`MAX_VALIDATION_PIXELS` (the full-size models) it is scaled down, keeping its
    aspect, to multiples of 64 px.
    """
    from ..buckets import nearest_bucket

    b = nearest_bucket(int(native * 0.75), int(native * 1.3125), native)
    h, w = b.height, b.width
    if h * w > MAX_VALIDATION_PIXELS:
        scale = (MAX_VALIDATION_PIXELS / (h * w)) ** 0.5
        h, w = max(64, int(h * scale) // 64 * 64), max(64, int(w * scale) // 64 * 64)
    return 2, h, w


def _export_component(plan: ExportPlan, out: Path, name: str, get_module: Callable[[], Any],
                      val_shape: tuple[int, int, int], release: Callable[[], None]) -> dict:
    """Trace, compute the PyTorch reference outputs, ``release()`` the module, then check the
    graph in ONNX Runtime: at no point are both the module and a session in memory.

    The module comes through ``get_module`` so that no caller frame keeps it alive.
    """
    from ..models.wrappers import wrap_module
    from . import onnx_tools
    from .param_map import fingerprint_parameters, match_initializers

    spec = plan.specs[name]
    wrapped = wrap_module(name, get_module())
    # The switchable components: their parameters' fingerprints while the module is here.
    prints = fingerprint_parameters(get_module()) if _switchable(plan.parts[name]) else None
    rel_dir = Path("onnx") / name
    with atomic_dir(out / rel_dir) as tmp:
        path = tmp / "model.onnx"
        t0 = time.perf_counter()
        onnx_tools.export_onnx(wrapped, spec, path, plan.opset, plan.dims.native_size)
        export_s = time.perf_counter() - t0
        record: dict[str, Any] = {"passed": None, "skipped": True}
        t0 = time.perf_counter()
        reference = onnx_tools.reference_outputs(wrapped, spec, val_shape) if plan.validate else None
        torch_s = time.perf_counter() - t0
        del wrapped
        release()
        if reference is not None:
            t0 = time.perf_counter()
            record = onnx_tools.compare_with_onnxruntime(spec, path, val_shape, *reference)
            record["torch_seconds"] = round(torch_s, 3)
            record["seconds"] = round(time.perf_counter() - t0 + torch_s, 2)
        parameters = match_initializers(path, prints) if prints is not None else None
        files = {(rel_dir / p.name).as_posix(): sha256_file(p) for p in onnx_tools.onnx_files(path)}
        size = sum(p.stat().st_size for p in onnx_tools.onnx_files(path))
    trace = onnx_tools.trace_shape(spec, plan.dims.native_size)
    return {
        "file": (rel_dir / "model.onnx").as_posix(),
        "files": files,
        "key": plan.component_keys[name],
        "spec": spec.to_dict(),
        "traced_shape": {"batch": trace[0], "height": trace[1], "width": trace[2]},
        "validation": record,
        "export_seconds": round(export_s, 2),
        "size_bytes": size,
        **({"parameters": parameters} if parameters is not None else {}),
    }


def _switchable(part: str) -> bool:
    """Whether a component of ``part`` takes run-time LoRAs (its record carries the parameter map):
    the LoRA parts, and their own copies ("unet#controlnet": the ControlNet UNet)."""
    return part.split("#", 1)[0] in LORA_PARTS


def _controlnet_records(plan: ExportPlan) -> dict[str, Any]:
    from . import controlnet as _cn

    return _cn.records(plan)


def _plan_loras(source: ModelSource, loras: Sequence[tuple[str | Path, float]]) -> tuple[list[Any], list[Any]]:
    """Check and load the LoRAs to fuse (before anything is written): deltas and manifest records."""
    if not loras:
        return [], []
    from ..lora.files import check_scale, config_objects, lora_deltas, resolve_lora

    configs = config_objects({p: source.part_config(p) for p in LORA_PARTS})
    deltas, records = [], []
    for path, scale in loras:
        lora = resolve_lora(path)
        value = check_scale(scale, str(path))
        d = lora_deltas(lora, configs)
        deltas.append((d, value))
        records.append({"file": str(lora.path), "sha256": lora.sha256, "scale": value, "parts": sorted(d)})
    return deltas, records


def _write_asset(plan: ExportPlan, out: Path, manifest: dict[str, Any], asset: str, obj: Any) -> None:
    """Write one asset folder atomically and record it in the (still incomplete) manifest."""
    extra: dict[str, Any] = {}
    if asset.startswith("torch/"):
        log.info("saving PyTorch weights of %s (safetensors) for the reference backend", asset[6:])
        extra["class_name"] = type(obj).__name__

        def writer(d: Path) -> None:
            obj.save_pretrained(str(d), safe_serialization=True)
    elif asset.endswith("scheduler"):
        def writer(d: Path) -> None:
            (d / "scheduler_config.json").write_text(json.dumps(obj, indent=2, default=str) + "\n")
    else:
        def writer(d: Path) -> None:
            obj.save_pretrained(str(d))
    with atomic_dir(out / asset) as tmp, _no_progress_bars():
        writer(tmp)
    manifest["assets"][asset] = {"dir": asset, "files": _hash_tree(out, Path(asset)),
                                 "key": plan.asset_keys[asset], **extra}
    atomic_write_json(out / EXPORT_MANIFEST, manifest)


@contextlib.contextmanager
def _no_progress_bars() -> Iterator[None]:
    """transformers draws a progress bar per saved shard on stderr: not ours to print."""
    try:
        from transformers.utils import logging as tf_logging
    except ImportError:  # pragma: no cover
        yield
        return
    was = tf_logging.is_progress_bar_enabled()
    tf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            tf_logging.enable_progress_bar()


def _shape_str(shape: dict[str, int]) -> str:
    return f"{shape['batch']}x{shape['height']}x{shape['width']}"


def load_export_manifest(artifacts: str | Path, *, verify: bool = False) -> dict[str, Any]:
    """Read and check a finished export manifest (``inspect``; the runtime has its own reader).

    Raises a named :class:`ArtifactError` for a missing folder or manifest, one not
    ours, corrupt JSON, a malformed manifest or an interrupted export; with ``verify``
    also checks every listed file's sha256.
    """
    from ..artifacts import verify_files

    out = Path(artifacts)
    if not out.is_dir():
        raise ArtifactError(f"{out} is not a folder", "pass the folder `sdxl-export export --out` wrote")
    m = read_manifest(out / EXPORT_MANIFEST, FORMAT_EXPORT, _fix_cmd(out))
    comps, assets = m.get("components"), m.get("assets")
    ok = isinstance(comps, dict) and isinstance(assets, dict) and all(
        isinstance(c, dict) and {"file", "files", "spec", "validation"} <= set(c) for c in comps.values())
    if not ok:
        raise CorruptArtifactError(f"{out / EXPORT_MANIFEST} is malformed (components/assets records)", _fix_cmd(out))
    if not m.get("complete"):
        raise ArtifactError(f"{out} holds an interrupted export (manifest complete=false)",
                            _fix_cmd(out) + " to finish it (finished components are kept)")
    if verify:
        records: dict[str, Any] = {**comps, **assets}  # type: ignore[dict-item]  # both checked above
        for name, rec in records.items():
            verify_files(out, rec.get("files") or {}, name)
    return m


__all__ = ["ExportPlan", "check_opset", "export_model", "library_versions", "load_export_manifest",
           "prepare_out_dir", "validation_shape"]
