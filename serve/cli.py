"""``sdxl-export serve``: the HTTP server, embedded (default) or on Ray Serve (``--ray``)."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import threading
from pathlib import Path
from typing import Any

from ..artifacts import DEFAULT_ARTIFACTS
from ..runtime import backend_help
from .config import ServeConfig, ServeConfigError, parse_basic_auth, parse_sizes

log = logging.getLogger(__name__)


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "serve", help="serve the OpenAI Images, AUTOMATIC1111 and native HTTP APIs",
        description="Serve the artifacts over HTTP: OpenAI Images API (/v1/images/generations), the "
        "AUTOMATIC1111 web UI API (/sdapi/v1/txt2img) and /v1/generate, with dynamic batching, a bounded "
        "queue, Prometheus metrics and graceful shutdown. --ray runs the same app on Ray Serve.",
    )
    p.add_argument("--artifacts", type=Path, default=DEFAULT_ARTIFACTS, metavar="DIR",
                   help=f"artifact folder from build/export (default {DEFAULT_ARTIFACTS})")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--backend", default="auto", help="runtime backend: " + backend_help())
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--max-batch-size", type=int, default=None, metavar="B",
                   help="images per engine call (default: the largest batch the engines serve, at most 8)")
    p.add_argument("--batch-wait-ms", type=float, default=20.0, metavar="T",
                   help="how long the first image of a batch waits for company (default 20)")
    p.add_argument("--max-queue", type=int, default=32, metavar="Q",
                   help="images waiting beyond the running batch; more -> 429 (default 32)")
    p.add_argument("--timeout", type=float, default=600.0, metavar="S", help="request deadline -> 504 (default 600)")
    auth = p.add_mutually_exclusive_group()
    auth.add_argument("--api-key", default=None, metavar="KEY",
                      help="require 'Authorization: Bearer KEY' (or set SDXL_EXPORT_API_KEY)")
    auth.add_argument("--api-key-file", type=Path, default=None, metavar="FILE", help="read the API key from FILE")
    p.add_argument("--api-auth", default=None, metavar="USER:PASS",
                   help="also accept HTTP Basic credentials (as the web UI's --api-auth)")
    p.add_argument("--warmup", default="native", metavar="SIZES",
                   help="WxH sizes to run once before ready, comma separated; 'native' (default) or '' for none")
    p.add_argument("--max-images", type=int, default=8, metavar="N", help="images per request cap (default 8)")
    p.add_argument("--max-body-mb", type=float, default=32.0, metavar="MB",
                   help="request body cap in MiB (default 32: img2img uploads base64 images)")
    p.add_argument("--grace", type=float, default=60.0, metavar="S",
                   help="seconds SIGTERM waits for accepted requests (default 60)")
    p.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                   help="allow browser calls from ORIGIN (repeatable; default: CORS off)")
    p.add_argument("--model-name", default=None, help="model id reported to clients (default: the folder name)")
    p.add_argument("--no-refiner", action="store_true", help="do not load the refiner")
    p.add_argument("--lora-dir", type=Path, default=None, metavar="DIR",
                   help="LoRA .safetensors files requests may name ('loras': {name: scale}; A1111 <lora:name:scale>)")
    p.add_argument("--ray", action="store_true", help="deploy on Ray Serve instead of the embedded server")
    p.add_argument("--ray-address", default=None, metavar="ADDR",
                   help="join this Ray cluster (default: start a local Ray instance)")
    scale = p.add_mutually_exclusive_group()
    scale.add_argument("--replicas", type=int, default=None, metavar="N", help="Ray Serve replicas (default 1)")
    scale.add_argument("--autoscale", default=None, metavar="MIN:MAX", help="Ray Serve autoscaling range")
    p.set_defaults(func=cmd_serve)


def config_from_args(args: argparse.Namespace) -> ServeConfig:
    key = args.api_key or os.environ.get("SDXL_EXPORT_API_KEY") or None
    if args.api_key_file is not None:
        try:
            key = args.api_key_file.read_text().strip()
        except OSError as exc:
            raise ServeConfigError(f"cannot read --api-key-file {args.api_key_file} ({exc.strerror})",
                                   "pass a readable file holding the key") from None
    return ServeConfig(
        artifacts=args.artifacts, backend=args.backend, device=args.device, host=args.host, port=args.port,
        max_batch_size=args.max_batch_size, batch_wait_ms=args.batch_wait_ms, max_queue=args.max_queue,
        timeout_s=args.timeout, api_key=key, basic_auth=parse_basic_auth(args.api_auth) if args.api_auth else None,
        warmup=parse_sizes(args.warmup), max_images_per_request=min(args.max_images, args.max_queue),
        max_body_bytes=int(args.max_body_mb * (1 << 20)),
        grace_s=args.grace, cors_origins=tuple(args.cors_origin), model_name=args.model_name,
        load_refiner=not args.no_refiner, lora_dir=args.lora_dir,
    )


def check_port(host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            raise ServeConfigError(f"cannot listen on {host}:{port} ({exc.strerror})",
                                   "pick another --port, or stop what is using it") from None


def cmd_serve(args: argparse.Namespace) -> int:
    from ..runtime import read_artifacts

    cfg = config_from_args(args)
    read_artifacts(cfg.artifacts, with_refiner=cfg.load_refiner)  # named error now, not in a replica
    if cfg.lora_dir is not None and not cfg.lora_dir.is_dir():
        raise ServeConfigError(f"--lora-dir {cfg.lora_dir} is not a folder", "pass the folder holding your LoRA files")
    if cfg.host not in ("127.0.0.1", "localhost", "::1") and not cfg.auth_required:
        log.warning("listening on %s without --api-key/--api-auth: anyone who can reach it may generate",
                    cfg.host)
    check_port(cfg.host, cfg.port)
    if args.ray:
        scale = None
        if args.autoscale:
            lo, sep, hi = args.autoscale.partition(":")
            if not (sep and lo.isdigit() and hi.isdigit() and 0 <= int(lo) <= int(hi) and int(hi) >= 1):
                raise ServeConfigError(f"invalid --autoscale {args.autoscale!r}", "pass MIN:MAX, e.g. 1:4")
            scale = (int(lo), int(hi))
        return serve_on_ray(cfg, address=args.ray_address, replicas=args.replicas, autoscale=scale)
    from .server import serve_embedded

    return serve_embedded(cfg)


def serve_on_ray(cfg: ServeConfig, *, address: str | None, replicas: int | None,
                 autoscale: tuple[int, int] | None) -> int:
    """Start (or join) Ray, deploy, serve until SIGTERM/SIGINT, then shut the app down."""
    import ray
    from ray import serve

    from .ray_app import build

    ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING,
             log_to_driver=log.isEnabledFor(logging.DEBUG))
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda _s, _f: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        serve.start(http_options={"host": cfg.host, "port": cfg.port})
        log.info("deploying on Ray Serve (loading and warming up each replica)...")
        serve.run(build(cfg, replicas=replicas, autoscale=autoscale), name="sdxl", route_prefix="/")
        log.info("serving on http://%s:%d (Ray Serve; Ctrl-C or SIGTERM stops)", cfg.host, cfg.port)
        stop.wait()
        log.info("stopping: Ray Serve drains the replicas (up to %.0f s)", cfg.grace_s)
        serve.delete("sdxl")
        serve.shutdown()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        ray.shutdown()
    return 0
