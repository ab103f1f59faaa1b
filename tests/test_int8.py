"""``build --precision int8``: NNCF's hybrid recipe on the tiny preset, calibrated on the pipeline's
own UNet inputs; opt-in at run time; named errors where int8 cannot be built.

The reference for the images is our exact fp32 path (the ONNX Runtime twin, itself held to
diffusers within 1/255 by test_parity_diffusers); the benchmark's gate compares with diffusers.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

pytest.importorskip("openvino")
pytest.importorskip("nncf")

from fixtures import run_cli
from sdxl_export.engines import ov_int8
from sdxl_export.engines.build import BuildOptions, build
from sdxl_export.errors import InvalidRequestError
from sdxl_export.runtime import SDXLPipeline, UNetCalibration
from sdxl_export.runtime.fidelity import psnr

BUCKET = "256x256"
SAMPLES = 10

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def int8_artifacts(tmp_path_factory, tiny_artifacts):
    out = tmp_path_factory.mktemp("tiny-int8") / "artifacts"
    shutil.copytree(tiny_artifacts, out)
    code, stdout, err = run_cli("build", "--precision", "int8", "--out", str(out), "--buckets", BUCKET,
                                "--calibration-samples", str(SAMPLES))
    assert code == 0, err
    return out, stdout


def _ov_table(art):
    return json.loads((art / "engines" / "manifest.json").read_text())["openvino"]["engines"]


def test_build_quantizes_unets_hybrid_and_text_encoders_weights(int8_artifacts):
    art, stdout = int8_artifacts
    table = _ov_table(art)
    assert "int8" in stdout
    for name in ("unet", "refiner_unet"):
        e = table[name]
        assert e["precision"] == "int8" and e["builder"]["int8"] == "hybrid"
        assert e["builder"]["calibration_samples"] == SAMPLES
        rec = e["validation"]["int8"]
        assert rec["recipe"] == "hybrid" and rec["weight_ops_int8"] > 0 and rec["calibration_samples"] >= 1
        check = e["validation"]["int8_check"]
        assert check["passed"] and check["held_out_samples"] >= 1
        assert 0 < check["rel_rms_error_max"] <= ov_int8.INT8_REL_RMS_TOL
        assert ov_int8.ir_is_int8(art / e["file"])
        assert not (art / e["file"]).with_name("fp32").exists()  # the build's fp32 scratch IR is gone
    for name in ("text_encoder", "text_encoder_2"):
        assert table[name]["precision"] == "int8" and table[name]["builder"]["int8"] == "weights"
        assert ov_int8.ir_is_int8(art / table[name]["file"])
    for name in ("vae_decoder", "vae_encoder"):
        assert table[name]["precision"] == "fp32" and not ov_int8.ir_is_int8(art / table[name]["file"])


def test_auto_keeps_the_exact_path_and_openvino_runs_int8(int8_artifacts):
    art, _ = int8_artifacts
    with SDXLPipeline.from_artifacts(art, backend="auto") as exact:
        assert exact.backend == "onnxruntime"
        ref = np.asarray(exact("a lighthouse", seed=3, num_inference_steps=8, output_type="np").images)
    with SDXLPipeline.from_artifacts(art, backend="openvino") as pipe:
        precisions = {n: r.description.get("precision") for n, r in pipe.runners.items()}
        assert precisions["unet"] == "int8" and precisions["refiner_unet"] == "int8"
        got = np.asarray(pipe("a lighthouse", seed=3, num_inference_steps=8, output_type="np").images)
    assert np.all(np.isfinite(got))
    assert not np.array_equal(got, ref)  # it did run the int8 engines
    assert psnr(got, ref) > 25.0  # measured 44 dB at 20 steps


@pytest.mark.slow  # requantizes two UNets (~1 min)
def test_rebuild_is_up_to_date_and_new_sample_count_requantizes_only_the_unets(int8_artifacts, tmp_path):
    art, _ = int8_artifacts
    copy = tmp_path / "artifacts"
    shutil.copytree(art, copy)
    same = build(BuildOptions(out=copy, precision="int8", buckets=BUCKET, calibration_samples=SAMPLES),
                 calibration=UNetCalibration())
    assert same.up_to_date and same.companion is not None and same.companion.up_to_date
    again = build(BuildOptions(out=copy, backend="openvino", precision="int8", buckets=BUCKET,
                               calibration_samples=SAMPLES + 5), calibration=UNetCalibration())
    assert sorted(again.built) == ["refiner_unet", "unet"]
    assert _ov_table(copy)["unet"]["builder"]["calibration_samples"] == SAMPLES + 5


def test_calibration_records_every_noise_level_and_is_deterministic(tiny_artifacts):
    first = UNetCalibration(steps=6)(tiny_artifacts, "unet", 12)
    second = UNetCalibration(steps=6)(tiny_artifacts, "unet", 12)
    assert len(first) == 12
    ts = [float(s["timestep"][0]) for s in first]
    per_image = ts.index(ts[0], 1)  # the next image starts again at the highest noise level
    assert per_image >= 4 and set(ts) == set(ts[:per_image])  # every base noise level is recorded
    assert first[0]["sample"].shape[0] == 2  # the guidance batch, as the pipeline feeds it
    for a, b in zip(first, second):
        assert all(np.array_equal(a[k], b[k]) for k in a)
    refiner = UNetCalibration(steps=6)(tiny_artifacts, "refiner_unet", 12)
    assert refiner and len(refiner) < 12  # the refiner only at its low-noise steps
    assert max(float(s["timestep"][0]) for s in refiner) < min(float(s["timestep"][0]) for s in first[:4])


@pytest.mark.parametrize("backend", ["onnxruntime", "tensorrt"])
def test_int8_on_a_gpu_or_twin_backend_is_a_named_error(tiny_artifacts_copy, backend):
    code, _, err = run_cli("build", "--precision", "int8", "--backend", backend, "--out", str(tiny_artifacts_copy))
    assert code == 2
    assert "int8" in err and "--backend openvino" in err


def test_api_without_calibration_and_too_few_samples_are_named_errors(tiny_artifacts_copy):
    with pytest.raises(ov_int8.Int8CalibrationError) as err:
        build(BuildOptions(out=tiny_artifacts_copy, backend="openvino", precision="int8", buckets=BUCKET))
    assert "UNetCalibration" in err.value.hint
    with pytest.raises(InvalidRequestError):
        BuildOptions(precision="int8", calibration_samples=2)
    assert "--precision int8" in BuildOptions(precision="int8", calibration_samples=50).to_cli()


def test_an_inpainting_unet_without_refiner_calibrates_on_inpainting_calls(tmp_path):
    """A 9-channel UNet only inpaints (txt2img is a named error), so its calibration calls carry an
    image and a mask: the recorded samples have the 9 input channels. The export has no refiner (as
    few-step and inpainting builds often have not): calibration runs base only."""
    from sdxl_export.export import export_model

    out = tmp_path / "inpaint"
    export_model("tiny-inpaint", out, with_refiner=False)
    samples = UNetCalibration(steps=4)(out, "unet", 8)
    assert len(samples) == 8 and all(s["sample"].shape[1] == 9 for s in samples)
    assert np.all(np.isfinite(samples[0]["sample"]))
