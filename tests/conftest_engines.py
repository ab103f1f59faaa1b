"""Helpers for the engines tests (imported by tests/test_engines_*.py).

The tiny export itself is tests/conftest.py's session fixture ``tiny_artifacts`` (one
real export per session, read-only); tests that change files work on their own copy.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from fixtures import run_cli  # in-process CLI that restores the sdxl_export logger afterwards

__all__ = ["copy_artifacts", "file_mtimes", "run_cli"]


def copy_artifacts(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def file_mtimes(root: Path) -> dict[str, int]:
    return {p.relative_to(root).as_posix(): p.stat().st_mtime_ns for p in sorted(root.rglob("*")) if p.is_file()}
