"""The TensorRT backend: :mod:`.runner` (the :class:`ComponentRunner`), :mod:`.execution` (one
execution context per lane, profile and shapes; CUDA graphs) and :mod:`.refit` (weight switching
of refittable plans). Importing it needs torch only; TensorRT itself is loaded on first use."""

from __future__ import annotations

from .runner import NAME, TensorRTRunner, available, create

__all__ = ["NAME", "TensorRTRunner", "available", "create"]
