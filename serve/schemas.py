"""Pydantic models of every route's request and response bodies, for the OpenAPI schema.

The bodies are parsed by the API modules (``openai_api``, ``a1111_api``, ``native_api``),
which name the field in every 400 and keep each API's own rules (OpenAI refuses unknown
fields, the web UI's clients send every field). These models *document* those bodies at
``GET /openapi.json`` (``body_doc`` puts a request model into a route's ``requestBody``), so a
generated client sends what the parsers take; responses are checked against theirs by FastAPI.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


def body_doc(model: type[BaseModel]) -> dict[str, Any]:
    """``openapi_extra`` of a route whose JSON body ``model`` describes (parsed by hand)."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": model.model_json_schema(
        ref_template="#/components/schemas/{model}")}}}}


# ---- errors ---------------------------------------------------------------------------------------
class OpenAIErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None
    request_id: str | None = None


class OpenAIError(BaseModel):
    error: OpenAIErrorDetail


class A1111Error(BaseModel):
    error: str
    detail: str
    body: str = ""
    errors: str
    request_id: str | None = None


ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": OpenAIError, "description": "a bad field (named in param)"},
    401: {"model": OpenAIError, "description": "missing or wrong credentials"},
    413: {"model": OpenAIError, "description": "body or image over the server's caps"},
    429: {"model": OpenAIError, "description": "queue full (Retry-After)"},
    503: {"model": OpenAIError, "description": "not ready or shutting down (Retry-After)"},
    504: {"model": OpenAIError, "description": "past --timeout (x-should-retry: false)"},
}
A1111_ERRORS: dict[int | str, dict[str, Any]] = {k: {**v, "model": A1111Error} for k, v in ERRORS.items()}
A1111_ERRORS[404] = {"model": A1111Error, "description": "unknown sampler (as the web UI)"}


# ---- operations ---------------------------------------------------------------------------------
class Health(BaseModel):
    status: str


class Ready(BaseModel):
    status: str
    error: str | None = None
    backend: str | None = None
    device: str | None = None
    max_batch_size: int | None = None
    max_queue: int | None = None
    waiting: int | None = None


class Info(BaseModel):
    model: str
    aliases: list[str] = []
    version: str
    backend: str
    device: str
    native_size: int
    refiner: bool
    sizes: list[str] | None
    size_policy: str
    max_pixels: int
    max_batch_size: int
    max_queue: int
    max_images_per_request: int
    max_steps: int
    schedulers: list[str]
    #: the model's recorded sampling defaults (``build --default-*``), what a request that leaves them out gets
    defaults: dict[str, Any] | None = None


# ---- OpenAI -------------------------------------------------------------------------------------------
class OpenAIImagesRequest(BaseModel):
    """OpenAI's ``images.generate`` body plus our extra fields (``extra_body``)."""

    model_config = ConfigDict(extra="forbid")
    prompt: str = Field(max_length=4000)
    model: str | None = None
    n: int | None = Field(None, ge=1, le=8)
    size: str | None = Field(None, description="WIDTHxHEIGHT, e.g. 1024x1024, or auto")
    response_format: str | None = Field(None, description="b64_json only")
    quality: str | None = None
    style: str | None = None
    output_format: str | None = None
    background: str | None = None
    moderation: str | None = None
    user: str | None = None
    negative_prompt: str | None = None
    seed: int | None = Field(None, ge=-1)
    steps: int | None = Field(None, ge=1, le=150)
    guidance_scale: float | None = Field(None, ge=0, le=100)
    scheduler: str | None = None
    refiner: bool | None = None
    denoising_end: float | None = Field(None, gt=0, lt=1)
    loras: dict[str, float] | None = None


class OpenAIImage(BaseModel):
    b64_json: str
    revised_prompt: str | None = None
    seed: int


class OpenAIImagesResponse(BaseModel):
    created: int
    data: list[OpenAIImage]


class OpenAIModel(BaseModel):
    id: str
    object: str
    created: int
    owned_by: str


class OpenAIModels(BaseModel):
    object: str
    data: list[OpenAIModel]


# ---- native ---------------------------------------------------------------------------------------------
class NativeRequest(BaseModel):
    """``POST /v1/generate``: runtime arguments by their runtime names."""

    model_config = ConfigDict(extra="forbid")
    prompt: str | list[str]
    negative_prompt: str | list[str] | None = None
    num_images_per_prompt: int | None = Field(None, ge=1, le=8)
    height: int | None = Field(None, ge=8)
    width: int | None = Field(None, ge=8)
    num_inference_steps: int | None = Field(None, ge=1, le=150)
    guidance_scale: float | None = Field(None, ge=0, le=100)
    denoising_end: float | None = Field(None, gt=0, lt=1)
    refiner: bool | None = None
    seed: int | None = Field(None, ge=-1)
    scheduler: str | None = None
    original_size: list[int] | None = Field(None, min_length=2, max_length=2)
    crops_coords_top_left: list[int] | None = Field(None, min_length=2, max_length=2)
    target_size: list[int] | None = Field(None, min_length=2, max_length=2)
    aesthetic_score: float | None = Field(None, ge=-100, le=100)
    negative_aesthetic_score: float | None = Field(None, ge=-100, le=100)
    image: str | None = Field(None, description="base64 image or data URL (img2img, inpainting)")
    strength: float | None = Field(None, gt=0, le=1)
    mask_image: str | None = Field(None, description="inpainting: base64 mask (white = repaint) of 'image'; "
                                                     "alias 'mask'")
    padding_mask_crop: int | None = Field(None, ge=0, le=4096,
                                          description="inpainting: crop around the mask with this margin, paste back")
    refiner_only: bool | None = None
    loras: dict[str, float] | None = None
    eta: float | None = Field(None, ge=0, le=1, description="diffusers' eta (DDIM, TCD)")
    timesteps: list[int] | None = Field(None, description="a custom schedule, e.g. DMD2's [999, 749, 499, 249]")
    sigmas: list[float] | None = Field(None, description="a custom sigma schedule")
    controlnets: list[dict[str, Any]] | None = Field(
        None, description="[{model, image, scale, start, end, guess_mode, module}] (docs/controlnet.md)")


class NativeTiming(BaseModel):
    queue_ms: float
    batch_size: int
    run_ms: float
    stages_ms: dict[str, float]


class NativeResponse(BaseModel):
    request_id: str
    images: list[str]
    seeds: list[int]
    seed: int
    parameters: dict[str, Any]
    notes: list[str] = []
    timings: list[NativeTiming]


# ---- AUTOMATIC1111 -------------------------------------------------------------------------------------
class A1111Txt2Img(_Open):
    """The web UI's txt2img body (clients send every field; see ``a1111_api`` for what runs)."""

    prompt: str = ""
    negative_prompt: str = ""
    seed: int = -1
    steps: int = Field(20, ge=1, le=150)
    cfg_scale: float = Field(7.0, ge=0, le=100)
    width: int = Field(512, ge=8)
    height: int = Field(512, ge=8)
    sampler_name: str | None = None
    scheduler: str | None = None
    batch_size: int = Field(1, ge=1, le=8)
    n_iter: int = Field(1, ge=1, le=8)
    refiner_checkpoint: str | None = None
    refiner_switch_at: float | None = Field(None, gt=0, lt=1)
    send_images: bool = True


class A1111Img2Img(A1111Txt2Img):
    init_images: list[str] = Field(min_length=1, max_length=8)
    denoising_strength: float = Field(0.75, gt=0, le=1)


class A1111Images(BaseModel):
    images: list[str]
    parameters: dict[str, Any]
    info: str


class A1111Sampler(BaseModel):
    name: str
    aliases: list[str]
    options: dict[str, Any]


class A1111Scheduler(BaseModel):
    name: str
    label: str
    aliases: list[str] | None = None
    default_rho: float
    need_inner_model: bool


class A1111Model(BaseModel):
    title: str
    model_name: str
    hash: str | None = None
    sha256: str | None = None
    filename: str
    config: str | None = None


class A1111Lora(BaseModel):
    name: str
    alias: str
    path: str | None = None
    metadata: dict[str, Any] = {}


class A1111Scripts(BaseModel):
    txt2img: list[str]
    img2img: list[str]


class A1111ProgressState(BaseModel):
    skipped: bool
    interrupted: bool
    stopping_generation: bool = False
    job: str
    job_count: int
    job_timestamp: str
    job_no: int
    sampling_step: int
    sampling_steps: int


class A1111Progress(BaseModel):
    progress: float
    eta_relative: float
    state: A1111ProgressState
    current_image: str | None = None
    textinfo: str | None = None


class A1111Vae(BaseModel):
    model_name: str
    filename: str


class A1111Embeddings(BaseModel):
    loaded: dict[str, Any]
    skipped: dict[str, Any]


class A1111Style(BaseModel):
    name: str
    prompt: str | None = None
    negative_prompt: str | None = None


class PngInfoRequest(BaseModel):
    image: str = Field(description="base64 PNG or data URL")


class ControlNetDetectRequest(_Open):
    """The ControlNet extension's ``POST /controlnet/detect`` body (fields as the extension names them)."""

    controlnet_images: list[str] = Field(description="base64 images (or data URLs) to preprocess")
    controlnet_module: str = Field("none", description="a preprocessor of GET /controlnet/module_list")
    controlnet_processor_res: float = Field(512, description="short side to preprocess at, 64..2048 "
                                                             "(-1: the image's own size)")
    controlnet_threshold_a: float | None = Field(None, description="canny low threshold / tile_resample rate "
                                                                   "(-1: the default)")
    controlnet_threshold_b: float | None = Field(None, description="canny high threshold (-1: the default)")


class ControlNetDetected(BaseModel):
    images: list[str]
    info: str


class PngInfo(BaseModel):
    info: str
    items: dict[str, Any]
    parameters: dict[str, Any]


class Memory(BaseModel):
    ram: dict[str, Any]
    cuda: dict[str, Any]


class Options(_Open):
    """The web UI's settings dict; only settings that hold on this server may be set."""


class ProgressEvent(BaseModel):
    """One server-sent event of ``GET /v1/progress/stream``."""

    state: str
    request_id: str | None = None
    step: int
    steps: int
    progress: float
    eta_s: float | None = None
    job_count: int
