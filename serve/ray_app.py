"""The same app on Ray Serve: one replica = one process = one pipeline (one GPU each on GPU hosts).

Ray Serve is the scale-out engine: it runs the replicas, routes HTTP to them, restarts them
and autoscales them. What each replica runs is the embedded server's code: the app from
``serve/app.py`` over an :class:`ImageService`, whose jobs go through Ray's own
``@serve.batch`` into the same :func:`~sdxl_export.serve.batching.run_jobs`.

A replica's constructor loads the pipeline and runs the warm-up, so Ray routes to it only
once no request would pay a first-call cost. Admission (429 with ``Retry-After``) is the
replica's own bounded queue; Ray's request queue is left unbounded and its per-replica
limit generous so that requests reach it instead of Ray's generic 503.

Use it from the CLI (``sdxl-export serve --ray``), or in a Ray Serve config / ``serve run``::

    serve run sdxl_export.serve:app artifacts=/models/sdxl-trt max_batch_size=4

(``app`` is an application builder: its keyword arguments are :class:`ServeConfig` fields.)
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from ray import serve

from .batching import ImageJob, JobResult
from .config import ServeConfig, config_from_args
from .service import ImageService

log = logging.getLogger(__name__)


class _Outcome:
    """Ray's batch wrapper hands each caller its list element; errors travel as values so
    one failed image does not fail its batch-mates."""

    __slots__ = ("value",)

    def __init__(self, value: JobResult | BaseException):
        self.value = value


@serve.deployment
@serve.ingress()
class SDXLDeployment:
    """One Ray Serve replica. Ray calls its methods on the replica's event loop; the pipeline
    runs on the service's single worker thread (see ``ImageService``)."""

    async def __init__(self, config: ServeConfig):
        _log_to_replica_stderr()
        self.config = config
        self.service = ImageService(config)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self.service.load)  # ready only once loaded and warmed up
        self._batched.set_max_batch_size(self.service.max_batch)
        self._batched.set_batch_wait_timeout_s(config.batch_wait_ms / 1000.0)
        self.service.use_submitter(self._submit)

    def __serve_build_asgi_app__(self) -> Any:
        from .app import build_app

        return build_app(lambda: self.service, self.config)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.02)
    async def _batched(self, jobs: list[ImageJob]) -> list[_Outcome]:
        loop = asyncio.get_running_loop()
        results = await loop.run_in_executor(self.service._worker, self.service.execute, list(jobs))
        return [_Outcome(r) for r in results]

    async def _submit(self, job: ImageJob) -> JobResult:
        outcome: _Outcome = await self._batched(job)
        if isinstance(outcome.value, BaseException):
            raise outcome.value
        return outcome.value

    def check_health(self) -> None:
        if self.service.load_error:
            raise RuntimeError(self.service.load_error)


def _log_to_replica_stderr() -> None:
    """Ray captures a replica's stderr into its log file: send our INFO lines (access log,
    load and warm-up) there, as the embedded server prints them."""
    root = logging.getLogger("sdxl_export")
    if not any(not isinstance(h, logging.NullHandler) for h in root.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname).1s %(name)s: %(message)s", "%H:%M:%S"))
        root.addHandler(handler)
        root.setLevel(logging.INFO)


def deployment_options(config: ServeConfig, *, replicas: int | None = None,
                       autoscale: tuple[int, int] | None = None, num_gpus: float | None = None) -> dict[str, Any]:
    """Ray Serve options: one GPU per replica where GPUs exist, replicas or an autoscaling range."""
    if num_gpus is None:
        try:
            import torch

            num_gpus = 1.0 if torch.cuda.is_available() else 0.0
        except ImportError:  # pragma: no cover
            num_gpus = 0.0
    opts: dict[str, Any] = {
        "name": "sdxl",
        "ray_actor_options": {"num_gpus": num_gpus, "num_cpus": 1},
        # Requests must reach the replica's own queue (429 + Retry-After), not Ray's 503.
        "max_ongoing_requests": max(16, 4 * (config.max_queue + (config.max_batch_size or 8))),
        "max_queued_requests": -1,
        "graceful_shutdown_timeout_s": config.grace_s,
        "health_check_period_s": 10.0,
    }
    if autoscale is not None:
        lo, hi = autoscale
        opts["autoscaling_config"] = {"min_replicas": lo, "max_replicas": hi,
                                      "target_ongoing_requests": max(1, config.max_batch_size or 2)}
    else:
        opts["num_replicas"] = replicas or 1
    return opts


def build(config: ServeConfig, **options: Any) -> Any:
    """The bound Ray Serve application for ``config`` (``serve.run(build(cfg))``)."""
    return SDXLDeployment.options(**deployment_options(config, **options)).bind(config)


def app(args: dict[str, Any] | None = None) -> Any:
    """Application builder for ``serve run sdxl_export.serve:app key=value ...`` and Ray Serve
    config files: keys are :class:`ServeConfig` fields (``api_auth`` as ``USER:PASS``,
    ``warmup`` as ``WxH,...``), plus ``replicas`` or ``autoscale`` (``MIN:MAX``)."""
    args = dict(args or {})
    replicas = args.pop("replicas", None)
    autoscale = args.pop("autoscale", None)
    return build(config_from_args(args), replicas=int(replicas) if replicas else None,
                 autoscale=_autoscale(autoscale))


def _autoscale(autoscale: Any) -> tuple[int, int] | None:
    if not autoscale:
        return None
    lo, _, hi = str(autoscale).partition(":")
    return int(lo), int(hi)
