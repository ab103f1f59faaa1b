"""Run-time weight switching of TensorRT engines (``runtime/trt_refit.py``, executor hooks), on CPU.

TensorRT cannot run here, so ``tensorrt`` is a *fake module* put in ``sys.modules``: a fake
``Refitter`` that behaves as TensorRT's documentation says (``get_all_weights``,
``get_weights_prototype`` with the build-time dtype and count, ``set_named_weights`` returning
False on a wrong count or dtype, ``get_missing_weights`` for combined weights,
``refit_cuda_engine``) over a fake engine holding numpy weights. The refit reads the values
through the pointers handed to ``trt.Weights`` (ctypes), at refit time -- so a buffer freed
early, a wrong dtype or a wrong pointer gives wrong values. What is under test is real:
:func:`refit_engine` (checks before any change, dtype conversion, all-or-nothing, missing
partners) and :class:`TrtExecutor`'s ``exclusive``/``drop_graphs``. The real engine is tested
under ``-m trt`` (``test_tensorrt_refit_matches_onnxruntime_on_changed_weights``).
"""

from __future__ import annotations

import ctypes
import sys
import threading
import time
import types
from typing import Any

import numpy as np
import pytest
import torch
from sdxl_export.errors import BackendUnavailableError, InvalidLoraError, WeightMismatchError
from sdxl_export.runtime.backends.cuda.graphs import GraphCache
from sdxl_export.runtime.backends.cuda.lanes import LanePool
from sdxl_export.runtime.backends.tensorrt.execution import TensorRTCallError
from sdxl_export.runtime.backends.tensorrt.refit import RefitFailedError, refit_engine
from test_trt_execution import FakeEngine as FakeExecEngine
from test_trt_execution import FakeOps, executor

NP = {"FLOAT": np.float32, "HALF": np.float16}


class DataType:
    def __init__(self, name: str):
        self.name = name


FLOAT, HALF = DataType("FLOAT"), DataType("HALF")


class Weights:
    def __init__(self, dtype: DataType, ptr: int = 0, count: int = 0):
        self.dtype, self.ptr, self.size = dtype, ptr, count


class Engine:
    """Weights by name (numpy, in the build-time dtype); ``combined``: name -> partners TensorRT fused it with."""

    def __init__(self, weights: dict[str, np.ndarray], combined: dict[str, list[str]] | None = None,
                 refittable: bool = True, fail_refit: bool = False, reject: str = ""):
        self.weights = weights
        self.combined = combined or {}
        self.refittable = refittable
        self.fail_refit = fail_refit
        self.reject = reject
        self.log: list[tuple[Any, ...]] = []


class Refitter:
    def __init__(self, engine: Engine, logger: Any):
        self.engine = engine
        self.pending: dict[str, Weights] = {}

    def get_all_weights(self) -> list[str]:
        return list(self.engine.weights)

    def get_weights_prototype(self, name: str) -> Weights:
        w = self.engine.weights.get(name)
        if w is None:
            return Weights(FLOAT, 0, -1)
        return Weights(HALF if w.dtype == np.float16 else FLOAT, 0, w.size)

    def set_named_weights(self, name: str, weights: Weights, location: Any) -> bool:
        self.engine.log.append(("set", name, location))
        proto = self.get_weights_prototype(name)
        if name == self.engine.reject or weights.size != proto.size or weights.dtype.name != proto.dtype.name:
            return False
        self.pending[name] = weights
        return True

    def get_missing_weights(self) -> list[str]:
        return sorted({p for n in self.pending for p in self.engine.combined.get(n, []) if p not in self.pending})

    def refit_cuda_engine(self) -> bool:
        self.engine.log.append(("refit",))
        if self.get_missing_weights():
            return False
        for name, w in self.pending.items():  # read through the pointers, now (as TensorRT does)
            dtype = NP[w.dtype.name]
            nbytes = w.size * np.dtype(dtype).itemsize
            raw = (ctypes.c_char * nbytes).from_address(w.ptr)
            self.engine.weights[name] = np.frombuffer(raw, dtype=dtype).reshape(self.engine.weights[name].shape).copy()
        return not self.engine.fail_refit


@pytest.fixture(autouse=True)
def fake_tensorrt(monkeypatch):
    mod = types.ModuleType("tensorrt")
    mod.Refitter = Refitter  # type: ignore[attr-defined]
    mod.Weights = Weights  # type: ignore[attr-defined]
    mod.TensorLocation = types.SimpleNamespace(HOST="HOST", DEVICE="DEVICE")  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "tensorrt", mod)
    return mod


def _engine(**kw: Any) -> Engine:
    rng = np.random.default_rng(0)
    return Engine({"q.weight": rng.standard_normal((4, 3)).astype(np.float16),  # an --fp16 engine's copy
                   "k.weight": rng.standard_normal((4, 3)).astype(np.float32),
                   "bias": rng.standard_normal(4).astype(np.float32)}, **kw)


SHAPES = {"q.weight": (4, 3), "k.weight": (4, 3), "bias": (4,)}


def _refit(engine: Engine, weights: dict[str, torch.Tensor], **kw: Any) -> Any:
    return refit_engine(engine, weights, logger=None, what="unet (tensorrt)", shapes=kw.pop("shapes", SHAPES),
                        **kw)  # type: ignore[arg-type]


def _snapshot(engine: Engine) -> dict[str, np.ndarray]:
    return {k: v.copy() for k, v in engine.weights.items()}


def _unchanged(engine: Engine, before: dict[str, np.ndarray]) -> bool:
    return all(np.array_equal(engine.weights[k], v) and engine.weights[k].dtype == v.dtype for k, v in before.items())


# ---- checks before any change ---------------------------------------------------------------------------
def test_unknown_names_are_refused_before_any_change():
    e = _engine()
    before = _snapshot(e)
    with pytest.raises(WeightMismatchError, match="not refittable weights of this engine: 'nope'"):
        _refit(e, {"q.weight": torch.zeros(4, 3), "nope": torch.zeros(2)})
    assert e.log == [] and _unchanged(e, before)  # not one set_named_weights, no refit


@pytest.mark.parametrize("weights,match", [
    ({"k.weight": torch.zeros(3, 4)}, r"shape \(3, 4\), the engine's is \(4, 3\)"),  # a Linear not transposed
    ({"bias": torch.zeros(4), "k.weight": torch.zeros(4, 4)}, "shape"),
])
def test_shape_mismatch_is_refused_before_any_change(weights, match):
    e = _engine()
    before = _snapshot(e)
    with pytest.raises(WeightMismatchError, match=match):
        _refit(e, weights)
    assert e.log == [] and _unchanged(e, before)


def test_count_is_checked_against_the_prototype_without_onnx_shapes():
    e = _engine()
    with pytest.raises(WeightMismatchError, match="has 5 values, the engine's has 4"):
        _refit(e, {"bias": torch.zeros(5)}, shapes=None)
    assert e.log == []


def test_not_refittable_engine_is_refused():
    e = _engine(refittable=False)
    with pytest.raises(BackendUnavailableError, match="--refittable"):
        _refit(e, {"bias": torch.zeros(4)})
    assert e.log == []


def test_a_value_that_overflows_the_engines_dtype_is_refused_before_any_change():
    e = _engine()
    before = _snapshot(e)
    with pytest.raises(InvalidLoraError, match="not finite as HALF"):
        _refit(e, {"bias": torch.ones(4), "q.weight": torch.full((4, 3), 1e6)})  # beyond fp16's 65504
    assert e.log == [] and _unchanged(e, before)


def test_tensorrt_rejecting_one_weight_leaves_the_engine_unchanged():
    e = _engine(reject="k.weight")
    before = _snapshot(e)
    with pytest.raises(TensorRTCallError, match="rejected the new value of 'k.weight'"):
        _refit(e, {"q.weight": torch.ones(4, 3), "k.weight": torch.ones(4, 3)})
    assert ("refit",) not in e.log and _unchanged(e, before)


def test_a_failed_refit_is_a_named_error():
    e = _engine(fail_refit=True)
    with pytest.raises(RefitFailedError, match="some weights may have been replaced"):
        _refit(e, {"bias": torch.ones(4)})


# ---- values --------------------------------------------------------------------------------------------
def test_dtype_is_converted_to_the_prototype_and_a_b_a_is_exactly_a():
    e = _engine()
    base = _snapshot(e)
    g = torch.Generator().manual_seed(1)
    a = {"q.weight": torch.randn(4, 3, generator=g, dtype=torch.float64), "bias": torch.randn(4, generator=g)}
    b = {"q.weight": torch.randn(4, 3, generator=g), "bias": torch.randn(4, generator=g),
         "k.weight": torch.randn(4, 3, generator=g)}
    # The LoRA manager passes every weight touched since load: after B, A's set includes k.weight at its base.
    a_again = {**a, "k.weight": torch.from_numpy(base["k.weight"])}
    for weights in (a, b, a_again):
        stats = _refit(e, weights)
        assert stats.weights == len(weights) and stats.filled == 0
    assert e.weights["q.weight"].dtype == np.float16  # converted to the engine's (fp16) copy
    np.testing.assert_array_equal(e.weights["q.weight"], a["q.weight"].to(torch.float16).numpy())
    np.testing.assert_array_equal(e.weights["bias"], a["bias"].numpy())
    np.testing.assert_array_equal(e.weights["k.weight"], base["k.weight"])  # no blend of B left
    assert {x[2] for x in e.log if x[0] == "set"} == {"HOST"}  # CPU tensors are handed over as host memory


def test_missing_partners_of_combined_weights_come_from_the_base_values():
    e = _engine(combined={"q.weight": ["k.weight"]})
    base_k = torch.full((4, 3), 0.5)
    asked: list[list[str]] = []

    def base(names):
        asked.append(list(names))
        return {"k.weight": base_k}

    stats = _refit(e, {"q.weight": torch.ones(4, 3)}, base=base)
    assert asked == [["k.weight"]] and stats.filled == 1
    np.testing.assert_array_equal(e.weights["k.weight"], base_k.numpy())
    np.testing.assert_array_equal(e.weights["q.weight"], np.ones((4, 3), np.float16))


def test_missing_partners_without_a_base_value_leave_the_engine_unchanged():
    e = _engine(combined={"q.weight": ["k.weight"]})
    before = _snapshot(e)
    with pytest.raises(TensorRTCallError, match="no base value for 'k.weight'"):
        _refit(e, {"q.weight": torch.ones(4, 3)}, base=lambda names: {})
    with pytest.raises(TensorRTCallError, match="needs 1 more weight"):
        _refit(e, {"q.weight": torch.ones(4, 3)})
    assert ("refit",) not in e.log and _unchanged(e, before)


def test_before_refit_runs_after_every_set_and_before_the_refit():
    e = _engine()
    _refit(e, {"q.weight": torch.ones(4, 3), "bias": torch.ones(4)}, before_refit=lambda: e.log.append(("sync",)))
    assert [x[0] for x in e.log] == ["set", "set", "sync", "refit"]


# ---- executor: calls held back during a refit, graphs dropped after it -----------------------------------
@pytest.fixture()
def ops() -> FakeOps:
    return FakeOps()


@pytest.fixture()
def pool(ops: FakeOps) -> LanePool:
    return LanePool(torch.device("cpu"), ops)


def test_drop_graphs_clears_every_contexts_graph_and_keeps_the_contexts(pool, ops, monkeypatch):
    engine = FakeExecEngine()
    ex = executor(pool, engine)
    for n in (2, 3):
        ex.run({"x": torch.ones(n)}, 0)
    cleared: list[GraphCache] = []
    monkeypatch.setattr(GraphCache, "clear", lambda self: cleared.append(self))
    assert ex.drop_graphs() == 2 and len(cleared) == 2
    assert any(e[1] == "sync" for e in ops.log)  # the lane's stream is idle before its graphs go
    contexts = len(engine.contexts)
    ex.run({"x": torch.ones(2)}, 0)
    assert len(engine.contexts) == contexts  # contexts stay valid across a refit (TensorRT's docs)


def test_exclusive_waits_for_calls_in_flight_and_holds_new_ones(pool):
    ex = executor(pool, FakeExecEngine())
    events: list[str] = []
    with ex._lock:
        ex._inflight += 1  # a call in flight

    def finish():
        time.sleep(0.05)
        events.append("call done")
        with ex._lock:
            ex._inflight -= 1
            ex._lock.notify_all()

    def late_call():
        ex.run({"x": torch.ones(2)}, 0)
        events.append("late call")

    threading.Thread(target=finish).start()
    with ex.exclusive():
        events.append("refit")
        t = threading.Thread(target=late_call)
        t.start()
        time.sleep(0.05)
        events.append("refit done")
    t.join()
    assert events == ["call done", "refit", "refit done", "late call"]
