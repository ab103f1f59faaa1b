"""TensorRT backend: run a component's plan from ``<artifacts>/engines`` on torch CUDA tensors.

Loading is checked before deserializing (:meth:`EngineStore.verify` by the pipeline:
TensorRT returns None for a plan of another version or GPU), then:

* one execution context per engine, created ``USER_MANAGED``: every engine runs out of one
  process-wide device scratch buffer (:class:`SharedScratch`), sized for the largest engine
  (max over its profiles). SDXL's components run one after another on one stream, so they
  never need their activation memory at the same time; sharing it saves gigabytes at 1024px.
* the profile comes from :func:`~sdxl_export.engines.store.select_profile` (the one planned for
  this bucket, else the first whose range holds the shapes); a shape no profile serves is an
  :class:`UnsupportedShapeError` before any GPU work.
* inputs and outputs are torch CUDA tensors bound by address (``set_tensor_address``) and
  ``execute_async_v3`` runs on the current torch stream, so no copies and no host syncs.
* CUDA graphs (default on): the first call at each (profile, shapes) is captured by
  :class:`~sdxl_export.runtime.cuda_graphs.GraphCache` and replayed afterwards. Graphs bake
  the scratch address in, so when the scratch has to grow every runner's graphs are dropped.

Type-checked with mypy against tensorrt-stubs (``tests/test_engines_typecheck.py``);
its GPU tests are marked ``trt``/``gpu``.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from ..errors import BackendUnavailableError, InvalidRequestError, StaleEngineError
from .backend import ComponentRunner, RunnerClosedError
from .backends import ComponentContext
from .cuda_graphs import DEFAULT_MAX_GRAPHS, GraphCache

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
    from ..engines.trt_builder import trt_status, trt_version

    ok, why = trt_status()
    return ok, (f"TensorRT {trt_version()}" if ok else why)


def create(ctx: ComponentContext) -> TensorRTRunner:
    return TensorRTRunner(ctx)


class SharedScratch:
    """One device buffer that every execution context of the process runs out of."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._buffer: torch.Tensor | None = None
        self._runners: weakref.WeakSet[TensorRTRunner] = weakref.WeakSet()

    @property
    def size(self) -> int:
        return 0 if self._buffer is None else int(self._buffer.numel())

    def attach(self, runner: TensorRTRunner, needed: int, device: torch.device) -> None:
        """Point ``runner``'s context at the scratch, growing it (and re-pointing all) if needed."""
        with self._lock:
            self._runners.add(runner)
            if self._buffer is None or self._buffer.numel() < needed or self._buffer.device != device:
                grown = self._buffer is not None
                if grown:
                    torch.cuda.synchronize(device)  # no engine may still be running out of the old one
                self._buffer = None
                self._buffer = torch.empty(max(needed, 1), dtype=torch.uint8, device=device)
                log.info("shared TensorRT scratch: %.1f MB", needed / 1e6)
                for r in list(self._runners):
                    if grown and r is not runner:
                        r.graphs.clear()  # captured graphs hold the old address
                    r.bind_scratch(int(self._buffer.data_ptr()), int(self._buffer.numel()))
            else:
                runner.bind_scratch(int(self._buffer.data_ptr()), int(self._buffer.numel()))

    def detach(self, runner: TensorRTRunner) -> None:
        with self._lock:
            self._runners.discard(runner)
            if not self._runners:
                self._buffer = None


SCRATCH = SharedScratch()


def _dims(d: trt.Dims) -> tuple[int, ...]:
    return tuple(int(d[i]) for i in range(len(d)))


class TensorRTRunner(ComponentRunner):
    """One component's TensorRT plan."""

    backend = NAME

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
        self.graphs = GraphCache(name=f"{ctx.name}(tensorrt)", enabled=bool(ctx.options.get("cuda_graphs", True)),
                                 max_graphs=int(ctx.options.get("max_graphs", DEFAULT_MAX_GRAPHS)))
        self._runtime: trt.Runtime | None = None
        self._engine: trt.ICudaEngine | None = None
        self._context: trt.IExecutionContext | None = None
        self._dtypes: dict[str, torch.dtype] = {}

    # ---- lifecycle ------------------------------------------------------------------------------
    def _open_impl(self) -> None:
        from ..engines.trt_builder import load_tensorrt

        load_tensorrt()
        import tensorrt as trt

        if self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        data = self.entry.path.read_bytes()
        logger = trt.Logger(trt.Logger.WARNING)
        runtime = trt.Runtime(logger)
        with torch.cuda.device(self.device):
            engine = runtime.deserialize_cuda_engine(data)
            if engine is None:  # the manifest checks passed, yet TensorRT refused it
                raise StaleEngineError(f"TensorRT could not deserialize {self.entry.path}",
                                       "rebuild it with `sdxl-export build` on this machine")
            context = engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
        self._runtime, self._engine, self._context = runtime, engine, context
        self._dtypes = {}
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            dt = engine.get_tensor_dtype(name).name
            if dt not in TORCH_DTYPES:
                raise BackendUnavailableError(f"{self.spec.name}: tensor {name} has TensorRT type {dt}",
                                              "rebuild the engine from this sdxl-export's export")
            self._dtypes[name] = TORCH_DTYPES[dt]
        missing = (set(self.spec.input_names) | set(self.spec.output_names)) - set(self._dtypes)
        if missing:
            raise StaleEngineError(f"{self.entry.path} lacks tensors {sorted(missing)}",
                                   "rebuild it with `sdxl-export build`")
        SCRATCH.attach(self, int(engine.device_memory_size_v2), self.device)
        log.info("%s: TensorRT engine %s (%s, %d profile(s)%s)", self.spec.name, self.entry.path.name,
                 self.entry.precision, engine.num_optimization_profiles,
                 ", cuda graphs" if self.graphs.enabled else "")

    def bind_scratch(self, ptr: int, size: int) -> None:
        if self._context is not None:
            self._context.set_device_memory(ptr, size)

    def _close_impl(self) -> None:
        self.graphs.clear()
        SCRATCH.detach(self)
        self._context = self._engine = self._runtime = None

    @property
    def description(self) -> dict[str, Any]:
        return {**super().description, "device": str(self.device), "precision": self.entry.precision,
                "precision_requested": self.entry.precision_requested, "engine": str(self.entry.path),
                "cuda_graphs": self.graphs.enabled, "buckets": [str(b) for b in self.entry.buckets],
                "batch_sizes": list(self.entry.batch_sizes)}

    # ---- calls ----------------------------------------------------------------------------------
    def check_supported(self, batch: int, height: int, width: int) -> None:
        from ..engines.store import select_profile

        select_profile(self.entry, self.spec.input_shapes(batch, height, width))

    def _run(self, feeds: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        from ..engines.store import select_profile

        context = self._context
        if context is None:
            raise RunnerClosedError(f"{self.spec.name} (tensorrt) was closed during the call", "open() it again")
        on_device = {n: t.to(device=self.device, dtype=self._dtypes[n]).contiguous() for n, t in feeds.items()}
        profile = select_profile(self.entry, {n: tuple(t.shape) for n, t in on_device.items()})
        stream = torch.cuda.current_stream(self.device)
        # Profile and shapes are context state, set outside any capture; a captured graph keeps
        # the kernels of its own shapes, whatever the context holds later.
        if context.active_optimization_profile != profile:
            context.set_optimization_profile_async(profile, stream.cuda_stream)
        for name, t in on_device.items():
            if not context.set_input_shape(name, tuple(t.shape)):
                raise InvalidRequestError(f"{self.spec.name}: TensorRT refused shape {tuple(t.shape)} for {name}",
                                          "use a size the engine was built for (sdxl-export plan)")
        outputs = self.graphs.run(on_device, self._execute)
        want = {t.name: t.np_dtype.name for t in self.spec.outputs}
        return {n: t if str(t.dtype).replace("torch.", "") == want[n] else t.to(getattr(torch, want[n]))
                for n, t in outputs.items()}

    def _execute(self, feeds: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Bind ``feeds`` and fresh outputs, enqueue on the current stream (capturable)."""
        context = self._context
        if context is None:
            raise RunnerClosedError(f"{self.spec.name} (tensorrt) was closed during the call", "open() it again")
        for name, t in feeds.items():
            context.set_tensor_address(name, int(t.data_ptr()))
        outputs: dict[str, torch.Tensor] = {}
        for name in self.spec.output_names:
            shape = _dims(context.get_tensor_shape(name))
            out = torch.empty(shape, dtype=self._dtypes[name], device=self.device)
            context.set_tensor_address(name, int(out.data_ptr()))
            outputs[name] = out
        if not context.execute_async_v3(torch.cuda.current_stream(self.device).cuda_stream):
            raise BackendUnavailableError(f"{self.spec.name}: TensorRT execution failed",
                                          "rerun with -v for TensorRT's log")
        return outputs
