"""``sdxl-export build`` on CPU: the ONNX Runtime twin, incremental rebuilds, refusals.

One real export of the ``tiny`` preset is shared by the session; one default build
(``sdxl-export build --fp16`` from a fresh working directory) by this module. Tests that
modify files work on copies.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest_engines import copy_artifacts, file_mtimes, run_cli
from sdxl_export.artifacts import ENGINE_DIR, FORMAT_ENGINES
from sdxl_export.engines import ort_builder
from sdxl_export.engines.store import GpuInfo, load_engine_store
from sdxl_export.errors import CorruptArtifactError, StaleEngineError

VAES = {"vae_decoder", "vae_encoder"}


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_artifacts):
    """``sdxl-export build --fp16`` with no other argument, in a fresh working directory."""
    work = tmp_path_factory.mktemp("fresh-machine")
    copy_artifacts(tiny_artifacts, work / "sdxl-artifacts")  # the export step finds it done
    old = os.getcwd()
    os.chdir(work)
    try:
        rc, out, err = run_cli("build", "--fp16")
    finally:
        os.chdir(old)
    assert rc == 0, err
    return {"root": work / "sdxl-artifacts", "out": out, "err": err}


@pytest.fixture
def copy(built, tmp_path):
    return copy_artifacts(built["root"], tmp_path / "art")


def _manifest(root: Path) -> dict:
    return json.loads((root / ENGINE_DIR / "manifest.json").read_text())


def _actions(stdout: str, section: int = 0) -> dict[str, str]:
    """Per component, what the build did, from the printed table of one ``engines:`` section:
    0 the main engines, 1 the OpenVINO bf16 companion that ``--fp16`` adds on a bf16 CPU."""
    out: dict[str, str] = {}
    seen = -1
    for line in stdout.splitlines():
        if line.startswith("engines: "):
            seen += 1
        parts = line.split()
        if seen == section and line.startswith("  ") and len(parts) > 2:
            out[parts[0]] = parts[1] if parts[1] != "up" else "up to date"
    return out


def _twin_mtimes(engines: Path) -> dict[str, int]:
    """The ONNX Runtime twin's files (the OpenVINO companion under openvino/ has its own tests)."""
    return {k: v for k, v in file_mtimes(engines).items() if not k.startswith("openvino/")}


def _has_ov_bf16() -> bool:
    try:
        from sdxl_export.engines import ov_builder

        return ov_builder.ov_status()[0] and ov_builder.native_bf16()[0]
    except ImportError:
        return False


@pytest.mark.skipif(not _has_ov_bf16(), reason="needs OpenVINO and a CPU with native bf16 (AVX512_BF16/AMX)")
def test_fp16_on_a_bf16_cpu_also_builds_openvino_bf16_engines(built, copy):
    """``build --fp16`` (backend auto, no TensorRT) on a bf16 CPU: the exact fp32 twin and, beside
    it, OpenVINO bf16 engines (VAE fp32), which ``auto`` then runs."""
    root, out = built["root"], built["out"]
    acts = _actions(out, 1)
    assert set(acts) == set(_actions(out)) and set(acts.values()) == {"built"}
    ov = _manifest(root)["openvino"]["engines"]
    for name, e in ov.items():
        assert e["precision"] == ("fp32" if name in VAES else "bf16"), name
        assert e["precision_requested"] == ("fp32" if name in VAES else "fp16"), name
    from sdxl_export.runtime.backends import resolve_backend

    assert resolve_backend("auto", load_engine_store(root)) == "openvino"
    # an explicit backend is only that backend: no companion
    rc, out2, err = run_cli("build", "--out", str(copy), "--backend", "onnxruntime", "--fp16")
    assert rc == 0 and len([x for x in out2.splitlines() if x.startswith("engines: ")]) == 1, err


def test_default_build_makes_the_onnxruntime_twin(built):
    root, err = built["root"], built["err"]
    assert "TensorRT skipped" in err and "Traceback" not in err
    m = _manifest(root)
    assert m["format"] == FORMAT_ENGINES and m["complete"] is True and m["backend"] == "onnxruntime"
    assert m["build_command"] == f"sdxl-export build --fp16 --out {root.resolve()}"
    store = load_engine_store(root)
    assert store is not None
    export = json.loads((root / "manifest.json").read_text())
    # Every exported component has an engine, the VAE encoder (img2img) included.
    assert set(store.entries) == set(export["components"])
    assert (root / "engines" / "vae_encoder").is_dir()
    enc, dec = store.entries["vae_encoder"], store.entries["vae_decoder"]
    assert {(b.height, b.width) for b in enc.buckets} == {(b.height, b.width) for b in dec.buckets}
    for name, e in store.entries.items():
        assert e.backend == "onnxruntime" and e.path.is_file() and e.path.parent.name == name
        assert e.precision == "fp32"  # the CPU twin: fp32, with the request recorded
        assert e.precision_requested == ("fp32" if name in VAES else "fp16")
        assert e.profiles and e.session_options["providers"] == ["CPUExecutionProvider"]
        assert e.spec.to_dict() == export["components"][name]["spec"]
        assert e.validation["parity"]["max_abs_error"]
        assert store.verify(name) is e


def test_twin_runs_every_planned_bucket_shape(built):
    store = load_engine_store(built["root"])
    e = store.entries["unet"]
    sess = ort_builder.open_twin(e.path, e.session_options)
    for b in e.buckets[:: max(1, len(e.buckets) // 4)]:
        feeds = e.spec.example_inputs(2, b.height, b.width)
        (noise,) = sess.run(None, feeds)
        assert noise.shape == (2, 4, b.height // 8, b.width // 8) and np.isfinite(noise).all()


def test_rerun_skips_everything(copy):
    before = file_mtimes(copy / ENGINE_DIR)  # the OpenVINO companion included
    rc, out, err = run_cli("build", "--fp16", "--out", str(copy))
    assert rc == 0, err
    assert set(_actions(out).values()) == {"up to date"}
    assert set(_actions(out, 1).values()) <= {"up to date"}
    assert "all engines up to date" in out
    after = file_mtimes(copy / ENGINE_DIR)
    assert {k: v for k, v in after.items() if k != "manifest.json"} == {
        k: v for k, v in before.items() if k != "manifest.json"}


def test_flag_changes_touch_exactly_what_they_affect(copy):
    engines = copy / ENGINE_DIR
    before = _twin_mtimes(engines)
    # The VAE's precision only changes what is recorded for the fp32 CPU twin: no rebuild.
    rc, out, err = run_cli("build", "--fp16", "--vae-precision", "fp16", "--out", str(copy))
    assert rc == 0, err
    acts = _actions(out)
    assert {n for n, a in acts.items() if a == "updated"} == VAES
    assert {n for n, a in acts.items() if a == "up to date"} == set(acts) - VAES
    assert {k: v for k, v in _twin_mtimes(engines).items() if k != "manifest.json"} == {
        k: v for k, v in before.items() if k != "manifest.json"}
    assert _manifest(copy)["engines"]["vae_decoder"]["precision_requested"] == "fp16"
    # The twin's optimization level changes every twin's bytes: all rebuilt.
    rc, out, err = run_cli("build", "--fp16", "--vae-precision", "fp16", "--ort-optimization", "basic",
                           "--out", str(copy))
    assert rc == 0, err
    assert set(_actions(out).values()) == {"built"}
    assert "builder flags changed: ort_optimization extended -> basic" in out
    store = load_engine_store(copy)
    assert all(e.builder["ort_optimization"] == "basic" for e in store.entries.values())
    assert not any(e.refittable for e in store.entries.values())
    # --refittable is TensorRT's: the twin switches weights by new sessions, so it is recorded only.
    before = _twin_mtimes(engines)
    rc, out, err = run_cli("build", "--fp16", "--vae-precision", "fp16", "--ort-optimization", "basic",
                           "--refittable", "--out", str(copy))
    assert rc == 0, err
    assert set(_actions(out).values()) == {"updated"}
    assert {k: v for k, v in _twin_mtimes(engines).items() if k != "manifest.json"} == {
        k: v for k, v in before.items() if k != "manifest.json"}
    assert all(e.refittable for e in load_engine_store(copy).entries.values())
    assert "--refittable" in _manifest(copy)["build_command"]


def test_corrupt_engine_file_is_refused_and_rebuilt_alone(copy):
    data = copy / ENGINE_DIR / "unet" / "model.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[100] ^= 0xFF
    data.write_bytes(bytes(raw))
    rc, out, err = run_cli("verify-engines", "--out", str(copy))
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sdxl-export: error: ")
    assert "does not match its manifest hash" in err
    assert f"Fix: run `sdxl-export build --fp16 --out {copy.resolve()}`" in err
    with pytest.raises(CorruptArtifactError):
        load_engine_store(copy).verify("unet")
    rc, out, err = run_cli("build", "--fp16", "--out", str(copy))
    assert rc == 0, err
    acts = _actions(out)
    assert acts.pop("unet") == "built" and set(acts.values()) == {"up to date"}
    assert run_cli("verify-engines", "--out", str(copy))[0] == 0


def test_corrupt_manifest_is_refused_then_rebuilt(copy):
    path = copy / ENGINE_DIR / "manifest.json"
    path.write_text(path.read_text()[:200])
    rc, out, err = run_cli("verify-engines", "--out", str(copy))
    assert rc == 2 and err.startswith("sdxl-export: error: ") and len(err.strip().splitlines()) == 1
    assert "not valid JSON" in err and "sdxl-export build" in err
    with pytest.raises(CorruptArtifactError):
        load_engine_store(copy)
    rc, out, err = run_cli("build", "--fp16", "--out", str(copy))
    assert rc == 0 and "engine manifest unusable" in err
    assert set(_actions(out).values()) == {"built"}


def _claim_tensorrt(root: Path, component: str, **builder) -> None:
    m = _manifest(root)
    e = m["engines"][component]
    e["backend"] = "tensorrt"
    e["target"] = {"tensorrt": "10.0.1", "gpu": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}
    e["builder"] = {"hardware_compatibility": "none", "version_compatible": False, **builder}
    (root / ENGINE_DIR / "manifest.json").write_text(json.dumps(m))


def test_engine_for_another_gpu_or_tensorrt_is_refused(copy):
    _claim_tensorrt(copy, "unet")
    rc, _out, err = run_cli("verify-engines", "--out", str(copy))
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert "TensorRT 10.0.1 plan for NVIDIA H100 80GB HBM3" in err and "TensorRT is not usable here" in err
    assert "Fix: run `sdxl-export build --fp16 --out" in err
    store = load_engine_store(copy)
    h100 = GpuInfo("NVIDIA H100 80GB HBM3", "9.0")
    with pytest.raises(StaleEngineError, match="built with TensorRT 10.0.1, this machine has TensorRT 10.3.0"):
        store.verify("unet", gpu=h100, trt_version="10.3.0")
    with pytest.raises(StaleEngineError, match="this GPU is NVIDIA A100"):
        store.verify("unet", gpu=GpuInfo("NVIDIA A100-SXM4-80GB", "8.0"), trt_version="10.0.1")
    with pytest.raises(StaleEngineError, match="this GPU is NVIDIA H200"):
        store.verify("unet", gpu=GpuInfo("NVIDIA H200", "9.0"), trt_version="10.0.1")
    assert store.verify("unet", gpu=h100, trt_version="10.0.1").component == "unet"


def test_compatibility_options_widen_what_is_accepted(copy):
    _claim_tensorrt(copy, "unet", hardware_compatibility="ampere_plus", version_compatible=True)
    _claim_tensorrt(copy, "vae_decoder", hardware_compatibility="same_compute_capability")
    store = load_engine_store(copy)
    a100 = GpuInfo("NVIDIA A100-SXM4-80GB", "8.0")
    assert store.verify("unet", gpu=a100, trt_version="10.3.0")
    with pytest.raises(StaleEngineError, match="this GPU is Tesla T4"):
        store.verify("unet", gpu=GpuInfo("Tesla T4", "7.5"), trt_version="10.3.0")
    with pytest.raises(StaleEngineError, match="TensorRT 10.0.1"):
        store.verify("unet", gpu=a100, trt_version="9.9.0")
    assert store.verify("vae_decoder", gpu=GpuInfo("NVIDIA H200", "9.0"), trt_version="10.0.1")
    with pytest.raises(StaleEngineError):
        store.verify("vae_decoder", gpu=a100, trt_version="10.0.1")


def test_twin_for_another_onnxruntime_or_reexported_onnx_is_stale(copy):
    m = _manifest(copy)
    m["engines"]["text_encoder"]["target"]["onnxruntime"] = "1.0.0"
    (copy / ENGINE_DIR / "manifest.json").write_text(json.dumps(m))
    export_path = copy / "manifest.json"
    export = json.loads(export_path.read_text())
    first = next(iter(export["components"]["unet"]["files"]))
    export["components"]["unet"]["files"][first] = "0" * 64  # as if unet was re-exported
    export_path.write_text(json.dumps(export))
    store = load_engine_store(copy)
    with pytest.raises(StaleEngineError, match="optimized for"):
        store.verify("text_encoder")
    with pytest.raises(StaleEngineError, match="different ONNX export"):
        store.verify("unet")
    assert store.verify("vae_decoder")


def test_backend_tensorrt_without_tensorrt_is_a_named_error(tmp_path):
    rc, _out, err = run_cli("build", "--backend", "tensorrt", "--out", str(tmp_path / "x"))
    assert rc == 2 and "Traceback" not in err
    assert err.startswith("sdxl-export: error: --backend tensorrt, but TensorRT cannot build here")
    assert not (tmp_path / "x").exists()  # refused before any work


def test_no_engines_folder_means_no_store(tmp_path, built):
    assert load_engine_store(tmp_path) is None
    shutil.copy(built["root"] / "manifest.json", tmp_path / "manifest.json")
    assert load_engine_store(tmp_path) is None


def test_a_second_build_of_the_same_folder_is_refused_while_one_runs(copy):
    """Two builds of one folder would race on its engine manifest: the second stops at once."""
    import fcntl

    fd = os.open(copy / ENGINE_DIR, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # what a running build holds
        before = file_mtimes(copy / ENGINE_DIR)
        rc, _out, err = run_cli("build", "--fp16", "--out", str(copy))
        assert rc == 2
        assert "another sdxl-export build is writing to" in err and "Traceback" not in err
        assert file_mtimes(copy / ENGINE_DIR) == before
    finally:
        os.close(fd)
    rc, _out, err = run_cli("build", "--fp16", "--out", str(copy))  # the lock died with its holder
    assert rc == 0, err


def test_no_refiner_rebuild_removes_exactly_the_refiner(copy):
    before = _twin_mtimes(copy / ENGINE_DIR)
    rc, out, err = run_cli("build", "--fp16", "--no-refiner", "--out", str(copy))
    assert rc == 0, err
    actions = _actions(out)
    assert actions.pop("refiner_unet") == "removed"
    assert set(actions.values()) == {"up to date"}
    assert not (copy / ENGINE_DIR / "refiner_unet").exists()
    assert not (copy / "onnx" / "refiner_unet").exists()
    assert "refiner_unet" not in _manifest(copy)["engines"]
    after = _twin_mtimes(copy / ENGINE_DIR)
    kept = {k: v for k, v in before.items() if k != "manifest.json" and not k.startswith("refiner_unet")}
    assert {k: v for k, v in after.items() if k in kept} == kept
    store = load_engine_store(copy)
    assert store is not None and set(store.entries) == {"text_encoder", "text_encoder_2", "unet", "vae_decoder",
                                                          "vae_encoder"}
