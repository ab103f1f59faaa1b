"""One-shot check of the GPU backends against the CPU reference, with latencies.

Run on a machine with a CUDA GPU (from the repository root, or anywhere once
``sdxl_export`` is installed)::

    python benchmarks/gpu_check.py                      # exports the tiny preset to a temp folder
    python benchmarks/gpu_check.py --artifacts DIR --runs 10 --steps 20 --json out.json

What it does, each section guarded so that one failure or missing library prints a
``SKIP: reason`` / ``FAIL: reason`` line and the rest still runs:

1. export the tiny model (or use ``--artifacts``);
2. the CPU reference image: the ONNX Runtime CPU runtime (else the torch CPU backend);
3. the PyTorch CUDA backend, fp32 and fp16, each without and with CUDA graphs:
   images vs the reference (max abs difference, images in [0, 1]), graph replay vs
   eager, run-to-run determinism, median latency of ``--runs`` calls and median
   per-step UNet time;
4. TensorRT where it is usable (:mod:`sdxl_export.tensorrt_env`): build fp16 engines for
   the checked size, then run them eagerly (``cuda_graphs=False``) and with CUDA graphs,
   each row labelled with what it measured;
5. with ``--sdxl``: the full-size ``sdxl`` preset (random weights) at 1024x1024, 30 steps,
   base + refiner, on the PyTorch CUDA backend (fp16, CUDA graphs) against diffusers' own
   fp16 pipelines on the same GPU in the same run (latency, speedup, pixel difference);
6. a summary table; the exit status is 1 if any check failed, else 0.

fp32 configs run with TF32 off (``--tf32`` turns it on), so that they can be held to a
tight bound; TF32 and fp16 are speed settings and get looser bounds.

On a machine without a CUDA GPU it prints ``no CUDA GPU: nothing to check`` and exits 0.
Needs nothing beyond what sdxl_export itself imports (torch; diffusers and transformers
for export and the pipeline; onnxruntime for the CPU reference).
"""

from __future__ import annotations

import argparse
import inspect
import json
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PROMPT = "a photograph of an astronaut riding a horse"


@dataclass
class Result:
    config: str
    status: str  # PASS | FAIL | SKIP
    reason: str = ""
    max_abs_diff: float | None = None
    median_ms: float | None = None
    unet_step_ms: float | None = None
    refiner_step_ms: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class Report:
    """Collects results and prints each line as it happens (a script: print is its output)."""

    def __init__(self) -> None:
        self.results: list[Result] = []

    def add(self, r: Result) -> Result:
        self.results.append(r)
        line = f"{r.status}: {r.config}"
        if r.reason:
            line += f": {r.reason}"
        print(line, flush=True)
        return r

    def note(self, text: str) -> None:
        print(f"  {text}", flush=True)

    @property
    def failed(self) -> bool:
        return any(r.status == "FAIL" for r in self.results)

    def table(self) -> str:
        rows = [("config", "status", "max|d| vs ref", "median ms", "unet ms/step", "refiner ms/step")]
        for r in self.results:
            rows.append((r.config, r.status, _fmt(r.max_abs_diff, "{:.2e}"), _fmt(r.median_ms, "{:.1f}"),
                         _fmt(r.unet_step_ms, "{:.2f}"), _fmt(r.refiner_step_ms, "{:.2f}")))
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows)


def _fmt(x: float | None, pattern: str) -> str:
    return "-" if x is None else pattern.format(x)


def _reason(exc: BaseException) -> str:
    hint = getattr(exc, "hint", None)
    text = f"{type(exc).__name__}: {exc}".strip()
    if hint and hint not in text:
        text += f" (fix: {hint})"
    return text.splitlines()[0][:400] if text else type(exc).__name__


def ensure_importable() -> None:
    """Make ``import sdxl_export`` work when the repository is copied but not installed."""
    try:
        import sdxl_export
        return
    except ImportError:
        pass
    repo = Path(__file__).resolve().parents[1]
    shim = Path(tempfile.mkdtemp(prefix="sdxl-export-path-"))
    (shim / "sdxl_export").symlink_to(repo, target_is_directory=True)
    sys.path.insert(0, str(shim))
    import sdxl_export  # noqa: F401


# ---- pipeline helpers -----------------------------------------------------------------------------
def open_pipeline(artifacts: Path, backend: str, device: str, options: dict[str, Any], report: Report) -> Any:
    """``SDXLPipeline.from_artifacts`` with backend options, assembling runners itself if the
    pipeline does not take ``backend_options`` yet."""
    from sdxl_export.runtime.pipeline import SDXLPipeline

    params = inspect.signature(SDXLPipeline.from_artifacts).parameters
    if "backend_options" in params:
        return SDXLPipeline.from_artifacts(artifacts, backend=backend, device=device, backend_options=options)
    if not options:
        return SDXLPipeline.from_artifacts(artifacts, backend=backend, device=device)
    report.note("NOTE: SDXLPipeline.from_artifacts takes no backend_options: assembling the runners here")
    from sdxl_export.runtime.artifact_reader import REQUIRED_COMPONENTS, read_artifacts
    from sdxl_export.runtime.backends import ComponentContext, create_runner
    from sdxl_export.runtime.prompts import PromptEncoder

    arts = read_artifacts(artifacts)
    names = list(REQUIRED_COMPONENTS) + (["refiner_unet"] if arts.has_refiner else [])
    runners: dict[str, Any] = {}
    try:
        for name in names:
            ctx = ComponentContext(artifacts=arts.root, name=name, spec=arts.specs[name],
                                   export_entry=arts.component(name), device=device, options=dict(options))
            runners[name] = create_runner(backend, ctx).open()
        encoder = PromptEncoder(arts.tokenizer("tokenizer"), arts.tokenizer("tokenizer_2"),
                                runners["text_encoder"], runners["text_encoder_2"])
        return SDXLPipeline(arts, backend, device, runners, encoder)
    except BaseException:
        for r in runners.values():
            r.close()
        raise


def generate(pipe: Any, args: argparse.Namespace) -> Any:
    return pipe(PROMPT, height=args.height, width=args.width, num_inference_steps=args.steps,
                seed=args.seed, output_type="np")


def graph_stats(pipe: Any) -> dict[str, dict[str, int]]:
    """Per component CUDA-graph counters, for runners that report them (``description["graphs"]``)."""
    comps = pipe.description.get("components", {})
    return {n: dict(d["graphs"]) for n, d in comps.items() if isinstance(d.get("graphs"), dict)}


def measure(pipe: Any, args: argparse.Namespace) -> tuple[Any, dict[str, Any], list[Any]]:
    """Warm up (captures graphs), then ``args.runs`` timed calls; return images, latencies, images per run."""
    import torch

    for _ in range(args.warmup):
        generate(pipe, args)
    graphs_after_warmup = graph_stats(pipe)
    totals, unet, refiner, images = [], [], [], []
    for _ in range(args.runs):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = generate(pipe, args)
        torch.cuda.synchronize()
        totals.append(time.perf_counter() - t0)
        unet += out.timings.stages.get("unet", [])
        refiner += out.timings.stages.get("refiner_unet", [])
        images.append(out.images)
    lat = {"median_ms": 1e3 * statistics.median(totals),
           "unet_step_ms": 1e3 * statistics.median(unet) if unet else None,
           "refiner_step_ms": 1e3 * statistics.median(refiner) if refiner else None,
           "graphs_after_warmup": graphs_after_warmup, "graphs": graph_stats(pipe)}
    return images[-1], lat, images


def max_abs(a: Any, b: Any) -> float:
    import numpy as np

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"image shapes differ: {a.shape} vs {b.shape}")
    return float(np.abs(a - b).max())


# ---- sections ---------------------------------------------------------------------------------------
def section_environment(report: Report) -> None:
    import torch

    print(f"torch {torch.__version__} (CUDA {torch.version.cuda}) on {torch.cuda.get_device_name(0)}")
    for mod in ("diffusers", "transformers", "onnx", "onnxruntime"):
        try:
            version = getattr(__import__(mod), "__version__", "?")
        except Exception as exc:  # noqa: BLE001 - any import failure is just "not here"
            version = f"not importable ({type(exc).__name__})"
        print(f"{mod} {version}")
    print(f"tensorrt {tensorrt_version() or 'not installed'}")


def section_artifacts(args: argparse.Namespace, report: Report) -> Path | None:
    if args.artifacts:
        path = Path(args.artifacts)
        if not (path / "manifest.json").is_file():
            report.add(Result("artifacts", "FAIL", f"{path} has no manifest.json: not an export folder"))
            return None
        report.add(Result("artifacts", "PASS", f"using {path}"))
        return path
    try:
        from sdxl_export.export import export_model

        out = Path(tempfile.mkdtemp(prefix="sdxl-gpu-check-")) / "artifacts"
        t0 = time.perf_counter()
        export_model("tiny", out)
        report.add(Result("export tiny", "PASS", f"{out} in {time.perf_counter() - t0:.1f}s"))
        return out
    except Exception as exc:  # noqa: BLE001 - reported, and nothing else can run
        report.add(Result("export tiny", "FAIL", _reason(exc)))
        traceback.print_exc()
        return None


def section_reference(artifacts: Path, args: argparse.Namespace, report: Report) -> Any | None:
    for backend in ("onnxruntime", "torch"):
        try:
            t0 = time.perf_counter()
            with open_pipeline(artifacts, backend, "cpu", {}, report) as pipe:
                images = generate(pipe, args).images
            report.add(Result(f"reference ({backend}, cpu)", "PASS",
                              f"{args.height}x{args.width}, {args.steps} steps, open + run "
                              f"{time.perf_counter() - t0:.1f}s"))
            return images
        except Exception as exc:  # noqa: BLE001 - try the next reference
            report.add(Result(f"reference ({backend}, cpu)", "SKIP", _reason(exc)))
    report.add(Result("reference", "FAIL", "no CPU reference could be computed"))
    return None


def run_config(label: str, artifacts: Path, backend: str, options: dict[str, Any], tol: float,
               ref: Any, args: argparse.Namespace, report: Report) -> tuple[Result, Any | None]:
    """Open, warm up, time, compare one backend configuration."""
    import torch

    fp32 = options.get("dtype", "float32") == "float32" and backend == "torch"
    old_tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    if fp32 and not args.tf32:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        with open_pipeline(artifacts, backend, "cuda", options, report) as pipe:
            image, lat, per_run = measure(pipe, args)
        diff = max_abs(image, ref) if ref is not None else float("nan")  # None: no CPU reference (full size)
        jitter = max(max_abs(im, per_run[0]) for im in per_run)
        graphs, warm = lat["graphs"], lat["graphs_after_warmup"]
        problems = []
        if ref is not None and not diff <= tol:  # also catches NaN
            problems.append(f"max |image - reference| {diff:.3e} > {tol:g}")
        if not jitter <= 1e-6:
            problems.append(f"runs with one seed differ by {jitter:.3e}")
        if options.get("cuda_graphs"):
            # Every graph is captured during warm-up; timed runs only replay.
            if not graphs or any(g["captures"] < 1 for g in graphs.values()):
                problems.append(f"CUDA graphs on but nothing captured: {graphs}")
            recaptured = {n: g["captures"] - warm.get(n, {}).get("captures", 0) for n, g in graphs.items()}
            if any(recaptured.values()):
                problems.append(f"graphs were captured again after warm-up: {recaptured}")
            if any(g["replays"] <= warm.get(n, {}).get("replays", 0) for n, g in graphs.items()):
                problems.append(f"timed runs did not replay graphs: {graphs}")
        result = Result(label, "FAIL" if problems else "PASS", "; ".join(problems), diff, lat["median_ms"],
                        lat["unet_step_ms"], lat["refiner_step_ms"], {"graphs": graphs, "run_jitter": jitter})
        return report.add(result), image
    except Exception as exc:  # noqa: BLE001 - reported as this config's failure
        traceback.print_exc()
        return report.add(Result(label, "FAIL", _reason(exc))), None
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old_tf32
        torch.cuda.empty_cache()


def section_torch(artifacts: Path, ref: Any, args: argparse.Namespace, report: Report) -> None:
    dtypes = [("fp32", "float32", args.fp32_tol), ("fp16", "float16", args.fp16_tol)]
    if args.bf16:
        dtypes.append(("bf16", "bfloat16", args.bf16_tol))
    for short, dtype, tol in dtypes:
        _, eager = run_config(f"torch cuda {short}", artifacts, "torch", {"dtype": dtype}, tol, ref, args, report)
        _, graphed = run_config(f"torch cuda {short} + cuda graphs", artifacts, "torch",
                                {"dtype": dtype, "cuda_graphs": True}, tol, ref, args, report)
        if eager is not None and graphed is not None:
            d = max_abs(eager, graphed)
            bound = 1e-4 if dtype == "float32" else 1e-2
            report.add(Result(f"torch cuda {short}: graphs vs eager", "PASS" if d <= bound else "FAIL",
                              f"max |d| {d:.2e} (bound {bound:g})", d))


def tensorrt_version() -> str | None:
    """The usable TensorRT's version (the package's one availability check), else None."""
    from sdxl_export.tensorrt_env import trt_version

    return trt_version()


def section_tensorrt(artifacts: Path, ref: Any, args: argparse.Namespace, report: Report) -> None:
    from sdxl_export.tensorrt_env import trt_status

    ok, why = trt_status()
    if not ok:
        report.add(Result("tensorrt", "SKIP", why))
        return
    try:
        from sdxl_export.engines.build import BuildOptions, build

        source = json.loads((artifacts / "manifest.json").read_text()).get("source", {})
        model = source.get("id") if source.get("kind") == "preset" else args.model
        if not model:
            report.add(Result("tensorrt build", "SKIP", "artifacts are not from a preset: pass --model SOURCE"))
            return
        t0 = time.perf_counter()
        build(BuildOptions(model=model, out=artifacts, backend="tensorrt", precision="fp16",
                           buckets=f"{args.height}x{args.width}"))
        report.add(Result("tensorrt build", "PASS", f"fp16 engines for {args.height}x{args.width} "
                                                    f"in {time.perf_counter() - t0:.1f}s"))
    except Exception as exc:  # noqa: BLE001
        traceback.print_exc()
        report.add(Result("tensorrt build", "FAIL", _reason(exc)))
        return
    _, eager = run_config("tensorrt fp16 eager", artifacts, "tensorrt", {"cuda_graphs": False}, args.fp16_tol,
                          ref, args, report)
    _, graphed = run_config("tensorrt fp16 + cuda graphs", artifacts, "tensorrt", {"cuda_graphs": True},
                            args.fp16_tol, ref, args, report)
    if eager is not None and graphed is not None:
        d = max_abs(eager, graphed)
        report.add(Result("tensorrt fp16: graphs vs eager", "PASS" if d <= 1e-6 else "FAIL",
                          f"max |d| {d:.2e} (a replayed graph runs the same kernels)", d))


def section_sdxl(args: argparse.Namespace, report: Report) -> None:
    """Full-size SDXL (random weights): our torch CUDA fp16 + graphs vs diffusers fp16, same GPU, same run."""
    import torch
    from sdxl_export.benchmarks.baseline import DiffusersBaseline, load_reference_model
    from sdxl_export.export import export_model

    run = argparse.Namespace(**{**vars(args), "height": 1024, "width": 1024, "steps": args.sdxl_steps})
    out = Path(args.sdxl_artifacts) if args.sdxl_artifacts else Path(tempfile.mkdtemp(prefix="sdxl-full-")) / "a"
    t0 = time.perf_counter()
    export_model("sdxl", out)
    report.add(Result("export sdxl (full size)", "PASS", f"{out} in {time.perf_counter() - t0:.1f}s"))
    ours, ours_image = run_config("sdxl 1024 torch cuda fp16 + cuda graphs", out, "torch",
                                  {"dtype": "float16", "cuda_graphs": True}, float("inf"), None, run, report)
    torch.cuda.empty_cache()
    baseline = DiffusersBaseline(load_reference_model(out))
    for pipe in (baseline.base, baseline.refiner):
        if pipe is not None:
            pipe.to("cuda", torch.float16)
    call: dict[str, Any] = {"height": 1024, "width": 1024, "steps": run.steps, "guidance_scale": 5.0,
                            "denoising_end": 0.8, "refiner": baseline.has_refiner, "seed": run.seed}
    for _ in range(run.warmup):
        baseline([PROMPT], **call)
    totals, image = [], None
    for _ in range(run.runs):
        torch.cuda.synchronize()
        t1 = time.perf_counter()
        image = baseline([PROMPT], **call).images
        torch.cuda.synchronize()
        totals.append(time.perf_counter() - t1)
    base_ms = 1e3 * statistics.median(totals)
    diff = max_abs(ours_image, image) if ours_image is not None and image is not None else None
    report.add(Result("sdxl 1024 diffusers fp16 (same GPU)", "PASS", f"{run.steps} steps, base + refiner",
                      diff, base_ms))
    if ours.median_ms:
        report.note(f"speedup vs diffusers fp16: {base_ms / ours.median_ms:.2f}x; "
                    f"max pixel diff {_fmt(diff, '{:.3e}')}")


# ---- main --------------------------------------------------------------------------------------------
def guarded(report: Report, name: str, section: Any, *args: Any) -> Any:
    """Run one section; an unexpected error becomes a FAIL line and the next section still runs."""
    try:
        return section(*args)
    except Exception as exc:  # noqa: BLE001 - a bug in one section must not hide the others
        traceback.print_exc()
        report.add(Result(f"{name} section", "FAIL", f"unexpected {_reason(exc)}"))
        return None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--artifacts", help="an export folder (default: export the tiny preset to a temp folder)")
    p.add_argument("--model", help="model source for the TensorRT build when --artifacts is not from a preset")
    p.add_argument("--height", type=int, default=192, help="image height (default 192: a non-square tiny bucket)")
    p.add_argument("--width", type=int, default=320)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--runs", type=int, default=5, help="timed runs per config (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs first (CUDA graphs are captured here)")
    p.add_argument("--fp32-tol", type=float, default=2e-3, help="max |image diff| for fp32 (images in [0, 1])")
    p.add_argument("--fp16-tol", type=float, default=0.1)
    p.add_argument("--bf16", action="store_true", help="also check bfloat16")
    p.add_argument("--bf16-tol", type=float, default=0.15)
    p.add_argument("--tf32", action="store_true", help="allow TF32 in the fp32 configs (then raise --fp32-tol)")
    p.add_argument("--sdxl", action="store_true",
                   help="also run the full-size sdxl preset at 1024x1024 vs diffusers fp16 (minutes, ~30 GB disk)")
    p.add_argument("--sdxl-steps", type=int, default=30, help="steps for --sdxl (default 30)")
    p.add_argument("--sdxl-artifacts", help="folder for the --sdxl export (default: a temp folder)")
    p.add_argument("--json", help="also write the results to this JSON file")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        import torch
    except ImportError:
        print("no CUDA GPU: nothing to check (torch is not installed)")
        return 0
    if not torch.cuda.is_available():
        print("no CUDA GPU: nothing to check")
        return 0
    ensure_importable()
    report = Report()
    guarded(report, "environment", section_environment, report)
    artifacts = guarded(report, "artifacts", section_artifacts, args, report)
    if artifacts is not None:
        ref = guarded(report, "reference", section_reference, artifacts, args, report)
        if ref is not None:
            guarded(report, "torch", section_torch, artifacts, ref, args, report)
            guarded(report, "tensorrt", section_tensorrt, artifacts, ref, args, report)
    if args.sdxl:
        guarded(report, "sdxl", section_sdxl, args, report)
    print()
    print(report.table())
    if args.json:
        Path(args.json).write_text(json.dumps([r.__dict__ for r in report.results], indent=2, default=str) + "\n")
    print("gpu check:", "FAILED" if report.failed else "passed")
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
