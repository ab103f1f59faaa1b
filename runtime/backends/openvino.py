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

Run-time weights: not supported yet (the base class's named error): the CPU plugin folds
weights into its compiled kernels (and bf16 engines repack them), so a LoRA switch would
be a recompile; fuse LoRAs at build time or use the onnxruntime backend.
"""

from __future__ import annotations

import logging
import threading
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
KNOWN_OPTIONS = frozenset({"config"})


def available() -> tuple[bool, str]:
    from ...engines.ov_builder import ov_status

    return ov_status()


class OvRunner(ComponentRunner):
    """One component as one OpenVINO ``CompiledModel`` (shared) with per-call infer requests."""

    backend = NAME

    def __init__(self, spec: ComponentSpec, model_path: Path, *, precision: str = "fp32",
                 cache_dir: Path | None = None, config: Mapping[str, Any] | None = None,
                 engine_entry: Any | None = None, source: str = "export"):
        super().__init__(spec)
        from ...engines.ov_builder import compile_config

        self.model_path = Path(model_path)
        self.precision = precision
        self.engine_entry = engine_entry
        self.source = source
        self.config = {**compile_config(precision, cache_dir), **dict(config or {})}
        self._compiled: Any = None
        self._idle: list[Any] = []  # idle InferRequests; guarded by _pool_lock
        self._pool_lock = threading.Lock()
        self._outputs: list[tuple[str, Any]] = []

    def _open_impl(self) -> None:
        import openvino as ov

        if not self.model_path.is_file():
            raise CorruptArtifactError(f"{self.model_path} is missing", "re-run the export (or build) that wrote it")
        try:
            self._compiled = ov.Core().compile_model(str(self.model_path), "CPU", self.config)
        except Exception as exc:  # noqa: BLE001 -- OpenVINO raises RuntimeError subclasses of its own
            raise CorruptArtifactError(
                f"OpenVINO cannot load {self.model_path} ({type(exc).__name__}: {str(exc)[:200]})",
                "re-run the build (or export) that wrote it",
            ) from None
        got = sorted(n for i in self._compiled.inputs for n in i.get_names() if n in self.spec.input_names)
        if got != sorted(self.spec.input_names):
            raise CorruptArtifactError(
                f"{self.model_path} has inputs {got}, its spec names {list(self.spec.input_names)}",
                "re-run the export and build: the graph and the manifest disagree",
            )
        self._outputs = [(name, self._compiled.output(name)) for name in self.spec.output_names]
        log.info("%s: openvino %s (%s) from %s", self.spec.name, self.precision,
                 self.config.get("INFERENCE_PRECISION_HINT"), self.source)

    def _close_impl(self) -> None:
        with self._pool_lock:
            self._idle = []
        self._compiled = None

    def check_supported(self, batch: int, height: int, width: int) -> None:
        """An engine built over fixed profiles serves exactly what its TensorRT twin would."""
        entry = self.engine_entry
        if entry is not None and getattr(entry, "profiles", None):
            from ...engines.store import select_profile

            select_profile(entry, self.spec.input_shapes(batch, height, width))

    def _run(self, feeds: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        with self._pool_lock:
            request = self._idle.pop() if self._idle else None
        if request is None:
            request = self._compiled.create_infer_request()
        try:
            arrays = {name: _numpy_view(x) for name, x in feeds.items()}
            result = request.infer(arrays, share_inputs=True, share_outputs=False)
            out = {name: torch.from_numpy(np.asarray(result[port])) for name, port in self._outputs}
        finally:
            with self._pool_lock:
                self._idle.append(request)
        return out

    @property
    def description(self) -> dict[str, Any]:
        import openvino as ov

        d = super().description
        d.update({"openvino": ov.__version__, "file": str(self.model_path), "source": self.source,
                  "device": "cpu", "precision": self.precision, "config": dict(self.config)})
        if self.engine_entry is not None and getattr(self.engine_entry, "profiles", None):
            d["buckets"] = [str(b) for b in self.engine_entry.buckets]
            d["batch_sizes"] = list(self.engine_entry.batch_sizes)
        return d


def create(ctx: ComponentContext) -> OvRunner:
    """Open ``ctx.name`` from its OpenVINO engine when one was built, else from the export (fp32).

    Options (``ctx.options``): ``config``, OpenVINO compile properties applied over the defaults
    (e.g. ``{"INFERENCE_NUM_THREADS": 2}``).
    """
    unknown = set(ctx.options) - KNOWN_OPTIONS
    if unknown:
        raise InvalidRequestError(f"unknown openvino backend option(s) {sorted(unknown)}",
                                  f"use only {sorted(KNOWN_OPTIONS)}")
    if ctx.device not in ("cpu", "auto") and not str(ctx.device).startswith("cpu"):
        raise InvalidRequestError(f"the openvino backend runs on the CPU, not {ctx.device}", "use --device cpu")
    config = dict(ctx.options.get("config") or {})
    entry = ctx.engine_entry
    if entry is not None and getattr(entry, "backend", None) == NAME:
        from ...artifacts import ENGINE_DIR
        from ...engines.ov_builder import CACHE_DIR
        from ...engines.store import OV_DIR

        return OvRunner(ctx.spec, Path(entry.path), precision=entry.precision,
                        cache_dir=ctx.artifacts / ENGINE_DIR / OV_DIR / CACHE_DIR, config=config,
                        engine_entry=entry, source=f"engine (openvino {entry.precision})")
    return OvRunner(ctx.spec, ctx.artifacts / ctx.export_entry["file"], config=config, source="export")
