"""The samplers and schedule types the runtime offers, by name, mapped onto diffusers' classes.

A scheduler name is a *sampler* optionally followed by a *schedule type*:
``dpmpp_2m_sde_karras`` is the sampler ``dpmpp_2m_sde`` (diffusers'
``DPMSolverMultistepScheduler`` with ``algorithm_type="sde-dpmsolver++"``) with the
schedule ``karras`` (``use_karras_sigmas=True``). Every name resolves to one diffusers
class and the config overrides to apply to the model's own ``scheduler_config.json`` with
``from_config`` -- diffusers' documented way to pick a sampler; nothing is re-implemented.

The mapping from AUTOMATIC1111's sampler and schedule-type names is diffusers' own table
(its scheduler docs): Euler -> EulerDiscrete, Euler a -> EulerAncestralDiscrete, Heun,
LMS, DPM2 -> KDPM2Discrete, DPM2 a -> KDPM2AncestralDiscrete, DPM++ 2M ->
DPMSolverMultistep, DPM++ 2M SDE -> DPMSolverMultistep(sde-dpmsolver++), DPM++ SDE ->
DPMSolverSDE, DPM++ 2S a -> DPMSolverSinglestep (diffusers' nearest: it is not ancestral),
LCM; schedule types Karras -> ``use_karras_sigmas``, Exponential ->
``use_exponential_sigmas``, Beta -> ``use_beta_sigmas``, SGM Uniform -> ``timestep_spacing=
"trailing"``, Uniform -> ``timestep_spacing="linspace"`` (k-diffusion's ``get_sigmas``: the
model's discrete sigmas at evenly spaced timesteps). ``Automatic`` keeps the model's config.

A schedule type is offered with a sampler only when the diffusers class takes the config
key it sets (introspected from the class), so every listed name builds.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Any

from .errors import InvalidRequestError


@dataclass(frozen=True)
class Sampler:
    """One sampler: our name, the diffusers class and its overrides, A1111's name for it."""

    name: str
    cls: str
    overrides: tuple[tuple[str, Any], ...] = ()
    a1111: str | None = None
    aliases: tuple[str, ...] = ()  # extra spellings (k-diffusion's, A1111's sampler_index)
    note: str = ""


SAMPLERS: tuple[Sampler, ...] = (
    Sampler("euler", "EulerDiscreteScheduler", a1111="Euler", aliases=("k_euler",)),
    Sampler("euler_a", "EulerAncestralDiscreteScheduler", a1111="Euler a", aliases=("k_euler_a", "euler_ancestral")),
    Sampler("heun", "HeunDiscreteScheduler", a1111="Heun", aliases=("k_heun",)),
    Sampler("lms", "LMSDiscreteScheduler", a1111="LMS", aliases=("k_lms",)),
    Sampler("dpm2", "KDPM2DiscreteScheduler", a1111="DPM2", aliases=("k_dpm_2", "kdpm2")),
    Sampler("dpm2_a", "KDPM2AncestralDiscreteScheduler", a1111="DPM2 a", aliases=("k_dpm_2_a", "kdpm2_a")),
    Sampler("dpmpp_2m", "DPMSolverMultistepScheduler",
            (("algorithm_type", "dpmsolver++"), ("solver_order", 2)), a1111="DPM++ 2M", aliases=("k_dpmpp_2m",)),
    Sampler("dpmpp_2m_sde", "DPMSolverMultistepScheduler",
            (("algorithm_type", "sde-dpmsolver++"), ("solver_order", 2)), a1111="DPM++ 2M SDE",
            aliases=("k_dpmpp_2m_sde",)),
    Sampler("dpmpp_sde", "DPMSolverSDEScheduler", a1111="DPM++ SDE", aliases=("k_dpmpp_sde",)),
    Sampler("dpmpp_2s", "DPMSolverSinglestepScheduler",
            (("algorithm_type", "dpmsolver++"), ("solver_order", 2)), a1111="DPM++ 2S a",
            aliases=("k_dpmpp_2s_a", "dpmpp_2s_a", "dpmpp_singlestep"),
            note="diffusers' DPMSolverSinglestep (not ancestral), its nearest to A1111's DPM++ 2S a"),
    Sampler("deis", "DEISMultistepScheduler", a1111="DEIS"),
    Sampler("ddim", "DDIMScheduler", a1111="DDIM"),
    Sampler("unipc", "UniPCMultistepScheduler", a1111="UniPC"),
    Sampler("lcm", "LCMScheduler", a1111="LCM"),
    Sampler("tcd", "TCDScheduler", a1111="TCD"),
)
BY_NAME = {s.name: s for s in SAMPLERS}


@dataclass(frozen=True)
class Schedule:
    """A schedule type: the config it sets, the key a class must take for it, A1111's label."""

    name: str
    overrides: tuple[tuple[str, Any], ...]
    a1111: str
    label: str
    aliases: tuple[str, ...] = ()


_SIGMA_FLAGS = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")


def _sigmas(flag: str) -> tuple[tuple[str, Any], ...]:
    return tuple((f, f == flag) for f in _SIGMA_FLAGS)


SCHEDULES: tuple[Schedule, ...] = (
    Schedule("karras", _sigmas("use_karras_sigmas"), "karras", "Karras"),
    Schedule("exponential", _sigmas("use_exponential_sigmas"), "exponential", "Exponential"),
    Schedule("beta", _sigmas("use_beta_sigmas"), "beta", "Beta"),
    Schedule("trailing", (("timestep_spacing", "trailing"),), "sgm_uniform", "SGM Uniform",
             aliases=("sgm_uniform", "sgmuniform")),
    Schedule("uniform", (("timestep_spacing", "linspace"),), "uniform", "Uniform", aliases=("linspace",)),
)
SCHEDULE_BY_NAME = {s.name: s for s in SCHEDULES}
_SCHEDULE_SPELLINGS = {a: s.name for s in SCHEDULES for a in (s.name, *s.aliases)}
_SAMPLER_SPELLINGS = {a: s.name for s in SAMPLERS for a in (s.name, *s.aliases)}


@functools.cache
def _init_params(cls_name: str) -> frozenset[str]:
    import diffusers

    return frozenset(inspect.signature(getattr(diffusers, cls_name).__init__).parameters)


def supports(sampler: Sampler, schedule: Schedule) -> bool:
    """Whether ``sampler``'s class takes every config key ``schedule`` sets."""
    params = _init_params(sampler.cls)
    return all(k in params for k, _ in schedule.overrides)


def schedules_for(sampler: str) -> tuple[str, ...]:
    s = BY_NAME[sampler]
    return tuple(sch.name for sch in SCHEDULES if supports(s, sch))


@functools.lru_cache(maxsize=1)
def scheduler_names() -> tuple[str, ...]:
    """Every scheduler name the runtime takes: each sampler, then its schedule-type variants."""
    names = [s.name for s in SAMPLERS]
    names += [f"{s.name}_{sch}" for s in SAMPLERS for sch in schedules_for(s.name)]
    return tuple(names)


def _normalise(name: str) -> str:
    key = str(name).strip().lower().replace("++", "pp").replace("+", "p")
    for ch in "- .":
        key = key.replace(ch, "_")
    while "__" in key:
        key = key.replace("__", "_")
    return key


def split_name(name: str) -> tuple[str, str | None]:
    """``name`` -> (sampler, schedule or None), accepting our names, their aliases and spacing
    variants (``DPM++ 2M SDE Karras``, ``k_euler_a``, ``euler-sgm_uniform``). Raises
    :class:`InvalidRequestError` listing ours."""
    key = _normalise(name)
    if key in _SAMPLER_SPELLINGS:
        return _SAMPLER_SPELLINGS[key], None
    for spelling in sorted(_SCHEDULE_SPELLINGS, key=len, reverse=True):
        head = key[: -len(spelling) - 1]
        if key.endswith("_" + spelling) and head in _SAMPLER_SPELLINGS:
            sampler, schedule = _SAMPLER_SPELLINGS[head], _SCHEDULE_SPELLINGS[spelling]
            if schedule not in schedules_for(sampler):
                raise InvalidRequestError(
                    f"scheduler {name!r}: {BY_NAME[sampler].cls} has no {schedule!r} schedule",
                    f"{sampler} takes: {', '.join(schedules_for(sampler)) or 'no schedule variants'}")
            return sampler, schedule
    raise InvalidRequestError(
        f"unknown scheduler {name!r}",
        f"use a sampler ({', '.join(s.name for s in SAMPLERS)}), optionally with a schedule type "
        f"({', '.join('_' + s.name for s in SCHEDULES)}), e.g. dpmpp_2m_karras or euler_trailing "
        "(the full list: scheduler_names(), GET /v1/info)")


def canonical_name(name: str) -> str:
    """The one spelling of a scheduler name (``sampler`` or ``sampler_schedule``)."""
    sampler, schedule = split_name(name)
    return sampler if schedule is None else f"{sampler}_{schedule}"


def resolve(name: str) -> tuple[str, dict[str, Any]]:
    """``name`` -> (diffusers class name, ``from_config`` overrides)."""
    sampler, schedule = split_name(name)
    s = BY_NAME[sampler]
    overrides = dict(s.overrides)
    if schedule is not None:
        overrides.update(SCHEDULE_BY_NAME[schedule].overrides)
    return s.cls, overrides


# ---- AUTOMATIC1111 names -----------------------------------------------------------------------
def a1111_samplers() -> list[dict[str, Any]]:
    """``GET /sdapi/v1/samplers``: A1111's shape (name, aliases, options)."""
    out = []
    for s in SAMPLERS:
        opts = {"scheduler": ",".join(["automatic", *(SCHEDULE_BY_NAME[x].a1111 for x in schedules_for(s.name))])}
        if s.note:
            opts["note"] = s.note
        out.append({"name": s.a1111, "aliases": [s.name, *s.aliases], "options": opts})
    return out


def a1111_schedulers() -> list[dict[str, Any]]:
    """``GET /sdapi/v1/schedulers``: A1111's shape."""
    out = [{"name": "automatic", "label": "Automatic", "aliases": None, "default_rho": -1,
            "need_inner_model": False}]
    for sch in SCHEDULES:
        out.append({"name": sch.a1111, "label": sch.label, "aliases": list(sch.aliases) or None,
                    "default_rho": 7.0 if sch.name == "karras" else -1, "need_inner_model": False})
    return out


def from_a1111(sampler_name: str | None, schedule: str | None) -> tuple[Sampler, str]:
    """A1111's ``sampler_name`` (also the pre-1.9 combined names such as ``DPM++ 2M Karras``) and
    ``scheduler`` field -> (sampler, our scheduler name). Raises :class:`InvalidRequestError`
    naming what is available."""
    wanted = (sampler_name or "Euler").strip()
    by_a1111 = {_normalise(s.a1111): s.name for s in SAMPLERS if s.a1111}
    key = _normalise(wanted)
    sampler, implied = by_a1111.get(key), None
    if sampler is None:
        try:
            sampler, implied = split_name(wanted)
        except InvalidRequestError:
            for a, name in by_a1111.items():  # "DPM2 a Karras": A1111 name + schedule label
                if key.startswith(a + "_") and key[len(a) + 1:] in _SCHEDULE_SPELLINGS:
                    sampler, implied = name, _SCHEDULE_SPELLINGS[key[len(a) + 1:]]
                    break
        if sampler is None:
            raise InvalidRequestError(
                f"sampler {sampler_name!r} is not available",
                f"use one of: {', '.join(s.a1111 for s in SAMPLERS if s.a1111)} (GET /sdapi/v1/samplers)") from None
    sch_key = _normalise(schedule or "automatic")
    if sch_key in ("automatic", ""):
        chosen = implied
    elif sch_key in _SCHEDULE_SPELLINGS:
        chosen = _SCHEDULE_SPELLINGS[sch_key]
    else:
        raise InvalidRequestError(
            f"schedule type {schedule!r} is not available",
            f"use one of: Automatic, {', '.join(s.label for s in SCHEDULES)} (GET /sdapi/v1/schedulers)")
    if chosen is not None and chosen not in schedules_for(sampler):
        raise InvalidRequestError(
            f"schedule type {SCHEDULE_BY_NAME[chosen].label!r} is not available with {BY_NAME[sampler].a1111}",
            f"{BY_NAME[sampler].a1111} takes: Automatic"
            + "".join(f", {SCHEDULE_BY_NAME[x].label}" for x in schedules_for(sampler)))
    return BY_NAME[sampler], sampler if chosen is None else f"{sampler}_{chosen}"


def schedule_label(scheduler: str) -> str:
    """A1111's schedule-type label of one of our names (``Automatic`` without a variant)."""
    _, schedule = split_name(scheduler)
    return "Automatic" if schedule is None else SCHEDULE_BY_NAME[schedule].label
