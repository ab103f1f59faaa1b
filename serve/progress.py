"""Progress of the running batch, and the stop requests (interrupt, skip, cancel) acted on
at the next denoising step.

:class:`ProgressTracker` is fed by the pipeline's per-step callback
(``callback_on_step_end``) on the replica's worker thread and read by the event loop
(``GET /sdapi/v1/progress``, the native SSE stream ``GET /v1/progress/stream``). Shared
between those two threads; every field is guarded by ``_lock``; readers get a copy
(:meth:`snapshot`).

Stopping: a job is stopped at the next step boundary when its client left or its request
timed out (``job.cancelled``), or on ``POST /sdapi/v1/interrupt`` (the running batch and
everything queued) or ``/sdapi/v1/skip`` (the running batch only). A chunk stops when every
job in it is to stop (jobs sharing a call with a live one finish with it): the callback
raises :class:`JobStoppedError`, the worker is free at once.

The preview image (``current_image``) is a latent-to-RGB linear map of the first image's
latents (SDXL's published approximation, no extra weights): cheap, computed only when a
client asks for it.
"""

from __future__ import annotations

import base64
import io
import threading
import time
from collections.abc import Sequence
from typing import Any

import torch

from ..errors import SDXLExportError

#: SDXL latent channels -> RGB (a least-squares fit of the VAE decode, as the web UI's and
#: ComfyUI's "latent2rgb" previews use), and its bias.
SDXL_LATENT_RGB = torch.tensor([[0.3651, 0.4232, 0.4341], [-0.2533, -0.0042, 0.1068],
                                [0.1076, 0.1111, -0.0362], [-0.3165, -0.2492, -0.2188]])
SDXL_LATENT_RGB_BIAS = torch.tensor([0.1084, -0.0175, -0.0011])


class JobStoppedError(SDXLExportError):
    """The job was stopped between two denoising steps: its client left, its request timed
    out, or a client called ``/sdapi/v1/interrupt`` or ``/skip``."""

    http_status = 499
    retryable = False


def latent_preview(latents: torch.Tensor) -> Any:
    """A PIL preview of one latent (C, h, w) through :data:`SDXL_LATENT_RGB` (first 4 channels)."""
    from PIL import Image

    lat = latents.detach().to("cpu", torch.float32)[:4]
    if lat.shape[0] < 4:
        lat = torch.cat([lat, torch.zeros(4 - lat.shape[0], *lat.shape[1:])])
    rgb = torch.einsum("chw,cr->hwr", lat, SDXL_LATENT_RGB) + SDXL_LATENT_RGB_BIAS
    arr = ((rgb.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
    return Image.fromarray(arr, "RGB")


class ProgressTracker:
    """The replica's running batch; see the module docstring for the thread rules."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._jobs: list[Any] = []
        self._kind = ""
        self._step = 0          # steps done in the running call, every stage
        self._steps = 0         # expected steps of the running call
        self._stage_base = 0    # steps of the stages before the current one
        self._started = 0.0
        self._latents: torch.Tensor | None = None
        self._interrupt_epoch = 0
        self._skip = False
        self._interrupted = False
        self._skipped = False
        self._request_id: str | None = None
        self.version = 0        # bumped on every change (the SSE stream polls it)
        #: the last call stopped between steps: request id, steps done, steps it would have run
        self.last_stop: dict[str, Any] | None = None
        #: event-loop queues of the SSE streams: every change is put on each (no step is lost
        #: between two polls); (loop, queue) pairs, guarded by _lock
        self._subscribers: list[tuple[Any, Any]] = []

    # ---- subscribers (SSE) -------------------------------------------------------------------------
    def subscribe(self) -> Any:
        """An ``asyncio.Queue`` on the running loop receiving a snapshot (without preview) per change."""
        import asyncio

        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        with self._lock:
            self._subscribers.append((asyncio.get_running_loop(), queue))
        return queue

    def unsubscribe(self, queue: Any) -> None:
        with self._lock:
            self._subscribers = [(lp, q) for lp, q in self._subscribers if q is not queue]

    def _publish(self) -> None:
        with self._lock:
            subs = list(self._subscribers)
        if not subs:
            return
        snap = self.snapshot()
        for loop, queue in subs:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, snap)
            except RuntimeError:  # that loop is closed: its stream is gone
                self.unsubscribe(queue)

    # ---- the worker side ----------------------------------------------------------------------------
    def begin(self, jobs: Sequence[Any], kind: str = "txt2img") -> None:
        p = jobs[0].params
        with self._lock:
            self._jobs = list(jobs)
            self._kind = kind
            self._step = self._stage_base = 0
            self._steps = max(1, int(p.steps))
            self._started = time.perf_counter()
            self._latents = None
            self._skip = self._interrupted = self._skipped = False
            self._request_id = jobs[0].request_id or None
            self.version += 1
        self._publish()

    def end(self) -> None:
        with self._lock:
            self._jobs = []
            self._latents = None
            self._step = self._steps = 0
            self.version += 1
        self._publish()

    def callback(self, interrupt_epoch: int) -> Any:
        """The ``callback_on_step_end`` for one pipeline call started at ``interrupt_epoch``."""

        def on_step(_pipe: Any, i: int, _t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
            stage_steps = int(kwargs.get("stage_steps", 0))
            with self._lock:
                if i == 0 and self._step:  # a new stage: the steps so far are the earlier stages'
                    self._stage_base = self._step
                self._step = self._stage_base + i + 1
                if i == 0:
                    rest = 0 if kwargs.get("stage") == "refiner_unet" else max(0, self._steps_hint() - stage_steps)
                    self._steps = max(self._step, self._stage_base + stage_steps + rest)
                self._latents = kwargs["latents"][0]
                self.version += 1
                jobs = list(self._jobs)
                stop = self._skip or self._interrupt_epoch != interrupt_epoch
                if stop:
                    self._interrupted = self._interrupt_epoch != interrupt_epoch
                    self._skipped = self._skip
            self._publish()
            cancelled = bool(jobs) and all(j.cancelled.is_set() for j in jobs)
            if stop or cancelled:
                with self._lock:
                    self.last_stop = {"request_id": jobs[0].request_id if jobs else None, "step": self._step,
                                      "steps": self._steps, "why": "interrupt" if stop else "cancelled"}
            if stop:
                raise JobStoppedError("interrupted by a client (POST /sdapi/v1/interrupt or /skip)",
                                      "send the request again")
            if cancelled:
                raise JobStoppedError("stopped: the client went away or the request timed out",
                                      "raise --timeout, or ask for fewer steps")
            return {}

        return on_step

    def _steps_hint(self) -> int:
        return max(1, int(self._jobs[0].params.steps)) if self._jobs else 1

    # ---- the event loop side ------------------------------------------------------------------------
    @property
    def interrupt_epoch(self) -> int:
        with self._lock:
            return self._interrupt_epoch

    def interrupt(self) -> None:
        """Stop the running batch at its next step, and every job queued before now."""
        with self._lock:
            self._interrupt_epoch += 1
            self.version += 1

    def skip(self) -> None:
        """Stop the running batch at its next step (the queue goes on)."""
        with self._lock:
            if self._jobs:
                self._skip = True
                self.version += 1

    def snapshot(self, *, preview: bool = False) -> dict[str, Any]:
        with self._lock:
            running = bool(self._jobs)
            step, steps, started = self._step, self._steps, self._started
            latents = self._latents if preview else None
            out = {"running": running, "kind": self._kind if running else "", "step": step,
                   "steps": steps if running else 0, "request_id": self._request_id if running else None,
                   "images": len(self._jobs), "interrupted": self._interrupted, "skipped": self._skipped,
                   "started": started, "version": self.version}
        progress = step / steps if running and steps else 0.0
        elapsed = time.perf_counter() - started if running else 0.0
        out["progress"] = progress
        out["eta_s"] = (elapsed / progress * (1 - progress)) if running and progress > 0 else None
        out["current_image"] = None
        if latents is not None:
            buf = io.BytesIO()
            latent_preview(latents).save(buf, format="PNG")
            out["current_image"] = base64.b64encode(buf.getvalue()).decode("ascii")
        return out
