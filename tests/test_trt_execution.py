"""The TensorRT execution model's ordering, locking and selection logic, on CPU.

TensorRT cannot run here, so the engine and its execution contexts are *fakes of the
TensorRT API objects* (``FakeEngine``/``FakeContext``) and the CUDA stream calls are a
recording fake (``FakeOps``). What is under test is real: :class:`TrtExecutor` and
:class:`LanePool` -- which context a call gets, what is set on it and when, which stream
work is enqueued on, how the caller's stream is ordered with it, what scratch each call
uses and which TensorRT return values are checked.

The fake context computes for real: ``execute_async_v3`` reads the input from the
address bound with ``set_tensor_address`` (CPU memory, through ctypes) at the shape set
with ``set_input_shape`` and writes ``y = 2 x + profile`` to the bound output address,
so a context that runs with another call's shape, profile or buffers gives wrong values.
It also flags two calls inside one context, or inside one scratch buffer, at once.
"""

from __future__ import annotations

import contextlib
import ctypes
import random
import threading
import time
from collections.abc import Iterator
from math import prod
from typing import Any

import numpy as np
import pytest
import torch
from sdxl_export.errors import InvalidRequestError
from sdxl_export.runtime.backends.base import RunnerClosedError
from sdxl_export.runtime.backends.cuda.lanes import LanePool
from sdxl_export.runtime.backends.tensorrt.execution import TensorRTCallError, TrtExecutor


# ---- fakes of CUDA streams and TensorRT objects ----------------------------------------------------
class FakeStream:
    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return self.name


class FakeOps:
    """Streams as names; records every ordering call (thread-safe)."""

    def __init__(self) -> None:
        self.log: list[tuple[Any, ...]] = []
        self._lock = threading.Lock()
        self._local = threading.local()
        self._n = 0

    def _record(self, *event: Any) -> None:
        with self._lock:
            self.log.append((threading.get_ident(), *event))

    def _stack(self) -> list[FakeStream]:
        if not hasattr(self._local, "stack"):
            self._local.stack = [FakeStream(f"caller-{threading.get_ident()}")]
        return self._local.stack

    def new_stream(self, device: torch.device) -> FakeStream:
        with self._lock:
            self._n += 1
            return FakeStream(f"lane-stream-{self._n}")

    def current_stream(self, device: torch.device) -> FakeStream:
        return self._stack()[-1]

    @contextlib.contextmanager
    def use_stream(self, stream: FakeStream) -> Iterator[FakeStream]:
        self._stack().append(stream)
        try:
            yield stream
        finally:
            self._stack().pop()

    def wait(self, waiter: FakeStream, producer: FakeStream) -> None:
        self._record("wait", waiter, producer)

    def synchronize(self, stream: FakeStream) -> None:
        self._record("sync", stream)

    def handle(self, stream: FakeStream) -> int:
        return id(stream)

    def alloc(self, nbytes: int, device: torch.device) -> torch.Tensor:
        self._record("alloc", nbytes)
        return torch.empty(max(nbytes, 1), dtype=torch.uint8)

    def record_stream(self, tensor: torch.Tensor, stream: FakeStream) -> None:
        self._record("record_stream", stream)


class Violations:
    def __init__(self) -> None:
        self.items: list[str] = []
        self.busy_scratch: set[int] = set()
        self.lock = threading.Lock()


class FakeContext:
    def __init__(self, engine: FakeEngine):
        self.engine = engine
        self.scratch: int | None = None
        self.profile: int | None = None
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.addresses: dict[str, int] = {}
        self.shape_sets = 0
        self.executed = 0
        self.busy = False
        self.streams: set[int] = set()

    def set_device_memory(self, ptr: int, size: int) -> None:
        assert size >= self.engine.scratch_bytes
        self.scratch = ptr

    def set_optimization_profile_async(self, profile: int, stream: int) -> bool:
        self.profile = profile
        return self.engine.fail != "profile"

    def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
        if self.executed:
            self.engine.violations.items.append("shape changed on a context that already ran")
        self.shape_sets += 1
        self.shapes[name] = tuple(shape)
        return self.engine.fail != "shape"

    def set_tensor_address(self, name: str, ptr: int) -> bool:
        self.addresses[name] = ptr
        return self.engine.fail != "address"

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        return self.shapes["x"]

    def execute_async_v3(self, stream: int) -> bool:
        v = self.engine.violations
        with v.lock:
            if self.busy:
                v.items.append("two calls in one context at once")
            if self.scratch in v.busy_scratch:
                v.items.append("two calls in one scratch buffer at once")
            self.busy = True
            v.busy_scratch.add(self.scratch)
        self.streams.add(stream)
        time.sleep(random.uniform(0, 0.002))  # widen any race window
        shape = self.shapes["x"]
        n = prod(shape)
        x = np.ctypeslib.as_array((ctypes.c_float * n).from_address(self.addresses["x"])).reshape(shape)
        y = np.ctypeslib.as_array((ctypes.c_float * n).from_address(self.addresses["y"])).reshape(shape)
        y[...] = 2 * x + self.profile
        self.executed += 1
        with v.lock:
            self.busy = False
            v.busy_scratch.discard(self.scratch)
        return self.engine.fail != "execute"


class FakeEngine:
    def __init__(self, scratch_bytes: int = 1024, fail: str = ""):
        self.scratch_bytes = scratch_bytes
        self.fail = fail
        self.contexts: list[FakeContext] = []
        self.violations = Violations()
        self._lock = threading.Lock()

    def create_execution_context(self, strategy: Any) -> FakeContext:
        assert strategy == "USER_MANAGED"
        ctx = FakeContext(self)
        with self._lock:
            self.contexts.append(ctx)
        return ctx


def executor(pool: LanePool, engine: FakeEngine, **kw: Any) -> TrtExecutor:
    return TrtExecutor("unet", engine, output_names=("y",), dtypes={"x": torch.float32, "y": torch.float32},
                       pool=pool, allocation_strategy="USER_MANAGED", cuda_graphs=False,
                       scratch_bytes=engine.scratch_bytes, **kw)


@pytest.fixture()
def ops() -> FakeOps:
    return FakeOps()


@pytest.fixture()
def pool(ops: FakeOps) -> LanePool:
    return LanePool(torch.device("cpu"), ops)


def expected(x: torch.Tensor, profile: int) -> torch.Tensor:
    return 2 * x + profile


# ---- tests --------------------------------------------------------------------------------------------
def test_shape_a_b_a_uses_one_fixed_context_per_shape_with_correct_values(pool):
    engine = FakeEngine()
    ex = executor(pool, engine)
    a, b = torch.randn(2, 4), torch.randn(3, 5)
    for x, profile in ((a, 0), (b, 1), (a, 0), (b, 1)):
        torch.testing.assert_close(ex.run({"x": x}, profile)["y"], expected(x, profile), rtol=0, atol=0)
    assert len(engine.contexts) == 2  # A's context came back for the second A
    assert all(c.shape_sets == 1 and c.executed == 2 for c in engine.contexts)  # shapes set once, never re-targeted
    assert sorted(c.profile for c in engine.contexts) == [0, 1]
    assert not engine.violations.items
    assert ex.stats["contexts"] == 2 and ex.stats["eager_calls"] == 4


def test_four_threads_mixed_buckets_equal_the_same_calls_in_sequence(pool):
    engine = FakeEngine()
    ex = executor(pool, engine)
    gen = torch.Generator().manual_seed(0)
    shapes = [((2, 4), 0), ((3, 5), 1), ((1, 8), 2), ((2, 4), 0)]
    calls = [[(torch.randn(*shapes[(t + i) % 4][0], generator=gen), shapes[(t + i) % 4][1]) for i in range(24)]
             for t in range(4)]
    sequential = [[ex.run({"x": x}, p)["y"] for x, p in thread_calls] for thread_calls in calls]
    results: list[list[torch.Tensor]] = [[] for _ in calls]
    errors: list[BaseException] = []
    start = threading.Barrier(4)

    def worker(t: int) -> None:
        try:
            start.wait()
            results[t] = [ex.run({"x": x}, p)["y"] for x, p in calls[t]]
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors[0]
    for t in range(4):
        for got, want, (x, p) in zip(results[t], sequential[t], calls[t]):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
            torch.testing.assert_close(got, expected(x, p), rtol=0, atol=0)
    assert not engine.violations.items, engine.violations.items[:3]
    assert 1 <= len(pool.lanes) <= 4
    assert all(c.shape_sets == 1 for c in engine.contexts)
    lane_streams = {id(lane.stream) for lane in pool.lanes}
    assert all(c.streams <= lane_streams and len(c.streams) == 1 for c in engine.contexts)  # a context stays on its lane


def test_work_runs_on_the_lane_stream_ordered_with_the_caller(pool, ops):
    engine = FakeEngine()
    ex = executor(pool, engine)
    ex.run({"x": torch.ones(2, 4)}, 0)
    lane = pool.lanes[0]
    caller = ops.current_stream(torch.device("cpu"))
    events = [e[1:] for e in ops.log if e[1] != "alloc"]
    assert events == [("wait", lane.stream, caller), ("wait", caller, lane.stream), ("record_stream", caller)]
    (ctx,) = engine.contexts
    assert ctx.streams == {id(lane.stream)}  # enqueued on the lane's stream, not the caller's
    assert ctx.scratch == lane.scratch.data_ptr()


def test_one_thread_keeps_its_lane_and_concurrent_calls_get_distinct_lanes(pool):
    with pool.acquire() as first:
        pass
    with pool.acquire() as again:
        assert again is first
        with pool.acquire() as other:  # held at once: another lane, another scratch and stream
            assert other is not first and other.stream is not first.stream
    assert len(pool.lanes) == 2


@pytest.mark.parametrize("fail,error,match", [
    ("profile", TensorRTCallError, "set_optimization_profile_async"),
    ("shape", InvalidRequestError, "refused shape"),
    ("address", TensorRTCallError, "set_tensor_address"),
    ("execute", TensorRTCallError, "execute_async_v3"),
])
def test_every_tensorrt_return_value_is_checked(pool, fail, error, match):
    ex = executor(pool, FakeEngine(fail=fail))
    with pytest.raises(error, match=match) as info:
        ex.run({"x": torch.ones(2, 4)}, 0)
    assert info.value.hint


def test_scratch_grows_for_a_bigger_engine_and_contexts_rebind(pool, ops):
    small, big = FakeEngine(scratch_bytes=100), FakeEngine(scratch_bytes=5000)
    ex_small = executor(pool, small)
    ex_small.run({"x": torch.ones(2, 4)}, 0)
    lane = pool.lanes[0]
    old = lane.scratch.data_ptr()
    ex_big = executor(pool, big)  # opened later, needs more
    ex_big.run({"x": torch.ones(2, 4)}, 0)
    assert lane.scratch.numel() >= 5000 and lane.scratch.data_ptr() != old
    assert ("sync", lane.stream) in [e[1:] for e in ops.log]  # the old buffer was idle before it was freed
    ex_small.run({"x": torch.ones(2, 4)}, 0)
    assert small.contexts[0].scratch == lane.scratch.data_ptr()  # rebound, not left on freed memory
    ex_small.close()
    assert lane.scratch is not None  # the big engine is still open
    ex_big.close()
    assert lane.scratch is None  # last engine out frees every lane


def test_close_drops_contexts_and_refuses_later_calls(pool):
    engine = FakeEngine()
    ex = executor(pool, engine)
    ex.run({"x": torch.ones(2, 4)}, 0)
    ex.close()
    with pytest.raises(RunnerClosedError):
        ex.run({"x": torch.ones(2, 4)}, 0)
    assert ex.stats["contexts"] == 0


def test_contexts_per_lane_are_bounded(pool):
    engine = FakeEngine()
    ex = executor(pool, engine, max_contexts=2)
    for n in (1, 2, 3, 1):
        x = torch.ones(n, 4)
        torch.testing.assert_close(ex.run({"x": x}, 0)["y"], expected(x, 0))
    assert ex.stats["contexts"] == 2 and len(engine.contexts) == 4  # (1) was evicted and made again
