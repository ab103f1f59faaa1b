"""Acceptance: image-to-image on ONNX Runtime CPU produces diffusers' images for the same seed.

The oracle is diffusers' own ``StableDiffusionXLImg2ImgPipeline`` on the very same weights:
built from the base's components for img2img on the base (``strength``; with the refiner
hand-off ``output_type="latent"``, ``denoising_end`` then the refiner's pipeline with
``denoising_start``, as diffusers documents it), and the refiner's pipeline alone for
"refine this image". Same input image, ``generator=torch.Generator("cpu").manual_seed(seed)``.
Nothing of the runtime computes the reference. Then every bad input: a named error.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLImg2ImgPipeline
from fixtures import ort_twin_artifacts
from PIL import Image
from sdxl_export.errors import InvalidImageError, InvalidRequestError, UnsupportedShapeError
from sdxl_export.runtime import SDXLPipeline
from test_parity_diffusers import LATENT_TOL, PIXEL_TOL, REFERENCE_SCHEDULERS


def test_image(height: int, width: int, seed: int = 0) -> Image.Image:
    """A deterministic, busy RGB image (gradients, a pattern, noise): encodes to varied latents."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    arr = np.stack([xx / max(width - 1, 1), yy / max(height - 1, 1), (xx * yy % 97) / 97], -1) * 200
    return Image.fromarray((arr + rng.integers(0, 55, arr.shape)).astype(np.uint8))


test_image.__test__ = False  # a helper, not a test


@dataclass(frozen=True)
class Case:
    prompt: Any
    size: tuple[int, int]  # the input image's (height, width)
    strength: float
    scheduler: str
    seed: int
    refiner: bool = False
    refiner_only: bool = False
    negative: Any = None
    guidance: float = 5.0
    steps: int = 8
    images_per_prompt: int = 1
    as_array: bool = False  # the image as a float (H, W, 3) array instead of PIL
    generators: bool = False  # one generator per image (diffusers encodes each image with its own)


CASES = {
    "base-euler-0.5": Case("a photo of a cat", (256, 256), 0.5, "euler", 0),
    "base-dpm_karras-0.35-landscape-batch2": Case(["a red car", "a tree"], (192, 320), 0.35, "dpmpp_2m_karras", 1),
    "base-ddim-1.0-array-no_guidance": Case("a bowl of fruit", (128, 256), 1.0, "ddim", 2, guidance=1.0,
                                            as_array=True),
    "base+refiner-euler_a-0.6": Case("a castle", (256, 256), 0.6, "euler_a", 3, refiner=True),
    "base+refiner-unipc-0.8-negative-generators": Case(["a dog", "a boat"], (192, 320), 0.8, "unipc", 4,
                                                       refiner=True, negative="blurry", generators=True),
    "refiner_only-euler-0.3": Case("a sharp photo", (256, 256), 0.3, "euler", 5, refiner_only=True),
    "refiner_only-dpm_karras-0.5-2_per_prompt": Case("a detailed portrait", (320, 192), 0.5, "dpmpp_2m_karras",
                                                     6, refiner_only=True, negative="", images_per_prompt=2),
}


def _generator(c: Case) -> torch.Generator | list[torch.Generator]:
    n = (len(c.prompt) if isinstance(c.prompt, list) else 1) * c.images_per_prompt
    if c.generators:
        return [torch.Generator("cpu").manual_seed(c.seed + i) for i in range(n)]
    return torch.Generator("cpu").manual_seed(c.seed)


def _image(c: Case) -> Any:
    img = test_image(*c.size, seed=c.seed)
    return np.asarray(img, dtype=np.float32) / 255.0 if c.as_array else img


class Reference:
    """diffusers' img2img pipelines on the tiny model's weights: the base's and the refiner's."""

    def __init__(self, model: Any):
        base = model.base_pipeline()
        self.base = StableDiffusionXLImg2ImgPipeline(**base.components, requires_aesthetics_score=False,
                                                     force_zeros_for_empty_prompt=True)
        self.refiner = model.refiner_pipeline()
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

        common = {"negative_prompt": c.negative, "num_inference_steps": c.steps, "guidance_scale": c.guidance,
                      "generator": _generator(c), "num_images_per_prompt": c.images_per_prompt}
        with torch.no_grad():
            if c.refiner_only:
                images = self.refiner(c.prompt, image=_image(c), strength=c.strength, output_type="np",
                                      callback_on_step_end=keep, **common).images
            elif not c.refiner:
                images = self.base(c.prompt, image=_image(c), strength=c.strength, output_type="np",
                                   callback_on_step_end=keep, **common).images
            else:
                latents = self.base(c.prompt, image=_image(c), strength=c.strength, output_type="latent",
                                    denoising_end=0.8, **common).images
                images = self.refiner(c.prompt, image=latents, denoising_start=0.8, output_type="np",
                                      callback_on_step_end=keep, **common).images
        return final["latents"], images


def _ours(pipe: SDXLPipeline, c: Case, **kw: Any) -> Any:
    return pipe(c.prompt, c.negative, image=_image(c), strength=c.strength, refiner=c.refiner or c.refiner_only,
                refiner_only=c.refiner_only, num_inference_steps=c.steps, guidance_scale=c.guidance,
                generator=_generator(c), num_images_per_prompt=c.images_per_prompt, scheduler=c.scheduler,
                output_type="np", **kw)


def _compare(ours: Any, ref_latents: torch.Tensor, ref_images: np.ndarray, name: str) -> None:
    assert ref_images.std() > 1e-3, "the reference image is flat: the comparison would prove nothing"
    assert ours.images.shape == ref_images.shape
    lat_err = float((ours.latents - ref_latents).abs().max())
    pix_err = float(np.abs(ours.images - ref_images).max())
    print(f"\nimg2img parity {name}: max |latent diff| {lat_err:.2e}, max |pixel diff| {pix_err * 255:.3f}/255")
    assert lat_err <= LATENT_TOL, f"latents differ by {lat_err:.3e}"
    assert pix_err <= PIXEL_TOL, f"pixels differ by {pix_err * 255:.3f}/255"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def pipe(tiny_ort_pipe):
    return tiny_ort_pipe


@pytest.fixture(scope="module")
def reference(tiny_model):
    return Reference(tiny_model)


@pytest.mark.parametrize("name", list(CASES))
def test_img2img_matches_diffusers(name, pipe, reference):
    c = CASES[name]
    ref_latents, ref_images = reference(c)
    ours = _ours(pipe, c)
    _compare(ours, ref_latents, ref_images, name)
    assert ours.info["img2img"] and ours.info["strength"] == c.strength
    assert (ours.info["base_steps"] == 0) == c.refiner_only
    assert (ours.info["refiner_steps"] > 0) == (c.refiner or c.refiner_only)
    assert ours.timings.to_dict()  # the encode is timed like every stage


# ---- through built engines (the ORT twin over fixed buckets) --------------------------------
@pytest.fixture(scope="module")
def twin_pipe(tmp_path_factory, tiny_artifacts):
    art = ort_twin_artifacts(tmp_path_factory, tiny_artifacts)
    with SDXLPipeline.from_artifacts(art, backend="onnxruntime", device="cpu") as p:
        yield p


def test_img2img_through_the_vae_encoder_engine_matches_diffusers(twin_pipe, reference):
    assert twin_pipe.runners["vae_encoder"].engine_entry is not None  # the engine, not the plain export
    c = Case("a lighthouse", (192, 320), 0.6, "euler", 7, refiner=True)
    ref_latents, ref_images = reference(c)
    _compare(_ours(twin_pipe, c), ref_latents, ref_images, "engine")
    assert twin_pipe.serves(1, 192, 320, img2img=True) and not twin_pipe.serves(2, 192, 320, img2img=True)


def test_an_image_of_a_size_the_engines_do_not_serve_names_the_served_sizes(twin_pipe):
    with pytest.raises(UnsupportedShapeError, match=r"the image is 320x320.*served: 192x320, 256x256") as e:
        twin_pipe("x", image=test_image(320, 320), strength=0.5, num_inference_steps=2, seed=0)
    assert "resize" in e.value.hint
    # height/width resize the image to a served size: then it runs.
    out = twin_pipe("x", image=test_image(320, 320), height=256, width=256, strength=0.5, num_inference_steps=2,
                    seed=0, refiner=False, output_type="latent")
    assert out.info["height"] == 256 and out.info["width"] == 256


# ---- bad input ----------------------------------------------------------------------------------
@pytest.mark.parametrize("strength", [0.0, -0.1, 1.5, float("nan"), "0.5"])
def test_strength_outside_0_1_is_refused(pipe, strength):
    with pytest.raises(InvalidRequestError, match="strength"):
        pipe.check_call("x", image=test_image(64, 64), strength=strength)


def test_strength_that_rounds_to_no_step_is_refused(pipe):
    with pytest.raises(InvalidRequestError, match="no denoising step") as e:
        pipe.check_call("x", image=test_image(64, 64), strength=0.1, num_inference_steps=5)
    assert "strength" in e.value.hint


def test_img2img_arguments_without_an_image_are_refused(pipe):
    with pytest.raises(InvalidRequestError, match="no image was given"):
        pipe.check_call("x", strength=0.5)
    with pytest.raises(InvalidRequestError, match="refiner_only needs an image"):
        pipe.check_call("x", refiner_only=True)
    with pytest.raises(InvalidRequestError, match="refiner=False"):
        pipe.check_call("x", image=test_image(64, 64), refiner_only=True, refiner=False)


def test_a_mask_makes_it_inpainting(pipe):
    """(Inpainting itself is tests/test_inpaint.py.) A mask turns the call into inpainting, at
    diffusers' inpaint default strength."""
    got = pipe.check_call("x", image=test_image(64, 64), mask_image=test_image(64, 64))
    assert got["inpaint"] and got["strength"] == 0.9999


def test_unreadable_and_corrupt_image_files_are_named(pipe, tmp_path):
    with pytest.raises(InvalidImageError, match="does not exist"):
        pipe.check_call("x", image=tmp_path / "missing.png")
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    with pytest.raises(InvalidImageError, match="cannot decode"):
        pipe.check_call("x", image=corrupt)
    truncated = tmp_path / "truncated.png"
    test_image(64, 64).save(tmp_path / "full.png")
    truncated.write_bytes((tmp_path / "full.png").read_bytes()[:200])
    with pytest.raises(InvalidImageError, match="cannot decode"):
        pipe.check_call("x", image=truncated)
    with pytest.raises(InvalidImageError, match="is a folder"):
        pipe.check_call("x", image=tmp_path)


@pytest.mark.parametrize("image, match", [
    (42, "not int"),
    (np.zeros((64, 64), np.float32), r"\(H, W, 3\)"),
    (np.zeros((64, 64, 3), np.int64), r"\(H, W, 3\)"),
    (torch.zeros(4, 64, 64), r"\(3, H, W\)"),
    ([], "empty list"),
    (np.full((64, 64, 3), np.nan, np.float32), "NaN"),
])
def test_unusable_image_values_are_named(pipe, image, match):
    with pytest.raises(InvalidImageError, match=match):
        pipe.check_call("x", image=image)


def test_image_batch_must_divide_the_outputs(pipe):
    imgs = [test_image(64, 64, s) for s in range(3)]
    with pytest.raises(InvalidImageError, match="3 images for 2 outputs"):
        pipe.check_call(["a", "b"], image=imgs)
    got = pipe.check_call(["a", "b"], image=imgs[:2], strength=0.5)
    assert got["img2img"] and got["strength"] == 0.5 and (got["height"], got["width"]) == (64, 64)


def test_an_rgba_file_and_its_path_run_like_the_rgb_image(pipe, tmp_path):
    """A PNG with alpha (common for edited images) is read as RGB instead of failing in the VAE."""
    img = test_image(64, 64)
    rgba = img.convert("RGBA")
    rgba.save(tmp_path / "in.png")
    kw = {"strength": 0.5, "num_inference_steps": 2, "seed": 1, "refiner": False, "output_type": "latent"}
    a = pipe("x", image=img, **kw).latents
    b = pipe("x", image=tmp_path / "in.png", **kw).latents
    assert torch.equal(a, b)


# ---- the CLI ------------------------------------------------------------------------------------
def test_cli_run_image_writes_the_pipelines_image(pipe, tiny_artifacts, tmp_path):
    from fixtures import run_cli

    test_image(128, 192, seed=3).save(tmp_path / "in.png")
    rc, out, err = run_cli("run", "a hill", "--artifacts", str(tiny_artifacts), "--image", str(tmp_path / "in.png"),
                           "--strength", "0.5", "--steps", "4", "--seed", "9", "--backend", "onnxruntime",
                           "--device", "cpu", "--out", str(tmp_path / "out.png"))
    assert rc == 0, err
    assert "img2img from" in out and "strength 0.5" in out and "128x192" in out
    want = pipe("a hill", image=tmp_path / "in.png", strength=0.5, num_inference_steps=4, seed=9).images[0]
    assert np.array_equal(np.asarray(Image.open(tmp_path / "out.png")), np.asarray(want))


@pytest.mark.parametrize("args, match", [
    (["--strength", "1.5"], "strength must be in (0, 1], got 1.5"),
    (["--strength", "0.5", "--image", "{tmp}/corrupt.png"], "cannot decode"),
    (["--image", "{tmp}/in.png", "--mask", "{tmp}/corrupt.png"], "mask: cannot decode"),
    (["--strength", "0.5"], "no image was given"),
])
def test_cli_bad_img2img_input_is_one_line_and_exit_2(tiny_artifacts, tmp_path, args, match):
    from fixtures import run_cli

    test_image(64, 64).save(tmp_path / "in.png")
    (tmp_path / "corrupt.png").write_bytes(b"not an image")
    argv = [a.format(tmp=tmp_path) for a in args]
    if "--image" not in argv:
        argv += ["--image", str(tmp_path / "in.png")] if "no image" not in match else []
    rc, out, err = run_cli("run", "x", "--artifacts", str(tiny_artifacts), "--steps", "2", "--backend",
                           "onnxruntime", "--device", "cpu", "--out", str(tmp_path / "o.png"), *argv)
    assert rc == 2 and out == ""
    lines = err.strip().splitlines()
    assert lines[-1].startswith("sdxl-export: error: ") and match in lines[-1] and ". Fix: " in lines[-1], err
    assert "Traceback" not in err
