"""Dynamic batching: one image is one job; compatible jobs share engine calls.

This is the one batching module of the server. Both deployments use it:

* the embedded server (:class:`EmbeddedBatcher`) collects jobs on the event loop for at
  most ``batch_wait_ms`` and hands them to :func:`run_jobs` on the replica's worker thread;
* on Ray Serve, ``@serve.batch`` collects them (``serve/ray_app.py``) and hands them to the
  same :func:`run_jobs`.

Why a job is one image: every image of every request keeps its own generator
(``torch.Generator("cpu").manual_seed(seed)``, diffusers' list-of-generators semantics), so an
image is the same whether it runs alone or in a batch with strangers (to ONNX Runtime's
and cuBLAS's batch-size rounding, far below 1/255). Jobs may share one pipeline call only when
everything but prompt, negative prompt and seed is equal: that is :class:`SamplingParams`,
the batch key.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import SDXLExportError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SamplingParams:
    """Everything two images must share to run in one pipeline call (the batch key)."""

    height: int
    width: int
    steps: int
    guidance_scale: float
    scheduler: str
    refiner: bool
    denoising_end: float
    #: ``negative_prompt=None`` (SDXL's zero negative conditioning) cannot share a call
    #: with text negatives: the pipeline takes None or a list of strings.
    zero_negative: bool
    aesthetic_score: float = 6.0
    negative_aesthetic_score: float = 2.5
    original_size: tuple[int, int] | None = None
    crops_coords_top_left: tuple[int, int] = (0, 0)
    target_size: tuple[int, int] | None = None
    #: img2img (each job brings its image; images of one call share the size above, and a
    #: text-to-image job never shares a call with an image job).
    img2img: bool = False
    strength: float | None = None
    refiner_only: bool = False
    #: the LoRA set, ``((name, scale), ...)`` sorted (names in the server's LoRA folder); the
    #: pipeline switches sets between calls, so requests are grouped by set
    loras: tuple[tuple[str, float], ...] = ()
    #: diffusers' ``eta`` and a custom schedule (``timesteps`` or ``sigmas``), None for the step count
    eta: float = 0.0
    timesteps: tuple[int, ...] | None = None
    sigmas: tuple[float, ...] | None = None
    #: further pipeline keywords every image of the call shares, ``((name, value), ...)`` sorted:
    #: inpainting's ``padding_mask_crop``, the hires fix's ``hires_*``
    extra: tuple[tuple[str, Any], ...] = ()
    #: the ControlNet set: ``(((name, scale, start, end), ...), guess_mode)`` or () (serve/controlnet_api.py)
    controlnets: tuple[Any, ...] = ()

    @property
    def guidance(self) -> bool:
        return self.guidance_scale > 1.0


@dataclass(eq=False)
class ImageJob:
    """One image to generate. Created by an API handler, finished by :func:`run_jobs`.

    Shared between the event loop (creates it, may set ``cancelled``) and the worker thread
    (reads it, runs it); ``cancelled`` is a ``threading.Event`` so either side may look.
    """

    prompt: str
    negative_prompt: str | None
    seed: int
    params: SamplingParams
    request_id: str = ""
    index: int = 0  # position in its request
    enqueued: float = field(default_factory=time.perf_counter)
    cancelled: threading.Event = field(default_factory=threading.Event)
    started: float | None = None
    image: Any = None  # img2img: this job's input image (PIL)
    mask: Any = None  # inpainting: this job's mask (PIL)
    control_images: tuple[Any, ...] = ()  # ControlNet: this job's control map per ControlNet (PIL)
    _claim: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def claim(self, now: float) -> bool:
        """Worker: take the job to run it, unless it was cancelled first."""
        with self._claim:
            if self.cancelled.is_set():
                return False
            self.started = now
            return True

    def cancel(self) -> None:
        """Event loop: cancel; a job not yet claimed drops its input image now (its memory goes
        with the request, not when the worker reaches it)."""
        with self._claim:
            self.cancelled.set()
            if self.started is None:
                self.image = None
                self.control_images = ()


@dataclass
class JobResult:
    """A finished image (PIL) with what the response and the metrics report."""

    image: Any
    seed: int
    batch_size: int
    queue_seconds: float
    run_seconds: float
    timings: dict[str, Any]


class JobCancelledError(SDXLExportError):
    """The job's client went away (or its deadline passed) before it reached an engine."""

    http_status = 499


def plan_chunks(n: int, served: Sequence[int], max_batch: int) -> list[int]:
    """Split ``n`` compatible images into call sizes the engines serve, largest first.

    ``served`` are the batch sizes one call can run at this size (ascending); 1 is
    assumed servable (every build serves batch 1). Greedy: the largest served size that
    fits what is left, so {1, 2, 4} and 7 images give [4, 2, 1].
    """
    sizes = sorted({s for s in served if 1 <= s <= max_batch} | {1}, reverse=True)
    chunks: list[int] = []
    while n > 0:
        take = next(s for s in sizes if s <= n)
        chunks.append(take)
        n -= take
    return chunks


def _img2img_kwargs(jobs: Sequence[ImageJob]) -> dict[str, Any]:
    """One input image per job (with one generator per job, diffusers encodes image i with
    generator i: an image is the same alone or batched)."""
    p = jobs[0].params
    if not p.img2img:
        return {}
    out = {"image": [j.image for j in jobs], "strength": p.strength, "refiner_only": p.refiner_only}
    if jobs[0].mask is not None:
        out["mask_image"] = [j.mask for j in jobs]
    return out


def _run_chunk(pipe: Any, jobs: Sequence[ImageJob], progress: Any = None, epoch: int = 0) -> list[JobResult]:
    p = jobs[0].params
    negatives = None if p.zero_negative else [j.negative_prompt or "" for j in jobs]
    t0 = time.perf_counter()
    step_kwargs: dict[str, Any] = {}
    if progress is not None:  # progress and stopping at the next step (serve/progress.py)
        progress.begin(jobs, "img2img" if p.img2img else "txt2img")
        step_kwargs["callback_on_step_end"] = progress.callback(epoch)
    try:
        out = _call(pipe, jobs, p, negatives, step_kwargs)
    finally:
        if progress is not None:
            progress.end()
    run = time.perf_counter() - t0
    timings = out.timings.to_dict()
    return [JobResult(image=img, seed=j.seed, batch_size=len(jobs),
                      queue_seconds=(j.started or t0) - j.enqueued, run_seconds=run, timings=timings)
            for j, img in zip(jobs, out.images)]


def _controlnet_kwargs(jobs: Sequence[ImageJob]) -> dict[str, Any]:
    from .controlnet_api import chunk_kwargs

    return chunk_kwargs(jobs)


def _call(pipe: Any, jobs: Sequence[ImageJob], p: SamplingParams, negatives: Any, extra: dict[str, Any]) -> Any:
    return pipe(
        [j.prompt for j in jobs], negatives, height=p.height, width=p.width, num_inference_steps=p.steps,
        guidance_scale=p.guidance_scale, denoising_end=p.denoising_end, refiner=p.refiner,
        generator=[torch.Generator("cpu").manual_seed(j.seed) for j in jobs], scheduler=p.scheduler,
        aesthetic_score=p.aesthetic_score, negative_aesthetic_score=p.negative_aesthetic_score,
        original_size=p.original_size, crops_coords_top_left=p.crops_coords_top_left, target_size=p.target_size,
        output_type="pil", loras=dict(p.loras), eta=p.eta, timesteps=None if p.timesteps is None else list(p.timesteps),
        sigmas=None if p.sigmas is None else list(p.sigmas), **_img2img_kwargs(jobs), **_controlnet_kwargs(jobs),
        **dict(p.extra), **extra,
    )


def run_jobs(pipe: Any, jobs: Sequence[ImageJob], max_batch: int,
             progress: Any = None) -> list[JobResult | BaseException]:
    """Run ``jobs`` (any mix of keys) on ``pipe``; one result or exception per job, in order.

    Cancelled jobs are answered with :class:`JobCancelledError` and never reach an engine.
    Jobs are grouped by :class:`SamplingParams` (first-come order kept) and each group is cut
    into the batch sizes the engines serve (:func:`plan_chunks`). A chunk that fails in a way
    one image can cause (NaN, an unexpected exception) is retried one image at a time, so one
    bad image fails alone and the rest still finish; a failure that is the same for every
    image (a bad LoRA, a stopped call: a named request error) is not retried.
    ``progress``: a :class:`~sdxl_export.serve.progress.ProgressTracker` fed at every step,
    which stops a call whose jobs were all cancelled, or that a client interrupted.
    Runs on the replica's worker thread: ``pipe`` calls block.
    """
    epoch = progress.interrupt_epoch if progress is not None else 0
    results: dict[int, JobResult | BaseException] = {}
    groups: dict[SamplingParams, list[ImageJob]] = {}
    now = time.perf_counter()
    for i, job in enumerate(jobs):
        if not job.claim(now):
            results[i] = JobCancelledError("the client went away before the image was started")
            continue
        groups.setdefault(job.params, []).append(job)
    position = {id(j): i for i, j in enumerate(jobs)}
    for params, group in groups.items():
        served = pipe.served_batch_sizes(params.height, params.width, guidance=params.guidance,
                                         refiner=params.refiner, limit=max(1, max_batch),
                                         img2img=params.img2img, refiner_only=params.refiner_only)
        start = 0
        for size in plan_chunks(len(group), served, max_batch):
            chunk = group[start:start + size]
            start += size
            if all(j.cancelled.is_set() for j in chunk):  # cancelled while earlier chunks ran
                for job in chunk:
                    results[position[id(job)]] = JobCancelledError("the client went away before the image was "
                                                                   "started")
                continue
            for job, res in zip(chunk, _run_isolated(pipe, chunk, progress, epoch)):
                results[position[id(job)]] = res
    return [results[i] for i in range(len(jobs))]


def _same_for_every_image(exc: BaseException) -> bool:
    """A named error other than NaN/Inf does not depend on which images share the call."""
    from ..errors import NumericalError

    return isinstance(exc, SDXLExportError) and not isinstance(exc, NumericalError)


def _run_isolated(pipe: Any, chunk: Sequence[ImageJob], progress: Any = None,
                  epoch: int = 0) -> list[JobResult | BaseException]:
    try:
        return list(_run_chunk(pipe, chunk, progress, epoch))
    except Exception as exc:  # noqa: BLE001 - reported per job below
        if len(chunk) == 1 or _same_for_every_image(exc):
            return [exc] * len(chunk)
        log.warning("a batch of %d failed (%s: %s); running its images one at a time",
                    len(chunk), type(exc).__name__, exc)
    out: list[JobResult | BaseException] = []
    for job in chunk:
        try:
            out.extend(_run_chunk(pipe, [job], progress, epoch))
        except Exception as exc:  # noqa: BLE001
            out.append(exc)
    return out


class EmbeddedBatcher:
    """The embedded server's collector: jobs in on the event loop, batches out to one worker.

    All methods but the executor run on the event loop that created it (not thread-safe:
    call them from that loop only). ``execute`` runs on the single worker thread given as
    ``executor`` and receives a list of jobs; a batch is formed from the oldest waiting
    job's key, waiting at most ``wait_s`` after that job arrived for up to ``max_batch``
    compatible jobs. Jobs of other keys wait their turn in arrival order (no starvation:
    the oldest job always leads the next batch).
    """

    def __init__(self, execute: Callable[[list[ImageJob]], list[JobResult | BaseException]],
                 executor: Any, *, max_batch: int, wait_s: float):
        self._execute = execute
        self._executor = executor
        self.max_batch = max(1, int(max_batch))
        self.wait_s = max(0.0, float(wait_s))
        self._pending: list[tuple[ImageJob, asyncio.Future[Any]]] = []
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="sdxl-batcher")

    def submit(self, job: ImageJob) -> asyncio.Future[Any]:
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending.append((job, fut))
        self._wakeup.set()
        return fut

    def forget(self, jobs: Sequence[ImageJob], error: BaseException | None = None) -> int:
        """Take ``jobs`` out of the queue now (their client left, their request timed out, or a
        client interrupted): their futures are answered and nothing keeps their input images.
        Returns how many were still waiting."""
        ids = {id(j) for j in jobs}
        keep: list[tuple[ImageJob, asyncio.Future[Any]]] = []
        gone: list[tuple[ImageJob, asyncio.Future[Any]]] = []
        for item in self._pending:
            (gone if id(item[0]) in ids else keep).append(item)
        self._pending[:] = keep
        for job, fut in gone:
            job.cancel()
            if not fut.done():
                fut.set_exception(error or JobCancelledError("the client went away before the image was started"))
                fut.exception()  # retrieved: no "exception was never retrieved" noise
        if gone:
            self._wakeup.set()
        return len(gone)

    @property
    def pending_jobs(self) -> list[ImageJob]:
        return [j for j, _ in self._pending]

    async def drain(self) -> None:
        """Finish every submitted job, then stop the loop."""
        self._closing = True
        self._wakeup.set()
        if self._task is not None:
            await self._task
            self._task = None

    async def _loop(self) -> None:
        while True:
            while not self._pending:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
            batch = await self._collect()
            if not batch:
                continue
            loop = asyncio.get_running_loop()
            try:
                results = await loop.run_in_executor(self._executor, self._execute, [j for j, _ in batch])
            except BaseException as exc:  # noqa: BLE001 - the worker itself failed: fail these jobs
                results = [exc] * len(batch)
            for (job, fut), res in zip(batch, results):
                if fut.done():
                    continue
                if isinstance(res, BaseException):
                    fut.set_exception(res)
                    if job.cancelled.is_set():
                        fut.exception()  # its request is gone: nobody else will retrieve it
                else:
                    fut.set_result(res)

    async def _collect(self) -> list[tuple[ImageJob, asyncio.Future[Any]]]:
        # Cancelled jobs leave the queue at once, answered without reaching an engine.
        for item in [it for it in self._pending if it[0].cancelled.is_set()]:
            self._pending.remove(item)
            if not item[1].done():
                item[1].set_exception(JobCancelledError("the client went away before the image was started"))
        if not self._pending:
            return []
        key = self._pending[0][0].params
        deadline = self._pending[0][0].enqueued + self.wait_s
        while not self._closing:
            same = sum(1 for j, _ in self._pending if j.params == key and not j.cancelled.is_set())
            left = deadline - time.perf_counter()
            if same >= self.max_batch or left <= 0:
                break
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), timeout=left)
            except asyncio.TimeoutError:
                break
        batch = [it for it in self._pending if it[0].params == key][: self.max_batch]
        for it in batch:
            self._pending.remove(it)
        return batch
