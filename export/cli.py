"""``sdxl-export export`` and ``sdxl-export inspect``: thin argparse over the library.

Output (the export summary, the inspect table or JSON) is printed here; progress goes
to the log (INFO by default). Errors are raised as
:class:`~sdxl_export.errors.SDXLExportError` and printed by ``cli.main`` as one line.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..artifacts import DEFAULT_ARTIFACTS
from ..cli_common import add_lora_option
from .onnx_tools import DEFAULT_OPSET, MAX_OPSET, MIN_OPSET


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export", help="export every SDXL component to validated ONNX + a manifest",
        description="Export text encoders, base UNet, refiner UNet and VAE decoder/encoder to ONNX "
        "(dynamic batch and size), validate each against PyTorch in ONNX Runtime, and write a "
        "self-contained artifact folder. Incremental: a rerun with the same inputs does nothing.",
    )
    add_source_options(p)
    p.add_argument("--out", type=Path, default=DEFAULT_ARTIFACTS, metavar="DIR",
                   help=f"artifact folder (default {DEFAULT_ARTIFACTS})")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET, metavar="N",
                   help=f"ONNX opset, {MIN_OPSET}..{MAX_OPSET} (default {DEFAULT_OPSET})")
    p.add_argument("--no-torch-weights", action="store_true",
                   help="do not save the PyTorch weights the `torch` reference backend runs on (halves the disk use)")
    p.set_defaults(func=run_export)

    i = sub.add_parser("inspect", help="show an export's components, I/O, validation and versions",
                       description="Print the export manifest of DIR as a table (or JSON).")
    i.add_argument("dir", type=Path, metavar="DIR", help="artifact folder written by `sdxl-export export`")
    i.add_argument("--json", action="store_true", help="print the manifest as JSON")
    i.add_argument("--verify", action="store_true", help="also check every file's sha256 against the manifest")
    i.set_defaults(func=run_inspect)


def add_source_options(p: argparse.ArgumentParser) -> None:
    """--model, --refiner/--no-refiner and --vae: the sources every command that exports takes."""
    p.add_argument("--model", default="tiny", metavar="SRC",
                   help="preset (tiny, small, sdxl), diffusers folder, single-file .safetensors checkpoint "
                   "(e.g. sd_xl_base_1.0.safetensors) or hub id (default tiny)")
    ref = p.add_mutually_exclusive_group()
    ref.add_argument("--refiner", default="same", metavar="SRC",
                     help="refiner: preset, diffusers folder, single file or hub id (default: a preset's own; "
                     "none otherwise)")
    ref.add_argument("--no-refiner", action="store_true", help="the base only (no refiner)")
    p.add_argument("--vae", default=None, metavar="DIR|FILE",
                   help="a VAE replacing the model's (diffusers folder or single file, e.g. the fp16-fix VAE)")
    add_lora_option(p, "fused into the weights before export (only the components it touches re-export)")
    p.add_argument("--controlnet", dest="controlnets", action="append", default=[], metavar="DIR|FILE",
                   help="an SDXL ControlNet (diffusers folder, or one diffusers-format .safetensors; preset:tiny "
                   "for the seeded test one); repeatable; named after the folder/file stem")


def run_export(args: argparse.Namespace) -> int:
    from .exporter import export_model
    from .report import export_summary

    result = export_model(
        args.model, args.out, refiner=None if args.no_refiner else args.refiner,
        with_refiner=not args.no_refiner, opset=args.opset, torch_weights=not args.no_torch_weights, vae=args.vae,
        loras=args.loras, controlnets=args.controlnets,
    )
    print(export_summary(result, args.out))
    return 0


def run_inspect(args: argparse.Namespace) -> int:
    from .exporter import load_export_manifest
    from .report import inspect_text

    manifest = load_export_manifest(args.dir, verify=args.verify)
    print(json.dumps(manifest, indent=2) if args.json else inspect_text(manifest, args.dir))
    return 0
