"""Acceptance: the runtime on ONNX Runtime CPU produces diffusers' images for the same seed.

The oracle is diffusers itself: ``StableDiffusionXLPipeline`` (``output_type="latent"``,
``denoising_end``) then ``StableDiffusionXLImg2ImgPipeline`` (``denoising_start``) on the
very same weights, exactly as diffusers documents base+refiner, with
``generator=torch.Generator("cpu").manual_seed(seed)``. The final latents are captured
with diffusers' own ``callback_on_step_end`` and the images are diffusers' own
``output_type="np"`` decode, so nothing of the runtime is used to compute the reference.

Two models: the embedded ``tiny`` preset (exported from the in-memory model) and the same
model saved as diffusers folders and exported from them (the real-checkpoint path), with
the reference pipelines loaded by diffusers' ``from_pretrained``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLPipeline,
    UniPCMultistepScheduler,
)
from fixtures import tiny_diffusers_folders, tiny_folder_artifacts
from sdxl_export.runtime import SDXLPipeline

PIXEL_TOL = 1 / 255  # on float images in [0, 1]
LATENT_TOL = 1e-4

#: The reference's schedulers, spelled the way diffusers' docs spell them.
REFERENCE_SCHEDULERS = {
    "euler": lambda cfg: EulerDiscreteScheduler.from_config(cfg),
    "euler_a": lambda cfg: EulerAncestralDiscreteScheduler.from_config(cfg),
    "dpmpp_2m_karras": lambda cfg: DPMSolverMultistepScheduler.from_config(
        cfg, algorithm_type="dpmsolver++", use_karras_sigmas=True),
    "ddim": lambda cfg: DDIMScheduler.from_config(cfg),
    "unipc": lambda cfg: UniPCMultistepScheduler.from_config(cfg),
}

LONG_PROMPT = " ".join(["a very detailed intricate baroque painting of a cathedral"] * 12)


@dataclass(frozen=True)
class Case:
    prompt: Any
    negative: Any
    height: int
    width: int
    guidance: float
    refiner: bool
    scheduler: str
    seed: int
    steps: int = 8
    images_per_prompt: int = 1
    denoising_end: float = 0.8
    micro: dict[str, Any] = field(default_factory=dict)  # original_size, crops, target_size
    aesthetic: tuple[float, float] = (6.0, 2.5)


TINY_CASES = {
    "square-euler-refiner": Case("a photo of a cat", None, 256, 256, 5.0, True, "euler", 0),
    "landscape-euler_a-batch2": Case(["a red car", "a tree on a hill"], None, 192, 320, 5.0, True, "euler_a", 1),
    "portrait-dpm-no_refiner-negative-batch2": Case(["a castle", "a dog"], "blurry, low quality", 320, 192, 5.0,
                                                   False, "dpmpp_2m_karras", 2),
    "wide-ddim-no_guidance": Case("a bowl of fruit", None, 128, 512, 1.0, True, "ddim", 3),
    "unipc-2_per_prompt-micro_conditioning": Case(
        "portrait of an astronaut", "", 256, 192, 6.0, True, "unipc", 4, images_per_prompt=2, denoising_end=0.7,
        micro={"original_size": (512, 512), "crops_coords_top_left": (16, 32), "target_size": (256, 192)},
        aesthetic=(7.0, 2.0)),
    "long_prompt-euler-refiner": Case(LONG_PROMPT, None, 384, 192, 5.0, True, "euler", 5, steps=6),
}

FOLDER_CASES = {
    "folder-euler-refiner-batch2": Case(["a lighthouse", "a forest"], None, 192, 384, 5.0, True, "euler", 6),
    "folder-dpm-no_refiner-no_guidance": Case("a mountain lake", None, 256, 256, 1.0, False, "dpmpp_2m_karras", 7),
}


class Reference:
    """diffusers' base + refiner pipelines on one set of weights."""

    def __init__(self, base: Any, refiner: Any):
        self.base, self.refiner = base, refiner
        self.base_config = dict(base.scheduler.config)
        self.refiner_config = dict(refiner.scheduler.config)
        for p in (base, refiner):
            p.set_progress_bar_config(disable=True)

    def __call__(self, c: Case) -> tuple[torch.Tensor, np.ndarray]:
        make = REFERENCE_SCHEDULERS[c.scheduler]
        self.base.scheduler = make(self.base_config)
        self.refiner.scheduler = make(self.refiner_config)
        final: dict[str, torch.Tensor] = {}

        def keep(pipe: Any, i: int, t: Any, kw: dict[str, Any]) -> dict[str, Any]:
            final["latents"] = kw["latents"].clone()
            return kw

        gen = torch.Generator("cpu").manual_seed(c.seed)
        common = dict(negative_prompt=c.negative, num_inference_steps=c.steps, guidance_scale=c.guidance,
                      generator=gen, num_images_per_prompt=c.images_per_prompt, **c.micro)
        with torch.no_grad():
            if not c.refiner:
                images = self.base(c.prompt, height=c.height, width=c.width, output_type="np",
                                   callback_on_step_end=keep, **common).images
            else:
                latents = self.base(c.prompt, height=c.height, width=c.width, output_type="latent",
                                    denoising_end=c.denoising_end, **common).images
                images = self.refiner(c.prompt, image=latents, denoising_start=c.denoising_end, output_type="np",
                                      aesthetic_score=c.aesthetic[0], negative_aesthetic_score=c.aesthetic[1],
                                      callback_on_step_end=keep, **common).images
        return final["latents"], images


def _ours(pipe: SDXLPipeline, c: Case) -> Any:
    return pipe(c.prompt, c.negative, height=c.height, width=c.width, num_inference_steps=c.steps,
                guidance_scale=c.guidance, denoising_end=c.denoising_end, refiner=c.refiner, seed=c.seed,
                num_images_per_prompt=c.images_per_prompt, scheduler=c.scheduler, output_type="np",
                aesthetic_score=c.aesthetic[0], negative_aesthetic_score=c.aesthetic[1], **c.micro)


def _compare(ours: Any, ref_latents: torch.Tensor, ref_images: np.ndarray, c: Case) -> None:
    assert ref_images.std() > 1e-3, "the reference image is flat: the comparison would prove nothing"
    assert ours.images.shape == ref_images.shape
    lat_err = float((ours.latents - ref_latents).abs().max())
    pix_err = float(np.abs(ours.images - ref_images).max())
    print(f"\nparity {c.scheduler} {c.height}x{c.width}: max |latent diff| {lat_err:.2e}, "
          f"max |pixel diff| {pix_err:.2e} ({pix_err * 255:.3f}/255)")
    assert lat_err <= LATENT_TOL, f"latents differ by {lat_err:.3e}"
    assert pix_err <= PIXEL_TOL, f"pixels differ by {pix_err * 255:.3f}/255"
    assert ours.info["refiner_steps"] > 0 if c.refiner else ours.info["refiner_steps"] == 0


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---- the embedded tiny preset ------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_pipe(tiny_artifacts):
    with SDXLPipeline.from_artifacts(tiny_artifacts, backend="onnxruntime", device="cpu") as pipe:
        yield pipe


@pytest.fixture(scope="module")
def tiny_reference(tiny_model):
    return Reference(tiny_model.base_pipeline(), tiny_model.refiner_pipeline())


@pytest.mark.parametrize("name", list(TINY_CASES))
def test_tiny_matches_diffusers(name, tiny_pipe, tiny_reference):
    c = TINY_CASES[name]
    ref_latents, ref_images = tiny_reference(c)
    _compare(_ours(tiny_pipe, c), ref_latents, ref_images, c)


# ---- the same model as diffusers folders, exported from the folders --------------------------
@pytest.fixture(scope="module")
def folder_pipe(tmp_path_factory, tiny_model):
    art = tiny_folder_artifacts(tmp_path_factory, tiny_model)
    with SDXLPipeline.from_artifacts(art, backend="onnxruntime", device="cpu") as pipe:
        yield pipe


@pytest.fixture(scope="module")
def folder_reference(tmp_path_factory, tiny_model):
    base_dir, refiner_dir = tiny_diffusers_folders(tmp_path_factory, tiny_model)
    base = StableDiffusionXLPipeline.from_pretrained(base_dir, add_watermarker=False, use_safetensors=True)
    refiner = StableDiffusionXLImg2ImgPipeline.from_pretrained(
        refiner_dir, text_encoder_2=base.text_encoder_2, vae=base.vae, add_watermarker=False, use_safetensors=True)
    return Reference(base, refiner)


@pytest.mark.parametrize("name", list(FOLDER_CASES))
def test_diffusers_folder_export_matches_diffusers(name, folder_pipe, folder_reference):
    c = FOLDER_CASES[name]
    ref_latents, ref_images = folder_reference(c)
    _compare(_ours(folder_pipe, c), ref_latents, ref_images, c)
