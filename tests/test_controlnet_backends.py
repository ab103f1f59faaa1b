"""ControlNet on built engines and the other backends: the ONNX Runtime twin (incremental build,
fixed profiles per bucket, diffusers parity), the torch backend (equal to ONNX Runtime), OpenVINO
(slow: builds every component)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from controlnet_util import control_map, controlnet_artifacts, controlnet_sources
from fixtures import ort_twin_artifacts
from sdxl_export.errors import UnsupportedShapeError
from sdxl_export.runtime import SDXLPipeline
from test_parity_diffusers import LATENT_TOL, PIXEL_TOL

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def cn_artifacts(tmp_path_factory, tiny_artifacts, tiny_model):
    return controlnet_artifacts(tmp_path_factory, tiny_artifacts, tiny_model)


@pytest.fixture(scope="module")
def twin_with_controlnet(tmp_path_factory, tiny_artifacts):
    """The tiny ORT twin (buckets 256x256, 192x320, batch 1) plus one ControlNet, built incrementally."""
    from sdxl_export.engines.build import BuildOptions, build

    src = ort_twin_artifacts(tmp_path_factory, tiny_artifacts)
    out = tmp_path_factory.mktemp("twin-cn") / "artifacts"
    shutil.copytree(src, out)
    a, _ = controlnet_sources(tmp_path_factory)
    report = build(BuildOptions(out=out, backend="onnxruntime", buckets="256x256,192x320", batch_sizes=(1,),
                                controlnets=(str(a),), validate=False))
    return out, report


def test_adding_a_controlnet_builds_only_what_it_needs(twin_with_controlnet):
    _, report = twin_with_controlnet
    actions = {r.component: r.action for r in report.results}
    assert {n for n, a in actions.items() if a != "up to date"} == {"unet_controlnet", "controlnet_cn-a"}
    assert actions["unet"] == "up to date"


def test_twin_engines_serve_controlnet_like_diffusers(twin_with_controlnet, tiny_model):
    from test_controlnet import CASES, Reference, _ours

    art, _ = twin_with_controlnet
    with SDXLPipeline.from_artifacts(art, backend="onnxruntime", device="cpu") as pipe:
        for name in ("unet_controlnet", "controlnet_cn-a"):
            entry = pipe.runners[name].engine_entry
            assert entry is not None and {(b.height, b.width) for b in entry.buckets} == {(256, 256), (192, 320)}
        c = CASES["one"]
        ref_latents, ref_images = Reference(tiny_model)(c)
        ours = _ours(pipe, c)
        assert float((ours.latents - ref_latents).abs().max()) <= LATENT_TOL
        assert float(np.abs(ours.images - ref_images).max()) <= PIXEL_TOL
        with pytest.raises(UnsupportedShapeError):  # a size no profile serves: refused before any work
            pipe.check_call("x", control_image=control_map(320, 320), refiner=False)
        assert pipe.serves(1, 192, 320)


@pytest.mark.slow
def test_torch_backend_equals_onnxruntime_with_two_controlnets(cn_artifacts):
    kw = dict(control_image=[control_map(128, 128, 1), control_map(128, 128, 2)], controlnet=["cn-a", "cn-b"],  # noqa: C408 - keyword arguments of a call
              controlnet_conditioning_scale=[0.8, 0.5], control_guidance_end=[1.0, 0.6], guess_mode=True,
              num_inference_steps=3, refiner=False, seed=3, output_type="np")
    imgs = {}
    for backend in ("torch", "onnxruntime"):
        with SDXLPipeline.from_artifacts(cn_artifacts, backend=backend, device="cpu", load_refiner=False) as p:
            imgs[backend] = p("a road", **kw).images
    assert float(np.abs(imgs["torch"] - imgs["onnxruntime"]).max()) <= PIXEL_TOL


@pytest.mark.slow
def test_openvino_builds_and_runs_controlnet(tmp_path_factory, cn_artifacts):
    from sdxl_export.engines.build import BuildOptions, build

    out = tmp_path_factory.mktemp("ov-cn") / "artifacts"
    shutil.copytree(cn_artifacts, out)
    a, b = controlnet_sources(tmp_path_factory)
    build(BuildOptions(out=out, backend="openvino", buckets="256x256", batch_sizes=(1,),
                       controlnets=(str(a), str(b)), validate=False))
    kw = dict(control_image=control_map(256, 256, 5), controlnet="cn-b", num_inference_steps=3, refiner=False,  # noqa: C408 - keyword arguments of a call
              seed=1, output_type="np")
    imgs = {}
    for backend in ("openvino", "onnxruntime"):
        with SDXLPipeline.from_artifacts(out, backend=backend, device="cpu", load_refiner=False) as p:
            imgs[backend] = p("a road", **kw).images
    assert float(np.abs(imgs["openvino"] - imgs["onnxruntime"]).max()) <= PIXEL_TOL
