"""``Prompt2ImPipe``: text to image."""
from __future__ import annotations

import logging
import os
from typing import Any

from . import quality
from . import refiner as refiner_mod
from . import spec as specs
from .base import BasePipe, StepCallback
from .errors import InvalidValueError
from .families import Role

logger = logging.getLogger(__name__)


class Prompt2ImPipe(BasePipe):
    """Generate images from a prompt (``StableDiffusion(XL)Pipeline``, ``FluxPipeline``).

    Setup parameters: ``width``, ``height`` (sizes that are not multiples of the family's
    ``size_multiple``, 8, or 16 for Flux, are generated padded and cropped back), ``steps``,
    ``guidance_scale`` (Flux: its distilled guidance, default 3.5), ``clip_skip``, ``scheduler``,
    ``timestep_spacing``, ``lpw``, ``vae_tiling``; the quality switches (``freeu``..., ``sharpness``,
    ``guidance_rescale``: quality.py) and, with a ``refiner``, ``refiner_switch`` (refiner.py). Flux
    models take no ``clip_skip``, ``scheduler`` or ``timestep_spacing`` and no LoRAs yet; their prompts
    go to diffusers as plain text (weighting syntax stripped while ``lpw`` is on) and the negative
    prompt is unused.

    Example::

        pipe = Prompt2ImPipe("models/tiny-sd")
        pipe.setup(width=512, height=512, steps=20)
        images = pipe.gen({"prompt": "a lab with exotic flowers", "seed": 42})
    """

    SPEC = specs.PROMPT2IM
    ROLE = Role.TEXT2IMAGE

    def __init__(self, model_id: str | os.PathLike[str] | None = None, *,
                 refiner: str | os.PathLike[str] | None = None, **kwargs: Any) -> None:
        """``refiner``: the folder of the model's refiner (``refiner_switch``; pipes/refiner.py), loaded on
        first use; the other arguments are :class:`BasePipe`'s."""
        super().__init__(model_id, **kwargs)
        self.refiner = refiner_mod.Refiner(refiner, self.family, self.device, self.dtype) if refiner else None
        if self.refiner is not None and "refiner_switch" not in self.family.quality_params:
            raise InvalidValueError(f"{self.family.name} models take no refiner; allowed: no refiner", "refiner",
                                    "no refiner")

    def _setup_inputs(self, merged: dict[str, Any], given: dict[str, Any]) -> None:
        if merged.get("refiner_switch") is not None and self.refiner is None:
            raise InvalidValueError(f"refiner_switch {merged['refiner_switch']!r}: this model has no refiner; "
                                    "allowed: leave it out, or give the pipe one (models.yaml: `refiner: <model>` "
                                    "in the model's entry)", "refiner_switch", "leave it out")

    def _denoise(self, kwargs: dict[str, Any], callback: StepCallback | None, cancel: Any) -> list[Any]:
        """With ``refiner_switch``: the base up to the switch, then the refiner (pipes/refiner.py), both under
        the quality switches (FreeU on the base only: its factors are the base model's)."""
        switch = self.params.get("refiner_switch")
        if switch is None or self.refiner is None:
            return super()._denoise(kwargs, callback, cancel)
        from .prompting import strip_weighting

        settings = quality.QualitySettings.of(self.params, self.family.quality_params)
        progress = refiner_mod.Progress(callback, self.params["steps"]) if callback is not None else None
        view = self._latents_view(kwargs)
        first = refiner_mod.base_kwargs(kwargs, switch)
        if "callback_on_step_end" in kwargs:
            first["callback_on_step_end"] = self._step_hook(progress and progress.base, cancel, view)
        with quality.applied(self.pipe, settings, first) as call:
            latents = self.pipe(**call).images
        refiner = self.refiner.prepared(self.pipe)
        plain = strip_weighting if self.params["lpw"] else str
        negative = self._last_inputs.get("negative_prompt")
        second = refiner_mod.refiner_kwargs(kwargs, latents, switch, plain(self._last_inputs.get("prompt") or ""),
                                            plain(negative) if negative else None)
        if "callback_on_step_end" in kwargs:
            second["callback_on_step_end"] = self._step_hook(progress and progress.refiner, cancel, view)
            second["callback_on_step_end_tensor_inputs"] = ["latents"]
        with quality.applied(refiner, settings, second, freeu=False) as call:
            return refiner(**call).images

    def _extra_config(self) -> dict[str, Any]:
        if self.refiner is None or self.params.get("refiner_switch") is None:
            return {}
        return {"refiner": str(self.refiner.path)}
