"""Shared, expensive test helpers (imported by test modules; add functions, never change them).

Session-wide results are cached in this module, so that a helper imported by several
test modules still runs once per test session.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

_CACHE: dict[str, Any] = {}


def tiny_diffusers_folders(tmp_path_factory: Any, tiny_model: Any) -> tuple[Path, Path]:
    """The tiny model saved as diffusers folders (base, refiner) with ``save_pretrained``."""
    if "folders" not in _CACHE:
        root = tmp_path_factory.mktemp("tiny-diffusers")
        base, refiner = root / "base", root / "refiner"
        tiny_model.save_pretrained(base, refiner)
        _CACHE["folders"] = (base, refiner)
    return _CACHE["folders"]


def tiny_folder_artifacts(tmp_path_factory: Any, tiny_model: Any) -> Path:
    """An export of the tiny model loaded back from its diffusers folders (read-only).

    This is the path a user with a real checkpoint takes: ``export_model(folder,
    refiner=folder2)``. Validation is skipped (the preset export validates the same graphs).
    """
    if "folder_artifacts" not in _CACHE:
        from sdxl_export.export import export_model

        base, refiner = tiny_diffusers_folders(tmp_path_factory, tiny_model)
        out = tmp_path_factory.mktemp("tiny-folder-artifacts") / "artifacts"
        export_model(str(base), out, refiner=str(refiner), validate=False)
        _CACHE["folder_artifacts"] = out
    return _CACHE["folder_artifacts"]


def ort_twin_artifacts(tmp_path_factory: Any, tiny_artifacts: Path, buckets: str = "256x256,192x320") -> Path:
    """A copy of the tiny export with ONNX Runtime twin engines over ``buckets``, batch 1."""
    key = f"twin:{buckets}"
    if key not in _CACHE:
        import shutil

        from sdxl_export.engines.build import BuildOptions, build

        out = tmp_path_factory.mktemp("tiny-twin") / "artifacts"
        shutil.copytree(tiny_artifacts, out)
        build(BuildOptions(out=out, backend="onnxruntime", buckets=buckets, batch_sizes=(1,)))
        _CACHE[key] = out
    return _CACHE[key]


def run_cli(*argv: str) -> tuple[int, str, str]:
    """Run ``sdxl-export ARGV`` in-process; return (exit code, stdout, stderr).

    ``cli.main`` installs its own log handler on the ``sdxl_export`` logger; the logger
    is put back as it was afterwards, so later tests' log capture is not affected.
    """
    import contextlib
    import io
    import logging

    from sdxl_export.cli import main

    logger = logging.getLogger("sdxl_export")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = main(list(argv))
    finally:
        logger.handlers[:] = saved[0]
        logger.setLevel(saved[1])
        logger.propagate = saved[2]
    return rc, out.getvalue(), err.getvalue()


def file_states(root: Path) -> dict[str, tuple[int, int]]:
    """relpath -> (size, mtime_ns) of every file below ``root``: proof that nothing was rewritten."""
    return {p.relative_to(root).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


def tiny_inpaint_model() -> Any:
    """The ``tiny-inpaint`` preset (tiny with a 9-channel inpainting base UNet), built once."""
    if "inpaint_model" not in _CACHE:
        from sdxl_export.models import build_preset

        _CACHE["inpaint_model"] = build_preset("tiny-inpaint")
    return _CACHE["inpaint_model"]


def tiny_inpaint_artifacts(tmp_path_factory: Any) -> Path:
    """An export of ``tiny-inpaint`` (read-only); the 9-channel UNet is validated like any UNet."""
    if "inpaint_artifacts" not in _CACHE:
        from sdxl_export.export import export_model

        out = tmp_path_factory.mktemp("tiny-inpaint-artifacts") / "artifacts"
        export_model(tiny_inpaint_model(), out)
        _CACHE["inpaint_artifacts"] = out
    return _CACHE["inpaint_artifacts"]
