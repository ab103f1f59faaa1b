"""Type-check the TensorRT-calling code with mypy against ``tensorrt-stubs``.

TensorRT cannot be installed on CPU machines, so its API use is checked statically.
``tensorrt-stubs`` 10.13 is not usable as installed: it puts ``tensorrt/__init__.pyi``
in site-packages without a ``py.typed`` marker (mypy then treats ``tensorrt`` as
untyped, i.e. ``Any``, and checks nothing), and its generated ``tensorrt_bindings``
stub has syntax errors (parameters named ``in``, a non-default parameter after default
ones) and imports a ``tensorrt_libs`` it does not ship. This test copies the stubs,
repairs exactly those lines, puts them on ``MYPYPATH`` and runs mypy in strict mode. A
negative control (a misspelt TensorRT enum member) proves the stubs are in effect.

CI command (same thing): ``python -m pytest tests/test_engines_typecheck.py``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: The modules that call TensorRT's API, or run TensorRT objects (executor, lanes, accuracy).
TRT_MODULES = ["tensorrt_env.py", "engines/trt_builder.py", "engines/trt_accuracy.py", "runtime/backends/tensorrt/runner.py",
               "runtime/backends/tensorrt/execution.py", "runtime/backends/tensorrt/refit.py", "runtime/backends/cuda/lanes.py"]

MYPY_INI = """\
[mypy]
python_version = 3.11
follow_imports = silent
ignore_missing_imports = True
[mypy-tensorrt,tensorrt.*,tensorrt_bindings,tensorrt_bindings.*,tensorrt_libs]
ignore_errors = True
"""


def _stub_dir(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        if (Path(loc) / "__init__.pyi").is_file():
            return Path(loc)
    return None


@pytest.fixture(scope="module")
def stub_path() -> Path:
    """Repaired stubs in ``.mypy_cache/trt-stubs`` (stable path: mypy's cache stays warm)."""
    trt, bindings = _stub_dir("tensorrt"), _stub_dir("tensorrt_bindings")
    if trt is None or bindings is None:
        if os.environ.get("CI"):  # CI installs them (README set-up): never pass vacuously there
            pytest.fail("tensorrt-stubs is not installed: run the README's set-up command")
        pytest.skip("tensorrt-stubs is not installed")
    out = ROOT / ".mypy_cache" / "trt-stubs"
    text = (bindings / "tensorrt.pyi").read_text()
    text = re.sub(r"(?<=[(,] )in: ", "in_: ", text)  # `in` is a keyword
    text = re.sub(r"(?<=\()in: ", "in_: ", text)
    text = re.sub(r"(power: Weights = None, channel_axis: int)\)", r"\1 = ...)", text)
    files = {
        "tensorrt/__init__.pyi": (trt / "__init__.pyi").read_text(),
        "tensorrt_bindings/__init__.pyi": (bindings / "__init__.pyi").read_text(),
        "tensorrt_bindings/tensorrt.pyi": text,
        "tensorrt_libs.pyi": "",
        "mypy.ini": MYPY_INI,
    }
    for rel, content in files.items():
        p = out / rel
        if not p.is_file() or p.read_text() != content:  # unchanged files keep their mtime
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(content)
    return out


def _package_root() -> Path:
    """A folder holding ``sdxl_export`` -> the repository root (a symlink).

    The repository root is the package itself, and mypy names modules by the folders
    above a file: checked in place, the module would be named after whatever folder the
    clone sits in (``main.engines...``, or an error for a name like ``ci-clone``).
    """
    tag = hashlib.sha1(str(ROOT).encode()).hexdigest()[:10]
    parent = Path(tempfile.gettempdir()) / f"sdxl-export-mypy-{tag}"  # outside the repo: no link loop
    link = parent / "sdxl_export"
    parent.mkdir(parents=True, exist_ok=True)
    if not (link.is_symlink() and link.resolve() == ROOT):
        if link.is_symlink():
            link.unlink()
        link.symlink_to(ROOT, target_is_directory=True)
    return parent


def _mypy(stub_path: Path, *targets: str) -> subprocess.CompletedProcess[str]:
    env = {"MYPYPATH": str(stub_path), "PATH": "/usr/bin:/bin"}
    return subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", str(stub_path / "mypy.ini"), "--strict",
         "--cache-dir", str(ROOT / ".mypy_cache"), *targets],
        cwd=_package_root(), env=env, capture_output=True, text=True, timeout=600, check=False,
    )


def test_tensorrt_calling_code_type_checks(stub_path, tmp_path):
    control = tmp_path / "control.py"
    control.write_text(
        "import tensorrt as trt\n"
        "def f() -> int:\n"
        "    x: trt.HardwareCompatibilityLevel = trt.HardwareCompatibilityLevel.AMPERE_PLUSS\n"
        "    return trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(b'').name\n"
    )
    bad = _mypy(stub_path, str(control))
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert 'has no attribute "AMPERE_PLUSS"' in bad.stdout  # the stubs are in effect, not Any
    assert 'Incompatible return value type (got "str", expected "int")' in bad.stdout

    res = _mypy(stub_path, *(f"sdxl_export/{m}" for m in TRT_MODULES))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "Success" in res.stdout
