"""A model's recorded sampling defaults (steps, guidance, scheduler, prediction type).

Few-step models (SDXL-Turbo, Lightning, DMD2, LCM/Hyper-SD/TCD LoRAs) only work with the
steps, guidance and scheduler they were distilled for: 4 steps without guidance on
``euler_trailing`` is a sharp Lightning image, SDXL's usual 30 steps at guidance 5 is not.
``build``/``export --default-steps N --default-guidance G --default-scheduler NAME`` records
them in the export manifest (``"defaults"``); a call that does not say (Python API, ``run``,
every server API) uses them, and the built-ins (30, 5.0, ``euler``) otherwise.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .errors import InvalidRequestError
from .samplers import canonical_name

#: What a call runs when neither the call nor the model says (diffusers' SDXL usage).
BUILTIN_STEPS, BUILTIN_GUIDANCE, BUILTIN_SCHEDULER = 30, 5.0, "euler"
#: diffusers' scheduler prediction types
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


@dataclass(frozen=True)
class ModelDefaults:
    """Recorded defaults (None: not recorded, the built-in applies). Immutable: shared freely."""

    steps: int | None = None
    guidance_scale: float | None = None
    scheduler: str | None = None
    #: the base scheduler's ``prediction_type`` when the UNet was distilled for another one than the
    #: model's config says (SDXL-Lightning's 1-step UNet predicts x0: ``"sample"``)
    prediction_type: str | None = None

    @classmethod
    def checked(cls, steps: Any = None, guidance_scale: Any = None, scheduler: Any = None,
                prediction_type: Any = None) -> ModelDefaults:
        """Validated defaults (the build refuses bad ones before any work)."""
        if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
            raise InvalidRequestError(f"unknown prediction type {prediction_type!r}",
                                      f"use one of: {', '.join(PREDICTION_TYPES)}")
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
            raise InvalidRequestError(f"default steps must be an integer >= 1, got {steps!r}",
                                      "pass --default-steps 4 (Lightning/Turbo: 1-8)")
        if guidance_scale is not None and (isinstance(guidance_scale, bool)
                                           or not isinstance(guidance_scale, (int, float))
                                           or not math.isfinite(guidance_scale) or guidance_scale < 0):
            raise InvalidRequestError(f"default guidance must be a number >= 0, got {guidance_scale!r}",
                                      "pass --default-guidance 0 (few-step models) or e.g. 5.0")
        return cls(steps=None if steps is None else int(steps),
                   guidance_scale=None if guidance_scale is None else float(guidance_scale),
                   scheduler=None if scheduler is None else canonical_name(scheduler),
                   prediction_type=prediction_type)

    @classmethod
    def from_manifest(cls, manifest: Mapping[str, Any]) -> ModelDefaults:
        d = manifest.get("defaults") or {}
        return cls.checked(d.get("steps"), d.get("guidance_scale"), d.get("scheduler"), d.get("prediction_type"))

    @classmethod
    def from_artifacts(cls, artifacts: Any) -> ModelDefaults:
        return cls.from_manifest(getattr(artifacts, "manifest", {}) or {})

    def to_dict(self) -> dict[str, Any]:
        """The manifest's ``"defaults"`` (recorded values only)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    def effective(self) -> dict[str, Any]:
        """What a call without these arguments runs (``/v1/info``)."""
        steps, guidance, scheduler = self.fill(None, None, None)
        return {"steps": steps, "guidance_scale": guidance, "scheduler": scheduler,
                "prediction_type": self.prediction_type, "recorded": self.to_dict()}

    def scheduler_config(self, config: Mapping[str, Any]) -> dict[str, Any]:
        """The base's scheduler config with the recorded ``prediction_type`` (diffusers' Lightning
        recipe: ``EulerDiscreteScheduler.from_config(cfg, timestep_spacing="trailing",
        prediction_type="sample")``)."""
        out = dict(config)
        if self.prediction_type is not None:
            out["prediction_type"] = self.prediction_type
        return out

    def fill(self, steps: Any, guidance_scale: Any, scheduler: Any) -> tuple[Any, Any, Any]:
        """The call's values, with None replaced by the recorded default, else the built-in."""
        return (self._pick(steps, self.steps, BUILTIN_STEPS),
                self._pick(guidance_scale, self.guidance_scale, BUILTIN_GUIDANCE),
                self._pick(scheduler, self.scheduler, BUILTIN_SCHEDULER))

    @staticmethod
    def _pick(value: Any, recorded: Any, builtin: Any) -> Any:
        return value if value is not None else recorded if recorded is not None else builtin


__all__ = ["BUILTIN_GUIDANCE", "BUILTIN_SCHEDULER", "BUILTIN_STEPS", "PREDICTION_TYPES", "ModelDefaults"]
