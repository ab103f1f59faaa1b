"""The CUDA-graph cache: keying, LRU eviction and eager mode on CPU; capture/replay on a GPU."""

from __future__ import annotations

import threading

import pytest
import torch
from sdxl_export.errors import InvalidRequestError
from sdxl_export.runtime.backends.cuda.graphs import GraphCache, GraphCaptureError, LRUCache, shape_signature

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def affine(feeds):
    """A small capturable computation: out = tanh(x @ w) + b."""
    return {"out": torch.tanh(feeds["x"] @ feeds["w"]) + feeds["b"]}


# ---- keying ---------------------------------------------------------------------------------
def test_key_ignores_values_and_order():
    a = {"x": torch.zeros(2, 3), "t": torch.zeros(1)}
    b = {"t": torch.ones(1), "x": torch.randn(2, 3)}
    assert shape_signature(a) == shape_signature(b)
    assert shape_signature(a) == (("t", (1,), "float32", "cpu"), ("x", (2, 3), "float32", "cpu"))


@pytest.mark.parametrize(
    "other",
    [
        {"x": torch.zeros(2, 4), "t": torch.zeros(1)},  # shape
        {"x": torch.zeros(2, 3, dtype=torch.float16), "t": torch.zeros(1)},  # dtype
        {"y": torch.zeros(2, 3), "t": torch.zeros(1)},  # name
        {"x": torch.zeros(2, 3)},  # one input fewer
    ],
)
def test_key_separates_shape_dtype_and_names(other):
    assert shape_signature({"x": torch.zeros(2, 3), "t": torch.zeros(1)}) != shape_signature(other)


# ---- LRU eviction -----------------------------------------------------------------------------
def test_lru_evicts_least_recently_used_and_releases_it():
    released: list[tuple[str, int]] = []
    cache: LRUCache[str, int] = LRUCache(2, on_evict=lambda k, v: released.append((k, v)))
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.get("a") == 1  # a is now the most recently used
    cache.put("c", 3)  # evicts b, not a
    assert released == [("b", 2)]
    assert cache.keys() == ["a", "c"] and "b" not in cache and len(cache) == 2
    assert cache.get("b") is None
    assert cache.evictions == 1
    cache.put("a", 10)  # replacing releases the old value
    assert released[-1] == ("a", 1) and cache.keys() == ["c", "a"]
    assert cache.pop("c") == 3 and released[-1] == ("c", 3)
    cache.clear()
    assert released[-1] == ("a", 10) and len(cache) == 0
    assert cache.evictions == 1  # pop/clear/replace are not evictions


def test_lru_needs_room_for_one():
    with pytest.raises(InvalidRequestError, match="at least 1"):
        LRUCache(0)
    with pytest.raises(InvalidRequestError, match="max_graphs"):
        GraphCache(max_graphs=0)


# ---- disabled / CPU ---------------------------------------------------------------------------
def test_disabled_cache_runs_eagerly_every_time():
    cache = GraphCache(enabled=False)
    feeds = {"x": torch.randn(4, 3), "w": torch.randn(3, 5), "b": torch.randn(5)}
    out = cache.run(feeds, affine)
    torch.testing.assert_close(out["out"], affine(feeds)["out"], rtol=0, atol=0)
    feeds["x"] = torch.randn(4, 3)
    out2 = cache.run(feeds, affine)  # new values, no stale replay
    torch.testing.assert_close(out2["out"], affine(feeds)["out"], rtol=0, atol=0)
    assert cache.stats.as_dict() == {"captures": 0, "replays": 0, "evictions": 0, "eager_calls": 2}
    assert len(cache) == 0 and cache.keys() == []


def test_enabled_cache_refuses_cpu_tensors_by_name():
    cache = GraphCache(name="unet(torch)")
    with pytest.raises(InvalidRequestError, match=r"unet\(torch\).*CUDA tensors.*'x'") as info:
        cache.run({"x": torch.randn(2, 2), "w": torch.randn(2, 2), "b": torch.randn(2)}, affine)
    assert "cuda_graphs=False" in info.value.hint
    assert len(cache) == 0 and cache.stats.captures == 0


# ---- real CUDA graphs -------------------------------------------------------------------------
def cuda_feeds(n: int = 8, seed: int = 0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    return {k: v.cuda() for k, v in
            {"x": torch.randn(n, 16, generator=g), "w": torch.randn(16, 32, generator=g),
             "b": torch.randn(32, generator=g)}.items()}


@pytest.mark.gpu
@needs_cuda
def test_capture_replay_matches_eager_and_follows_new_values():
    cache = GraphCache(name="affine")
    f1 = cuda_feeds(seed=1)
    out1 = cache.run(f1, affine)
    torch.testing.assert_close(out1["out"], affine(f1)["out"])
    assert cache.stats.captures == 1 and cache.stats.replays == 1
    f2 = cuda_feeds(seed=2)
    out2 = cache.run(f2, affine)
    assert cache.stats.captures == 1 and cache.stats.replays == 2  # replayed, not recaptured
    torch.testing.assert_close(out2["out"], affine(f2)["out"])
    assert not torch.allclose(out1["out"], out2["out"])  # the clone of call 1 was not overwritten
    torch.testing.assert_close(out1["out"], affine(f1)["out"])


@pytest.mark.gpu
@needs_cuda
def test_two_shapes_two_graphs_and_eviction():
    cache = GraphCache(name="affine", max_graphs=2)
    small, big, bigger = cuda_feeds(4), cuda_feeds(8), cuda_feeds(16)
    cache.run(small, affine)
    cache.run(big, affine)
    assert len(cache) == 2 and cache.stats.captures == 2
    cache.run(small, affine)  # replay; small is now most recent
    assert cache.stats.captures == 2
    out = cache.run(bigger, affine)  # evicts big
    torch.testing.assert_close(out["out"], affine(bigger)["out"])
    assert cache.stats.evictions == 1 and big not in cache and small in cache and bigger in cache
    out = cache.run(big, affine)  # captured again, still correct
    torch.testing.assert_close(out["out"], affine(big)["out"])
    assert cache.stats.captures == 4
    cache.clear()
    assert len(cache) == 0


@pytest.mark.gpu
@needs_cuda
def test_views_mode_returns_the_static_outputs():
    cache = GraphCache(clone_outputs=False)
    f1, f2 = cuda_feeds(seed=1), cuda_feeds(seed=2)
    out1 = cache.run(f1, affine)["out"]
    expected1 = out1.clone()
    out2 = cache.run(f2, affine)["out"]
    assert out1.data_ptr() == out2.data_ptr()  # the same static buffer, overwritten by replay
    torch.testing.assert_close(out2, affine(f2)["out"])
    assert not torch.allclose(out2, expected1)


@pytest.mark.gpu
@needs_cuda
def test_concurrent_callers_get_their_own_results():
    cache = GraphCache(name="affine")
    feeds = [cuda_feeds(seed=s) for s in range(8)]
    expected = [affine(f)["out"] for f in feeds]
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            for _ in range(20):
                got = cache.run(feeds[i], affine)["out"]
                torch.cuda.current_stream().synchronize()
                torch.testing.assert_close(got, expected[i])
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(feeds))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]
    assert cache.stats.captures == 1 and cache.stats.replays == 160


@pytest.mark.gpu
@needs_cuda
def test_uncapturable_fn_is_a_named_error():
    def syncs(feeds):
        if feeds["x"].sum().item() > 1e9:  # host sync: illegal while capturing
            return {"out": feeds["x"] * 2}
        return {"out": feeds["x"] + 1}

    strict = GraphCache(name="bad", fallback=False)
    with pytest.raises(GraphCaptureError, match="could not capture") as info:
        strict.run({"x": torch.randn(4, device="cuda")}, syncs)
    assert "cuda_graphs=False" in info.value.hint
    assert len(strict) == 0
    torch.cuda.synchronize()  # the device is still usable
    assert strict.run({"x": torch.ones(2, device="cuda")}, affine_free)["out"].tolist() == [2.0, 2.0]

    cache = GraphCache(name="bad")  # default: that shape falls back to eager, correctly, from then on
    x = torch.randn(4, device="cuda")
    for _ in range(2):
        torch.testing.assert_close(cache.run({"x": x}, syncs)["out"], x + 1)
    assert len(cache) == 0 and cache.stats.eager_calls == 2


@pytest.mark.gpu
@needs_cuda
def test_callers_on_different_streams_never_overwrite_a_pending_replay():
    """A then B on two streams: B's refill of the static inputs waits for A's replay and clone."""
    cache = GraphCache(name="affine")
    fa, fb = cuda_feeds(256, seed=1), cuda_feeds(256, seed=2)
    cache.run(fa, affine)  # capture
    sa, sb = torch.cuda.Stream(), torch.cuda.Stream()
    for _ in range(20):
        with torch.cuda.stream(sa):
            torch.cuda._sleep(1_000_000)  # A's stream is busy: its replay runs late
            out_a = cache.run(fa, affine)["out"]
        with torch.cuda.stream(sb):
            out_b = cache.run(fb, affine)["out"]
        torch.cuda.synchronize()
        torch.testing.assert_close(out_a, affine(fa)["out"])
        torch.testing.assert_close(out_b, affine(fb)["out"])


def affine_free(feeds):
    return {"out": feeds["x"] * 2}
