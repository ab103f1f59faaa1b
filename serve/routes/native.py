"""Native API routes: ``POST /v1/generate`` (every runtime argument by its runtime name),
``GET /v1/progress`` and its server-sent-events stream ``GET /v1/progress/stream``."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Query, Request
from fastapi.responses import StreamingResponse

from .. import native_api
from ..common import ParsedRequest
from ..context import ctx
from ..http import request_id
from ..schemas import ERRORS, NativeRequest, NativeResponse, ProgressEvent, body_doc
from ..service import ImageService
from . import new_router

router = new_router(tags=["native"])


@router.post("/v1/generate", response_model=NativeResponse, responses=ERRORS, openapi_extra=body_doc(NativeRequest))
async def native_generate(request: Request) -> Any:
    c = ctx(request)

    def parse(body: Any, svc: ImageService) -> ParsedRequest:
        return native_api.parse(body, has_refiner=bool(svc.pipe is not None and svc.pipe.has_refiner),
                                max_images=c.config.max_images_per_request)

    results = await c.generate(request, parse)
    parsed: ParsedRequest = request.scope["state"]["parsed"]
    return {"request_id": request_id(request), "images": await c.encode(results),
            "seeds": [r.seed for r in results], "seed": results[0].seed, "parameters": parsed.kwargs,
            "notes": parsed.notes,
            "timings": [{"queue_ms": r.queue_seconds * 1000, "batch_size": r.batch_size,
                         "run_ms": r.run_seconds * 1000, "stages_ms": {k: sum(v) * 1000 for k, v in
                                                                      r.timings.get("stages", {}).items()}}
                        for r in results]}


@router.get("/v1/progress", response_model=ProgressEvent, responses=ERRORS)
async def progress_now(request: Request) -> Any:
    """The running batch now (the same fields as one event of the stream)."""
    svc = ctx(request).service()
    return _event(svc.progress.snapshot(), svc.waiting)


@router.get("/v1/progress/stream", response_class=StreamingResponse, responses={
    200: {"description": "server-sent events, one `progress` event per change (ProgressEvent as JSON), a `done` "
          "event when nothing runs or waits", "content": {"text/event-stream": {"schema": {"type": "string"}}}}})
async def progress_stream(request: Request, max_seconds: float = Query(600.0, gt=0, le=3600)) -> StreamingResponse:
    """Server-sent events: the steps of the running batch as they happen, until the replica is
    idle (nothing running, nothing queued), the client leaves, or ``max_seconds`` pass."""
    svc = ctx(request).service()

    async def events() -> AsyncIterator[str]:
        queue = svc.progress.subscribe()  # every step, pushed by the worker (none lost between polls)
        try:
            deadline = time.monotonic() + max_seconds
            snap = svc.progress.snapshot()
            while True:
                yield f"event: progress\ndata: {json.dumps(_event(snap, svc.waiting))}\n\n"
                if not snap["running"] and not svc.waiting:
                    yield f"event: done\ndata: {json.dumps(_event(snap, 0))}\n\n"
                    return
                snap = None
                while snap is None:
                    left = deadline - time.monotonic()
                    if left <= 0 or await request.is_disconnected():
                        return
                    try:
                        snap = await asyncio.wait_for(queue.get(), timeout=min(left, 0.5))
                    except asyncio.TimeoutError:  # no step for a while: report when it went idle
                        now = svc.progress.snapshot()
                        snap = None if now["running"] else now
        finally:
            svc.progress.unsubscribe(queue)

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _event(snap: dict[str, Any], waiting: int) -> dict[str, Any]:
    state = "running" if snap["running"] else "queued" if waiting else "idle"
    return {"state": state, "request_id": snap.get("request_id"), "step": int(snap["step"]),
            "steps": int(snap["steps"]), "progress": float(snap["progress"]), "eta_s": snap.get("eta_s"),
            "job_count": int(waiting) + (1 if snap["running"] else 0)}
