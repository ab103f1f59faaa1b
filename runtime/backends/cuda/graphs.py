"""CUDA-graph capture and replay of a component call, one graph per input shape.

Why: a denoising loop calls the same UNet 20-50 times at one shape. Launching its
hundreds of kernels one by one from Python costs milliseconds per call, which dominates
at small batch and on fast GPUs. A CUDA graph records the kernel launches once and
replays them with one launch. A graph bakes in every device address it touches, so the
inputs and outputs must live in *static buffers* that are reused on every replay: the
caller's tensors are copied in, the graph is replayed, the outputs are copied out.

The machinery here knows nothing about torch modules, ONNX or TensorRT. A backend hands
:meth:`GraphCache.run` its inputs and a function ``fn(static_inputs) -> outputs`` that
computes the outputs from the static input buffers *on the current CUDA stream*:

* PyTorch backend: ``fn`` calls the module (casting at the edges); the tensors it
  allocates come from the graph's private memory pool and become the static outputs.
* TensorRT runner: ``fn`` allocates the output tensors (``torch.empty``), points the
  execution context at the static inputs and those outputs (``set_input_shape``,
  ``set_tensor_address``), calls ``execute_async_v3(torch.cuda.current_stream().cuda_stream)``
  and returns the outputs.

Usage::

    cache = GraphCache(name="unet", max_graphs=8)
    out = cache.run({"sample": x, "timestep": t, ...}, fn)   # first call at this shape: capture
    out = cache.run({"sample": x2, "timestep": t2, ...}, fn)  # same shapes: replay only
    cache.clear()                                            # when the component closes

Rules the caller must follow (they are what makes replay correct):

* ``fn`` should be capturable: no host synchronisation (``.item()``, ``.cpu()``, printing
  a tensor, data-dependent Python control flow), no allocations outside the current
  stream's pool, no CPU tensors. When a capture fails anyway, that shape runs eagerly
  from then on (``fn`` on the caller's tensors, warning logged once per shape,
  ``stats.eager_calls`` counts it); ``fallback=False`` raises :class:`GraphCaptureError`
  instead.
* ``fn`` must depend on nothing but the static inputs' *values* and shapes: anything
  else it reads (weights, buffers) must stay at the same address for the cache's life.
* Keys are the inputs' names, shapes, dtypes and devices (:func:`shape_signature`); a
  new key captures a new graph, the least recently used graph beyond ``max_graphs``
  is evicted (and captured again if that shape comes back).
* Outputs are clones by default (safe to keep). With ``clone_outputs=False`` they are
  *views into the static outputs*: valid until the next :meth:`GraphCache.run` of the same
  cache at any shape (graphs share one memory pool, so replaying another graph can
  reuse that memory), and they must not be modified in place.

Warm-up runs ``fn`` a few times on a side stream before capture, as PyTorch's CUDA
graph documentation requires (lazy initialisation -- cuBLAS handles, autotuning, TensorRT's
deferred shape updates -- must not happen inside a capture). All graphs of one cache share
one private memory pool (``torch.cuda.graph_pool_handle()``) so that intermediates of
different shapes reuse the same memory; that is safe because one lock serialises every
capture and replay of a cache (a graph's static buffers make replay non-reentrant).

Streams and ordering (what may be shared between threads): a :class:`GraphCache` may be
called from any thread; its lock covers refill, replay and the output clone. Callers may
be on different streams, so each graph records an event after its replay and clone, and
the next caller's stream waits on it before refilling the static inputs (otherwise a
refill on stream B could overwrite inputs that stream A's replay has not read yet). The
side stream and every ``current_stream`` are taken on the *inputs'* device, under
``torch.cuda.device(that device)``. Captures of all caches in the process are serialised
by one more lock (PyTorch allows one capture at a time), use
``capture_error_mode="thread_local"``, and call ``CUDAGraph.capture_begin``/``capture_end``
directly instead of ``torch.cuda.graph``, whose entry synchronises the whole device and
empties the allocator cache -- that would stall every other thread's work at each capture;
only the side stream is synchronised here.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import torch

from ....errors import InvalidRequestError, SDXLExportError

log = logging.getLogger(__name__)

#: fn(static_inputs) -> outputs, computed on the current CUDA stream.
GraphFn = Callable[[Mapping[str, torch.Tensor]], Mapping[str, torch.Tensor]]

#: (name, shape, dtype, device) per input, sorted by name.
ShapeKey = tuple[tuple[str, tuple[int, ...], str, str], ...]

DEFAULT_MAX_GRAPHS = 8
DEFAULT_WARMUP_RUNS = 2

#: PyTorch allows one capture at a time per process: captures of every cache take this lock.
_CAPTURE_LOCK = threading.Lock()


class GraphCaptureError(SDXLExportError):
    """A component call could not be captured into (or replayed from) a CUDA graph."""


def shape_signature(feeds: Mapping[str, Any]) -> ShapeKey:
    """The cache key of a call: every input's name, shape, dtype and device.

    Values are not part of the key: calls that differ only in values replay one graph.
    """
    return tuple(
        (name, tuple(int(s) for s in t.shape), str(t.dtype).replace("torch.", ""), str(t.device))
        for name, t in sorted(feeds.items())
    )


K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class LRUCache(Generic[K, V]):
    """A bounded mapping that evicts the least recently used entry beyond ``max_entries``.

    ``on_evict(key, value)`` is called for every entry that leaves the cache (eviction,
    :meth:`pop` or :meth:`clear`), so the owner can release what the value holds.
    Not thread-safe on its own: :class:`GraphCache` guards it with its lock.
    """

    def __init__(self, max_entries: int, on_evict: Callable[[K, V], None] | None = None):
        if int(max_entries) < 1:
            raise InvalidRequestError(
                f"max_entries must be at least 1, got {max_entries}", "pass max_graphs >= 1"
            )
        self.max_entries = int(max_entries)
        self._on_evict = on_evict
        self._items: OrderedDict[K, V] = OrderedDict()
        self.evictions = 0

    def get(self, key: K) -> V | None:
        """The value for ``key`` (marked most recently used), or None."""
        value = self._items.get(key)
        if value is not None:
            self._items.move_to_end(key)
        return value

    def put(self, key: K, value: V) -> None:
        """Insert ``key`` as most recently used; evict the oldest entries beyond the bound."""
        if key in self._items:
            self._release(key, self._items.pop(key))
        self._items[key] = value
        while len(self._items) > self.max_entries:
            old_key, old_value = self._items.popitem(last=False)
            self.evictions += 1
            log.debug("evicting %s", old_key)
            self._release(old_key, old_value)

    def pop(self, key: K) -> V | None:
        value = self._items.pop(key, None)
        if value is not None:
            self._release(key, value)
        return value

    def clear(self) -> None:
        while self._items:
            key, value = self._items.popitem(last=False)
            self._release(key, value)

    def _release(self, key: K, value: V) -> None:
        if self._on_evict is not None:
            self._on_evict(key, value)

    def keys(self) -> list[K]:
        """Keys from least to most recently used."""
        return list(self._items)

    def values(self) -> list[V]:
        """Values from least to most recently used (does not mark them used)."""
        return list(self._items.values())

    def __contains__(self, key: object) -> bool:
        return key in self._items

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[K]:
        return iter(list(self._items))


@dataclass
class CapturedGraph:
    """One captured call: its graph and the static buffers the graph reads and writes."""

    key: ShapeKey
    graph: Any  # torch.cuda.CUDAGraph
    static_inputs: dict[str, torch.Tensor]
    static_outputs: dict[str, torch.Tensor]
    replays: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class GraphStats:
    captures: int = 0
    replays: int = 0
    evictions: int = 0
    eager_calls: int = 0

    def as_dict(self) -> dict[str, int]:
        return {"captures": self.captures, "replays": self.replays,
                "evictions": self.evictions, "eager_calls": self.eager_calls}


class GraphCache:
    """Per-shape CUDA graphs of one component call (see the module docstring for the rules).

    ``enabled=False`` makes :meth:`run` call ``fn`` directly on the caller's tensors
    (eager), so a runner can keep one code path and switch graphs off with an option.
    """

    def __init__(
        self,
        *,
        name: str = "graph",
        enabled: bool = True,
        max_graphs: int = DEFAULT_MAX_GRAPHS,
        warmup_runs: int = DEFAULT_WARMUP_RUNS,
        clone_outputs: bool = True,
        fallback: bool = True,
    ):
        self.name = name
        self.enabled = bool(enabled)
        self.warmup_runs = max(1, int(warmup_runs))
        self.clone_outputs = bool(clone_outputs)
        self.fallback = bool(fallback)
        self._eager_keys: set[ShapeKey] = set()  # shapes whose capture failed: run eagerly
        self.stats = GraphStats()
        self._graphs: LRUCache[ShapeKey, CapturedGraph] = LRUCache(max_graphs, self._release)
        self._lock = threading.RLock()
        self._pool: Any = None  # torch.cuda graph pool handle, created on first capture
        self._stream: Any = None  # the side stream warm-ups and captures run on

    @property
    def max_graphs(self) -> int:
        return self._graphs.max_entries

    def __len__(self) -> int:
        return len(self._graphs)

    def keys(self) -> list[ShapeKey]:
        """Shape keys of the captured graphs, least recently used first."""
        with self._lock:
            return self._graphs.keys()

    def __contains__(self, feeds_or_key: object) -> bool:
        key = shape_signature(feeds_or_key) if isinstance(feeds_or_key, Mapping) else feeds_or_key
        with self._lock:
            return key in self._graphs

    # ---- the call -----------------------------------------------------------------------------
    def run(self, feeds: Mapping[str, torch.Tensor], fn: GraphFn) -> dict[str, torch.Tensor]:
        """``fn(feeds)`` computed by replaying the graph of this input shape (captured on first use)."""
        if not self.enabled:
            self.stats.eager_calls += 1
            return dict(fn(feeds))
        key = shape_signature(feeds)
        with self._lock:
            if key in self._eager_keys:
                self.stats.eager_calls += 1
                return dict(fn(feeds))
            device = _device_of(self.name, feeds)
            with torch.cuda.device(device):
                entry = self._graphs.get(key)
                stream = torch.cuda.current_stream(device)
                if entry is None:
                    try:
                        entry = self._capture(key, feeds, fn, device)
                    except GraphCaptureError as exc:
                        if not self.fallback:
                            raise
                        self._eager_keys.add(key)
                        log.warning("%s; running this shape eagerly from now on", exc.message)
                        self.stats.eager_calls += 1
                        return dict(fn(feeds))
                    self._graphs.put(key, entry)
                    self.stats.evictions = self._graphs.evictions
                else:
                    # The last replay (on whatever stream) must have read the static inputs
                    # and its outputs must have been cloned before they are overwritten.
                    done = entry.extra.get("done")
                    if done is not None:
                        stream.wait_event(done)
                    for name, static in entry.static_inputs.items():
                        static.copy_(feeds[name], non_blocking=True)
                try:
                    entry.graph.replay()
                except RuntimeError as exc:
                    raise GraphCaptureError(
                        f"{self.name}: replay of the CUDA graph for {_describe(key)} failed: {exc}",
                        "run with CUDA graphs disabled (cuda_graphs=False)",
                    ) from exc
                entry.replays += 1
                self.stats.replays += 1
                out = ({n: t.clone() for n, t in entry.static_outputs.items()} if self.clone_outputs
                       else dict(entry.static_outputs))
                done = entry.extra.get("done") or torch.cuda.Event()
                done.record(stream)
                entry.extra["done"] = done
                return out

    def clear(self) -> None:
        """Drop every graph and its buffers (call when the component closes)."""
        with self._lock:
            self._graphs.clear()
            self._eager_keys.clear()
            self._pool = None
            self._stream = None

    # ---- capture ------------------------------------------------------------------------------
    def _capture(self, key: ShapeKey, feeds: Mapping[str, torch.Tensor], fn: GraphFn,
                 device: torch.device) -> CapturedGraph:
        log.info("%s: capturing a CUDA graph for %s", self.name, _describe(key))
        # Static inputs come from the ordinary allocator (outside the graph pool): they
        # outlive every capture and are only ever written by copy_().
        static_inputs = {n: torch.empty_like(t, memory_format=torch.contiguous_format).copy_(t)
                         for n, t in feeds.items()}
        if self._pool is None or self._stream is None or self._stream.device != device:
            self._pool = torch.cuda.graph_pool_handle()
            self._stream = torch.cuda.Stream(device=device)
        side = self._stream
        caller = torch.cuda.current_stream(device)
        try:
            with _CAPTURE_LOCK:
                side.wait_stream(caller)
                with torch.cuda.stream(side):
                    for _ in range(self.warmup_runs):
                        fn(static_inputs)
                side.synchronize()  # this stream only: other threads' work keeps running
                graph = torch.cuda.CUDAGraph()
                # One capture stream per pool (PyTorch's advice for pool sharing); "thread_local"
                # so that other threads' CUDA work (other runners) does not break this capture.
                with torch.cuda.stream(side):
                    graph.capture_begin(pool=self._pool, capture_error_mode="thread_local")
                    try:
                        outputs = fn(static_inputs)
                    finally:
                        graph.capture_end()
                caller.wait_stream(side)
            static_outputs = dict(outputs)
        except RuntimeError as exc:
            # A failed capture can leave its stream/pool unusable for the next capture:
            # start the next one on fresh ones (graphs captured before keep their memory).
            self._pool = None
            self._stream = None
            raise GraphCaptureError(
                f"{self.name}: could not capture a CUDA graph for {_describe(key)}: {exc}",
                "run with CUDA graphs disabled (cuda_graphs=False); the call is not capturable",
            ) from exc
        self.stats.captures += 1
        return CapturedGraph(key=key, graph=graph, static_inputs=static_inputs, static_outputs=static_outputs)

    def _release(self, key: ShapeKey, entry: CapturedGraph) -> None:
        log.info("%s: releasing the CUDA graph for %s (%d replays)", self.name, _describe(key), entry.replays)
        reset = getattr(entry.graph, "reset", None)
        if reset is not None:
            reset()
        entry.static_inputs.clear()
        entry.static_outputs.clear()


def _device_of(name: str, feeds: Mapping[str, torch.Tensor]) -> torch.device:
    """The one CUDA device of the inputs (InvalidRequestError for CPU or mixed devices)."""
    for n, t in feeds.items():
        if not isinstance(t, torch.Tensor) or t.device.type != "cuda":
            raise InvalidRequestError(
                f"{name}: CUDA graphs need CUDA tensors, input {n!r} is on {getattr(t, 'device', type(t).__name__)}",
                "move the inputs to the GPU, or disable CUDA graphs (cuda_graphs=False)",
            )
    devices = {t.device for t in feeds.values()}
    if len(devices) != 1:
        raise InvalidRequestError(f"{name}: CUDA graph inputs are on several devices {sorted(map(str, devices))}",
                                  "put every input on the component's device")
    return next(iter(devices))


def _describe(key: ShapeKey) -> str:
    return ", ".join(f"{n}{list(s)}:{dt}" for n, s, dt, _ in key)


__all__ = ["CapturedGraph", "GraphCache", "GraphCaptureError", "GraphStats", "LRUCache", "shape_signature"]
