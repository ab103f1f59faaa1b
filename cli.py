"""The ``sdxl-export`` command: a thin argparse layer over the library.

Each stage registers its own subcommands (``export/cli.py``, ``engines/cli.py``,
``runtime/cli.py``, ``benchmarks/cli.py``) through a ``register(subparsers)`` function
that sets ``func`` on its parser. Errors raised on purpose (:class:`SDXLExportError`)
become one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence
from typing import Any

from . import __version__
from .cli_common import Parser, add_subcommands
from .errors import SDXLExportError
from .logs import setup_logging

log = logging.getLogger("sdxl_export")

#: Modules that contribute subcommands, in help order.
SUBCOMMAND_MODULES = (
    "sdxl_export.export.cli",
    "sdxl_export.engines.cli",
    "sdxl_export.runtime.cli",
    "sdxl_export.benchmarks.cli",
    "sdxl_export.serve.cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="sdxl-export",
        description="Export SDXL to ONNX, build TensorRT (or ONNX Runtime) engines over its aspect "
        "buckets, and run base+refiner sampling on them.",
    )
    parser.add_argument("--version", action="version", version=f"sdxl-export {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    sub = add_subcommands(parser, dest="command", metavar="COMMAND")
    for mod_name in SUBCOMMAND_MODULES:
        try:
            mod = importlib.import_module(mod_name)
        except ModuleNotFoundError as exc:
            if exc.name == mod_name:  # stage not written yet
                continue
            raise
        mod.register(sub)
    _wire_layers(sub)
    return parser


def _wire_layers(sub: Any) -> None:
    """The one place a lower layer's command is handed something from a higher layer: ``build
    --precision int8`` calibrates on the UNets' inputs as the runtime's pipeline feeds them, and
    ``engines/`` never imports the runtime."""
    build = sub.choices.get("build")
    if build is not None:
        build.set_defaults(calibration_factory=_unet_calibration)


def _unet_calibration() -> Any:
    from .runtime import UNetCalibration

    return UNetCalibration()


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    setup_logging(-1 if args.quiet else args.verbose)
    import warnings

    warnings.filterwarnings("ignore")
    try:
        rc = args.func(args)
    except SDXLExportError as exc:
        print(f"sdxl-export: error: {exc.one_line()}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("sdxl-export: interrupted (partial files are temporary and will be cleaned up)", file=sys.stderr)
        return 130
    return int(rc or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
