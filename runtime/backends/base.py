"""The seam every backend plugs into: a loaded component, torch tensors in and out.

A :class:`ComponentRunner` has an explicit lifecycle (``open``/``close`` or ``with``),
and checks names, dtypes and shapes against its :class:`~sdxl_export.specs.ComponentSpec`
on every call, so that a mistake surfaces as a named :class:`InputMismatchError` or
:class:`UnsupportedShapeError`, not as a crash deep inside ONNX Runtime or TensorRT.

The pipeline speaks torch tensors (diffusers' schedulers do): backends convert at the
edge (ONNX Runtime CPU: zero-copy ``.numpy()`` / ``torch.from_numpy``; CUDA backends
bind device pointers).
"""

from __future__ import annotations

import abc
import sys
import threading
from collections.abc import Mapping
from typing import Any

if sys.version_info >= (3, 11):
    from typing import Self
else:  # pragma: no cover
    from typing_extensions import Self

import torch

from ...errors import BackendUnavailableError, SDXLExportError
from ...specs import ComponentSpec


class RunnerClosedError(SDXLExportError):
    """A component was called before ``open()`` or after ``close()``."""


class ComponentRunner(abc.ABC):
    """One loaded component of one backend."""

    #: Short backend name ("onnxruntime", "torch", "tensorrt").
    backend: str = "?"

    #: What the keys of :meth:`set_weights` name: ``"onnx"`` -- ONNX initializer names, values in
    #: the graph's layout (already transposed where the export's parameter map says so) -- or
    #: ``"torch"`` -- the PyTorch module's parameter names (``model.named_parameters()``).
    weight_keys: str = "onnx"

    def __init__(self, spec: ComponentSpec):
        self.spec = spec
        self._open = False
        self._lock = threading.Lock()

    # ---- lifecycle ------------------------------------------------------------------------
    def open(self) -> Self:
        with self._lock:
            if not self._open:
                self._open_impl()
                self._open = True
        return self

    def close(self) -> None:
        with self._lock:
            if self._open:
                self._close_impl()
                self._open = False

    @property
    def is_open(self) -> bool:
        return self._open

    def __enter__(self) -> Self:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- calls ------------------------------------------------------------------------------
    def __call__(self, feeds: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if not self._open:
            raise RunnerClosedError(
                f"{self.spec.name} ({self.backend}) is not open", "call open() or use it in a with-block"
            )
        batch, height, width = self.spec.check_inputs(feeds)
        self.check_supported(batch, height, width)
        return self._run(feeds)

    def check_supported(self, batch: int, height: int, width: int) -> None:
        """Raise :class:`UnsupportedShapeError` if this runner cannot serve the shape.

        Dynamic backends accept everything the spec allows; engines built for fixed
        profiles override this and list what they support.
        """

    # ---- run-time weights (LoRA switching) ------------------------------------------------------
    def set_weights(self, weights: Mapping[str, torch.Tensor]) -> None:
        """Replace these weights for every later call; all-or-nothing.

        Keys are what :attr:`weight_keys` says; values are full weights (base + deltas), not
        deltas, so that any sequence of switches ends exactly where the last one says. An unknown
        name or a shape mismatch raises :class:`~sdxl_export.errors.WeightMismatchError` before
        anything changes. The caller guarantees that no call is in flight on this runner meanwhile
        (the pipeline's LoRA gate does).
        """
        raise BackendUnavailableError(
            f"{self.spec.name} ({self.backend}): this backend cannot switch weights at run time",
            "fuse the LoRA at build time (sdxl-export build --lora FILE:SCALE), or use the torch or "
            "onnxruntime backend (or a TensorRT engine built with --refittable)",
        )

    @property
    def description(self) -> dict[str, Any]:
        """What was loaded and how (recorded in timings/benchmarks)."""
        return {"backend": self.backend, "component": self.spec.name}

    # ---- to implement -------------------------------------------------------------------------
    @abc.abstractmethod
    def _open_impl(self) -> None: ...

    @abc.abstractmethod
    def _close_impl(self) -> None: ...

    @abc.abstractmethod
    def _run(self, feeds: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Run on checked inputs; return outputs keyed by spec output names."""
