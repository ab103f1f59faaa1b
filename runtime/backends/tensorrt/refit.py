"""Refitting a TensorRT engine's weights in place (run-time LoRA switching, ``--refittable`` plans).

:func:`refit_engine` is what :meth:`TensorRTRunner.set_weights
<sdxl_export.runtime.backends.tensorrt.runner.TensorRTRunner.set_weights>` calls. It is plain Python
over the ``tensorrt`` module, so its ordering and checks are tested on CPU with a fake
``tensorrt`` module (``tests/test_trt_refit.py``) and type-checked with mypy against
``tensorrt-stubs`` (``tests/test_engines_typecheck.py``).

TensorRT facts it relies on (TensorRT 10 Python API, ``tensorrt.Refitter``, and NVIDIA's
"Refitting an Engine" guide):

* ``Refitter(engine, logger)``; ``get_all_weights()`` names every refittable weight; the ONNX
  parser names weights after the ONNX initializers, so our keys are initializer names
  (``weight_keys = "onnx"``, values in the graph's layout).
* ``get_weights_prototype(name)`` has "the same dtype and size as the weights used for engine
  building" (size -1 for a name that is not refittable), and ``set_named_weights`` rejects a
  different count or dtype. So each value is converted to the prototype's dtype (NVIDIA's
  diffusion demo does the same) and its count checked first; the prototype carries no shape,
  so shapes are checked against the ONNX initializers when the runner can read them.
* ``set_named_weights(name, weights, location)`` takes host or device memory
  (``TensorLocation``); the memory must not change or be freed before ``refit_cuda_engine``
  returns -- every converted tensor is held in ``staged`` until then.
* ``get_missing_weights()``: when the engine combined weights, "any unsupplied Weights in the
  combination are considered missing" and ``refit_cuda_engine`` fails. The caller passes every
  weight any LoRA touched, so a missing partner was never touched: its base value is read from
  the ONNX (``base``) and set too. If something is still missing, nothing is refitted.
* ``refit_cuda_engine()`` is synchronous; "the behavior is undefined if the engine has pending
  enqueued work" (the runner synchronises the device first: ``before_refit``); "if False is
  returned, a subset of weights may have been refitted" -- so every check that can fail is made
  *before* it, and a False is a :class:`RefitFailedError` after which the runner refuses calls
  until a full ``set_weights`` succeeds. ``refit_cuda_engine_async(stream)`` is not used: our
  work runs on several lanes' streams, and a synchronous refit after a device synchronise is
  simpler to order than an async one on one of them; a switch is rare next to a denoising loop.
* "IExecutionContexts associated with the engine remain valid for use afterwards": contexts are
  kept. The documentation says nothing about CUDA graphs captured from ``enqueueV3`` before a
  refit, and a captured graph freezes every kernel's parameters; so the runner drops every
  captured graph after a refit (:meth:`TrtExecutor.drop_graphs
  <sdxl_export.runtime.backends.tensorrt.execution.TrtExecutor.drop_graphs>`): the next call per shape runs
  eagerly and recaptures.

Why a full rewrite each time: NVIDIA's diffusion demo refits only the weights the *new* LoRA
touches, so A -> B -> A leaves B's deltas on weights A does not touch. Here the caller always
passes the full current value (base + current deltas) of every weight any LoRA has touched
since load, so the engine ends exactly where the last call says.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ....errors import BackendUnavailableError, InvalidLoraError, WeightMismatchError
from .execution import TensorRTCallError

if TYPE_CHECKING:  # pragma: no cover
    import tensorrt as trt

log = logging.getLogger(__name__)

#: TensorRT DataType member name -> torch dtype of a weights buffer.
WEIGHT_DTYPES = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT32": torch.int32,
                 "INT64": torch.int64, "INT8": torch.int8, "UINT8": torch.uint8, "BOOL": torch.bool}
#: How many names an error message lists.
SHOWN = 5

BaseLoader = Callable[[Sequence[str]], Mapping[str, torch.Tensor]]


class RefitFailedError(TensorRTCallError):
    """``refit_cuda_engine`` returned False: some weights may have been replaced, some not."""


@dataclass
class RefitStats:
    """What one refit did (logged, and reported by the runner next to the rebuild time it saves)."""

    weights: int  # weights the caller passed
    filled: int  # missing partners of combined weights, set from the base (ONNX) values
    bytes: int  # bytes handed to TensorRT
    seconds: float  # validate + convert + set + refit


def _names(names: Sequence[str]) -> str:
    shown = ", ".join(repr(n) for n in list(names)[:SHOWN])
    return shown + (f" and {len(names) - SHOWN} more" if len(names) > SHOWN else "")


def _stage(refitter: trt.Refitter, name: str, what: str, weights: Mapping[str, torch.Tensor],
           shapes: Mapping[str, tuple[int, ...]] | None, device: torch.device | None,
           refittable: set[str]) -> dict[str, tuple[torch.Tensor, trt.DataType]]:
    """Check every weight against the engine and convert it; touches nothing (all-or-nothing)."""
    unknown = sorted(n for n in weights if n not in refittable)
    if unknown:
        raise WeightMismatchError(
            f"{what}: {len(unknown)} {name} weight(s) are not refittable weights of this engine: {_names(unknown)}",
            "pass ONNX initializer names (this runner's weight_keys is 'onnx'); a weight TensorRT folded "
            "into another cannot be refitted by name -- rebuild with `sdxl-export build --refittable` from "
            "the current export")
    staged: dict[str, tuple[torch.Tensor, trt.DataType]] = {}
    for n, t in weights.items():
        if shapes is not None and n in shapes and tuple(t.shape) != tuple(shapes[n]):
            raise WeightMismatchError(f"{what}: {name} weight {n!r} has shape {tuple(t.shape)}, the engine's "
                                      f"is {tuple(shapes[n])}",
                                      "pass values in the ONNX graph's layout (a Linear exported as MatMul "
                                      "is transposed)")
        proto = refitter.get_weights_prototype(n)
        if proto.size < 0:
            raise WeightMismatchError(f"{what}: {name} weight {n!r} is not refittable", "rebuild with --refittable")
        if t.numel() != proto.size:
            raise WeightMismatchError(f"{what}: {name} weight {n!r} has {t.numel()} values, the engine's has "
                                      f"{proto.size}", "pass values in the ONNX graph's layout and shape")
        dtype = WEIGHT_DTYPES.get(proto.dtype.name)
        if dtype is None:
            raise BackendUnavailableError(f"{what}: weight {n!r} is stored as TensorRT {proto.dtype.name}",
                                          "refit supports float, half, bf16 and integer weights only")
        target = device if device is not None and t.is_cuda else t.device
        value = t.detach().to(device=target, dtype=dtype).contiguous()
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise InvalidLoraError(f"{what}: weight {n!r} is not finite as {proto.dtype.name} (a NaN, or a "
                                   f"value beyond the {dtype} range)", "lower the LoRA scale")
        staged[n] = (value, proto.dtype)
    return staged


def _set(refitter: trt.Refitter, what: str,
         staged: Mapping[str, tuple[torch.Tensor, trt.DataType]]) -> int:
    """Hand every staged buffer to the refitter (pointers only: ``staged`` must outlive the refit)."""
    import tensorrt as trt

    nbytes = 0
    for n, (value, dtype) in staged.items():
        location = trt.TensorLocation.DEVICE if value.is_cuda else trt.TensorLocation.HOST
        w = trt.Weights(dtype, int(value.data_ptr()), int(value.numel()))
        if not refitter.set_named_weights(n, w, location):
            raise TensorRTCallError(f"{what}: TensorRT rejected the new value of {n!r} (engine unchanged)",
                                    "rerun with -v for TensorRT's log")
        nbytes += value.numel() * value.element_size()
    return nbytes


def refit_engine(engine: trt.ICudaEngine, weights: Mapping[str, torch.Tensor], *, logger: trt.ILogger,
                 what: str, shapes: Mapping[str, tuple[int, ...]] | None = None, base: BaseLoader | None = None,
                 device: torch.device | None = None, before_refit: Callable[[], None] | None = None) -> RefitStats:
    """Replace ``weights`` (ONNX initializer name -> full value) in ``engine``; see the module docstring.

    ``shapes``: ONNX initializer shapes (checked when given); ``base``: reads base values of
    missing partner weights; ``device``: where CUDA values must live; ``before_refit``: called
    after every check and ``set_named_weights``, right before ``refit_cuda_engine`` (the
    runner synchronises the device there). Raises :class:`WeightMismatchError` /
    :class:`InvalidLoraError` / :class:`TensorRTCallError` with the engine unchanged, or
    :class:`RefitFailedError` when TensorRT's refit itself failed (state unknown).
    """
    import tensorrt as trt

    t0 = time.perf_counter()
    if not engine.refittable:
        raise BackendUnavailableError(f"{what}: the engine was not built refittable",
                                      "rebuild it with `sdxl-export build --refittable ...`")
    refitter = trt.Refitter(engine, logger)
    refittable = set(refitter.get_all_weights())
    staged = _stage(refitter, "the", what, weights, shapes, device, refittable)
    nbytes = _set(refitter, what, staged)
    filled: dict[str, tuple[torch.Tensor, trt.DataType]] = {}
    missing = [n for n in refitter.get_missing_weights() if n not in staged]
    if missing:
        unnamed = [n for n in missing if not n]
        if unnamed or base is None:
            raise TensorRTCallError(f"{what}: TensorRT needs {len(missing)} more weight(s) combined with the "
                                    f"ones passed ({_names(missing)}) and cannot read them (engine unchanged)",
                                    "rebuild with `sdxl-export build --refittable` from the current export")
        values = base(missing)
        lacking = [n for n in missing if n not in values]
        if lacking:
            raise TensorRTCallError(f"{what}: the export has no base value for {_names(lacking)} (engine unchanged)",
                                    "rebuild with `sdxl-export build --refittable` from the current export")
        filled = _stage(refitter, "base", what, {n: values[n] for n in missing}, shapes, device, refittable)
        nbytes += _set(refitter, what, filled)
        still = refitter.get_missing_weights()
        if still:
            raise TensorRTCallError(f"{what}: TensorRT still misses {_names(still)} (engine unchanged)",
                                    "report this as a bug, with the LoRA used")
    if before_refit is not None:
        before_refit()
    if not refitter.refit_cuda_engine():
        raise RefitFailedError(f"{what}: TensorRT's refit failed; some weights may have been replaced",
                               "call set_weights (pipe.set_loras) again, or close and reopen the pipeline")
    del refitter  # TensorRT has copied the values: the staged buffers may go now
    staged.clear()
    filled.clear()
    stats = RefitStats(weights=len(weights), filled=len(missing), bytes=nbytes,
                       seconds=time.perf_counter() - t0)
    log.info("%s: refitted %d weight(s) (+%d combined partner(s), %.1f MB) in %.1f ms", what, stats.weights,
             stats.filled, nbytes / 1e6, stats.seconds * 1e3)
    return stats


__all__ = ["WEIGHT_DTYPES", "RefitFailedError", "RefitStats", "refit_engine"]
