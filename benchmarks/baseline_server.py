"""The deployment users write today, as the serving benchmark's baseline.

FastAPI + uvicorn, diffusers' own SDXL base (+ refiner) pipelines on the export's weights,
one lock around the pipeline (what Ray Serve's Stable Diffusion tutorial and most
hand-written servers do): requests run one at a time, no batching, no queue bound. It speaks
the subset of the OpenAI Images API the load generator sends (``prompt``, ``size``, ``seed``,
``steps``), with the runtime's defaults otherwise (guidance 5, Euler, refiner at 0.8).

Run: ``python -m sdxl_export.benchmarks.baseline_server --artifacts DIR --port P``.
"""

from __future__ import annotations

import argparse
import base64
import io
import threading
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool


def build_baseline_app(artifacts: str) -> Any:
    from PIL import Image

    from .baseline import DiffusersBaseline, load_reference_model

    base = DiffusersBaseline(load_reference_model(artifacts))
    lock = threading.Lock()
    app = FastAPI()

    def generate(body: dict[str, Any]) -> dict[str, Any]:
        w, _, h = str(body.get("size", "")).partition("x")
        with lock:
            out = base([body["prompt"]], height=int(h), width=int(w), steps=int(body.get("steps", 30)),
                       guidance_scale=float(body.get("guidance_scale", 5.0)), denoising_end=0.8,
                       refiner=base.has_refiner, seed=int(body.get("seed", 0)))
        img = Image.fromarray((out.images[0] * 255).round().clip(0, 255).astype("uint8"))
        buf = io.BytesIO()
        img.save(buf, format="PNG", compress_level=4)
        return {"created": int(time.time()), "data": [{"b64_json": base64.b64encode(buf.getvalue()).decode()}]}

    @app.get("/readyz")
    async def readyz() -> dict[str, str]:
        return {"status": "ready"}

    @app.post("/v1/images/generations")
    async def images(request: Request) -> Any:
        try:
            return await run_in_threadpool(generate, await request.json())
        except Exception as exc:  # noqa: BLE001 - the benchmark counts errors
            return JSONResponse({"error": {"message": str(exc)}}, status_code=500)

    return app


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    p = argparse.ArgumentParser(description=__doc__, allow_abbrev=False)
    p.add_argument("--artifacts", required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    args = p.parse_args(argv)
    uvicorn.run(build_baseline_app(args.artifacts), host=args.host, port=args.port, log_level="warning",
                access_log=False)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
