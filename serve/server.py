"""The embedded server: one process, the app under uvicorn, nothing else to start.

Start-up: uvicorn listens at once; the pipeline loads and warms up on the worker thread, so
``/healthz`` answers immediately and ``/readyz`` turns 200 only when no request will pay a
first-call cost. SIGTERM (or Ctrl-C): uvicorn stops accepting, waits up to ``grace_s`` for
the requests it accepted (the batcher keeps running them), then the lifespan drains the
batcher and closes the pipeline, and the process exits 0.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from .app import build_app
from .config import ServeConfig
from .service import ImageService

log = logging.getLogger(__name__)


def embedded_app(config: ServeConfig) -> tuple[Any, ImageService]:
    """The app plus its service; the app's lifespan starts and stops the service."""
    service = ImageService(config)

    @asynccontextmanager
    async def lifespan(_app: Any) -> AsyncIterator[None]:
        await service.start_embedded()
        try:
            yield
        finally:
            log.info("draining: finishing %d waiting image(s)", service.waiting)
            await service.drain()
            await asyncio.get_running_loop().run_in_executor(None, service.close)
            log.info("stopped")

    return build_app(lambda: service, config, lifespan=lifespan, max_in_flight=max_in_flight(config)), service


def max_in_flight(config: ServeConfig) -> int:
    """Requests in flight before new ones get 503 (``/healthz``, ``/readyz``, ``/metrics`` and the
    progress routes excepted). Enforced by the app, not by uvicorn's ``limit_concurrency``,
    which would refuse the liveness probe of a busy replica too."""
    return max(64, config.max_queue * 4)


def serve_embedded(config: ServeConfig) -> int:
    """Run until SIGTERM/SIGINT; return 0 after a graceful stop."""
    import uvicorn

    app, _ = embedded_app(config)
    uv_config = uvicorn.Config(app, host=config.host, port=config.port, log_level="warning", access_log=False,
                               timeout_graceful_shutdown=config.grace_s, lifespan="on", timeout_keep_alive=30)
    server = uvicorn.Server(uv_config)
    # uvicorn re-raises the signal it caught once it has shut down; with the default handler
    # that kills the process (exit 143). Ours makes a graceful stop exit 0.
    stopped: list[int] = []
    previous = {sig: signal.signal(sig, lambda s, _f: stopped.append(s)) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        log.info("serving on http://%s:%d (embedded; Ctrl-C or SIGTERM stops gracefully)", config.host, config.port)
        server.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if not server.started:
        return 1
    return 0
