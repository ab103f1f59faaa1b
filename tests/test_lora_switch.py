"""LoRA switching under concurrency and failure (issue 18 §2): the gate, a failed TensorRT refit,
the bounded low-rank delta cache, one name resolver, and what the server refuses at start.

The gate and the rollback are exercised on :class:`LoraSwitcher` itself with tiny runners
(the switcher is what is under test; its runners only record what they hold). The refit
runner calls the real :func:`refit_engine` over ``test_trt_refit``'s fake ``tensorrt``.
"""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures import run_cli
from lora_files import diffusers_lora
from sdxl_export.errors import InvalidLoraError
from sdxl_export.lora.files import LoraFile, LowRank, dense, resolve_lora
from sdxl_export.lora.switch import UNKNOWN, LoraSet, LoraSwitcher
from test_trt_refit import Engine, fake_tensorrt  # noqa: F401 - the fixture puts the fake module in place

SETS = {name: LoraSet(((LoraFile(Path(f"{name}.safetensors"), name * 8), 1.0),)) for name in "abc"}
VALUE = {"a": 1.0, "b": 2.0, "c": 3.0}


class HoldingRunner:
    """Holds one weight; records the value each set leaves."""

    weight_keys = "torch"
    backend = "onnxruntime"

    def __init__(self) -> None:
        self.w = torch.zeros(4, 3)

    def set_weights(self, weights):
        self.w = weights["w"].clone()


def _switcher(runner) -> LoraSwitcher:
    sw = LoraSwitcher(artifacts=None, runners={"unet": runner})
    sw._base["unet"]["w"] = torch.zeros(4, 3)
    for name, lset in SETS.items():
        sw._deltas[lset.items[0][0].sha256] = {"unet": {"w": torch.full((4, 3), VALUE[name])}}
    return sw


def test_no_set_switches_between_another_sets_switch_and_its_call():
    """Three threads with three sets: every call must run on its own set's weights. The old gate
    let a third set start switching between a switch and that call's in-flight count."""
    runner = HoldingRunner()
    sw = _switcher(runner)
    wrong: list[tuple[str, float]] = []
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible: the race shows at once

    def worker(name: str) -> None:
        for _ in range(300):
            with sw.session(SETS[name]):
                got = float(runner.w[0, 0])
                if got != VALUE[name]:
                    wrong.append((name, got))

    try:
        threads = [threading.Thread(target=worker, args=(n,)) for n in "abcabc"]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    finally:
        sys.setswitchinterval(old)
    assert not wrong, f"{len(wrong)} calls ran on another set's weights, e.g. {wrong[:3]}"
    assert sw._gate.in_flight == 0 and not sw._gate.switching


class RefitRunner:
    """A TensorRT-like runner: ``set_weights`` is the real ``refit_engine`` on a fake engine."""

    weight_keys = "torch"
    backend = "tensorrt"

    def __init__(self, engine: Engine):
        self.engine = engine

    def set_weights(self, weights):
        from sdxl_export.runtime.backends.tensorrt.refit import refit_engine

        refit_engine(self.engine, dict(weights), logger=None, what="unet (tensorrt)", shapes={"w": (4, 3)})


def test_a_failed_refit_never_leaves_active_naming_a_set_the_engine_lost():
    from sdxl_export.runtime.backends.tensorrt.refit import RefitFailedError

    engine = Engine({"w": np.zeros((4, 3), np.float32)})
    sw = _switcher(RefitRunner(engine))
    with sw.session(SETS["a"]):
        pass
    assert np.all(engine.weights["w"] == 1.0) and sw.active.key == SETS["a"].key
    engine.fail_refit = True  # TensorRT: "if False is returned, a subset of weights may have been refitted"
    with pytest.raises(RefitFailedError), sw.session(SETS["b"]):
        pass
    # the engine holds b's values now (the fake refit wrote them), and the rollback failed too:
    # the switcher must not claim that a is active
    assert sw.active.key != SETS["a"].key and sw.active is UNKNOWN
    engine.fail_refit = False
    with sw.session(SETS["a"]):
        assert np.all(engine.weights["w"] == 1.0)  # a call with a rewrote the weights


def test_a_failed_refit_that_rolls_back_keeps_the_previous_set():
    from sdxl_export.runtime.backends.tensorrt.refit import RefitFailedError

    engine = Engine({"w": np.zeros((4, 3), np.float32)})
    runner = RefitRunner(engine)
    sw = _switcher(runner)
    with sw.session(SETS["a"]):
        pass
    calls = {"n": 0}
    real = runner.set_weights

    def fail_once(weights):
        calls["n"] += 1
        real(weights)
        if calls["n"] == 1:
            raise RefitFailedError("unet (tensorrt): TensorRT's refit failed", "retry")

    runner.set_weights = fail_once
    with pytest.raises(RefitFailedError), sw.session(SETS["b"]):
        pass
    assert sw.active.key == SETS["a"].key and np.all(engine.weights["w"] == 1.0)


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory, tiny_model):
    d = tmp_path_factory.mktemp("loras")
    diffusers_lora(tiny_model, d / "style.safetensors", seed=5)
    diffusers_lora(tiny_model, d / "other.safetensors", seed=8)
    return d


def test_deltas_are_cached_low_rank_and_bounded(tiny_artifacts, lora_dir):
    from sdxl_export.lora.files import lora_deltas
    from sdxl_export.runtime import SDXLPipeline

    with SDXLPipeline.from_artifacts(tiny_artifacts, backend="onnxruntime", device="cpu") as pipe:
        pipe.lora_dir = lora_dir
        sw = pipe.loras
        style = sw.resolve({"style": 1.0})
        deltas = sw._deltas[style.items[0][0].sha256]
        flat = [d for part in deltas.values() for d in part.values()]
        assert any(isinstance(d, LowRank) for d in flat)
        full = sum(dense(d).numel() * 4 for d in flat)
        assert sw.cached_bytes < full / 2, (sw.cached_bytes, full)
        # the factors are peft's delta exactly (fuse_lora's dW)
        ref = lora_deltas(style.items[0][0], sw._model_configs())
        for part, ds in ref.items():
            for name, d in ds.items():
                torch.testing.assert_close(dense(d), dense(deltas[part][name]), rtol=0, atol=1e-6)
        base = np.asarray(pipe("x", num_inference_steps=2, refiner=False, seed=1, loras={"style": 0.8}).images[0])
        sw.max_cached_bytes = 1  # room for one LoRA only
        sw.resolve({"other": 1.0})
        assert len(sw._deltas) == 1
        again = np.asarray(pipe("x", num_inference_steps=2, refiner=False, seed=1, loras={"style": 0.8}).images[0])
        assert np.array_equal(base, again)  # an evicted LoRA is read again, same image


def test_names_resolve_in_the_lora_folder_not_the_working_directory(lora_dir, tmp_path, tiny_model, monkeypatch):
    decoy = tmp_path / "cwd"
    decoy.mkdir()
    diffusers_lora(tiny_model, decoy / "style.safetensors", seed=99)
    monkeypatch.chdir(decoy)
    got = resolve_lora("style.safetensors", lora_dir)
    assert got.path == (lora_dir / "style.safetensors").resolve()
    assert resolve_lora("style", lora_dir).path == got.path
    # a server never takes paths
    for name in (str(decoy / "style.safetensors"), "../cwd/style", "style.safetensors/../x"):
        with pytest.raises(InvalidLoraError):
            resolve_lora(name, lora_dir, allow_paths=False)
    # the CLI and library callers may pass paths
    assert resolve_lora(str(decoy / "style.safetensors"), lora_dir).path == (decoy / "style.safetensors").resolve()
    # the server's admission uses the same rule
    from sdxl_export.serve.common import ParamError
    from sdxl_export.serve.loras import available, check

    assert available(lora_dir) == ["other", "style"]
    assert check({"style": 0.5}, lora_dir) == (("style", 0.5),)
    with pytest.raises(ParamError):
        check({"../cwd/style": 0.5}, lora_dir)


def test_a_deterministic_failure_is_not_retried_image_by_image(tiny_artifacts, lora_dir, tmp_path):
    from sdxl_export.runtime import SDXLPipeline
    from sdxl_export.serve.batching import ImageJob, SamplingParams, run_jobs

    (tmp_path / "broken.safetensors").write_bytes(b"not safetensors at all")
    params = SamplingParams(height=64, width=64, steps=2, guidance_scale=5.0, scheduler="euler", refiner=False,
                            denoising_end=0.8, zero_negative=True, loras=(("broken", 1.0),))

    class Counting:
        def __init__(self, pipe):
            self.pipe, self.calls = pipe, 0

        def __call__(self, *a, **kw):
            self.calls += 1
            return self.pipe(*a, **kw)

        def __getattr__(self, name):
            return getattr(self.pipe, name)

    with SDXLPipeline.from_artifacts(tiny_artifacts, backend="onnxruntime", device="cpu") as pipe:
        pipe.lora_dir = tmp_path
        counting = Counting(pipe)
        results = run_jobs(counting, [ImageJob("x", None, i, params) for i in range(3)], max_batch=4)
    assert all(isinstance(r, InvalidLoraError) for r in results)
    assert counting.calls == 1  # not 1 + 3


def test_lora_dir_on_a_backend_that_cannot_switch_is_refused_at_start(tiny_artifacts, lora_dir):
    code, _, err = run_cli("serve", "--artifacts", str(tiny_artifacts), "--backend", "openvino",
                           "--lora-dir", str(lora_dir), "--port", "1")
    assert code != 0 and "--lora-dir" in err and "openvino" in err, err


def test_service_refuses_lora_dir_on_runners_that_cannot_switch(tiny_artifacts, lora_dir):
    """The loaded pipeline is checked too (e.g. a Ray replica, which has no CLI)."""
    from sdxl_export.serve import ImageService, ServeConfig
    from sdxl_export.serve.config import ServeConfigError

    svc = ImageService(ServeConfig(artifacts=tiny_artifacts, backend="openvino", device="cpu", warmup=(),
                                   lora_dir=lora_dir))
    try:
        with pytest.raises(ServeConfigError, match="cannot switch"):
            svc.load()
    finally:
        svc.close()
    assert not svc.ready and "cannot switch" in (svc.load_error or "")
    assert os.path.isdir(lora_dir)
