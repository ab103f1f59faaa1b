"""ONNX Runtime backend: one ``InferenceSession`` per component, CPU or CUDA.

Which graph: the exported ONNX (``onnx/<component>/model.onnx``), or, when ``sdxl-export
build`` made an ONNX Runtime twin for this component, the twin's optimized graph with
the session options it was built for (the pipeline verifies the entry first).

Session options, chosen on purpose and recorded in :attr:`OrtRunner.description`:

* ``graph_optimization_level = ORT_ENABLE_ALL``: layout and fusion passes (attention,
  LayerNorm, GELU) are the difference between a usable and a slow CPU UNet; the export
  validation runs at the same level, so the numbers are the validated ones.
* ``intra_op_num_threads`` = physical cores: hyper-threads share the FMA units the
  convolutions saturate; ``inter_op_num_threads = 1`` with ``ORT_SEQUENTIAL`` because
  the SDXL graphs are one long chain (parallel branches are rare and tiny).
* ``session.intra_op.allow_spinning = 0``: workers sleep between runs instead of
  busy-waiting, so they do not steal cores from the other sessions' pools and from the
  torch work between steps.
* ``enable_cpu_mem_arena`` and ``enable_mem_pattern``: the same shapes repeat every
  step, so the arena and the memory plan make step 2..N allocation-free inside ORT.

Data path: CPU runs hand ORT numpy *views* of the torch tensors (no copy in) and wrap
the outputs with ``torch.from_numpy`` (no copy out). CUDA runs use IO binding: inputs
are bound by device pointer, outputs are preallocated torch tensors, and the session
runs on torch's current CUDA stream (``user_compute_stream``), so there is no host
round trip and no cross-stream race. The same binding path runs on CPU with the option
``io_binding=True`` (that is how it is tested on machines without a GPU). ``InferenceSession.run`` is thread-safe; an IO
binding is made per call, so one runner serves several threads at once.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ...errors import (
    BackendUnavailableError,
    CorruptArtifactError,
    InvalidRequestError,
    MissingComponentError,
    WeightMismatchError,
)
from ...specs import ComponentSpec, level_dims
from .base import ComponentRunner
from .registry import ComponentContext

log = logging.getLogger(__name__)

NAME = "onnxruntime"

DEFAULT_SESSION_OPTIONS: dict[str, Any] = {
    "graph_optimization_level": "ORT_ENABLE_ALL",
    "intra_op_num_threads": 0,  # 0: physical cores (resolved and recorded at open)
    "inter_op_num_threads": 1,
    "execution_mode": "ORT_SEQUENTIAL",
    "enable_cpu_mem_arena": True,
    "enable_mem_pattern": True,
    "log_severity_level": 3,
    # No busy-waiting between runs: five sessions each own a thread pool, and the
    # pipeline runs torch ops (scheduler, guidance) between UNet calls; spinning
    # workers of an idle pool would steal those cores (measured: ~2x slower on 2 cores).
    "session.intra_op.allow_spinning": "0",
}

KNOWN_OPTIONS = frozenset({"session_options", "io_binding", "batch_parallel"})

#: Keys the engine builder records with a twin that describe it rather than configure
#: ``SessionOptions`` (kept in the description, not applied).
METADATA_KEYS = frozenset({"providers", "optimized_offline_at"})

_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "int32": torch.int32, "int64": torch.int64}


def available() -> tuple[bool, str]:
    try:
        import onnxruntime as ort
    except ImportError:
        return False, "onnxruntime is not installed (pip install onnxruntime, or onnxruntime-gpu)"
    return True, f"onnxruntime {ort.__version__} ({', '.join(ort.get_available_providers())})"


def cuda_available() -> bool:
    """ORT has its CUDA provider and torch sees a GPU (the pipeline's tensors live there)."""
    try:
        import onnxruntime as ort
    except ImportError:
        return False
    return "CUDAExecutionProvider" in ort.get_available_providers() and torch.cuda.is_available()


def physical_cores() -> int:
    try:
        import psutil

        n = psutil.cpu_count(logical=False)
    except ImportError:  # pragma: no cover - psutil is a dependency
        n = None
    return max(1, int(n or os.cpu_count() or 1))


def build_session_options(options: Mapping[str, Any]) -> tuple[Any, dict[str, Any]]:
    """``ort.SessionOptions`` from a plain dict; returns it and the resolved dict to record.

    Keys are SessionOptions attributes (enum values by name, e.g. ``"ORT_ENABLE_ALL"``);
    keys with a dot (``"session.intra_op.allow_spinning"``) are session config entries.
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    resolved: dict[str, Any] = {}
    for key, value in options.items():
        if key == "intra_op_num_threads" and not value:
            value = physical_cores()
        if key in METADATA_KEYS:
            pass
        elif "." in key:
            so.add_session_config_entry(key, str(value))
        elif key == "graph_optimization_level":
            so.graph_optimization_level = _enum(ort.GraphOptimizationLevel, value)
        elif key == "execution_mode":
            so.execution_mode = _enum(ort.ExecutionMode, value)
        elif hasattr(so, key):
            setattr(so, key, value)
        else:
            raise InvalidRequestError(f"unknown ONNX Runtime session option {key!r}",
                                      "use SessionOptions attribute names or 'session.*' config keys")
        resolved[key] = value
    return so, resolved


def _enum(enum: Any, value: Any) -> Any:
    if isinstance(value, str):
        return getattr(enum, value)
    if isinstance(value, int):
        for name in dir(enum):
            member = getattr(enum, name)
            if isinstance(member, enum) and int(member) == value:
                return member
    return value


class OrtRunner(ComponentRunner):
    """One component in one ``InferenceSession``."""

    backend = NAME

    def __init__(self, spec: ComponentSpec, model_path: Path, *, device: str = "cpu",
                 session_options: Mapping[str, Any] | None = None, engine_entry: Any | None = None,
                 source: str = "export", io_binding: bool | None = None, batch_parallel: int | str = "auto"):
        super().__init__(spec)
        self.model_path = Path(model_path)
        self.device = torch.device(device)
        self.engine_entry = engine_entry
        self.source = source
        self._options = {**DEFAULT_SESSION_OPTIONS, **dict(session_options or {})}
        self._resolved: dict[str, Any] = {}
        self._session: Any = None
        self._providers: list[str] = []
        self._output_names = list(spec.output_names)
        self._outputs_by_name = {t.name: t for t in spec.outputs}
        #: Default: on CUDA (no host round trip); on CPU plain ``run`` on zero-copy views.
        self.io_binding = self.device.type == "cuda" if io_binding is None else bool(io_binding)
        #: CPU: split the batch into this many chunks, each run by its own single-threaded
        #: session, concurrently (see :meth:`_open_lanes`). 1: off; "auto": :func:`auto_lanes`.
        self.batch_parallel = batch_parallel
        self._lanes: list[Any] = []
        self._pool: ThreadPoolExecutor | None = None
        self._batched_inputs = {t.name for t in spec.inputs if t.shape and t.shape[0] == "batch"}
        #: Initializers replaced at run time (set_weights): name -> the OrtValue every session uses.
        self._overrides: dict[str, Any] = {}
        self._initializer_shapes: dict[str, tuple[int, ...]] | None = None
        self._external_initializers: set[str] = set()

    # ---- lifecycle -----------------------------------------------------------------------------
    def _open_impl(self) -> None:
        import onnxruntime as ort

        if not self.model_path.is_file():
            raise MissingComponentError(f"{self.spec.name}: {self.model_path} is missing",
                                        "re-run the export (or build) that wrote it")
        so, self._resolved = build_session_options(self._options)
        providers: list[Any] = ["CPUExecutionProvider"]
        if self.device.type == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise BackendUnavailableError(
                    f"{self.spec.name}: ONNX Runtime has no CUDAExecutionProvider",
                    "pip uninstall onnxruntime && pip install onnxruntime-gpu, or run on cpu",
                )
            index = self.device.index if self.device.index is not None else torch.cuda.current_device()
            self.device = torch.device("cuda", index)
            stream = torch.cuda.current_stream(self.device).cuda_stream
            providers = [("CUDAExecutionProvider", {"device_id": index, "user_compute_stream": str(stream)}),
                         "CPUExecutionProvider"]
        from onnxruntime.capi import onnxruntime_pybind11_state as ort_errors

        load_errors = tuple(getattr(ort_errors, n) for n in (
            "Fail", "InvalidArgument", "NoSuchFile", "NoModel", "InvalidProtobuf", "InvalidGraph",
            "RuntimeException", "EPFail") if hasattr(ort_errors, n))
        try:
            self._session = self._new_session(so, providers)
        except load_errors as exc:
            raise CorruptArtifactError(
                f"ONNX Runtime cannot load {self.model_path} ({type(exc).__name__}: {str(exc)[:200]})",
                "re-run the export (or build) that wrote it",
            ) from None
        self._providers = list(self._session.get_providers())
        if self.device.type == "cuda" and self._providers[0] != "CUDAExecutionProvider":
            raise BackendUnavailableError(f"{self.spec.name}: CUDA provider failed to initialise",
                                          "check the CUDA/cuDNN install that onnxruntime-gpu needs")
        got = [i.name for i in self._session.get_inputs()]
        if sorted(got) != sorted(self.spec.input_names):
            raise CorruptArtifactError(
                f"{self.model_path} has inputs {got}, its spec names {list(self.spec.input_names)}",
                "re-run the export: the graph and the manifest disagree",
            )
        log.info("%s: onnxruntime session on %s (%s, %d threads)", self.spec.name, self._providers[0],
                 self._resolved.get("graph_optimization_level"), self._resolved.get("intra_op_num_threads", 0))

        lanes = auto_lanes(self.spec, self.model_path) if self.batch_parallel == "auto" else int(self.batch_parallel)
        if lanes > 1 and self.device.type == "cpu" and not self.io_binding and self._batched_inputs:
            self._open_lanes(lanes)

    def _open_lanes(self, lanes: int) -> None:
        """Per-chunk sessions for batch-parallel runs: one thread each, no shared thread pool.

        Under classifier-free guidance every UNet call has an even batch (negative +
        positive). Running the halves concurrently in two one-thread sessions avoids the
        per-operator fork/join of intra-op parallelism (thousands of small operators per
        step), which costs most when other processes share the cores. Each lane holds its
        own copy of the weights (ONNX Runtime prepacks GEMM weights per session).
        """

        self._lanes = self._new_lanes(lanes)
        self._pool = ThreadPoolExecutor(lanes, thread_name_prefix=f"ort-{self.spec.name}")
        log.info("%s: batch split over %d one-thread sessions", self.spec.name, lanes)

    def _new_lanes(self, lanes: int) -> list[Any]:
        threads = max(1, physical_cores() // lanes)
        out = []
        for _ in range(lanes):
            so, _ = build_session_options({**self._options, "intra_op_num_threads": threads})
            out.append(self._new_session(so, ["CPUExecutionProvider"]))
        return out

    def _new_session(self, so: Any, providers: list[Any]) -> Any:
        """A session on the graph file, with the run-time weight overrides supplied from memory."""
        import onnxruntime as ort

        if self._overrides:
            # ORT replaces an initializer stored as external data only through
            # add_external_initializers, and one stored inline only through add_initializer.
            external = self._external_initializers
            names = [n for n in self._overrides if n in external]
            if names:
                so.add_external_initializers(names, [self._overrides[n] for n in names])
            for n, value in self._overrides.items():
                if n not in external:
                    so.add_initializer(n, value)
        return ort.InferenceSession(str(self.model_path), so, providers=providers)

    # ---- run-time weights ------------------------------------------------------------------------
    weight_keys = "onnx"

    def set_weights(self, weights: Mapping[str, torch.Tensor]) -> None:
        """New sessions whose named initializers come from ``weights`` (in the graph's layout).

        Nothing on disk changes: the values are handed to ONNX Runtime from memory
        (``SessionOptions.add_external_initializers``) and kept here for every later session
        (the lanes too). The old sessions serve until the new ones are built; a failure keeps
        them. Names not in the graph (e.g. an offline-optimized ORT twin renamed them) and
        shape mismatches are refused before anything is built.
        """
        import onnxruntime as ort

        if self._session is None:
            from .base import RunnerClosedError

            raise RunnerClosedError(f"{self.spec.name} ({NAME}) is not open", "call open() first")
        shapes = self._graph_initializers()
        for name, value in weights.items():
            if name not in shapes:
                raise WeightMismatchError(
                    f"{self.spec.name} ({NAME}): {self.model_path.name} has no initializer {name!r}",
                    "switch weights on the exported graph (drop the ORT twin engine) or re-export")
            if shapes[name] != tuple(value.shape):
                raise WeightMismatchError(
                    f"{self.spec.name} ({NAME}): initializer {name} is {shapes[name]}, the update is "
                    f"{tuple(value.shape)}", "pass weights in the graph's layout (see the parameter map)")
        previous = dict(self._overrides)
        for name, value in weights.items():
            arr = np.ascontiguousarray(value.detach().to("cpu", torch.float32).numpy())
            self._overrides[name] = ort.OrtValue.ortvalue_from_numpy(arr)
        try:
            so, _ = build_session_options(self._options)
            session = self._new_session(so, self._session_providers())
            lanes = self._new_lanes(len(self._lanes)) if self._lanes else []
        except BaseException:
            self._overrides = previous
            raise
        self._session, self._lanes = session, lanes

    def _session_providers(self) -> list[Any]:
        return list(zip(self._session.get_providers(), self._session.get_provider_options().values())) \
            if self.device.type == "cuda" else ["CPUExecutionProvider"]

    def _graph_initializers(self) -> dict[str, tuple[int, ...]]:
        if self._initializer_shapes is None:
            import onnx

            model = onnx.load(str(self.model_path), load_external_data=False)
            self._initializer_shapes = {i.name: tuple(int(d) for d in i.dims) for i in model.graph.initializer}
            self._external_initializers = {i.name for i in model.graph.initializer
                                           if i.data_location == onnx.TensorProto.EXTERNAL}
        return self._initializer_shapes

    def _close_impl(self) -> None:
        self._session = None
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        self._lanes = []

    # ---- shapes --------------------------------------------------------------------------------
    def check_supported(self, batch: int, height: int, width: int) -> None:
        """An ORT twin built over fixed profiles serves exactly what its TensorRT twin would."""
        entry = self.engine_entry
        if entry is not None and getattr(entry, "profiles", None):
            from ...engines.store import select_profile

            select_profile(entry, self.spec.input_shapes(batch, height, width))

    def _output_shapes(self, feeds: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
        bound: dict[str, int] = {}
        for t in self.spec.inputs:
            for got, d in zip(feeds[t.name].shape, t.shape):
                if isinstance(d, str):
                    bound[d] = int(got)
        s = self.spec.vae_scale
        if "latent_height" in bound:
            bound.setdefault("height", bound["latent_height"] * s)
            bound.setdefault("width", bound["latent_width"] * s)
        if "height" in bound:
            bound.setdefault("latent_height", bound["height"] // s)
            bound.setdefault("latent_width", bound["width"] // s)
        level_dims(bound)  # a ControlNet's residuals at the deeper levels
        return {t.name: t.concrete(bound) for t in self.spec.outputs}

    # ---- calls ---------------------------------------------------------------------------------
    def _run(self, feeds: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.io_binding:
            return self._run_bound(feeds)
        if self._lanes:
            batch = int(next(iter(feeds[n] for n in self._batched_inputs)).shape[0])
            if batch % len(self._lanes) == 0:
                return self._run_lanes(feeds, batch)
        arrays = {name: _numpy_view(x) for name, x in feeds.items()}
        outs = self._session.run(self._output_names, arrays)
        return {name: torch.from_numpy(o) for name, o in zip(self._output_names, outs)}

    def _run_lanes(self, feeds: Mapping[str, torch.Tensor], batch: int) -> dict[str, torch.Tensor]:
        """Run equal batch chunks concurrently, one per lane; concatenate the outputs in order."""
        n = len(self._lanes)
        step = batch // n
        arrays = {name: _numpy_view(x) for name, x in feeds.items()}
        chunks = [{k: a[i * step:(i + 1) * step] if k in self._batched_inputs else a for k, a in arrays.items()}
                  for i in range(n)]
        assert self._pool is not None
        futures = [self._pool.submit(s.run, self._output_names, c) for s, c in zip(self._lanes, chunks)]
        parts = [f.result() for f in futures]
        return {name: torch.from_numpy(np.concatenate([p[j] for p in parts]))
                for j, name in enumerate(self._output_names)}

    def _run_bound(self, feeds: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """IO binding: inputs by pointer on this runner's device, outputs preallocated there."""
        binding = self._session.io_binding()
        kind, index = self.device.type, self.device.index or 0
        keep = []  # tensors moved or made contiguous here must outlive the run
        for t in self.spec.inputs:
            x = feeds[t.name]
            if x.device != self.device or not x.is_contiguous():
                x = x.to(self.device).contiguous()
            keep.append(x)
            binding.bind_input(t.name, kind, index, t.np_dtype.type, tuple(x.shape), x.data_ptr())
        outs: dict[str, torch.Tensor] = {}
        for name, shape in self._output_shapes(feeds).items():
            t = self._outputs_by_name[name]
            y = torch.empty(shape, dtype=_TORCH_DTYPES[t.dtype], device=self.device)
            binding.bind_output(name, kind, index, t.np_dtype.type, shape, y.data_ptr())
            outs[name] = y
        self._session.run_with_iobinding(binding)
        del keep
        return outs

    @property
    def description(self) -> dict[str, Any]:
        import onnxruntime as ort

        d = super().description
        d.update({
            "onnxruntime": ort.__version__,
            "file": str(self.model_path),
            "source": self.source,
            "device": str(self.device),
            "providers": list(self._providers),
            "session_options": dict(self._resolved or self._options),
            "io_binding": self.io_binding,
            "batch_parallel": len(self._lanes) or 1,
            "precision": getattr(self.engine_entry, "precision", "fp32"),
        })
        if self.engine_entry is not None and getattr(self.engine_entry, "profiles", None):
            d["buckets"] = [str(b) for b in self.engine_entry.buckets]
            d["batch_sizes"] = list(self.engine_entry.batch_sizes)
        return d


def auto_lanes(spec: ComponentSpec, model_path: Path) -> int:
    """Batch lanes by default: 2 for a UNet on a CPU with >= 2 cores whose weights fit twice.

    UNets run at an even batch under guidance. Measured on the small preset (2-core AMD
    EPYC, ORT 1.32, benchmarks/step_bench.py and bench): UNet step 206 -> 175 ms,
    end to end 4.82 -> 3.96 s. Each lane holds the weights again, so a UNet whose files
    take more than 1/8 of RAM (the full-size SDXL UNet is ~10 GB fp32) keeps one session.
    """
    if spec.kind not in ("unet", "unet_controlnet", "controlnet") or physical_cores() < 2:
        return 1
    try:
        import psutil

        size = sum(p.stat().st_size for p in model_path.parent.glob(model_path.name + "*"))
        return 2 if 2 * size < psutil.virtual_memory().total / 8 else 1
    except OSError:
        return 1


def _numpy_view(x: torch.Tensor) -> np.ndarray:
    """A numpy array sharing memory with ``x`` (copies only if not CPU-contiguous)."""
    if x.device.type != "cpu":
        x = x.cpu()
    if not x.is_contiguous():
        x = x.contiguous()
    return x.detach().numpy()


def create(ctx: ComponentContext) -> OrtRunner:
    """Open ``ctx.name`` from its ORT twin engine when one was built, else from the export.

    Options (``ctx.options``): ``session_options``, a dict applied over the defaults and
    over the twin's recorded options (see :func:`build_session_options`); ``io_binding``
    (default: on for CUDA, off for CPU).
    """
    unknown = set(ctx.options) - KNOWN_OPTIONS
    if unknown:
        raise InvalidRequestError(f"unknown onnxruntime backend option(s) {sorted(unknown)}",
                                  f"use only {sorted(KNOWN_OPTIONS)}")
    user = dict(ctx.options.get("session_options") or {})
    binding = ctx.options.get("io_binding")
    lanes = ctx.options.get("batch_parallel", "auto")
    entry = ctx.engine_entry
    if entry is not None and getattr(entry, "backend", None) == NAME:
        opts = {**dict(getattr(entry, "session_options", {}) or {}), **user}
        return OrtRunner(ctx.spec, Path(entry.path), device=ctx.device, session_options=opts,
                         engine_entry=entry, source="engine (onnxruntime twin)", io_binding=binding,
                         batch_parallel=lanes)
    path = ctx.artifacts / ctx.export_entry["file"]
    return OrtRunner(ctx.spec, path, device=ctx.device, session_options=user, source="export", io_binding=binding,
                     batch_parallel=lanes)
