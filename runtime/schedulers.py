"""Schedulers (diffusers' own, never rewritten) and the timestep plans of base and refiner.

A scheduler is configured from the model's ``scheduler_config.json`` (the same dict
diffusers' pipelines load), with the overrides that define the named sampler: e.g.
DPM++ 2M Karras is ``DPMSolverMultistepScheduler.from_config(cfg, use_karras_sigmas=True)``,
as diffusers documents it. Schedulers hold per-call state (step index, solver history),
so the pipeline makes a fresh one per call: calls from several threads never share one.

:func:`base_timesteps` and :func:`refiner_timesteps` are line-for-line the timestep
logic of ``StableDiffusionXLPipeline.__call__`` (the ``denoising_end`` cut-off) and
``StableDiffusionXLImg2ImgPipeline.get_timesteps`` (``denoising_start``, the second-order
``+1``, ``set_begin_index``) in diffusers 0.3x-0.4x; :func:`strength_timesteps` is
``get_timesteps`` with ``strength`` (img2img without a hand-off). Each goes through
:func:`set_schedule`, diffusers' ``retrieve_timesteps`` (the step count, or the caller's own
``timesteps``/``sigmas``). The names (sampler + schedule type) are :mod:`sdxl_export.samplers`;
:func:`prepare_scheduler` seeds DPM++ SDE's Brownian tree per image from the request's generators.
"""

from __future__ import annotations

import copy
import inspect
import itertools
from collections.abc import Mapping
from typing import Any

import torch

from ..errors import InvalidRequestError
from ..samplers import SAMPLERS, canonical_name, resolve, scheduler_names

__all__ = ["SCHEDULERS", "SchedulerFactory", "base_timesteps", "canonical_name", "cut_at_end", "make_scheduler",
           "prepare_scheduler", "refiner_timesteps", "scheduler_names", "set_schedule", "step_kwargs",
           "strength_timesteps"]

#: name -> (diffusers class, config overrides) of every sampler without a schedule variant
#: (the full list, variants included, is :func:`scheduler_names`).
SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {s.name: (s.cls, dict(s.overrides)) for s in SAMPLERS}


def make_scheduler(name: str, config: Mapping[str, Any]) -> Any:
    """A fresh diffusers scheduler ``name`` configured from the model's scheduler config."""
    import diffusers

    cls_name, overrides = resolve(name)
    cls = getattr(diffusers, cls_name)
    return cls.from_config(dict(config), **overrides)


class SchedulerFactory:
    """Fresh schedulers per call, cheaply: ``from_config`` once per name, then deep copies.

    ``from_config`` introspects signatures (~25 ms); a deep copy of the untouched
    prototype is the same state in well under a millisecond. Prototypes are never
    stepped, so copying them from several threads at once is safe.
    """

    def __init__(self, config: Mapping[str, Any]):
        self.config = dict(config)
        self._prototypes: dict[str, Any] = {}

    def __call__(self, name: str) -> Any:
        key = canonical_name(name)
        proto = self._prototypes.get(key)
        if proto is None:
            proto = self._prototypes.setdefault(key, make_scheduler(key, self.config))
        return copy.deepcopy(proto)


_STEP_PARAMS: dict[type, frozenset[str]] = {}


def _step_params(cls: Any) -> frozenset[str]:
    """The parameters of ``cls.step``, introspected once per class."""
    params = _STEP_PARAMS.get(cls)
    if params is None:
        params = _STEP_PARAMS.setdefault(cls, frozenset(inspect.signature(cls.step).parameters))
    return params


def step_kwargs(scheduler: Any, generator: Any, eta: float = 0.0) -> dict[str, Any]:
    """diffusers' ``prepare_extra_step_kwargs``: ``eta`` and ``generator`` where ``step`` takes them."""
    params = _step_params(type(scheduler))
    out: dict[str, Any] = {}
    if "eta" in params:
        out["eta"] = eta
    if "generator" in params:
        out["generator"] = generator
    return out


def _valid_fraction(x: Any) -> bool:
    return isinstance(x, float) and 0 < x < 1


def takes_custom(scheduler_or_cls: Any, what: str) -> bool:
    """Whether ``set_timesteps`` takes ``what`` (``"timesteps"`` or ``"sigmas"``), as diffusers'
    ``retrieve_timesteps`` checks it."""
    cls = scheduler_or_cls if isinstance(scheduler_or_cls, type) else type(scheduler_or_cls)
    return what in inspect.signature(cls.set_timesteps).parameters


def set_schedule(scheduler: Any, num_inference_steps: int, device: torch.device,
                 timesteps: list[int] | None = None, sigmas: list[float] | None = None) -> int:
    """diffusers' ``retrieve_timesteps``: ``set_timesteps`` with the step count, or with the
    caller's own ``timesteps``/``sigmas`` (then the step count is their schedule's length).
    Returns the step count the pipelines carry on with."""
    if timesteps is not None and sigmas is not None:
        raise InvalidRequestError("pass either timesteps or sigmas, not both", "drop one of them")
    for what, values in (("timesteps", timesteps), ("sigmas", sigmas)):
        if values is None:
            continue
        if not takes_custom(scheduler, what):
            raise InvalidRequestError(
                f"{type(scheduler).__name__} does not take custom {what}",
                f"use a scheduler that does: {', '.join(custom_capable(what))}")
        try:
            scheduler.set_timesteps(**{what: list(values)}, device=device)
        except ValueError as exc:  # the scheduler's own check (e.g. LCM: timesteps within its schedule)
            raise InvalidRequestError(f"{type(scheduler).__name__} refuses these {what}: {exc}",
                                      f"pass {what} the scheduler accepts") from None
        return len(scheduler.timesteps)
    scheduler.set_timesteps(num_inference_steps, device=device)
    return num_inference_steps


def custom_capable(what: str) -> list[str]:
    """The samplers whose ``set_timesteps`` takes ``what``."""
    import diffusers

    return [s.name for s in SAMPLERS if takes_custom(getattr(diffusers, s.cls), what)]


def prepare_scheduler(scheduler: Any, generator: Any) -> Any:
    """Per-call seeding a scheduler needs beyond ``step(generator=...)``.

    DPM++ SDE (``DPMSolverSDEScheduler``) draws its noise from a torchsde Brownian tree seeded
    by its config's ``noise_sampler_seed`` (an int, or one per image), not from the pipeline's
    generator; unseeded, diffusers seeds it from torch's global RNG. Here it is seeded with the
    seed of the request's generator (``generator.initial_seed()``), one per image for a list of
    generators: ``DPMSolverSDEScheduler.from_config(cfg, noise_sampler_seed=seed)`` in diffusers
    (``[seed_0, seed_1, ...]`` for a batch) is the same image, and a batched image equals its own
    single run.
    """
    if hasattr(scheduler, "noise_sampler_seed") and getattr(scheduler, "noise_sampler", "x") is None:
        if isinstance(generator, (list, tuple)):
            scheduler.noise_sampler_seed = [int(g.initial_seed()) for g in generator]
        else:
            scheduler.noise_sampler_seed = int(generator.initial_seed())
    return scheduler


def base_timesteps(scheduler: Any, num_inference_steps: int, device: torch.device,
                   denoising_end: float | None, *, timesteps: list[int] | None = None,
                   sigmas: list[float] | None = None) -> torch.Tensor:
    """The base pipeline's timesteps, cut at ``denoising_end`` (begin index 0)."""
    set_schedule(scheduler, num_inference_steps, device, timesteps, sigmas)
    out = cut_at_end(scheduler, scheduler.timesteps, denoising_end)
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(0)
    return out


def cut_at_end(scheduler: Any, timesteps: torch.Tensor, denoising_end: float | None) -> torch.Tensor:
    """The ``denoising_end`` cut-off both SDXL pipelines apply to their timesteps (the hand-off)."""
    if denoising_end is None or not _valid_fraction(denoising_end):
        return timesteps
    n_train = scheduler.config.num_train_timesteps
    cutoff = round(n_train - (denoising_end * n_train))
    n = len(list(filter(lambda ts: ts >= cutoff, timesteps)))
    return timesteps[:n]


def strength_steps(num_inference_steps: int, strength: float) -> int:
    """How many of ``num_inference_steps`` an img2img call at ``strength`` runs (diffusers' rule)."""
    return min(int(num_inference_steps * strength), num_inference_steps)


def strength_timesteps(scheduler: Any, num_inference_steps: int, device: torch.device,
                       strength: float, *, timesteps: list[int] | None = None,
                       sigmas: list[float] | None = None) -> torch.Tensor:
    """img2img's timesteps at ``strength`` (``get_timesteps`` without ``denoising_start``): the
    last ``int(steps * strength)`` steps of the schedule, begin index set for ``add_noise``."""
    n = set_schedule(scheduler, num_inference_steps, device, timesteps, sigmas)
    t_start = max(n - strength_steps(n, strength), 0)
    out = scheduler.timesteps[t_start * scheduler.order:]
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(t_start * scheduler.order)
    return out


def refiner_timesteps(scheduler: Any, num_inference_steps: int, device: torch.device,
                      denoising_start: float, *, timesteps: list[int] | None = None,
                      sigmas: list[float] | None = None) -> torch.Tensor:
    """The img2img pipeline's timesteps from ``denoising_start`` on (sets the begin index)."""
    set_schedule(scheduler, num_inference_steps, device, timesteps, sigmas)
    n_train = scheduler.config.num_train_timesteps
    cutoff = round(n_train - (denoising_start * n_train))
    n = int((scheduler.timesteps < cutoff).sum().item())
    if scheduler.order == 2 and n % 2 == 0:
        n = n + 1
    t_start = len(scheduler.timesteps) - n
    out = scheduler.timesteps[t_start:]
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(t_start)
    return out


def check_schedule_args(scheduler: str, eta: Any, timesteps: Any, sigmas: Any
                        ) -> tuple[float, list[int] | None, list[float] | None]:
    """Check ``eta`` and custom ``timesteps``/``sigmas`` before any work, with the rules of
    diffusers' ``retrieve_timesteps`` (one of the two, and only for a scheduler whose
    ``set_timesteps`` takes it) plus the ones it leaves to crash later (types, order)."""
    import math

    import diffusers

    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not math.isfinite(eta) or eta < 0:
        raise InvalidRequestError(f"eta must be a finite number >= 0, got {eta!r}",
                                  "pass eta such as 0.0 (DDIM deterministic) or 0.3 (TCD's usual)")
    if timesteps is not None and sigmas is not None:
        raise InvalidRequestError("pass either timesteps or sigmas, not both", "drop one of them")
    cls = getattr(diffusers, resolve(scheduler)[0])
    out_t = out_s = None
    if timesteps is not None:
        if (not isinstance(timesteps, (list, tuple)) or not timesteps
                or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in timesteps)):
            raise InvalidRequestError(f"timesteps must be a non-empty list of integers >= 0, got {timesteps!r}",
                                      "pass e.g. timesteps=[999, 749, 499, 249] (DMD2)")
        if any(a <= b for a, b in itertools.pairwise(timesteps)):
            raise InvalidRequestError(f"timesteps must be strictly decreasing, got {list(timesteps)}",
                                      "pass them from the noisiest down, e.g. [999, 749, 499, 249]")
        out_t = [int(t) for t in timesteps]
    if sigmas is not None:
        if (not isinstance(sigmas, (list, tuple)) or not sigmas
                or not all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x >= 0
                           for x in sigmas)):
            raise InvalidRequestError(f"sigmas must be a non-empty list of numbers >= 0, got {sigmas!r}",
                                      "pass e.g. sigmas=[14.6, 3.0, 0.9, 0.2]")
        if any(a < b for a, b in itertools.pairwise(sigmas)):
            raise InvalidRequestError(f"sigmas must be non-increasing, got {list(sigmas)}",
                                      "pass them from the noisiest down")
        out_s = [float(x) for x in sigmas]
    for what, values in (("timesteps", out_t), ("sigmas", out_s)):
        if values is not None and not takes_custom(cls, what):
            raise InvalidRequestError(f"scheduler {scheduler!r} ({cls.__name__}) does not take custom {what}",
                                      f"use a scheduler that does: {', '.join(custom_capable(what))}")
    return float(eta), out_t, out_s
