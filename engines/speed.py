"""Which backend each component runs fastest on, measured at build time on this machine.

Why: the OpenVINO engines win where OpenVINO computes in bf16, but at fp32 its CPU kernels are not
faster on every graph (measured: the VAE decode 225 ms under OpenVINO vs 128 ms under the ONNX
Runtime twin on the same export). So when ``build --backend openvino`` leaves an fp32 OpenVINO
engine beside an ONNX Runtime twin of the same export, it times one call of each at the
component's check shape (interleaved, median of a few rounds, after a warm-up call each) and
records the faster (``EngineEntry.run_on`` / ``speed``); the runtime then opens that component on
that backend (:meth:`EngineStore.run_on`). Reduced-precision engines are never compared with the
fp32 twin: their precision was asked for, and the image-level fidelity gate covers them. The
record is a measurement on the build machine, not a rule: rebuild on the machine that serves.
"""

from __future__ import annotations

import logging
import statistics
import time
from pathlib import Path
from typing import Any

from ..openvino_env import compile_config
from ..specs import ComponentSpec

log = logging.getLogger(__name__)

#: measured rounds (each: one OpenVINO call, one ONNX Runtime call, alternating who goes first)
ROUNDS = 3
#: ONNX Runtime must be at least this much faster to take a component from OpenVINO (noise margin)
MARGIN = 1.05


def compare(spec: ComponentSpec, ov_xml: Path, ov_precision: str, ov_cache: Path | None, twin: Path,
            twin_options: dict[str, Any], shape: tuple[int, int, int], rounds: int = ROUNDS) -> dict[str, Any]:
    """Median ms per call of the OpenVINO engine and the ONNX Runtime twin on the same inputs."""
    import openvino as ov

    from .ort_builder import open_twin

    feeds = spec.example_inputs(*shape, seed=2)
    compiled = ov.Core().compile_model(str(ov_xml), "CPU", compile_config(ov_precision, ov_cache))
    request = compiled.create_infer_request()
    session = open_twin(twin, twin_options)

    def run_ov() -> None:
        request.infer(feeds)

    def run_ort() -> None:
        session.run(None, feeds)

    run_ov()
    run_ort()
    times: dict[str, list[float]] = {"openvino": [], "onnxruntime": []}
    for i in range(rounds):
        order = [("openvino", run_ov), ("onnxruntime", run_ort)]
        for name, fn in order if i % 2 == 0 else order[::-1]:
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    ms = {k: round(statistics.median(v) * 1e3, 2) for k, v in times.items()}
    faster = "onnxruntime" if ms["onnxruntime"] * MARGIN < ms["openvino"] else "openvino"
    return {"shape": {"batch": shape[0], "height": shape[1], "width": shape[2]}, "rounds": rounds,
            "median_ms": ms, "faster": faster, "margin": MARGIN,
            "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def speed_key(ov_entry: dict[str, Any], twin_entry: dict[str, Any]) -> str:
    """What a speed record was measured on: both engines' artifact keys."""
    return f"{ov_entry.get('artifact_key', '')}|{twin_entry.get('artifact_key', '')}"


def assign(root: Path, ov_table: dict[str, Any], main_table: dict[str, Any], cache: Path | None,
           check_shape: Any) -> list[str]:
    """Measure every fp32 OpenVINO entry of ``ov_table`` that has an ONNX Runtime twin in
    ``main_table`` (unless already measured on these exact engines) and set ``run_on``/``speed``
    in place; returns the components now run on ONNX Runtime."""
    from .store import BACKEND_ORT, EngineEntry

    moved = []
    for name, d in ov_table.items():
        twin = main_table.get(name)
        if d.get("precision") != "fp32" or not twin or twin.get("backend") != BACKEND_ORT:
            d.pop("run_on", None)
            d.pop("speed", None)
            continue
        key = speed_key(d, twin)
        if (d.get("speed") or {}).get("key") != key:
            entry, twin_entry = EngineEntry.from_dict(d, root), EngineEntry.from_dict(twin, root)
            rec = compare(entry.spec, entry.path, entry.precision, cache, twin_entry.path,
                          twin_entry.session_options, check_shape(entry))
            rec["key"] = key
            d["speed"] = rec
            log.info("%s: fp32 call at %s: openvino %.1f ms, onnxruntime %.1f ms -> runs on %s", name,
                     "x".join(str(v) for v in rec["shape"].values()), rec["median_ms"]["openvino"],
                     rec["median_ms"]["onnxruntime"], rec["faster"])
        if d["speed"]["faster"] == BACKEND_ORT:
            d["run_on"] = BACKEND_ORT
            moved.append(name)
        else:
            d.pop("run_on", None)
    return moved
