"""Named errors raised at the boundaries of sdxl-export.

Every error carries a ``hint``: the concrete thing the user should do next. The CLI
prints ``error: <message>`` and ``hint: <hint>`` on one line each and exits non-zero,
without a traceback. Library callers can catch :class:`SDXLExportError` or a subclass.
"""

from __future__ import annotations


class SDXLExportError(Exception):
    """Base of every error sdxl-export raises on purpose."""

    exit_code = 2
    #: The HTTP status a server answers when this error ends a request (``serve/http.py``):
    #: 500 unless the request itself was at fault.
    http_status = 500
    #: False when the same request would fail the same way again: servers send
    #: ``x-should-retry: false`` so clients (``openai``) do not re-run it.
    retryable = True

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        if self.hint:
            return f"{self.message} ({self.hint})"
        return self.message

    def one_line(self) -> str:
        """Message and hint joined for a single CLI line."""
        return f"{self.message}. Fix: {self.hint}" if self.hint else self.message


# --- model sources -------------------------------------------------------------------
class ModelSourceError(SDXLExportError):
    """An unknown preset, a path that does not exist, or a hub id that cannot be reached."""


class MissingComponentError(SDXLExportError):
    """A model folder or artifact folder lacks a component SDXL needs."""

    http_status = 400  # in a request: it asked for a component (refiner, vae_encoder) not loaded


class UnsafeCheckpointError(SDXLExportError):
    """A checkpoint is only available as pickle (.bin/.pt/.ckpt); we load safetensors only."""


# --- export ------------------------------------------------------------------------------
class OutputDirError(SDXLExportError):
    """The output folder cannot be written, or holds files that are not ours."""


class OpsetError(SDXLExportError):
    """The requested ONNX opset is outside the supported range."""


class ExportValidationError(SDXLExportError):
    """An exported ONNX graph disagrees with PyTorch beyond the component's tolerance."""


# --- artifacts and engines ---------------------------------------------------------------
class ArtifactError(SDXLExportError):
    """An artifact folder is missing, corrupt, or was not written by sdxl-export."""

    retryable = False


class IncompatibleManifestError(ArtifactError):
    """A manifest was written by an incompatible version of sdxl-export."""


class CorruptArtifactError(ArtifactError):
    """A file's content hash does not match its manifest entry."""


class StaleEngineError(ArtifactError):
    """An engine was built from a different ONNX, TensorRT version, GPU or flags."""


class BackendUnavailableError(SDXLExportError):
    """The requested backend (TensorRT, CUDA, ...) is not installed or has no device."""

    retryable = False


# --- runtime requests --------------------------------------------------------------------
class InvalidRequestError(SDXLExportError, ValueError):
    """A sampling request has an invalid argument (size, steps, guidance, ...)."""

    http_status = 400
    retryable = False


class UnknownBucketError(InvalidRequestError):
    """A size names no SDXL aspect bucket."""


class UnsupportedShapeError(InvalidRequestError):
    """A backend built for fixed profiles was asked for a shape outside them."""


class InvalidImageError(InvalidRequestError):
    """An img2img input image is unreadable, corrupt, of an unusable type or values, or comes with
    a mask (no inpainting)."""


class InvalidLoraError(InvalidRequestError):
    """A LoRA file or set cannot be applied: not safetensors, missing, made for another
    architecture (keys or shapes that do not fit), or a non-finite / absurd scale."""


class WeightMismatchError(InvalidRequestError):
    """A run-time weight update names a weight the component does not have, or has the wrong shape."""


class InvalidMaskError(InvalidImageError):
    """An inpainting mask is unreadable, not an image, empty (selects no pixel), or does not fit
    the image batch."""


class InpaintingModelError(InvalidRequestError):
    """A 9-channel inpainting UNet was asked for text-to-image or image-to-image without a mask."""


class UnknownUpscalerError(InvalidRequestError):
    """A hires-fix upscaler is not one we have (ESRGAN-family upscalers need weights we do not ship)."""


class InputMismatchError(SDXLExportError, ValueError):
    """A component was called with inputs whose names, dtypes or shapes break its spec."""


class NumericalError(SDXLExportError):
    """A stage produced NaN/Inf (for example an fp16 VAE decode overflowing)."""

    retryable = False  # deterministic: the same request overflows again
