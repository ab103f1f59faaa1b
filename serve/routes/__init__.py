"""The app's routes, one :class:`fastapi.APIRouter` per API.

``ops`` (probes, metrics, info), ``openai`` (OpenAI Images), ``native`` (``/v1/generate`` and
its progress stream), ``a1111`` (the AUTOMATIC1111 web UI API). Every router uses
:class:`~sdxl_export.serve.http.GuardedRoute`, so what a route raises is rendered by the
app's exception handler; routes reach the service through
:func:`~sdxl_export.serve.context.ctx`. A feature adds its routes the same way from its own
module: ``build_app(get_service, config, routers=[router])``.
"""

from __future__ import annotations

from fastapi import APIRouter

from ..http import GuardedRoute


def new_router(**kwargs: object) -> APIRouter:
    """An APIRouter whose routes' failures go to the app's error handler."""
    return APIRouter(route_class=GuardedRoute, **kwargs)  # type: ignore[arg-type]
