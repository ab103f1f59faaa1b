"""Human-readable text for ``sdxl-export export`` (summary) and ``sdxl-export inspect``.

Pure functions from a manifest dict to text, so the CLI stays a thin layer and tests
can check the text without running an export.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..artifacts import ENGINE_DIR, ENGINE_MANIFEST

#: Versions shown by ``inspect`` (the manifest records a few more).
SHOWN_VERSIONS = ("torch", "onnx", "onnxruntime", "diffusers", "transformers", "onnx-graphsurgeon")


def human_size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"  # pragma: no cover


def _shape(shape: Any) -> str:
    if not isinstance(shape, dict):
        return "-"
    return f"{shape.get('batch')}x{shape.get('height')}x{shape.get('width')}"


def _max_error(validation: dict[str, Any]) -> str:
    errs = validation.get("max_abs_error") or {}
    return f"{max(errs.values()):.2e}" if errs else "-"


def _result(validation: dict[str, Any]) -> str:
    passed = validation.get("passed")
    return "pass" if passed is True else "FAIL" if passed is False else "not validated"


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]


def _tensor(t: dict[str, Any]) -> str:
    dims = ", ".join(str(d) for d in t.get("shape", []))
    return f"{t.get('name')} {t.get('dtype')} [{dims}]"


def source_line(source: dict[str, Any]) -> str:
    refiner = source.get("refiner")
    fp = str(source.get("fingerprint", ""))[:12]
    return (f"{source.get('kind')} {source.get('id')} "
            f"(refiner: {refiner if refiner else 'none'}; fingerprint {fp})")


def export_summary(result: dict[str, Any], out: Path) -> str:
    """What ``sdxl-export export`` prints at the end: one line per component, then a total."""
    comps = result.get("components", {})
    if result.get("up_to_date"):
        return f"up to date: nothing to do ({out}, {len(comps)} components, source {source_line(result['source'])})"
    exported, validated = set(result.get("exported", [])), set(result.get("validated", []))
    rows = [["component", "size", "export", "peak RSS", "validated at", "max abs error", "result", ""]]
    for name, rec in comps.items():
        val = rec.get("validation") or {}
        secs = float(rec.get("export_seconds", 0.0)) + float(val.get("seconds", 0.0))
        peak = rec.get("peak_rss_bytes")
        rows.append([
            name, human_size(rec.get("size_bytes", 0)), f"{secs:.1f} s", human_size(peak) if peak else "-",
            _shape(val.get("shape")),
            _max_error(val), _result(val),
            "" if name in exported else "(kept, validated now)" if name in validated else "(kept: up to date)",
        ])
    total = sum(rec.get("size_bytes", 0) for rec in comps.values())
    lines = _table(rows)
    lines.append(f"exported {len(exported)}, kept {len(comps) - len(exported)} of {len(comps)} components "
                 f"({human_size(total)} of ONNX) -> {out}")
    return "\n".join(lines)


def inspect_text(manifest: dict[str, Any], root: Path) -> str:
    """The ``sdxl-export inspect`` table: components, I/O, validation, source, versions."""
    versions = manifest.get("versions", {})
    model = manifest.get("model", {})
    lines = [
        (f"artifacts: {root} (export complete, format {manifest.get('format_version')}, "
        f"sdxl-export {manifest.get('sdxl_export_version')})"),
        f"source:    {source_line(manifest.get('source', {}))}",
        (f"model:     native {manifest.get('native_size')} px, latent channels {model.get('latent_channels')}, "
        f"vae scale {model.get('vae_scale')}, created {manifest.get('created', '?')}"),
        f"opset:     {manifest.get('opset')} ({manifest.get('exporter')}, revision {manifest.get('exporter_revision')})",
        "versions:  " + ", ".join(f"{k} {versions[k]}" for k in SHOWN_VERSIONS if k in versions),
        "",
    ]
    rows = [["component", "file", "size", "traced at", "validated at", "max abs error", "result"]]
    io: dict[str, list[str]] = {}
    for name, rec in manifest.get("components", {}).items():
        val = rec.get("validation") or {}
        rows.append([name, str(rec.get("file")), human_size(rec.get("size_bytes", 0)),
                     _shape(rec.get("traced_shape")), _shape(val.get("shape")), _max_error(val), _result(val)])
        spec = rec.get("spec", {})
        io[name] = [f"    in:  {_tensor(t)}" for t in spec.get("inputs", [])] + [
            f"    out: {_tensor(t)}" for t in spec.get("outputs", [])]
    lines += _table(rows)
    lines += ["", "inputs and outputs (symbolic dims: batch, latent_height, latent_width, height, width):"]
    for name, entries in io.items():
        lines += [f"  {name}", *entries]
    lines += ["", "assets:    " + ", ".join(manifest.get("assets", {})) or "none"]
    engines = root / ENGINE_DIR / ENGINE_MANIFEST
    lines.append("engines:   present (see `sdxl-export plan`)" if engines.is_file()
                 else "engines:   none (`sdxl-export build` builds them)")
    return "\n".join(lines)


__all__ = ["export_summary", "human_size", "inspect_text", "source_line"]
