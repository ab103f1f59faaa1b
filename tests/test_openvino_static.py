"""OpenVINO static shapes: a model compiled per input shape (the 1.18x lever), numerically the
dynamic model's, bounded, compiled once per shape under concurrency, and switchable off."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from sdxl_export.openvino_env import ov_status
from sdxl_export.runtime.artifact_reader import read_artifacts
from sdxl_export.runtime.backends import ComponentContext, create_runner

pytestmark = pytest.mark.skipif(not ov_status()[0], reason=ov_status()[1])


def _runner(art, name, **options):
    arts = read_artifacts(art)
    ctx = ComponentContext(artifacts=arts.root, name=name, spec=arts.specs[name], export_entry=arts.component(name),
                           device="cpu", options=options)
    return create_runner("openvino", ctx).open()


def _feeds(spec, batch, h, w, seed):
    return {k: torch.from_numpy(v) for k, v in spec.example_inputs(batch, h, w, seed=seed).items()}


def test_static_equals_dynamic_and_compiles_once_per_shape(tiny_artifacts):
    static = _runner(tiny_artifacts, "vae_decoder", static_shapes=True)
    dynamic = _runner(tiny_artifacts, "vae_decoder")  # fp32: dynamic unless asked
    try:
        assert static.static_limit >= 2 and dynamic.static_limit == 0
        for seed, (b, h, w) in enumerate([(1, 64, 64), (2, 64, 96), (1, 64, 64)]):
            feeds = _feeds(static.spec, b, h, w, seed)
            a, d = static(feeds)["images"], dynamic(feeds)["images"]
            np.testing.assert_allclose(a.numpy(), d.numpy(), rtol=1e-4, atol=1e-4)
        assert static.static_compiles == 2  # the third call reused the first shape's model
        assert static.description["static_shapes"]["compiled"] == 2
        assert dynamic.description["static_shapes"]["compiled"] == 0
    finally:
        static.close()
        dynamic.close()


def test_static_models_are_a_bounded_lru(tiny_artifacts):
    r = _runner(tiny_artifacts, "vae_decoder", static_shapes=True, max_static_models=1)
    try:
        for h, w in [(64, 64), (64, 96), (64, 64)]:
            r(_feeds(r.spec, 1, h, w, 0))
        assert r.static_compiles == 3  # one slot: the first shape was evicted and compiled again
        assert len(r._static) == 1
    finally:
        r.close()


def test_concurrent_first_calls_at_one_shape_compile_it_once(tiny_artifacts):
    r = _runner(tiny_artifacts, "vae_decoder", static_shapes=True)
    feeds = _feeds(r.spec, 1, 64, 64, 3)
    outs, errors = [], []

    def call():
        try:
            outs.append(r(feeds)["images"].numpy())
        except Exception as exc:  # noqa: BLE001 -- reported below
            errors.append(exc)

    try:
        threads = [threading.Thread(target=call) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors and len(outs) == 4
        assert r.static_compiles == 1
        for o in outs[1:]:
            np.testing.assert_array_equal(o, outs[0])
    finally:
        r.close()
