"""Shared fixtures: the embedded tiny model and its export, built once per test session.

Exporting the tiny preset takes ~15 s on 2 cores; every test that only reads artifacts
shares one export (``tiny_artifacts``). Tests that modify an artifact folder copy it
first (``tiny_artifacts_copy``).
"""

from __future__ import annotations

import logging
import os
import shutil
import warnings
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
warnings.filterwarnings("ignore")


@pytest.fixture(scope="session")
def tiny_model():
    """The embedded tiny SDXL (base + refiner), seeded weights. Treat as read-only."""
    from sdxl_export.models import build_preset

    return build_preset("tiny")


@pytest.fixture(scope="session")
def tiny_artifacts(tmp_path_factory, tiny_model) -> Path:
    """An export of the tiny model (all six components, validated). Read-only."""
    from sdxl_export.export import export_model

    out = tmp_path_factory.mktemp("tiny-artifacts") / "artifacts"
    export_model(tiny_model, out)
    return out


@pytest.fixture()
def tiny_artifacts_copy(tiny_artifacts, tmp_path) -> Path:
    """A private copy of the tiny export that a test may modify or corrupt."""
    dst = tmp_path / "artifacts"
    shutil.copytree(tiny_artifacts, dst)
    return dst


#: The OpenVINO fp32 build the OpenVINO modules share (buckets, batch sizes).
OV_BUCKETS, OV_BATCHES = "256x256,192x320", (1, 2)


@pytest.fixture(scope="session")
def tiny_ov_fp32(tmp_path_factory, tiny_artifacts) -> Path:
    """The tiny export with OpenVINO fp32 engines only (``build --backend openvino`` over
    :data:`OV_BUCKETS`, batch 1 and 2), built once per session. Read-only: copy it to change it."""
    from sdxl_export.openvino_env import ov_status

    ok, why = ov_status()
    if not ok:
        pytest.skip(why)
    from sdxl_export.engines.build import BuildOptions, build

    out = tmp_path_factory.mktemp("tiny-ov-fp32") / "artifacts"
    shutil.copytree(tiny_artifacts, out)
    build(BuildOptions(out=out, backend="openvino", buckets=OV_BUCKETS, batch_sizes=OV_BATCHES))
    return out


@pytest.fixture(scope="module")
def one_torch_thread():
    """The diffusers reference runs PyTorch on the CPU: one intra-op thread keeps it fast on a loaded
    2-core machine. Parity modules use it with ``pytestmark = pytest.mark.usefixtures(...)``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_ort_pipe(tiny_artifacts):
    """An ONNX Runtime CPU pipeline over the tiny export, one per test module."""
    from sdxl_export.runtime import SDXLPipeline

    with SDXLPipeline.from_artifacts(tiny_artifacts, backend="onnxruntime", device="cpu") as p:
        yield p


@pytest.fixture(autouse=True)
def _quiet_third_party_logs():
    for name in ("transformers", "diffusers", "torch.onnx"):
        logging.getLogger(name).setLevel(logging.ERROR)
    yield


def pytest_collection_modifyitems(config, items):
    """``gpu``/``trt`` tests skip with the reason on a machine without them (``-m gpu`` / ``-m trt``
    then report what is missing instead of erroring deep inside a build)."""
    marked = [i for i in items if "gpu" in i.keywords or "trt" in i.keywords]
    if not marked:
        return
    import torch
    from sdxl_export.tensorrt_env import trt_status

    no_gpu = None if torch.cuda.is_available() else "needs a CUDA GPU (torch.cuda.is_available() is False)"
    trt_ok, trt_why = trt_status()
    no_trt = None if trt_ok else f"needs TensorRT: {trt_why}"
    for item in marked:
        reason = (no_trt if "trt" in item.keywords else None) or (no_gpu if "gpu" in item.keywords else None)
        if reason:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="module")
def server(artifacts, tmp_path_factory):
    """One server process over the requesting module's ``artifacts`` fixture (tiny model, 127.0.0.1),
    stopped at the end of the module, which must exit 0. Modules needing other flags define their own."""
    from serve_helpers import ServerProcess

    srv = ServerProcess(artifacts, "--batch-wait-ms", "30", "--model-name", "sdxl-tiny",
                        log_path=tmp_path_factory.mktemp("logs") / "server.log")
    yield srv
    assert srv.stop() == 0, srv.log()


@pytest.fixture(scope="module")
def pipe(artifacts):
    """The runtime (ONNX Runtime, CPU) over the module's ``artifacts``: the oracle of a server test."""
    from sdxl_export.runtime import SDXLPipeline

    with SDXLPipeline.from_artifacts(artifacts, backend="onnxruntime", device="cpu") as p:
        yield p
