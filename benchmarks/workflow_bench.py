"""Inpainting and hires fix, ours vs diffusers' same composition, interleaved in one process.

Two requests at the benchmark's first size (base only, the bench's steps, scheduler, guidance
and seed):

* ``inpaint``: one image and an elliptic mask, ``strength`` 0.9999 (diffusers' default):
  ``SDXLPipeline(image=, mask_image=)`` vs ``StableDiffusionXLInpaintPipeline``;
* ``hires``: a first pass at the size, the "Latent" upscale x1.5, an img2img pass at the target
  (strength 0.6, the bench's steps): ``SDXLPipeline(hires_scale=1.5)`` vs
  ``StableDiffusionXLPipeline`` -> ``interpolate`` -> ``StableDiffusionXLImg2ImgPipeline``.

Ours runs once first (the check that the engines serve the request; a request they do not serve is
reported as skipped), each side warms up, then runs ``runs`` times, alternating ours and theirs, so whatever else the
machine does slows both alike. Reported: the p50/mean seconds per side, the ratio, and the
max pixel difference of the first round's images (in 1/255).
"""

from __future__ import annotations

import logging
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

HIRES_SCALE = 1.5
HIRES_STRENGTH = 0.6


def _inputs(height: int, width: int) -> tuple[Any, Any]:
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:height, 0:width]
    arr = np.stack([xx / max(width - 1, 1), yy / max(height - 1, 1), (xx * yy % 97) / 97], -1) * 200
    image = Image.fromarray((arr + rng.integers(0, 55, arr.shape)).astype(np.uint8))
    mask = Image.new("L", (width, height), 0)
    ImageDraw.Draw(mask).ellipse([width * 0.3, height * 0.25, width * 0.7, height * 0.65], fill=255)
    return image, mask


class _Reference:
    """diffusers' pipelines on the export's weights (the bench's reference model)."""

    def __init__(self, model: Any):
        from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLInpaintPipeline

        self.base = model.base_pipeline()
        comps = self.base.components
        self.inpaint = StableDiffusionXLInpaintPipeline(**comps, requires_aesthetics_score=False,
                                                        force_zeros_for_empty_prompt=True)
        self.i2i = StableDiffusionXLImg2ImgPipeline(**comps, requires_aesthetics_score=False,
                                                    force_zeros_for_empty_prompt=True)
        self.config = dict(self.base.scheduler.config)
        for p in (self.base, self.inpaint, self.i2i):
            p.set_progress_bar_config(disable=True)

    def _scheduler(self, name: str) -> Any:
        from ..runtime.schedulers import make_scheduler

        return make_scheduler(name, self.config)

    def inpaint_call(self, cfg: Any, image: Any, mask: Any, height: int, width: int) -> np.ndarray:
        import torch

        self.inpaint.scheduler = self._scheduler(cfg.scheduler)
        with torch.no_grad():
            return self.inpaint(cfg.prompt, image=image, mask_image=mask, height=height, width=width,
                                num_inference_steps=cfg.steps, guidance_scale=cfg.guidance_scale,
                                generator=torch.Generator("cpu").manual_seed(cfg.seed), output_type="np").images

    def hires_call(self, cfg: Any, height: int, width: int) -> np.ndarray:
        import torch

        gen = torch.Generator("cpu").manual_seed(cfg.seed)
        self.base.scheduler = self._scheduler(cfg.scheduler)
        self.i2i.scheduler = self._scheduler(cfg.scheduler)
        th, tw = int(height * HIRES_SCALE) // 8 * 8, int(width * HIRES_SCALE) // 8 * 8
        with torch.no_grad():
            lat = self.base(cfg.prompt, height=height, width=width, num_inference_steps=cfg.steps,
                            guidance_scale=cfg.guidance_scale, generator=gen, output_type="latent").images
            up = torch.nn.functional.interpolate(lat, size=(th // 8, tw // 8), mode="bilinear", antialias=False)
            return self.i2i(cfg.prompt, image=up, strength=HIRES_STRENGTH, num_inference_steps=cfg.steps,
                            guidance_scale=cfg.guidance_scale, generator=gen, output_type="np").images


def _summary(times: list[float]) -> dict[str, float]:
    return {"p50_s": statistics.median(times), "mean_s": statistics.fmean(times), "min_s": min(times),
            "runs": len(times)}


def workflow_bench(cfg: Any, pipes: dict[str, Any], size: tuple[int, int], artifacts: Path) -> dict[str, Any]:
    """Per variant: inpainting and hires fix vs diffusers (module docstring)."""
    from .baseline import load_reference_model

    height, width = size
    ref = _Reference(load_reference_model(artifacts))
    image, mask = _inputs(height, width)
    common = {"num_inference_steps": cfg.steps, "guidance_scale": cfg.guidance_scale, "seed": cfg.seed,
              "scheduler": cfg.scheduler, "refiner": False, "output_type": "np"}
    calls = {
        "inpaint": (lambda p: p(cfg.prompt, image=image, mask_image=mask, height=height, width=width, **common),
                    lambda: ref.inpaint_call(cfg, image, mask, height, width)),
        "hires": (lambda p: p(cfg.prompt, height=height, width=width, hires_scale=HIRES_SCALE,
                              hires_upscaler="latent", hires_steps=cfg.steps, hires_strength=HIRES_STRENGTH,
                              **common),
                  lambda: ref.hires_call(cfg, height, width)),
    }
    out: dict[str, Any] = {"size": f"{height}x{width}", "steps": cfg.steps, "scheduler": cfg.scheduler,
                           "hires": {"scale": HIRES_SCALE, "upscaler": "latent (bilinear)", "strength": HIRES_STRENGTH,
                                     "target": f"{int(height * HIRES_SCALE) // 8 * 8}x"
                                               f"{int(width * HIRES_SCALE) // 8 * 8}"},
                           "requests": {}}
    from ..errors import UnsupportedShapeError

    for what, (ours, theirs) in calls.items():
        try:
            ours(next(iter(pipes.values())))  # also the check that the engines serve it
        except UnsupportedShapeError as exc:
            log.warning("%s skipped: %s", what, exc.one_line())
            out["requests"][what] = {"skipped": exc.one_line()}
            continue
        for _ in range(cfg.warmup):
            for p in pipes.values():
                ours(p)
            theirs()
        times: dict[str, list[float]] = {name: [] for name in [*pipes, "diffusers"]}
        first: dict[str, np.ndarray] = {}
        for r in range(cfg.runs):
            for name, p in pipes.items():
                t0 = time.perf_counter()
                res = ours(p)
                times[name].append(time.perf_counter() - t0)
                first.setdefault(name, np.asarray(res.images))
            t0 = time.perf_counter()
            img = theirs()
            times["diffusers"].append(time.perf_counter() - t0)
            first.setdefault("diffusers", np.asarray(img))
            log.info("%s round %d/%d: %s", what, r + 1, cfg.runs,
                     ", ".join(f"{n} {t[-1] * 1e3:.0f} ms" for n, t in times.items()))
        rec: dict[str, Any] = {"results": {n: _summary(t) for n, t in times.items()}, "speedup_vs_diffusers": {},
                               "max_pixel_diff_255": {}}
        for name in pipes:
            rec["speedup_vs_diffusers"][name] = statistics.median(times["diffusers"]) / statistics.median(times[name])
            rec["max_pixel_diff_255"][name] = float(np.abs(first[name] - first["diffusers"]).max() * 255)
        out["requests"][what] = rec
    return out


def markdown(result: dict[str, Any]) -> str:
    hi = result["hires"]
    head = (f"\nInpainting and hires fix at {result['size']}, {result['steps']} steps, {result['scheduler']} "
            f"(hires: {hi['upscaler']} x{hi['scale']} -> {hi['target']}, strength {hi['strength']}), base only:")
    lines = [head, "",
             "| request | side | p50 s | mean s | speedup vs diffusers | max pixel diff (/255) |",
             "|---|---|---|---|---|---|"]
    for what, rec in result["requests"].items():
        if "skipped" in rec:
            lines.append(f"| {what} | skipped: {rec['skipped']} | | | | |")
            continue
        for side, s in rec["results"].items():
            sp = rec["speedup_vs_diffusers"].get(side)
            diff = rec["max_pixel_diff_255"].get(side)
            lines.append(f"| {what} | {side} | {s['p50_s']:.3f} | {s['mean_s']:.3f} | "
                         f"{'' if sp is None else f'{sp:.2f}x'} | {'' if diff is None else f'{diff:.3f}'} |")
    return "\n".join(lines)
