"""The layers run one way: model -> export -> engines -> runtime -> serve. No import runs back up.

Read from the sources (every ``import``, top-level or inside a function), so an arrow added in a
function body counts too. The rules are the design's: ``engines/`` never imports the runtime; the
runtime reads artifacts, not the exporter's Python objects; the server talks to the runtime's
public API only (``sdxl_export.runtime``'s names, not its modules); benchmarks call the library,
not the command line.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = "sdxl_export"

#: package -> packages it must never import (prefixes of absolute module names)
FORBIDDEN = {
    "export": ["engines", "runtime", "serve", "benchmarks", "cli"],
    "engines": ["runtime", "serve", "benchmarks", "cli"],
    "runtime": ["export", "serve", "benchmarks", "cli", "runtime.cli"],
    "lora": ["export", "engines", "serve", "benchmarks", "cli"],
    "serve": ["export", "engines", "benchmarks", "cli"],
    "benchmarks": ["cli"],
}
#: where the rule is about the CLI layer only: a stage's own cli.py may use the shared CLI helpers
CLI_MODULES = {"cli.py"}


def _imports(path: Path) -> list[tuple[int, str]]:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = [PKG, *rel.parts]
    if parts[-1] == "__init__":
        parts = parts[:-1]
        package = parts
    else:
        package = parts[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if node.module is None or mod == f"{PKG}.runtime":  # "from .. import x" / "from ..runtime import X"
                found += [(node.lineno, f"{mod}.{a.name}") for a in node.names]
            else:
                found.append((node.lineno, mod))
    return found


def _modules(package: str):
    yield from sorted((ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_import_runs_back_up(package):
    bad = []
    for path in _modules(package):
        for line, mod in _imports(path):
            for target in FORBIDDEN[package]:
                full = f"{PKG}.{target}"
                if mod == full or mod.startswith(full + "."):
                    bad.append(f"{path.relative_to(ROOT)}:{line} imports {mod}")
    assert not bad, "\n".join(bad)


def test_the_server_uses_the_runtimes_public_names_only():
    from sdxl_export import runtime

    public = set(runtime.__all__)
    bad = []
    for path in _modules("serve"):
        for line, mod in _imports(path):
            if not mod.startswith(f"{PKG}.runtime"):
                continue
            name = mod.removeprefix(f"{PKG}.runtime.")
            if name not in public:
                bad.append(f"{path.relative_to(ROOT)}:{line} uses {mod} (not in sdxl_export.runtime.__all__)")
    assert not bad, "\n".join(bad)


def test_the_rule_reader_sees_relative_and_function_level_imports(tmp_path):
    """The checker itself can fail: a planted backward import is found."""
    pkg = ROOT / "engines"
    planted = pkg / "_planted_for_test.py"
    planted.write_text("def f():\n    from ..runtime.pipeline import SDXLPipeline\n    return SDXLPipeline\n")
    try:
        found = _imports(planted)
    finally:
        planted.unlink()
    assert (2, f"{PKG}.runtime.pipeline") in found


def test_every_subpackage_ships_in_the_wheel():
    """pyproject lists packages by hand (the root is the package): a new folder must be listed, or a
    wheel install lacks it while the editable install hides the gap."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join([PKG, *p.parent.relative_to(ROOT).parts]) for p in ROOT.rglob("__init__.py")
             if p.parent.relative_to(ROOT).parts[:1] not in {(".venv",), ("tests",), ("build",)}}
    assert found - listed == set(), f"packages missing from pyproject: {sorted(found - listed)}"
