"""Checking what clients ask for before anything is stored.

Names that become paths, the pipe/model/LoRAs of a session, and every parameter of a job
are checked here; each error is an :class:`InvalidInput` naming the field and the allowed
values. Types and ranges come from the parameter spec (``multigen.pipes.spec``) with the
config's ``limits`` on top, so what is refused here is what the pipe would refuse, and what
the API's request models refuse. What the model's family cannot run or take (a pipe class of a
task it does not run, another family's parameters, a scheduler of the other kind) is asked of
the family's own declarations (``multigen.pipes.families``), as the pipes ask them. What only
the pipe can judge (an image that does not decode, a mask of another size) fails the job at run
time with the pipe's own message.
"""
from __future__ import annotations

import re
import secrets
from pathlib import Path
from typing import Any

from multigen.pipes import spec as specs
from multigen.pipes.errors import PipeError
from multigen.pipes.families import Family, Role, family, family_of_checkpoint, family_of_folder
from multigen.pipes.registry import pipe_role, pipe_spec, spec_of
from multigen.pipes.schedulers import FLOW_TABLE, SD_TABLE, resolve_name

from .config import Limits, ModelEntry, ModelsConfig
from .errors import InvalidInput

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
#: parameters queue_gen takes itself (not passed to the pipe's setup)
JOB_FIELDS = specs.JOB.names + ("images", "image_callback")


def _checked(param: specs.Param, value: Any, label: str, field: str | None = None) -> Any:
    """``param.check(value)`` under the name ``label``, its error as an :class:`InvalidInput` naming
    ``field`` (default: what the check names, ``label`` or a list item ``label[i]``)."""
    try:
        return param.check(value, label)
    except PipeError as e:
        raise InvalidInput(e.message, field=field or e.param or label) from None


def check_name(value: Any, field: str) -> str:
    """A user or project name that is safe as a path part.

    Raises:
        InvalidInput: naming ``field`` and the allowed pattern.
    """
    if not isinstance(value, str) or not NAME_RE.match(value):
        raise InvalidInput(f"{field} {value!r} is not allowed: use 1-64 letters, digits, '_', '.' or '-', "
                           "starting with a letter or digit", field=field)
    return value


def check_choice(value: Any, known: dict[str, Any] | list[str], field: str, what: str) -> str:
    if not isinstance(value, str) or value not in known:
        names = ", ".join(sorted(known)) or "(none configured)"
        raise InvalidInput(f"unknown {what} {value!r}; known: {names}", field=field, code=f"unknown_{what.lower()}")
    return value


def model_type_of(entry: ModelEntry) -> str | None:
    """The declared type of a base model, or the one its family detects from its files (None if unknown).

    Torch-free: a folder's configs or a checkpoint's tensor names are read, no weights.
    """
    if entry.type:
        return entry.type
    try:
        found = family_of_checkpoint(entry.path) if entry.path.is_file() else family_of_folder(entry.path)
        return found.name
    except Exception:  # unknown until loaded: the pipe will check when loading
        return None


def family_of_type(model_type: str | None) -> Family | None:
    """The family of a model type (``model_type_of``), None when it is unknown until the model loads."""
    if model_type is None:
        return None
    try:
        return family(model_type)
    except PipeError:
        return None


def model_roles(entry: ModelEntry, fam: Family | None) -> tuple[Role, ...] | None:
    """The tasks a base model runs, from its family and its folder's configs (torch-free: a Flux.1 Fill
    folder inpaints only, a plain Flux.1 or Qwen-Image folder does not edit); None when the family is
    unknown until the model loads. A single file is judged by its config folder."""
    if fam is None:
        return None
    return fam.folder_roles(entry.config_folder) if entry.config_folder is not None else fam.roles


def runs_pipe(roles: tuple[Role, ...] | None, classname: str) -> bool:
    """Whether a model with these tasks (``model_roles``) runs a pipe class (True when they are unknown:
    the pipe checks on load)."""
    return roles is None or pipe_role(classname) in roles


def check_family_runs_pipe(fam: Family | None, roles: tuple[Role, ...] | None, classname: str, pipe_name: str,
                           model: str, usable: list[str], folder: Path | None = None) -> None:
    """A session's pipe class runs a task its model runs (``model_roles``).

    Args:
        usable: the models.yaml pipes the model runs, for the message.
        folder: the model's (config) folder, to say what a model that runs no pipe is for.

    Raises:
        InvalidInput: naming ``pipe``, the task, and the pipes usable with the model.
    """
    if fam is None or runs_pipe(roles, classname):
        return
    role = pipe_role(classname)
    if roles == ():  # a model that runs no pipe of its own (an SDXL refiner): what it is for
        variant = fam.folder_variant(folder) if folder is not None else None
        why = f"it is an {variant.name}: {variant.note}" if variant is not None else "it runs none of its own"
        raise InvalidInput(f"model {model!r} cannot run pipe {pipe_name!r} or any other: {why}", field="model",
                           code="unsupported_pipe")
    kind = fam.name if not fam.runs(role) else f"these {fam.title}"
    raise InvalidInput(f"pipe {pipe_name!r} ({classname}) runs {role.value}, which {kind} models do not run (model "
                       f"{model!r} runs {', '.join(r.value for r in roles or ())}); pipes usable with model "
                       f"{model!r}: {', '.join(usable) or 'none'}", field="pipe", code="unsupported_pipe")


def check_family_params(params: dict[str, Any], fam: Family | None) -> None:
    """What the model's family refuses of a job's setup parameters (``Family.check_params``: clip_skip and
    timestep_spacing where refused, another family's own parameters, a scheduler of the other kind); for
    a model whose family is unknown until it loads, only that a scheduler name is known at all.

    Raises:
        InvalidInput: naming the parameter, the bad value and the allowed values.
    """
    try:
        if fam is not None:
            fam.check_params(params)
        elif params.get("scheduler") is not None and FLOW_TABLE.find(params["scheduler"]) is None:
            resolve_name(params["scheduler"], SD_TABLE)
    except PipeError as e:
        raise InvalidInput(e.message, field=e.param or "scheduler") from None


def normalize_loras(loras: Any, models: ModelsConfig, model_type: str | None) -> list[dict[str, Any]]:
    """``[name | {"name", "weight"} | (name, weight)]`` as ``[{"name", "weight"}]``, checked.

    Raises:
        InvalidInput: unknown LoRA (with the known ones), bad weight, or a LoRA of another
            model family than the session's model.
    """
    if loras is None:
        return []
    if isinstance(loras, (str, dict)):
        loras = [loras]
    if not isinstance(loras, (list, tuple)):
        raise InvalidInput("loras must be a list of names or {name, weight} objects", field="loras")
    if len(loras) > specs.MAX_LORAS:
        raise InvalidInput(f"{len(loras)} LoRAs given; a session takes at most {specs.MAX_LORAS}", field="loras")
    out = []
    for i, item in enumerate(loras):
        field = f"loras.{i}"
        if isinstance(item, str):
            name, weight = item, specs.LORA_WEIGHT.default
        elif isinstance(item, dict):
            name, weight = item.get("name"), item.get("weight", specs.LORA_WEIGHT.default)
            extra = set(item) - {"name", "weight"}
            if extra:
                raise InvalidInput(f"{field}: unknown keys {sorted(extra)}; allowed: name, weight", field=field)
        elif isinstance(item, (list, tuple)) and len(item) == 2:
            name, weight = item
        else:
            raise InvalidInput(f"{field}: expected a name or {{name, weight}}, got {item!r}", field=field)
        check_choice(name, models.lora, f"{field}.name" if isinstance(item, dict) else field, "LoRA")
        weight = _checked(specs.LORA_WEIGHT, weight, f"{field}.weight")
        ltype = models.lora[name].type
        if ltype and model_type and ltype != model_type:
            raise InvalidInput(f"{field}: LoRA {name!r} is for {ltype} models, the session's model is {model_type}; "
                               f"LoRAs for {model_type}: " + (", ".join(sorted(
                                   n for n, e in models.lora.items() if e.type in (None, model_type))) or "none"),
                               field=f"{field}.name" if isinstance(item, dict) else field, code="lora_mismatch")
        out.append({"name": name, "weight": float(weight)})
    return out


def check_count_and_seeds(count: Any, seeds: Any, limits: Limits) -> tuple[int, list[int]]:
    """The image count and one seed per image (drawn now for those not given).

    Raises:
        InvalidInput: a count outside 1..limits.max_count, or seeds that are not integers from
            the spec's range or do not match the count.
    """
    job = specs.apply_limits(specs.JOB, limits)
    if seeds is not None:
        if not isinstance(seeds, (list, tuple)):
            seeds = [seeds]  # one seed, as metafusion's seed=
        if not seeds:
            raise InvalidInput("seeds must be a non-empty list of integers", field="seeds")
        seeds = [_checked(job["seeds"], s, f"seeds[{i}]") for i, s in enumerate(seeds)]
        if count is None:
            count = len(seeds)
    count = _checked(job["count"], 1 if count is None else count, "count")
    if seeds is not None and len(seeds) != count:
        raise InvalidInput(f"seeds has {len(seeds)} values but count is {count}: give one seed per image "
                           "or leave seeds out to draw them", field="seeds")
    rng = secrets.SystemRandom()
    return count, seeds if seeds is not None else [rng.randint(0, specs.DRAWN_SEED_MAX) for _ in range(count)]


def check_prompt(prompt: Any, field: str) -> Any:
    """A prompt string or a Cfgen grammar (list/dict), checked by ``validate_grammar``: its shapes, and its
    size against the spec's caps (characters, nesting depth, items), the very checks of the API's models.

    Raises:
        InvalidInput: naming ``field`` and the cap or the bad item.
    """
    if prompt is None:
        return ""
    if isinstance(prompt, (str, list, dict, tuple)):
        from multigen.pipes.cfgen import validate_grammar

        try:
            validate_grammar(prompt, field)
        except PipeError as e:
            raise InvalidInput(str(e), field=field) from None
        return list(prompt) if isinstance(prompt, tuple) else prompt
    raise InvalidInput(f"{field} must be a string or a prompt grammar (list/dict), got {type(prompt).__name__}",
                       field=field)


def check_priority(priority: Any) -> int:
    """A job's priority, in the spec's range (higher runs first).

    Raises:
        InvalidInput: not an integer in range.
    """
    return _checked(specs.JOB["priority"], priority, "priority")


def check_setup_params(params: dict[str, Any], pipe_cls: Any, pipe_name: str, limits: Limits) -> None:
    """Every name must be one the pipe's ``setup`` takes, every value of the type and in the range
    the pipe's spec declares, with the config's limits on top (the tighter wins).

    Args:
        params: the setup parameters of a job (images included, unchecked here).
        pipe_cls: the pipe class (its ``SPEC``), its :class:`PipeSpec` itself (no torch import needed:
            ``multigen.pipes.registry.pipe_spec(classname)``), or a stand-in with ``PARAMS`` (the
            registered spec of its name, else its names typed as the pipe classes declare them).
        pipe_name: the pipe's name in models.yaml, for messages.
        limits: the config's limits.

    Raises:
        InvalidInput: naming the parameter and the allowed names or values.
    """
    spec = specs.apply_limits(spec_of(pipe_cls), limits)
    for key, value in params.items():
        if key not in spec.accepted:
            names = ", ".join(sorted(set(spec.names) | set(JOB_FIELDS) - {"image_callback"}))
            raise InvalidInput(f"parameter {key!r} is not taken by pipe {pipe_name!r} "
                               f"({getattr(pipe_cls, '__name__', None) or spec.classname}); allowed: {names}",
                               field=key)
        param = spec[spec.canonical(key)]
        if value is not None and not param.image:
            params[key] = _checked(param, value, key, field=key)  # the message names a list item


def images_to_params(classname: str, images: Any, params: dict[str, Any], pipe_name: str) -> None:
    """Map metafusion's ``images=[...]`` onto the pipe's image parameters (in place), as its spec says.

    Raises:
        InvalidInput: images for a pipe that takes none, too many, or one whose parameter is given too.
    """
    if images is None:
        return
    if not isinstance(images, (list, tuple)):
        images = [images]
    try:
        pipe_spec(classname).assign_images(list(images), params)
    except PipeError as e:
        hint = "; open a session with an image pipe" if not pipe_spec(classname).image_slots else ""
        raise InvalidInput(f"pipe {pipe_name!r}: {e.message}{hint}", field="images") from None


def check_has_image(classname: str, params: dict[str, Any], pipe_name: str) -> None:
    """The images the pipe cannot run without (its spec's ``required_images``) are there.

    Raises:
        InvalidInput: naming ``images`` for the input image, else the missing parameter.
    """
    spec = pipe_spec(classname)
    for group in spec.missing_images(params):
        if spec.image_slots and group[0] == spec.image_slots[0]:
            raise InvalidInput(f"pipe {pipe_name!r} ({classname}) needs an input image: pass images=[...] "
                               f"(or {group[0]}=)", field="images")
        images = [name for name in group if spec[name].image]
        others = [name for name in group if not spec[name].image]  # say, outpaint distances for a mask
        what = " or ".join(images) + (f" (or a value for one of {', '.join(others)})" if others else "")
        raise InvalidInput(f"pipe {pipe_name!r} ({classname}) needs {what}: " + "; ".join(
            f"{name}: {spec[name].description}" for name in images), field=images[-1])


def controlnet_paths(models: ModelsConfig, pipe: str, model_type: str | None) -> list[str] | dict[str, str]:
    """ControlNets of a ControlNet pipe: the ``controlnet:`` of its models.yaml entry (a name, a list
    of names, or ``{condition type: name}``), else the first configured ControlNet of the model's
    type (empty when there is none)."""
    wanted = models.pipes[pipe].extra.get("controlnet")
    if isinstance(wanted, dict):
        return {str(c): str(models.controlnet[n].path) for c, n in wanted.items() if n in models.controlnet}
    if wanted:
        names = [wanted] if isinstance(wanted, str) else list(wanted)
        return [str(models.controlnet[n].path) for n in names if n in models.controlnet]
    for entry in models.controlnet.values():
        if entry.type in (None, model_type):
            return [str(entry.path)]
    return []
