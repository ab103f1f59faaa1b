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
``get_timesteps`` with ``strength`` (img2img without a hand-off).
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Mapping
from typing import Any

import torch

from ..errors import InvalidRequestError

#: name -> (diffusers class, config overrides).
SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler",
                 {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": False}),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler",
                        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True}),
    "ddim": ("DDIMScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
}

ALIASES = {
    "euler_ancestral": "euler_a",
    "dpm++_2m": "dpmpp_2m",
    "dpm++2m": "dpmpp_2m",
    "dpm++_2m_karras": "dpmpp_2m_karras",
    "dpm++2m_karras": "dpmpp_2m_karras",
}


def scheduler_names() -> tuple[str, ...]:
    return tuple(SCHEDULERS)


def canonical_name(name: str) -> str:
    key = str(name).strip().lower().replace("-", "_").replace(" ", "_")
    key = ALIASES.get(key, key)
    if key not in SCHEDULERS:
        raise InvalidRequestError(f"unknown scheduler {name!r}", f"use one of: {', '.join(SCHEDULERS)}")
    return key


def make_scheduler(name: str, config: Mapping[str, Any]) -> Any:
    """A fresh diffusers scheduler ``name`` configured from the model's scheduler config."""
    import diffusers

    cls_name, overrides = SCHEDULERS[canonical_name(name)]
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


def base_timesteps(scheduler: Any, num_inference_steps: int, device: torch.device,
                   denoising_end: float | None) -> torch.Tensor:
    """The base pipeline's timesteps, cut at ``denoising_end`` (begin index 0)."""
    scheduler.set_timesteps(num_inference_steps, device=device)
    timesteps = cut_at_end(scheduler, scheduler.timesteps, denoising_end)
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(0)
    return timesteps


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
                       strength: float) -> torch.Tensor:
    """img2img's timesteps at ``strength`` (``get_timesteps`` without ``denoising_start``): the
    last ``int(steps * strength)`` steps of the schedule, begin index set for ``add_noise``."""
    scheduler.set_timesteps(num_inference_steps, device=device)
    t_start = max(num_inference_steps - strength_steps(num_inference_steps, strength), 0)
    timesteps = scheduler.timesteps[t_start * scheduler.order:]
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(t_start * scheduler.order)
    return timesteps


def refiner_timesteps(scheduler: Any, num_inference_steps: int, device: torch.device,
                      denoising_start: float) -> torch.Tensor:
    """The img2img pipeline's timesteps from ``denoising_start`` on (sets the begin index)."""
    scheduler.set_timesteps(num_inference_steps, device=device)
    n_train = scheduler.config.num_train_timesteps
    cutoff = round(n_train - (denoising_start * n_train))
    n = int((scheduler.timesteps < cutoff).sum().item())
    if scheduler.order == 2 and n % 2 == 0:
        n = n + 1
    t_start = len(scheduler.timesteps) - n
    timesteps = scheduler.timesteps[t_start:]
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(t_start)
    return timesteps
