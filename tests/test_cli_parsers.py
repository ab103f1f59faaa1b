"""The command line never guesses: no parser accepts an abbreviation of a long option.

argparse's default prefix matching once parsed ``build --vae X`` as ``--vae-precision X``. Every
subcommand parser of ``sdxl-export`` is walked, and every ``ArgumentParser(...)`` the sources
construct is checked for ``allow_abbrev=False`` (the benchmarks' own ``python -m`` entry points).
"""

from __future__ import annotations

import argparse
import ast
from pathlib import Path

import pytest
from sdxl_export.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]


def _walk(parser: argparse.ArgumentParser, path: str = "sdxl-export"):
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _walk(sub, f"{path} {name}")


def test_every_subcommand_parser_refuses_abbreviations():
    parsers = list(_walk(build_parser()))
    names = {p for p, _ in parsers}
    assert {"sdxl-export export", "sdxl-export build", "sdxl-export run", "sdxl-export serve",
            "sdxl-export bench"} <= names
    lax = [p for p, parser in parsers if parser.allow_abbrev]
    assert not lax, f"parsers that accept abbreviations: {lax}"


@pytest.mark.parametrize("argv", [
    ["build", "--vae-p", "fp32"],          # a prefix of --vae-precision
    ["run", "a cat", "--back", "onnxruntime"],  # a prefix of --backend
    ["serve", "--max-q", "4"],              # a prefix of --max-queue
])
def test_a_prefix_of_a_real_option_is_an_error(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(argv)
    assert exc.value.code == 2
    assert "unrecognized arguments" in capsys.readouterr().err


def test_combined_short_flags_still_work():
    args = build_parser().parse_args(["-vv", "run", "a cat"])
    assert args.verbose == 2


def test_every_argument_parser_in_the_sources_sets_allow_abbrev_false():
    offenders = []
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT)
        if rel.parts[0] in {".venv", "build", "tests"} or "site-packages" in rel.parts:
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Call):
                continue
            fn = node.func
            name = fn.attr if isinstance(fn, ast.Attribute) else getattr(fn, "id", None)
            if name != "ArgumentParser":
                continue
            kw = {k.arg: k.value for k in node.keywords}
            ok = isinstance(kw.get("allow_abbrev"), ast.Constant) and kw["allow_abbrev"].value is False
            if not ok and rel != Path("cli_common.py"):
                offenders.append(f"{rel}:{node.lineno}")
    assert not offenders, f"ArgumentParser(...) without allow_abbrev=False: {offenders}"


def test_backend_help_lists_every_backend():
    from sdxl_export.runtime.backends import BACKENDS

    for path, parser in _walk(build_parser()):
        for action in parser._actions:
            if "--backend" in action.option_strings and action.help:
                missing = [b for b in BACKENDS if b not in action.help and b not in (action.choices or ())]
                if action.choices is not None:  # build/plan build engines: torch has none to build
                    missing = [b for b in missing if b != "torch"]
                assert not missing, f"{path} --backend help misses {missing}"
