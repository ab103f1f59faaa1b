"""TensorRT backend: run a component's plan from ``<artifacts>/engines`` on torch CUDA tensors.

Loading is checked before deserializing (:meth:`EngineStore.verify` by the pipeline:
TensorRT returns None for a plan of another version or GPU), then the plan is read once
and deserialized by :func:`sdxl_export.tensorrt_env.deserialize_engine` (which allows the
embedded lean runtime of a version-compatible plan). Execution follows the runtime's
execution model (README "Execution model"; :mod:`..cuda.lanes`, :mod:`.execution`):

* the engine (``ICudaEngine``) is shared by every thread; execution contexts are not:
  one per (lane, profile, input shapes), fixed at creation, ``USER_MANAGED`` and bound to
  the lane's scratch, so a captured CUDA graph is never replayed on a re-targeted context;
* a call takes a lane of the device's :class:`~.lanes.LanePool` (a dedicated stream,
  scratch sized for the largest open engine, a lock held for the whole call), so
  concurrent calls never share scratch, a stream or a context;
* the profile comes from :func:`~sdxl_export.engines.store.select_profile` (the one
  planned for this bucket, else the first whose range holds the shapes); a shape no
  profile serves is an :class:`UnsupportedShapeError` before any GPU work;
* inputs and outputs are torch CUDA tensors bound by address; every TensorRT return
  value is checked;
* CUDA graphs (default on): captured per context on first use, replayed after; a shape
  that cannot be captured runs eagerly (logged once).
* run-time weights (:meth:`TensorRTRunner.set_weights`, LoRA switching): only for plans
  built ``--refittable``; keys are ONNX initializer names (``weight_keys = "onnx"``). The
  refit itself is :func:`.refit.refit_engine` (its docstring lists the TensorRT facts it
  relies on); around it the runner holds calls back, synchronises the device, and drops
  every captured CUDA graph afterwards (contexts stay valid).

Type-checked with mypy against tensorrt-stubs (``tests/test_engines_typecheck.py``);
its GPU tests are marked ``trt``/``gpu``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ....errors import BackendUnavailableError, InvalidRequestError, StaleEngineError
from ....tensorrt_env import deserialize_engine, load_tensorrt, trt_status
from ..base import ComponentRunner, RunnerClosedError
from ..cuda.graphs import DEFAULT_MAX_GRAPHS
from ..cuda.lanes import pool_for
from ..registry import ComponentContext
from .execution import TrtExecutor
from .refit import RefitFailedError, refit_engine

if TYPE_CHECKING:  # pragma: no cover
    import tensorrt as trt

log = logging.getLogger(__name__)

NAME = "tensorrt"
KNOWN_OPTIONS = frozenset({"cuda_graphs", "max_graphs"})
FOREIGN_OPTIONS = frozenset({"session_options", "dtype", "verify", "synchronize"})

#: TensorRT DataType member name -> torch dtype of the bound tensor.
TORCH_DTYPES = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT32": torch.int32,
                "INT64": torch.int64, "BOOL": torch.bool, "INT8": torch.int8, "UINT8": torch.uint8}


def available() -> tuple[bool, str]:
    return trt_status()


def create(ctx: ComponentContext) -> TensorRTRunner:
    return TensorRTRunner(ctx)


class TensorRTRunner(ComponentRunner):
    """One component's TensorRT plan.

    Thread sharing: one runner may be called from any number of threads at once; the
    engine is shared, everything a call mutates is per lane (see :mod:`.execution`).
    ``open``/``close`` are serialised by the base class's lock; ``close`` waits for calls
    in flight. ``set_weights`` is serialised by ``_weights_lock`` and runs inside the
    executor's :meth:`~.execution.TrtExecutor.exclusive` block (calls wait meanwhile);
    ``_weights_unknown`` (set after a failed refit) and ``last_switch`` are written there.
    """

    backend = NAME
    #: set_weights keys: ONNX initializer names (the ONNX parser names TensorRT's weights after them)
    weight_keys = "onnx"

    def __init__(self, ctx: ComponentContext):
        super().__init__(ctx.spec)
        self.ctx = ctx
        entry = ctx.engine_entry
        if entry is None or getattr(entry, "backend", None) != NAME:
            raise InvalidRequestError(
                f"{ctx.name}: no TensorRT engine was built for it",
                f"run `sdxl-export build --backend tensorrt --out {ctx.artifacts}`, or use --backend onnxruntime",
            )
        self.entry = entry
        unknown = set(ctx.options) - KNOWN_OPTIONS - FOREIGN_OPTIONS
        if unknown:
            raise InvalidRequestError(f"unknown tensorrt backend option(s) {sorted(unknown)}",
                                      f"use only {sorted(KNOWN_OPTIONS)}")
        device = torch.device(ctx.device)
        if device.type != "cuda":
            raise InvalidRequestError(f"the TensorRT backend runs on CUDA, not {ctx.device}", "pass device='cuda'")
        self.device = device
        self.cuda_graphs = bool(ctx.options.get("cuda_graphs", True))
        self.max_graphs = int(ctx.options.get("max_graphs", DEFAULT_MAX_GRAPHS))
        if self.max_graphs < 1:
            raise InvalidRequestError(f"max_graphs must be at least 1, got {self.max_graphs}", "pass max_graphs >= 1")
        self._runtime: trt.Runtime | None = None
        self._engine: trt.ICudaEngine | None = None
        self._executor: TrtExecutor | None = None
        self._dtypes: dict[str, torch.dtype] = {}
        self._weights_lock = threading.Lock()
        self._weights_unknown = False  # a refit failed half-way: refuse calls until one succeeds
        self._weight_shapes: dict[str, tuple[int, ...]] | None = None
        #: The last weight switch: {"switch_ms", "rebuild_s" (what it saves), "weights", ...}
        self.last_switch: dict[str, Any] | None = None

    # ---- lifecycle ------------------------------------------------------------------------------
    def _open_impl(self) -> None:
        load_tensorrt()
        import tensorrt as trt

        if self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        version_compatible = bool(self.entry.builder.get("version_compatible"))
        with torch.cuda.device(self.device):
            runtime, engine = deserialize_engine(self.entry.path.read_bytes(), version_compatible=version_compatible,
                                                 what=str(self.entry.path))
        dtypes: dict[str, torch.dtype] = {}
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            dt = engine.get_tensor_dtype(name).name
            if dt not in TORCH_DTYPES:
                raise BackendUnavailableError(f"{self.spec.name}: tensor {name} has TensorRT type {dt}",
                                              "rebuild the engine from this sdxl-export's export")
            dtypes[name] = TORCH_DTYPES[dt]
        missing = (set(self.spec.input_names) | set(self.spec.output_names)) - set(dtypes)
        if missing:
            raise StaleEngineError(f"{self.entry.path} lacks tensors {sorted(missing)}",
                                   "rebuild it with `sdxl-export build`")
        strategy: trt.ExecutionContextAllocationStrategy = trt.ExecutionContextAllocationStrategy.USER_MANAGED
        self._executor = TrtExecutor(
            f"{self.spec.name}", engine, output_names=self.spec.output_names, dtypes=dtypes,
            pool=pool_for(self.device), allocation_strategy=strategy, cuda_graphs=self.cuda_graphs,
            max_contexts=self.max_graphs, scratch_bytes=int(engine.device_memory_size_v2))
        self._runtime, self._engine, self._dtypes = runtime, engine, dtypes
        log.info("%s: TensorRT engine %s (%s, %d profile(s), scratch %.1f MB%s)", self.spec.name,
                 self.entry.path.name, self.entry.precision, engine.num_optimization_profiles,
                 engine.device_memory_size_v2 / 1e6, ", cuda graphs" if self.cuda_graphs else "")

    def _close_impl(self) -> None:
        executor, self._executor = self._executor, None
        if executor is not None:
            executor.close()
        self._engine = self._runtime = None
        self._weights_unknown = False  # the next open deserializes the plan's own weights

    # ---- run-time weights -----------------------------------------------------------------------
    def set_weights(self, weights: Mapping[str, torch.Tensor]) -> None:
        """Refit ``weights`` (ONNX initializer name -> full value) into the engine; all-or-nothing.

        Refused (:class:`BackendUnavailableError`) unless the plan was built ``--refittable``.
        Every name, count, shape and dtype is checked before TensorRT is touched
        (:class:`WeightMismatchError`); then calls are held back, the device synchronised,
        the engine refitted, and every captured CUDA graph dropped. The switch time is
        recorded in :attr:`last_switch` next to the build time it saves.
        """
        executor, engine = self._executor, self._engine
        if not self._open or executor is None or engine is None:
            raise RunnerClosedError(f"{self.spec.name} (tensorrt) is not open", "call open() first")
        what = f"{self.spec.name} (tensorrt)"
        if not engine.refittable:
            raise BackendUnavailableError(
                f"{what}: {self.entry.path.name} was not built refittable, so its weights cannot be switched",
                f"rebuild with `sdxl-export build --refittable --out {self.ctx.artifacts}` (plus your other "
                "build flags), or use the onnxruntime/torch backend")
        load_tensorrt()
        import tensorrt as trt

        with self._weights_lock:
            t0 = time.perf_counter()
            shapes = self._initializer_shapes()
            with executor.exclusive():
                try:
                    stats = refit_engine(engine, weights, logger=trt.Logger(trt.Logger.WARNING), what=what,
                                         shapes=shapes, base=self._base_weights, device=self.device,
                                         before_refit=lambda: torch.cuda.synchronize(self.device))
                except RefitFailedError:
                    self._weights_unknown = True
                    executor.drop_graphs()
                    raise
                dropped = executor.drop_graphs()
                self._weights_unknown = False
            ms = (time.perf_counter() - t0) * 1e3
            self.last_switch = {"backend": NAME, "switch_ms": round(ms, 2), "rebuild_s": self.entry.build_seconds,
                                "weights": stats.weights, "filled": stats.filled, "bytes": stats.bytes,
                                "graphs_dropped": dropped}
        log.info("%s: weights switched in %.1f ms (a rebuild took %.1f s); %d context(s) recapture their graph",
                 what, ms, self.entry.build_seconds, dropped)

    def _onnx_path(self) -> Path | None:
        rel = self.ctx.export_entry.get("file") if isinstance(self.ctx.export_entry, dict) else None
        path = Path(self.ctx.artifacts) / rel if rel else None
        return path if path is not None and path.is_file() else None

    def _initializer_shapes(self) -> dict[str, tuple[int, ...]] | None:
        """ONNX initializer shapes (graph only, no weight data read), once; None without the ONNX."""
        if self._weight_shapes is None:
            path = self._onnx_path()
            if path is None:
                log.warning("%s: exported ONNX not found: weight shapes are checked by count only", self.spec.name)
                return None
            import onnx

            model = onnx.load(str(path), load_external_data=False)
            self._weight_shapes = {i.name: tuple(int(d) for d in i.dims) for i in model.graph.initializer}
        return self._weight_shapes

    def _base_weights(self, names: Sequence[str]) -> dict[str, torch.Tensor]:
        """Base values of ``names`` from the exported ONNX (partners TensorRT combined with a passed weight)."""
        path = self._onnx_path()
        if path is None:
            return {}
        import onnx
        from onnx import numpy_helper

        wanted = set(names)
        model = onnx.load(str(path), load_external_data=False)
        return {i.name: torch.from_numpy(numpy_helper.to_array(i, base_dir=str(path.parent)).copy())
                for i in model.graph.initializer if i.name in wanted}

    @property
    def graph_stats(self) -> dict[str, int]:
        """CUDA-graph counters over every context, and the number of live contexts."""
        executor = self._executor
        return executor.stats if executor is not None else {}

    @property
    def description(self) -> dict[str, Any]:
        return {**super().description, "device": str(self.device), "precision": self.entry.precision,
                "precision_requested": self.entry.precision_requested, "engine": str(self.entry.path),
                "cuda_graphs": self.cuda_graphs, "graphs": self.graph_stats if self.cuda_graphs else None,
                "refittable": self.entry.refittable, "last_switch": self.last_switch,
                "buckets": [str(b) for b in self.entry.buckets], "batch_sizes": list(self.entry.batch_sizes)}

    # ---- calls ----------------------------------------------------------------------------------
    def check_supported(self, batch: int, height: int, width: int) -> None:
        from ....engines.store import select_profile

        select_profile(self.entry, self.spec.input_shapes(batch, height, width))

    def _run(self, feeds: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        from ....engines.store import select_profile

        executor = self._executor
        if executor is None:
            raise RunnerClosedError(f"{self.spec.name} (tensorrt) was closed during the call", "open() it again")
        if self._weights_unknown:
            raise BackendUnavailableError(f"{self.spec.name} (tensorrt): a weight switch failed half-way",
                                          "call set_weights (pipe.set_loras) again, or close and reopen")
        on_device = {n: t.to(device=self.device, dtype=self._dtypes[n]).contiguous() for n, t in feeds.items()}
        profile = select_profile(self.entry, {n: tuple(t.shape) for n, t in on_device.items()})
        outputs = executor.run(on_device, profile)
        want = {t.name: t.np_dtype.name for t in self.spec.outputs}
        return {n: t if str(t.dtype).replace("torch.", "") == want[n] else t.to(getattr(torch, want[n]))
                for n, t in outputs.items()}
