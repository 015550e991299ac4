"""LoRA adapters on a shared base pipeline: load once, switch per call, remove exactly.

Adapters live in the shared modules (UNet or transformer, text encoders), so every pipe object
built on the same base sees them. Any family whose diffusers pipelines have a LoRA loader mixin
(``load_lora_weights``: SD, SDXL, Flux.1, ...) loads through the same calls; a file of another
family (an SD LoRA on a Flux model) is refused, also when diffusers would load nothing from it. The adapter name is derived from the file's resolved path, so whichever
pipe object asks for a file finds it if it is already loaded. Weights are never fused: the
base weights stay bit-identical, and disabling or deleting adapters gives exactly the base
model's pixels.
"""
from __future__ import annotations

import hashlib
import logging
import os
import warnings
from pathlib import Path
from typing import Any, Iterable, Sequence

from .errors import InvalidValueError, PipeError

logger = logging.getLogger(__name__)

#: attribute on the shared denoiser (UNet or transformer) recording the active set, so pipe objects can
#: tell whether another one changed it since
STATE_ATTR = "_multigen_active_loras"

LoraSpec = tuple[str, float]


def adapter_name(path: "str | os.PathLike[str]") -> str:
    """A stable adapter name for a LoRA file: its stem plus a hash of its resolved path."""
    p = Path(path).expanduser().resolve()
    stem = "".join(c if c.isalnum() else "_" for c in p.stem)[:40]
    return f"{stem}_{hashlib.sha1(str(p).encode()).hexdigest()[:10]}"


def normalize(loras: "Iterable[Any] | None") -> list[LoraSpec]:
    """``[(path, weight), ...]`` from paths, ``(path, weight)`` pairs or ``{"path", "weight"}`` dicts.

    Raises:
        InvalidValueError: an entry has another shape, a weight is not a number, or a path repeats.
    """
    out: list[LoraSpec] = []
    allowed = "a list of (path, weight) pairs, paths, or {'path': ..., 'weight': ...} dicts"
    for item in loras or []:
        if isinstance(item, (str, os.PathLike)):
            path, weight = item, 1.0
        elif isinstance(item, dict) and "path" in item:
            path, weight = item["path"], item.get("weight", 1.0)
        elif isinstance(item, (list, tuple)) and len(item) == 2:
            path, weight = item
        else:
            raise InvalidValueError(f"loras entry {item!r} is not valid; allowed: {allowed}", "loras", allowed)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            raise InvalidValueError(f"loras weight {weight!r} for {path} is not a number", "loras",
                                    "a number, e.g. 0.8")
        spec = (str(Path(path).expanduser()), float(weight))
        if any(Path(s[0]).resolve() == Path(spec[0]).resolve() for s in out):
            raise InvalidValueError(f"loras lists {path} twice; give each file once", "loras", allowed)
        out.append(spec)
    return out


def loaded_adapters(pipe: Any) -> set[str]:
    """Names of the adapters loaded into any LoRA-capable component of ``pipe``."""
    try:
        listed = pipe.get_list_adapters()
    except (ValueError, AttributeError):
        return set()
    return {name for names in listed.values() for name in names}


def _denoiser(pipe: Any) -> Any:
    unet = getattr(pipe, "unet", None)
    return unet if unet is not None else pipe.transformer


def active_state(pipe: Any) -> tuple[LoraSpec, ...] | None:
    """The LoRA set last activated on ``pipe``'s shared modules (by any pipe object); None when
    unknown (a load failed half-way), so that the next ``set_loras`` applies its set in full."""
    return getattr(_denoiser(pipe), STATE_ATTR, ())


def _model_name(pipe: Any) -> str:
    """The family name of ``pipe`` for messages ("FLUX"), or "this" when it is of no known family."""
    from .families import family_of_pipeline

    try:
        return family_of_pipeline(pipe).name
    except PipeError:
        return "this"


def _load(pipe: Any, path: str, name: str) -> None:
    """Load one LoRA file as adapter ``name``, refusing a file that does not fit the model.

    Raises:
        PipeError: the file does not exist.
        InvalidValueError: the file cannot be read, has another family's layout (diffusers raises on
            keys it cannot map), or loaded into no component (nothing matched, diffusers only warned).
    """
    p = Path(path)
    if not p.is_file():
        raise PipeError(f"loras file {path} does not exist", "loras", "paths of existing .safetensors files")
    model = _model_name(pipe)
    allowed = f"LoRA files made for {model} models"
    try:
        from transformers.utils import logging as hf_logging

        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # silences the harmless LOAD REPORT of text-encoder LoRAs
    except ImportError:  # pragma: no cover
        verbosity = None
    try:
        with warnings.catch_warnings():  # peft warns that several adapters share a model: that is the point
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            pipe.load_lora_weights(str(p.parent), weight_name=p.name, adapter_name=name, local_files_only=True)
    except Exception as exc:  # corrupt files raise SafetensorError, wrong layouts ValueError/KeyError/...
        try:  # a half-loaded adapter must not stay behind
            if name in loaded_adapters(pipe):
                pipe.delete_adapters([name])
        finally:
            raise InvalidValueError(f"loras file {path} could not be loaded into this {model} model (a LoRA of "
                                    f"another model family, or not a LoRA file?): {exc}; allowed: {allowed}",
                                    "loras", allowed) from exc
    finally:
        if verbosity is not None:
            hf_logging.set_verbosity(verbosity)
    if name not in loaded_adapters(pipe):  # diffusers warned that no key matched and loaded nothing
        raise InvalidValueError(f"loras file {path} has no weights that fit this {model} model (a LoRA of another "
                                f"model family?); allowed: {allowed}", "loras", allowed)
    logger.info("loaded LoRA %s as adapter %s", path, name)


def set_loras(pipe: Any, loras: "Sequence[Any] | None") -> list[LoraSpec]:
    """Make exactly ``loras`` active on ``pipe`` (loading files not loaded yet).

    Args:
        pipe: a diffusers pipeline with the LoRA loader mixin (shared modules).
        loras: ``[(path, weight), ...]``; empty or None disables every adapter.

    Returns:
        The normalized list now active.
    """
    specs = normalize(loras)
    if tuple(specs) == active_state(pipe) and (specs or not loaded_adapters(pipe)):
        return specs
    present = loaded_adapters(pipe)
    if not specs:
        if present:
            pipe.disable_lora()
        setattr(_denoiser(pipe), STATE_ATTR, ())
        return specs
    # loading an adapter activates it alone: until set_adapters below has run, the recorded state
    # is stale, so a load that fails half-way must not leave it claiming the old set is active
    setattr(_denoiser(pipe), STATE_ATTR, None)
    names = []
    for path, _ in specs:
        name = adapter_name(path)
        if name not in present:
            _load(pipe, path, name)
        names.append(name)
    pipe.set_adapters(names, adapter_weights=[w for _, w in specs])
    pipe.enable_lora()
    setattr(_denoiser(pipe), STATE_ATTR, tuple(specs))
    return specs


def unload_loras(pipe: Any, paths: "Iterable[str] | None" = None) -> None:
    """Delete adapters from the shared modules (all of them when ``paths`` is None).

    After deleting every adapter the model is bit-identical to one that never had them.
    """
    present = loaded_adapters(pipe)
    if paths is None:
        if present:
            pipe.unload_lora_weights()
        setattr(_denoiser(pipe), STATE_ATTR, ())
        return
    names = [adapter_name(p) for p in paths]
    doomed = [n for n in names if n in present]
    if doomed:
        pipe.delete_adapters(doomed)
    state = tuple(s for s in active_state(pipe) or () if adapter_name(s[0]) not in names)
    setattr(_denoiser(pipe), STATE_ATTR, ())
    set_loras(pipe, list(state))
