"""One pipeline called from several threads at once returns what sequential calls return.

The requests differ in everything that is per call (seed, scheduler -- including the
ancestral one that draws noise every step --, size, batch, negative prompt, refiner),
and the pipeline is fresh, so the empty-negative cache is filled while threads race.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from sdxl_export.runtime import SDXLPipeline

REQUESTS = [
    {"prompt": "a cat", "seed": 1, "scheduler": "euler_a", "height": 256, "width": 256},
    {"prompt": ["a dog", "a fox"], "seed": 2, "scheduler": "euler", "height": 192, "width": 320},
    {"prompt": "a ship", "negative_prompt": "", "seed": 3, "scheduler": "dpmpp_2m_karras", "refiner": False},
    {"prompt": "a tree", "seed": 4, "scheduler": "unipc", "height": 320, "width": 192, "guidance_scale": 1.0},
    {"prompt": "a cat", "seed": 5, "scheduler": "euler_a", "num_images_per_prompt": 2},
    {"prompt": "", "seed": 6, "scheduler": "ddim", "height": 128, "width": 512},
]


def _run(pipe: SDXLPipeline, req: dict) -> torch.Tensor:
    kw = dict(req)
    prompt = kw.pop("prompt")
    return pipe(prompt, num_inference_steps=4, output_type="latent", **kw).latents


@pytest.mark.parametrize("threads", [4, pytest.param(6, marks=pytest.mark.slow)])
def test_concurrent_calls_equal_sequential_calls(tiny_artifacts, threads):
    with SDXLPipeline.from_artifacts(tiny_artifacts, backend="onnxruntime", device="cpu") as pipe:
        with ThreadPoolExecutor(max_workers=threads) as pool:
            concurrent = list(pool.map(lambda r: _run(pipe, r), REQUESTS))
        sequential = [_run(pipe, r) for r in REQUESTS]
    for req, a, b in zip(REQUESTS, concurrent, sequential):
        assert a.shape == b.shape
        assert torch.equal(a, b), f"{req}: max diff {(a - b).abs().max():.3e}"
    # and the requests really differ (a mix-up between threads could not go unnoticed)
    assert len({tuple(x.flatten()[:8].tolist()) for x in sequential}) == len(REQUESTS)
