"""Parameters declared once: name, type, range, default, unit, help text and image slot.

Every pipe class's ``setup`` parameters, the job-level ones (count, seeds, priority) and a
LoRA's weight are declared here and nowhere else. The pipes check their values with
:meth:`Param.check`; the service's queue-time checks, the API's request models, the OpenAPI
document, ``GET /api/v1/models`` and the web page's form are generated from the same
declarations, so a range cannot differ between them. Where the API and the pipes used to
disagree, the pipes' (the engine's) range was kept.

Torch-free (no torch, no numpy): the service and the API read it without loading the pipes.

- :class:`Param`, :class:`ParamSet`, :class:`PipeSpec` (from :mod:`.parameters`).
- One :class:`PipeSpec` per pipe class (:data:`PIPE_SPECS`; ``registry.py`` adds how to load
  the classes), the job-level :data:`JOB` and :data:`LORA_WEIGHT`.
- :func:`apply_limits`: the config's ``limits`` on top of a spec (the tighter of the two wins);
  ``ParamSet.narrowed``/``extended``/``without`` derive the specs of model families.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import replace
from types import MappingProxyType
from typing import Any

from .errors import SizeError
from .parameters import Param, ParamSet, ParamType, PipeSpec

__all__ = [
    "Param", "ParamSet", "ParamType", "PipeSpec", "PIPE_SPECS", "JOB", "LORA_WEIGHT", "COMMON", "MAX_IMAGES",
    "DRAWN_SEED_MAX", "CONDITION_TYPES", "IMAGE_PARAM_NAMES", "MAX_PROMPT_CHARS", "MAX_GRAMMAR_DEPTH",
    "MAX_GRAMMAR_ITEMS", "MAX_LORAS", "MAX_STYLES", "FAMILY_PARAMS", "apply_limits", "spec_from_names",
]

# ---- the declarations ------------------------------------------------------------------------------
#: most input images of one job (one per ControlNet at most, in practice); also the longest list a
#: per-ControlNet parameter takes
MAX_IMAGES = 8
#: seeds drawn when none are given: the range every torch generator and JSON reader holds exactly
DRAWN_SEED_MAX = 2**32 - 1
#: ControlNet condition types computed from an input image (pipes/conditions.py implements them)
CONDITION_TYPES: tuple[str, ...] = ("canny", "soft-sobel", "soft", "ip2p", "inpaint", "qr", "depth", "pose")

WIDTH = Param("width", ParamType.INT, "image width; sizes that are not multiples of 8 are generated padded "
              "and cropped back; default: the model's native size", minimum=64, maximum=4096, unit="px",
              nullable=True, range_error=SizeError)
HEIGHT = replace(WIDTH, name="height", description=WIDTH.description.replace("width", "height", 1))
STEPS = Param("steps", ParamType.INT, "denoising steps", default=50, minimum=1, maximum=1000)
GUIDANCE_SCALE = Param("guidance_scale", ParamType.FLOAT, "classifier-free guidance: how closely the image "
                       "follows the prompt", default=7.5, minimum=0.0, maximum=100.0)
CLIP_SKIP = Param("clip_skip", ParamType.INT, "text-encoder layers skipped from the end (0: its normal output)",
                  default=0, minimum=0, maximum=10, unit="layers")
SCHEDULER = Param("scheduler", ParamType.STR, "scheduler name (GET /api/v1/models lists them); default: the "
                  "model's own", nullable=True)
TIMESTEP_SPACING = Param("timestep_spacing", ParamType.CHOICE, "how the steps are spread over the noise "
                         "schedule; default: the scheduler's", choices=("leading", "linspace", "trailing"),
                         nullable=True)
LPW = Param("lpw", ParamType.BOOL, "prompt weighting `(word:1.3)` and prompts longer than 77 tokens",
            default=True)
#: images with more pixels than this are decoded in tiles when ``vae_tiling`` is left out
VAE_TILING_PIXELS = 1536 * 1536
VAE_TILING = Param("vae_tiling", ParamType.BOOL, "decode in tiles (large images, less memory); default: "
                   f"automatic, for images of more than {VAE_TILING_PIXELS} pixels", nullable=True)
#: parameters only some model families take (each family lists its own in ``Family.params``); passed
#: to the diffusers call under their own names; another family refuses them with a 400
TRUE_CFG_SCALE = Param("true_cfg_scale", ParamType.FLOAT, "real classifier-free guidance with the negative "
                       "prompt (above 1 it runs two passes a step); default: the family's",
                       minimum=1.0, maximum=100.0, nullable=True)
MAX_SEQUENCE_LENGTH = Param("max_sequence_length", ParamType.INT, "most prompt tokens the T5/LLM text encoder "
                            "reads; default: the family's", minimum=1, maximum=1024,
                            unit="tokens", nullable=True)
FAMILY_PARAMS: tuple[Param, ...] = (TRUE_CFG_SCALE, MAX_SEQUENCE_LENGTH)
COMMON: tuple[Param, ...] = (WIDTH, HEIGHT, STEPS, GUIDANCE_SCALE, CLIP_SKIP, SCHEDULER, TIMESTEP_SPACING, LPW,
                             VAE_TILING) + FAMILY_PARAMS

IMAGE = Param("image", ParamType.IMAGE, "the input image")
CONDITION_IMAGES = Param("image", ParamType.IMAGE, "the condition images, one per ControlNet", many=True,
                         max_items=MAX_IMAGES)
IMAGE_PAINTED = Param("image_painted", ParamType.IMAGE, "the input image with the part to redraw painted over "
                      "(its colours steer the result)")
MASK = Param("mask", ParamType.IMAGE, "the mask: white = redraw, the size of the input image")
STRENGTH = Param("strength", ParamType.FLOAT, "how much of the input image is redrawn (1: all of it; it must "
                 "leave at least one of the steps: strength x steps >= 1)", default=0.75, minimum=0.0, maximum=1.0,
                 exclusive_minimum=True)
SCALE = Param("scale", ParamType.SCALE, "resize of the input image: a factor, or [width, height] in pixels",
              minimum=0.01, maximum=16.0, nullable=True,
              sides=(replace(WIDTH, nullable=False), replace(HEIGHT, nullable=False)))
BLUR = Param("blur", ParamType.INT, "blur radius of the mask used while denoising", default=4, minimum=0,
             maximum=256, unit="px")
BLUR_COMPOSE = replace(BLUR, name="blur_compose", description="blur radius of the mask that composites the "
                       "result onto the original")
FULL_RES = Param("full_res", ParamType.BOOL, "inpaint at full resolution: only the mask's box (plus "
                 "full_res_padding) is generated, at width x height, and pasted back at the input's size",
                 default=False)
FULL_RES_PADDING = Param("full_res_padding", ParamType.INT, "context around the mask's box that full_res "
                         "generates with it", default=32, minimum=0, maximum=1024, unit="px")
CSCALES = Param("cscales", ParamType.FLOAT, "ControlNet conditioning scale, one per ControlNet; default: the "
                "condition type's", minimum=0.0, maximum=10.0, many=True, max_items=MAX_IMAGES, nullable=True)
GUESS_MODE = Param("guess_mode", ParamType.BOOL, "ControlNet guess mode: the ControlNets read the condition "
                   "even without a prompt", default=False)
CONTROL_GUIDANCE_START = Param("control_guidance_start", ParamType.FLOAT, "fraction of the steps at which the "
                               "ControlNets start acting (one, or one per ControlNet; below the end)", default=0.0,
                               minimum=0.0, maximum=1.0, exclusive_maximum=True, many=True, max_items=MAX_IMAGES)
CONTROL_GUIDANCE_END = replace(CONTROL_GUIDANCE_START, name="control_guidance_end", default=1.0,
                               exclusive_minimum=True, exclusive_maximum=False,
                               description="fraction of the steps at which the ControlNets stop acting (one, or "
                                           "one per ControlNet; above the start)")
CTYPES = Param("ctypes", ParamType.CHOICE, "condition types computed from the input image, one per ControlNet; "
               "default: the pipe's", choices=CONDITION_TYPES, many=True, max_items=MAX_IMAGES, nullable=True)
CONTROL: tuple[Param, ...] = (CSCALES, GUESS_MODE, CONTROL_GUIDANCE_START, CONTROL_GUIDANCE_END)

PROMPT2IM = PipeSpec(COMMON, classname="Prompt2ImPipe")
IM2IM = PipeSpec(COMMON + (IMAGE, STRENGTH, SCALE), classname="Im2ImPipe", aliases={"fimage": "image"},
                 image_slots=("image",), required_images=(("image",),))
MASKED_IM2IM = PipeSpec(COMMON + (IMAGE, IMAGE_PAINTED, MASK, BLUR, BLUR_COMPOSE, FULL_RES, FULL_RES_PADDING,
                                  STRENGTH, SCALE),
                        classname="MaskedIm2ImPipe", aliases={"fimage": "image", "original_image": "image"},
                        image_slots=("image", "image_painted"), required_images=(("image",), ("image_painted", "mask")))
INPAINTING = PipeSpec(COMMON + (IMAGE, MASK, BLUR, FULL_RES, FULL_RES_PADDING, replace(STRENGTH, default=1.0),
                                SCALE), classname="InpaintingPipe",
                      aliases={"fimage": "image", "mask_image": "mask"}, image_slots=("image", "mask"),
                      required_images=(("image",), ("mask",)))
COND2IM = PipeSpec(COMMON + (CONDITION_IMAGES,) + CONTROL, classname="Cond2ImPipe", aliases={"fimage": "image"},
                   image_slots=("image",), required_images=(("image",),))
CIM2IM = PipeSpec(COMMON + (IMAGE, STRENGTH, SCALE, CTYPES,
                            replace(MASK, description="the mask of the inpaint condition (white = repaint); "
                                                      "default: the transparent pixels of an RGBA input image"))
                  + CONTROL, classname="CIm2ImPipe", aliases={"fimage": "image"}, image_slots=("image",),
                  required_images=(("image",),))
EDIT2IM = PipeSpec(COMMON + (replace(IMAGE, description="the image to edit"), SCALE), classname="Edit2ImPipe",
                   aliases={"fimage": "image"}, image_slots=("image",), required_images=(("image",),))
#: the spec of every pipe class, by class name (``registry.py`` adds how to load the classes)
PIPE_SPECS: Mapping[str, PipeSpec] = MappingProxyType(
    {s.classname: s for s in (PROMPT2IM, IM2IM, MASKED_IM2IM, INPAINTING, COND2IM, CIM2IM, EDIT2IM)})
#: every name a pipe takes an image under, aliases included
IMAGE_PARAM_NAMES: frozenset[str] = frozenset(
    name for s in PIPE_SPECS.values() for name in s.accepted if s[s.canonical(name)].image)

# job-level parameters: arguments of queue_gen / fields of a job, not of the pipe's setup
#: most characters in a prompt (all the strings of a grammar together): some 5000 tokens, 65 chunks of 77 for
#: the text encoder; a multi-megabyte prompt would hold a worker and its memory for minutes
MAX_PROMPT_CHARS = 20000
#: deepest nesting of a prompt grammar (a string: 0, ``["a"]``: 1): deeper ones only serve to exhaust the
#: server's recursion
MAX_GRAMMAR_DEPTH = 32
#: most items of a prompt grammar, lists, dicts and strings together: ``[[""], [""], ...]`` holds no character,
#: yet 27 MB of it are millions of Python objects, decoded again on every read of the job
MAX_GRAMMAR_ITEMS = 10000
PROMPT = Param("prompt", ParamType.PROMPT, "a string, or metafusion's Cfgen grammar as JSON", default="")
NEGATIVE_PROMPT = replace(PROMPT, name="negative_prompt", default=None, nullable=True,
                          description="what the image should not show: a string or a Cfgen grammar")
COUNT = Param("count", ParamType.INT, "images to make; default: one per seed, else 1", default=1, minimum=1)
SEEDS = Param("seeds", ParamType.INT, "one seed per image; drawn when left out", minimum=0, maximum=2**64 - 1,
              many=True, nullable=True)
PRIORITY = Param("priority", ParamType.INT, "higher runs first (within the user's own jobs)", default=0,
                 minimum=-100, maximum=100)
#: most styles one job applies (each wraps the prompt once more)
MAX_STYLES = 16
STYLES = Param("styles", ParamType.STR, "prompt styles applied in order to each image's prompt and negative "
               "prompt (GET /api/v1/styles lists them; `random`: one drawn from the image's seed)", many=True,
               max_items=MAX_STYLES, nullable=True)
JOB = ParamSet((PROMPT, NEGATIVE_PROMPT, COUNT, SEEDS, PRIORITY, STYLES))
LORA_WEIGHT = Param("weight", ParamType.FLOAT, "LoRA weight (negative: the opposite effect)", default=1.0,
                    minimum=-10.0, maximum=10.0)
#: most LoRAs of one session: each is loaded into the shared model before every job of the session
MAX_LORAS = 16

#: a base model's memory options in models.yaml and the values each takes (``multigen.pipes.memory`` applies
#: them): weight quantization (none, int8 weight-only, fp8 weight-only) and CPU offload (none, a component
#: at a time, a layer at a time)
MEMORY_OPTIONS: Mapping[str, tuple[str, ...]] = MappingProxyType({"quantize": ("none", "int8", "fp8"),
                                                                   "offload": ("none", "model", "sequential")})

#: config ``limits`` key -> the parameter whose maximum it caps
LIMITED: Mapping[str, str] = MappingProxyType({"max_width": "width", "max_height": "height",
                                               "max_count": "count"})


def apply_limits(params: ParamSet, limits: Any) -> ParamSet:
    """``params`` with the config's limits applied on top (the tighter of spec and config wins).

    Args:
        params: a :class:`PipeSpec`, :data:`JOB` or any :class:`ParamSet`.
        limits: anything with ``max_width``, ``max_height`` and ``max_count`` attributes (the
            service's ``Limits``); missing ones or None leave the spec as it is.
    """
    out = params
    for key, name in LIMITED.items():
        value = getattr(limits, key, None)
        if value is not None and name in out:
            out = out.narrowed(name, maximum=value, limit=f"limits.{key}")
    max_count = getattr(limits, "max_count", None)
    if max_count is not None and "seeds" in out:
        out = out.narrowed("seeds", max_items=max_count)
    scale = out.get("scale")
    if scale is not None and scale.sides and "width" in out and "height" in out:
        sides = (replace(out["width"], nullable=False), replace(out["height"], nullable=False))
        out = out.replaced(replace(scale, sides=sides))
    return out


def spec_from_names(classname: str, names: Iterable[str], aliases: Mapping[str, str] | None = None) -> PipeSpec:
    """A spec for a class that lists only names (``PARAMS``, ``ALIASES``), as test fakes do.

    Names some pipe class declares get that declaration (type and range); others are passed on
    unchecked.
    """
    known: dict[str, Param] = {}
    for spec in PIPE_SPECS.values():
        for p in spec:
            known.setdefault(p.name, p)
    params = tuple(known.get(n) or Param(n, ParamType.ANY, "passed to the pipe's setup as it is", nullable=True)
                   for n in dict.fromkeys(names))
    declared = {p.name for p in params}
    aliases = {a: t for a, t in (aliases or {}).items() if t in declared and a not in declared}
    return PipeSpec(params, classname=classname, aliases=aliases)
