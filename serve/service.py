"""``ImageService``: one replica's pipeline, admission, readiness and metrics.

The HTTP layer (``serve/app.py``) turns each API's request into :class:`ImageJob` s through
:meth:`ImageService.make_jobs` and awaits :meth:`ImageService.generate`. How jobs are
collected into batches is pluggable (``submit``): the embedded server's
:class:`~sdxl_export.serve.batching.EmbeddedBatcher`, or Ray Serve's ``@serve.batch``
(``serve/ray_app.py``); both end in :meth:`execute`, which runs
:func:`~sdxl_export.serve.batching.run_jobs` on the replica's single worker thread.

Thread rules (also in the README):

* the pipeline is called from the one worker thread only (one lane per replica: on a GPU
  one lane keeps every engine's scratch and CUDA graphs private to it; on CPU a second lane
  would only split the same cores);
* everything else (admission counters, readiness, futures) lives on the event loop; the
  counters the worker also touches are guarded by ``_lock``;
* the pipeline object itself is thread-safe, so the warm-up (a loader thread) and the
  worker never need to coordinate beyond ``ready``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import math
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from ..errors import InvalidRequestError, SDXLExportError, UnsupportedShapeError
from .batching import EmbeddedBatcher, ImageJob, JobResult, SamplingParams, run_jobs
from .config import ServeConfig
from .limits import check_floats, fit_size
from .metrics import ServeMetrics
from .progress import JobStoppedError, ProgressTracker

log = logging.getLogger(__name__)

#: Largest default batch (images per pipeline call) when engines do not bound it.
DEFAULT_MAX_BATCH = 8


class ServiceUnavailableError(SDXLExportError):
    """The replica is still loading/warming up, failed to load, or is shutting down (503)."""

    http_status = 503
    retry_after = 5


class QueueFullError(SDXLExportError):
    """The replica's queue has no room for this request (429 with ``Retry-After``)."""

    http_status = 429

    def __init__(self, message: str, hint: str, retry_after: int):
        super().__init__(message, hint)
        self.retry_after = retry_after


class RequestTimeoutError(SDXLExportError):
    """The request did not finish within ``--timeout`` (504). Not retried by clients: the same
    request would take as long again."""

    http_status = 504
    retryable = False


class ClientGoneError(SDXLExportError):
    """The client closed the connection; its images were dropped (499: nobody reads it)."""

    http_status = 499


class ImageService:
    """See the module docstring for what may be shared and what is locked."""

    def __init__(self, config: ServeConfig, metrics: ServeMetrics | None = None):
        self.config = config
        self.pipe: Any = None
        self.ready = False
        self.draining = False
        self.load_error: str | None = None
        self.max_batch = config.max_batch_size or 1
        self.metrics = metrics or ServeMetrics(queue_depth=lambda: float(self.waiting))
        self._lock = threading.Lock()
        self._waiting = 0
        self.running = 0  # images in the batch the worker runs now
        self._counted: set[int] = set()
        self._batch_seconds = 0.0  # moving average of one batch call, for Retry-After
        self._worker = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="sdxl-worker")
        self._submit: Callable[[ImageJob], Awaitable[JobResult]] | None = None
        self._batcher: EmbeddedBatcher | None = None
        #: the running batch's steps, and interrupt/skip (written by the worker, read by routes)
        self.progress = ProgressTracker()

    # ---- lifecycle ----------------------------------------------------------------------------
    def load(self) -> None:
        """Open the pipeline and run the warm-up sizes (blocking; call off the event loop)."""
        from ..runtime import SDXLPipeline

        cfg = self.config
        t0 = time.perf_counter()
        try:
            pipe = SDXLPipeline.from_artifacts(cfg.artifacts, backend=cfg.backend, device=cfg.device,
                                               load_refiner=cfg.load_refiner,
                                               backend_options=dict(cfg.backend_options))
            self.pipe = pipe
            pipe.lora_dir = cfg.lora_dir
            pipe.loras.allow_paths = False  # requests name LoRAs in --lora-dir, never paths
            if cfg.lora_dir is not None:
                _check_switchable(pipe)
            n = pipe.native_size
            served = pipe.served_batch_sizes(n, n, refiner=pipe.has_refiner, limit=DEFAULT_MAX_BATCH)
            self.max_batch = cfg.max_batch_size or (max(served) if served else 1)
            self._warm_up()
        except Exception as exc:
            self.load_error = f"{type(exc).__name__}: {exc}"
            self.metrics.errors.labels(kind="load").inc()
            log.error("the pipeline failed to load: %s", self.load_error)
            raise
        if self.pipe.random_weights_note:
            log.warning("%s", self.pipe.random_weights_note)
        self.ready = True
        self.metrics.ready.set(1)
        log.info("ready in %.1f s: %s on %s, max batch %d, queue %d, sizes %s", time.perf_counter() - t0,
                 self.pipe.backend, self.pipe.device, self.max_batch, cfg.max_queue,
                 "any" if self.served_sizes() is None else len(self.served_sizes() or []))

    def _warm_up(self) -> None:
        """Run each warm-up size once at every batch size the batcher may use, so no request
        pays for first-call costs (CUDA graph capture, ORT's first-run allocations)."""
        pipe = self.pipe
        for h, w in self.config.warmup:
            h, w = (h or pipe.native_size), (w or pipe.native_size)
            sizes = self.served_sizes()
            if sizes is not None and (h, w) not in sizes:
                raise InvalidRequestError(f"--warmup size {w}x{h} is not served by the engines",
                                          f"use one of {self.size_list()}")
            for b in pipe.served_batch_sizes(h, w, refiner=pipe.has_refiner, limit=self.max_batch) or [1]:
                t0 = time.perf_counter()
                pipe(["warm-up"] * b, height=h, width=w, num_inference_steps=self.config.warmup_steps,
                     refiner=pipe.has_refiner, seed=0, output_type="pil")
                log.info("warm-up %dx%d batch %d: %.2f s", w, h, b, time.perf_counter() - t0)

    async def start_embedded(self) -> None:
        """Embedded server: start the batcher now, load in the background (``/healthz`` answers
        at once, ``/readyz`` once loaded and warmed)."""
        loop = asyncio.get_running_loop()
        self._batcher = EmbeddedBatcher(self.execute, self._worker, max_batch=self.max_batch,
                                        wait_s=self.config.batch_wait_ms / 1000.0)
        self._submit = self._batcher.submit
        fut = loop.run_in_executor(self._worker, self._load_quietly)
        fut.add_done_callback(lambda _f: self._configure_batcher())

    def _load_quietly(self) -> None:
        try:
            self.load()
        except Exception:  # load() logged it and set load_error; /readyz reports it
            log.debug("load failed", exc_info=True)

    def _configure_batcher(self) -> None:
        if self._batcher is not None:
            self._batcher.max_batch = self.max_batch
            self._batcher.start()

    def use_submitter(self, submit: Callable[[ImageJob], Awaitable[JobResult]]) -> None:
        """Ray Serve: jobs go through ``@serve.batch`` instead of the embedded batcher."""
        self._submit = submit

    async def drain(self) -> None:
        """Stop admitting, finish every accepted job (embedded batcher)."""
        self.draining = True
        if self._batcher is not None:
            await self._batcher.drain()

    def close(self) -> None:
        self.ready = False
        self.metrics.ready.set(0)
        self._worker.shutdown(wait=True)
        if self.pipe is not None:
            self.pipe.close()
            self.pipe = None

    # ---- what is served ----------------------------------------------------------------------------
    def served_sizes(self) -> list[tuple[int, int]] | None:
        return None if self.pipe is None else self.pipe.served_sizes()

    def size_list(self) -> str:
        sizes = self.served_sizes()
        if sizes is None:
            return "any multiple of 8"
        return ", ".join(f"{w}x{h}" for h, w in sizes)

    @property
    def max_pixels(self) -> int:
        """Pixels (height x width) one image may have, output or decoded input: ``--max-pixels``,
        or the largest size the engines serve (a plain export: SDXL's largest bucket at the
        model's native size)."""
        from ..buckets import buckets_for

        if self.config.max_pixels:
            return int(self.config.max_pixels)
        sizes = self.served_sizes()
        if sizes:
            return max(h * w for h, w in sizes)
        native = self.pipe.native_size if self.pipe is not None else 1024
        return max(b.height * b.width for b in buckets_for(native))

    @property
    def waiting(self) -> int:
        return self._waiting

    @property
    def queued_jobs(self) -> int:
        """Jobs the embedded batcher holds (waiting for the worker), cancelled ones included."""
        return len(self._batcher.pending_jobs) if self._batcher is not None else 0

    def interrupt(self) -> int:
        """``POST /sdapi/v1/interrupt``: stop the running batch at its next step and answer every
        queued job (event loop only). Returns how many queued jobs were dropped."""
        self.progress.interrupt()
        if self._batcher is None:
            return 0
        jobs = self._batcher.pending_jobs
        for j in jobs:
            j.cancel()
        return self._batcher.forget(jobs, JobStoppedError("interrupted by a client (POST /sdapi/v1/interrupt)",
                                                          "send the request again"))

    # ---- requests ------------------------------------------------------------------------------------
    def check_ready(self) -> None:
        if self.draining:
            raise ServiceUnavailableError("the server is shutting down", "retry on another replica")
        if not self.ready:
            if self.load_error:
                raise ServiceUnavailableError(f"the pipeline failed to load ({self.load_error})",
                                              "fix the artifacts and restart the server")
            raise ServiceUnavailableError("the pipeline is still loading", "retry when GET /readyz answers 200")

    def make_jobs(self, prompts: Sequence[str], negatives: Sequence[str] | None, seeds: Sequence[int], *,
                  request_id: str, images: Sequence[Any] | None = None, loras: Any = None,
                  notes: list[str] | None = None, masks: Sequence[Any] | None = None,
                  **kwargs: Any) -> list[ImageJob]:
        """Check one request (all of it, before anything is queued) and cut it into jobs.

        ``kwargs`` are pipeline arguments (height, width, num_inference_steps, guidance_scale,
        scheduler, refiner, denoising_end, aesthetic scores, strength, refiner_only); ``images``
        the input image of each output (img2img); ``loras`` ``{name: scale}`` from the LoRA folder.
        ``notes`` receives what the server changed (``--size-policy nearest``).
        Raises the runtime's named errors.
        """
        from . import loras as lora_names

        self.check_ready()
        from . import controlnet_api

        control = controlnet_api.admit(kwargs.pop("controlnets", None), self.pipe, kwargs)
        kwargs.update(controlnet_api.call_kwargs(control))
        cfg = self.config
        lora_key = lora_names.check(loras, cfg.lora_dir)
        if not prompts:
            raise InvalidRequestError("no images requested", "ask for at least one image")
        if len(prompts) > cfg.max_images_per_request:
            raise InvalidRequestError(f"{len(prompts)} images requested, at most {cfg.max_images_per_request} "
                                      "per request", "ask for fewer images per request")
        for text in [*prompts, *(negatives or [])]:
            if len(text) > cfg.max_prompt_chars:
                raise InvalidRequestError(f"a prompt has {len(text)} characters, at most {cfg.max_prompt_chars}",
                                          "shorten the prompt (CLIP reads 77 tokens)")
        steps = kwargs.get("num_inference_steps", 30)
        if isinstance(steps, int) and steps > cfg.max_steps:
            raise InvalidRequestError(f"steps {steps} is above the server's cap {cfg.max_steps}",
                                      f"ask for at most {cfg.max_steps} steps")
        sizes = self.served_sizes()
        native = self.pipe.native_size
        h, w = kwargs.get("height") or native, kwargs.get("width") or native
        if images and not (kwargs.get("height") or kwargs.get("width")):  # img2img keeps the image's size
            s = self.pipe.vae_scale
            h, w = images[0].height // s * s, images[0].width // s * s
        check_floats(kwargs)
        if isinstance(h, int) and isinstance(w, int) and not isinstance(h, bool) and not isinstance(w, bool):
            fitted = fit_size(h, w, sizes, max_pixels=self.max_pixels, policy=cfg.size_policy,
                              size_list=self.size_list())
            if fitted != (h, w):
                (notes if notes is not None else []).append(
                    f"size {w}x{h} is not served; ran {fitted[1]}x{fitted[0]}, the nearest served size")
                h, w = fitted
                kwargs["height"], kwargs["width"] = h, w
        if sizes is not None and isinstance(h, int) and isinstance(w, int) and (h, w) not in sizes:
            raise UnsupportedShapeError(f"size {w}x{h} (width x height) is not served by this server's engines",
                                        f"use one of: {self.size_list()}")
        if images is not None and len(images) != len(prompts):
            raise InvalidRequestError(f"{len(images)} input images for {len(prompts)} outputs",
                                      "send one input image per output image")
        if images:
            sizes_in = {(im.height, im.width) for im in images}
            if len(sizes_in) > 1 and not (kwargs.get("height") or kwargs.get("width")):
                raise InvalidRequestError("the input images differ in size and no output size was given",
                                          "send images of one size, or height and width to resize them to")
            kwargs["image"] = images[0]
        if masks:  # inpainting: one mask per output image, beside its image
            kwargs["mask_image"] = masks[0]
        norm = self.pipe.check_call(prompts[0], None if negatives is None else negatives[0], **kwargs)
        params = SamplingParams(
            height=norm["height"], width=norm["width"], steps=norm["steps"],
            guidance_scale=norm["guidance_scale"], scheduler=norm["scheduler"], refiner=norm["refiner"],
            denoising_end=norm["denoising_end"], zero_negative=negatives is None,
            aesthetic_score=float(kwargs.get("aesthetic_score", 6.0)),
            negative_aesthetic_score=float(kwargs.get("negative_aesthetic_score", 2.5)),
            original_size=_pair_or_none(kwargs.get("original_size")),
            crops_coords_top_left=_pair_or_none(kwargs.get("crops_coords_top_left")) or (0, 0),
            target_size=_pair_or_none(kwargs.get("target_size")),
            img2img=bool(norm.get("img2img")), strength=norm.get("strength"),
            refiner_only=bool(norm.get("refiner_only")), loras=lora_key, eta=float(norm.get("eta", 0.0)),
            timesteps=_tuple_or_none(norm.get("timesteps")), sigmas=_tuple_or_none(norm.get("sigmas")),
            extra=tuple(sorted((k, kwargs[k]) for k in EXTRA_KEYS if kwargs.get(k) is not None)),
            controlnets=controlnet_api.batch_key(control),
        )
        return [ImageJob(prompt=p, negative_prompt=None if negatives is None else negatives[i], seed=int(seeds[i]),
                         params=params, request_id=request_id, index=i, image=images[i] if images else None,
                         mask=masks[i] if masks else None,
                         control_images=tuple(control["images"]) if control else ())
                for i, p in enumerate(prompts)]

    def _admit(self, jobs: Sequence[ImageJob]) -> None:
        with self._lock:
            if self._waiting + len(jobs) > self.config.max_queue:
                raise QueueFullError(
                    f"the queue is full ({self._waiting} images waiting, room for {self.config.max_queue})",
                    "retry after the time in Retry-After", self.retry_after())
            self._waiting += len(jobs)
            self._counted.update(id(j) for j in jobs)

    def _release(self, jobs: Sequence[ImageJob]) -> None:
        with self._lock:
            for j in jobs:
                if id(j) in self._counted:
                    self._counted.discard(id(j))
                    self._waiting -= 1

    def retry_after(self) -> int:
        """Seconds until the queue has likely drained by one batch (at least 1)."""
        batches = math.ceil(max(1, self._waiting) / max(1, self.max_batch))
        return max(1, math.ceil(batches * (self._batch_seconds or 1.0)))

    async def generate(self, jobs: list[ImageJob], disconnected: Callable[[], Awaitable[bool]] | None = None,
                       kind: str = "txt2img") -> list[JobResult]:
        """Queue ``jobs`` (all or none), wait for them; 429 / 504 / client-gone as named errors."""
        self.check_ready()
        if self._submit is None:
            raise ServiceUnavailableError("the server has no batcher yet", "retry in a moment")
        self._admit(jobs)
        deadline = time.monotonic() + self.config.timeout_s
        futures = [asyncio.ensure_future(self._submit(j)) for j in jobs]
        try:
            pending = set(futures)
            while pending:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise RequestTimeoutError(f"the request did not finish within {self.config.timeout_s:g} s",
                                              "retry later, or ask for fewer steps or images")
                _, pending = await asyncio.wait(pending, timeout=min(left, 0.25))
                if pending and disconnected is not None and await disconnected():
                    raise ClientGoneError("the client went away", "nothing to do")
            return [f.result() for f in futures]
        except BaseException:
            for j in jobs:
                j.cancel()  # a running call stops at its next step (serve/progress.py)
            if self._batcher is not None:
                self._batcher.forget(jobs)  # out of the queue now, images and all
            for f in futures:
                if f.done() and not f.cancelled():
                    f.exception()  # retrieved: no "exception was never retrieved" noise
            raise
        finally:
            self._release(jobs)

    def execute(self, jobs: list[ImageJob]) -> list[JobResult | BaseException]:
        """Worker thread: run one collected batch (from either batcher) and record metrics."""
        self._release(jobs)
        live = [j for j in jobs if not j.cancelled.is_set()]
        m = self.metrics
        self.running = len(live)
        m.running.set(len(live))
        t0 = time.perf_counter()
        try:
            results = run_jobs(self.pipe, jobs, self.max_batch, progress=self.progress)
        finally:
            self.running = 0
            m.running.set(0)
        spent = time.perf_counter() - t0
        seen_calls: set[int] = set()
        for res in results:
            if isinstance(res, BaseException):
                continue
            m.queue_seconds.observe(res.queue_seconds)
            m.images.inc()
            if id(res.timings) not in seen_calls:  # one observation per pipeline call
                seen_calls.add(id(res.timings))
                m.batch_size.observe(res.batch_size)
                m.observe_stages(res.timings.get("stages", {}))
        if live:
            calls = max(1, len(seen_calls))
            per_call = spent / calls
            self._batch_seconds = per_call if not self._batch_seconds else 0.7 * self._batch_seconds + 0.3 * per_call
        return results


def _tuple_or_none(value: Any) -> tuple[Any, ...] | None:
    return None if value is None else tuple(value)


def _check_switchable(pipe: Any) -> None:
    """``--lora-dir`` on runners that cannot switch weights: refused at load, not per request."""
    from ..runtime import ComponentRunner

    fixed = [n for n, r in pipe.loras.runners.items()
             if type(r).set_weights is ComponentRunner.set_weights
             or getattr(getattr(r, "_engine", None), "refittable", True) is False]
    if fixed:
        from .config import ServeConfigError

        raise ServeConfigError(f"--lora-dir: the {pipe.backend} runners of {', '.join(fixed)} cannot switch "
                               "weights at run time", "serve with --backend onnxruntime or torch, or rebuild "
                               "the TensorRT engines with --refittable")


#: Pipeline keywords that pass through to every call of the request's images (batch key too).
EXTRA_KEYS = ("padding_mask_crop", "hires_scale", "hires_size", "hires_upscaler", "hires_steps", "hires_strength")


def _pair_or_none(value: Any) -> tuple[int, int] | None:
    """A (height, width) pair the pipeline already accepted, as a hashable tuple."""
    return None if value is None else (int(value[0]), int(value[1]))


def new_request_id() -> str:
    return uuid.uuid4().hex[:16]
