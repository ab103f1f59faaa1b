"""``sdxl-export bench --suite serve``: closed-loop load against a running server vs the baseline.

Two servers on 127.0.0.1, each in its own process, on the same weights:

* ours: ``sdxl-export serve`` (dynamic batching over engines built for batch 1, 2, 4);
* the baseline users write today: diffusers' pipelines behind one lock in the same kind of
  HTTP app (:mod:`.baseline_server`).

At each concurrency level, ``c`` clients each send a request, wait for the answer and send
the next (closed loop), until ``requests`` answers came back or ``max_seconds`` passed. The
levels alternate between the two sides (ours, baseline, ours, ...) so both see the same
machine state. Reported per side and level: images/s, p50/p90/p99 latency, errors; and the
throughput ratio. Every loop is bounded in count and time and stops itself.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import SDXLExportError
from .stats import machine_info, percentile, ratio

log = logging.getLogger(__name__)


class ServeBenchError(SDXLExportError):
    """A server of the serving benchmark did not start or died."""


@dataclass
class ServeBenchConfig:
    model: str | None = "small"
    artifacts: Path | None = None
    work_dir: Path | None = None
    batch_sizes: tuple[int, ...] = (1, 2, 4)
    concurrency: tuple[int, ...] = (1, 2, 4, 8)
    requests: int = 16  # answers per side and level
    max_seconds: float = 600.0  # per side and level
    steps: int = 20
    size: int | None = None  # square size; default the model's native
    baseline: bool = True
    batch_wait_ms: float = 20.0
    seed: int = 0
    extra_serve_args: tuple[str, ...] = field(default_factory=tuple)


def prepare(cfg: ServeBenchConfig) -> tuple[Path, dict[str, Any]]:
    """The artifacts to serve: ``cfg.artifacts`` as is, or ``cfg.model`` exported + built
    (every bucket, the batch sizes) into the work dir (incremental: reruns are quick)."""
    if cfg.artifacts is not None:
        return Path(cfg.artifacts), {"prepared": False}
    from ..engines.build import BuildOptions, build

    work = Path(cfg.work_dir or tempfile.mkdtemp(prefix="sdxl-serve-bench-"))
    out = work / "artifacts"
    t0 = time.perf_counter()
    build(BuildOptions(model=str(cfg.model), out=out, backend="onnxruntime", buckets="all",
                       batch_sizes=tuple(cfg.batch_sizes)))
    return out, {"prepared": True, "export_build_seconds": time.perf_counter() - t0}


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ChildServer:
    """A server in a child process on 127.0.0.1; always stopped by ``stop()`` (SIGTERM, then kill)."""

    def __init__(self, name: str, argv: list[str], log_dir: Path, ready_timeout: float = 600.0):
        self.name = name
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_dir / f"{name}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - open for the child's lifetime
        self.proc = subprocess.Popen([*argv, "--port", str(self.port)], stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.monotonic() + ready_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServeBenchError(f"the {name} server exited ({self.proc.returncode}): "
                                      f"{self.log_path.read_text(errors='replace')[-800:]}",
                                      f"see {self.log_path}")
            if _get(self.url + "/readyz") == 200:
                return
            time.sleep(0.5)
        self.stop()
        raise ServeBenchError(f"the {name} server was not ready within {ready_timeout:.0f} s", f"see {self.log_path}")

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(120)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self._log.close()
        return self.proc.returncode


def _get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return int(r.status)
    except (urllib.error.URLError, OSError):
        return 0


def _post(url: str, body: dict[str, Any], timeout: float) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return int(r.status), r.read()
    except urllib.error.HTTPError as err:
        return int(err.code), err.read()
    except (urllib.error.URLError, OSError) as err:
        return 0, str(err).encode()


def closed_loop(url: str, concurrency: int, requests: int, max_seconds: float, body: dict[str, Any]) -> dict[str, Any]:
    """``concurrency`` clients in a closed loop until ``requests`` answers or ``max_seconds``."""
    lock = threading.Lock()
    issued = [0]
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    deadline = time.monotonic() + max_seconds

    def client() -> None:
        while True:
            with lock:
                if issued[0] >= requests or time.monotonic() >= deadline:
                    return
                i = issued[0]
                issued[0] += 1
            t0 = time.perf_counter()
            status, _ = _post(url + "/v1/images/generations",
                              {**body, "prompt": f"{body['prompt']} #{i}", "seed": body["seed"] + i},
                              timeout=max(1.0, deadline - time.monotonic() + 60))
            dt = time.perf_counter() - t0
            with lock:
                statuses[str(status)] = statuses.get(str(status), 0) + 1
                if status == 200:
                    latencies.append(dt)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, daemon=True) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(max_seconds + 120)
    wall = time.perf_counter() - t0
    ok = len(latencies)
    return {"concurrency": concurrency, "requests": issued[0], "ok": ok, "errors": issued[0] - ok,
            "statuses": statuses, "wall_seconds": wall, "images_per_second": ok / wall if wall > 0 else 0.0,
            "p50_ms": percentile(latencies, 50) * 1000 if latencies else None,
            "p90_ms": percentile(latencies, 90) * 1000 if latencies else None,
            "p99_ms": percentile(latencies, 99) * 1000 if latencies else None}


def _parity(ours: str, base: str, body: dict[str, Any]) -> float | None:
    """Max pixel difference (0-255) between the two servers' images for one seed."""
    import base64
    import io

    import numpy as np
    from PIL import Image

    arrays = []
    for url in (ours, base):
        status, raw = _post(url + "/v1/images/generations", body, timeout=600)
        if status != 200:
            return None
        b64 = json.loads(raw)["data"][0]["b64_json"]
        arrays.append(np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"), dtype=np.int16))
    return float(np.abs(arrays[0] - arrays[1]).max())


def run_serve_bench(cfg: ServeBenchConfig) -> dict[str, Any]:
    artifacts, prep = prepare(cfg)
    from ..runtime import read_artifacts

    native = read_artifacts(artifacts).native_size
    size = cfg.size or native
    body = {"prompt": "a photo of a lighthouse at dusk", "size": f"{size}x{size}", "steps": cfg.steps,
            "seed": cfg.seed}
    log_dir = Path(tempfile.mkdtemp(prefix="sdxl-serve-bench-logs-"))
    py = sys.executable
    sides: dict[str, ChildServer] = {}
    levels: dict[str, list[dict[str, Any]]] = {"sdxl-export serve": [], "baseline (diffusers + lock)": []}
    try:
        sides["sdxl-export serve"] = ChildServer(
            "ours", [py, "-m", "sdxl_export.cli", "-q", "serve", "--artifacts", str(artifacts),
                     "--max-queue", str(max(64, 2 * max(cfg.concurrency))), "--batch-wait-ms", str(cfg.batch_wait_ms),
                     "--warmup", f"{size}x{size}", *cfg.extra_serve_args], log_dir)
        if cfg.baseline:
            sides["baseline (diffusers + lock)"] = ChildServer(
                "baseline", [py, "-m", "sdxl_export.benchmarks.baseline_server", "--artifacts", str(artifacts)],
                log_dir)
            # one untimed request each: first-call costs are nobody's throughput
            for server in sides.values():
                _post(server.url + "/v1/images/generations", {**body, "steps": 2}, timeout=600)
        for c in cfg.concurrency:
            for name, server in sides.items():
                log.info("serve bench: %s at concurrency %d (%d requests)", name, c, cfg.requests)
                levels[name].append(closed_loop(server.url, c, cfg.requests, cfg.max_seconds, body))
        parity = (_parity(sides["sdxl-export serve"].url, sides["baseline (diffusers + lock)"].url,
                          {**body, "seed": 12345}) if cfg.baseline else None)
    finally:
        for server in sides.values():
            server.stop()
        shutil.rmtree(log_dir, ignore_errors=True)
    ours, base = levels["sdxl-export serve"], levels["baseline (diffusers + lock)"]
    speedups = [{"concurrency": a["concurrency"],
                 "throughput_ratio": ratio(a["images_per_second"], b["images_per_second"])}
                for a, b in zip(ours, base)]
    return {"kind": "serve", "config": {**asdict(cfg), "artifacts": str(artifacts), "size": size,
                                        "work_dir": str(cfg.work_dir) if cfg.work_dir else None},
            "machine": machine_info(), "prepare": prep, "sides": {k: v for k, v in levels.items() if v},
            "speedup": speedups, "parity_max_pixel_diff": parity}


def markdown_table(result: dict[str, Any]) -> str:
    rows = ["| side | concurrency | images/s | p50 ms | p90 ms | p99 ms | errors | vs baseline |",
            "|---|---|---|---|---|---|---|---|"]
    ratios = {s["concurrency"]: s["throughput_ratio"] for s in result.get("speedup", [])}

    def f(x: float | None, d: int = 1) -> str:
        return "—" if x is None else f"{x:.{d}f}"

    for name, levels in result["sides"].items():
        for lv in levels:
            r = ratios.get(lv["concurrency"]) if name.startswith("sdxl-export") else None
            rows.append(f"| {name} | {lv['concurrency']} | {f(lv['images_per_second'], 3)} | {f(lv['p50_ms'])} | "
                        f"{f(lv['p90_ms'])} | {f(lv['p99_ms'])} | {lv['errors']} | "
                        f"{'**' + f(r, 2) + 'x**' if r else '—'} |")
    if result.get("parity_max_pixel_diff") is not None:
        rows.append(f"\nSame seed, both servers: max pixel difference {result['parity_max_pixel_diff']:.0f}/255.")
    return "\n".join(rows)


def plot(result: dict[str, Any], path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for name, levels in result["sides"].items():
        cs = [lv["concurrency"] for lv in levels]
        ax1.plot(cs, [lv["images_per_second"] for lv in levels], marker="o", label=name)
        ax2.plot(cs, [lv["p50_ms"] or 0 for lv in levels], marker="o", label=name)
    ax1.set(xlabel="concurrent clients", ylabel="images/s", title="throughput")
    ax2.set(xlabel="concurrent clients", ylabel="p50 latency (ms)", title="latency")
    ax1.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
