"""``SDXLPipeline``: base + refiner sampling on exported components, exact to diffusers.

Semantics are those of diffusers' ``StableDiffusionXLPipeline`` (``output_type="latent"``,
``denoising_end``) followed by ``StableDiffusionXLImg2ImgPipeline`` on those latents
(``denoising_start``), as diffusers documents base+refiner: same prompt encoding
(:mod:`.prompts`), same initial noise (``randn_tensor`` with the caller's generator,
times ``init_noise_sigma``), same micro-conditioning time ids, same guidance, the same
diffusers schedulers with the same timestep cut-off and refiner begin index
(:mod:`.schedulers`), the one generator carried from base into refiner, the same VAE
un-scaling and image post-processing. With ``image=`` it is diffusers'
``StableDiffusionXLImg2ImgPipeline`` on the base (``strength``; :mod:`.img2img` has the
encode and noise), with the same refiner hand-off, or on the refiner alone
(``refiner_only=True``). ``seed=S`` is
``generator=torch.Generator("cpu").manual_seed(S)``: the same seed gives diffusers' image.

What the pipeline owns is only per-object: loaded component runners, tokenizers, the
empty-negative cache, the active LoRA set. Everything per call (scheduler instances, the
generator, latents, timings) lives in the call, so one pipeline serves several threads at once.

LoRA (:meth:`SDXLPipeline.set_loras`, per call ``loras=``): one LoRA set is active at a time.
Calls with the active set run concurrently; a call with another set waits for the calls in
flight to finish, switches the weights (every weight any LoRA touched since load is rewritten
from base + the new set's deltas), then runs; no call ever runs on half-switched weights.
A failed switch (bad file, wrong architecture, bad scale) leaves the previous set active.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from diffusers.utils.torch_utils import randn_tensor

from ..artifacts import DEFAULT_ARTIFACTS
from ..buckets import nearest_bucket
from ..errors import (
    ArtifactError,
    InvalidRequestError,
    MissingComponentError,
    NumericalError,
    UnsupportedShapeError,
)
from . import controlnet as _controlnet
from . import img2img, inpaint
from .artifact_reader import REQUIRED_COMPONENTS, Artifacts, export_fix, read_artifacts
from .backends import ComponentContext, create_runner, resolve_backend
from .backends.base import ComponentRunner
from .model_defaults import ModelDefaults, with_schedule_args
from .prompts import EncodedPrompts, PromptEncoder
from .request import SampleRequest, check_img2img, check_request, repeat_per_image
from .schedulers import (
    SchedulerFactory,
    base_timesteps,
    cut_at_end,
    prepare_scheduler,
    refiner_timesteps,
    step_kwargs,
    strength_timesteps,
)
from .timing import StageTimings

if TYPE_CHECKING:
    from typing_extensions import Self

log = logging.getLogger(__name__)


@dataclass
class SDXLPipelineOutput:
    """``images``: list of PIL images, an (N, H, W, 3) float array ("np"), an (N, 3, H, W)
    tensor ("pt") or the final latents ("latent"). ``latents`` are always the final latents."""

    images: Any
    latents: torch.Tensor
    timings: StageTimings
    seed: int | None
    info: dict[str, Any] = field(default_factory=dict)


def _all_finite(x: torch.Tensor) -> bool:
    """NaN/Inf check; on CPU through numpy (single-threaded, no wake-up of torch's pool)."""
    if x.device.type == "cpu":
        return bool(np.isfinite(x.detach().numpy()).all())
    return bool(torch.isfinite(x).all())


def choose_device(device: str, backend: str) -> str:
    if device != "auto":
        return device
    if backend == "tensorrt":
        return "cuda"
    if backend == "openvino":
        return "cpu"
    if backend == "onnxruntime":
        from .backends.onnxruntime import cuda_available

        return "cuda" if cuda_available() else "cpu"
    return "cuda" if torch.cuda.is_available() else "cpu"


class SDXLPipeline:
    """Text-to-image over an artifact folder. Build with :meth:`from_artifacts`."""

    def __init__(self, artifacts: Artifacts, backend: str, device: str, runners: dict[str, ComponentRunner],
                 encoder: PromptEncoder):
        from diffusers.image_processor import VaeImageProcessor

        self.artifacts = artifacts
        self.backend = backend
        self.device = torch.device(device)
        self.runners = runners
        self.encoder = encoder
        self.native_size = artifacts.native_size
        self.vae_scale = artifacts.specs["unet"].vae_scale
        self.latent_channels = int(artifacts.specs["unet"].outputs[0].shape[1])
        self.unet_in_channels = int(artifacts.specs["unet"].inputs[0].shape[1])  # 9: an inpainting UNet
        self.vae_config = artifacts.vae
        #: steps, guidance and scheduler a call without them runs (the build's recorded defaults)
        self.defaults = ModelDefaults.from_artifacts(artifacts)
        self._schedulers = SchedulerFactory(self.defaults.scheduler_config(artifacts.scheduler_config()))
        self._refiner_schedulers = (SchedulerFactory(artifacts.scheduler_config(refiner=True))
                                    if self.has_refiner else None)
        self._image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale)
        self._control_processor = _controlnet.control_processor(self.vae_scale)
        self._check_conditioning_dims()
        from ..lora.switch import LoraSet, LoraSwitcher

        self.loras = LoraSwitcher(artifacts, runners)
        self._default_loras = LoraSet()
        # Pay the one-off costs (diffusers' lazy scheduler imports, from_config) at load,
        # not inside the first call's timings.
        for factory in (self._schedulers, self._refiner_schedulers):
            if factory is not None:
                factory("euler")

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_artifacts(cls, artifacts: str | Path = DEFAULT_ARTIFACTS, backend: str = "auto", *,
                       device: str = "auto", load_refiner: bool = True,
                       backend_options: dict[str, Any] | None = None, verify_hashes: bool = False) -> SDXLPipeline:
        """Open every component of an export with ``backend`` (``auto`` picks and logs it).

        ``backend_options`` go to every runner as ``ComponentContext.options`` (ONNX
        Runtime: ``{"session_options": {...}}``; torch: ``{"dtype": "float16", ...}``).
        """
        arts = read_artifacts(artifacts, with_refiner=load_refiner)
        names = list(REQUIRED_COMPONENTS) + (["refiner_unet"] if load_refiner and arts.has_refiner else [])
        if "vae_encoder" in arts.components:  # img2img; exports always have it, old ones may not
            names.append("vae_encoder")
        names += _controlnet.component_names(list(arts.components))
        if verify_hashes:
            for name in names:
                arts.check_files(name, hashes=True)
        store = arts.engine_store
        chosen = resolve_backend(backend, store)
        dev = choose_device(device, chosen)
        runners: dict[str, ComponentRunner] = {}
        try:
            for name in names:
                entry = None
                # A component the build measured faster on another backend at the same precision runs
                # there (engines/speed.py: e.g. an fp32 VAE on the ONNX Runtime twin beside OpenVINO).
                run_on = store.run_on(name, chosen) if store is not None and hasattr(store, "run_on") else chosen
                options = dict(backend_options or {}) if run_on == chosen else {}
                if store is not None and _built_for(store, name, run_on):
                    entry = store.verify(name, backend=run_on)  # named error before any deserialisation
                    if name == "vae_decoder" and getattr(entry, "precision", "fp32") != "fp32":
                        log.warning("the vae_decoder engine runs in %s: SDXL's VAE can overflow below fp32 "
                                    "(NaN is caught and reported); rebuild with --vae-precision fp32",
                                    entry.precision)
                ctx = ComponentContext(artifacts=arts.root, name=name, spec=arts.specs[name],
                                       export_entry=arts.component(name), engine_entry=entry, device=dev,
                                       options=options)
                runners[name] = create_runner(run_on, ctx).open()
                if run_on != chosen:
                    log.info("%s runs on %s (measured faster at build than %s)", name, run_on, chosen)
            encoder = PromptEncoder(arts.tokenizer("tokenizer"), arts.tokenizer("tokenizer_2"),
                                    runners["text_encoder"], runners["text_encoder_2"])
            pipe = cls(arts, chosen, dev, runners, encoder)
        except BaseException:
            for r in runners.values():
                r.close()
            raise
        log.info("pipeline ready: %s on %s (%s)", chosen, dev, ", ".join(names))
        return pipe

    def _check_conditioning_dims(self) -> None:
        specs = self.artifacts.specs
        h1 = int(specs["text_encoder"].outputs[0].shape[-1])
        h2 = int(specs["text_encoder_2"].outputs[0].shape[-1])
        problems = []
        unet_in = {t.name: t for t in specs["unet"].inputs}
        if unet_in["encoder_hidden_states"].shape[-1] != h1 + h2:
            problems.append(f"unet context {unet_in['encoder_hidden_states'].shape[-1]} != {h1} + {h2}")
        if unet_in["time_ids"].shape[-1] != 6:
            problems.append(f"unet takes {unet_in['time_ids'].shape[-1]} time ids, SDXL's base takes 6")
        if self.has_refiner:
            ref_in = {t.name: t for t in specs["refiner_unet"].inputs}
            if ref_in["encoder_hidden_states"].shape[-1] != h2:
                problems.append(f"refiner context {ref_in['encoder_hidden_states'].shape[-1]} != text_encoder_2 {h2}")
            if ref_in["time_ids"].shape[-1] not in (5, 6):
                problems.append(f"refiner takes {ref_in['time_ids'].shape[-1]} time ids (5 or 6 expected)")
        if problems:
            raise ArtifactError(f"{self.artifacts.root}: components do not fit together: {'; '.join(problems)}",
                                "export base and refiner of the same SDXL family")

    # ---- lifecycle -----------------------------------------------------------------------------
    @property
    def has_refiner(self) -> bool:
        return "refiner_unet" in self.runners

    def close(self) -> None:
        for r in self.runners.values():
            r.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def random_weights(self) -> str | None:
        """The embedded random-weight preset these artifacts come from, or None (a real checkpoint)."""
        return self.artifacts.random_weight_preset

    @property
    def random_weights_note(self) -> str | None:
        """One line telling a user the images will be noise (random-weight preset), or None."""
        from .artifact_reader import random_weights_note

        return random_weights_note(self.artifacts)

    @property
    def description(self) -> dict[str, Any]:
        return {
            "backend": self.backend, "device": str(self.device), "artifacts": str(self.artifacts.root),
            "native_size": self.native_size, "vae": vars(self.vae_config),
            "components": {n: r.description for n, r in self.runners.items()},
        }

    # ---- LoRA ------------------------------------------------------------------------------------
    def set_loras(self, loras: Mapping[str | Path, float] | None) -> dict[str, Any] | None:
        """Make ``{file_or_name: scale, ...}`` the LoRA set of later calls (``{}``: the base weights).

        Means diffusers' ``load_lora_weights`` + ``set_adapters(names, scales)`` + ``fuse_lora``:
        ``W = W0 + sum_i scale_i * dW_i`` on the UNet and both text encoders. Names are files,
        or names in :attr:`lora_dir`. Waits for calls in flight with another set. Atomic: on
        :class:`~sdxl_export.errors.InvalidLoraError` (or a backend that cannot switch) the
        previous set stays. Returns the switch record (``switch_ms`` per component), or None
        when the set was already active.
        """
        lset = self.loras.resolve(loras)
        with self.loras.session(lset, hold=False) as switched:
            self._default_loras = lset
        return switched

    @property
    def lora_dir(self) -> str | Path | None:
        """Folder where LoRA names (not paths) are looked up (``name`` or ``name.safetensors``)."""
        return self.loras.lora_dir

    @lora_dir.setter
    def lora_dir(self, folder: str | Path | None) -> None:
        self.loras.lora_dir = folder

    def nearest_size(self, height: int, width: int) -> tuple[int, int]:
        """The SDXL aspect bucket (at this model's native size) nearest to ``height x width``."""
        b = nearest_bucket(height, width, self.native_size)
        return b.height, b.width

    # ---- sampling --------------------------------------------------------------------------------
    def __call__(
        self, prompt: str | Sequence[str], negative_prompt: str | Sequence[str] | None = None, *,
        height: int | None = None, width: int | None = None, num_inference_steps: int | None = None,
        guidance_scale: float | None = None, denoising_end: float = 0.8, refiner: bool = True, seed: int | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None, num_images_per_prompt: int = 1,
        scheduler: str | None = None, original_size: tuple[int, int] | None = None,
        crops_coords_top_left: tuple[int, int] = (0, 0), target_size: tuple[int, int] | None = None,
        aesthetic_score: float = 6.0, negative_aesthetic_score: float = 2.5, output_type: str = "pil",
        image: Any = None, strength: float | None = None, refiner_only: bool = False, mask_image: Any = None,
        loras: Mapping[str | Path, float] | None = None, control_image: Any = None, controlnet: Any = None,
        controlnet_conditioning_scale: Any = 1.0, control_guidance_start: Any = 0.0,
        control_guidance_end: Any = 1.0, guess_mode: bool = False, eta: float = 0.0,
        timesteps: list[int] | None = None, sigmas: list[float] | None = None, callback_on_step_end: Any = None,
        padding_mask_crop: int | None = None,
        hires_scale: float | None = None, hires_size: tuple[int, int] | None = None, hires_upscaler: str = "latent",
        hires_steps: int | None = None, hires_strength: float | None = None,
    ) -> SDXLPipelineOutput:
        """Generate images; arguments mean what they mean in diffusers' SDXL pipelines.

        ``prompt``/``negative_prompt``: text or lists (a batch); ``negative_prompt=None`` is
        SDXL's zero negative conditioning on the base and ``""`` on the refiner.
        ``height``/``width``: multiples of 8, default the model's native size.
        ``refiner``: the base denoises down to ``denoising_end`` and the refiner continues
        from there on the latents (``denoising_end`` is ignored without the refiner).
        ``seed=S`` is ``generator=torch.Generator("cpu").manual_seed(S)`` (one generator,
        carried from base into refiner); neither draws a seed, reported as ``.seed``.
        ``original_size``/``crops_coords_top_left``/``target_size`` condition both stages
        (as when passed to both diffusers pipelines); the aesthetic scores the refiner.
        ``output_type``: ``"pil"``, ``"np"``, ``"pt"`` or ``"latent"``.

        Image-to-image: ``image`` (PIL image, array, tensor, file path, or a list) is what
        diffusers' img2img takes; the output has its size (``height``/``width`` resize it).
        ``strength`` in (0, 1] (default 0.3, diffusers') is how much of the schedule re-runs.
        ``refiner_only=True`` refines the image with the refiner alone (no base, no hand-off).
        Inpainting (:mod:`.inpaint`): ``mask_image`` (white = repaint) with ``image`` is diffusers'
        ``StableDiffusionXLInpaintPipeline`` (4-channel UNet: blending; 9-channel inpainting
        UNet: mask + masked-image latents as input); ``strength`` defaults to 0.9999 (1.0: from
        noise); ``padding_mask_crop=PX`` crops around the mask and pastes back.

        Hires fix (:mod:`.hires`): ``hires_scale`` (or ``hires_size=(H, W)``) makes this call a
        first pass at ``height x width``, an upscale (``hires_upscaler``: ``latent`` and its
        A1111 variants, ``lanczos``, ``nearest``) and an img2img pass at the target size with
        ``hires_steps`` (default ``num_inference_steps``) at ``hires_strength`` (default 0.7).

        ``loras``: this call's LoRA set (``{file_or_name: scale}``, ``{}`` for none); default the
        set of :meth:`set_loras`. A call with another set than the active one waits for the calls
        in flight, then switches (see the class docstring).

        ControlNet (:mod:`.controlnet`, as diffusers' ``StableDiffusionXLControlNetPipeline`` and, with
        ``image=``, ``...ControlNetImg2ImgPipeline``): ``control_image`` (one image/batch, or a list,
        one per ControlNet), ``controlnet`` (a name or list of names; default the only one built),
        ``controlnet_conditioning_scale``, ``control_guidance_start``/``_end`` (per ControlNet or one
        for all), ``guess_mode``. The refiner takes no ControlNet.

        ``num_inference_steps``, ``guidance_scale``, ``scheduler``: default the model's recorded
        defaults (:attr:`defaults`; ``build --default-steps/--default-guidance/--default-scheduler``),
        else 30, 5.0, ``"euler"``. ``eta``, ``timesteps``, ``sigmas`` mean what they mean in
        diffusers' SDXL pipelines (``eta`` goes to schedulers whose ``step`` takes it: DDIM, TCD;
        custom ``timesteps``/``sigmas`` replace the step count, e.g. DMD2's ``[999, 749, 499, 249]``).

        ``callback_on_step_end(pipe, i, t, callback_kwargs)``: diffusers' per-step callback, after
        each denoising step of each stage; ``callback_kwargs`` holds ``latents`` plus ``stage``
        (``"unet"``/``"refiner_unet"``) and ``stage_steps``; a returned ``{"latents": x}`` replaces
        them; an exception it raises stops the call there (how servers cancel a running job).
        """
        t0 = time.perf_counter()
        if hires_scale is not None or hires_size is not None:
            from . import hires

            if control_image is not None:
                raise InvalidRequestError("hires fix with ControlNet is not supported",
                                          "drop control_image= or the hires_* arguments")
            return hires.run(self, dict(  # noqa: C408 -- the call's own keywords
                prompt=prompt, negative_prompt=negative_prompt, height=height, width=width,
                num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, denoising_end=denoising_end,
                refiner=refiner, seed=seed, generator=generator, num_images_per_prompt=num_images_per_prompt,
                scheduler=scheduler, original_size=original_size, crops_coords_top_left=crops_coords_top_left,
                target_size=target_size, aesthetic_score=aesthetic_score,
                negative_aesthetic_score=negative_aesthetic_score, output_type=output_type, image=image,
                strength=strength, refiner_only=refiner_only, mask_image=mask_image, loras=loras,
                padding_mask_crop=padding_mask_crop, eta=eta, timesteps=timesteps, sigmas=sigmas,
                callback_on_step_end=callback_on_step_end), hires.HiresFix.make(
                scale=hires_scale, size=hires_size, upscaler=hires_upscaler, steps=hires_steps,
                strength=hires_strength))
        req = self._request(
            prompt=prompt, negative_prompt=negative_prompt, height=height, width=width,
            num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, denoising_end=denoising_end,
            refiner=refiner, seed=seed, generator=generator, num_images_per_prompt=num_images_per_prompt,
            scheduler=scheduler, original_size=original_size, crops_coords_top_left=crops_coords_top_left,
            target_size=target_size, aesthetic_score=aesthetic_score,
            negative_aesthetic_score=negative_aesthetic_score, output_type=output_type, image=image,
            strength=strength, refiner_only=refiner_only, mask_image=mask_image, control_image=control_image,
            controlnet=controlnet, controlnet_conditioning_scale=controlnet_conditioning_scale,
            control_guidance_start=control_guidance_start, control_guidance_end=control_guidance_end,
            guess_mode=guess_mode, eta=eta, timesteps=timesteps, sigmas=sigmas,
            padding_mask_crop=padding_mask_crop,
        )
        req.on_step = callback_on_step_end
        lset = self._default_loras if loras is None else self.loras.resolve(loras)
        with self.loras.session(lset) as switched:
            out = self._generate(req, timings=StageTimings(), t0=t0)
        out.info["loras"] = lset.describe()
        if switched is not None:
            out.info["lora_switch_ms"] = switched["switch_ms"]
        return out

    def _generate(self, req: SampleRequest, *, timings: StageTimings, t0: float) -> SDXLPipelineOutput:
        if req.inpaint is not None:
            return inpaint.generate(self, req, timings=timings, t0=t0)
        enc = self.encoder.encode(req.prompts, req.negatives, guidance=req.guidance, refiner=req.refiner,
                                  timings=timings, base=not req.refiner_only)
        init = self._encode_image(req, timings) if req.image is not None else None
        base_steps = refiner_steps = 0
        if req.refiner_only:
            assert init is not None
            latents, refiner_steps = self._refine(req, enc, init, timings)
        else:
            latents, base_steps = self._base(req, enc, timings, init)
            if req.refiner:
                latents, refiner_steps = self._refine(req, enc, latents, timings)
        if not _all_finite(latents):
            raise NumericalError("the UNets produced NaN/Inf latents",
                                 "run the UNets in fp32 or rebuild their engines with --precision fp32")
        images = latents if req.output_type == "latent" else self._decode(latents, req.output_type, timings)
        timings.total = time.perf_counter() - t0
        info = {"backend": self.backend, "device": str(self.device), "scheduler": req.scheduler,
                "height": req.height, "width": req.width, "base_steps": base_steps,
                "refiner_steps": refiner_steps, "guidance": req.guidance, "batch": req.batch,
                "img2img": req.image is not None, "strength": req.strength if req.image is not None else None,
                "refiner_only": req.refiner_only}
        if req.control is not None:
            info["controlnet"] = req.control.describe()
        return SDXLPipelineOutput(images=images, latents=latents, timings=timings, seed=req.seed, info=info)

    def check_call(self, prompt: str | Sequence[str], negative_prompt: str | Sequence[str] | None = None,
                   **kwargs: Any) -> dict[str, Any]:
        """Check a call's arguments exactly as ``__call__`` would, without running anything.

        Raises the same named errors (:class:`InvalidRequestError`, :class:`UnsupportedShapeError`,
        :class:`MissingComponentError`); returns the normalised values a server groups requests
        by: ``height``, ``width``, ``steps``, ``scheduler`` (canonical name), ``guidance``,
        ``refiner``, ``batch``, and for img2img ``img2img``, ``strength``, ``refiner_only``.
        """
        from . import hires

        kwargs, fix = hires.split_kwargs(dict(kwargs))
        if fix is not None:  # both passes checked; the first pass's values, the target under "hires"
            return hires.check(self, dict(kwargs, prompt=prompt, negative_prompt=negative_prompt), fix).norm
        kwargs.setdefault("seed", 0)
        req = self._request(prompt=prompt, negative_prompt=negative_prompt, **kwargs)
        return {"height": req.height, "width": req.width, "steps": req.steps, "scheduler": req.scheduler,
                "guidance_scale": req.guidance_scale, "guidance": req.guidance, "refiner": req.refiner,
                "denoising_end": req.denoising_end, "batch": req.batch, "img2img": req.image is not None,
                "strength": req.strength if req.image is not None else None, "refiner_only": req.refiner_only,
                "controlnets": req.control.key if req.control is not None else (),
                "eta": req.eta, "timesteps": req.timesteps, "sigmas": req.sigmas,
                "inpaint": req.inpaint is not None}

    def _request(self, *, prompt: Any, negative_prompt: Any, height: int | None = None,
                 width: int | None = None, num_inference_steps: int | None = None, guidance_scale: float | None = None,
                 denoising_end: float = 0.8, refiner: bool = True, seed: int | None = None,
                 generator: Any = None, num_images_per_prompt: int = 1, scheduler: str | None = None,
                 original_size: tuple[int, int] | None = None, crops_coords_top_left: tuple[int, int] = (0, 0),
                 target_size: tuple[int, int] | None = None, aesthetic_score: float = 6.0,
                 negative_aesthetic_score: float = 2.5, output_type: str = "pil", image: Any = None,
                 strength: float | None = None, refiner_only: bool = False, mask_image: Any = None,
                 control_image: Any = None, controlnet: Any = None, controlnet_conditioning_scale: Any = 1.0,
                 control_guidance_start: Any = 0.0, control_guidance_end: Any = 1.0,
                 guess_mode: bool = False, eta: float = 0.0, timesteps: Any = None,
                 sigmas: Any = None, padding_mask_crop: int | None = None) -> SampleRequest:
        num_inference_steps, guidance_scale, scheduler = self.defaults.fill(num_inference_steps, guidance_scale,
                                                                            scheduler)
        pixels = masked = None
        if control_image is not None and image is None and (height is None or width is None):
            height, width = _controlnet.control_size(self._control_processor, control_image, controlnet)
        if mask_image is not None:  # inpainting: image and mask as diffusers' inpaint pipeline has them
            masked = inpaint.prepare_inputs(self._image_processor, self.vae_scale, image, mask_image, height, width,
                                            padding_mask_crop)
            pixels = masked.image
            height, width = int(pixels.shape[-2]), int(pixels.shape[-1])
        elif padding_mask_crop is not None:
            raise InvalidRequestError("padding_mask_crop applies to inpainting, and no mask_image was given",
                                      "pass mask_image= (--mask FILE), or drop padding_mask_crop")
        elif image is not None:
            # The image defines the size (diffusers' img2img); height/width, if given, resize it.
            pixels = (img2img.latents_input(image) if img2img.is_latents(image, self.latent_channels)
                      else img2img.preprocess(self._image_processor, image, height, width))
            height, width = int(pixels.shape[-2]), int(pixels.shape[-1])
            if pixels.shape[1] == self.latent_channels:  # latents (diffusers): the size is theirs x 8
                height, width = height * self.vae_scale, width * self.vae_scale
        req = check_request(
            prompt=prompt, negative_prompt=negative_prompt, height=height, width=width,
            num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, denoising_end=denoising_end,
            refiner=refiner, seed=seed, generator=generator, num_images_per_prompt=num_images_per_prompt,
            scheduler=scheduler, original_size=original_size, crops_coords_top_left=crops_coords_top_left,
            target_size=target_size, aesthetic_score=aesthetic_score,
            negative_aesthetic_score=negative_aesthetic_score, output_type=output_type,
            native=self.native_size, vae_scale=self.vae_scale,
        )
        req = with_schedule_args(req, eta=eta, timesteps=timesteps, sigmas=sigmas)
        req = check_img2img(req, image=pixels, strength=strength, refiner_only=refiner_only, mask_image=None,
                            default_strength=inpaint.DEFAULT_STRENGTH if masked is not None else img2img.DEFAULT_STRENGTH)
        if masked is not None:
            req = inpaint.check(self, req, masked)
        else:
            inpaint.check_not_inpainting_model(self, req.refiner_only)
        if req.image is not None and "vae_encoder" not in self.runners:
            raise MissingComponentError(f"{self.artifacts.root} has no vae_encoder: img2img cannot encode the image",
                                        export_fix(self.artifacts.root))
        req.control = _controlnet.check_control(
            self.runners, self._control_processor, control_image=control_image, controlnet=controlnet,
            scale=controlnet_conditioning_scale, start=control_guidance_start, end=control_guidance_end,
            guess_mode=guess_mode, height=req.height, width=req.width, batch=req.batch,
            images_per_prompt=req.images_per_prompt)
        if req.control is not None and req.inpaint is not None:
            raise InvalidRequestError("inpainting with ControlNet is not supported",
                                      "drop control_image= or mask_image=")
        if req.control is not None and req.refiner_only:
            raise _controlnet.InvalidControlError("the refiner takes no ControlNet (refiner_only=True)",
                                                  "drop control_image=, or run the base (refiner_only=False)")
        if req.refiner and not self.has_refiner:
            hint = ("run with refiner=False (--no-refiner)" if not self.artifacts.has_refiner
                    else "open the pipeline with load_refiner=True, or run with refiner=False")
            raise MissingComponentError("this pipeline has no refiner", hint)
        self._check_supported(req)
        return req

    def _check_supported(self, req: SampleRequest) -> None:
        """Refuse shapes a fixed-profile engine cannot serve before any work is done."""
        encode = None
        if req.image is not None:
            encode = img2img.encode_batch(int(req.image.shape[0]), req.batch, req.generator)
        try:
            self._check_shapes(req.batch, req.height, req.width, guidance=req.guidance, refiner=req.refiner,
                               prompts=len(req.prompts), encode=encode, base=not req.refiner_only)
            if req.control is not None:
                _controlnet.check_shapes(self.runners, req.control, req.batch, req.height, req.width, req.guidance)
        except UnsupportedShapeError as exc:
            if req.image is None:
                raise
            served = self.served_sizes() or []
            raise UnsupportedShapeError(
                f"the image is {req.height}x{req.width}, a size the built engines do not serve ({exc.message}); "
                f"served: {', '.join(f'{h}x{w}' for h, w in served) or 'none at this batch'}",
                "resize the image to a served size (height=/width=, --height/--width, resize it), "
                "or rebuild the engines with --buckets covering it") from None

    def _check_shapes(self, batch: int, height: int, width: int, *, guidance: bool, refiner: bool,
                      prompts: int | None = None, encode: int | None = None, base: bool = True) -> None:
        unet_batch = batch * (2 if guidance else 1)
        text = batch if prompts is None else prompts
        calls = {"text_encoder": text, "text_encoder_2": text, "unet": unet_batch, "vae_decoder": batch}
        if not base:  # the refiner alone: no first text encoder, no base UNet
            del calls["text_encoder"], calls["unet"]
        if refiner and self.has_refiner:
            calls["refiner_unet"] = unet_batch
        if encode is not None:
            calls["vae_encoder"] = encode
        for name, n in calls.items():
            self.runners[name].check_supported(n, height, width)

    # ---- what the engines serve (for servers and batchers) -------------------------------------
    def serves(self, batch: int, height: int, width: int, *, guidance: bool = True, refiner: bool = True,
               img2img: bool = False, refiner_only: bool = False) -> bool:
        """Whether one call of ``batch`` images (one prompt each) at ``height x width`` runs here
        (``img2img``: with one input image per output, ``refiner_only``: without the base).

        The same check a call makes before any work, without raising: engines built over fixed
        profiles serve their buckets and batch sizes only; a plain export serves anything.
        """
        try:
            self._check_shapes(batch, height, width, guidance=guidance, refiner=refiner or refiner_only,
                               encode=batch if img2img or refiner_only else None, base=not refiner_only)
        except UnsupportedShapeError:
            return False
        return True

    def served_batch_sizes(self, height: int, width: int, *, guidance: bool = True, refiner: bool = True,
                           limit: int = 64, img2img: bool = False, refiner_only: bool = False) -> list[int]:
        """Image batch sizes up to ``limit`` one call at ``height x width`` can run, ascending."""
        return [b for b in range(1, limit + 1)
                if self.serves(b, height, width, guidance=guidance, refiner=refiner, img2img=img2img,
                               refiner_only=refiner_only)]

    def served_sizes(self) -> list[tuple[int, int]] | None:
        """``(height, width)`` of every bucket all built engines serve, or None when no engine
        restricts sizes (a plain export runs any multiple of 8)."""
        store = self.artifacts.engine_store
        sizes: set[tuple[int, int]] | None = None
        for name in ("unet", "vae_decoder", "refiner_unet", "vae_encoder"):
            entry = _built_for(store, name, self.backend) if store is not None else None
            if name not in self.runners or entry is None:
                continue
            if not getattr(entry, "profiles", None):
                continue
            got = {(int(b.height), int(b.width)) for b in entry.buckets}
            sizes = got if sizes is None else sizes & got
        return None if sizes is None else sorted(sizes, key=lambda hw: (hw[0] / hw[1], hw))

    def _denoise(self, runner: ComponentRunner, stage: str, sched: Any, timesteps: torch.Tensor,
                 latents: torch.Tensor, cond: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
                 req: SampleRequest, timings: StageTimings, control: Any = None, hook: Any = None) -> torch.Tensor:
        """The denoising loop; ``hook`` (inpainting's :class:`~.inpaint.MaskHook`) widens the UNet
        input and post-processes each step."""
        embeds, pooled, time_ids = cond
        extra = step_kwargs(prepare_scheduler(sched, req.generator), req.generator, req.eta)
        t_feed = timesteps.to(device=self.device, dtype=torch.float32).reshape(-1, 1)
        for i, t in enumerate(timesteps):
            model_in = torch.cat([latents] * 2) if req.guidance else latents
            model_in = sched.scale_model_input(model_in, t)
            if hook is not None:
                model_in = hook.model_input(model_in)
            feeds = {"sample": model_in, "timestep": t_feed[i], "encoder_hidden_states": embeds,
                     "text_embeds": pooled, "time_ids": time_ids}
            run = runner
            if control is not None:  # ControlNet residuals (runtime/controlnet.py)
                feeds, run = control(i, feeds, runner)
            with timings.measure(stage):
                noise_pred = run(feeds)["noise_pred"]
            if req.guidance:
                uncond, text = noise_pred.chunk(2)
                noise_pred = uncond + req.guidance_scale * (text - uncond)
            latents = sched.step(noise_pred, t, latents, **extra, return_dict=False)[0]
            if hook is not None:  # inpainting's blend, before the callback sees the latents (as diffusers)
                latents = hook.after_step(sched, latents, i, timesteps)
            if req.on_step is not None:  # diffusers' callback_on_step_end
                got = req.on_step(self, i, t, {"latents": latents, "stage": stage, "stage_steps": len(timesteps)})
                latents = (got or {}).get("latents", latents)
        return latents

    def _conditioning(self, embeds: torch.Tensor, pooled: torch.Tensor, neg_embeds: torch.Tensor | None,
                      neg_pooled: torch.Tensor | None, req: SampleRequest) -> tuple[torch.Tensor, torch.Tensor]:
        n = req.images_per_prompt
        embeds, pooled = repeat_per_image(embeds, n), repeat_per_image(pooled, n)
        if req.guidance:
            assert neg_embeds is not None and neg_pooled is not None
            embeds = torch.cat([repeat_per_image(neg_embeds, n), embeds], dim=0)
            pooled = torch.cat([repeat_per_image(neg_pooled, n), pooled], dim=0)
        return embeds.to(self.device).contiguous(), pooled.to(self.device).contiguous()

    def _encode_image(self, req: SampleRequest, timings: StageTimings) -> torch.Tensor:
        """The image's scaled latents, one per output (diffusers' ``prepare_latents`` before noise)."""
        assert req.image is not None
        if req.image.shape[1] == self.latent_channels:  # latents given: diffusers uses them as they are
            n = int(req.image.shape[0])
            return torch.cat([req.image.to(self.device)] * (req.batch // n)) if req.batch > n else req.image.to(self.device)
        return img2img.encode(self.runners["vae_encoder"], req.image, generator=req.generator, batch=req.batch,
                              vae=self.vae_config, latent_channels=self.latent_channels, device=self.device,
                              timings=timings)

    def _base(self, req: SampleRequest, enc: EncodedPrompts, timings: StageTimings,
              init: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
        sched = self._schedulers(req.scheduler)
        end = req.denoising_end if req.refiner else None
        if init is None:
            timesteps = base_timesteps(sched, req.steps, self.device, end, **req.custom_schedule)
            control_steps = len(sched.timesteps)  # diffusers' controlnet_keep: the schedule before the cut
            shape = (req.batch, self.latent_channels, req.height // self.vae_scale, req.width // self.vae_scale)
            latents = randn_tensor(shape, generator=req.generator, device=self.device, dtype=torch.float32)
            latents = latents * sched.init_noise_sigma
        else:  # img2img: noised to the strength's first timestep, then cut at the hand-off
            timesteps = strength_timesteps(sched, req.steps, self.device, req.strength, **req.custom_schedule)
            control_steps = len(timesteps)
            latents = img2img.add_noise(sched, init, timesteps, req.generator)
            timesteps = cut_at_end(sched, timesteps, end)
        embeds, pooled = self._conditioning(enc.base_embeds, enc.base_pooled, enc.base_neg_embeds,
                                            enc.base_neg_pooled, req)
        ids = torch.tensor([list(req.original_size + req.crops_coords_top_left + req.target_size)],
                           dtype=torch.float32)
        if req.guidance:
            ids = torch.cat([ids, ids], dim=0)
        time_ids = ids.to(self.device).repeat(req.batch, 1)
        control = None if req.control is None else _controlnet.StepControl(
            self.runners, req.control, control_steps, req.guidance, timings)
        latents = self._denoise(self.runners["unet"], "unet", sched, timesteps, latents,
                                (embeds, pooled, time_ids), req, timings, control)
        return latents, len(timesteps)

    def _refine(self, req: SampleRequest, enc: EncodedPrompts, latents: torch.Tensor,
                timings: StageTimings, hook: Any = None) -> tuple[torch.Tensor, int]:
        assert enc.refiner_embeds is not None and enc.refiner_pooled is not None
        assert self._refiner_schedulers is not None
        sched = self._refiner_schedulers(req.scheduler)
        if req.refiner_only:  # the refiner's img2img on the image latents: strength, noise
            timesteps = strength_timesteps(sched, req.steps, self.device, req.strength, **req.custom_schedule)
            latents = img2img.add_noise(sched, latents, timesteps, req.generator)
        else:
            timesteps = refiner_timesteps(sched, req.steps, self.device, req.denoising_end, **req.custom_schedule)
            # img2img prepare_latents with 4-channel "image" and denoising_start: the latents, no noise.
            latents = latents.to(self.device, torch.float32)
        embeds, pooled = self._conditioning(enc.refiner_embeds, enc.refiner_pooled, enc.refiner_neg_embeds,
                                            enc.refiner_neg_pooled, req)
        n_ids = int({t.name: t for t in self.runners["refiner_unet"].spec.inputs}["time_ids"].shape[-1])
        orig, crops = req.original_size, req.crops_coords_top_left
        if n_ids == 5:  # requires_aesthetics_score: negative crops are diffusers' default (0, 0)
            pos, neg = [*orig, *crops, req.aesthetic_score], [*orig, 0, 0, req.negative_aesthetic_score]
        else:
            pos = neg = [*orig, *crops, *req.target_size]
        time_ids = torch.tensor([pos], dtype=torch.float32).repeat(req.batch, 1)
        if req.guidance:
            time_ids = torch.cat([torch.tensor([neg], dtype=torch.float32).repeat(req.batch, 1), time_ids], dim=0)
        latents = self._denoise(self.runners["refiner_unet"], "refiner_unet", sched, timesteps, latents,
                                (embeds, pooled, time_ids.to(self.device)), req, timings, hook=hook)
        return latents, len(timesteps)

    def _decode(self, latents: torch.Tensor, output_type: str, timings: StageTimings) -> Any:
        """VAE decode in fp32 (SDXL's VAE overflows in fp16), checked, then diffusers' post-processing."""
        vae = self.vae_config
        lat = latents.to(torch.float32)
        if vae.latents_mean is not None and vae.latents_std is not None:
            c = self.latent_channels
            mean = torch.tensor(vae.latents_mean).view(1, c, 1, 1).to(lat.device, lat.dtype)
            std = torch.tensor(vae.latents_std).view(1, c, 1, 1).to(lat.device, lat.dtype)
            lat = lat * std / vae.scaling_factor + mean
        else:
            lat = lat / vae.scaling_factor
        with timings.measure("vae_decoder"):
            image = self.runners["vae_decoder"]({"latent": lat.contiguous()})["images"]
        if not _all_finite(image):
            raise NumericalError(
                "the VAE decode produced NaN/Inf (it would be a black image)",
                "decode in fp32: rebuild the vae_decoder engine with --precision fp32, or use an fp16-fixed VAE",
            )
        return self._image_processor.postprocess(image, output_type=output_type)


def _built_for(store: Any, name: str, backend: str) -> Any:
    """``name``'s engine in ``store`` built for ``backend`` (the OpenVINO table or the main one), or None."""
    entry_for = getattr(store, "entry_for", None)
    if entry_for is not None:
        return entry_for(name, backend)
    entry = getattr(store, "entries", {}).get(name)
    return entry if getattr(entry, "backend", None) == backend else None
