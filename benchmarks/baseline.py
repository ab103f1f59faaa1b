"""The baseline: diffusers' own SDXL pipelines, eager PyTorch, on the exported weights.

Which weights: the artifact folder's ``torch/<module>`` folders (safetensors written by
the export from the very model it traced), with the folder's tokenizers and scheduler
configs, so the baseline computes exactly what was exported. An export made without
torch weights falls back to the manifest's ``source`` (preset name or diffusers folder),
loaded with :func:`sdxl_export.models.load_model`, and its fingerprint must match the
export's, or the comparison would be between two different models.

How it runs: as diffusers documents base + refiner -- ``StableDiffusionXLPipeline`` with
``output_type="latent"`` and ``denoising_end``, then ``StableDiffusionXLImg2ImgPipeline``
with ``denoising_start`` -- with the same prompt, size, steps, guidance, scheduler and
seed as our pipeline. Per-stage times come from forward hooks on the modules (each text
encoder, every UNet call, the VAE decode), so the baseline's stages line up with
:class:`~sdxl_export.runtime.timing.StageTimings`.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import ArtifactError, MissingComponentError
from ..runtime.backends.torch import module_class
from ..runtime.timing import StageTimings

log = logging.getLogger(__name__)

TORCH_PARTS = ("text_encoder", "text_encoder_2", "unet", "vae")


@dataclass
class BaselineResult:
    """One baseline call: final latents, images (N, H, W, 3) in [0, 1], stage times.

    ``timings`` is the runtime's own :class:`StageTimings` (same stage names), so the
    benchmark treats both sides alike, overhead included.
    """

    latents: torch.Tensor
    images: np.ndarray
    timings: StageTimings


def _load_module(root: Path, asset: dict[str, Any]) -> torch.nn.Module:
    cls = module_class(asset.get("class_name"), root / asset["dir"])
    module = cls.from_pretrained(str(root / asset["dir"]), use_safetensors=True)
    return module.eval().requires_grad_(False)


@contextlib.contextmanager
def _no_progress_bars() -> Iterator[None]:
    """transformers draws a progress bar per from_pretrained: not ours to print."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def load_reference_model(artifacts: str | Path) -> Any:
    """An :class:`~sdxl_export.models.loader.SDXLModel` holding the export's own weights."""
    from ..models.loader import SDXLModel, load_model
    from ..runtime.artifact_reader import read_artifacts

    arts = read_artifacts(artifacts, with_refiner=True)
    assets = arts.manifest.get("assets", {})
    has_refiner = arts.has_refiner
    wanted = [*TORCH_PARTS, *(["refiner_unet"] if has_refiner else [])]
    if all(f"torch/{p}" in assets for p in wanted):
        log.info("baseline: diffusers on the export's torch/ weights (%s)", arts.root)
        with _no_progress_bars():
            mods = {p: _load_module(arts.root, assets[f"torch/{p}"]) for p in wanted}
        return SDXLModel(
            tokenizer=arts.tokenizer("tokenizer"), tokenizer_2=arts.tokenizer("tokenizer_2"),
            text_encoder=mods["text_encoder"], text_encoder_2=mods["text_encoder_2"], unet=mods["unet"],
            vae=mods["vae"], scheduler_config=arts.scheduler_config(),
            refiner_unet=mods.get("refiner_unet"),
            refiner_scheduler_config=arts.scheduler_config(refiner=True) if has_refiner else None,
            source=dict(arts.manifest.get("source", {})),
        )
    source = arts.manifest.get("source", {})
    if not source.get("id"):
        raise MissingComponentError(f"{arts.root} has no torch/ weights and records no model source",
                                    "re-export without --no-torch-weights, or pass --baseline none")
    log.info("baseline: no torch/ weights in %s, loading the source %s", arts.root, source["id"])
    model = load_model(source["id"], refiner=source.get("refiner"), with_refiner=has_refiner, vae=source.get("vae"))
    if model.source.get("fingerprint") != source.get("fingerprint"):
        raise ArtifactError(
            f"the model source {source['id']} changed since {arts.root} was exported",
            "re-export it (`sdxl-export export`), or pass --baseline none",
        )
    return model


class StageHooks:
    """Forward hooks that time each component call into named stages."""

    def __init__(self) -> None:
        self.stages: dict[str, list[float]] = {}
        self.phase = "base"
        self._handles: list[Any] = []
        self._start: dict[int, float] = {}

    def attach(self, module: torch.nn.Module | None, stage: Callable[[], str]) -> None:
        if module is None:
            return
        key = id(module)

        def pre(_m: Any, _args: Any) -> None:
            self._start[key] = time.perf_counter()

        def post(_m: Any, _args: Any, _out: Any) -> None:
            self.stages.setdefault(stage(), []).append(time.perf_counter() - self._start.pop(key))

        self._handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]

    def reset(self) -> dict[str, list[float]]:
        out, self.stages = self.stages, {}
        return out

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


class DiffusersBaseline:
    """diffusers' base (+ refiner) pipelines over one :class:`SDXLModel`, timed per stage."""

    def __init__(self, model: Any):
        self.model = model
        self.base = model.base_pipeline()
        self.refiner = model.refiner_pipeline() if model.has_refiner else None
        self._base_cfg = dict(self.base.scheduler.config)
        self._refiner_cfg = dict(self.refiner.scheduler.config) if self.refiner is not None else None
        for p in (self.base, self.refiner):
            if p is not None:
                p.set_progress_bar_config(disable=True)
        self.hooks = StageHooks()
        h = self.hooks
        h.attach(model.text_encoder, lambda: "text_encoder")
        h.attach(model.text_encoder_2, lambda: "text_encoder_2" if h.phase == "base" else "refiner_text_encoder_2")
        h.attach(model.unet, lambda: "unet")
        h.attach(model.refiner_unet, lambda: "refiner_unet")
        # The pipelines decode with vae.decode(): post_quant_conv then the decoder.
        first = model.vae.post_quant_conv if getattr(model.vae, "post_quant_conv", None) is not None \
            else model.vae.decoder
        self._attach_span(first, model.vae.decoder, "vae_decoder")

    def _attach_span(self, first: torch.nn.Module, last: torch.nn.Module, stage: str) -> None:
        h = self.hooks
        start: list[float] = []

        def pre(_m: Any, _args: Any) -> None:
            start.append(time.perf_counter())

        def post(_m: Any, _args: Any, _out: Any) -> None:
            h.stages.setdefault(stage, []).append(time.perf_counter() - start.pop())

        h._handles += [first.register_forward_pre_hook(pre), last.register_forward_hook(post)]

    @property
    def has_refiner(self) -> bool:
        return self.refiner is not None

    def close(self) -> None:
        self.hooks.detach()

    def __call__(self, prompts: list[str], *, height: int, width: int, steps: int, guidance_scale: float,
                 denoising_end: float, refiner: bool, seed: int, scheduler: str = "euler") -> BaselineResult:
        from ..runtime.schedulers import make_scheduler

        self.base.scheduler = make_scheduler(scheduler, self._base_cfg)
        final: dict[str, torch.Tensor] = {}

        def keep(_pipe: Any, _i: int, _t: Any, kw: dict[str, Any]) -> dict[str, Any]:
            final["latents"] = kw["latents"]
            return kw

        gen = torch.Generator("cpu").manual_seed(seed)
        common: dict[str, Any] = {"num_inference_steps": steps, "guidance_scale": guidance_scale,
                                  "generator": gen, "callback_on_step_end": keep}
        self.hooks.reset()
        t0 = time.perf_counter()
        with torch.no_grad():
            self.hooks.phase = "base"
            if refiner and self.refiner is not None:
                assert self._refiner_cfg is not None
                self.refiner.scheduler = make_scheduler(scheduler, self._refiner_cfg)
                latents = self.base(prompts, height=height, width=width, output_type="latent",
                                    denoising_end=denoising_end, **common).images
                self.hooks.phase = "refiner"
                images = self.refiner(prompts, image=latents, denoising_start=denoising_end, output_type="np",
                                      **common).images
            else:
                images = self.base(prompts, height=height, width=width, output_type="np", **common).images
        total = time.perf_counter() - t0
        return BaselineResult(latents=final["latents"], images=np.asarray(images),
                              timings=StageTimings(stages=self.hooks.reset(), total=total))
