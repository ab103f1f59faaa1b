"""What every command-line parser of the project shares (one CLI-level module, imported by each
stage's ``cli.py``; no library module imports it).

- :class:`Parser`: argparse with ``allow_abbrev=False``. argparse's default prefix matching turns a
  misspelt or unknown option into a longer real one (``build --vae X`` was once parsed as
  ``--vae-precision X``); a command line must never guess. :func:`add_subcommands` makes every
  subcommand parser one too.
- :func:`add_lora_option`: ``--lora FILE[:SCALE]``, the same on export, build and run.
"""

from __future__ import annotations

import argparse
from typing import Any


class Parser(argparse.ArgumentParser):
    """An :class:`argparse.ArgumentParser` that never accepts an abbreviation of a long option."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["allow_abbrev"] = False
        super().__init__(*args, **kwargs)


def add_subcommands(parser: argparse.ArgumentParser, **kwargs: Any) -> Any:
    """``parser.add_subparsers`` whose subcommand parsers are :class:`Parser` (no abbreviations)."""
    kwargs.setdefault("parser_class", Parser)
    return parser.add_subparsers(**kwargs)


def add_lora_option(p: argparse.ArgumentParser, what: str) -> None:
    """--lora FILE[:SCALE], repeatable (diffusers/PEFT or kohya/A1111 .safetensors)."""
    from .lora.files import parse_lora_arg

    p.add_argument("--lora", dest="loras", action="append", type=parse_lora_arg, default=[],
                   metavar="FILE[:SCALE]", help=f"an SDXL LoRA (.safetensors, diffusers or kohya format), scale "
                   f"default 1.0; repeatable; {what}")
