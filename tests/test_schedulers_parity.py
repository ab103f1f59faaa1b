"""Acceptance: every sampler and schedule type gives diffusers' image for the same seed.

The oracle is diffusers' own ``StableDiffusionXLPipeline`` (and, for the hand-off and
img2img, ``StableDiffusionXLImg2ImgPipeline``) on the tiny preset's weights with the scheduler
built the way diffusers' docs spell it (``DPMSolverMultistepScheduler.from_config(cfg,
algorithm_type="sde-dpmsolver++", use_karras_sigmas=True)``...), written out here, not taken
from the runtime's catalog. Small images (64x64) and 4-6 steps keep each case well under a
second; the runtime side shares the session's tiny export.

Stochastic samplers (Euler a, DPM2 a, DPM++ 2M SDE, DPM++ SDE, LCM, TCD) are also checked
batched against their single runs (one generator per image, as the server batches).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import diffusers as d
import numpy as np
import pytest
import torch
from sdxl_export.errors import InvalidRequestError
from sdxl_export.runtime import SDXLPipeline
from test_img2img import test_image

PIXEL_TOL = 1 / 255
#: final latents: ORT vs PyTorch float rounding, amplified by SDE noise on Karras sigmas (measured 1.1e-4)
LATENT_TOL = 5e-4

Make = Callable[[dict[str, Any], Any], Any]


def _seeds(gen: Any) -> Any:
    """diffusers' DPM++ SDE seeds its Brownian tree from ``noise_sampler_seed`` (an int, or one per image)."""
    return [g.initial_seed() for g in gen] if isinstance(gen, list) else gen.initial_seed()


#: our name -> how a diffusers user builds that scheduler from the model's config.
REF: dict[str, Make] = {
    "heun": lambda c, g: d.HeunDiscreteScheduler.from_config(c),
    "heun_karras": lambda c, g: d.HeunDiscreteScheduler.from_config(c, use_karras_sigmas=True),
    "lms": lambda c, g: d.LMSDiscreteScheduler.from_config(c),
    "lms_karras": lambda c, g: d.LMSDiscreteScheduler.from_config(c, use_karras_sigmas=True),
    "dpm2": lambda c, g: d.KDPM2DiscreteScheduler.from_config(c),
    "dpm2_karras": lambda c, g: d.KDPM2DiscreteScheduler.from_config(c, use_karras_sigmas=True),
    "dpm2_a": lambda c, g: d.KDPM2AncestralDiscreteScheduler.from_config(c),
    "dpmpp_2m": lambda c, g: d.DPMSolverMultistepScheduler.from_config(c),
    "dpmpp_2m_sde": lambda c, g: d.DPMSolverMultistepScheduler.from_config(c, algorithm_type="sde-dpmsolver++"),
    "dpmpp_2m_sde_karras": lambda c, g: d.DPMSolverMultistepScheduler.from_config(
        c, algorithm_type="sde-dpmsolver++", use_karras_sigmas=True),
    "dpmpp_sde": lambda c, g: d.DPMSolverSDEScheduler.from_config(c, noise_sampler_seed=_seeds(g)),
    "dpmpp_sde_karras": lambda c, g: d.DPMSolverSDEScheduler.from_config(
        c, use_karras_sigmas=True, noise_sampler_seed=_seeds(g)),
    "dpmpp_2s": lambda c, g: d.DPMSolverSinglestepScheduler.from_config(c),
    "dpmpp_2s_karras": lambda c, g: d.DPMSolverSinglestepScheduler.from_config(c, use_karras_sigmas=True),
    "deis": lambda c, g: d.DEISMultistepScheduler.from_config(c),
    "lcm": lambda c, g: d.LCMScheduler.from_config(c),
    "tcd": lambda c, g: d.TCDScheduler.from_config(c),
    "euler": lambda c, g: d.EulerDiscreteScheduler.from_config(c),
    "euler_a": lambda c, g: d.EulerAncestralDiscreteScheduler.from_config(c),
    "euler_trailing": lambda c, g: d.EulerDiscreteScheduler.from_config(c, timestep_spacing="trailing"),
    "euler_a_trailing": lambda c, g: d.EulerAncestralDiscreteScheduler.from_config(c, timestep_spacing="trailing"),
    "euler_uniform": lambda c, g: d.EulerDiscreteScheduler.from_config(c, timestep_spacing="linspace"),
    "euler_exponential": lambda c, g: d.EulerDiscreteScheduler.from_config(c, use_exponential_sigmas=True),
    "euler_beta": lambda c, g: d.EulerDiscreteScheduler.from_config(c, use_beta_sigmas=True),
    "ddim_trailing": lambda c, g: d.DDIMScheduler.from_config(c, timestep_spacing="trailing"),
    "unipc_karras": lambda c, g: d.UniPCMultistepScheduler.from_config(c, use_karras_sigmas=True),
}


@dataclass(frozen=True)
class Case:
    scheduler: str
    seed: int = 0
    prompt: Any = "a photo of a cat"
    steps: int = 4
    guidance: float = 5.0
    size: tuple[int, int] = (64, 64)
    refiner: bool = False
    denoising_end: float = 0.6
    strength: float | None = None  # img2img on the base
    generators: int = 0  # > 0: that many images, one generator each
    extra: dict[str, Any] = field(default_factory=dict)  # eta, timesteps, sigmas


#: The default run: every sampler and schedule type once, the hand-off and img2img paths of the
#: second-order, SDE and consistency samplers, explicit schedules and eta, batches. ``-m slow``
#: adds every other reference scheduler and more hand-off/img2img/batch combinations.
FAST = ("heun", "lms", "dpm2", "dpm2_a", "dpmpp_2m_sde_karras", "dpmpp_sde", "dpmpp_2s", "deis", "lcm", "tcd",
        "euler_trailing", "euler_uniform", "euler_exponential", "euler_beta", "heun_karras")
CASES = {
    # every sampler and schedule type, base only, with guidance
    **{f"txt2img-{s}": Case(s, seed=i) for i, s in enumerate(REF)},
    # the base -> refiner hand-off (denoising_end / denoising_start), incl. second-order cuts
    **{f"handoff-{s}": Case(s, seed=40 + i, refiner=True, steps=5)
       for i, s in enumerate(("heun", "dpm2", "dpm2_a", "lms_karras", "dpmpp_sde", "dpmpp_2m_sde_karras", "lcm",
                              "deis", "dpmpp_2s"))},
    "handoff-heun-0.75": Case("heun", seed=50, refiner=True, steps=5, denoising_end=0.75),
    # img2img strength
    **{f"img2img-{s}": Case(s, seed=60 + i, strength=0.6, steps=5)
       for i, s in enumerate(("heun", "dpm2_a", "dpmpp_sde", "lcm", "tcd", "lms"))},
    # explicit schedules and eta, guidance-free as few-step models run
    "dmd2-lcm-timesteps": Case("lcm", seed=70, guidance=0.0, extra={"timesteps": [999, 749, 499, 249]}),
    "euler-timesteps": Case("euler", seed=71, guidance=0.0, extra={"timesteps": [999, 850, 700, 500, 200]}),
    "euler-sigmas": Case("euler", seed=72, guidance=1.0, extra={"sigmas": [14.6, 6.0, 2.5, 0.9, 0.3]}),
    "tcd-eta0.3": Case("tcd", seed=73, guidance=0.0, steps=4, extra={"eta": 0.3}),
    "ddim-eta1": Case("ddim_trailing", seed=74, steps=4, extra={"eta": 1.0}),
    "lightning-euler_trailing-4": Case("euler_trailing", seed=75, guidance=0.0, steps=4),
    "turbo-euler_a_trailing-1": Case("euler_a_trailing", seed=76, guidance=0.0, steps=1),
    # batches: one generator per image (the server's batching), and one generator for a batch
    **{f"batch-{s}": Case(s, seed=80 + i, prompt=["a red car", "a tree on a hill"], generators=2)
       for i, s in enumerate(("dpm2_a", "dpmpp_2m_sde", "dpmpp_sde", "lcm", "tcd"))},
    "batch-dpmpp_sde-one_generator": Case("dpmpp_sde", seed=90, prompt=["a red car", "a tree"]),
    "batch-dpmpp_sde-handoff": Case("dpmpp_sde", seed=91, prompt=["a red car", "a tree"], generators=2,
                                    refiner=True),
}
DEFAULT_RUN = {*(f"txt2img-{s}" for s in FAST), "handoff-heun", "handoff-dpm2_a", "handoff-dpmpp_sde",
               "handoff-lcm", "img2img-heun", "img2img-dpmpp_sde", "img2img-lcm", "img2img-tcd",
               "dmd2-lcm-timesteps", "euler-sigmas", "tcd-eta0.3", "batch-dpmpp_sde",
               "batch-dpmpp_sde-one_generator"}
assert DEFAULT_RUN <= set(CASES)
PARAMS = [pytest.param(n, id=n, marks=() if n in DEFAULT_RUN else pytest.mark.slow) for n in CASES]


def _gen(c: Case) -> Any:
    if c.generators:
        return [torch.Generator("cpu").manual_seed(c.seed * 100 + i) for i in range(c.generators)]
    return torch.Generator("cpu").manual_seed(c.seed)


class Reference:
    """diffusers' SDXL pipelines on the tiny model: txt2img base, img2img base, refiner."""

    def __init__(self, model: Any):
        self.base = model.base_pipeline()
        self.base_i2i = d.StableDiffusionXLImg2ImgPipeline(**self.base.components, requires_aesthetics_score=False,
                                                           force_zeros_for_empty_prompt=True)
        self.refiner = model.refiner_pipeline()
        self.cfg = dict(self.base.scheduler.config)
        self.refiner_cfg = dict(self.refiner.scheduler.config)
        for p in (self.base, self.base_i2i, self.refiner):
            p.set_progress_bar_config(disable=True)

    def __call__(self, c: Case, image: Any = None) -> tuple[torch.Tensor, np.ndarray]:
        make = REF[c.scheduler]
        final: dict[str, torch.Tensor] = {}

        def keep(pipe: Any, i: int, t: Any, kw: dict[str, Any]) -> dict[str, Any]:
            final["latents"] = kw["latents"].clone()
            return kw

        common = dict(num_inference_steps=c.steps, guidance_scale=c.guidance, **c.extra)
        if c.extra.get("timesteps") or c.extra.get("sigmas"):
            del common["num_inference_steps"]
        h, w = c.size
        gen = _gen(c)
        base = self.base_i2i if c.strength is not None else self.base
        base.scheduler = make(self.cfg, gen)
        args: dict[str, Any] = {"image": image, "strength": c.strength} if c.strength is not None else {
            "height": h, "width": w}
        with torch.no_grad():
            if not c.refiner:
                images = base(c.prompt, output_type="np", generator=gen, callback_on_step_end=keep, **args,
                              **common).images
            else:
                lat = base(c.prompt, output_type="latent", generator=gen, denoising_end=c.denoising_end, **args,
                           **common).images
                self.refiner.scheduler = make(self.refiner_cfg, gen)
                images = self.refiner(c.prompt, image=lat, denoising_start=c.denoising_end, output_type="np",
                                      generator=gen, callback_on_step_end=keep, **common).images
        return final["latents"], images


def _ours(pipe: SDXLPipeline, c: Case, image: Any = None) -> Any:
    kw: dict[str, Any] = {"image": image, "strength": c.strength} if c.strength is not None else {
        "height": c.size[0], "width": c.size[1]}
    return pipe(c.prompt, num_inference_steps=c.steps, guidance_scale=c.guidance, scheduler=c.scheduler,
                refiner=c.refiner, denoising_end=c.denoising_end, generator=_gen(c), output_type="np", **kw,
                **c.extra)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def pipe(tiny_ort_pipe):
    return tiny_ort_pipe


@pytest.fixture(scope="module")
def reference(tiny_model):
    return Reference(tiny_model)


@pytest.mark.parametrize("name", PARAMS)
def test_scheduler_matches_diffusers(name, pipe, reference):
    c = CASES[name]
    image = test_image(*c.size, seed=c.seed) if c.strength is not None else None
    ref_latents, ref_images = reference(c, image)
    ours = _ours(pipe, c, image)
    assert ref_images.std() > 1e-3, "the reference image is flat: the comparison would prove nothing"
    assert ours.images.shape == ref_images.shape
    lat_err = float((ours.latents - ref_latents).abs().max())
    pix_err = float(np.abs(ours.images - ref_images).max())
    print(f"\n{name}: max |latent diff| {lat_err:.2e}, max |pixel diff| {pix_err * 255:.3f}/255")
    assert lat_err <= LATENT_TOL, f"latents differ by {lat_err:.3e}"
    assert pix_err <= PIXEL_TOL, f"pixels differ by {pix_err * 255:.3f}/255"
    assert ours.info["scheduler"] == c.scheduler
    assert ours.info["refiner_steps"] > 0 if c.refiner else ours.info["refiner_steps"] == 0


@pytest.mark.parametrize("scheduler", ["dpm2_a", "dpmpp_sde", "tcd", *(pytest.param(s, marks=pytest.mark.slow)
                                                                      for s in ("euler_a", "dpmpp_2m_sde", "lcm"))])
def test_stochastic_batched_image_equals_its_single_run(scheduler, pipe):
    """One generator per image: image i of a batch is the image its own seed gives alone."""
    seeds = [11, 12]
    batch = pipe(["a red car", "a tree"], height=64, width=64, num_inference_steps=4, scheduler=scheduler,
                 generator=[torch.Generator("cpu").manual_seed(s) for s in seeds], output_type="np",
                 refiner=True, denoising_end=0.6, eta=0.3)
    for i, (prompt, s) in enumerate(zip(["a red car", "a tree"], seeds)):
        alone = pipe(prompt, height=64, width=64, num_inference_steps=4, scheduler=scheduler,
                     generator=[torch.Generator("cpu").manual_seed(s)], output_type="np", refiner=True,
                     denoising_end=0.6, eta=0.3)
        err = float(np.abs(batch.images[i] - alone.images[0]).max())
        assert err <= PIXEL_TOL, f"image {i} differs from its single run by {err * 255:.3f}/255"
    assert float(np.abs(batch.images[0] - batch.images[1]).max()) > 1e-3


def test_dpmpp_sde_seed_matters(pipe):
    """The Brownian tree follows the request's seed: another seed is another image."""
    a = pipe("a cat", height=64, width=64, num_inference_steps=4, scheduler="dpmpp_sde", seed=1, output_type="np",
             refiner=False)
    b = pipe("a cat", height=64, width=64, num_inference_steps=4, scheduler="dpmpp_sde", seed=2, output_type="np",
             refiner=False)
    a2 = pipe("a cat", height=64, width=64, num_inference_steps=4, scheduler="dpmpp_sde", seed=1, output_type="np",
              refiner=False)
    assert np.array_equal(a.images, a2.images)
    assert float(np.abs(a.images - b.images).max()) > 1e-3


@pytest.mark.parametrize("kwargs, words", [
    ({"scheduler": "dpmpp_2s_trailing"}, "no 'trailing' schedule"),
    ({"scheduler": "nope"}, "unknown scheduler"),
    ({"scheduler": "lms", "timesteps": [999, 500]}, "does not take custom timesteps"),
    ({"scheduler": "euler", "timesteps": [500, 999]}, "strictly decreasing"),
    ({"scheduler": "euler", "timesteps": [999, 500], "sigmas": [1.0, 0.5]}, "not both"),
    ({"scheduler": "euler", "sigmas": ["a"]}, "sigmas must be"),
    ({"scheduler": "tcd", "eta": -1}, "eta must be"),
    ({"scheduler": "euler_karras", "timesteps": [999, 500]}, "refuses these timesteps"),
])
def test_bad_schedule_arguments_are_named_errors(pipe, kwargs, words):
    with pytest.raises(InvalidRequestError, match=words):
        pipe("a cat", height=64, width=64, num_inference_steps=4, seed=0, refiner=False, **kwargs)
