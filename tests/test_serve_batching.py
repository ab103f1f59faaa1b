"""The batching module both deployments use: chunking, grouping, cancellation, isolation,
and the embedded collector's rules (compatible jobs together, oldest first, drain)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading

import numpy as np
import pytest
from sdxl_export.serve.batching import (
    EmbeddedBatcher,
    ImageJob,
    JobCancelledError,
    SamplingParams,
    plan_chunks,
    run_jobs,
)

P256 = SamplingParams(height=256, width=256, steps=3, guidance_scale=5.0, scheduler="euler", refiner=False,
                      denoising_end=0.8, zero_negative=True)
P320 = SamplingParams(height=192, width=320, steps=3, guidance_scale=5.0, scheduler="euler", refiner=False,
                      denoising_end=0.8, zero_negative=True)


@pytest.mark.parametrize("n, served, cap, expected", [
    (7, [1, 2, 4], 4, [4, 2, 1]),
    (3, [1, 2, 4], 4, [2, 1]),
    (5, [1, 2, 3, 4], 4, [4, 1]),
    (3, [1, 2, 3, 4], 2, [2, 1]),
    (2, [], 8, [1, 1]),          # nothing listed: batch 1 is always served
    (0, [1, 2], 2, []),
])
def test_plan_chunks(n, served, cap, expected):
    assert plan_chunks(n, served, cap) == expected


@pytest.fixture(scope="module")
def pipe(tmp_path_factory, tiny_artifacts):
    from sdxl_export.runtime import SDXLPipeline
    from serve_helpers import serve_artifacts

    with SDXLPipeline.from_artifacts(serve_artifacts(tmp_path_factory, tiny_artifacts), backend="onnxruntime",
                                     device="cpu") as p:
        yield p


def _image(pipe, job: ImageJob) -> np.ndarray:
    p = job.params
    out = pipe(job.prompt, job.negative_prompt, height=p.height, width=p.width, num_inference_steps=p.steps,
               refiner=p.refiner, seed=job.seed)
    return np.asarray(out.images[0], dtype=np.int16)


def test_run_jobs_groups_by_key_keeps_order_and_equals_single_calls(pipe):
    jobs = [ImageJob("a", None, 1, P256), ImageJob("b", None, 2, P320), ImageJob("c", None, 3, P256),
            ImageJob("d", None, 4, P256), ImageJob("e", None, 5, P320)]
    results = run_jobs(pipe, jobs, max_batch=4)
    assert [r.seed for r in results] == [1, 2, 3, 4, 5]
    assert [r.batch_size for r in results] == [3, 2, 3, 3, 2]  # 256: one call of 3; 320: one call of 2
    for job, res in zip(jobs, results):
        assert res.image.size == (job.params.width, job.params.height)
        assert int(np.abs(np.asarray(res.image, dtype=np.int16) - _image(pipe, job)).max()) <= 1


def test_cancelled_jobs_never_run(pipe):
    jobs = [ImageJob("a", None, 1, P256), ImageJob("b", None, 2, P256)]
    jobs[0].cancelled.set()
    results = run_jobs(pipe, jobs, max_batch=4)
    assert isinstance(results[0], JobCancelledError)
    assert results[1].batch_size == 1


class FailsOnPrompt:
    """The real pipeline, except that a call containing ``bad`` raises (the batch-failure path)."""

    def __init__(self, pipe, bad: str):
        self.pipe, self.bad, self.calls = pipe, bad, []

    def __getattr__(self, name):
        return getattr(self.pipe, name)

    def __call__(self, prompts, *args, **kwargs):
        self.calls.append(list(prompts))
        if self.bad in prompts:
            raise RuntimeError("boom")
        return self.pipe(prompts, *args, **kwargs)


def test_a_failing_batch_is_rerun_one_image_at_a_time(pipe):
    flaky = FailsOnPrompt(pipe, "bad")
    jobs = [ImageJob("ok1", None, 1, P256), ImageJob("bad", None, 2, P256), ImageJob("ok2", None, 3, P256)]
    results = run_jobs(flaky, jobs, max_batch=4)
    assert isinstance(results[1], RuntimeError)
    assert results[0].batch_size == 1 and results[2].batch_size == 1
    assert flaky.calls == [["ok1", "bad", "ok2"], ["ok1"], ["bad"], ["ok2"]]


def test_embedded_batcher_collects_compatible_jobs_oldest_first_and_drains():
    seen: list[list[str]] = []
    gate = threading.Event()

    def execute(jobs):
        gate.wait(10)
        seen.append([j.prompt for j in jobs])
        return [j.prompt.upper() for j in jobs]

    async def main():
        with concurrent.futures.ThreadPoolExecutor(1) as worker:
            b = EmbeddedBatcher(execute, worker, max_batch=2, wait_s=0.05)
            b.start()
            futs = [b.submit(ImageJob("a", None, 0, P256)), b.submit(ImageJob("x", None, 0, P320)),
                    b.submit(ImageJob("b", None, 0, P256)), b.submit(ImageJob("c", None, 0, P256))]
            await asyncio.sleep(0.2)
            gate.set()
            await b.drain()
            return [await f for f in futs]

    results = asyncio.run(main())
    assert results == ["A", "X", "B", "C"]
    # a and b share a call (same key, max 2); x (other key, older than c) goes next; then c
    assert seen == [["a", "b"], ["x"], ["c"]]


def test_ray_app_builder_takes_serve_config_fields():
    """``serve run sdxl_export.serve:app key=value ...``: strings become a checked ServeConfig."""
    pytest.importorskip("ray.serve")
    # the builder itself (``serve run`` resolves ``sdxl_export.serve:app`` in a fresh process; here the
    # submodule serve/app.py may already shadow the package attribute)
    from sdxl_export.serve.config import ServeConfigError
    from sdxl_export.serve.ray_app import app

    built = app({"artifacts": "/models/x", "max_batch_size": "2", "api_auth": "u:p", "warmup": "1024x1024",
                 "autoscale": "1:3"})
    deployment = built._bound_deployment
    cfg = built._bound_deployment.init_args[0]
    assert cfg.max_batch_size == 2 and cfg.basic_auth == ("u", "p") and cfg.warmup == ((1024, 1024),)
    assert str(cfg.artifacts) == "/models/x"
    assert deployment._deployment_config.autoscaling_config.max_replicas == 3
    with pytest.raises(ServeConfigError):
        app({"max_queue": "0"})


def test_img2img_jobs_batch_only_with_img2img_jobs_and_equal_single_calls(pipe):
    """Different input images (one per job, each with its own generator) share a call; a
    text-to-image job at the same size does not join it."""
    import dataclasses

    from PIL import Image

    i2i = dataclasses.replace(P256, img2img=True, strength=0.7)
    rng = np.random.default_rng(0)
    imgs = [Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)) for _ in range(3)]
    jobs = [ImageJob("a", None, 1, i2i, image=imgs[0]), ImageJob("b", None, 2, P256),
            ImageJob("c", None, 3, i2i, image=imgs[1]), ImageJob("d", None, 4, i2i, image=imgs[2])]
    results = run_jobs(pipe, jobs, max_batch=4)
    assert [r.batch_size for r in results] == [3, 1, 3, 3]  # one img2img call of 3, the text job alone
    for job, res in zip(jobs, results):
        kw = {"image": job.image, "strength": 0.7} if job.image is not None else {}
        want = pipe(job.prompt, None, height=256, width=256, num_inference_steps=3, refiner=False, seed=job.seed,
                    **kw).images[0]
        assert int(np.abs(np.asarray(res.image, dtype=np.int16) - np.asarray(want, dtype=np.int16)).max()) <= 1
