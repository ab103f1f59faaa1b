"""Real servers for the serving tests: ``sdxl-export serve`` in a child process on 127.0.0.1.

Every server is bounded: it is started with a deadline for readiness and always stopped
(SIGTERM, then SIGKILL after a bound) by the fixture that started it. Load loops in the
tests are bounded in count and time.
"""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

_CACHE: dict[str, Any] = {}


def serve_artifacts(tmp_path_factory: Any, tiny_artifacts: Path) -> Path:
    """A copy of the tiny export with ONNX Runtime twin engines at batch sizes 1, 2, 4 over
    two buckets (256x256 and 192x320): what ``build --batch-sizes 1,2,4`` gives a server."""
    if "artifacts" not in _CACHE:
        import shutil

        from sdxl_export.engines.build import BuildOptions, build

        out = tmp_path_factory.mktemp("serve") / "artifacts"
        shutil.copytree(tiny_artifacts, out)
        build(BuildOptions(out=out, backend="onnxruntime", buckets="256x256,192x320", batch_sizes=(1, 2, 4)))
        _CACHE["artifacts"] = out
    return _CACHE["artifacts"]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerProcess:
    """``sdxl-export serve`` as a child process; ``url`` is http://127.0.0.1:PORT."""

    def __init__(self, artifacts: Path, *args: str, log_path: Path, ready_timeout: float = 180.0,
                 env: dict[str, str] | None = None, wait_ready: bool = True):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - open for the child's lifetime
        cmd = [sys.executable, "-m", "sdxl_export.cli", "serve", "--artifacts", str(artifacts),
               "--port", str(self.port), *args]
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **(env or {})}, start_new_session=True)
        if wait_ready:
            self.wait_ready(ready_timeout)

    def wait_ready(self, timeout: float, headers: dict[str, str] | None = None) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                status, _, _ = request(self.url + "/readyz", headers=headers, timeout=5)
                if status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"server not ready within {timeout} s:\n{self.log()}")

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-6000:]

    def stop(self, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self._log.close()
        return int(self.proc.returncode)


def request(url: str, body: Any = None, *, headers: dict[str, str] | None = None, method: str | None = None,
            timeout: float = 120.0, raw: bytes | None = None) -> tuple[int, dict[str, str], bytes]:
    """One HTTP request with the standard library: (status, lower-cased headers, body); never raises
    on 4xx/5xx."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(url, data=data, method=method or ("POST" if data is not None else "GET"),
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, {k.lower(): v for k, v in resp.headers.items()}, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, {k.lower(): v for k, v in err.headers.items()}, err.read()


def png_array(b64: str) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"), dtype=np.int16)


def pil_array(image: Any) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def assert_same_pixels(a: Any, b: Any) -> None:
    """Two images (uint8-range arrays or PIL images) within one 8-bit level per pixel: the runtime's
    contract with the server's bytes (PNG round trip included)."""
    a = pil_array(a) if hasattr(a, "convert") else np.asarray(a, dtype=np.int16)
    b = pil_array(b) if hasattr(b, "convert") else np.asarray(b, dtype=np.int16)
    assert a.shape == b.shape, f"image shapes {a.shape} vs {b.shape}"
    diff = int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())
    assert diff <= 1, f"max pixel difference {diff}/255"


def metric_value(text: str, name: str, **labels: str) -> float:
    """The value of one Prometheus sample in a /metrics body (0 when absent)."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name):
            continue
        head, _, value = line.rpartition(" ")
        if head.split("{")[0] != name:
            continue
        if all(f'{k}="{v}"' in head for k, v in labels.items()):
            total += float(value)
    return total
