"""OpenVINO backend: one compiled model per component on the CPU, fp32 or bf16.

Which graph: the OpenVINO engine ``sdxl-export build --backend openvino`` made for this
component (IR ``engines/openvino/<component>/model.xml``, verified by the pipeline first:
same ONNX export, same OpenVINO version and CPU flags, file hashes), or, without one, the
exported ONNX read directly by OpenVINO (fp32).

Compile properties (recorded in :attr:`OvRunner.description`):

* ``INFERENCE_PRECISION_HINT`` always set: ``f32`` for fp32 engines. OpenVINO's CPU plugin
  otherwise *defaults to bf16* on a CPU with native bf16, which would silently leave the
  exact path. ``bf16`` for engines built with ``--fp16``/``--bf16`` on such a CPU.
* ``PERFORMANCE_HINT=LATENCY``: one stream over all cores per call (the pipeline makes one
  call at a time per request).
* ``CACHE_DIR`` = ``engines/openvino/cache`` when an engine is loaded: the compiled blob from
  the build is reused, so opening skips most of the compile.

Thread rule: a ``CompiledModel`` may be shared between threads (OpenVINO documents
``create_infer_request`` as thread-safe); an ``InferRequest`` may not. Each call takes an
idle request from a pool (a list guarded by a lock) or creates one, runs it, copies the
outputs out (``share_outputs=False``) and returns the request to the pool, so one runner
serves any number of threads, each call with its own request.

Data path: inputs are numpy views of the torch tensors, shared with OpenVINO for the call
(``share_inputs=True``, no copy in); outputs are copies wrapped with ``torch.from_numpy``.

Static shapes (``static_shapes``; default on for reduced-precision engines where memory allows,
off for fp32): OpenVINO's CPU kernels are
faster on a model reshaped to one static input shape than on the dynamic one (measured 1.18x on
a ``small`` UNet step in bf16, ``benchmarks/ov_step_bench.py``). A call whose input shapes have
a compiled static model uses it; the first call at a new shape compiles one (the server's
warm-up pays for its sizes; ``CACHE_DIR`` keeps the blob on disk for the next process) while
other shapes keep running. The static models are a bounded LRU per runner
(:data:`MAX_STATIC_MODELS`, and at most a quarter of RAM counted in weight copies: each compiled
model holds its own repacked weights); beyond that, or with ``static_shapes=False``, calls use
the dynamic model. fp32 keeps the dynamic model by default: it is the exact path, and the
static kernels' rounding moved tiny-model latents 1.1e-4 from diffusers' on an ancestral sampler,
past the 1e-4 the exact path promises (pixels stayed within 1/255); pass ``static_shapes=True``
to trade that for speed.

Run-time weights: not supported yet (the base class's named error): the CPU plugin folds
weights into its compiled kernels (and bf16 engines repack them), so a LoRA switch would
be a recompile; fuse LoRAs at build time or use the onnxruntime backend.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ...errors import CorruptArtifactError, InvalidRequestError
from ...specs import ComponentSpec
from .base import ComponentRunner
from .onnxruntime import _numpy_view  # the same zero-copy view (onnxruntime imported lazily there)
from .registry import ComponentContext

log = logging.getLogger(__name__)

NAME = "openvino"
KNOWN_OPTIONS = frozenset({"config", "static_shapes", "max_static_models"})
#: compiled static-shape models kept per runner (LRU), at most
MAX_STATIC_MODELS = 8
#: the share of RAM the static models' weight copies may take together
STATIC_RAM_SHARE = 0.25


class _Compiled:
    """One compiled model and its idle infer requests (the list is guarded by the runner's lock)."""

    __slots__ = ("idle", "model")

    def __init__(self, model: Any):
        self.model = model
        self.idle: list[Any] = []


def available() -> tuple[bool, str]:
    from ...openvino_env import ov_status

    return ov_status()


class OvRunner(ComponentRunner):
    """One component as one OpenVINO ``CompiledModel`` (shared) with per-call infer requests."""

    backend = NAME

    def __init__(self, spec: ComponentSpec, model_path: Path, *, precision: str = "fp32",
                 cache_dir: Path | None = None, config: Mapping[str, Any] | None = None,
                 engine_entry: Any | None = None, source: str = "export", static_shapes: bool = True,
                 max_static_models: int = MAX_STATIC_MODELS):
        super().__init__(spec)
        from ...openvino_env import compile_config

        self.model_path = Path(model_path)
        self.precision = precision
        self.engine_entry = engine_entry
        self.source = source
        self.config = {**compile_config(precision, cache_dir), **dict(config or {})}
        self._core: Any = None
        self._model: Any = None  # the read (dynamic) ov.Model, kept to reshape copies of it
        self._dynamic: _Compiled | None = None
        #: shape signature -> compiled static model (LRU order); guarded by _pool_lock
        self._static: OrderedDict[tuple[tuple[int, ...], ...], _Compiled] = OrderedDict()
        self._compiling: dict[tuple[tuple[int, ...], ...], threading.Lock] = {}  # guarded by _pool_lock
        self._pool_lock = threading.Lock()
        self._outputs: list[str] = []
        self.static_limit = _static_limit(self.model_path, max_static_models) if static_shapes else 0
        self.static_compiles = 0
        self.static_compile_seconds = 0.0

    def _open_impl(self) -> None:
        import openvino as ov

        if not self.model_path.is_file():
            raise CorruptArtifactError(f"{self.model_path} is missing", "re-run the export (or build) that wrote it")
        try:
            self._core = ov.Core()
            self._model = self._core.read_model(str(self.model_path))
            compiled = self._core.compile_model(self._model, "CPU", self.config)
        except Exception as exc:  # noqa: BLE001 -- OpenVINO raises RuntimeError subclasses of its own
            raise CorruptArtifactError(
                f"OpenVINO cannot load {self.model_path} ({type(exc).__name__}: {str(exc)[:200]})",
                "re-run the build (or export) that wrote it",
            ) from None
        got = sorted(n for i in compiled.inputs for n in i.get_names() if n in self.spec.input_names)
        if got != sorted(self.spec.input_names):
            raise CorruptArtifactError(
                f"{self.model_path} has inputs {got}, its spec names {list(self.spec.input_names)}",
                "re-run the export and build: the graph and the manifest disagree",
            )
        self._dynamic = _Compiled(compiled)
        self._outputs = list(self.spec.output_names)
        log.info("%s: openvino %s (%s) from %s%s", self.spec.name, self.precision,
                 self.config.get("INFERENCE_PRECISION_HINT"), self.source,
                 f", static shapes (up to {self.static_limit})" if self.static_limit else ", dynamic shapes")

    def _close_impl(self) -> None:
        with self._pool_lock:
            self._static.clear()
            self._compiling.clear()
        self._dynamic = None
        self._model = None
        self._core = None

    def _compiled_for(self, feeds: Mapping[str, torch.Tensor]) -> _Compiled:
        """The static model for these input shapes (compiled on first use), else the dynamic one."""
        assert self._dynamic is not None
        if not self.static_limit:
            return self._dynamic
        sig = tuple(tuple(int(d) for d in feeds[name].shape) for name in self.spec.input_names)
        with self._pool_lock:
            hit = self._static.get(sig)
            if hit is not None:
                self._static.move_to_end(sig)
                return hit
            gate = self._compiling.setdefault(sig, threading.Lock())
        with gate:  # one compile per shape; other shapes go on meanwhile
            with self._pool_lock:
                hit = self._static.get(sig)
            if hit is not None:
                return hit
            t0 = time.perf_counter()
            model = self._model.clone()
            model.reshape({name: list(shape) for name, shape in zip(self.spec.input_names, sig)})
            compiled = _Compiled(self._core.compile_model(model, "CPU", self.config))
            seconds = time.perf_counter() - t0
            with self._pool_lock:
                self._static[sig] = compiled
                while len(self._static) > self.static_limit:
                    self._static.popitem(last=False)
                self._compiling.pop(sig, None)
                self.static_compiles += 1
                self.static_compile_seconds += seconds
            log.info("%s: compiled a static model for %s in %.2f s", self.spec.name,
                     ", ".join(f"{n}{list(d)}" for n, d in zip(self.spec.input_names, sig)), seconds)
            return compiled

    def check_supported(self, batch: int, height: int, width: int) -> None:
        """An engine built over fixed profiles serves exactly what its TensorRT twin would."""
        entry = self.engine_entry
        if entry is not None and getattr(entry, "profiles", None):
            from ...engines.store import select_profile

            select_profile(entry, self.spec.input_shapes(batch, height, width))

    def _run(self, feeds: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        compiled = self._compiled_for(feeds)
        with self._pool_lock:
            request = compiled.idle.pop() if compiled.idle else None
        if request is None:
            request = compiled.model.create_infer_request()
        try:
            arrays = {name: _numpy_view(x) for name, x in feeds.items()}
            result = request.infer(arrays, share_inputs=True, share_outputs=False)
            out = {name: torch.from_numpy(np.asarray(result[compiled.model.output(name)])) for name in self._outputs}
        finally:
            with self._pool_lock:
                compiled.idle.append(request)
        return out

    @property
    def description(self) -> dict[str, Any]:
        import openvino as ov

        d = super().description
        d.update({"openvino": ov.__version__, "file": str(self.model_path), "source": self.source,
                  "device": "cpu", "precision": self.precision, "config": dict(self.config),
                  "static_shapes": {"limit": self.static_limit, "compiled": self.static_compiles,
                                    "compile_seconds": round(self.static_compile_seconds, 3)}})
        if self.engine_entry is not None and getattr(self.engine_entry, "profiles", None):
            d["buckets"] = [str(b) for b in self.engine_entry.buckets]
            d["batch_sizes"] = list(self.engine_entry.batch_sizes)
        return d


def create(ctx: ComponentContext) -> OvRunner:
    """Open ``ctx.name`` from its OpenVINO engine when one was built, else from the export (fp32).

    Options (``ctx.options``): ``config``, OpenVINO compile properties applied over the defaults
    (e.g. ``{"INFERENCE_NUM_THREADS": 2}``); ``static_shapes`` (a model compiled per input shape, see the
    module docstring; default True for bf16 engines, False for fp32) and ``max_static_models``
    (default :data:`MAX_STATIC_MODELS`).
    """
    unknown = set(ctx.options) - KNOWN_OPTIONS
    if unknown:
        raise InvalidRequestError(f"unknown openvino backend option(s) {sorted(unknown)}",
                                  f"use only {sorted(KNOWN_OPTIONS)}")
    if ctx.device not in ("cpu", "auto") and not str(ctx.device).startswith("cpu"):
        raise InvalidRequestError(f"the openvino backend runs on the CPU, not {ctx.device}", "use --device cpu")
    config = dict(ctx.options.get("config") or {})
    entry = ctx.engine_entry
    precision = entry.precision if entry is not None and getattr(entry, "backend", None) == NAME else "fp32"
    static = {"static_shapes": bool(ctx.options.get("static_shapes", precision != "fp32")),
              "max_static_models": int(ctx.options.get("max_static_models", MAX_STATIC_MODELS))}
    if entry is not None and getattr(entry, "backend", None) == NAME:
        from ...artifacts import ENGINE_DIR
        from ...engines.store import OV_DIR
        from ...openvino_env import CACHE_DIR

        return OvRunner(ctx.spec, Path(entry.path), precision=entry.precision,
                        cache_dir=ctx.artifacts / ENGINE_DIR / OV_DIR / CACHE_DIR, config=config,
                        engine_entry=entry, source=f"engine (openvino {entry.precision})", **static)
    return OvRunner(ctx.spec, ctx.artifacts / ctx.export_entry["file"], config=config, source="export", **static)


def _static_limit(model_path: Path, wanted: int) -> int:
    """How many static models fit: ``wanted``, fewer where their weight copies would pass
    :data:`STATIC_RAM_SHARE` of RAM (0: dynamic shapes only)."""
    import psutil

    weights = sum(p.stat().st_size for p in model_path.parent.iterdir()
                  if p.is_file() and p.name.startswith(model_path.stem)) if model_path.parent.is_dir() else 0
    if weights <= 0:
        return max(0, wanted)
    fit = int(STATIC_RAM_SHARE * psutil.virtual_memory().total // weights)
    return max(0, min(wanted, fit))
