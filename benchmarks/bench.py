"""End-to-end latency benchmark: our pipeline vs diffusers, interleaved in one process.

For every (bucket, batch) case the benchmark warms up each side, then runs them in
rounds -- ours, baseline, ours, baseline, ... -- so that whatever else the machine is
doing slows both sides alike and cancels in the ratio. It reports per stage (each text
encoder, every UNet and refiner step, the VAE decode), end to end (p50/p90/p99, mean,
spread, images per second), peak memory, the runtime's overhead (end to end minus the
time inside components), parity of the images with the baseline's, and export / build
times when it made the artifacts itself.

Entry points: :func:`run_bench` (library), ``sdxl-export bench`` (:mod:`.cli`) and the
named suites in :mod:`.suites`. Output: :mod:`.report` (JSON, markdown, PNG).
"""

from __future__ import annotations

import contextlib
import logging
import math
import statistics
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import BackendUnavailableError, InvalidRequestError
from .stats import MemorySampler, machine_info, ratio, summarize

log = logging.getLogger(__name__)

SCHEMA = "sdxl-export/bench"
SCHEMA_VERSION = 1
BASELINES = ("diffusers", "none")
DEFAULT_PROMPT = "a photograph of an astronaut riding a horse on the moon, detailed, 8k"
#: Parity bound of the images (float images in [0, 1]): one 8-bit level.
PIXEL_TOLERANCE = 1 / 255
BASELINE = "diffusers"
#: diffusers' own bf16 pipelines (``--baseline-bf16``): the yardstick of the fidelity gate.
BASELINE_BF16 = "diffusers-bf16"
#: Engine precisions the bench builds (``Variant.precision``); fp32 into the work folder, the
#: others each into their own sibling folder (``<work>-<backend>-<precision>``), since one
#: artifact folder holds one engine set per backend.
REDUCED_PRECISIONS = ("fp16", "bf16")
RSS_NOTE = ("memory.rss_peak_mb is the whole process: every side's figure includes the other pipelines' "
            "resident weights (all sides run in one process, interleaved)")


@dataclass
class Variant:
    """One configuration of ours to measure: a backend, its device and its options."""

    name: str
    backend: str = "auto"
    device: str = "auto"
    #: ``backend_options`` of :meth:`SDXLPipeline.from_artifacts` (ORT: ``{"session_options": {...}}``).
    options: dict[str, Any] = field(default_factory=dict)
    #: the engines' build precision (``sdxl-export build --precision``): ``fp32``, or ``bf16``/``fp16``/``int8``,
    #: built by the bench's prepare step into a separate artifact folder (needs ``--model``).
    precision: str = "fp32"


@dataclass
class BenchConfig:
    """What to benchmark. Exactly one of ``artifacts`` and ``model`` is set."""

    artifacts: Path | None = None
    model: str | None = None
    refiner_source: str | None = "same"
    #: a VAE replacing the model's (``--vae``)
    vae_source: str | None = None
    #: Where ``model`` is exported and built (default: a new temporary folder).
    work_dir: Path | None = None
    build: bool = True
    variants: list[Variant] = field(default_factory=lambda: [Variant("auto")])
    #: ``"native"`` (the model's square native size), ``"all"`` or ``"HxW,HxW"``.
    buckets: str = "native"
    batch_sizes: tuple[int, ...] = (1,)
    steps: int = 20
    runs: int = 5
    warmup: int = 1
    baseline: str = "diffusers"
    baseline_device: str = "auto"
    #: also run diffusers' pipelines in torch.bfloat16 (side ``diffusers-bf16``), interleaved
    #: like the fp32 baseline, and gate reduced-precision variants against it (runtime/fidelity.py)
    baseline_bf16: bool = False
    #: torch's intra-op threads while the benchmark runs (None: torch's default, one per core).
    torch_threads: int | None = None
    guidance_scale: float = 5.0
    denoising_end: float = 0.8
    use_refiner: bool = True
    scheduler: str = "euler"
    prompt: str = DEFAULT_PROMPT
    seed: int = 0
    #: ``--lora FILE[:SCALE]``: after the cases, the switch times and the UNet step with and
    #: without this LoRA set on each variant (:func:`lora_bench`).
    loras: tuple[tuple[str, float], ...] = ()
    #: ``--workflows``: after the cases, an inpainting and a hires-fix request, ours vs diffusers'
    #: same composition (:mod:`.workflow_bench`)
    workflows: bool = False

    def check(self) -> None:
        if (self.artifacts is None) == (self.model is None):
            raise InvalidRequestError("pass exactly one of --artifacts DIR and --model SRC",
                                      "--artifacts for an existing export, --model to export (and build) first")
        if self.baseline not in BASELINES:
            raise InvalidRequestError(f"unknown baseline {self.baseline!r}", f"use one of {', '.join(BASELINES)}")
        for name, value, low in (("runs", self.runs, 1), ("warmup", self.warmup, 0), ("steps", self.steps, 1)):
            if not isinstance(value, int) or value < low:
                raise InvalidRequestError(f"--{name} must be an integer >= {low}, got {value!r}",
                                          f"pass --{name} {max(low, 1)} or more")
        if self.torch_threads is not None and (not isinstance(self.torch_threads, int) or self.torch_threads < 1):
            raise InvalidRequestError(f"--torch-threads must be >= 1, got {self.torch_threads!r}",
                                      "pass --torch-threads 1 or more, or leave it out for torch's default")
        if not self.batch_sizes or any(int(b) < 1 for b in self.batch_sizes):
            raise InvalidRequestError(f"batch sizes must be >= 1, got {self.batch_sizes}", "pass e.g. --batch-sizes 1,2")
        if not self.variants:
            raise InvalidRequestError("no backend to benchmark", "pass --backend NAME")
        names = [v.name for v in self.variants]
        if len(set(names)) != len(names) or BASELINE in names or BASELINE_BF16 in names:
            raise InvalidRequestError(f"variant names must be unique and not {BASELINE!r}/{BASELINE_BF16!r}: "
                                      f"{names}", "give each variant its own name")
        for v in self.variants:
            if v.precision not in ("fp32", *REDUCED_PRECISIONS, "int8"):
                raise InvalidRequestError(f"variant {v.name}: unknown precision {v.precision!r}",
                                          f"use one of fp32, {', '.join(REDUCED_PRECISIONS)}, int8")
            if v.precision != "fp32" and self.artifacts is not None:
                raise InvalidRequestError(
                    f"variant {v.name} asks for {v.precision} engines, which the bench builds only with --model",
                    "pass --model SRC (the bench builds them), or --artifacts of a reduced-precision build "
                    "with the variant's precision left at fp32")
        if self.baseline_bf16 and self.baseline != "diffusers":
            raise InvalidRequestError("--baseline-bf16 needs the diffusers baseline",
                                      "drop --baseline none, or drop --baseline-bf16")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("artifacts", "work_dir"):
            d[k] = str(d[k]) if d[k] is not None else None
        d["batch_sizes"] = list(self.batch_sizes)
        return d


@dataclass
class Side:
    """One measured side (a variant of ours, or the baseline) in one case."""

    name: str
    totals: list[float] = field(default_factory=list)
    stages: dict[str, list[float]] = field(default_factory=dict)  # all calls of all measured runs
    calls_per_run: dict[str, int] = field(default_factory=dict)
    component: list[float] = field(default_factory=list)
    memory: MemorySampler = field(default_factory=MemorySampler)

    def add(self, total: float, stages: dict[str, list[float]]) -> None:
        self.totals.append(total)
        self.component.append(float(sum(sum(v) for v in stages.values())))
        for k, v in stages.items():
            self.stages.setdefault(k, []).extend(v)
            self.calls_per_run[k] = len(v)

    def to_dict(self, batch: int) -> dict[str, Any]:
        e2e = summarize(self.totals)
        overhead = [max(0.0, t - c) for t, c in zip(self.totals, self.component)]
        stages = {}
        for name, calls in self.stages.items():
            n = self.calls_per_run[name]
            stages[name] = {
                "calls_per_image_batch": n,
                "per_call_p50_ms": statistics.median(calls) * 1e3,
                "per_call_mean_ms": statistics.fmean(calls) * 1e3,
                "per_run_ms": statistics.fmean(calls) * n * 1e3,
            }
        return {
            "end_to_end": e2e,
            "images_per_second": batch / statistics.fmean(self.totals),
            "stages": stages,
            "component_ms_p50": statistics.median(self.component) * 1e3,
            "overhead": {
                "p50_ms": statistics.median(overhead) * 1e3,
                "fraction_p50": statistics.median(o / t for o, t in zip(overhead, self.totals)),
            },
            "memory": self.memory.to_dict(),
        }


def _resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise BackendUnavailableError(f"baseline device {device!r} requested but torch sees no CUDA GPU",
                                      "use --baseline-device cpu, or run on a GPU machine")
    return device


def precision_folder(out: Path, backend: str, precision: str) -> Path:
    """Where the bench builds ``backend`` engines at ``precision`` (fp32: ``out`` itself)."""
    return out if precision == "fp32" else out.with_name(f"{out.name}-{backend}-{precision}")


def variant_artifacts(cfg: BenchConfig, artifacts: Path) -> dict[str, Path]:
    """The artifact folder each variant opens."""
    return {v.name: precision_folder(artifacts, v.backend, v.precision) for v in cfg.variants}


def prepare_artifacts(cfg: BenchConfig) -> tuple[Path, dict[str, Any]]:
    """The artifact folder to benchmark, exporting and building it first for ``--model``.

    Variants with a reduced ``precision`` get their engines built into their own folder
    (:func:`precision_folder`; the build exports there too, incrementally).
    """
    timing: dict[str, Any] = {"export_seconds": None, "build_seconds": None, "built_backends": [],
                              "up_to_date": None}
    if cfg.artifacts is not None:
        return Path(cfg.artifacts), timing
    from ..engines.build import BuildOptions, build
    from ..export import export_model

    assert cfg.model is not None
    out = Path(cfg.work_dir) if cfg.work_dir is not None else Path(tempfile.mkdtemp(prefix="sdxl-bench-")) / "art"
    log.info("exporting %s to %s", cfg.model, out)
    t0 = time.perf_counter()
    manifest = export_model(cfg.model, out, refiner=cfg.refiner_source, with_refiner=cfg.use_refiner,
                            vae=cfg.vae_source)
    timing["export_seconds"] = time.perf_counter() - t0
    fresh = [bool(manifest.get("up_to_date"))]
    if cfg.build:
        native = int(manifest["native_size"])
        buckets = ",".join(f"{h}x{w}" for h, w in case_buckets(cfg, native))
        backends = sorted({(v.backend, v.precision) for v in cfg.variants if v.backend != "torch"},
                          key=lambda bp: (bp[1] != "fp32", bp))
        t0 = time.perf_counter()
        for backend, precision in backends:
            target = precision_folder(out, backend, precision)
            log.info("building %s %s engines over %s, batch %s into %s", backend, precision, buckets,
                     cfg.batch_sizes, target)
            calibration = None
            if precision == "int8":
                from ..runtime import UNetCalibration

                calibration = UNetCalibration()
            report = build(BuildOptions(model=cfg.model, refiner=cfg.refiner_source, with_refiner=cfg.use_refiner,
                                        vae=cfg.vae_source, out=target, backend=backend, buckets=buckets,
                                        batch_sizes=tuple(cfg.batch_sizes), precision=precision,
                                        # --workflows: the hires-fix request's target size too
                                        hires_scales=(1.5,) if cfg.workflows else ()), calibration=calibration)
            timing["built_backends"].append(report.backend if precision == "fp32"
                                            else f"{report.backend} {precision}")
            fresh.append(report.up_to_date)
        timing["build_seconds"] = time.perf_counter() - t0 if backends else None
    #: True: the folder was already up to date, so the seconds are checks, not export/build work.
    timing["up_to_date"] = all(fresh)
    return out, timing


def case_buckets(cfg: BenchConfig, native: int) -> list[tuple[int, int]]:
    from ..buckets import parse_bucket_list

    if cfg.buckets.strip().lower() == "native":
        return [(native, native)]
    return [(b.height, b.width) for b in parse_bucket_list(cfg.buckets, native)]


def run_bench(cfg: BenchConfig) -> dict[str, Any]:
    """Run the benchmark described by ``cfg``; return the result (see :mod:`.report`).

    Sides that cannot run natively on this machine are skipped, each with the reason in the
    result's ``skipped`` (and under the table), rather than measured under a name that lies:
    see :func:`runnable_sides`.
    """
    cfg.check()
    cfg, skipped = runnable_sides(cfg)
    with _torch_threads_set(cfg.torch_threads):
        result = _run(cfg, skipped)
    result["skipped"] = skipped
    return result


def runnable_sides(cfg: BenchConfig, isa: dict[str, Any] | None = None) -> tuple[BenchConfig, dict[str, str]]:
    """``cfg`` without the sides this CPU cannot run natively, and why each was dropped.

    A reduced-precision (bf16/fp16) engine side on the CPU needs native bf16 (AVX512_BF16 or
    AMX): without it OpenVINO builds fp32 engines for the request (a side named "bf16" would
    measure fp32). diffusers' bf16 baseline on the CPU needs it too: without it torch emulates
    bf16 (seen: 234 s per image against 8.7 s in fp32 on an AVX2-only EPYC), which measures
    nothing a user would deploy and takes most of the run.
    """
    from .stats import cpu_isa

    isa = cpu_isa() if isa is None else isa
    skipped: dict[str, str] = {}
    if isa.get("native_bf16"):
        return cfg, skipped
    no_bf16 = (f"this CPU has no native bf16 (no AVX512_BF16/AMX; ISA {', '.join(isa.get('flags') or []) or 'unknown'})")
    keep = []
    for v in cfg.variants:
        if v.precision in REDUCED_PRECISIONS and _variant_on_cpu(v):
            skipped[v.name] = f"{no_bf16}: {v.precision} engines would be built fp32, which the fp32 sides measure"
        else:
            keep.append(v)
    baseline_bf16 = cfg.baseline_bf16
    if baseline_bf16 and _resolve_device(cfg.baseline_device) == "cpu":
        skipped[BASELINE_BF16] = f"{no_bf16}: torch would emulate bf16 (tens of times slower than fp32)"
        baseline_bf16 = False
    if not keep:
        raise InvalidRequestError(f"no side of this benchmark can run natively here ({'; '.join(skipped.values())})",
                                  "benchmark fp32 sides (e.g. --backend onnxruntime), or run on a CPU with bf16")
    for name, why in skipped.items():
        log.warning("skipping side %s: %s", name, why)
    return replace(cfg, variants=keep, baseline_bf16=baseline_bf16), skipped


def _variant_on_cpu(v: Variant) -> bool:
    import torch

    if v.backend == "openvino" or v.device == "cpu":
        return True
    return v.device == "auto" and v.backend != "tensorrt" and not torch.cuda.is_available()


@contextlib.contextmanager
def _torch_threads_set(n: int | None) -> Iterator[None]:
    import torch

    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _run(cfg: BenchConfig, skipped: dict[str, str]) -> dict[str, Any]:
    from ..runtime import SDXLPipeline, read_artifacts

    started = machine_info()
    artifacts, build_timing = prepare_artifacts(cfg)
    cfg = _name_by_precision(cfg, artifacts, skipped)
    sizes = case_buckets(cfg, read_artifacts(artifacts, with_refiner=cfg.use_refiner).native_size)
    pipes: dict[str, Any] = {}
    load_seconds: dict[str, float] = {}
    baselines: dict[str, Any] = {}
    folders = variant_artifacts(cfg, artifacts)
    try:
        for v in cfg.variants:
            t0 = time.perf_counter()
            pipes[v.name] = SDXLPipeline.from_artifacts(folders[v.name], backend=v.backend, device=v.device,
                                                        load_refiner=cfg.use_refiner, backend_options=v.options)
            load_seconds[v.name] = time.perf_counter() - t0
        if cfg.baseline == "diffusers":
            baselines[BASELINE], load_seconds[BASELINE] = _open_baseline(artifacts, cfg)
            if cfg.baseline_bf16:
                baselines[BASELINE_BF16], load_seconds[BASELINE_BF16] = _open_baseline(artifacts, cfg, bf16=True)
        cases = [_run_case(cfg, pipes, baselines, height, width, int(batch))
                 for height, width in sizes for batch in cfg.batch_sizes]
        descriptions = {name: p.description for name, p in pipes.items()}
        for name, v in zip(list(descriptions), cfg.variants):
            descriptions[name] = {**descriptions[name], "engine_precision": v.precision,
                                  "artifacts": str(folders[name])}
        lora = lora_bench(cfg, pipes, sizes[0], artifacts) if cfg.loras else None
        workflows = None
        if cfg.workflows:
            from .workflow_bench import workflow_bench

            workflows = workflow_bench(cfg, pipes, sizes[0], artifacts)
    finally:
        for p in pipes.values():
            p.close()
        for b in baselines.values():
            b.close()
    result = _result(cfg, started, artifacts, build_timing, load_seconds, descriptions, cases)
    if lora is not None:
        result["lora"] = lora
    if workflows is not None:
        result["workflows"] = workflows
    return result


def _name_by_precision(cfg: BenchConfig, artifacts: Path, skipped: dict[str, str]) -> BenchConfig:
    """Drop (into ``skipped``) a reduced-precision side whose UNet engine was built in another
    precision than the side's name says: every side is measured in the precision it is named by."""
    from ..runtime import read_artifacts

    keep = []
    folders = variant_artifacts(cfg, artifacts)
    for v in cfg.variants:
        if v.precision == "fp32":
            keep.append(v)
            continue
        store = read_artifacts(folders[v.name], with_refiner=cfg.use_refiner).engine_store
        entry = store.entry_for("unet", v.backend) if store is not None else None
        built = getattr(entry, "precision", None)
        if built is not None and built != v.precision:
            skipped[v.name] = (f"asked for {v.precision} {v.backend} engines, the build made {built} "
                               f"({getattr(entry, 'precision_requested', v.precision)} requested)")
            log.warning("skipping side %s: %s", v.name, skipped[v.name])
        else:
            keep.append(v)
    if not keep:
        raise InvalidRequestError(f"no side left to measure ({'; '.join(skipped.values())})",
                                  "benchmark fp32 sides, or run on a machine that builds the precision asked for")
    return replace(cfg, variants=keep)


#: The model parts an SDXL LoRA changes (the refiner is not an SDXL LoRA's target).
LORA_COMPONENTS = ("text_encoder", "text_encoder_2", "unet")


def lora_bench(cfg: BenchConfig, pipes: dict[str, Any], size: tuple[int, int], artifacts: Path) -> dict[str, Any]:
    """Per variant: the first switch to ``cfg.loras`` (read + fit the files, then apply), a
    switch with the deltas cached, the switch back to the base, and the UNet step p50 with and
    without the set (the LoRA is fused into the weights: the step should cost the same),
    next to what a fused rebuild of the touched components took (their export + engine build)."""
    from ..runtime import read_artifacts

    height, width = size
    lset = dict(cfg.loras)
    prompts = [cfg.prompt]

    def unet_p50(pipe: Any) -> float:
        calls: list[float] = []
        for _ in range(cfg.runs):
            _, out = _run_ours(pipe, cfg, prompts, height, width)
            calls += out.timings.stages.get("unet", [])
        return statistics.median(calls) * 1e3

    def switch(pipe: Any, target: dict[str, float]) -> float:
        t0 = time.perf_counter()
        pipe.set_loras(target)
        return (time.perf_counter() - t0) * 1e3

    out: dict[str, Any] = {"loras": [{"file": f, "scale": s} for f, s in cfg.loras], "bucket": f"{height}x{width}",
                           "variants": {}}
    arts = read_artifacts(artifacts, with_refiner=cfg.use_refiner)
    rebuild = 0.0
    for name in LORA_COMPONENTS:
        rec = arts.components.get(name, {})
        rebuild += float(rec.get("export_seconds", 0.0)) + float((rec.get("validation") or {}).get("seconds", 0.0))
        entry = getattr(arts.engine_store, "entries", {}).get(name) if arts.engine_store is not None else None
        rebuild += float(getattr(entry, "build_seconds", 0.0) or 0.0)
    out["fused_rebuild_seconds"] = rebuild
    for name, pipe in pipes.items():
        pipe.set_loras({})
        without = unet_p50(pipe)
        first = switch(pipe, lset)
        with_lora = unet_p50(pipe)
        back = switch(pipe, {})
        cached = switch(pipe, lset)
        pipe.set_loras({})
        rec = {"first_switch_ms": first, "switch_ms_cached": cached, "switch_back_ms": back,
               "unet_step_p50_ms_without": without, "unet_step_p50_ms_with": with_lora,
               "step_cost_ratio": ratio(with_lora, without)}
        log.info("LoRA on %s: first switch %.0f ms, cached %.0f ms, back %.0f ms; UNet step %.1f -> %.1f ms",
                 name, first, cached, back, without, with_lora)
        out["variants"][name] = rec
    return out


def _open_baseline(artifacts: Path, cfg: BenchConfig, bf16: bool = False) -> tuple[Any, float]:
    """diffusers on the export's weights; ``bf16``: every module cast to torch.bfloat16, which is
    what ``from_pretrained(..., torch_dtype=torch.bfloat16)`` does to the same weights."""
    import torch

    from .baseline import DiffusersBaseline, load_reference_model

    t0 = time.perf_counter()
    model = load_reference_model(artifacts)
    if bf16:
        for part in ("text_encoder", "text_encoder_2", "unet", "vae", "refiner_unet"):
            module = getattr(model, part, None)
            if module is not None:
                module.to(torch.bfloat16)
    device = _resolve_device(cfg.baseline_device)
    base = DiffusersBaseline(model)
    if device != "cpu":
        base.base.to(device)
        if base.refiner is not None:
            base.refiner.to(device)
    log.info("baseline: diffusers eager %s on %s (%d torch threads)", "bf16" if bf16 else "fp32", device,
             torch.get_num_threads())
    return base, time.perf_counter() - t0


def _run_ours(pipe: Any, cfg: BenchConfig, prompts: list[str], height: int, width: int) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = pipe(prompts, height=height, width=width, num_inference_steps=cfg.steps, guidance_scale=cfg.guidance_scale,
               denoising_end=cfg.denoising_end, refiner=cfg.use_refiner, seed=cfg.seed, scheduler=cfg.scheduler,
               output_type="np")
    return time.perf_counter() - t0, out


def _run_baseline(base: Any, cfg: BenchConfig, prompts: list[str], height: int, width: int) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = base(prompts, height=height, width=width, steps=cfg.steps, guidance_scale=cfg.guidance_scale,
               denoising_end=cfg.denoising_end, refiner=cfg.use_refiner, seed=cfg.seed, scheduler=cfg.scheduler)
    return time.perf_counter() - t0, out


def _run_case(cfg: BenchConfig, pipes: dict[str, Any], baselines: dict[str, Any], height: int, width: int,
              batch: int) -> dict[str, Any]:
    prompts = [cfg.prompt] * batch
    log.info("case %dx%d batch %d: %d warm-up + %d interleaved runs per side", height, width, batch,
             cfg.warmup, cfg.runs)
    for _ in range(cfg.warmup):
        for pipe in pipes.values():
            _run_ours(pipe, cfg, prompts, height, width)
        for base in baselines.values():
            _run_baseline(base, cfg, prompts, height, width)
    sides = {name: Side(name) for name in [*pipes, *baselines]}
    parity: dict[str, Any] = {}
    first: dict[str, Any] = {}  # every side's outputs of the first measured round
    for r in range(cfg.runs):
        outputs: dict[str, Any] = {}
        for name, pipe in pipes.items():
            with sides[name].memory.window():
                total, out = _run_ours(pipe, cfg, prompts, height, width)
            sides[name].add(total, out.timings.stages)
            outputs[name] = out
        for name, base in baselines.items():
            with sides[name].memory.window():
                total, ref = _run_baseline(base, cfg, prompts, height, width)
            sides[name].add(total, ref.timings.stages)
            outputs[name] = ref
        if r == 0:
            first = outputs
            if BASELINE in outputs:
                parity = {name: _parity(outputs[name], outputs[BASELINE]) for name in pipes}
        log.info("round %d/%d: %s", r + 1, cfg.runs,
                 ", ".join(f"{n} {s.totals[-1] * 1e3:.0f} ms" for n, s in sides.items()))
    case: dict[str, Any] = {"height": height, "width": width, "bucket": f"{height}x{width}", "batch": batch,
                            "results": {name: side.to_dict(batch) for name, side in sides.items()}}
    if BASELINE in baselines:
        ref_side = sides[BASELINE]
        case["speedup_vs_baseline"] = {name: _speedup(sides[name], ref_side) for name in sides if name != BASELINE}
        case["parity"] = parity
        case["fidelity"] = _fidelity(cfg, first)
    if BASELINE_BF16 in baselines:
        case["speedup_vs_diffusers_bf16"] = {name: _speedup(sides[name], sides[BASELINE_BF16]) for name in pipes}
    return case


def _fidelity(cfg: BenchConfig, outputs: dict[str, Any]) -> dict[str, Any]:
    """Every side's first-round images against diffusers' fp32 ones (PSNR, max pixel diff in 1/255), and
    the gate of :mod:`sdxl_export.runtime.fidelity` for each reduced-precision variant of ours: its PSNR
    at least diffusers' bf16 PSNR minus 1 dB (int8: minus 3 dB, its own gate; ``bf16_gate_passed`` says
    whether it passed the 1 dB one too), nothing NaN (``gate`` is None without a bf16 baseline)."""
    from ..runtime.fidelity import INT8_MARGIN_DB, MARGIN_DB, fidelity_gate, psnr

    ref = np.asarray(outputs[BASELINE].images, dtype=np.float64)
    reduced = {v.name: v.precision for v in cfg.variants if v.precision != "fp32"}
    out: dict[str, Any] = {}
    for name, o in outputs.items():
        if name == BASELINE:
            continue
        images = np.asarray(o.images, dtype=np.float64)
        if images.shape != ref.shape:
            out[name] = {"comparable": False, "why": f"image shapes {images.shape} vs {ref.shape}"}
            continue
        p = psnr(images, ref)
        rec: dict[str, Any] = {
            "comparable": True, "psnr_db": None if math.isnan(p) else p,
            "max_pixel_diff_255": float(np.nanmax(np.abs(images - ref))) * 255,
            "finite": bool(np.all(np.isfinite(images))),
        }
        if name in reduced:
            if BASELINE_BF16 in outputs:
                yardstick = np.asarray(outputs[BASELINE_BF16].images, np.float64)
                gate = fidelity_gate(images, yardstick, ref,
                                     INT8_MARGIN_DB if reduced[name] == "int8" else MARGIN_DB)
                rec["gate"] = gate.to_dict()
                rec["gate_passed"] = gate.passed
                if reduced[name] == "int8":  # what `auto` would need (it never picks int8 today)
                    rec["bf16_gate_passed"] = fidelity_gate(images, yardstick, ref).passed
            else:
                rec["gate"], rec["gate_passed"] = None, None
        out[name] = rec
    return out


def _parity(ours: Any, ref: Any) -> dict[str, Any]:
    """How far our images/latents are from the baseline's (same seed, same everything)."""
    ours_images = np.asarray(ours.images, dtype=np.float64)
    ref_images = np.asarray(ref.images, dtype=np.float64)
    if ours_images.shape != ref_images.shape:
        return {"comparable": False, "why": f"image shapes {ours_images.shape} vs {ref_images.shape}"}
    pix = float(np.abs(ours_images - ref_images).max())
    lat = float((ours.latents.detach().cpu().double() - ref.latents.detach().cpu().double()).abs().max())
    return {"comparable": True, "max_pixel_diff": pix, "max_pixel_diff_255": pix * 255, "max_latent_diff": lat,
            "within_1_255": pix <= PIXEL_TOLERANCE}


def _speedup(ours: Side, ref: Side) -> dict[str, Any]:
    paired = [b / a for a, b in zip(ours.totals, ref.totals) if a > 0]
    stages = {}
    for name, calls in ours.stages.items():
        if ref.stages.get(name):
            stages[name] = ratio(statistics.median(ref.stages[name]), statistics.median(calls))
    return {
        "end_to_end_p50": ratio(statistics.median(ref.totals), statistics.median(ours.totals)),
        "end_to_end_paired_median": statistics.median(paired) if paired else None,
        "end_to_end_min": ratio(min(ref.totals), min(ours.totals)),
        "per_call_p50": stages,
    }


def _result(cfg: BenchConfig, started: dict[str, Any], artifacts: Path, build_timing: dict[str, Any],
            load_seconds: dict[str, float], descriptions: dict[str, Any], cases: list[dict[str, Any]]) -> dict[str, Any]:
    from ..export.exporter import library_versions

    machine = machine_info()
    machine["load_average_at_start"] = started.get("load_average")
    result: dict[str, Any] = {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "machine": machine,
        "versions": library_versions(),
        "config": {**cfg.to_dict(), "artifacts": str(artifacts), "torch_threads_used": _torch_threads()},
        "build": build_timing,
        "load_seconds": load_seconds,
        "variants": descriptions,
        "cases": cases,
        "notes": [RSS_NOTE],
    }
    if cfg.baseline != "none":
        sides = [v.name for v in cfg.variants] + ([BASELINE_BF16] if cfg.baseline_bf16 else [])
        result["speedup_vs_baseline"] = {
            name: _geomean([c["speedup_vs_baseline"][name]["end_to_end_p50"] for c in cases]) for name in sides
        }
        if cfg.baseline_bf16:
            result["speedup_vs_diffusers_bf16"] = {
                v.name: _geomean([c["speedup_vs_diffusers_bf16"][v.name]["end_to_end_p50"] for c in cases])
                for v in cfg.variants
            }
            gated = [f for c in cases for f in c["fidelity"].values() if f.get("gate_passed") is not None]
            result["fidelity_gate_passed"] = all(f["gate_passed"] for f in gated) if gated else None
    return result


def _geomean(values: list[float | None]) -> float | None:
    vals = [v for v in values if v]
    return float(np.exp(np.mean(np.log(vals)))) if vals else None


def _torch_threads() -> int:
    import torch

    return int(torch.get_num_threads())
