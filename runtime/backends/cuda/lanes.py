"""Execution lanes: who may run GPU work on which stream, out of which scratch memory.

The execution model of the CUDA backends (written down in README "Execution model"):

* A **lane** is one device, one dedicated non-default CUDA stream, one scratch buffer
  and one lock. A lane runs one component call at a time (its lock is held for the
  whole call: shape setting, address binding, enqueue, graph replay), so the components
  that run on one lane never need their activation memory at the same time and share the
  lane's scratch. Two calls that run at once are on two lanes, so they never share
  scratch, a stream or an execution context mid-call.
* A **lane pool** (one per device, :func:`pool_for`) hands a free lane to each call,
  preferring the lane the calling thread used last (its CUDA graphs and contexts are
  warm there). A thread that calls alone -- the serving layer's one worker per pipeline --
  always gets the same lane; N threads calling at once get N lanes, created on demand.
  Lanes are never handed to two calls at once; their number is the peak concurrency.
* Scratch is sized to the largest requirement registered with the pool (every open
  engine registers its ``device_memory_size_v2``); a lane grows its buffer at the start of
  a call when a larger engine was opened since, after synchronising *its own* stream,
  and bumps its ``generation`` so that contexts bound to the old address rebind and drop
  their graphs. When the last engine of a device unregisters, every lane is
  synchronised and freed.
* Ordering with the caller: the lane's stream waits for the caller's current stream
  before the call (the inputs were produced there), and the caller's stream waits for
  the lane's stream after it (the outputs are used there); outputs are marked as used on
  the caller's stream (``record_stream``) so the caching allocator does not hand their
  memory to the lane's stream while the caller still reads them.

The CUDA calls sit behind :class:`DeviceOps` so that the ordering and locking logic is
plain Python and tested on CPU with a recording fake (``tests/test_trt_execution.py``);
:class:`CudaOps` is the real one.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading
from collections.abc import Iterator
from typing import Any, Protocol

import torch

log = logging.getLogger(__name__)


class DeviceOps(Protocol):
    """The stream and memory operations lanes need (CUDA in production, a fake in CPU tests)."""

    def new_stream(self, device: torch.device) -> Any: ...
    def current_stream(self, device: torch.device) -> Any: ...
    def use_stream(self, stream: Any) -> contextlib.AbstractContextManager[Any]: ...
    def wait(self, waiter: Any, producer: Any) -> None: ...
    def synchronize(self, stream: Any) -> None: ...
    def handle(self, stream: Any) -> int: ...
    def alloc(self, nbytes: int, device: torch.device) -> torch.Tensor: ...
    def record_stream(self, tensor: torch.Tensor, stream: Any) -> None: ...


class CudaOps:
    """:class:`DeviceOps` on torch's CUDA API."""

    def new_stream(self, device: torch.device) -> Any:
        return torch.cuda.Stream(device=device)  # type: ignore[no-untyped-call]  # torch's own stub gap

    def current_stream(self, device: torch.device) -> Any:
        return torch.cuda.current_stream(device)

    def use_stream(self, stream: Any) -> contextlib.AbstractContextManager[Any]:
        return torch.cuda.stream(stream)

    def wait(self, waiter: Any, producer: Any) -> None:
        if waiter != producer:
            waiter.wait_stream(producer)

    def synchronize(self, stream: Any) -> None:
        stream.synchronize()

    def handle(self, stream: Any) -> int:
        return int(stream.cuda_stream)

    def alloc(self, nbytes: int, device: torch.device) -> torch.Tensor:
        return torch.empty(max(int(nbytes), 1), dtype=torch.uint8, device=device)

    def record_stream(self, tensor: torch.Tensor, stream: Any) -> None:
        tensor.record_stream(stream)


class Lane:
    """One stream + scratch + lock on one device.

    Thread sharing: a lane is used by one call at a time (the pool hands it out
    exclusively; :attr:`lock` is held for the call). Its scratch, stream and ``generation``
    are read and changed only by that call, or by :meth:`LanePool.close_all`, which takes
    the lock first.
    """

    def __init__(self, index: int, device: torch.device, ops: DeviceOps):
        self.index = index
        self.device = device
        self.ops = ops
        self.lock = threading.Lock()
        self.stream = ops.new_stream(device)
        self.scratch: torch.Tensor | None = None
        #: Bumped whenever the scratch moves: contexts bound to an older generation rebind.
        self.generation = 0

    def scratch_for(self, nbytes: int) -> tuple[int, int, int]:
        """``(pointer, size, generation)`` of a scratch of at least ``nbytes`` (call holding :attr:`lock`)."""
        if self.scratch is None or int(self.scratch.numel()) < nbytes:
            if self.scratch is not None:
                self.ops.synchronize(self.stream)  # nothing on this lane may still use the old buffer
            self.scratch = None
            self.scratch = self.ops.alloc(nbytes, self.device)
            self.generation += 1
            log.info("lane %d on %s: scratch %.1f MB", self.index, self.device, nbytes / 1e6)
        return int(self.scratch.data_ptr()), int(self.scratch.numel()), self.generation

    def release(self) -> None:
        """Synchronise and free the scratch (call holding :attr:`lock`)."""
        if self.scratch is not None:
            self.ops.synchronize(self.stream)
            self.scratch = None
            self.generation += 1


class LanePool:
    """The lanes of one device.

    Thread sharing: every method may be called from any thread; ``_cond`` guards the lane
    list, the busy set and the registered scratch requirements.
    """

    def __init__(self, device: torch.device, ops: DeviceOps | None = None):
        self.device = device
        self.ops: DeviceOps = ops or CudaOps()
        self._cond = threading.Condition()
        self._lanes: list[Lane] = []
        self._busy: set[int] = set()
        self._needs: dict[int, int] = {}  # id(owner) -> scratch bytes
        self._ids = itertools.count()
        self._last = threading.local()  # the lane index this thread used last

    @property
    def scratch_bytes(self) -> int:
        with self._cond:
            return max(self._needs.values(), default=0)

    @property
    def lanes(self) -> list[Lane]:
        with self._cond:
            return list(self._lanes)

    def register(self, owner: object, nbytes: int) -> None:
        """``owner`` (an engine) needs ``nbytes`` of scratch on every lane it runs on."""
        with self._cond:
            self._needs[id(owner)] = int(nbytes)

    def unregister(self, owner: object) -> None:
        """``owner`` is closed; the last one out frees every lane (after synchronising it)."""
        with self._cond:
            self._needs.pop(id(owner), None)
            last = not self._needs
        if last:
            self.close_all()

    def close_all(self) -> None:
        for lane in self.lanes:
            with lane.lock:
                lane.release()
        with self._cond:
            self._lanes = [lane for lane in self._lanes if lane.index in self._busy]

    @contextlib.contextmanager
    def acquire(self) -> Iterator[Lane]:
        """A lane for one call, held exclusively until the block ends."""
        with self._cond:
            lane = self._pick()
            self._busy.add(lane.index)
        try:
            with lane.lock:
                yield lane
        finally:
            self._last.index = lane.index
            with self._cond:
                self._busy.discard(lane.index)
                self._cond.notify_all()

    def _pick(self) -> Lane:
        free = [lane for lane in self._lanes if lane.index not in self._busy]
        preferred = getattr(self._last, "index", None)
        for lane in free:
            if lane.index == preferred:
                return lane
        if free:
            return free[0]
        lane = Lane(next(self._ids), self.device, self.ops)
        self._lanes.append(lane)
        log.info("%s: lane %d opened (%d concurrent call(s))", self.device, lane.index, len(self._lanes))
        return lane


_POOLS: dict[str, LanePool] = {}
_POOLS_LOCK = threading.Lock()


def pool_for(device: torch.device) -> LanePool:
    """The process's lane pool of a CUDA device (one per device: lanes never cross devices)."""
    key = str(device)
    with _POOLS_LOCK:
        pool = _POOLS.get(key)
        if pool is None:
            pool = _POOLS[key] = LanePool(device)
        return pool


__all__ = ["CudaOps", "DeviceOps", "Lane", "LanePool", "pool_for"]
