"""Batch lanes on CPU: a UNet call's batch split over one-thread sessions run concurrently.

The lanes are a speed choice (benchmarks/step_bench.py); these tests hold them to the
same numbers as one session and to the documented switch-on rules.
"""

from __future__ import annotations

import json

import torch
from sdxl_export.runtime.backends.onnxruntime import OrtRunner, auto_lanes, physical_cores
from sdxl_export.specs import ComponentSpec


def _unet(artifacts):
    manifest = json.loads((artifacts / "manifest.json").read_text())
    entry = manifest["components"]["unet"]
    return ComponentSpec.from_dict(entry["spec"]), artifacts / entry["file"]


def test_lanes_match_one_session(tiny_artifacts):
    spec, path = _unet(tiny_artifacts)
    feeds = {k: torch.from_numpy(v) for k, v in spec.example_inputs(4, 192, 320, seed=3).items()}
    with OrtRunner(spec, path, batch_parallel=1) as one, OrtRunner(spec, path, batch_parallel=2) as two:
        assert one.description["batch_parallel"] == 1
        assert two.description["batch_parallel"] == 2
        a, b = one(feeds)["noise_pred"], two(feeds)["noise_pred"]
        odd = {k: (v[:3] if v.shape[0] == 4 and k != "timestep" else v) for k, v in feeds.items()}
        c = two(odd)["noise_pred"]  # an odd batch falls back to the one session
    assert a.shape == b.shape == (4, 4, 24, 40)
    assert torch.allclose(a, b, atol=1e-5, rtol=0)
    assert torch.allclose(c, a[:3], atol=1e-5, rtol=0)


def test_auto_lanes_only_for_unets(tiny_artifacts):
    manifest = json.loads((tiny_artifacts / "manifest.json").read_text())
    for name, entry in manifest["components"].items():
        spec = ComponentSpec.from_dict(entry["spec"])
        lanes = auto_lanes(spec, tiny_artifacts / entry["file"])
        # tiny's UNets are a few MB: two copies always fit in 1/8 of RAM.
        assert lanes == (2 if spec.kind == "unet" and physical_cores() >= 2 else 1), name
