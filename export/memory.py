"""Peak memory per export step, and giving freed memory back to the OS.

Why: the full-size SDXL UNet is 10.3 GB of fp32 weights. Exporting and validating it must
never hold two copies of them (the PyTorch module and an ONNX Runtime session) at once, or a
24 GB build box runs out of memory. The exporter frees each component's module before ONNX
Runtime opens the graph, and records each component's peak resident memory in the manifest.

* :class:`PeakRSS` measures the peak resident set of this process over a window. On Linux
  it resets the kernel's high-water mark (``/proc/self/clear_refs`` = 5) and reads
  ``VmHWM``: exact and free. Elsewhere it samples RSS in a thread (psutil).
* :func:`release_memory` runs the garbage collector and asks glibc to return free heap
  pages (``malloc_trim``): PyTorch frees its tensors, but most SDXL weights are smaller than
  glibc's mmap threshold, so without the trim the freed pages stay resident.
"""

from __future__ import annotations

import ctypes
import gc
import logging
import sys
import threading
from pathlib import Path

if sys.version_info >= (3, 11):
    from typing import Self
else:  # pragma: no cover
    from typing_extensions import Self

log = logging.getLogger(__name__)

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def current_rss() -> int:
    """Resident set size of this process in bytes."""
    import psutil

    return int(psutil.Process().memory_info().rss)


def _vm_hwm() -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


class PeakRSS:
    """``with PeakRSS() as peak: ...`` then ``peak.bytes``: the peak RSS inside the block.

    Not reentrant across threads (the kernel's mark is per process): one export at a time.
    """

    def __init__(self, interval: float = 0.05):
        self.interval = interval
        self.bytes = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._kernel = False

    def __enter__(self) -> Self:
        try:
            _CLEAR_REFS.write_text("5")
            self._kernel = _vm_hwm() is not None
        except OSError:
            self._kernel = False
        if not self._kernel:
            self.bytes = current_rss()
            self._thread = threading.Thread(target=self._sample, name="peak-rss", daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.bytes = max(self.bytes, current_rss())

    def __exit__(self, *exc: object) -> None:
        if self._kernel:
            self.bytes = _vm_hwm() or current_rss()
        else:
            self._stop.set()
            if self._thread is not None:
                self._thread.join()
            self.bytes = max(self.bytes, current_rss())


def release_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc), so the next step
    starts from what is really in use."""
    gc.collect()
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # musl or no glibc: nothing to trim
            pass
