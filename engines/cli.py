"""``sdxl-export build``, ``plan`` and ``verify-engines``: thin argparse over the library.

Output is printed here only; everything else logs. Errors are raised as
:class:`~sdxl_export.errors.SDXLExportError` and printed by ``cli.main`` as one line.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ..artifacts import DEFAULT_ARTIFACTS
from ..errors import ArtifactError, InvalidRequestError
from ..export.cli import add_source_options
from . import ort_builder
from .ov_int8 import DEFAULT_SAMPLES as DEFAULT_CALIBRATION_SAMPLES
from .planner import DEFAULT_MODE, MODES, Plan
from .trt_builder import DEFAULT_OPT_LEVEL, HARDWARE_COMPAT, MAX_OPT_LEVEL


def _hires_scales(text: str) -> tuple[float, ...]:
    try:
        scales = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of numbers (e.g. 1.5,2)") from None
    if not scales or any(not 1.0 <= x <= 8.0 for x in scales):
        raise argparse.ArgumentTypeError(f"hires scales must be numbers in [1, 8], got {text!r}")
    return scales


def _batch_sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(p) for p in text.split(",") if p.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid batch sizes {text!r} (expected e.g. 1,2)") from None
    if not sizes or any(s < 1 for s in sizes):
        raise argparse.ArgumentTypeError(f"invalid batch sizes {text!r} (positive integers, e.g. 1,2)")
    return sizes


def add_build_options(p: argparse.ArgumentParser) -> None:
    prec = p.add_mutually_exclusive_group()
    prec.add_argument("--fp16", dest="precision", action="store_const", const="fp16", default="fp32",
                      help="fp16 engines (TensorRT; the ONNX Runtime CPU twin stays fp32 and records it)")
    prec.add_argument("--bf16", dest="precision", action="store_const", const="bf16", help="bf16 engines")
    prec.add_argument("--precision", dest="precision", choices=("fp32", "fp16", "bf16", "int8"),
                      default=argparse.SUPPRESS,
                      help="the same as --fp16/--bf16, or fp32 (the default), or int8: CPU only, OpenVINO + NNCF "
                           "(UNets hybrid int8 calibrated on the pipeline's own inputs, text encoders int8 weights; "
                           "opt-in at run time with --backend openvino)")
    p.add_argument("--calibration-samples", type=int, default=DEFAULT_CALIBRATION_SAMPLES, metavar="N",
                   help=f"--precision int8: UNet calls recorded for calibration (default {DEFAULT_CALIBRATION_SAMPLES}; "
                        "every 5th is held out for the build's int8 check)")
    p.add_argument("--vae-precision", choices=("fp32", "fp16", "bf16"), default="fp32",
                   help="precision of the VAE engines (default fp32/TF32: SDXL's VAE overflows in fp16)")
    add_source_options(p)
    p.add_argument("--out", type=Path, default=DEFAULT_ARTIFACTS, metavar="DIR",
                   help=f"artifact folder (default {DEFAULT_ARTIFACTS})")
    p.add_argument("--buckets", default="all", metavar="all|HxW,...",
                   help="aspect buckets to serve (default: all 40, scaled to the model's native size)")
    p.add_argument("--hires-scale", dest="hires_scales", type=_hires_scales, default=(), metavar="S[,S]",
                   help="hires fix: also serve each bucket scaled by S (e.g. 1.5,2), the second pass's size")
    p.add_argument("--batch-sizes", type=_batch_sizes, default=(1,), metavar="N,N",
                   help="prompt batch sizes (the UNet runs 2x under classifier-free guidance; default 1)")
    p.add_argument("--profiles", choices=MODES, default=DEFAULT_MODE, help=f"profile mode (default {DEFAULT_MODE})")
    p.add_argument("--backend", choices=("auto", "tensorrt", "onnxruntime", "openvino"), default="auto",
                   help="auto: TensorRT where usable, else the ONNX Runtime twin; openvino: OpenVINO CPU "
                        "engines beside those (bf16 with --fp16/--bf16 where the CPU has it)")
    p.add_argument("--timing-cache", type=Path, default=None, metavar="FILE", help="TensorRT timing cache to load/save")
    p.add_argument("--workspace", dest="workspace_gb", type=float, default=None, metavar="GB",
                   help="TensorRT workspace memory limit")
    p.add_argument("--builder-optimization-level", type=int, default=DEFAULT_OPT_LEVEL,
                   choices=range(MAX_OPT_LEVEL + 1), metavar="0-5", help="TensorRT builder optimization level")
    p.add_argument("--hardware-compatibility", choices=tuple(HARDWARE_COMPAT), default="none",
                   help="TensorRT hardware compatibility level")
    p.add_argument("--refittable", action="store_true",
                   help="TensorRT: refittable plans (switch LoRAs at run time without a rebuild; "
                        "the ONNX Runtime twin records it)")
    p.add_argument("--version-compatible", action="store_true", help="TensorRT: version-compatible plans (run on this or any later TensorRT)")
    p.add_argument("--ort-optimization", choices=ort_builder.LEVELS, default=ort_builder.DEFAULT_LEVEL,
                   help="ONNX Runtime twin: offline graph optimization level (default extended)")


def options_from_args(args: argparse.Namespace) -> Any:
    from .build import BuildOptions

    return BuildOptions(
        model=args.model, refiner=None if args.no_refiner else args.refiner, with_refiner=not args.no_refiner,
        vae=args.vae, unet=getattr(args, "unet", None), default_steps=getattr(args, "default_steps", None),
        default_guidance=getattr(args, "default_guidance", None),
        default_scheduler=getattr(args, "default_scheduler", None),
        prediction_type=getattr(args, "prediction_type", None), native_size=getattr(args, "native_size", None),
        out=args.out, precision=args.precision, vae_precision=args.vae_precision, buckets=args.buckets,
        batch_sizes=tuple(args.batch_sizes), profiles=args.profiles, backend=args.backend,
        hires_scales=tuple(getattr(args, "hires_scales", ())),
        timing_cache=args.timing_cache, workspace_gb=args.workspace_gb,
        builder_optimization_level=args.builder_optimization_level,
        hardware_compatibility=args.hardware_compatibility, version_compatible=args.version_compatible,
        refittable=getattr(args, "refittable", False), loras=tuple(getattr(args, "loras", ())),
        controlnets=tuple(getattr(args, "controlnets", ())),
        ort_optimization=args.ort_optimization, opset=getattr(args, "opset", 17),
        validate=not getattr(args, "no_validate", False),
        calibration_samples=getattr(args, "calibration_samples", DEFAULT_CALIBRATION_SAMPLES),
    )


# ---- commands ---------------------------------------------------------------------------------------
def cmd_build(args: argparse.Namespace) -> int:
    from ..progress_bars import component_bar
    from .build import build

    progress, close = component_bar("build")  # drawn only when stderr is a terminal
    try:
        opts = options_from_args(args)
        # int8 calibrates on the runtime's own UNet inputs; the CLI layer above hands the build that
        # (sdxl_export/cli.py), since the engines layer never runs the sampling loop.
        factory = getattr(args, "calibration_factory", None)
        calibration = factory() if factory is not None and opts.precision == "int8" else None
        report = build(opts, progress, calibration=calibration)
    finally:
        close()
    for rep in (report, report.companion):
        if rep is None:
            continue
        print(f"engines: {rep.out / 'engines'} ({rep.backend}; {rep.backend_note})")
        entries = rep.manifest.get("engines", {})
        if rep.backend == "openvino":
            entries = (rep.manifest.get("openvino") or {}).get("engines", {})
        for r in rep.results:
            e = entries.get(r.component, {})
            prec = e.get("precision", "-")
            if e and e.get("precision_requested") != prec:
                prec = f"{prec} (requested {e.get('precision_requested')})"
            n = len(e.get("profiles", []))
            print(f"  {r.component:<15} {r.action:<10} {prec:<24} {n:>3} profile(s)  {r.reason}")
    if report.up_to_date and (report.companion is None or report.companion.up_to_date):
        print("all engines up to date: nothing rebuilt")
    return 0


def _plan_text(plan: Plan, source: str) -> str:
    head = (f"plan: {plan.mode} profiles, {len(plan.buckets)} buckets at native {plan.native_size}px, "
            f"prompt batch sizes {list(plan.batch_sizes)} (specs from {source})")
    lines = [head]
    for name, c in plan.components.items():
        lines.append(f"{name}: {len(c.profiles)} profile(s), batch {list(c.batch_sizes)}")
        for i, p in enumerate(c.profiles):
            served = "all buckets" if not c.spatial else ", ".join(str(b) for b in p.buckets)
            opt = f" opt {p.opt_bucket}" if p.opt_bucket else ""
            lines.append(f"  [{i}]{opt} serves {served}")
            for inp, (lo, o, hi) in p.shapes.items():
                if lo != hi:
                    lines.append(f"      {inp}: min {list(lo)} opt {list(o)} max {list(hi)}")
    return "\n".join(lines)


def cmd_plan(args: argparse.Namespace) -> int:
    from ..buckets import parse_bucket_list, with_hires_targets
    from .planner import plan_profiles
    from .sources import specs_for_plan

    opts = options_from_args(args)
    specs, native, source = specs_for_plan(opts.model, opts.refiner, opts.with_refiner, opts.out)
    if opts.native_size:  # --native-size: the size the export will record (SDXL-Turbo from a single file)
        native = opts.native_size
    plan = plan_profiles(specs, native=native,
                         buckets=with_hires_targets(parse_bucket_list(opts.buckets, native), opts.hires_scales),
                         batch_sizes=opts.batch_sizes, mode=opts.profiles)
    if args.json:
        json.dump({"source": source, **plan.to_dict()}, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(_plan_text(plan, source))
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from .store import load_engine_store

    store = load_engine_store(args.out)
    if store is None:
        raise ArtifactError(f"{args.out} has no engines/ folder", f"run `sdxl-export build --out {args.out}`")
    if not store.entries and not store.openvino_entries:
        raise ArtifactError(f"{args.out}/engines holds no engine", f"run `{store.build_command}`")
    for name in store.entries:
        e = store.verify(name)
        print(f"{name:<15} ok  {e.backend:<11} {e.precision:<5} {len(e.profiles):>3} profile(s)  {e.path}")
    for name in store.openvino_entries:
        e = store.verify(name, backend="openvino")
        print(f"{name:<15} ok  {e.backend:<11} {e.precision:<5} {len(e.profiles):>3} profile(s)  {e.path}")
    return 0


def register(subparsers: Any) -> None:
    b = subparsers.add_parser("build", help="export (if needed) and build an engine for every component",
                              description="Export (if not up to date) and build one engine per component: "
                              "TensorRT where usable, else the ONNX Runtime CPU twin. Incremental.")
    add_build_options(b)
    b.add_argument("--opset", type=int, default=17, help="ONNX opset for the export (default 17)")
    b.add_argument("--no-validate", action="store_true",
                   help="skip the build-time accuracy checks (each TensorRT profile, or the ONNX Runtime twin, "
                   "against the ONNX)")
    b.set_defaults(func=cmd_build)

    p = subparsers.add_parser("plan", help="print the optimization profiles a build would use",
                              description="Print, per component, the optimization profiles (input -> min/opt/max) "
                              "and the buckets each serves. Reads no weights.")
    add_build_options(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_plan)

    v = subparsers.add_parser("verify-engines", help="check the built engines can be loaded on this machine",
                              description="Check every engine against its manifest, the export and this machine "
                              "(TensorRT version, GPU, ONNX Runtime) without loading it.")
    v.add_argument("--out", type=Path, default=DEFAULT_ARTIFACTS, metavar="DIR", help="artifact folder")
    v.set_defaults(func=cmd_verify)


__all__ = ["InvalidRequestError", "add_build_options", "options_from_args", "register"]
