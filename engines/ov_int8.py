"""int8 OpenVINO engines (``build --precision int8``): NNCF's hybrid recipe for diffusion UNets.

The recipe is optimum-intel's for diffusion models, taken from its description (nothing here
fetches anything):

* **UNets** (``unet``, ``refiner_unet``), *hybrid*: first ``nncf.compress_weights`` stores the
  weights of every MatMul and Embedding (Gather) as int8 (asymmetric, per output channel), the
  convolutions left alone; then ``nncf.quantize`` (``ModelType.TRANSFORMER``) puts int8
  quantizers on the rest -- convolutions and the activation-by-activation MatMuls of attention --
  with the weight-compressed ops in its ignored scope and SmoothQuant off
  (``smooth_quant_alpha=-1``: those MatMuls' weights are already int8). Calibration statistics
  come from the UNet's own inputs, captured while the pipeline runs a prompt set that ships with
  the package (:mod:`sdxl_export.runtime.calibration`); the build is handed them by its caller,
  because ``engines/`` never runs the sampling loop itself.
* **Text encoders**: weight-only int8 (they run once per image; activations stay fp32).
* The VAE and ControlNets stay at their own precision (fp32 by default): SDXL's VAE is the
  precision-sensitive end of the pipeline and a small share of a 20-step image.

Non-quantized ops compute in fp32 (``INFERENCE_PRECISION_HINT=f32``), on every CPU.

**The int8 build check** (per UNet, at build time): on calibration samples *held out* from the
statistics (every :data:`HOLDOUT_EVERY`-th), the int8 UNet's noise prediction must be finite and
within :data:`INT8_REL_RMS_TOL` relative RMS error of the fp32 export's -- a guard against a broken
quantization, recorded in the manifest. The image-level claim is the benchmark's int8 gate
(``bench``: PSNR vs diffusers fp32 at most 3 dB below diffusers bf16's, beside the bf16 gate);
``auto`` never runs int8 engines (they are opt-in: ``--backend openvino``).
"""

from __future__ import annotations

import contextlib
import io
import logging
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .ov_builder import OpenVinoBuildError

log = logging.getLogger(__name__)

#: Calibration UNet calls per UNet (optimum-intel's hybrid default is 200; the first 100 steps of a
#: 20-step run over 5 prompts give the statistics of every noise level; see ``--calibration-samples``).
DEFAULT_SAMPLES = 100
#: Every n-th captured sample is held out of the statistics and used for the build check.
HOLDOUT_EVERY = 5
#: The build check catches a broken quantization (a wrong range or scale gives errors of 100% and
#: more, or NaN), it does not judge image fidelity: relative RMS error of the int8 UNet's noise prediction
#: vs fp32 on held-out calls. Measured: 24% on the random-weight ``tiny`` preset (tiny width, 20 calls).
#: The image-level claim is the benchmark's int8 gate (benchmarks/bench.py, README).
INT8_REL_RMS_TOL = 0.5


def recipe_for(kind: str) -> str | None:
    """``"hybrid"`` for UNets, ``"weights"`` for text encoders, None (own precision) for the rest."""
    return {"unet": "hybrid", "text_encoder": "weights"}.get(kind)


class Int8CalibrationError(OpenVinoBuildError):
    """int8 was asked for but no calibration inputs could be had (or too few)."""


def _nncf() -> Any:
    try:
        import nncf
    except ImportError:
        raise OpenVinoBuildError("--precision int8 needs NNCF (Neural Network Compression Framework)",
                                 'pip install "sdxl-export[openvino]" (it includes nncf)') from None
    nncf.set_log_level(logging.WARNING)  # its INFO lists every op it skips
    return nncf


@contextlib.contextmanager
def _nncf_output() -> Iterator[None]:
    """NNCF draws its progress (rich) on stdout, which is the command's result channel: send it to
    stderr on a terminal, and nowhere otherwise (logs, pipes and CI stay clean)."""
    from ..progress_bars import bars_enabled

    with contextlib.redirect_stdout(sys.stderr if bars_enabled() else io.StringIO()):
        yield


def nncf_version() -> str | None:
    try:
        import nncf
    except ImportError:
        return None
    return str(nncf.__version__)


def _weight_source(node: Any) -> Any:
    """The node feeding a weight input, through the Convert/Reshape/Transpose chain convert_model leaves."""
    while node.get_type_name() in ("Convert", "Reshape", "Transpose", "Unsqueeze") and node.get_input_size():
        node = node.input_value(0).get_node()
    return node


def ops_with_weights(model: Any) -> list[str]:
    """Names of the MatMul and Embedding (Gather) ops whose weight input is a constant: the ops
    ``compress_weights`` makes int8 and ``quantize`` must then leave alone."""
    names = []
    for op in model.get_ordered_ops():
        kind = op.get_type_name()
        if kind == "MatMul" and _weight_source(op.input_value(1).get_node()).get_type_name() == "Constant" or kind == "Gather" and _weight_source(op.input_value(0).get_node()).get_type_name() == "Constant" \
                and len(op.input_value(0).get_partial_shape()) == 2:
            names.append(op.get_friendly_name())
    return names


def quantize_ir(xml: Path, out_xml: Path, kind: str,
                samples: Sequence[dict[str, np.ndarray]] | None = None) -> dict[str, Any]:
    """Quantize the fp32 IR at ``xml`` into ``out_xml`` (``kind``: ``"hybrid"`` or ``"weights"``);
    return its record."""
    import openvino as ov

    nncf = _nncf()
    t0 = time.perf_counter()
    model = ov.Core().read_model(str(xml))
    weighted = ops_with_weights(model)
    try:
        with _nncf_output():
            return _quantize(nncf, model, weighted, out_xml, kind, samples, t0)
    except OpenVinoBuildError:
        raise
    except Exception as exc:  # noqa: BLE001 -- NNCF and OpenVINO raise their own types
        raise OpenVinoBuildError(f"NNCF could not quantize {xml.parent.name} to int8 ({type(exc).__name__}: "
                                 f"{str(exc).strip()[:300]})", "build bf16 or fp32 instead, and report this") from None


def _quantize(nncf: Any, model: Any, weighted: list[str], out_xml: Path, kind: str,
              samples: Sequence[dict[str, np.ndarray]] | None, t0: float) -> dict[str, Any]:
    import openvino as ov

    compressed = nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_ASYM,
                                       ignored_scope=nncf.IgnoredScope(types=["Convolution"], validate=False))
    record: dict[str, Any] = {"recipe": kind, "nncf": nncf_version(), "weight_ops_int8": len(weighted),
                              "weights": "int8_asym, MatMul + Embedding"}
    if kind == "hybrid":
        if not samples:
            raise Int8CalibrationError(f"{out_xml.parent.name}: no calibration inputs for the hybrid int8 recipe",
                                       "build through `sdxl-export build --precision int8`, or pass "
                                       "calibration=sdxl_export.runtime.UNetCalibration() to build()")
        stats = [s for i, s in enumerate(samples) if i % HOLDOUT_EVERY != HOLDOUT_EVERY - 1] or list(samples)
        quantized = nncf.quantize(
            compressed, nncf.Dataset(stats), model_type=nncf.ModelType.TRANSFORMER, subset_size=len(stats),
            ignored_scope=nncf.IgnoredScope(names=weighted, validate=False),
            advanced_parameters=nncf.AdvancedQuantizationParameters(smooth_quant_alpha=-1),
        )
        record.update(activations="int8 (nncf.quantize, TRANSFORMER, SmoothQuant off)", calibration_samples=len(stats))
        compressed = quantized
    ov.save_model(compressed, str(out_xml), compress_to_fp16=False)
    record["seconds"] = round(time.perf_counter() - t0, 2)
    return record


def check_int8(reference_xml: Path, int8_xml: Path, samples: Sequence[dict[str, np.ndarray]], output: str,
               config: dict[str, Any], name: str = "unet") -> dict[str, Any]:
    """The int8 build check (module docstring) on the held-out samples; raises when it fails."""
    import openvino as ov

    held = [s for i, s in enumerate(samples) if i % HOLDOUT_EVERY == HOLDOUT_EVERY - 1] or list(samples[:1])
    core = ov.Core()
    fp32 = core.compile_model(str(reference_xml), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    int8 = core.compile_model(str(int8_xml), "CPU", config)
    errors = []
    for feeds in held:
        a = np.asarray(fp32.create_infer_request().infer(feeds)[fp32.output(output)], np.float64)
        b = np.asarray(int8.create_infer_request().infer(feeds)[int8.output(output)], np.float64)
        if not np.all(np.isfinite(b)):
            raise OpenVinoBuildError(f"{name}: the int8 UNet's output is not finite",
                                     "build bf16 or fp32 instead of int8")
        errors.append(float(np.sqrt(np.mean((a - b) ** 2)) / max(float(np.sqrt(np.mean(a ** 2))), 1e-12)))
    worst = max(errors)
    record = {"held_out_samples": len(held), "rel_rms_error_max": round(worst, 5),
              "rel_rms_error_median": round(float(np.median(errors)), 5), "tolerance": INT8_REL_RMS_TOL,
              "passed": worst <= INT8_REL_RMS_TOL}
    if not record["passed"]:
        raise OpenVinoBuildError(
            f"{name}: the int8 UNet's noise prediction differs from fp32 by {worst:.1%} relative "
            f"RMS on held-out calibration inputs (the build allows {INT8_REL_RMS_TOL:.0%})",
            "build bf16 or fp32 instead, or calibrate on more samples (--calibration-samples)")
    return record


def ir_is_int8(xml: Path) -> bool:
    """Whether an IR holds int8 constants (what the manifest's ``precision: int8`` claims)."""
    import openvino as ov

    model = ov.Core().read_model(str(xml))
    return any(op.get_type_name() == "Constant" and op.get_output_element_type(0).get_type_name() in ("u8", "i8")
               for op in model.get_ordered_ops())
