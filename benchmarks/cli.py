"""``sdxl-export bench``: end-to-end latency of our runtime vs diffusers, interleaved.

Prints a markdown table on stdout; ``--json FILE`` writes the full record and ``--plot
FILE.png`` a latency chart per bucket and backend. ``--suite NAME`` starts from a named
suite's settings (:mod:`.suites`); every option given explicitly overrides it.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..artifacts import DEFAULT_ARTIFACTS
from ..errors import InvalidRequestError
from ..runtime.backends.registry import backend_help

log = logging.getLogger(__name__)


def register(subparsers: Any) -> None:
    from .suites import SUITES

    p = subparsers.add_parser(
        "bench", help="benchmark latency per stage and end to end, vs diffusers on the same weights",
        description="Benchmark base+refiner sampling: per stage, end to end (p50/p90/p99), images/s, peak "
        "memory, runtime overhead; diffusers' own pipelines on the same weights run interleaved as the "
        "baseline. Prints a markdown table.",
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument("--artifacts", type=Path, default=None, metavar="DIR",
                     help=f"an existing export/build (default {DEFAULT_ARTIFACTS} unless --model or --suite)")
    src.add_argument("--model", default=None, metavar="SRC",
                     help="export (and build) this model first: preset name, diffusers folder, single-file "
                     ".safetensors checkpoint or hub id")
    p.add_argument("--refiner", default=None, metavar="SRC", help="refiner source for --model (default: same)")
    p.add_argument("--vae", default=None, metavar="DIR|FILE", help="a VAE replacing the model's, for --model")
    p.add_argument("--work-dir", type=Path, default=None, metavar="DIR",
                   help="where --model is exported and built (default: a new temporary folder)")
    p.add_argument("--no-build", action="store_true", help="with --model: export only, no engines")
    p.add_argument("--suite", choices=sorted([*SUITES, "serve"]), default=None,
                   help="start from a named suite's settings (options given here override it); serve: the "
                   "serving benchmark (closed-loop HTTP load vs diffusers behind a lock)")
    p.add_argument("--serve", action="store_true", help="the serving benchmark (the same as --suite serve)")
    p.add_argument("--concurrency", default=None, metavar="N,N",
                   help="serving benchmark: concurrent clients per level (default 1,2,4,8)")
    p.add_argument("--requests", type=int, default=None, metavar="N",
                   help="serving benchmark: answers per side and level (default 16)")
    p.add_argument("--backend", default=None, metavar="NAME[,NAME]",
                   help="backend(s) to measure, comma-separated: " + backend_help())
    p.add_argument("--device", default=None, help="device for our backends: auto, cpu, cuda (default auto)")
    p.add_argument("--session-option", action="append", default=[], metavar="KEY=VALUE",
                   help="ONNX Runtime session option for onnxruntime backends (repeatable), e.g. "
                   "intra_op_num_threads=2 or session.intra_op.allow_spinning=1")
    p.add_argument("--buckets", default=None, metavar="LIST",
                   help="native (the model's square size, default), all, or HxW,HxW (SDXL buckets)")
    p.add_argument("--batch-sizes", default=None, metavar="N[,N]", help="prompt batch sizes (default 1)")
    p.add_argument("--steps", type=int, default=None, help="inference steps (default 20)")
    p.add_argument("--runs", type=int, default=None, help="measured runs per side and case (default 5)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up runs per side and case (default 1)")
    p.add_argument("--baseline", choices=("diffusers", "none"), default=None,
                   help="diffusers: its own pipelines on the same weights, interleaved (default); none")
    p.add_argument("--baseline-device", default=None, help="device of the diffusers baseline (default auto)")
    p.add_argument("--baseline-bf16", action="store_true",
                   help="also run diffusers' pipelines in torch.bfloat16 (side diffusers-bf16), interleaved, and "
                   "gate reduced-precision variants' images against it (PSNR vs diffusers fp32)")
    p.add_argument("--torch-threads", type=int, default=None, metavar="N",
                   help="torch intra-op threads during the benchmark (default: torch's, one per core)")
    p.add_argument("--guidance", type=float, default=None, help="guidance scale (default 5.0)")
    p.add_argument("--denoising-end", type=float, default=None, metavar="F", help="base/refiner split (0.8)")
    p.add_argument("--no-refiner", action="store_true", help="base only")
    p.add_argument("--scheduler", default=None, help="sampler (default euler)")
    p.add_argument("--prompt", default=None, help="the prompt")
    p.add_argument("--seed", type=int, default=None, help="seed (default 0)")
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]",
                   help="also measure switching to this LoRA set at run time (repeatable): switch ms, UNet step "
                   "with and without it, next to the fused rebuild time")
    p.add_argument("--fewstep", action="store_true",
                   help="few-step vs default: a 4-step guidance-free request (SDXL-Lightning's settings, "
                   "euler_trailing) and the 30-step guidance-5 default, ours vs diffusers, base only")
    p.add_argument("--workflows", action="store_true",
                   help="also measure an inpainting and a hires-fix request, ours vs diffusers' same composition")
    p.add_argument("--json", type=Path, default=None, metavar="FILE", help="write the full result as JSON")
    p.add_argument("--controlnet", nargs="?", const="", default=None, metavar="NAME",
                   help="with --artifacts: a base step with and without this ControlNet (default the first "
                   "built), ours vs diffusers, plus what the ControlNet adds to the build (benchmarks/controlnet_bench.py)")
    p.add_argument("--plot", type=Path, default=None, metavar="FILE.png", help="write a latency plot (PNG)")
    p.set_defaults(func=cmd_bench)


def parse_int_list(text: str, what: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise InvalidRequestError(f"cannot parse {what} {text!r}", f"write {what} as N or N,N,...") from None
    if not values:
        raise InvalidRequestError(f"empty {what}", f"write {what} as N or N,N,...")
    return values


def parse_option(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise InvalidRequestError(f"cannot parse session option {text!r}", "write it as KEY=VALUE")
    v: Any = value.strip()
    if v.lstrip("-").isdigit():
        v = int(v)
    elif v.lower() in ("true", "false"):
        v = v.lower() == "true"
    return key.strip(), v


def config_from_args(args: argparse.Namespace) -> Any:
    from .bench import BenchConfig, Variant
    from .suites import SUITES

    cfg = SUITES[args.suite].config() if args.suite else BenchConfig()
    if args.model is not None:
        cfg = replace(cfg, model=args.model, artifacts=None)
    elif args.artifacts is not None:
        cfg = replace(cfg, artifacts=args.artifacts, model=None)
    elif cfg.model is None and cfg.artifacts is None:
        cfg = replace(cfg, artifacts=DEFAULT_ARTIFACTS)
    simple = {"refiner_source": args.refiner, "vae_source": args.vae, "work_dir": args.work_dir, "buckets": args.buckets,
              "steps": args.steps, "runs": args.runs, "warmup": args.warmup, "baseline": args.baseline,
              "baseline_device": args.baseline_device, "torch_threads": args.torch_threads, "guidance_scale": args.guidance,
              "denoising_end": args.denoising_end, "scheduler": args.scheduler, "prompt": args.prompt,
              "seed": args.seed}
    cfg = replace(cfg, **{k: v for k, v in simple.items() if v is not None})
    if args.no_build:
        cfg = replace(cfg, build=False)
    if args.baseline_bf16:
        cfg = replace(cfg, baseline_bf16=True)
    if args.baseline == "none":
        cfg = replace(cfg, baseline_bf16=False)
    if args.no_refiner:
        cfg = replace(cfg, use_refiner=False)
    if getattr(args, "workflows", False):
        cfg = replace(cfg, workflows=True)
    if args.batch_sizes is not None:
        cfg = replace(cfg, batch_sizes=parse_int_list(args.batch_sizes, "batch sizes"))
    if args.lora:
        from ..lora.files import parse_lora_arg

        cfg = replace(cfg, loras=tuple(parse_lora_arg(x) for x in args.lora))
    session = dict(parse_option(o) for o in args.session_option)
    if args.backend is not None:
        names = [b.strip() for b in args.backend.split(",") if b.strip()]
        if not names:
            raise InvalidRequestError("empty --backend", "pass e.g. --backend onnxruntime")
        cfg = replace(cfg, variants=[Variant(n, backend=n) for n in names])
    variants = []
    for v in cfg.variants:
        device = args.device or v.device
        options = dict(v.options)
        if session and v.backend in ("onnxruntime", "auto"):
            options["session_options"] = {**options.get("session_options", {}), **session}
        variants.append(replace(v, device=device, options=options))
    return replace(cfg, variants=variants)


def serve_config_from_args(args: argparse.Namespace) -> Any:
    from .serve_bench import ServeBenchConfig

    cfg = ServeBenchConfig()
    if args.artifacts is not None:
        cfg = replace(cfg, artifacts=args.artifacts, model=None)
    elif args.model is not None:
        cfg = replace(cfg, model=args.model)
    simple = {"work_dir": args.work_dir, "steps": args.steps, "requests": args.requests, "seed": args.seed}
    cfg = replace(cfg, **{k: v for k, v in simple.items() if v is not None})
    if args.batch_sizes is not None:
        cfg = replace(cfg, batch_sizes=parse_int_list(args.batch_sizes, "batch sizes"))
    if args.concurrency is not None:
        cfg = replace(cfg, concurrency=parse_int_list(args.concurrency, "concurrency levels"))
    if args.baseline == "none":
        cfg = replace(cfg, baseline=False)
    if cfg.requests < 1 or any(c < 1 for c in cfg.concurrency):
        raise InvalidRequestError("--requests and --concurrency must be >= 1", "pass positive numbers")
    return cfg


def cmd_serve_bench(args: argparse.Namespace) -> int:
    from .report import write_json
    from .serve_bench import markdown_table, plot, run_serve_bench

    result = run_serve_bench(serve_config_from_args(args))
    if args.json is not None:
        write_json(result, args.json)
    if args.plot is not None:
        plot(result, args.plot)
    print(markdown_table(result))
    for path in (args.json, args.plot):
        if path is not None:
            print(f"wrote {path}")
    return 0


def _fewstep(cfg: Any, args: argparse.Namespace) -> int:
    from dataclasses import replace

    from .fewstep_bench import fewstep_table, run_fewstep_bench
    from .report import write_json

    # one backend: the first variant (a suite may list several; this compares settings, not backends)
    result = run_fewstep_bench(replace(cfg, variants=cfg.variants[:1], baseline_bf16=False))
    if args.json is not None:
        write_json(result, args.json)
    print(fewstep_table(result))
    if args.json is not None:
        print(f"\nwrote {args.json}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    if args.serve or args.suite == "serve":
        return cmd_serve_bench(args)
    if getattr(args, "controlnet", None) is not None:
        from .controlnet_bench import cmd

        return cmd(args)
    from .bench import run_bench
    from .report import markdown_table, plot, write_json

    cfg = config_from_args(args)
    if args.suite:
        from .suites import SUITES

        SUITES[args.suite].check_machine()
    if args.fewstep:
        return _fewstep(cfg, args)
    result = run_bench(cfg)
    if args.json is not None:
        write_json(result, args.json)
    if args.plot is not None:
        plot(result, args.plot)
    print(markdown_table(result))
    if "workflows" in result:
        from .workflow_bench import markdown as workflows_markdown

        print(workflows_markdown(result["workflows"]))
    if args.json is not None:
        print(f"\nwrote {args.json}")
    if args.plot is not None:
        print(f"wrote {args.plot}")
    return 0
