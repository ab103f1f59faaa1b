"""Per-stage wall-clock timings of one pipeline call.

Every component call (each text encoder, every base and refiner UNet step, the VAE
decode) is timed around the runner call only, so that a benchmark can compute the
runtime's own overhead as ``total - component_seconds``: everything the pipeline does
between components (tokenizing, scheduler maths, guidance, post-processing).

Backends return only when their outputs are ready (ONNX Runtime's ``run`` and
``run_with_iobinding`` synchronise), so these are honest device times too.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

#: Stage names in the order they run (``refiner_text_encoder_2`` only when the refiner
#: needs an encoding the base did not already compute).
STAGES = ("text_encoder", "text_encoder_2", "refiner_text_encoder_2", "unet", "refiner_unet", "vae_decoder")


@dataclass
class StageTimings:
    """``stages[name]`` is a list of seconds, one per call (one per step for the UNets)."""

    stages: dict[str, list[float]] = field(default_factory=dict)
    total: float = 0.0

    @contextmanager
    def measure(self, stage: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.stages.setdefault(stage, []).append(time.perf_counter() - t0)

    def __getitem__(self, stage: str) -> list[float]:
        return self.stages[stage]

    def __contains__(self, stage: object) -> bool:
        return stage in self.stages

    @property
    def component_seconds(self) -> float:
        """Time spent inside component runners (sum over every stage and call)."""
        return float(sum(sum(v) for v in self.stages.values()))

    @property
    def overhead_seconds(self) -> float:
        """End to end minus time inside components: the runtime's own cost."""
        return max(0.0, self.total - self.component_seconds)

    def stage_seconds(self, stage: str) -> float:
        return float(sum(self.stages.get(stage, [])))

    def to_dict(self) -> dict[str, Any]:
        return {
            "stages": {k: list(v) for k, v in self.stages.items()},
            "total": self.total,
            "component_seconds": self.component_seconds,
            "overhead_seconds": self.overhead_seconds,
        }

    def summary_lines(self) -> list[str]:
        """Human-readable lines (the CLI prints them)."""
        lines = []
        for name in (*STAGES, *(s for s in self.stages if s not in STAGES)):
            vals = self.stages.get(name)
            if not vals:
                continue
            tot = sum(vals)
            if len(vals) == 1:
                lines.append(f"{name:<24} {tot * 1000:10.1f} ms")
            else:
                lines.append(f"{name:<24} {tot * 1000:10.1f} ms  ({len(vals)} calls, "
                             f"{tot / len(vals) * 1000:.1f} ms each)")
        lines.append(f"{'components':<24} {self.component_seconds * 1000:10.1f} ms")
        lines.append(f"{'overhead':<24} {self.overhead_seconds * 1000:10.1f} ms")
        lines.append(f"{'total':<24} {self.total * 1000:10.1f} ms")
        return lines
