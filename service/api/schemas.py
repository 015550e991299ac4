"""Request models (pydantic): they validate request bodies and generate the OpenAPI schemas.

``JobCreate`` is built per pipe of models.yaml from the pipe class's ``PARAMS`` (what its
``setup`` accepts) and the table :data:`PARAM_FIELDS` of types and ranges, with
``extra="forbid"``: a parameter the session's pipe does not take is a 400 naming it.
Parameters that carry images (``image``, ``mask``, ...) are not taken directly: the request
gives ``images`` and ``mask`` as upload ids or ``data:`` URLs, which the API decodes.
"""
from __future__ import annotations

import logging
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator

from multigen.pipes.base import MAX_CLIP_SKIP
from multigen.pipes.im2im import MAX_BLUR
from multigen.pipes.images import MIN_SIDE

from ..config import Config
from ..errors import InvalidInput

log = logging.getLogger(__name__)

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
MAX_SEED = 2**63 - 1
CONDITION_TYPES = ("canny", "soft-sobel", "soft", "ip2p", "inpaint", "qr", "depth", "pose")
#: deepest nesting of a prompt grammar: deeper ones only serve to exhaust the server's recursion
MAX_GRAMMAR_DEPTH = 32
#: most characters in a prompt (all the strings of a grammar together): some 5000 tokens, 65 chunks
#: of 77 for the text encoder; a multi-megabyte prompt would hold a worker and its memory for minutes
MAX_PROMPT_CHARS = 20000
#: most input images of one job (one per ControlNet at most, in practice)
MAX_JOB_IMAGES = 8

#: setup parameters common to every pipe class (internals.md)
COMMON_PARAMS = ("width", "height", "steps", "guidance_scale", "clip_skip", "scheduler", "timestep_spacing", "lpw")
#: used when ``multigen.pipes`` cannot be imported (it is written at the same time as the API)
FALLBACK_PARAMS: dict[str, tuple[str, ...]] = {
    "Prompt2ImPipe": COMMON_PARAMS,
    "Im2ImPipe": COMMON_PARAMS + ("image", "fimage", "strength", "scale"),
    "MaskedIm2ImPipe": COMMON_PARAMS + ("original_image", "image", "image_painted", "mask", "blur",
                                        "blur_compose", "strength", "scale"),
    "InpaintingPipe": COMMON_PARAMS + ("image", "mask", "blur", "strength"),
    "Cond2ImPipe": COMMON_PARAMS + ("image", "cscales", "guess_mode", "control_guidance_start",
                                    "control_guidance_end"),
    "CIm2ImPipe": COMMON_PARAMS + ("image", "ctypes", "cscales", "strength", "control_guidance_start",
                                   "control_guidance_end"),
}
#: setup parameters that carry an image: the request names them through ``images`` / ``mask``
IMAGE_PARAMS = frozenset({"image", "fimage", "original_image", "image_painted", "mask", "mask_image"})

Unit = Annotated[float, Field(ge=0.0, le=1.0)]


def _param_fields(cfg: Config) -> dict[str, tuple[Any, Any]]:
    """Type and range of every known setup parameter, as pydantic field definitions."""
    lim = cfg.limits
    return {
        # not multiples of 8 are fine: the pipes pad the latent and crop the image back
        "width": (int, Field(None, ge=MIN_SIDE, le=lim.max_width, description="image width in pixels")),
        "height": (int, Field(None, ge=MIN_SIDE, le=lim.max_height, description="image height in pixels")),
        "steps": (int, Field(None, ge=1, le=500, description="denoising steps")),
        "guidance_scale": (float, Field(None, ge=0.0, le=50.0, description="classifier-free guidance scale")),
        # the pipes' own ranges: a value they refuse must be a 400 now, not a failed job later
        "clip_skip": (int, Field(None, ge=0, le=MAX_CLIP_SKIP, description="CLIP layers to skip")),
        "scheduler": (str, Field(None, description="scheduler name, see GET /api/v1/models")),
        "timestep_spacing": (Literal["leading", "trailing", "linspace"], Field(None)),
        "lpw": (bool, Field(None, description="prompt weighting `(word:1.3)` and long prompts")),
        "strength": (float, Field(None, ge=0.0, le=1.0, description="how much the input image changes")),
        "scale": (Union[Annotated[float, Field(ge=0.01, le=16.0)],
                        Annotated[list[Annotated[int, Field(ge=MIN_SIDE, le=max(lim.max_width, lim.max_height))]],
                                  Field(min_length=2, max_length=2)]],
                  Field(None, description="resize of the input image: a factor, or [width, height] in pixels")),
        "blur": (int, Field(None, ge=0, le=MAX_BLUR, description="mask blur radius in pixels")),
        "blur_compose": (int, Field(None, ge=0, le=MAX_BLUR, description="blur radius in pixels of the mask "
                                    "that composes the result onto the original")),
        "cscales": (Union[Annotated[float, Field(ge=0.0, le=4.0)], list[Annotated[float, Field(ge=0.0, le=4.0)]]],
                    Field(None, description="ControlNet conditioning scale(s)")),
        "ctypes": (list[Literal[CONDITION_TYPES]], Field(None, description="condition types computed from the input")),
        "guess_mode": (bool, Field(None)),
        "vae_tiling": (bool, Field(None, description="decode in tiles (large images, less memory)")),
        "control_guidance_start": (Union[Unit, list[Unit]], Field(None)),
        "control_guidance_end": (Union[Unit, list[Unit]], Field(None)),
    }


class LoraRef(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    weight: float = Field(1.0, ge=-4.0, le=4.0)


class SessionCreate(BaseModel):
    """Body of ``POST /api/v1/sessions``."""

    model_config = ConfigDict(extra="forbid", title="SessionCreate")
    user: str | None = Field(None, pattern=NAME_PATTERN, description="ignored with auth on (the token's user)")
    project: str = Field(pattern=NAME_PATTERN)
    pipe: str
    model: str
    loras: list[Union[str, LoraRef]] = Field(default_factory=list)


class ControlRef(BaseModel):
    """One ControlNet condition: its type (for pipes that compute conditions) and scale."""

    model_config = ConfigDict(extra="forbid")
    type: Literal[CONDITION_TYPES] | None = None
    scale: float = Field(1.0, ge=0.0, le=4.0)


class JobBase(BaseModel):
    """Fields every job takes, whatever the pipe."""

    model_config = ConfigDict(extra="forbid")
    prompt: Union[str, list[Any], dict[str, Any]] = Field(
        description="a string, or metafusion's Cfgen grammar as JSON")
    negative_prompt: Union[str, list[Any], dict[str, Any], None] = None
    count: int = Field(1, ge=1)
    seeds: list[Annotated[int, Field(ge=0, le=MAX_SEED)]] | None = Field(None, min_length=1)
    priority: int = Field(0, ge=-100, le=100)

    @field_validator("prompt", "negative_prompt")
    @classmethod
    def _not_too_big(cls, value: Any) -> Any:
        depth, chars = grammar_size(value)
        if depth > MAX_GRAMMAR_DEPTH:
            raise ValueError(f"the prompt grammar is nested more than {MAX_GRAMMAR_DEPTH} levels deep")
        if chars > MAX_PROMPT_CHARS:
            raise ValueError(f"the prompt has {chars} characters, at most {MAX_PROMPT_CHARS} are allowed")
        return value


def grammar_size(value: Any) -> tuple[int, int]:
    """How deeply lists and dicts nest in ``value`` (a string: 0) and how many characters its strings
    hold, counted without recursion (and without descending past :data:`MAX_GRAMMAR_DEPTH`)."""
    deepest, chars, stack = 0, 0, [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            chars += len(item)
        if isinstance(item, dict):
            item = list(item.values())
        if isinstance(item, list):
            deepest = max(deepest, depth + 1)
            if depth + 1 <= MAX_GRAMMAR_DEPTH:  # past the limit the answer is known: stop descending
                stack.extend((x, depth + 1) for x in item)
    return deepest, chars


def pipe_params(classname: str) -> tuple[str, ...]:
    """The setup parameters of a pipe class: its ``PARAMS`` or the fallback table."""
    try:
        import multigen.pipes as pipes

        cls = getattr(pipes, classname)
        return tuple(cls.PARAMS)
    except (ImportError, AttributeError):
        return FALLBACK_PARAMS.get(classname, COMMON_PARAMS)


def job_model(cfg: Config, pipe_name: str, classname: str) -> type[BaseModel]:
    """Build ``JobCreate`` for one pipe of models.yaml."""
    params = pipe_params(classname)
    table = _param_fields(cfg)
    fields: dict[str, Any] = {"count": (int, Field(1, ge=1, le=cfg.limits.max_count)),
                              "seeds": (list[Annotated[int, Field(ge=0, le=MAX_SEED)]] | None,
                                        Field(None, min_length=1, max_length=cfg.limits.max_count,
                                              description="one per image; drawn when left out"))}
    for name in params:
        if name in IMAGE_PARAMS:
            continue
        fields[name] = table.get(name, (Any, Field(None, description="passed to the pipe's setup")))
        # every setup parameter is optional: the pipe has defaults
        kind, info = fields[name]
        fields[name] = (Union[kind, None], info)
    if IMAGE_PARAMS & set(params):
        # each data: URL is decoded and stored before the job is queued: a long list of tiny ones
        # would fill the uploads folder from one request
        fields["images"] = (list[str] | None, Field(None, max_length=MAX_JOB_IMAGES,
                                                    description="upload ids or data: URLs"))
    if {"mask", "image_painted"} & set(params):
        fields["mask"] = (str | None, Field(None, description="mask: an upload id or a data: URL"))
    if "cscales" in params:
        fields["control"] = (list[ControlRef] | None, Field(
            None, description="ControlNet conditions (types and scales); sets ctypes/cscales"))
    model = create_model(f"JobCreate_{pipe_name}", __base__=JobBase, **fields)
    model.__doc__ = f"Body of POST /api/v1/sessions/{{id}}/jobs for a session of pipe `{pipe_name}` ({classname})."
    model.model_config["title"] = f"JobCreate_{pipe_name}"
    return model


class Schemas:
    """The request models of one app: ``SessionCreate`` and one ``JobCreate`` per pipe."""

    def __init__(self, cfg: Config):
        self.session_create = SessionCreate
        self.jobs: dict[str, type[BaseModel]] = {
            name: job_model(cfg, name, entry.classname) for name, entry in cfg.models.pipes.items()}


def parse(model: type[BaseModel], body: Any) -> BaseModel:
    """Validate ``body`` against ``model``.

    Raises:
        InvalidInput: naming the first offending field (dotted path) and what is allowed.
    """
    if not isinstance(body, dict):
        raise InvalidInput("the body must be a JSON object", code="invalid_body")
    try:
        return model.model_validate(body)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            allowed = ", ".join(sorted(model.model_fields))
            what = model.model_config.get("title") or model.__name__
            raise InvalidInput(f"unknown parameter {loc!r} for {what}; allowed: {allowed}",
                               field=loc, code="unknown_parameter") from None
        if err["type"] == "missing":
            raise InvalidInput(f"{loc} is required", field=loc, code="missing") from None
        raise InvalidInput(f"{loc}: {err['msg']} (got {err.get('input')!r})"[:500], field=loc) from None
