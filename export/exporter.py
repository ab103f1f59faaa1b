"""Export an SDXL model to a self-contained artifact folder (ONNX + manifest).

The folder holds everything the runtime needs -- one validated ONNX graph per
component, the tokenizers, the scheduler configs, the PyTorch weights for the
reference backend (safetensors) -- and a manifest naming each file with its sha256.

Incremental: each component's record carries a key (source fingerprint, opset,
exporter and library versions, spec); a rerun with the same key and intact files does
no export work. Atomic: every component is written into a temporary folder and renamed
into place, and the manifest is rewritten after each component with
``"complete": false`` until the last one, so a process killed mid-export leaves
nothing that a reader trusts, and the rerun resumes from the finished components.
"""

from __future__ import annotations

import json
import logging

import platform
import shutil
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Callable



from .. import __version__
from ..artifacts import (
    DEFAULT_ARTIFACTS, ENGINE_DIR, EXPORT_MANIFEST, FORMAT_EXPORT, TMP_PREFIX, atomic_dir,
    atomic_write_json, clean_stale_tmp, manifest_header, read_manifest, sha256_file, sha256_json,
)
from ..buckets import nearest_bucket
from ..errors import ArtifactError, OpsetError, OutputDirError
from ..models.loader import SDXLModel, load_model
from ..models.wrappers import wrap
from ..specs import component_specs
from . import onnx_tools

log = logging.getLogger(__name__)

#: Bump when the export procedure changes what it writes: every component re-exports.
EXPORTER_REVISION = 1
EXPORTER = "torch.onnx (TorchScript, dynamo=False)"

TORCH_MODULES = {
    "text_encoder": "text_encoder",
    "text_encoder_2": "text_encoder_2",
    "unet": "unet",
    "refiner_unet": "refiner_unet",
    "vae": "vae",
}

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


def prepare_out_dir(out: Path) -> dict[str, Any] | None:
    """Check ``out`` can hold our artifacts; return its current manifest if any.

    Refuses a file, an unwritable folder, and a non-empty folder that is not ours
    (we never write into, or delete from, somebody else's folder).
    """
    if out.exists() and not out.is_dir():
        raise OutputDirError(f"output {out} is a file", "pass a folder path to --out")
    previous = None
    if out.is_dir():
        entries = [p for p in out.iterdir() if not p.name.startswith(TMP_PREFIX)]
        if entries:
            if not (out / EXPORT_MANIFEST).is_file():
                raise OutputDirError(
                    f"output folder {out} is not empty and holds no sdxl-export manifest",
                    "pass a new or empty folder to --out (nothing in it was touched)",
                )
            try:
                previous = read_manifest(out / EXPORT_MANIFEST, FORMAT_EXPORT, _fix_cmd(out))
            except ArtifactError as exc:
                if "not written by sdxl-export" in exc.message:
                    raise OutputDirError(
                        f"output folder {out} holds a manifest.json not written by sdxl-export",
                        "pass a new or empty folder to --out (nothing in it was touched)",
                    ) from None
                log.warning("previous manifest unusable (%s): exporting everything again", exc.message)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f"{TMP_PREFIX}write-probe"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise OutputDirError(f"cannot write to {out} ({exc.strerror})", "pass a writable folder to --out") from None
    n = clean_stale_tmp(out)
    if n:
        log.info("removed %d leftover temporary file(s) of an interrupted run", n)
    return previous


def _files_ok(root: Path, files: dict[str, str]) -> bool:
    return bool(files) and all((root / rel).is_file() and sha256_file(root / rel) == h for rel, h in files.items())


def _hash_tree(root: Path, sub: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): sha256_file(p)
        for p in sorted((root / sub).rglob("*")) if p.is_file()
    }


def export_model(
    model: SDXLModel | str = "tiny",
    out_dir: str | Path = DEFAULT_ARTIFACTS,
    *,
    refiner: str | None = "same",
    with_refiner: bool = True,
    opset: int = 17,
    validate: bool = True,
    torch_weights: bool = True,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Export every component of ``model`` into ``out_dir``; return the manifest.

    ``model`` is an :class:`SDXLModel` or a source string (preset name, diffusers
    folder, hub id) given to :func:`~sdxl_export.models.load_model` with ``refiner``.
    """
    if not onnx_tools.MIN_OPSET <= int(opset) <= onnx_tools.MAX_OPSET:
        raise OpsetError(
            f"opset {opset} is outside {onnx_tools.MIN_OPSET}..{onnx_tools.MAX_OPSET}",
            f"pass --opset between {onnx_tools.MIN_OPSET} and {onnx_tools.MAX_OPSET} (default 17)",
        )
    out = Path(out_dir)
    previous = prepare_out_dir(out)
    try:
        if isinstance(model, str):
            model = load_model(model, refiner=refiner, with_refiner=with_refiner)
        return _export(model, out, previous, opset, validate, torch_weights, progress)
    finally:
        clean_stale_tmp(out)


def _export(
    model: SDXLModel, out: Path, previous: dict[str, Any] | None, opset: int, validate: bool,
    torch_weights: bool, progress: Progress | None,
) -> dict[str, Any]:
    dims = model.dims()
    specs = component_specs(dims, with_refiner=model.has_refiner)
    native = dims.native_size
    versions = library_versions()
    source_fp = model.source.get("fingerprint", "")
    prev_components = (previous or {}).get("components", {})

    manifest: dict[str, Any] = {
        **manifest_header(FORMAT_EXPORT),
        "complete": False,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "source": model.source,
        "model": dims.to_dict(),
        "native_size": native,
        "opset": opset,
        "exporter": EXPORTER,
        "exporter_revision": EXPORTER_REVISION,
        "versions": versions,
        "components": {},
        "assets": {},
    }

    def key_for(name: str) -> str:
        return sha256_json({
            "source": source_fp, "component": name, "opset": opset, "revision": EXPORTER_REVISION,
            "torch": versions.get("torch"), "onnx": versions.get("onnx"), "validate": validate,
            "spec": specs[name].to_dict() if name in specs else None,
        })

    todo = [n for n in specs if not (
        prev_components.get(n, {}).get("key") == key_for(n) and _files_ok(out, prev_components[n]["files"])
    )]
    assets_key = sha256_json({"source": source_fp, "torch_weights": torch_weights, "revision": EXPORTER_REVISION})
    prev_assets = (previous or {}).get("assets", {})
    assets_ok = bool(prev_assets) and all(
        a.get("key") == assets_key and _files_ok(out, a.get("files", {})) for a in prev_assets.values()
    )
    stale_components = set(prev_components) - set(specs)
    if previous and previous.get("complete") and not todo and assets_ok and not stale_components:
        log.info("%s is up to date (%d components, source %s): no export work done",
                 out, len(specs), model.source.get("id"))
        previous["up_to_date"] = True
        return previous

    for name in specs:
        if name not in todo:
            manifest["components"][name] = prev_components[name]
            log.info("%s: up to date, kept", name)
    for name in stale_components:
        shutil.rmtree(out / "onnx" / name, ignore_errors=True)
    # A reader must not trust the folder while it changes: mark it incomplete first.
    atomic_write_json(out / EXPORT_MANIFEST, manifest)

    val_bucket = nearest_bucket(int(native * 0.75), int(native * 1.3125), native)  # 768x1344-like
    total = len(todo)
    for i, name in enumerate(todo, 1):
        spec = specs[name]
        t0 = time.perf_counter()
        log.info("[%d/%d] %s: exporting to ONNX (opset %d) ...", i, total, name, opset)
        if progress:
            progress(name, i, total)
        module = wrap(model, spec)
        rel_dir = Path("onnx") / name
        with atomic_dir(out / rel_dir) as tmp:
            path = tmp / "model.onnx"
            onnx_tools.export_onnx(module, spec, path, opset, native)
            export_s = time.perf_counter() - t0
            record: dict[str, Any] = {"passed": None, "skipped": True}
            if validate:
                shape = (2, val_bucket.height, val_bucket.width)
                record = onnx_tools.validate(module, spec, path, shape)
            files = {(rel_dir / p.name).as_posix(): sha256_file(p) for p in onnx_tools.onnx_files(path)}
        trace = onnx_tools.trace_shape(spec, native)
        manifest["components"][name] = {
            "file": (rel_dir / "model.onnx").as_posix(),
            "files": files,
            "key": key_for(name),
            "spec": spec.to_dict(),
            "traced_shape": {"batch": trace[0], "height": trace[1], "width": trace[2]},
            "validation": record,
            "export_seconds": round(export_s, 2),
            "size_bytes": sum((out / f).stat().st_size for f in files),
        }
        atomic_write_json(out / EXPORT_MANIFEST, manifest)
        errs = record.get("max_abs_error")
        log.info("[%d/%d] %s: done in %.1fs%s", i, total, name, time.perf_counter() - t0,
                 f", validated at {record['shape']}: max abs error {max(errs.values()):.2e}" if errs else "")

    if assets_ok:
        manifest["assets"] = prev_assets
    else:
        manifest["assets"] = _write_assets(model, out, torch_weights, assets_key)
    manifest["complete"] = True
    atomic_write_json(out / EXPORT_MANIFEST, manifest)
    engines = out / ENGINE_DIR
    if engines.is_dir() and todo:
        log.info("engines in %s were built from the previous export: `sdxl-export build` rebuilds them", engines)
    log.info("export complete: %s (%d components)", out, len(specs))
    manifest["up_to_date"] = False
    return manifest


def _write_assets(model: SDXLModel, out: Path, torch_weights: bool, key: str) -> dict[str, Any]:
    """Tokenizers, scheduler configs and (optionally) PyTorch weights, each atomically."""
    assets: dict[str, Any] = {}

    def put(name: str, writer: Callable[[Path], None], **extra: Any) -> None:
        with atomic_dir(out / name) as tmp:
            writer(tmp)
        assets[name] = {"dir": name, "files": _hash_tree(out, Path(name)), "key": key, **extra}

    put("tokenizer", lambda d: model.tokenizer.save_pretrained(str(d)))
    put("tokenizer_2", lambda d: model.tokenizer_2.save_pretrained(str(d)))
    put("scheduler", lambda d: _write_json(d / "scheduler_config.json", model.scheduler_config))
    if model.has_refiner:
        put("refiner_scheduler", lambda d: _write_json(
            d / "scheduler_config.json", model.refiner_scheduler_config or model.scheduler_config))
    if torch_weights:
        for attr in TORCH_MODULES:
            mod = getattr(model, attr)
            if mod is None:
                continue
            log.info("saving PyTorch weights of %s (safetensors) for the reference backend", attr)
            put(f"torch/{attr}", lambda d, m=mod: m.save_pretrained(str(d), safe_serialization=True),
                class_name=type(mod).__name__)
    return assets


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, default=str) + "\n")


def load_export_manifest(artifacts: str | Path) -> dict[str, Any]:
    """Read and check an export manifest (used by ``inspect``; the runtime has its own reader)."""
    out = Path(artifacts)
    m = read_manifest(out / EXPORT_MANIFEST, FORMAT_EXPORT, _fix_cmd(out))
    if not m.get("complete"):
        raise ArtifactError(f"{out} holds an interrupted export", _fix_cmd(out) + " to finish it")
    return m


__all__ = ["export_model", "load_export_manifest", "library_versions", "prepare_out_dir"]
