"""Optimization-profile planner: which input shapes each engine must serve.

A TensorRT engine only runs shapes inside one of its optimization profiles
(min <= shape <= max per dim), and its kernels are tuned for each profile's ``opt``
shape. SDXL serves 40 aspect buckets (scaled to the model's native size by
:func:`~sdxl_export.buckets.buckets_for`) at a few batch sizes, so the planner decides,
per component, a list of profiles that together cover every requested (bucket, batch).

Everything is derived from the :class:`~sdxl_export.specs.ComponentSpec`: the planner
never names an input or a fixed dim itself. A component whose inputs have no spatial
symbolic dim (the text encoders) is planned over batch only.

Modes
  ``static``    one profile per (bucket, batch), min = opt = max: fastest kernels, most
                profiles (build time grows with the profile count).
  ``bucketed``  neighbouring buckets (in aspect-ratio order) are split into the fewest
                groups whose bounding box (max height x max width) stays within
                ``max_area_ratio`` (default 1.5) of the largest real bucket in the group:
                TensorRT sizes activation memory for a profile's max shape, so this bounds
                the memory wasted on shapes no bucket has. ``opt`` is a real bucket (the
                group's middle one by aspect). All profiles live in ONE engine, so the
                weights are stored once.
  ``dynamic``   one profile spanning every requested shape, ``opt`` at the bucket nearest
                to square at native size.

Batch: the runtime calls each component at a multiple of the prompt batch B
(:data:`BATCH_MULTIPLIERS`): the UNets at 2B (classifier-free guidance runs negative and
positive together; ``opt`` is tuned there) or B (guidance off), the text encoders at B or
2B (negatives encoded alone or with the prompts), the VAE at B.

TensorRT limits respected (TensorRT 10): tensor rank <= ``Dims.MAX_DIMS`` (8), every dim
>= 1, min <= opt <= max, at most :data:`TRT_MAX_PROFILES` profiles per engine and tensor
volumes below 2**31 elements (the int32 indexing limit many TensorRT kernels keep).
TensorRT 10 documents no hard cap on profiles per engine; each profile adds tactic
timing to the build and per-profile metadata to the plan, so we cap at 2**7 = 128, which
admits ``static`` over all 40 SDXL buckets for UNet batches {1, 2} or {1, 2, 4}
(prompt batch sizes 1 or 1,2).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..buckets import Bucket, buckets_for, sdxl_bucket_map
from ..errors import InvalidRequestError
from ..specs import ComponentSpec, level_dims

log = logging.getLogger(__name__)

MODES = ("static", "bucketed", "dynamic")
DEFAULT_MODE = "bucketed"

#: ``trt.Dims.MAX_DIMS`` in TensorRT 10 (tensorrt-stubs 10.13: ``MAX_DIMS = 8``).
TRT_MAX_DIMS = 8
#: Profiles per engine we allow (2**7); see the module docstring.
TRT_MAX_PROFILES = 128
#: Largest tensor volume (elements) we plan for.
TRT_MAX_VOLUME = 2**31 - 1
#: Bucketed mode: a profile's bounding box may hold at most this x the largest bucket's pixels.
DEFAULT_MAX_AREA_RATIO = 1.5

#: Component kind -> multiples of the prompt batch it is called at (first = most common).
BATCH_MULTIPLIERS: dict[str, tuple[int, ...]] = {
    "text_encoder": (1, 2),
    "unet": (2, 1),
    "unet_controlnet": (2, 1),
    "controlnet": (2, 1),  # guess mode runs it on the conditional half only
    "vae_decoder": (1,),
    "vae_encoder": (1,),
}

SPATIAL_DIMS = ("latent_height", "latent_width", "height", "width")

Shape = tuple[int, ...]


class PlanError(InvalidRequestError):
    """A requested plan breaks a TensorRT limit or leaves a bucket uncovered."""


@dataclass(frozen=True)
class PlannedProfile:
    """One optimization profile: per input ``(min, opt, max)`` and what it serves.

    ``buckets`` are the buckets this profile was planned for (all requested buckets for
    a component without spatial dims); ``batch_sizes`` the component batch sizes.
    """

    shapes: Mapping[str, tuple[Shape, Shape, Shape]]
    buckets: tuple[Bucket, ...]
    batch_sizes: tuple[int, ...]
    opt_bucket: Bucket | None = None

    def covers(self, input_shapes: Mapping[str, Sequence[int]]) -> bool:
        """True when every given input's shape lies within this profile's min..max."""
        for name, shape in input_shapes.items():
            if name not in self.shapes:
                return False
            lo, _, hi = self.shapes[name]
            if len(shape) != len(lo) or any(not (a <= int(s) <= b) for a, s, b in zip(lo, shape, hi)):
                return False
        return True

    def to_dict(self) -> dict[str, Any]:
        return {
            "shapes": {
                n: {"min": list(lo), "opt": list(opt), "max": list(hi)} for n, (lo, opt, hi) in self.shapes.items()
            },
            "buckets": [str(b) for b in self.buckets],
            "batch_sizes": list(self.batch_sizes),
            "opt_bucket": str(self.opt_bucket) if self.opt_bucket else None,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PlannedProfile:
        return cls(
            shapes={
                n: (tuple(s["min"]), tuple(s["opt"]), tuple(s["max"])) for n, s in d["shapes"].items()
            },
            buckets=tuple(Bucket.parse(b) for b in d.get("buckets", [])),
            batch_sizes=tuple(int(b) for b in d.get("batch_sizes", [])),
            opt_bucket=Bucket.parse(d["opt_bucket"]) if d.get("opt_bucket") else None,
        )


@dataclass(frozen=True)
class ComponentPlan:
    """The profiles of one component's engine."""

    name: str
    spec: ComponentSpec
    profiles: tuple[PlannedProfile, ...]
    batch_sizes: tuple[int, ...]
    spatial: bool

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.spec.kind,
            "spatial": self.spatial,
            "batch_sizes": list(self.batch_sizes),
            "profiles": [p.to_dict() for p in self.profiles],
        }


@dataclass(frozen=True)
class Plan:
    """Profiles for every component, plus the request they were planned from."""

    mode: str
    native_size: int
    buckets: tuple[Bucket, ...]
    batch_sizes: tuple[int, ...]
    components: Mapping[str, ComponentPlan] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "native_size": self.native_size,
            "buckets": [str(b) for b in self.buckets],
            # Which of the paper's 40 buckets this plan serves, and as which size here
            # (identity at SDXL's native 1024; scaled for smaller presets).
            "sdxl_buckets": {str(k): str(v) for k, v in sdxl_bucket_map(self.native_size).items()
                             if v in self.buckets},
            "batch_sizes": list(self.batch_sizes),
            "limits": {"max_profiles_per_engine": TRT_MAX_PROFILES, "max_dims": TRT_MAX_DIMS,
                       "max_volume": TRT_MAX_VOLUME},
            "components": {n: c.to_dict() for n, c in self.components.items()},
        }


# ---- helpers ---------------------------------------------------------------------------------
def is_spatial(spec: ComponentSpec) -> bool:
    return any(isinstance(d, str) and d in SPATIAL_DIMS for t in spec.inputs for d in t.shape)


def component_batches(spec: ComponentSpec, batch_sizes: Sequence[int]) -> tuple[int, ...]:
    mults = BATCH_MULTIPLIERS.get(spec.kind, (1,))
    return tuple(sorted({m * b for b in batch_sizes for m in mults}))


def opt_batch(spec: ComponentSpec, batch_sizes: Sequence[int]) -> int:
    return BATCH_MULTIPLIERS.get(spec.kind, (1,))[0] * batch_sizes[0]


def square_bucket(buckets: Sequence[Bucket], native: int) -> Bucket:
    """The bucket nearest to square, then nearest to ``native``^2 pixels."""
    return min(buckets, key=lambda b: (abs(math.log(b.aspect)), abs(b.height * b.width - native * native)))


def group_buckets(buckets: Sequence[Bucket], max_area_ratio: float = DEFAULT_MAX_AREA_RATIO) -> list[list[Bucket]]:
    """Split aspect-sorted buckets into the fewest contiguous groups whose bounding box
    holds at most ``max_area_ratio`` x the pixels of the group's largest bucket.

    Exact by dynamic programming over split points (n <= a few dozen buckets): fewest
    groups first, then the least total bounding-box overshoot. Contiguity in aspect order
    keeps each profile's (height, width) ranges narrow; a lone bucket always qualifies.
    """
    ordered = sorted(dict.fromkeys(buckets), key=lambda b: (b.aspect, b.height * b.width))
    n = len(ordered)

    def overshoot(i: int, j: int) -> float:
        g = ordered[i:j]
        box = max(x.height for x in g) * max(x.width for x in g)
        return box / max(x.height * x.width for x in g)

    inf = (math.inf, math.inf)
    best: list[tuple[float, float]] = [(0, 0.0)] + [inf] * n
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(j):
            r = overshoot(i, j)
            if r > max_area_ratio and j - i > 1:
                continue
            cand = (best[i][0] + 1, best[i][1] + r)
            if cand < best[j]:
                best[j], cut[j] = cand, i
    groups: list[list[Bucket]] = []
    j = n
    while j > 0:
        groups.append(ordered[cut[j]:j])
        j = cut[j]
    return groups[::-1]


def _ranged(spec: ComponentSpec, points: Iterable[tuple[int, int, int]], opt: tuple[int, int, int]
            ) -> dict[str, tuple[Shape, Shape, Shape]]:
    """Per input: elementwise min / max over ``points`` (batch, h, w) and the shape at ``opt``."""
    all_shapes = [spec.input_shapes(*p) for p in points]
    opt_shapes = spec.input_shapes(*opt)
    out: dict[str, tuple[Shape, Shape, Shape]] = {}
    for t in spec.inputs:
        col = [s[t.name] for s in all_shapes]
        lo = tuple(min(dim) for dim in zip(*col))
        hi = tuple(max(dim) for dim in zip(*col))
        out[t.name] = (lo, opt_shapes[t.name], hi)
    return out


def _profile(spec: ComponentSpec, buckets: Sequence[Bucket], batches: Sequence[int], opt_b: Bucket | None,
             opt_n: int, native: int) -> PlannedProfile:
    sizes = [(b.height, b.width) for b in buckets] if opt_b is not None else [(native, native)]
    points = [(n, h, w) for n in batches for h, w in sizes]
    opt_hw = (opt_b.height, opt_b.width) if opt_b is not None else (native, native)
    return PlannedProfile(
        shapes=_ranged(spec, points, (opt_n, *opt_hw)),
        buckets=tuple(buckets),
        batch_sizes=tuple(batches),
        opt_bucket=opt_b,
    )


# ---- planning ----------------------------------------------------------------------------------
def plan_component(
    spec: ComponentSpec,
    buckets: Sequence[Bucket],
    batch_sizes: Sequence[int],
    mode: str,
    native: int,
    *,
    max_area_ratio: float = DEFAULT_MAX_AREA_RATIO,
    max_profiles: int = TRT_MAX_PROFILES,
) -> ComponentPlan:
    """Plan one component's profiles (see the module docstring for the modes)."""
    batches = component_batches(spec, batch_sizes)
    n_opt = opt_batch(spec, batch_sizes)
    spatial = is_spatial(spec)
    profiles: list[PlannedProfile] = []
    if not spatial:
        # Text encoders: the bucket does not change any shape; plan over batch only.
        groups = [[n] for n in batches] if mode == "static" else [list(batches)]
        for g in groups:
            opt_n = n_opt if n_opt in g else g[0]
            profiles.append(_profile(spec, buckets, g, None, opt_n, native))
    elif mode == "static":
        for b in buckets:
            for n in batches:
                profiles.append(_profile(spec, [b], [n], b, n, native))
    elif mode == "dynamic":
        profiles.append(_profile(spec, buckets, batches, square_bucket(buckets, native), n_opt, native))
    elif mode == "bucketed":
        ratio = max_area_ratio
        groups_b = group_buckets(buckets, ratio)
        while len(groups_b) > max_profiles:  # only with very many custom buckets
            ratio *= 1.25
            groups_b = group_buckets(buckets, ratio)
        for grp in groups_b:
            profiles.append(_profile(spec, grp, batches, grp[(len(grp) - 1) // 2], n_opt, native))
    else:
        raise PlanError(f"unknown profile mode {mode!r}", f"use one of: {', '.join(MODES)}")
    plan = ComponentPlan(spec.name, spec, tuple(profiles), batches, spatial)
    check_limits(plan, buckets, max_profiles=max_profiles)
    return plan


def plan_profiles(
    specs: Mapping[str, ComponentSpec],
    *,
    native: int,
    buckets: Sequence[Bucket] | None = None,
    batch_sizes: Sequence[int] = (1,),
    mode: str = DEFAULT_MODE,
    max_area_ratio: float = DEFAULT_MAX_AREA_RATIO,
    max_profiles: int = TRT_MAX_PROFILES,
) -> Plan:
    """Plan every component of ``specs`` for ``buckets`` (default: all, at ``native``)."""
    if mode not in MODES:
        raise PlanError(f"unknown profile mode {mode!r}", f"use one of: {', '.join(MODES)}")
    chosen = tuple(dict.fromkeys(buckets)) if buckets else buckets_for(native)
    sizes = tuple(dict.fromkeys(int(b) for b in batch_sizes))
    if not sizes or any(b < 1 for b in sizes):
        raise PlanError(f"invalid batch sizes {list(batch_sizes)}", "pass positive integers, e.g. --batch-sizes 1,2")
    comps = {
        name: plan_component(spec, chosen, sizes, mode, native, max_area_ratio=max_area_ratio,
                             max_profiles=max_profiles)
        for name, spec in specs.items()
    }
    for c in comps.values():
        log.debug("%s: %d %s profile(s)", c.name, len(c.profiles), mode)
    return Plan(mode, native, chosen, sizes, comps)


def check_limits(plan: ComponentPlan, buckets: Sequence[Bucket], *, max_profiles: int = TRT_MAX_PROFILES) -> None:
    """Raise :class:`PlanError` if ``plan`` breaks a TensorRT limit or misses a bucket."""
    if len(plan.profiles) > max_profiles:
        raise PlanError(
            f"{plan.name}: {len(plan.profiles)} profiles exceed the limit of {max_profiles} per engine",
            "use --profiles bucketed (or dynamic), or fewer --buckets / --batch-sizes",
        )
    for i, p in enumerate(plan.profiles):
        for name, (lo, opt, hi) in p.shapes.items():
            where = f"{plan.name} profile {i} input {name}"
            if len(lo) > TRT_MAX_DIMS:
                raise PlanError(f"{where}: rank {len(lo)} > TensorRT's {TRT_MAX_DIMS}", "re-export with a lower rank")
            if min(lo, default=1) < 1 or any(not (a <= o <= b) for a, o, b in zip(lo, opt, hi)):
                raise PlanError(f"{where}: invalid range min={lo} opt={opt} max={hi}", "report this as a bug")
            if math.prod(hi) > TRT_MAX_VOLUME:
                raise PlanError(
                    f"{where}: max shape {hi} has more than 2**31-1 elements",
                    "use smaller --batch-sizes or fewer large --buckets",
                )
        for t in plan.spec.outputs:
            hi_out = t.concrete(_max_dims(plan.spec, p))
            if math.prod(hi_out) > TRT_MAX_VOLUME:
                raise PlanError(
                    f"{plan.name} profile {i} output {t.name}: max shape {hi_out} has more than 2**31-1 elements",
                    "use smaller --batch-sizes or fewer large --buckets",
                )
    # Every requested (bucket, batch) must be served by a profile that lists it and covers it.
    for b in buckets if plan.spatial else buckets[:1]:
        for n in plan.batch_sizes:
            shapes = plan.spec.input_shapes(n, b.height, b.width)
            if not any(b in p.buckets and n in p.batch_sizes and p.covers(shapes) for p in plan.profiles):
                raise PlanError(f"{plan.name}: bucket {b} at batch {n} is served by no profile",
                                "report this as a bug")


def _max_dims(spec: ComponentSpec, profile: PlannedProfile) -> dict[str, int]:
    """Symbolic dim values at a profile's max shapes (pixel dims from latent ones and back)."""
    dims: dict[str, int] = {}
    for t in spec.inputs:
        hi = profile.shapes[t.name][2]
        for d, v in zip(t.shape, hi):
            if isinstance(d, str):
                dims[d] = max(dims.get(d, 0), int(v))
    s = spec.vae_scale
    for px, lat in (("height", "latent_height"), ("width", "latent_width")):
        if lat in dims:
            dims.setdefault(px, dims[lat] * s)
        elif px in dims:
            dims.setdefault(lat, dims[px] // s)
    return level_dims(dims)  # a ControlNet's residuals at the deeper levels
