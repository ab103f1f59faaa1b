"""Few-step vs the SDXL default, ours vs diffusers, in one process (``bench --fewstep``).

Two request settings on the same model, same prompt, same seed, base only:

* ``sdxl-30-cfg``: SDXL's usual 30 Euler steps at guidance 5 -- 60 UNet evaluations
  (classifier-free guidance runs the negative and positive halves as a batch of 2);
* ``lightning-4``: SDXL-Lightning's settings, 4 Euler steps with ``timestep_spacing="trailing"``
  at guidance 0 -- 4 UNet evaluations of batch 1.

Each setting is one case of :mod:`.bench` (warm-up, then ours and diffusers interleaved round
by round, parity of the first round's images), so the four figures come from one run on one
machine. The weights are the model's own (the ``small`` preset's on CPU): what is measured is
the cost of a request and our parity with diffusers at it; the image quality of a distilled
model is its weights' business, not the runtime's.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

from .bench import (
    BASELINE,
    BenchConfig,
    _open_baseline,
    _result,
    _run_case,
    _torch_threads_set,
    case_buckets,
    prepare_artifacts,
)
from .stats import machine_info

#: name -> (steps, guidance scale, scheduler)
SETTINGS: dict[str, tuple[int, float, str]] = {
    "sdxl-30-cfg": (30, 5.0, "euler"),
    "lightning-4": (4, 0.0, "euler_trailing"),
}


def unet_evaluations(steps: int, guidance_scale: float) -> int:
    """UNet evaluations of one image: steps x 2 under classifier-free guidance (> 1), else steps."""
    return steps * (2 if guidance_scale > 1.0 else 1)


def run_fewstep_bench(cfg: BenchConfig, settings: dict[str, tuple[int, float, str]] | None = None) -> dict[str, Any]:
    """Both settings on ``cfg``'s model (base only, its first bucket and batch size); a result in
    :mod:`.bench`'s schema (one case per setting, each tagged with ``setting``) plus ``fewstep``:
    the per-setting summary the table prints."""
    from ..runtime import SDXLPipeline, read_artifacts

    settings = settings or SETTINGS
    cfg = replace(cfg, use_refiner=False)
    cfg.check()
    with _torch_threads_set(cfg.torch_threads):
        started = machine_info()
        artifacts, build_timing = prepare_artifacts(cfg)
        height, width = case_buckets(cfg, read_artifacts(artifacts, with_refiner=False).native_size)[0]
        batch = int(cfg.batch_sizes[0])
        pipes: dict[str, Any] = {}
        baselines: dict[str, Any] = {}
        load_seconds: dict[str, float] = {}
        cases = []
        try:
            for v in cfg.variants:
                t0 = time.perf_counter()
                pipes[v.name] = SDXLPipeline.from_artifacts(artifacts, backend=v.backend, device=v.device,
                                                            load_refiner=False, backend_options=v.options)
                load_seconds[v.name] = time.perf_counter() - t0
            if cfg.baseline == "diffusers":
                baselines[BASELINE], load_seconds[BASELINE] = _open_baseline(artifacts, cfg)
            for name, (steps, guidance, scheduler) in settings.items():
                c = replace(cfg, steps=steps, guidance_scale=guidance, scheduler=scheduler)
                case = _run_case(c, pipes, baselines, height, width, batch)
                case.update(setting=name, steps=steps, guidance_scale=guidance, scheduler=scheduler,
                            unet_evaluations=unet_evaluations(steps, guidance))
                cases.append(case)
            descriptions = {n: p.description for n, p in pipes.items()}
        finally:
            for p in pipes.values():
                p.close()
            for b in baselines.values():
                b.close()
    result = _result(cfg, started, artifacts, build_timing, load_seconds, descriptions, cases)
    result["fewstep"] = summarize_settings(result)
    return result


def summarize_settings(result: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (setting, side): p50 latency, speedup over diffusers, parity."""
    rows = []
    for case in result["cases"]:
        for side, r in case["results"].items():
            row: dict[str, Any] = {"setting": case["setting"], "side": side, "steps": case["steps"],
                                   "guidance_scale": case["guidance_scale"], "scheduler": case["scheduler"],
                                   "unet_evaluations": case["unet_evaluations"],
                                   "p50_ms": r["end_to_end"]["p50_ms"]}
            if side != BASELINE and "speedup_vs_baseline" in case:
                row["speedup_vs_diffusers"] = case["speedup_vs_baseline"][side]["end_to_end_p50"]
                par = case["parity"].get(side, {})
                row["max_pixel_diff_255"] = par.get("max_pixel_diff_255")
                row["within_1_255"] = par.get("within_1_255")
            rows.append(row)
    return rows


def fewstep_table(result: dict[str, Any]) -> str:
    """Markdown: setting, side, UNet evaluations, p50, speedup vs diffusers, parity."""
    lines = ["| setting | side | steps | guidance | scheduler | UNet evals | p50 ms | vs diffusers | max diff /255 |",
             "|---|---|---:|---:|---|---:|---:|---:|---:|"]
    for r in result["fewstep"]:
        sp = r.get("speedup_vs_diffusers")
        diff = r.get("max_pixel_diff_255")
        lines.append(f"| {r['setting']} | {r['side']} | {r['steps']} | {r['guidance_scale']:g} | {r['scheduler']} | "
                     f"{r['unet_evaluations']} | {r['p50_ms']:.0f} | {'-' if sp is None else f'{sp:.2f}x'} | "
                     f"{'-' if diff is None else f'{diff:.3f}'} |")
    return "\n".join(lines)
