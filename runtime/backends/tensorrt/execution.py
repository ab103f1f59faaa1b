"""Running one TensorRT engine under concurrency: contexts per (lane, profile, shape), checked calls.

:class:`TrtExecutor` is the part of the TensorRT runner that touches execution contexts;
it is plain Python over the TensorRT objects it is given, so its ordering, locking and
selection logic is tested on CPU with fake engine/context objects that record what is
called (``tests/test_trt_execution.py``); the real thing is tested under ``-m trt``.

Rules it enforces (see :mod:`.lanes` for lanes, streams and scratch):

* **One execution context per (lane, profile, input shapes)**, created with
  ``USER_MANAGED`` allocation and bound to its lane's scratch (``set_device_memory(ptr,
  size)``, TensorRT >= 10.1). Its profile and input shapes are set once, when it is
  created, and never change: a CUDA graph captured from it stays valid, because nothing
  re-targets the context afterwards (NVIDIA's demo allows graphs only for static shapes;
  Torch-TensorRT re-records on a shape change -- a context per shape gives both). Contexts
  own no activation memory, so they are cheap; at most ``max_contexts`` per lane are
  kept (least recently used evicted, after synchronising the lane).
* **The lane's lock is held** from profile/shape setting through address binding,
  enqueue, graph capture and replay, so no two threads use one context or one scratch at
  the same time.
* **Work runs on the lane's dedicated stream**, never the legacy default stream
  (``execute_async_v3``'s documentation: the default stream costs extra device
  synchronisations); :class:`~.lanes.LanePool` orders it with the caller's stream.
* **Every TensorRT return value is checked** (``set_optimization_profile_async``,
  ``set_input_shape``, ``set_tensor_address``, ``execute_async_v3``), as polygraphy's
  ``TrtRunner`` does; a False is a :class:`TensorRTCallError` naming the call.
* CUDA graphs: each context has its own one-graph :class:`~..cuda.graphs.GraphCache`
  (the same machinery as the PyTorch backend's); a shape that cannot be captured runs
  eagerly (logged once). ``cuda_graphs=False`` runs every call eagerly.
* **Refit** (:mod:`.refit`): :meth:`TrtExecutor.exclusive` waits for the calls in flight
  and holds new ones back while the engine's weights change; :meth:`TrtExecutor.drop_graphs`
  then drops every captured graph (TensorRT keeps contexts valid across a refit but says
  nothing about graphs captured before it, which freeze kernel parameters), keeping contexts.

Thread sharing: one executor is shared by every thread calling its runner. ``_lock``
guards the per-lane context tables and the in-flight count; everything inside a lane is
guarded by that lane's lock.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ....errors import BackendUnavailableError, InvalidRequestError
from ..base import RunnerClosedError
from ..cuda.graphs import DEFAULT_MAX_GRAPHS, GraphCache, GraphStats, LRUCache
from ..cuda.lanes import Lane, LanePool

log = logging.getLogger(__name__)

ShapesKey = tuple[tuple[str, tuple[int, ...]], ...]


class TensorRTCallError(BackendUnavailableError):
    """A TensorRT call returned False (TensorRT logs why)."""


@dataclass
class ContextSlot:
    """One execution context fixed to a profile and input shapes on one lane."""

    context: Any  # trt.IExecutionContext
    profile: int
    shapes: ShapesKey
    generation: int
    graphs: GraphCache


class TrtExecutor:
    """Runs one engine's calls; see the module docstring for the rules."""

    def __init__(self, name: str, engine: Any, *, output_names: Sequence[str], dtypes: Mapping[str, torch.dtype],
                 pool: LanePool, allocation_strategy: Any, cuda_graphs: bool = True,
                 max_contexts: int = DEFAULT_MAX_GRAPHS, scratch_bytes: int):
        self.name = name
        self.engine = engine
        self.output_names = tuple(output_names)
        self.dtypes = dict(dtypes)
        self.pool = pool
        self.ops = pool.ops
        self.allocation_strategy = allocation_strategy
        self.cuda_graphs = bool(cuda_graphs)
        self.max_contexts = int(max_contexts)
        self._slots: dict[int, LRUCache[tuple[int, ShapesKey], ContextSlot]] = {}
        self._lock = threading.Condition()
        self._inflight = 0
        self._closed = False
        self._retired = GraphStats()  # counters of evicted/closed slots
        pool.register(self, scratch_bytes)

    # ---- calls ------------------------------------------------------------------------------
    def run(self, feeds: Mapping[str, torch.Tensor], profile: int) -> dict[str, torch.Tensor]:
        """Outputs of one call on ``feeds`` (on the engine's device, engine dtypes) with ``profile``."""
        shapes: ShapesKey = tuple(sorted((n, tuple(int(d) for d in t.shape)) for n, t in feeds.items()))
        with self._lock:
            if self._closed:
                raise RunnerClosedError(f"{self.name} (tensorrt) is closed", "open() it again")
            self._inflight += 1
        try:
            with self.pool.acquire() as lane:
                return self._run_on(lane, feeds, profile, shapes)
        finally:
            with self._lock:
                self._inflight -= 1
                self._lock.notify_all()

    def _run_on(self, lane: Lane, feeds: Mapping[str, torch.Tensor], profile: int,
                shapes: ShapesKey) -> dict[str, torch.Tensor]:
        ops = self.ops
        caller = ops.current_stream(lane.device)
        ptr, size, generation = lane.scratch_for(self.pool.scratch_bytes)
        ops.wait(lane.stream, caller)  # inputs were written on the caller's stream
        with ops.use_stream(lane.stream):
            slot = self._slot(lane, profile, shapes, ptr, size, generation)
            outputs = slot.graphs.run(feeds, functools.partial(self._enqueue, slot))
        ops.wait(caller, lane.stream)  # outputs are read on the caller's stream
        for t in outputs.values():
            ops.record_stream(t, caller)
        return outputs

    def _slot(self, lane: Lane, profile: int, shapes: ShapesKey, ptr: int, size: int,
              generation: int) -> ContextSlot:
        with self._lock:
            table = self._slots.get(lane.index)
            if table is None:
                table = self._slots[lane.index] = LRUCache(
                    self.max_contexts, functools.partial(self._retire, lane))
        key = (profile, shapes)
        slot = table.get(key)
        if slot is None:
            slot = self._new_slot(lane, profile, shapes, ptr, size, generation)
            table.put(key, slot)
        elif slot.generation != generation:  # the lane's scratch moved: rebind, drop the stale graph
            slot.graphs.clear()
            slot.context.set_device_memory(ptr, size)
            slot.generation = generation
        return slot

    def _new_slot(self, lane: Lane, profile: int, shapes: ShapesKey, ptr: int, size: int,
                  generation: int) -> ContextSlot:
        context = self.engine.create_execution_context(self.allocation_strategy)
        if context is None:
            raise TensorRTCallError(f"{self.name}: TensorRT could not create an execution context",
                                    "free GPU memory, or rerun with -v for TensorRT's log")
        context.set_device_memory(ptr, size)
        self._check(context.set_optimization_profile_async(profile, self.ops.handle(lane.stream)),
                    f"set_optimization_profile_async({profile})")
        for name, shape in shapes:
            if not context.set_input_shape(name, shape):
                raise InvalidRequestError(f"{self.name}: TensorRT refused shape {shape} for {name} "
                                          f"(profile {profile})", "use a size the engine was built for (sdxl-export plan)")
        graphs = GraphCache(name=f"{self.name}(tensorrt, profile {profile})", enabled=self.cuda_graphs, max_graphs=1)
        log.debug("%s: context for profile %d, %s on lane %d", self.name, profile, shapes, lane.index)
        return ContextSlot(context=context, profile=profile, shapes=shapes, generation=generation, graphs=graphs)

    def _enqueue(self, slot: ContextSlot, feeds: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Bind ``feeds`` and fresh outputs, enqueue on the current stream (capturable: no sync)."""
        context = slot.context
        for name, t in feeds.items():
            self._check(context.set_tensor_address(name, int(t.data_ptr())), f"set_tensor_address({name})")
        outputs: dict[str, torch.Tensor] = {}
        device = next(iter(feeds.values())).device
        for name in self.output_names:
            shape = tuple(int(d) for d in context.get_tensor_shape(name))
            out = torch.empty(shape, dtype=self.dtypes[name], device=device)
            self._check(context.set_tensor_address(name, int(out.data_ptr())), f"set_tensor_address({name})")
            outputs[name] = out
        stream = self.ops.current_stream(device)
        self._check(context.execute_async_v3(self.ops.handle(stream)), "execute_async_v3")
        return outputs

    def _check(self, ok: object, call: str) -> None:
        if not ok:
            raise TensorRTCallError(f"{self.name}: TensorRT {call} failed", "rerun with -v for TensorRT's log")

    # ---- bookkeeping ---------------------------------------------------------------------------
    def _retire(self, lane: Lane, _key: tuple[int, ShapesKey], slot: ContextSlot) -> None:
        """Drop a slot's graph and context once the lane's stream is done with them."""
        self.ops.synchronize(lane.stream)
        for k, v in slot.graphs.stats.as_dict().items():
            setattr(self._retired, k, getattr(self._retired, k) + v)
        slot.graphs.clear()
        slot.context = None

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        """No call of this executor runs inside the block: waits for those in flight, holds new ones.

        ``run`` takes ``_lock`` (a re-entrant condition) to count itself in, so holding it
        here is enough; a refit takes milliseconds to seconds, calls wait that long.
        """
        with self._lock:
            if self._closed:
                raise RunnerClosedError(f"{self.name} (tensorrt) is closed", "open() it again")
            while self._inflight:
                self._lock.wait()
            yield

    def drop_graphs(self) -> int:
        """Drop every captured CUDA graph (contexts stay); the next call per shape recaptures.

        Called after a refit. Each lane's graphs are dropped under that lane's lock, after its
        stream is idle (a replay may still be reading the graph's buffers). Returns how many
        contexts had their graphs dropped.
        """
        with self._lock:
            tables = dict(self._slots)
        lanes = {lane.index: lane for lane in self.pool.lanes}
        n = 0
        for index, table in tables.items():
            lane = lanes.get(index)
            if lane is None:
                continue
            with lane.lock:
                self.ops.synchronize(lane.stream)
                for slot in table.values():
                    slot.graphs.clear()
                    n += 1
        return n

    @property
    def stats(self) -> dict[str, int]:
        """CUDA-graph counters over every context (live and retired) and the live context count."""
        total = GraphStats(**self._retired.as_dict())
        with self._lock:
            tables = list(self._slots.values())
        contexts = 0
        for table in tables:
            for slot in table.values():
                contexts += 1
                for k, v in slot.graphs.stats.as_dict().items():
                    setattr(total, k, getattr(total, k) + v)
        return {**total.as_dict(), "contexts": contexts}

    def close(self) -> None:
        """Wait for in-flight calls, drop every context (per lane, under its lock), unregister the scratch."""
        with self._lock:
            self._closed = True
            while self._inflight:
                self._lock.wait()
            tables = dict(self._slots)
            self._slots.clear()
        lanes = {lane.index: lane for lane in self.pool.lanes}
        for index, table in tables.items():
            lane = lanes.get(index)
            if lane is None:
                continue
            with lane.lock:
                table.clear()
        self.pool.unregister(self)
        self.engine = None


__all__ = ["ContextSlot", "TensorRTCallError", "TrtExecutor"]
