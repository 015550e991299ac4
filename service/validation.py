"""Checking what clients ask for before anything is stored.

Names that become paths, the pipe/model/LoRAs of a session, and every parameter of a job
are checked here; each error is an :class:`InvalidInput` naming the field and the allowed
values. What only the pipe can judge (an unknown scheduler name, a bad image size for the
model) fails the job at run time with the pipe's own message.
"""
from __future__ import annotations

import numbers
import re
import secrets
from typing import Any

from multigen.pipes.base import MAX_CLIP_SKIP, MAX_STEPS
from multigen.pipes.images import MIN_SIDE

from .config import Limits, ModelEntry, ModelsConfig
from .errors import InvalidInput

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
#: seeds drawn when none are given: the range every torch generator and JSON reader holds exactly
MAX_DRAWN_SEED = 2**32 - 1
MAX_SEED = 2**64 - 1
#: parameters queue_gen takes itself (not passed to the pipe's setup)
JOB_FIELDS = ("prompt", "negative_prompt", "count", "seeds", "priority", "images", "image_callback")
#: simple type/range checks for common setup parameters (the pipe checks the rest)
NUMERIC_PARAMS: dict[str, tuple[bool, float, float | None]] = {  # name: (integer, min, max)
    "steps": (True, 1, MAX_STEPS), "guidance_scale": (False, 0, 100), "clip_skip": (True, 0, MAX_CLIP_SKIP),
    "strength": (False, 0, 1), "scale": (False, 0.01, 16), "blur": (False, 0, 256),
    "blur_compose": (False, 0, 256),
}


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
        raise InvalidInput(f"unknown {what} {value!r}; known: {names}", field=field)
    return value


def model_type_of(entry: ModelEntry) -> str | None:
    """The declared type of a base model, or the one detected from its files (None if unknown)."""
    if entry.type:
        return entry.type
    try:
        from multigen.pipes.loading import detect_checkpoint_type, detect_folder_type

        found = detect_checkpoint_type(entry.path) if entry.path.is_file() else detect_folder_type(entry.path)
        return str(found.value)
    except Exception:  # unknown until loaded: the pipe will check when loading
        return None


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
    out = []
    for i, item in enumerate(loras):
        field = f"loras[{i}]"
        if isinstance(item, str):
            name, weight = item, 1.0
        elif isinstance(item, dict):
            name, weight = item.get("name"), item.get("weight", 1.0)
            extra = set(item) - {"name", "weight"}
            if extra:
                raise InvalidInput(f"{field}: unknown keys {sorted(extra)}; allowed: name, weight", field=field)
        elif isinstance(item, (list, tuple)) and len(item) == 2:
            name, weight = item
        else:
            raise InvalidInput(f"{field}: expected a name or {{name, weight}}, got {item!r}", field=field)
        check_choice(name, models.lora, f"{field}.name" if isinstance(item, dict) else field, "LoRA")
        if isinstance(weight, bool) or not isinstance(weight, numbers.Real) or not -10 <= float(weight) <= 10:
            raise InvalidInput(f"{field}: weight {weight!r} must be a number from -10 to 10", field=f"{field}.weight")
        ltype = models.lora[name].type
        if ltype and model_type and ltype != model_type:
            raise InvalidInput(f"{field}: LoRA {name!r} is for {ltype} models, the session's model is {model_type}; "
                               f"LoRAs for {model_type}: " + (", ".join(sorted(
                                   n for n, e in models.lora.items() if e.type in (None, model_type))) or "none"),
                               field=field)
        out.append({"name": name, "weight": float(weight)})
    return out


def check_count_and_seeds(count: Any, seeds: Any, limits: Limits) -> tuple[int, list[int]]:
    """The image count and one seed per image (drawn now for those not given).

    Raises:
        InvalidInput: a count outside 1..limits.max_count, or seeds that are not integers or
            do not match the count.
    """
    if seeds is not None:
        if isinstance(seeds, numbers.Integral) and not isinstance(seeds, bool):
            seeds = [int(seeds)]
        if not isinstance(seeds, (list, tuple)) or not seeds:
            raise InvalidInput("seeds must be a non-empty list of integers", field="seeds")
        for i, s in enumerate(seeds):
            if isinstance(s, bool) or not isinstance(s, numbers.Integral) or not 0 <= int(s) <= MAX_SEED:
                raise InvalidInput(f"seeds[{i}] = {s!r}: seeds are integers from 0 to 2**64-1", field=f"seeds[{i}]")
        if count is None:
            count = len(seeds)
    if count is None:
        count = 1
    if isinstance(count, bool) or not isinstance(count, numbers.Integral) or not 1 <= int(count) <= limits.max_count:
        raise InvalidInput(f"count {count!r} is out of range: 1 to {limits.max_count} "
                           "(limits.max_count in config.yaml)", field="count")
    count = int(count)
    if seeds is not None and len(seeds) != count:
        raise InvalidInput(f"seeds has {len(seeds)} values but count is {count}: give one seed per image "
                           "or leave seeds out to draw them", field="seeds")
    rng = secrets.SystemRandom()
    return count, [int(s) for s in seeds] if seeds is not None else [rng.randint(0, MAX_DRAWN_SEED)
                                                                     for _ in range(count)]


def check_prompt(prompt: Any, field: str) -> Any:
    """A prompt string or a Cfgen grammar (list/dict), checked."""
    if prompt is None or isinstance(prompt, str):
        return prompt or ""
    if isinstance(prompt, (list, dict, tuple)):
        from multigen.pipes.cfgen import validate_grammar
        from multigen.pipes.errors import PipeError

        try:
            validate_grammar(prompt, field)
        except PipeError as e:
            raise InvalidInput(str(e), field=field) from None
        return list(prompt) if isinstance(prompt, tuple) else prompt
    raise InvalidInput(f"{field} must be a string or a prompt grammar (list/dict), got {type(prompt).__name__}",
                       field=field)


def check_priority(priority: Any) -> int:
    if isinstance(priority, bool) or not isinstance(priority, numbers.Integral) or not -100 <= int(priority) <= 100:
        raise InvalidInput(f"priority {priority!r} must be an integer from -100 to 100", field="priority")
    return int(priority)


def check_setup_params(params: dict[str, Any], pipe_cls: Any, pipe_name: str, limits: Limits) -> None:
    """Every name must be one the pipe's ``setup`` takes; common numbers must be in range.

    Raises:
        InvalidInput: naming the parameter and the allowed names or range.
    """
    allowed = set(getattr(pipe_cls, "PARAMS", ())) | set(getattr(pipe_cls, "ALIASES", {}) or {})
    for key, value in params.items():
        if key not in allowed:
            names = ", ".join(sorted(set(getattr(pipe_cls, "PARAMS", ())) | set(JOB_FIELDS) - {"image_callback"}))
            raise InvalidInput(f"parameter {key!r} is not taken by pipe {pipe_name!r} "
                               f"({getattr(pipe_cls, '__name__', pipe_cls)}); allowed: {names}", field=key)
        if value is None:
            continue
        if key in ("width", "height"):
            top = limits.max_width if key == "width" else limits.max_height
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not MIN_SIDE <= int(value) <= top:
                raise InvalidInput(f"{key} {value!r} must be an integer from {MIN_SIDE} to {top} (limits.max_{key}); "
                                   "sizes that are not multiples of 8 are padded and cropped back", field=key)
        elif key == "scale" and isinstance(value, (list, tuple)):  # [width, height] in pixels
            sides = (limits.max_width, limits.max_height)
            if len(value) != 2 or not all(
                    not isinstance(v, bool) and isinstance(v, numbers.Integral) and MIN_SIDE <= int(v) <= top
                    for v, top in zip(value, sides)):
                raise InvalidInput(f"scale {value!r} must be a factor from {NUMERIC_PARAMS['scale'][1]} to "
                                   f"{NUMERIC_PARAMS['scale'][2]} or [width, height] in pixels, each from {MIN_SIDE} "
                                   f"to the limits.max_width/max_height ({sides[0]}x{sides[1]})", field=key)
        elif key in NUMERIC_PARAMS:
            integer, low, high = NUMERIC_PARAMS[key]
            kind = numbers.Integral if integer else numbers.Real
            # "not low <= value": NaN fails every comparison, so it must fail this one
            if (isinstance(value, bool) or not isinstance(value, kind) or not low <= value
                    or (high is not None and not value <= high)):
                raise InvalidInput(f"{key} {value!r} must be {'an integer' if integer else 'a number'} "
                                   f"from {low} to {high}", field=key)


def images_to_params(classname: str, images: Any, params: dict[str, Any], pipe_name: str) -> None:
    """Map metafusion's ``images=[...]`` argument onto the pipe's setup parameters (in place)."""
    if images is None:
        return
    if not isinstance(images, (list, tuple)):
        images = [images]
    if not images:
        return
    if classname == "Prompt2ImPipe":
        raise InvalidInput(f"pipe {pipe_name!r} (Prompt2ImPipe) takes no input images; "
                           "open a session with an image pipe", field="images")
    if classname == "MaskedIm2ImPipe":
        params.setdefault("original_image", images[0])
        if len(images) > 1 and params.get("mask") is None:
            params.setdefault("image_painted", images[1])
    elif classname == "InpaintingPipe":
        params.setdefault("image", images[0])
        if len(images) > 1:
            params.setdefault("mask", images[1])
    elif classname == "Cond2ImPipe":
        params.setdefault("image", images[0] if len(images) == 1 else list(images))
    else:
        params.setdefault("image", images[0])
    if len(images) > 2 or (len(images) == 2 and classname not in ("MaskedIm2ImPipe", "InpaintingPipe",
                                                                    "Cond2ImPipe")):
        raise InvalidInput(f"pipe {pipe_name!r} ({classname}) takes "
                           f"{'up to 2 images' if classname in ('MaskedIm2ImPipe', 'InpaintingPipe') else 'one image'}"
                           f", got {len(images)}", field="images")


def check_has_image(classname: str, params: dict[str, Any], pipe_name: str) -> None:
    if classname == "Prompt2ImPipe":
        return
    keys = ("original_image", "image", "fimage") if classname == "MaskedIm2ImPipe" else ("image", "fimage")
    if all(params.get(k) is None for k in keys):
        raise InvalidInput(f"pipe {pipe_name!r} ({classname}) needs an input image: pass images=[...] "
                           f"(or {keys[0]}=)", field="images")


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
