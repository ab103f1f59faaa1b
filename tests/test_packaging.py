"""`import sdxl_export.runtime` resolves the same way from every install route.

The repository root is the ``sdxl_export`` package (pyproject maps it with
``package-dir``), so these tests guard the mapping: the editable install, the repo root
as current directory, and a built wheel must all expose the same subpackages, the
bucket table (package data) and the console script.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SUBPACKAGES = ("export", "engines", "runtime", "benchmarks", "models")
PROBE = (
    "import sdxl_export, sdxl_export.runtime, sdxl_export.export, sdxl_export.engines;"
    "from sdxl_export.buckets import sdxl_buckets;"
    "print(sdxl_export.__file__); print(len(sdxl_buckets()))"
)


def _probe(cwd: Path, env: dict[str, str] | None = None) -> list[str]:
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=cwd, env=env, capture_output=True, text=True, check=False,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


def test_import_from_repo_root_uses_the_repo(tmp_path):
    path, n = _probe(REPO)
    assert Path(path).resolve() == REPO / "__init__.py"
    assert n == "40"


def test_import_from_elsewhere_uses_the_same_package(tmp_path):
    path, n = _probe(tmp_path)
    assert Path(path).resolve() == REPO / "__init__.py"
    assert n == "40"


def test_console_script_runs():
    exe = Path(sys.executable).with_name("sdxl-export")
    assert exe.exists(), "console script not installed: pip install -e ."
    out = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    assert "sdxl-export" in out.stdout


def test_built_wheel_has_every_subpackage_and_imports(tmp_path):
    pytest.importorskip("setuptools")
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
         str(tmp_path), str(REPO)],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert build.returncode == 0, build.stderr
    (wheel,) = tmp_path.glob("sdxl_export-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for sub in SUBPACKAGES:
        assert f"sdxl_export/{sub}/__init__.py" in names
    assert "sdxl_export/data/sdxl_aspect_buckets.csv" in names
    assert not any(n.startswith(("sdxl_export/tests/", "tests/")) for n in names)
    # A wheel of pure Python is importable straight from the zip: put it first on the path.
    env = {**os.environ, "PYTHONPATH": str(wheel)}
    path, n = _probe(tmp_path, env)
    assert str(wheel) in path
    assert n == "40"
