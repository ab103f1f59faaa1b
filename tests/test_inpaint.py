"""Acceptance: inpainting on ONNX Runtime CPU produces diffusers' images for the same seed.

The oracle is diffusers' own ``StableDiffusionXLInpaintPipeline`` on the very same weights:
the tiny preset (4-channel UNet: per-step blending) and ``tiny-inpaint`` (the same model with
a 9-channel inpainting base UNet), the base alone, the base + refiner hand-off as diffusers
documents it (``denoising_end`` / ``denoising_start``, the refiner as an inpaint pipeline), and
``padding_mask_crop``. Then every bad input: a named error.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLInpaintPipeline
from fixtures import tiny_inpaint_artifacts, tiny_inpaint_model
from PIL import Image, ImageDraw
from sdxl_export.errors import InpaintingModelError, InvalidImageError, InvalidMaskError, InvalidRequestError
from sdxl_export.runtime import SDXLPipeline
from test_img2img import test_image
from test_parity_diffusers import LATENT_TOL, PIXEL_TOL, REFERENCE_SCHEDULERS


def test_mask(height: int, width: int, box: tuple[float, float, float, float] = (0.25, 0.2, 0.7, 0.65)) -> Image.Image:
    """White (repaint) ellipse + rectangle on black, at fractions of the size: a mask with curved edges."""
    m = Image.new("L", (width, height), 0)
    d = ImageDraw.Draw(m)
    x0, y0, x1, y1 = box
    d.ellipse([x0 * width, y0 * height, x1 * width, y1 * height], fill=255)
    d.rectangle([0.6 * width, 0.6 * height, 0.8 * width, 0.9 * height], fill=200)
    return m


test_mask.__test__ = False  # a helper, not a test


@dataclass(frozen=True)
class Case:
    prompt: Any
    size: tuple[int, int]  # image (height, width)
    strength: float | None  # None: the default (0.9999)
    scheduler: str
    seed: int
    nine: bool = False  # the 9-channel inpainting UNet (tiny-inpaint)
    refiner: bool = False
    mask_size: tuple[int, int] | None = None  # a mask of another size than the image
    guidance: float = 5.0
    steps: int = 6
    images_per_prompt: int = 1
    crop: int | None = None


CASES = {
    "4ch-euler-default_strength": Case("a cat on a sofa", (128, 128), None, "euler", 0),
    "4ch-euler_a-1.0-mask_other_size": Case("a red door", (128, 192), 1.0, "euler_a", 1, mask_size=(64, 80)),
    "4ch+refiner-dpm_karras-0.7-2_per_prompt": Case("a castle", (128, 128), 0.7, "dpmpp_2m_karras", 2,
                                                    refiner=True, images_per_prompt=2),
    "4ch-crop16-euler": Case("a bird", (192, 128), None, "euler", 3, crop=16),
    "9ch-euler-default_strength": Case("a cat on a sofa", (128, 128), None, "euler", 4, nine=True),
    "9ch-unipc-1.0-no_guidance": Case("a lamp", (128, 192), 1.0, "unipc", 5, nine=True, guidance=1.0),
    "9ch+refiner-euler_a-0.8": Case("a boat", (128, 128), 0.8, "euler_a", 6, nine=True, refiner=True),
}


def _inputs(c: Case) -> tuple[Image.Image, Image.Image]:
    h, w = c.size
    mh, mw = c.mask_size or c.size
    return test_image(h, w, seed=c.seed), test_mask(mh, mw)


class Reference:
    """diffusers' inpaint pipelines (base, and the refiner's) on one model's weights."""

    def __init__(self, model: Any):
        self.base = StableDiffusionXLInpaintPipeline(**model.base_pipeline().components,
                                                     requires_aesthetics_score=False,
                                                     force_zeros_for_empty_prompt=True)
        self.refiner = StableDiffusionXLInpaintPipeline(**model.refiner_pipeline().components,
                                                        requires_aesthetics_score=True,
                                                        force_zeros_for_empty_prompt=False)
        self.configs = {p: dict(p.scheduler.config) for p in (self.base, self.refiner)}
        for p in (self.base, self.refiner):
            p.set_progress_bar_config(disable=True)

    def __call__(self, c: Case) -> tuple[torch.Tensor, np.ndarray]:
        for p, cfg in self.configs.items():
            p.scheduler = REFERENCE_SCHEDULERS[c.scheduler](cfg)
        final: dict[str, torch.Tensor] = {}

        def keep(pipe: Any, i: int, t: Any, kw: dict[str, Any]) -> dict[str, Any]:
            final["latents"] = kw["latents"].clone()
            return kw

        image, mask = _inputs(c)
        h, w = c.size
        kw: dict[str, Any] = {"num_inference_steps": c.steps, "guidance_scale": c.guidance, "height": h, "width": w,
                              "generator": torch.Generator("cpu").manual_seed(c.seed),
                              "num_images_per_prompt": c.images_per_prompt}
        if c.strength is not None:
            kw["strength"] = c.strength
        out_type = "pil" if c.crop is not None else "np"
        with torch.no_grad():
            if not c.refiner:
                images = self.base(c.prompt, image=image, mask_image=mask, padding_mask_crop=c.crop,
                                   output_type=out_type, callback_on_step_end=keep, **kw).images
            else:
                latents = self.base(c.prompt, image=image, mask_image=mask, denoising_end=0.8, output_type="latent",
                                    **kw).images
                images = self.refiner(c.prompt, image=latents, mask_image=mask, denoising_start=0.8,
                                      output_type=out_type, callback_on_step_end=keep, **kw).images
        if c.crop is not None:
            images = np.stack([np.asarray(i, dtype=np.float32) / 255 for i in images])
        return final["latents"], images


def _ours(pipe: SDXLPipeline, c: Case, **kw: Any) -> Any:
    image, mask = _inputs(c)
    return pipe(c.prompt, image=image, mask_image=mask, strength=c.strength, refiner=c.refiner,
                num_inference_steps=c.steps, guidance_scale=c.guidance, seed=c.seed, scheduler=c.scheduler,
                num_images_per_prompt=c.images_per_prompt, padding_mask_crop=c.crop,
                output_type="np", **kw)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def pipe(tiny_ort_pipe):
    return tiny_ort_pipe


@pytest.fixture(scope="module")
def pipe9(tmp_path_factory):
    with SDXLPipeline.from_artifacts(tiny_inpaint_artifacts(tmp_path_factory), backend="onnxruntime",
                                     device="cpu") as p:
        yield p


@pytest.fixture(scope="module")
def references(tiny_model):
    return {False: Reference(tiny_model), True: Reference(tiny_inpaint_model())}


@pytest.mark.parametrize("name", list(CASES))
def test_inpaint_matches_diffusers(name, pipe, pipe9, references):
    c = CASES[name]
    ref_latents, ref_images = references[c.nine](c)
    ours = _ours(pipe9 if c.nine else pipe, c)
    assert ref_images.std() > 1e-3, "the reference image is flat: the comparison would prove nothing"
    assert ours.images.shape == ref_images.shape
    assert ours.info["inpaint"] and ours.info["inpainting_unet"] == c.nine
    lat_err = float((ours.latents - ref_latents).abs().max())
    pix_err = float(np.abs(ours.images - ref_images).max())
    print(f"\ninpaint parity {name}: max |latent diff| {lat_err:.2e}, max |pixel diff| {pix_err * 255:.3f}/255")
    assert lat_err <= LATENT_TOL, f"latents differ by {lat_err:.3e}"
    assert pix_err <= PIXEL_TOL + (1e-6 if c.crop is None else 0), f"pixels differ by {pix_err * 255:.3f}/255"


def test_outside_the_mask_the_latents_are_the_images(pipe):
    """What inpainting is for: two prompts, same seed (so the same image latents): the final
    latents agree exactly outside the (latent) mask and differ inside it."""
    c = CASES["4ch-euler-default_strength"]
    image, mask = _inputs(c)
    a, b = (pipe(p, image=image, mask_image=mask, num_inference_steps=4, seed=1, refiner=False, output_type="latent")
            for p in ("a red cat", "a blue bird"))
    m = torch.nn.functional.interpolate(pipe_mask(mask), size=tuple(a.latents.shape[-2:])) > 0.5
    m = m.expand_as(a.latents)
    assert float((a.latents - b.latents)[~m].abs().max()) == 0.0
    assert float((a.latents - b.latents)[m].abs().mean()) > 1e-3


def pipe_mask(mask: Image.Image) -> torch.Tensor:
    arr = torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255)[None, None]
    return (arr >= 0.5).float()


def test_a_9_channel_unet_refuses_txt2img_and_img2img(pipe9):
    with pytest.raises(InpaintingModelError, match="inpainting UNet"):
        pipe9("a cat", num_inference_steps=2, height=64, width=64)
    with pytest.raises(InpaintingModelError):
        pipe9("a cat", image=test_image(64, 64), num_inference_steps=4)


def test_bad_masks_are_named(pipe, tmp_path):
    img = test_image(64, 64)
    with pytest.raises(InvalidMaskError, match="empty"):
        pipe("x", image=img, mask_image=Image.new("L", (64, 64), 0), num_inference_steps=2)
    bad = tmp_path / "mask.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(InvalidImageError, match="mask"):
        pipe("x", image=img, mask_image=bad, num_inference_steps=2)
    with pytest.raises(InvalidMaskError, match="must be an image"):
        pipe("x", image=img, mask_image=3.5, num_inference_steps=2)
    with pytest.raises(InvalidImageError, match="without an image"):
        pipe("x", mask_image=test_mask(64, 64), num_inference_steps=2)
    with pytest.raises(InvalidRequestError, match="padding_mask_crop"):
        pipe("x", image=img, padding_mask_crop=8, num_inference_steps=2)
    with pytest.raises(InvalidRequestError, match="padding_mask_crop"):
        pipe("x", image=img, mask_image=test_mask(64, 64), padding_mask_crop=-1, num_inference_steps=2)
    with pytest.raises(InvalidRequestError, match="refiner_only"):
        pipe("x", image=img, mask_image=test_mask(64, 64), refiner_only=True, num_inference_steps=2)
    # the pipeline still works after every refusal
    out = pipe("x", image=img, mask_image=test_mask(64, 64), num_inference_steps=2, refiner=False, seed=0)
    assert out.images[0].size == (64, 64)


def test_cli_run_mask_writes_the_pipelines_image(pipe, tiny_artifacts, tmp_path):
    from sdxl_export.cli import main

    img, mask = tmp_path / "in.png", tmp_path / "mask.png"
    test_image(128, 128, seed=3).save(img)
    test_mask(128, 128).save(mask)
    out = tmp_path / "out.png"
    rc = main(["run", "a bird", "--artifacts", str(tiny_artifacts), "--image", str(img), "--mask", str(mask),
               "--strength", "0.8", "--mask-crop", "8", "--steps", "4", "--seed", "7", "--no-refiner",
               "--backend", "onnxruntime", "--out", str(out)])
    assert rc == 0
    want = pipe("a bird", image=Image.open(img), mask_image=Image.open(mask), strength=0.8, padding_mask_crop=8,
                num_inference_steps=4, seed=7, refiner=False).images[0]
    got = np.asarray(Image.open(out), dtype=np.int16)
    assert got.shape == (128, 128, 3)
    assert np.abs(got - np.asarray(want, dtype=np.int16)).max() == 0


def test_the_spec_planner_and_loader_know_the_9_channel_variant():
    """specs.py is the single source: a 9-channel base widens ``sample`` (not ``noise_pred``), and the
    planner's profiles follow it; the loader accepts 9 channels on the base only."""
    from sdxl_export.buckets import buckets_for
    from sdxl_export.engines.planner import plan_component
    from sdxl_export.engines.sources import dims_for_source
    from sdxl_export.errors import ModelSourceError
    from sdxl_export.models.loader import dims_from_configs
    from sdxl_export.models.presets import get_preset
    from sdxl_export.specs import ModelDims, component_specs

    dims = dims_for_source("tiny-inpaint")
    assert dims.unet_in_channels == 9 and dims.inpainting
    specs = component_specs(dims)
    unet = {t.name: t.shape for t in specs["unet"].inputs}
    assert unet["sample"][1] == 9 and specs["unet"].outputs[0].shape[1] == 4
    assert {t.name: t.shape for t in specs["refiner_unet"].inputs}["sample"][1] == 4
    assert ModelDims.from_dict(dims.to_dict()) == dims
    assert "unet_in_channels" not in dims_for_source("tiny").to_dict()  # old manifests unchanged
    plan = plan_component(specs["unet"], buckets_for(256)[:3], [1], "static", 256)
    assert plan.profiles and all(p.shapes["sample"][0][1] == 9 for p in plan.profiles)
    cfg = get_preset("tiny-inpaint")
    with pytest.raises(ModelSourceError, match="refiner"):
        dims_from_configs(cfg.text_encoder | {"vocab_size": 10}, cfg.text_encoder_2, cfg.unet, cfg.vae,
                          dict(cfg.refiner_unet, in_channels=9))
    with pytest.raises(ModelSourceError, match="7 channels"):
        dims_from_configs(cfg.text_encoder | {"vocab_size": 10}, cfg.text_encoder_2, dict(cfg.unet, in_channels=7),
                          cfg.vae)
