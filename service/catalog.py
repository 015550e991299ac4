"""``ModelCatalog``: what models.yaml says about a session's model and pipe, in one place.

The model's type (declared, or detected from its files once) and its family (the pipes it
runs, the parameters and schedulers it takes, checked when a session opens and a job is
queued), the LoRA files of a session with their weights, the model's ``defaults:``, the pipe
class a models.yaml pipe names, and the constructor arguments its pipe class needs beyond the
shared base (ControlNets, condition models). :func:`describe_family` and
:meth:`ModelCatalog.describe_model` are what ``GET /api/v1/models`` says of them.
"""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Callable

from multigen.pipes import spec as specs
from multigen.pipes.families import FAMILIES, Family, Role
from multigen.pipes.ip_adapter import image_count
from multigen.pipes.registry import pipe_names, pipe_role
from multigen.pipes.errors import InvalidValueError, PipeError
from multigen.pipes.schedulers import family_schedulers
from multigen.pipes.upscale import check_uov

from .config import ModelsConfig, PipeEntry
from .errors import InvalidInput
from .records import SessionRecord
from .validation import (check_choice, check_family_params, check_family_runs_pipe, check_name, controlnet_paths,
                         family_of_type, model_roles, model_type_of, normalize_loras, runs_pipe)

PipeFactory = Callable[[str], Any]


def registry_pipe_class(classname: str) -> Any:
    """The pipe class a models.yaml ``classname`` names, from the pipes' registry."""
    from multigen.pipes.registry import pipe_class

    return pipe_class(classname)


def family_support(name: str) -> dict[str, list[str]]:
    """Which model types take a setup parameter, from the families' declarations: ``{"families": [...]}``
    for a family-only one (``spec.FAMILY_PARAMS``), ``{"refused_by": [...]}`` for one some families
    refuse (``Family.refused_params``), ``{}`` for one every family takes."""
    if name in {p.name for p in specs.FAMILY_PARAMS}:
        return {"families": [f.name for f in FAMILIES[::-1] if name in f.params]}
    refuse = [f.name for f in FAMILIES[::-1] if name in f.refused_params]
    return {"refused_by": refuse} if refuse else {}


def family_param_note(name: str) -> str:
    """:func:`family_support` in words, for help texts and the OpenAPI document (``""``: every family takes it)."""
    support = family_support(name)
    if "families" in support:
        takes = support["families"]
        return f"only {_types(takes)} {'takes' if len(takes) == 1 else 'take'} it" if takes else \
            "no model type takes it yet"
    refuse = support.get("refused_by", [])
    return f"{_types(refuse)} {'refuses' if len(refuse) == 1 else 'refuse'} it" if refuse else ""


def _types(names: list[str]) -> str:
    return ("model type " if len(names) == 1 else "model types ") + ", ".join(names)


def scheduler_note() -> str:
    """The scheduler names of each model type, from the families' declarations (families that take the
    same names share an entry), for the OpenAPI document."""
    groups: dict[tuple[str, ...] | None, list[str]] = {}
    for fam in FAMILIES[::-1]:
        groups.setdefault(fam.schedulers, []).append(fam.name)
    parts = [f"{', '.join(names)}: " + ("the SD-style names of `schedulers`" if allowed is None else
                                        ", ".join(family_schedulers(allowed)) or "only the model's own")
             for allowed, names in groups.items()]
    return "per model type (GET /api/v1/models `families[].schedulers`): " + "; ".join(parts)


def describe_family(fam: Family) -> dict[str, Any]:
    """A family as ``GET /api/v1/models`` lists it: ``Family.describe()``, its scheduler names (the installed
    ones, SD-style included where it takes every one) and, per task it runs, the pipe classes that run it."""
    out = fam.describe()
    out["schedulers"] = family_schedulers(fam.schedulers)
    out["pipe_classes"] = {role.value: [c for c in pipe_names() if pipe_role(c) is role] for role in fam.roles}
    return out


class ModelCatalog:
    """models.yaml, read for the service.

    Args:
        models: the parsed models.yaml.
        model_dir: the folder model ids are relative to (condition models too).
        pipe_factory: ``pipe_factory(classname) -> class``; default: the pipes' registry.
    """

    def __init__(self, models: ModelsConfig, model_dir: Path, pipe_factory: PipeFactory | None = None) -> None:
        self.models = models
        self.model_dir = model_dir
        self.pipe_factory: PipeFactory = pipe_factory or registry_pipe_class
        self._types: dict[str, str | None] = {}
        self._sizes: dict[str, tuple[int, int] | None] = {}
        self._roles: dict[str, tuple[Role, ...] | None] = {}
        self._family_defaults: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()

    def check_session(self, user: Any, project: Any, pipe: Any, model: Any, loras: Any) -> list[dict[str, Any]]:
        """Check what a session is opened with; returns its LoRAs as ``[{"name", "weight"}]``.

        Raises:
            InvalidInput: a bad name, an unknown pipe/model/LoRA (naming the known ones), a LoRA
                of another family, or a ControlNet pipe with no ControlNet for the model.
        """
        models = self.models
        check_name(user, "user")
        check_name(project, "project")
        check_choice(pipe, models.pipes, "pipe", "pipe")
        check_choice(model, models.base, "model", "model")
        check_family_runs_pipe(self.family(model), self.model_roles(model), models.pipes[pipe].classname, pipe, model,
                               self.usable_pipes(model), models.base[model].config_folder)
        mtype = self.model_type(model)
        norm = normalize_loras(loras, models, mtype)
        if models.pipes[pipe].needs_cnet and not controlnet_paths(models, pipe, mtype):
            usable = sorted(n for n in models.base if controlnet_paths(models, pipe, self.model_type(n)))
            raise InvalidInput(f"pipe {pipe!r} needs a ControlNet for {mtype} models and none is configured "
                               f"(add one under `controlnet:` in {models.file.name}, by condition type for pipes "
                               f"that compute conditions); models it can use: {', '.join(usable) or 'none'}; "
                               f"pipes usable with {model!r}: "
                               + ", ".join(n for n, e in models.pipes.items() if not e.needs_cnet),
                               field="model", code="no_controlnet")
        return norm

    def _once(self, cache: dict[str, Any], model: str, compute: Callable[[], Any]) -> Any:
        """What a model's files tell, read once (outside the lock: it reads files) and kept."""
        with self._lock:
            if model in cache:
                return cache[model]
        value = compute()
        with self._lock:
            return cache.setdefault(model, value)

    def model_type(self, model: str) -> str | None:
        """The base model's family (``SD``, ``SDXL``, ``FLUX``): declared, else detected from its files once."""
        return self._once(self._types, model, lambda: model_type_of(self.models.base[model]))

    def family(self, model: str) -> Family | None:
        """The base model's family, None while its type is unknown (the pipe checks it on load)."""
        return family_of_type(self.model_type(model))

    def usable_pipes(self, model: str) -> list[str]:
        """The models.yaml pipes whose class runs a task the model's family runs (all, for an unknown family)."""
        roles = self.model_roles(model)
        return [name for name, entry in self.models.pipes.items() if runs_pipe(roles, entry.classname)]

    def model_roles(self, model: str) -> tuple[Role, ...] | None:
        """The tasks the base model runs (``validation.model_roles``), read from its files once."""
        return self._once(self._roles, model, lambda: model_roles(self.models.base[model], self.family(model)))

    def check_job_params(self, model: str, params: dict[str, Any]) -> None:
        """What the model's family refuses of a job's setup parameters (``validation.check_family_params``),
        and image prompts for a model no IP-Adapter is configured for.

        Raises:
            InvalidInput: naming the parameter and the allowed values (or what to configure).
        """
        check_family_params(params, self.family(model))
        try:  # uov: no sizing parameter with an upscale mode, an upscaler models.yaml names
            check_uov(params, upscalers=self.models.upscaler)
        except PipeError as e:
            raise InvalidInput(e.message, field=e.param) from None
        if params.get("refiner_switch") is not None and self.models.base[model].refiner is None:
            raise InvalidInput(f"refiner_switch {params['refiner_switch']!r}: model {model!r} has no refiner; allowed: "
                               f"leave it out, or configure one: `refiner: <an SDXL base model>` under base.{model} "
                               f"in {self.models.file.name}", field="refiner_switch")
        if params.get("image_prompts") and self.ip_adapter(model) is None:
            mtype = self.model_type(model) or "its type"
            raise InvalidInput(f"image_prompts need an IP-Adapter and none is configured for model {model!r}: add an "
                               f"entry of type {mtype} under `ip_adapter:` in {self.models.file.name} (id: the "
                               "adapter file, image_encoder: its CLIP image encoder folder; `models:` to limit it), or "
                               "leave image_prompts out", field="image_prompts", code="no_ip_adapter")
        try:  # more images than allowed, weights or stop-at fractions that are not one or one per image
            image_count(params)
        except PipeError as e:
            raise InvalidInput(e.message, field=e.param or "image_prompts") from None

    def ip_adapter(self, model: str) -> Any:
        """The models.yaml ``ip_adapter`` entry of ``model``: the first of its type that is not limited to other
        models (None: none is configured)."""
        mtype = self.model_type(model)
        return next((e for e in self.models.ip_adapter.values()
                     if e.type == mtype and (not e.extra.get("models") or model in e.extra["models"])), None)

    def describe_model(self, model: str) -> dict[str, Any]:
        """A base model as ``GET /api/v1/models`` lists it: name, declared type, family (declared or
        detected; None when unknown), native size, ``defaults:``, the models.yaml pipes it runs and its IP-Adapter."""
        entry = self.models.base[model]
        size = self.native_size(model)
        return {"name": entry.name, "type": entry.type, "family": self.model_type(model),
                "native_size": list(size) if size else None, "defaults": entry.defaults, "refiner": entry.refiner,
                "pipes": self.usable_pipes(model),
                # the IP-Adapter its image_prompts use (None: image prompts are a 400 for it)
                "ip_adapter": getattr(self.ip_adapter(model), "name", None)}

    def native_size(self, model: str) -> tuple[int, int] | None:
        """The model's native (width, height), read from its files once (None when unknown)."""
        return self._once(self._sizes, model, self.models.base[model].native_size)

    def pipe(self, name: str) -> PipeEntry:
        return self.models.pipes[name]

    def pipe_class(self, pipe: str) -> Any:
        """The class of a models.yaml pipe (``Prompt2ImPipe``...)."""
        return self.pipe_factory(self.models.pipes[pipe].classname)

    def lora_files(self, loras: list[dict[str, Any]], field: str = "loras",
                   job_own: frozenset[str] = frozenset()) -> list[tuple[str, float]]:
        """A session's LoRAs as ``(file, weight)`` for ``pipe.set_loras``.

        Raises:
            InvalidValueError: a LoRA models.yaml no longer lists (removed since the session opened or the job
                was queued), naming it, models.yaml and ``field`` (``job_loras`` for a name in ``job_own``).
        """
        for x in loras:
            if x["name"] not in self.models.lora:
                whose = "the job's own (a <lora:> tag or its performance preset)" if x["name"] in job_own \
                    else "the session's"
                known = ", ".join(self.models.lora) or "none"
                raise InvalidValueError(
                    f"LoRA {x['name']!r} ({whose}) is not in {self.models.file.name} any more: it was removed from "
                    f"its `lora:` section since it was chosen; put it back, or queue the job again without it "
                    f"(in a new session if it is the session's); LoRAs now listed: {known}",
                    "job_loras" if x["name"] in job_own else field, known)
        return [(str(self.models.lora[x["name"]].path), float(x["weight"])) for x in loras]

    def job_lora_files(self, session_loras: list[dict[str, Any]],
                       job_loras: list[dict[str, Any]] | None) -> list[tuple[str, float]]:
        """A job's LoRAs as ``(file, weight)``: the session's, then the job's own (params ``job_loras``,
        ``[{"name", "weight"}]``: prompt ``<lora:...>`` tags, a performance preset's LoRA); a LoRA both
        name keeps its place with the job's weight. Checked at admission (``validation.normalize_loras``)."""
        merged = {x["name"]: x for x in session_loras}
        for x in job_loras or ():
            merged[x["name"]] = x
        return self.lora_files(list(merged.values()), job_own=frozenset(x["name"] for x in job_loras or ()))

    def defaults(self, model: str) -> dict[str, Any]:
        """The model's ``defaults:`` from models.yaml (what a job leaves out)."""
        return dict(self.models.base[model].defaults)

    def expected_defaults(self, model: str) -> dict[str, Any]:
        """What the model's pipe will run a job with that sets nothing: models.yaml's ``defaults:`` over its
        family's (and variant's) own, e.g. Flux.1's 28 steps, Fill's 50 (for estimates before it loads; every
        queued job asks, so the folder is read once)."""
        def family_defaults() -> dict[str, Any]:
            fam = self.family(model)
            return fam.folder_defaults(self.models.base[model].config_folder) if fam is not None else {}

        return {**self._once(self._family_defaults, model, family_defaults), **self.defaults(model)}

    def pipe_kwargs(self, session: SessionRecord) -> dict[str, Any]:
        """Constructor arguments of the session's pipe class beyond the shared base (ControlNets, the model's
        IP-Adapter for the classes that take image prompts)."""
        entry = self.models.pipes[session.pipe]
        adapter = self.ip_adapter(session.model)
        takes_image_prompts = "image_prompts" in getattr(self.pipe_class(session.pipe), "PARAMS", ())
        kwargs: dict[str, Any] = {"ip_adapter": {"weights": str(adapter.path), "image_encoder": str(
            adapter.extra["image_encoder"])}} if adapter is not None and takes_image_prompts else {}
        refiner = self.models.base[session.model].refiner  # checked at start-up: a base model of its family
        if refiner is not None and "refiner_switch" in getattr(self.pipe_class(session.pipe), "PARAMS", ()):
            kwargs["refiner"] = str(self.models.base[refiner].path)  # loaded by the pipe on first use
        if self.models.upscaler and "upscaler" in getattr(self.pipe_class(session.pipe), "PARAMS", ()):
            kwargs["upscalers"] = {n: str(e.path) for n, e in self.models.upscaler.items()}  # uov's, by name
        if not entry.needs_cnet:
            return kwargs
        kwargs["controlnets"] = controlnet_paths(self.models, session.pipe, self.model_type(session.model))
        conditions = entry.extra.get("condition_models")
        computes_conditions = "ctypes" in getattr(self.pipe_class(session.pipe), "PARAMS", ())
        if computes_conditions and isinstance(conditions, dict):  # depth/pose models, under model_dir
            kwargs["condition_models"] = {str(c): str(self.model_dir / str(p)) for c, p in conditions.items()}
        return kwargs

    def path_names(self) -> dict[str, str]:
        """Resolved model/LoRA/ControlNet paths -> their models.yaml names (for image metadata)."""
        return self.models.path_names
