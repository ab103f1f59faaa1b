"""Shared fixtures helpers for the engines tests (imported by tests/test_engines_*.py).

Exporting the ``tiny`` preset takes ~15 s, so it happens once per session (cached in
this module) with the real exporter; tests that change files work on their own copy.
"""

from __future__ import annotations

import contextlib
import io
import shutil
from pathlib import Path
from typing import Any

_CACHE: dict[str, Path] = {}


def exported_tiny(tmp_path_factory: Any) -> Path:
    """A folder holding the real export of the ``tiny`` preset (shared, do not modify)."""
    if "tiny" not in _CACHE:
        from sdxl_export.export import export_model

        out = tmp_path_factory.mktemp("tiny-export") / "artifacts"
        export_model("tiny", out)
        _CACHE["tiny"] = out
    return _CACHE["tiny"]


def copy_artifacts(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def run_cli(*argv: str) -> tuple[int, str, str]:
    """Run ``sdxl-export ARGV`` in-process; return (exit code, stdout, stderr)."""
    from sdxl_export.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(list(argv))
    return rc, out.getvalue(), err.getvalue()


def file_mtimes(root: Path) -> dict[str, int]:
    return {p.relative_to(root).as_posix(): p.stat().st_mtime_ns for p in sorted(root.rglob("*")) if p.is_file()}
