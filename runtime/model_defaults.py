"""A request's schedule arguments (``eta``, custom ``timesteps``/``sigmas``) and the model's
recorded sampling defaults (:mod:`sdxl_export.sampling_defaults`, re-exported here)."""

from __future__ import annotations

from typing import Any

from ..sampling_defaults import (
    BUILTIN_GUIDANCE,
    BUILTIN_SCHEDULER,
    BUILTIN_STEPS,
    PREDICTION_TYPES,
    ModelDefaults,
)
from .request import SampleRequest
from .schedulers import check_schedule_args

__all__ = ["BUILTIN_GUIDANCE", "BUILTIN_SCHEDULER", "BUILTIN_STEPS", "PREDICTION_TYPES", "ModelDefaults",
           "with_schedule_args"]


def with_schedule_args(req: SampleRequest, *, eta: Any, timesteps: Any, sigmas: Any) -> SampleRequest:
    """Check ``eta`` and custom ``timesteps``/``sigmas`` for ``req``'s scheduler and put them on it.

    With a custom schedule diffusers ignores ``num_inference_steps`` and runs its length, so
    ``req.steps`` becomes that length (what the strength check and ``info`` see)."""
    req.eta, req.timesteps, req.sigmas = check_schedule_args(req.scheduler, eta, timesteps, sigmas)
    custom = req.timesteps if req.timesteps is not None else req.sigmas
    if custom is not None:
        req.steps = len(custom)
    return req
