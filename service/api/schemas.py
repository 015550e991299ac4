"""Request models (pydantic): they validate request bodies and generate the OpenAPI schemas.

``JobCreate_<pipe>`` is built per pipe of models.yaml from the parameter spec of its class
(``multigen.pipes.spec``: types, ranges, defaults, help texts) with the config's ``limits``
on top, and ``extra="forbid"``: a parameter the session's pipe does not take is a 400 naming
it. Parameters that carry images (``image``, ``mask``, ...) are not taken directly: the
request gives ``images`` and ``mask`` as upload ids or ``data:`` URLs, which the API decodes,
and ControlNet pipes take ``control`` (types and scales) for ``ctypes``/``cscales``.

Every list a request may hold has a ``max_length`` (``maxItems`` in the OpenAPI document): the spec's
``max_items``, the config's ``max_count`` for seeds, and the spec's caps for LoRAs and prompt grammars,
whose size (characters, depth, items) is checked by ``multigen.pipes.cfgen.validate_grammar``, as
``ServiceThread.queue_gen`` checks it.
"""
from __future__ import annotations

import logging
import reprlib
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import (BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, create_model, field_validator,
                      model_validator)
from pydantic_core import PydanticCustomError

from multigen.pipes import spec as specs
from multigen.pipes.cfgen import validate_grammar
from multigen.pipes.errors import PipeError
from multigen.pipes.registry import pipe_spec

from ..catalog import family_param_note, scheduler_note
from ..config import Config, Limits
from ..errors import InvalidInput

log = logging.getLogger(__name__)

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
#: most input images of one job (the spec's: one per ControlNet at most, in practice)
MAX_JOB_IMAGES = specs.MAX_IMAGES
#: the job-level parameters under the default limits (``JobBase``; each pipe's model has its config's)
DEFAULT_JOB = specs.apply_limits(specs.JOB, Limits())
#: how a rejected value is quoted in an error message: a few items and characters, whatever its size
_QUOTE = reprlib.Repr()
_QUOTE.maxlist = _QUOTE.maxtuple = _QUOTE.maxdict = 4
_QUOTE.maxstring = _QUOTE.maxother = 80
_QUOTE.maxlevel = 3


def _bounds(param: specs.Param) -> dict[str, Any]:
    """The range of ``param`` as pydantic's ``ge``/``gt``/``le``/``lt``."""
    return {"gt" if param.exclusive_minimum else "ge": param.minimum,
            "lt" if param.exclusive_maximum else "le": param.maximum}


def _one(param: specs.Param) -> Any:
    """The pydantic type of one value of ``param``, with its range."""
    t = param.type
    if t is specs.ParamType.INT:
        return Annotated[int, Field(**_bounds(param))]
    if t is specs.ParamType.FLOAT:
        return Annotated[float, Field(**_bounds(param), allow_inf_nan=False)]
    if t is specs.ParamType.BOOL:
        return bool
    if t is specs.ParamType.CHOICE:
        return Literal[param.choices]  # type: ignore[valid-type]
    if t is specs.ParamType.SCALE:
        factor = Annotated[float, Field(**_bounds(param), allow_inf_nan=False)]
        if not param.sides:
            return factor
        return Union[factor, tuple[_one(param.sides[0]), _one(param.sides[1])]]
    if t is specs.ParamType.PROMPT:  # validate_grammar checks the rest of its size
        return Union[str, Annotated[list[Any], Field(max_length=specs.MAX_GRAMMAR_ITEMS)], dict[str, Any]]
    if t is specs.ParamType.STR:
        return str
    return Any


def annotation(param: specs.Param) -> Any:
    """The pydantic type of ``param``: one value, or for ``many`` parameters also a list of them."""
    one = _one(param)
    if param.many:
        return Union[one, value_list(param)]  # type: ignore[valid-type]
    return one


def value_list(param: specs.Param) -> Any:
    """The pydantic type of a list of ``param``'s values: 1 to ``max_items`` of them.

    Raises:
        ValueError: the parameter declares no ``max_items`` (every list of a request is capped).
    """
    if not param.max_items:
        raise ValueError(f"{param.name} takes a list but declares no max_items: declare one in the spec")
    return Annotated[list[_one(param)], Field(min_length=1, max_length=param.max_items)]  # type: ignore[misc]


def field_doc(param: specs.Param) -> str:
    """The help text of a field: the spec's description, with its default, and which model types take it
    where not all do (or, for ``scheduler``, which names each takes), from the families' declarations."""
    doc = param.description
    if param.default is not None and param.default != "":
        doc += f" (default {param.default})"
    note = family_param_note(param.name)
    if note:
        doc += f"; {note}"
    if param.name == specs.SCHEDULER.name:
        doc += f"; {scheduler_note()}"
    return doc


def optional_field(param: specs.Param) -> tuple[Any, Any]:
    """``(type, Field)`` of a setup parameter: optional, since the pipe has defaults."""
    return Optional[annotation(param)], Field(None, description=field_doc(param))


class LoraRef(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    weight: _one(specs.LORA_WEIGHT) = Field(specs.LORA_WEIGHT.default,  # type: ignore[valid-type]
                                            description=specs.LORA_WEIGHT.description)


class SessionCreate(BaseModel):
    """Body of ``POST /api/v1/sessions``."""

    model_config = ConfigDict(extra="forbid", title="SessionCreate")
    user: str | None = Field(None, pattern=NAME_PATTERN, description="ignored with auth on (the token's user)")
    project: str = Field(pattern=NAME_PATTERN)
    pipe: str
    model: str
    loras: list[Union[str, LoraRef]] = Field(default_factory=list, max_length=specs.MAX_LORAS)


class ControlRef(BaseModel):
    """One ControlNet condition: its type (for pipes that compute conditions) and scale."""

    model_config = ConfigDict(extra="forbid")
    type: Optional[_one(specs.CTYPES)] = Field(None, description=specs.CTYPES.description)  # type: ignore
    scale: _one(specs.CSCALES) = Field(1.0, description="ControlNet conditioning scale")  # type: ignore

    @model_validator(mode="before")
    @classmethod
    def _scale_given(cls, data: Any) -> Any:
        # the API dumps bodies with exclude_unset: a scale left out must still reach the job as its default
        if isinstance(data, dict) and "scale" not in data:
            data = {**data, "scale": cls.model_fields["scale"].default}
        return data


#: a job's ``styles``: an empty list is no styles (A1111 clients send one); the service checks the names
STYLE_NAMES = Annotated[list[_one(specs.STYLES)], Field(max_length=specs.STYLES.max_items)]  # type: ignore[misc]


class JobBase(BaseModel):
    """Fields every job takes, whatever the pipe."""

    model_config = ConfigDict(extra="forbid")
    prompt: _one(specs.PROMPT) = Field(description=specs.PROMPT.description)  # type: ignore[valid-type]
    negative_prompt: Optional[_one(specs.NEGATIVE_PROMPT)] = Field(  # type: ignore[valid-type]
        None, description=specs.NEGATIVE_PROMPT.description)
    count: _one(specs.COUNT) = Field(specs.COUNT.default, description=specs.COUNT.description)  # type: ignore
    seeds: Optional[value_list(DEFAULT_JOB["seeds"])] = Field(  # type: ignore[valid-type]
        None, description=specs.SEEDS.description)
    priority: _one(specs.PRIORITY) = Field(specs.PRIORITY.default,  # type: ignore[valid-type]
                                           description=specs.PRIORITY.description)
    styles: Optional[STYLE_NAMES] = Field(None, description=specs.STYLES.description)  # type: ignore[valid-type]
    wildcards_in_order: _one(specs.WILDCARDS_IN_ORDER) = Field(  # type: ignore[valid-type]
        specs.WILDCARDS_IN_ORDER.default, description=specs.WILDCARDS_IN_ORDER.description)
    performance: Optional[_one(specs.PERFORMANCE)] = Field(  # type: ignore[valid-type]
        None, description=specs.PERFORMANCE.description,
        json_schema_extra={"examples": ["speed", "quality", "extreme_speed", "lightning", "hyper_sd"]})
    # the pattern documents the form; the service checks it (and the range) with its own message
    aspect_ratio: Optional[_one(specs.ASPECT_RATIO)] = Field(  # type: ignore[valid-type]
        None, description=specs.ASPECT_RATIO.description,
        json_schema_extra={"pattern": specs.ASPECT_RATIO_PATTERN, "examples": ["16:9", "1:1", "9:16"]})
    # webhooks and the grid (service/webhooks.py, service/grid.py); the service checks the URL's host
    webhook_url: Optional[_one(specs.WEBHOOK_URL)] = Field(  # type: ignore[valid-type]
        None, max_length=specs.MAX_WEBHOOK_URL_CHARS, description=specs.WEBHOOK_URL.description)
    grid: _one(specs.GRID) = Field(specs.GRID.default, description=specs.GRID.description)  # type: ignore[valid-type]

    @field_validator("prompt", "negative_prompt", mode="before")
    @classmethod
    def _grammar(cls, value: Any, info: ValidationInfo) -> Any:
        # before pydantic walks the value: the size caps stop a grammar bomb at its first items
        if isinstance(value, (str, list, dict)):
            try:
                validate_grammar(value, info.field_name or "prompt")
            except PipeError as e:
                raise PydanticCustomError("prompt_grammar", "{message}", {"message": e.message}) from None
        return value


def pipe_params(classname: str) -> tuple[str, ...]:
    """The setup parameters of a pipe class (its spec's names).

    Raises:
        UnknownPipeClassError: not a pipe class (the message lists the known ones).
    """
    return pipe_spec(classname).names


def job_model(cfg: Config, pipe_name: str, classname: str) -> type[BaseModel]:
    """Build ``JobCreate_<pipe_name>`` for one pipe of models.yaml from its class's spec and the limits."""
    spec = specs.apply_limits(pipe_spec(classname), cfg.limits)
    job = specs.apply_limits(specs.JOB, cfg.limits)
    count, seeds = job["count"], job["seeds"]
    fields: dict[str, Any] = {
        "count": (_one(count), Field(count.default, description=count.description)),
        "seeds": (Optional[value_list(seeds)], Field(None, description=seeds.description))}
    for param in spec:
        if not param.image:
            fields[param.name] = optional_field(param)
    for param in spec.image_params:  # a list of images of its own (image_prompts): references, as `images`
        if param.many and param.name not in spec.image_slots:
            fields[param.name] = (Optional[list[str]], Field(
                None, min_length=1, max_length=param.max_items,
                description=f"{field_doc(param)}: upload ids or data: URLs"))
    if spec.image_slots:
        # each data: URL is decoded and stored before the job is queued: a long list of tiny ones
        # would fill the uploads folder from one request
        fields["images"] = (Optional[list[str]], Field(
            None, max_length=spec.max_images or MAX_JOB_IMAGES,
            description=f"upload ids or data: URLs, for {', '.join(spec.image_slots)}"))
    if {"mask", "image_painted"} & set(spec.names):
        fields["mask"] = (Optional[str], Field(None, description="the mask (white = redraw): an upload id or a "
                                                                "data: URL"))
    if "cscales" in spec:
        fields["control"] = (Optional[list[ControlRef]], Field(
            None, max_length=specs.CSCALES.max_items,
            description="ControlNet conditions (types and scales); sets ctypes/cscales"))
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


def _is_union_tag(part: Any) -> bool:
    """pydantic names the alternatives of a union in error paths (``scale.tuple[int, int].0``); people
    and the web page's field lookup want the path of the value (``scale.0``)."""
    return isinstance(part, str) and ("[" in part or part.startswith("constrained-")
                                      or part in ("str", "int", "float", "bool", "list", "tuple", "dict")
                                      or (part[:1].isupper() and part.isalnum()))  # a model: LoraRef, ControlRef


def _telling_error(errors: list[dict[str, Any]]) -> dict[str, Any]:
    """The error to report: of the first offending field, the one of the union alternative that got
    furthest (``[63, 64]`` for a scale is a pair with a side too small, not a number of the wrong type)."""
    field = errors[0]["loc"][:1]
    same = [e for e in errors if e["loc"][:1] == field]
    return min(same, key=lambda e: (e["type"].endswith("_type"), -len(e["loc"])))


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
        err = _telling_error(e.errors())
        loc = ".".join(str(p) for p in err["loc"] if not _is_union_tag(p))
        if err["type"] == "extra_forbidden":
            allowed = ", ".join(sorted(model.model_fields))
            what = model.model_config.get("title") or model.__name__
            raise InvalidInput(f"unknown parameter {loc!r} for {what}; allowed: {allowed}",
                               field=loc, code="unknown_parameter") from None
        if err["type"] == "missing":
            raise InvalidInput(f"{loc} is required", field=loc, code="missing") from None
        raise InvalidInput(f"{loc}: {err['msg']} (got {_QUOTE.repr(err.get('input'))})"[:500], field=loc) from None
