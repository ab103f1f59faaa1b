"""Progress bars of the commands (``run``: denoising steps; ``export`` and ``build``: components).

tqdm draws them on stderr, only when stderr is a terminal (logs, pipes and CI stay clean);
``SDXL_EXPORT_PROGRESS=1`` forces them on, ``=0`` off. Library code never draws: the
commands pass these as callbacks (``callback_on_step_end``, ``progress=``).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any


def bars_enabled(stream: Any = None) -> bool:
    forced = os.environ.get("SDXL_EXPORT_PROGRESS", "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    stream = sys.stderr if stream is None else stream
    return bool(getattr(stream, "isatty", lambda: False)())


class StepBar:
    """A bar over a pipeline call's denoising steps: ``callback_on_step_end`` for ``SDXLPipeline``.
    The total grows as stages start (base, then refiner)."""

    def __init__(self, total: int, desc: str = "denoising"):
        from tqdm import tqdm

        self.bar = tqdm(total=total, desc=desc, unit="step", file=sys.stderr, leave=False,
                        disable=not bars_enabled(), dynamic_ncols=True)
        self._seen = 0

    def __call__(self, _pipe: Any, i: int, _t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        if i == 0 and kwargs.get("stage"):
            self.bar.set_description(str(kwargs["stage"]))
            if self._seen + int(kwargs.get("stage_steps", 0)) > (self.bar.total or 0):
                self.bar.total = self._seen + int(kwargs.get("stage_steps", 0))
        self._seen += 1
        self.bar.update(1)
        return {}

    def close(self) -> None:
        # tqdm redraws at most every ``mininterval``: draw the final count before the bar goes,
        # so a fast run still shows where it ended.
        self.bar.refresh()
        self.bar.close()


def component_bar(desc: str) -> tuple[Callable[[str, int, int], None], Callable[[], None]]:
    """``progress(name, i, total)`` for ``export_model``/``build``, and a ``close``."""
    from tqdm import tqdm

    state: dict[str, Any] = {}

    def progress(name: str, i: int, total: int) -> None:
        if "bar" not in state:
            state["bar"] = tqdm(total=total, desc=desc, unit="component", file=sys.stderr, leave=False,
                                disable=not bars_enabled(), dynamic_ncols=True)
        bar = state["bar"]
        bar.set_postfix_str(name)
        bar.n = i - 1
        bar.refresh()

    def close() -> None:
        if "bar" in state:
            state["bar"].n = state["bar"].total
            state["bar"].refresh()
            state["bar"].close()

    return progress, close
