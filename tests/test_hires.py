"""Acceptance: hires fix is diffusers' txt2img, the same upscale, then diffusers' img2img.

The oracle composes diffusers' own pipelines on the tiny model's weights with one generator:
``StableDiffusionXLPipeline`` (+ the refiner's img2img hand-off when asked) -> the upscale
(``torch.nn.functional.interpolate`` on the latents, or PIL's resize on the images) ->
``StableDiffusionXLImg2ImgPipeline`` at the target size. Then the named errors: an upscaler
that needs weights, an unserved target (refused before any work), hires with an image.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLImg2ImgPipeline
from PIL import Image
from sdxl_export.errors import InvalidRequestError, UnknownUpscalerError, UnsupportedShapeError
from sdxl_export.runtime import SDXLPipeline
from sdxl_export.runtime.hires import UPSCALERS, find_upscaler
from test_parity_diffusers import LATENT_TOL, PIXEL_TOL, REFERENCE_SCHEDULERS


@dataclass(frozen=True)
class Case:
    prompt: str
    size: tuple[int, int]
    scale: float
    upscaler: str
    scheduler: str
    seed: int
    steps: int = 5
    hires_steps: int = 4
    strength: float = 0.7
    refiner: bool = False
    guidance: float = 5.0


CASES = {
    "latent-euler-1.5": Case("a castle on a hill", (128, 128), 1.5, "latent", "euler", 0),
    "latent_bicubic_aa-dpm_karras-2": Case("a red car", (64, 128), 2.0, "Latent (bicubic antialiased)",
                                          "dpmpp_2m_karras", 1, strength=0.5),
    "lanczos-euler_a-2": Case("a bowl of fruit", (64, 64), 2.0, "lanczos", "euler_a", 2),
    "nearest_exact+refiner-euler-1.5": Case("a lighthouse", (128, 128), 1.5, "latent-nearest-exact", "euler", 3,
                                            refiner=True),
}


def _target(c: Case) -> tuple[int, int]:
    return int(c.size[0] * c.scale) // 8 * 8, int(c.size[1] * c.scale) // 8 * 8


class Reference:
    def __init__(self, model: Any):
        self.base = model.base_pipeline()
        self.refiner = model.refiner_pipeline()
        self.i2i = StableDiffusionXLImg2ImgPipeline(**self.base.components, requires_aesthetics_score=False,
                                                    force_zeros_for_empty_prompt=True)
        self.configs = {p: dict(p.scheduler.config) for p in (self.base, self.refiner, self.i2i)}
        for p in self.configs:
            p.set_progress_bar_config(disable=True)

    def __call__(self, c: Case) -> tuple[torch.Tensor, np.ndarray]:
        for p, cfg in self.configs.items():
            p.scheduler = REFERENCE_SCHEDULERS[c.scheduler](cfg)
        final: dict[str, torch.Tensor] = {}

        def keep(pipe: Any, i: int, t: Any, kw: dict[str, Any]) -> dict[str, Any]:
            final["latents"] = kw["latents"].clone()
            return kw

        gen = torch.Generator("cpu").manual_seed(c.seed)
        u = find_upscaler(c.upscaler)
        h, w = c.size
        th, tw = _target(c)
        common = {"guidance_scale": c.guidance, "generator": gen}
        with torch.no_grad():
            first_type = "latent" if u.kind == "latent" or c.refiner else "pil"
            first = self.base(c.prompt, height=h, width=w, num_inference_steps=c.steps, output_type=first_type,
                              denoising_end=0.8 if c.refiner else None, **common).images
            if c.refiner:
                first = self.refiner(c.prompt, image=first, num_inference_steps=c.steps, denoising_start=0.8,
                                     output_type="latent" if u.kind == "latent" else "pil", **common).images
            if u.kind == "latent":
                up: Any = torch.nn.functional.interpolate(first, size=(th // 8, tw // 8), mode=u.mode,
                                                          antialias=u.antialias)
            else:
                up = [im.resize((tw, th), {"lanczos": Image.LANCZOS, "nearest": Image.NEAREST}[u.mode]) for im in first]
            images = self.i2i(c.prompt, image=up, strength=c.strength, num_inference_steps=c.hires_steps,
                              height=th, width=tw, output_type="np", callback_on_step_end=keep, **common).images
        return final["latents"], images


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def pipe(tiny_ort_pipe):
    return tiny_ort_pipe


@pytest.fixture(scope="module")
def reference(tiny_model):
    return Reference(tiny_model)


def _ours(pipe: SDXLPipeline, c: Case) -> Any:
    return pipe(c.prompt, height=c.size[0], width=c.size[1], num_inference_steps=c.steps, seed=c.seed,
                scheduler=c.scheduler, guidance_scale=c.guidance, refiner=c.refiner, hires_scale=c.scale,
                hires_upscaler=c.upscaler, hires_steps=c.hires_steps, hires_strength=c.strength, output_type="np")


@pytest.mark.parametrize("name", list(CASES))
def test_hires_fix_is_diffusers_composition(name, pipe, reference):
    c = CASES[name]
    ref_latents, ref_images = reference(c)
    ours = _ours(pipe, c)
    assert ref_images.std() > 1e-3
    assert ours.images.shape == ref_images.shape == (1, *_target(c), 3)
    lat_err = float((ours.latents - ref_latents).abs().max())
    pix_err = float(np.abs(ours.images - ref_images).max())
    print(f"\nhires parity {name}: max |latent diff| {lat_err:.2e}, max |pixel diff| {pix_err * 255:.3f}/255")
    # A pixel upscaler goes through the first pass's uint8 image: one pixel level that rounds the
    # other way (float noise between ORT and PyTorch) moves the re-encoded latents by ~2e-4.
    lat_tol = LATENT_TOL if find_upscaler(c.upscaler).kind == "latent" else 1e-3
    assert lat_err <= lat_tol and pix_err <= PIXEL_TOL
    hi = ours.info["hires"]
    assert hi["target"] == list(_target(c)) and hi["first_size"] == list(c.size)
    assert ours.info["base_steps"] == int(c.hires_steps * c.strength)


def test_upscalers_are_named_and_weighted_ones_refused():
    assert {u.a1111 for u in UPSCALERS} >= {"Latent", "Latent (antialiased)", "Latent (bicubic)",
                                           "Latent (bicubic antialiased)", "Latent (nearest)",
                                           "Latent (nearest-exact)", "Lanczos", "Nearest"}
    assert find_upscaler("None").name == "lanczos"
    for name in ("R-ESRGAN 4x+", "ESRGAN_4x", "SwinIR_4x"):
        with pytest.raises(UnknownUpscalerError, match="ESRGAN family") as e:
            find_upscaler(name)
        assert "latent-bicubic" in e.value.hint and "lanczos" in e.value.hint
    with pytest.raises(UnknownUpscalerError, match="unknown upscaler"):
        find_upscaler("sharpen")


def test_bad_hires_arguments_are_named(pipe):
    with pytest.raises(UnknownUpscalerError):
        pipe("x", hires_scale=2, hires_upscaler="R-ESRGAN 4x+", num_inference_steps=2)
    with pytest.raises(InvalidRequestError, match="hires_scale"):
        pipe("x", hires_scale=0.5, num_inference_steps=2)
    with pytest.raises(InvalidRequestError, match="not both"):
        pipe("x", hires_scale=2, hires_size=(512, 512), num_inference_steps=2)
    with pytest.raises(InvalidRequestError, match="text-to-image"):
        pipe("x", hires_scale=2, image=Image.new("RGB", (64, 64)), num_inference_steps=2)
    with pytest.raises(InvalidRequestError, match="multiples of 8"):
        pipe("x", hires_size=(100, 128), num_inference_steps=2, height=64, width=64)
    with pytest.raises(InvalidRequestError, match="rounds down to no denoising step"):
        pipe("x", hires_scale=2, hires_strength=0.1, hires_steps=2, num_inference_steps=2, height=64, width=64)


@pytest.fixture(scope="module")
def hires_twin(tmp_path_factory, tiny_artifacts):
    """ONNX Runtime twin engines over one bucket (256x256) plus its hires target at 1.5 (384x384)."""
    import shutil

    from sdxl_export.engines.build import BuildOptions, build

    out = tmp_path_factory.mktemp("tiny-hires-twin") / "artifacts"
    shutil.copytree(tiny_artifacts, out)
    build(BuildOptions(out=out, backend="onnxruntime", buckets="256x256", hires_scales=(1.5,), batch_sizes=(1,),
                       profiles="static", validate=False))
    with SDXLPipeline.from_artifacts(out, backend="onnxruntime", device="cpu") as p:
        yield p


def test_build_hires_scale_serves_the_target_and_an_unserved_one_is_refused_first(hires_twin):
    assert hires_twin.served_sizes() == [(256, 256), (384, 384)]

    class Counting:  # the real runner, its calls counted: "refused before any work" is observable
        def __init__(self, runner: Any):
            self.runner, self.calls = runner, 0

        def __call__(self, feeds: Any) -> Any:
            self.calls += 1
            return self.runner(feeds)

        def __getattr__(self, name: str) -> Any:
            return getattr(self.runner, name)

    real = hires_twin.runners["unet"]
    hires_twin.runners["unet"] = counted = Counting(real)
    try:
        with pytest.raises(UnsupportedShapeError, match="hires target 512x512") as e:
            hires_twin("x", hires_scale=2, num_inference_steps=2, refiner=False)
        assert "--hires-scale" in e.value.hint and "384x384" in e.value.hint
        assert counted.calls == 0
        out = hires_twin("x", hires_scale=1.5, num_inference_steps=2, hires_steps=2, hires_strength=0.5,
                         refiner=False, seed=0)
        assert out.images[0].size == (384, 384)
        assert counted.calls == 2 + 1  # 2 first-pass steps + int(2 x 0.5) second-pass steps
    finally:
        hires_twin.runners["unet"] = real


def test_cli_run_hires_writes_the_pipelines_image(pipe, tiny_artifacts, tmp_path):
    from fixtures import run_cli

    out = tmp_path / "hires.png"
    rc, stdout, err = run_cli("run", "a hill", "--artifacts", str(tiny_artifacts), "--height", "64", "--width", "64",
                              "--steps", "3", "--seed", "5", "--no-refiner", "--hires-scale", "2", "--hires-upscaler",
                              "Latent (bicubic)", "--hires-steps", "4", "--hires-strength", "0.5", "--backend",
                              "onnxruntime", "--device", "cpu", "--out", str(out))
    assert rc == 0, err
    assert "hires fix: 64x64 -> latent-bicubic -> 128x128" in stdout
    want = pipe("a hill", height=64, width=64, num_inference_steps=3, seed=5, refiner=False, hires_scale=2,
                hires_upscaler="latent-bicubic", hires_steps=4, hires_strength=0.5).images[0]
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(want))
    rc, stdout, err = run_cli("run", "x", "--artifacts", str(tiny_artifacts), "--hires-scale", "2",
                              "--hires-upscaler", "R-ESRGAN 4x+", "--backend", "onnxruntime", "--out",
                              str(tmp_path / "o.png"))
    assert rc == 2 and "ESRGAN" in err and "lanczos" in err
