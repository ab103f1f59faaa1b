"""SDXL's 40 multi-aspect training buckets and helpers to map sizes onto them.

The table (``data/sdxl_aspect_buckets.csv``) is the paper's, at SDXL's native
1024x1024 pixel budget. Smaller models (the embedded ``tiny`` and ``small`` presets)
use the same aspect ratios scaled to their own native size, so that every code path
(profile planning, bucket lookup) is the same for every model.
"""

from __future__ import annotations

import csv
import functools
import math
from dataclasses import dataclass
from importlib import resources

from .errors import InvalidRequestError, UnknownBucketError

SDXL_NATIVE = 1024


@dataclass(frozen=True, order=True)
class Bucket:
    """One aspect bucket, in pixels."""

    height: int
    width: int

    @property
    def aspect(self) -> float:
        return self.height / self.width

    def latent(self, vae_scale: int = 8) -> tuple[int, int]:
        return self.height // vae_scale, self.width // vae_scale

    def __str__(self) -> str:
        return f"{self.height}x{self.width}"

    @classmethod
    def parse(cls, text: str) -> Bucket:
        """Parse ``"HxW"`` (e.g. ``"1024x1024"``)."""
        try:
            h, w = text.lower().strip().split("x")
            return cls(int(h), int(w))
        except ValueError:
            raise InvalidRequestError(
                f"cannot parse size {text!r}", "write sizes as HEIGHTxWIDTH, e.g. 1024x1024"
            ) from None


@functools.lru_cache(maxsize=1)
def sdxl_buckets() -> tuple[Bucket, ...]:
    """The 40 buckets of the SDXL paper at 1024^2, in table order (by aspect ratio)."""
    text = resources.files("sdxl_export").joinpath("data/sdxl_aspect_buckets.csv").read_text()
    rows = csv.DictReader(text.splitlines())
    return tuple(Bucket(int(r["height"]), int(r["width"])) for r in rows)


def buckets_for(native: int = SDXL_NATIVE) -> tuple[Bucket, ...]:
    """The 40 buckets scaled from SDXL's 1024 native size to ``native`` pixels.

    Sizes are scaled by ``native / 1024`` and rounded to a multiple of 64 pixels (8
    latent pixels, as every SDXL bucket is), keeping the UNets' down/up-sampling exact.
    At small native sizes neighbouring buckets can round to the same size: duplicates
    are dropped, table order is kept (a 256-native model has 128x512 ... 512x128).
    """
    if native == SDXL_NATIVE:
        return sdxl_buckets()
    return tuple(dict.fromkeys(sdxl_bucket_map(native).values()))


def sdxl_bucket_map(native: int = SDXL_NATIVE) -> dict[Bucket, Bucket]:
    """Each of the paper's 40 buckets -> the bucket it becomes at ``native`` size."""
    scale = native / SDXL_NATIVE
    return {b: Bucket(_round64(b.height * scale), _round64(b.width * scale)) for b in sdxl_buckets()}


def _round64(x: float) -> int:
    return max(64, round(x / 64) * 64)


def nearest_bucket(height: int, width: int, native: int = SDXL_NATIVE) -> Bucket:
    """The bucket closest in aspect ratio (log scale), then in pixel count."""
    if height <= 0 or width <= 0:
        raise InvalidRequestError(f"size {height}x{width} is not positive", "pass a positive height and width")
    target = math.log(height / width)
    area = height * width
    return min(
        buckets_for(native),
        key=lambda b: (abs(math.log(b.aspect) - target), abs(b.height * b.width - area)),
    )


def find_bucket(height: int, width: int, native: int = SDXL_NATIVE) -> Bucket:
    """The bucket that is exactly ``height x width``, or :class:`UnknownBucketError`."""
    b = Bucket(height, width)
    table = buckets_for(native)
    if b in table:
        return b
    near = nearest_bucket(height, width, native)
    raise UnknownBucketError(
        f"{b} is not one of the {len(table)} SDXL buckets at native size {native}",
        f"use the nearest bucket {near}, or one of: {', '.join(map(str, table))}",
    )


def parse_bucket_list(text: str, native: int = SDXL_NATIVE) -> tuple[Bucket, ...]:
    """Parse ``"all"`` or ``"HxW,HxW,..."``; every size must be a bucket of ``native``."""
    if text.strip().lower() == "all":
        return buckets_for(native)
    out = []
    for part in text.split(","):
        if part.strip():
            b = Bucket.parse(part)
            out.append(find_bucket(b.height, b.width, native))
    if not out:
        raise InvalidRequestError("empty bucket list", "pass 'all' or sizes like 1024x1024,832x1216")
    return tuple(dict.fromkeys(out))


def with_hires_targets(buckets: tuple[Bucket, ...], scales: tuple[float, ...], multiple: int = 8
                       ) -> tuple[Bucket, ...]:
    """``buckets`` plus each one's hires-fix target at every scale (``int(side * scale)`` rounded
    down to ``multiple``, as :mod:`sdxl_export.runtime.hires` computes it), without duplicates."""
    out = list(buckets)
    for s in scales:
        out += [Bucket(int(b.height * s) // multiple * multiple, int(b.width * s) // multiple * multiple)
                for b in buckets]
    return tuple(dict.fromkeys(out))
