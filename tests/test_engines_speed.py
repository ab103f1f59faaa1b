"""Each component runs on the backend measured fastest for it at its precision (engines/speed.py):
``build --backend openvino`` beside an ONNX Runtime twin times both per fp32 component, records the
figures and the choice, and the pipeline opens each component where the record says."""

from __future__ import annotations

import json
import shutil

import pytest
from sdxl_export.artifacts import ENGINE_DIR
from sdxl_export.engines.build import BuildOptions, build
from sdxl_export.engines.store import load_engine_store
from sdxl_export.openvino_env import ov_status
from sdxl_export.runtime import SDXLPipeline

pytestmark = pytest.mark.skipif(not ov_status()[0], reason=ov_status()[1])
BUCKETS, BATCHES = "256x256,192x320", (1, 2)  # conftest's OV_BUCKETS/OV_BATCHES: the shared build's


@pytest.fixture(scope="module")
def both(tmp_path_factory, tiny_ov_fp32):
    """The shared OpenVINO fp32 build plus its ONNX Runtime twin; the OpenVINO rebuild after the
    twin exists measures each component on both (nothing else is rebuilt)."""
    out = tmp_path_factory.mktemp("tiny-speed") / "artifacts"
    shutil.copytree(tiny_ov_fp32, out)
    build(BuildOptions(out=out, backend="onnxruntime", buckets=BUCKETS, batch_sizes=BATCHES))
    again = build(BuildOptions(out=out, backend="openvino", buckets=BUCKETS, batch_sizes=BATCHES))
    assert again.up_to_date
    return out


def _manifest(art):
    return json.loads((art / ENGINE_DIR / "manifest.json").read_text())


def test_build_measures_every_fp32_component_against_its_twin(both):
    ov = _manifest(both)["openvino"]["engines"]
    assert set(ov) >= {"unet", "vae_decoder"}
    for name, d in ov.items():
        rec = d["speed"]
        ms = rec["median_ms"]
        assert ms["openvino"] > 0 and ms["onnxruntime"] > 0 and rec["rounds"] >= 3
        faster = "onnxruntime" if ms["onnxruntime"] * rec["margin"] < ms["openvino"] else "openvino"
        assert rec["faster"] == faster
        assert d.get("run_on") == ("onnxruntime" if faster == "onnxruntime" else None), name
    # a rebuild with nothing changed measures nothing again (same engines, same record)
    before = {n: d["speed"]["measured_at"] for n, d in ov.items()}
    build(BuildOptions(out=both, backend="openvino", buckets=BUCKETS, batch_sizes=BATCHES))
    after = {n: d["speed"]["measured_at"] for n, d in _manifest(both)["openvino"]["engines"].items()}
    assert after == before


def test_the_pipeline_opens_each_component_where_the_record_says(both, tmp_path):
    art = tmp_path / "art"
    shutil.copytree(both, art)
    path = art / ENGINE_DIR / "manifest.json"
    m = json.loads(path.read_text())
    for name, d in m["openvino"]["engines"].items():  # decide by hand: the VAE on ORT, the rest on OpenVINO
        d.pop("run_on", None)
        if name == "vae_decoder":
            d["run_on"] = "onnxruntime"
    path.write_text(json.dumps(m))
    store = load_engine_store(art)
    assert store.run_on("vae_decoder", "openvino") == "onnxruntime"
    assert store.run_on("unet", "openvino") == "openvino"
    with SDXLPipeline.from_artifacts(art, backend="openvino") as pipe:
        assert pipe.runners["vae_decoder"].backend == "onnxruntime"
        assert pipe.runners["unet"].backend == "openvino"
        mixed = pipe("a cat", num_inference_steps=3, seed=1, output_type="np").images
    with SDXLPipeline.from_artifacts(art, backend="onnxruntime") as pipe:
        ref = pipe("a cat", num_inference_steps=3, seed=1, output_type="np").images
    assert abs(mixed - ref).max() * 255 <= 1.0  # both fp32: the mix is the exact path


def test_a_record_naming_a_missing_twin_is_ignored(both, tmp_path):
    art = tmp_path / "art"
    shutil.copytree(both, art)
    path = art / ENGINE_DIR / "manifest.json"
    m = json.loads(path.read_text())
    m["openvino"]["engines"]["vae_decoder"]["run_on"] = "onnxruntime"
    del m["engines"]["vae_decoder"]
    path.write_text(json.dumps(m))
    assert load_engine_store(art).run_on("vae_decoder", "openvino") == "openvino"
