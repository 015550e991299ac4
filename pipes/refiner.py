"""The SDXL refiner switch: the base model denoises the first part of the steps, a refiner model the rest.

diffusers' documented base + refiner flow ("ensemble of expert denoisers"): the base's text-to-image
pipeline runs with ``denoising_end=switch`` and ``output_type="latent"``; the refiner's image-to-image
pipeline continues from those latents with ``denoising_start=switch`` (no noise added, the timesteps
below the switch of the same schedule). Both use the job's scheduler (the refiner gets a fresh object of
the same class and config, so the two parts share one timestep schedule), steps, guidance and generators.

:class:`Refiner` holds the refiner model of a pipe object: the service passes its folder to the pipe's
constructor (``Prompt2ImPipe(refiner=folder)``, models.yaml ``refiner:``); it is loaded on the first job
that asks for it and kept with the pipe object, so the model cache's base entry holds it once.
"""
from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Any, Callable

from .errors import InvalidValueError
from .families import Family, Role

logger = logging.getLogger(__name__)

StepCallback = Callable[[int, int, Any], Any]


class Refiner:
    """A refiner model (a diffusers folder of ``family``), loaded on first use onto ``device`` in ``dtype``.

    Args:
        path: the refiner's diffusers folder (its ``model_index.json`` names its image-to-image class).
        family: the base model's family: the refiner must be one of its models.
        device: where the base computes.
        dtype: the base's precision.
    """

    def __init__(self, path: str | os.PathLike[str], family: Family, device: Any, dtype: Any) -> None:
        self.path = Path(path)
        self.family = family
        self.device = device
        self.dtype = dtype
        self._pipeline: Any = None
        self._lock = threading.Lock()
        if not (self.path / "model_index.json").is_file():
            raise InvalidValueError(f"refiner {self.path} is not a diffusers folder (no model_index.json); allowed: "
                                    f"a diffusers folder of a {family.title} refiner", "refiner",
                                    "a diffusers folder")

    @property
    def loaded(self) -> bool:
        return self._pipeline is not None

    def pipeline(self) -> Any:
        """The refiner's image-to-image pipeline (loaded on the first call, then kept)."""
        with self._lock:
            if self._pipeline is None:
                from .families import family_of_pipeline
                from .loading import prepare_pipeline

                cls = self.family.pipeline_class(Role.IMAGE2IMAGE)
                logger.info("loading refiner %s (%s)", self.path, cls.__name__)
                pipe = cls.from_pretrained(str(self.path), dtype=self.dtype)
                found = family_of_pipeline(pipe)
                if found is not self.family:
                    raise InvalidValueError(f"refiner {self.path} is a {found.name} model, not {self.family.name}; "
                                            f"allowed: a {self.family.title} refiner", "refiner",
                                            f"a {self.family.title} refiner")
                prepare_pipeline(pipe, self.device)
                self._pipeline = pipe
            return self._pipeline

    def prepared(self, base_pipeline: Any) -> Any:
        """The refiner pipeline set up to continue a call of ``base_pipeline``: the same scheduler class and
        config (a fresh object), the base's noise-sampler seed (SDE schedulers), its VAE tiling."""
        pipe = self.pipeline()
        sched = base_pipeline.scheduler
        pipe.scheduler = type(sched).from_config(sched.config)
        if hasattr(sched, "noise_sampler_seed"):
            pipe.scheduler.noise_sampler_seed = sched.noise_sampler_seed
        pipe.vae.use_tiling = bool(getattr(base_pipeline.vae, "use_tiling", False))
        return pipe


def base_kwargs(kwargs: dict[str, Any], switch: float) -> dict[str, Any]:
    """The base's call: it stops at ``switch`` and hands its latents over (no decoding)."""
    return {**kwargs, "denoising_end": float(switch), "output_type": "latent"}


def refiner_kwargs(kwargs: dict[str, Any], latents: Any, switch: float, prompt: str,
                   negative_prompt: str | None) -> dict[str, Any]:
    """The refiner's call, continuing the base's ``kwargs`` from its ``latents`` at ``switch``.

    The refiner reads the prompt as text through its own text encoder (the base's prompt embeddings are of
    other encoders); diffusers encodes it, so the first 77 tokens count and weighting syntax should be
    removed before.
    """
    out = {"prompt": prompt, "image": latents, "denoising_start": float(switch),
           "num_inference_steps": kwargs["num_inference_steps"], "guidance_scale": kwargs["guidance_scale"],
           "generator": kwargs["generator"], "num_images_per_prompt": kwargs.get("num_images_per_prompt", 1),
           "output_type": kwargs.get("output_type", "pil")}
    if negative_prompt:
        out["negative_prompt"] = negative_prompt
    return out


class Progress:
    """One step count over both parts for the job's step callback: the base's steps, then the refiner's
    after them (``steps`` is the job's until the refiner knows its own count)."""

    def __init__(self, callback: StepCallback, steps: int) -> None:
        self.callback = callback
        self.steps = int(steps)
        self.base_steps = 0

    def base(self, step: int, steps: int, latents: Any) -> None:
        self.base_steps = step
        self.callback(step, max(self.steps, step + 1), latents)

    def refiner(self, step: int, steps: int, latents: Any) -> None:
        self.callback(self.base_steps + step, self.base_steps + (steps or step), latents)
