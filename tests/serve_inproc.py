"""The server's app in this process (no socket): ``embedded_app`` under Starlette's TestClient,
which runs the lifespan (the pipeline loads on the service's worker thread, as in
``sdxl-export serve``). Bounded: readiness has a deadline, and leaving the context drains
the batcher and closes the pipeline."""

from __future__ import annotations

import base64
import contextlib
import io
import time
from collections.abc import Iterator
from typing import Any

from sdxl_export.serve import ServeConfig
from sdxl_export.serve.server import embedded_app
from starlette.testclient import TestClient


@contextlib.contextmanager
def inproc(artifacts: Any, ready_timeout: float = 120.0, **options: Any) -> Iterator[tuple[TestClient, Any]]:
    cfg = ServeConfig(artifacts=artifacts, backend=options.pop("backend", "onnxruntime"),
                      device="cpu", warmup=options.pop("warmup", ()), **options)
    app, service = embedded_app(cfg)
    with TestClient(app, raise_server_exceptions=False) as client:
        deadline = time.monotonic() + ready_timeout
        while time.monotonic() < deadline:
            if client.get("/readyz").status_code == 200 or service.load_error:
                break
            time.sleep(0.1)
        yield client, service


def png_b64(width: int, height: int, color: tuple[int, int, int] = (40, 90, 160)) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header declares ``width x height`` and whose pixel data is cut short: what a
    decompression bomb looks like before anything is decoded."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 1024))
