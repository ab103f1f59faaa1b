"""OpenAI Images API: ``POST /v1/images/generations`` and ``GET /v1/models``.

What the official ``openai`` client sends (``client.images.generate(model=, prompt=, n=,
size="WxH", response_format="b64_json", extra_body={...})``): a JSON body whose extra keys
are ours (``negative_prompt``, ``seed``, ``steps``, ``guidance_scale``, ``scheduler``,
``refiner``, ``denoising_end``). Fields not given take the runtime's defaults (as
``sdxl-export run``): 30 steps, guidance 5, Euler, refiner on at 0.8 where one was built,
no negative prompt (SDXL's zero negative conditioning). Image i of ``n`` uses ``seed + i``.

OpenAI fields we cannot honour at a non-default value (``response_format: "url"``,
``quality: "hd"``, ``style``, streaming, other output formats) are a 400 naming the field;
unknown fields are refused as OpenAI refuses them ("Unrecognized request argument").
"""

from __future__ import annotations

import time
from typing import Any

from .common import (
    ParamError,
    ParsedRequest,
    body_dict,
    get_bool,
    get_float,
    get_int,
    get_str,
    reject_unknown,
    seeds_for,
)
from .config import ServeConfigError, parse_size
from .limits import MAX_GUIDANCE

OURS = ("negative_prompt", "seed", "steps", "guidance_scale", "scheduler", "refiner", "denoising_end", "loras")
#: OpenAI's own fields -> the values we honour (None: any value is fine; it changes nothing we do).
OPENAI_ACCEPTED: dict[str, tuple[Any, ...] | None] = {
    "response_format": (None, "b64_json"),
    "quality": (None, "auto", "standard"),
    "style": (None,),
    "output_format": (None, "png"),
    "background": (None, "auto", "opaque"),
    "moderation": (None, "auto", "low"),  # no moderation is applied: see the README
    "output_compression": (None,),
    "stream": (None, False),
    "partial_images": (None, 0),
    "user": None,
}
KNOWN = {"prompt", "n", "size", "model", *OURS, *OPENAI_ACCEPTED}


def parse(body: Any, *, model_ids: list[str], has_refiner: bool, max_images: int) -> ParsedRequest:
    body = body_dict(body)
    reject_unknown(body, KNOWN, where="/v1/images/generations")
    prompt = get_str(body, "prompt", required=True)
    assert prompt is not None
    model = get_str(body, "model")
    if model is not None and model not in model_ids:
        raise ParamError("model", f"The model '{model}' does not exist", f"use one of: {', '.join(model_ids)} "
                         "(GET /v1/models)", code="model_not_found")
    for key, allowed in OPENAI_ACCEPTED.items():
        if allowed is not None and body.get(key) not in allowed:
            shown = ", ".join(repr(a) for a in allowed if a is not None) or "nothing but its default"
            raise ParamError(key, f"'{key}' = {body.get(key)!r} is not supported by this server",
                             f"leave '{key}' out or use {shown}", code="unsupported_value")
    n = get_int(body, "n", 1, lo=1, hi=max_images)
    assert n is not None
    size = get_str(body, "size")
    height = width = None
    if size is not None and size != "auto":
        try:
            height, width = parse_size(size)
        except ServeConfigError:
            raise ParamError("size", f"'size' must be 'WIDTHxHEIGHT' (e.g. '1024x1024'), got {size!r}",
                             "pass a size the server lists in its errors or GET /v1/info") from None
    refiner = get_bool(body, "refiner", has_refiner)
    kwargs: dict[str, Any] = {"height": height, "width": width, "refiner": bool(refiner)}
    steps = get_int(body, "steps", None, lo=1)
    if steps is not None:
        kwargs["num_inference_steps"] = steps
    guidance = get_float(body, "guidance_scale", None, lo=0.0, hi=MAX_GUIDANCE)
    if guidance is not None:
        kwargs["guidance_scale"] = guidance
    scheduler = get_str(body, "scheduler")
    if scheduler is not None:
        kwargs["scheduler"] = scheduler
    denoising_end = get_float(body, "denoising_end", None, lo=0.0, hi=1.0, lo_open=True, hi_open=True)
    if denoising_end is not None:
        kwargs["denoising_end"] = denoising_end
    if body.get("loras") is not None:
        kwargs["loras"] = body["loras"]  # checked against the LoRA folder at admission
    negative = get_str(body, "negative_prompt")
    seed = get_int(body, "seed", None, lo=-1)
    return ParsedRequest(prompts=[prompt] * n, negatives=None if negative is None else [negative] * n,
                         seeds=seeds_for(seed, n), kwargs=kwargs, echo={k: body[k] for k in body if k != "prompt"})


def response(images_b64: list[str], seeds: list[int]) -> dict[str, Any]:
    return {"created": int(time.time()),
            "data": [{"b64_json": b, "revised_prompt": None, "seed": s} for b, s in zip(images_b64, seeds)]}


def models(model_ids: list[str], created: int) -> dict[str, Any]:
    return {"object": "list",
            "data": [{"id": m, "object": "model", "created": created, "owned_by": "sdxl-export"} for m in model_ids]}


ERROR_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
               413: "invalid_request_error", 429: "requests", 499: "client_closed_request",
               500: "server_error", 503: "server_error", 504: "timeout"}


def error_body(status: int, message: str, *, param: str | None = None, code: str | None = None,
               request_id: str | None = None) -> dict[str, Any]:
    """OpenAI's error shape; the client turns ``error.message`` into its exception's text."""
    err = {"message": message, "type": ERROR_TYPES.get(status, "server_error" if status >= 500 else
                                                      "invalid_request_error"),
           "param": param, "code": code}
    if request_id:
        err["request_id"] = request_id
    return {"error": err}
