"""Logging set-up for the commands: ``sdxl_export``'s logger to stderr, third-party chatter off.

Library code only logs (``logging.getLogger(__name__)``); what is shown and where is decided
once, here, by whoever runs a command (``sdxl-export``, ``python -m sdxl_export.benchmarks...``).
"""

from __future__ import annotations

import logging
import os
import sys


def setup_logging(verbosity: int) -> None:
    """``verbosity`` < 0: warnings and errors; 0: info; > 0: debug."""
    level = logging.WARNING if verbosity < 0 else logging.INFO if verbosity == 0 else logging.DEBUG
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname).1s %(name)s: %(message)s", "%H:%M:%S"))
    root = logging.getLogger("sdxl_export")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
    # Third-party chatter (progress bars, deprecation notices) is not ours to print.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    for name in ("transformers", "diffusers", "torch.onnx", "polygraphy"):
        logging.getLogger(name).setLevel(logging.ERROR)
