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
    "MAX_GRAMMAR_ITEMS", "MAX_LORAS", "MAX_STYLES", "FAMILY_PARAMS", "WILDCARDS_IN_ORDER",
    "MAX_OUTPAINT", "OUTPAINT_RATIO", "OUTPAINT_SIDES", "OUTPAINT_REQUESTS", "apply_limits", "spec_from_names",
    "MAX_IMAGE_PROMPTS", "IMAGE_PROMPTING",
    "PERFORMANCE", "ASPECT_RATIO", "MAX_ASPECT_RATIO", "ASPECT_RATIO_PATTERN",
    "WEBHOOK_URL", "GRID", "MAX_WEBHOOK_URL_CHARS",
    "QUALITY_PARAMS", "CONFIGURED_PARAMS", "REFINER_SWITCH",
    "UOV_MODES", "UOV_PARAMS", "MAX_UPSCALE_FACTOR",
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

# ---- outpaint and the inpaint prompt (the inpaint pipes; pipes/outpaint.py implements them) ----------------
#: the longest distance one side is extended by
MAX_OUTPAINT = 2048
#: Fooocus' default distance of a side listed in ``outpaint``: this fraction of the input's width (left,
#: right) or height (top, bottom), rounded down (Fooocus' modules/async_worker.py: ``int(W * 0.3)``)
OUTPAINT_RATIO = 0.3
OUTPAINT_SIDES: tuple[str, ...] = ("left", "right", "top", "bottom")
OUTPAINT = Param("outpaint", ParamType.CHOICE, "sides to extend (and fill by inpainting) by Fooocus' default "
                 f"distance, {OUTPAINT_RATIO} of the input's width (left, right) or height (top, bottom), unless "
                 "outpaint_<side> gives one", choices=OUTPAINT_SIDES, many=True, max_items=len(OUTPAINT_SIDES),
                 nullable=True)
OUTPAINT_LEFT = Param("outpaint_left", ParamType.INT, "pixels added on the left of the input and filled by "
                      "inpainting (no mask needed; 0: none, or the default distance if outpaint lists the side)",
                      default=0, minimum=0, maximum=MAX_OUTPAINT, unit="px")
OUTPAINT_RIGHT = replace(OUTPAINT_LEFT, name="outpaint_right",
                         description=OUTPAINT_LEFT.description.replace("left", "right", 1))
OUTPAINT_TOP = replace(OUTPAINT_LEFT, name="outpaint_top", description=OUTPAINT_LEFT.description.replace(
    "on the left of", "above", 1))
OUTPAINT_BOTTOM = replace(OUTPAINT_LEFT, name="outpaint_bottom", description=OUTPAINT_LEFT.description.replace(
    "on the left of", "below", 1))
OUTPAINT_SEAM = Param("outpaint_seam", ParamType.INT, "width of the band of the input along the outpainted area "
                      "that is redrawn and faded into the new pixels; farther in, the input's pixels are kept "
                      "exactly", default=16, minimum=0, maximum=256, unit="px")
INPAINT_PROMPT = Param("inpaint_prompt", ParamType.STR, "prompt for the masked (and outpainted) area: put before "
                       "the (styled) prompt, joined by a comma, and encoded with it", nullable=True)
OUTPAINT_PARAMS: tuple[Param, ...] = (OUTPAINT, OUTPAINT_LEFT, OUTPAINT_RIGHT, OUTPAINT_TOP, OUTPAINT_BOTTOM,
                                      OUTPAINT_SEAM)
#: what asks for an outpaint, so stands in for the mask in the inpaint pipes' required images
OUTPAINT_REQUESTS: tuple[str, ...] = tuple(p.name for p in OUTPAINT_PARAMS[:5])
INPAINT_EXTRAS: tuple[Param, ...] = OUTPAINT_PARAMS + (INPAINT_PROMPT,)

PROMPT2IM = PipeSpec(COMMON, classname="Prompt2ImPipe")
IM2IM = PipeSpec(COMMON + (IMAGE, STRENGTH, SCALE), classname="Im2ImPipe", aliases={"fimage": "image"},
                 image_slots=("image",), required_images=(("image",),))
MASKED_IM2IM = PipeSpec(COMMON + (IMAGE, IMAGE_PAINTED, MASK, BLUR, BLUR_COMPOSE, FULL_RES, FULL_RES_PADDING,
                                  STRENGTH, SCALE) + INPAINT_EXTRAS,
                        classname="MaskedIm2ImPipe", aliases={"fimage": "image", "original_image": "image"},
                        image_slots=("image", "image_painted"),
                        required_images=(("image",), ("image_painted", "mask", *OUTPAINT_REQUESTS)))
INPAINTING = PipeSpec(COMMON + (IMAGE, MASK, BLUR, FULL_RES, FULL_RES_PADDING, replace(STRENGTH, default=1.0),
                                SCALE) + INPAINT_EXTRAS, classname="InpaintingPipe",
                      aliases={"fimage": "image", "mask_image": "mask"}, image_slots=("image", "mask"),
                      required_images=(("image",), ("mask", *OUTPAINT_REQUESTS)))
COND2IM = PipeSpec(COMMON + (CONDITION_IMAGES,) + CONTROL, classname="Cond2ImPipe", aliases={"fimage": "image"},
                   image_slots=("image",), required_images=(("image",),))
CIM2IM = PipeSpec(COMMON + (IMAGE, STRENGTH, SCALE, CTYPES,
                            replace(MASK, description="the mask of the inpaint condition (white = repaint); "
                                                      "default: the transparent pixels of an RGBA input image"))
                  + CONTROL, classname="CIm2ImPipe", aliases={"fimage": "image"}, image_slots=("image",),
                  required_images=(("image",),))
EDIT2IM = PipeSpec(COMMON + (replace(IMAGE, description="the image to edit"), SCALE), classname="Edit2ImPipe",
                   aliases={"fimage": "image"}, image_slots=("image",), required_images=(("image",),))

# ---- image prompts (IP-Adapter; pipes/ip_adapter.py) -------------------------------------------------
#: most reference images of one job (Fooocus has four image-prompt slots); each runs its own copy of the adapter
MAX_IMAGE_PROMPTS = 4
IMAGE_PROMPTS = Param("image_prompts", ParamType.IMAGE, "reference images whose content and style steer the "
                      "result (IP-Adapter; needs one configured for the model's family in models.yaml "
                      "`ip_adapter:`)", many=True, max_items=MAX_IMAGE_PROMPTS, nullable=True)
IMAGE_PROMPT_WEIGHTS = Param("image_prompt_weights", ParamType.FLOAT, "how strongly each reference image acts: "
                             "one for all, or one per image (0: not at all)", default=1.0, minimum=0.0,
                             maximum=2.0, many=True, max_items=MAX_IMAGE_PROMPTS)
IMAGE_PROMPT_STOP_AT = Param("image_prompt_stop_at", ParamType.FLOAT, "fraction of the steps after which each "
                             "reference image stops acting: one for all, or one per image (1: all the steps)",
                             default=1.0, minimum=0.0, maximum=1.0, exclusive_minimum=True, many=True,
                             max_items=MAX_IMAGE_PROMPTS)
IMAGE_PROMPTING: tuple[Param, ...] = (IMAGE_PROMPTS, IMAGE_PROMPT_WEIGHTS, IMAGE_PROMPT_STOP_AT)
PROMPT2IM, IM2IM, MASKED_IM2IM, INPAINTING, COND2IM, CIM2IM = (
    s.extended(*IMAGE_PROMPTING) for s in (PROMPT2IM, IM2IM, MASKED_IM2IM, INPAINTING, COND2IM, CIM2IM))

# ---- quality switches: FreeU, sharpness, guidance rescale, SDXL refiner (pipes/quality.py, pipes/refiner.py) ----
#: they act on a UNet's noise prediction; each family lists those it takes, with its recommended values, in
#: ``Family.quality_params``, and another family refuses them with a 400
FREEU = Param("freeu", ParamType.BOOL, "FreeU: re-weight the UNet decoder's backbone and skip features "
              "(freeu_b1, freeu_b2, freeu_s1, freeu_s2; those left out: the family's recommended ones); default: "
              "off", nullable=True)
FREEU_B1 = Param("freeu_b1", ParamType.FLOAT, "FreeU backbone factor of the first decoder stage (with freeu on); "
                 "default: the family's (SD 1.5, SDXL 1.3)", minimum=0.0, maximum=2.0, nullable=True)
FREEU_B2 = replace(FREEU_B1, name="freeu_b2", description="FreeU backbone factor of the second decoder stage (with "
                   "freeu on); default: the family's (SD 1.6, SDXL 1.4)")
FREEU_S1 = Param("freeu_s1", ParamType.FLOAT, "FreeU skip-feature factor of the first decoder stage (with freeu "
                 "on); default: the family's (0.9)", minimum=0.0, maximum=4.0, nullable=True)
FREEU_S2 = replace(FREEU_S1, name="freeu_s2", description="FreeU skip-feature factor of the second decoder stage "
                   "(with freeu on); default: the family's (0.2)")
SHARPNESS = Param("sharpness", ParamType.FLOAT, "Fooocus' sharpness: the prompt's noise prediction is mixed with an "
                  "edge-preserving blur of itself, by 0.001 x sharpness x progress (Fooocus' default: 2); default: "
                  "0 (off)", minimum=0.0, maximum=30.0, nullable=True)
GUIDANCE_RESCALE = Param("guidance_rescale", ParamType.FLOAT, "rescale of the guided noise prediction towards the "
                         "spread of the prompt's own (against over-exposure at high guidance; 0.7 is usual); "
                         "default: 0 (off)", minimum=0.0, maximum=1.0, nullable=True)
QUALITY_PARAMS: tuple[Param, ...] = (FREEU, FREEU_B1, FREEU_B2, FREEU_S1, FREEU_S2, SHARPNESS, GUIDANCE_RESCALE)
#: text to image on a model whose models.yaml entry names a ``refiner:``; any other model refuses it with a 400
REFINER_SWITCH = Param("refiner_switch", ParamType.FLOAT, "fraction of the steps after which the model's refiner "
                       "(models.yaml `refiner:`) takes over (Fooocus: 0.8); default: no refiner", minimum=0.0,
                       maximum=1.0, exclusive_minimum=True, exclusive_maximum=True, nullable=True)
#: parameters a model takes only when models.yaml configures what they need (refiner_switch: a refiner)
CONFIGURED_PARAMS: tuple[Param, ...] = (REFINER_SWITCH,)
PROMPT2IM, IM2IM, MASKED_IM2IM, INPAINTING, COND2IM, CIM2IM = (
    s.extended(*QUALITY_PARAMS) for s in (PROMPT2IM, IM2IM, MASKED_IM2IM, INPAINTING, COND2IM, CIM2IM))
PROMPT2IM = PROMPT2IM.extended(*CONFIGURED_PARAMS)

# ---- upscale or vary, Fooocus' uov (Im2ImPipe; pipes/upscale.py implements it) ---------------------------------
UOV_MODES: tuple[str, ...] = ("vary_subtle", "vary_strong", "upscale", "upscale_fast")
#: the largest upscale factor (Fooocus offers 1.5x, 2x and custom factors)
MAX_UPSCALE_FACTOR = 4.0
UOV = Param("uov", ParamType.CHOICE, "upscale or vary (Fooocus): vary_subtle / vary_strong redraw the input at "
            "strength 0.5 / 0.85; upscale enlarges it upscale_factor times (with the upscaler) and redraws it at "
            "strength 0.382, in tiles of the model's size when it is large; upscale_fast only enlarges (no "
            "diffusion); a strength given wins; the upscale modes take no width, height or scale; default: plain "
            "image to image", choices=UOV_MODES, nullable=True)
UPSCALE_FACTOR = Param("upscale_factor", ParamType.FLOAT, "how many times larger the upscale modes make the "
                       "input (each side)", default=2.0, minimum=1.0, maximum=MAX_UPSCALE_FACTOR,
                       exclusive_minimum=True)
UPSCALER = Param("upscaler", ParamType.STR, "the model that enlarges the input in the upscale modes: a name of "
                 "models.yaml `upscaler:` (GET /api/v1/models `upscalers`), or `lanczos` for plain resampling; "
                 "default: the first configured, else lanczos", nullable=True)
UOV_PARAMS: tuple[Param, ...] = (UOV, UPSCALE_FACTOR, UPSCALER)
IM2IM = IM2IM.extended(*UOV_PARAMS)

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
COUNT = Param("count", ParamType.INT, "images to make (with `[[a, b]]` arrays in the prompt: per "
              "combination of their entries); default: one per seed, else 1", default=1, minimum=1)
SEEDS = Param("seeds", ParamType.INT, "one seed per image; drawn when left out", minimum=0, maximum=2**64 - 1,
              many=True, nullable=True)
PRIORITY = Param("priority", ParamType.INT, "higher runs first (within the user's own jobs)", default=0,
                 minimum=-100, maximum=100)
#: most styles one job applies (each wraps the prompt once more)
MAX_STYLES = 16
STYLES = Param("styles", ParamType.STR, "prompt styles applied in order to each image's prompt and negative "
               "prompt (GET /api/v1/styles lists them; `random`: one drawn from the image's seed)", many=True,
               max_items=MAX_STYLES, nullable=True)
# ---- prompt tools: wildcards `__name__` and `[[a, b]]` arrays (service/prompt_tools.py applies them) ------
WILDCARDS_IN_ORDER = Param("wildcards_in_order", ParamType.BOOL, "wildcards `__name__` take line i (modulo the "
                           "file's length) for image i of the job instead of a line drawn from the image's seed "
                           "(GET /api/v1/wildcards lists them)", default=False)
# ---- performance presets and aspect ratios (service/presets.py resolves them at admission) --------------
#: the widest (and tallest) aspect_ratio a job may ask for, N:1 (the families' trained sizes span about 3:1)
MAX_ASPECT_RATIO = 4
#: how an aspect_ratio is written: ``16:9``, ``16x9``, ``16×9``, ``16*9``, ``1.85:1`` (the OpenAPI document's pattern)
ASPECT_RATIO_PATTERN = r"^\s*(\d+(?:\.\d+)?)\s*[:xX×*/]\s*(\d+(?:\.\d+)?)\s*$"
PERFORMANCE = Param("performance", ParamType.STR, "performance preset of the model's family (speed, quality, "
                    "extreme_speed, lightning, hyper_sd...; GET /api/v1/presets lists them and what each sets): "
                    "fills in steps, scheduler, guidance_scale and a speed LoRA where the job gives none",
                    nullable=True)
ASPECT_RATIO = Param("aspect_ratio", ParamType.STR, "width:height such as \"16:9\" (or 16x9), from "
                     f"1:{MAX_ASPECT_RATIO} to {MAX_ASPECT_RATIO}:1: the family's trained size nearest to it; "
                     "a job's own width and height win, and with only one of them the other follows the ratio",
                     nullable=True)
# ---- webhooks and the grid (service/webhooks.py, service/grid.py) ---------------------------------------
#: longest ``webhook_url`` a job may carry
MAX_WEBHOOK_URL_CHARS = 2048
WEBHOOK_URL = Param("webhook_url", ParamType.STR, "http(s) URL the job and its image URLs are POSTed to when it "
                    "ends (succeeded, failed or cancelled), signed in the X-Multigen-Signature header; its host "
                    f"must be allowed by webhooks.allowed_hosts in config.yaml (default: loopback only); at most "
                    f"{MAX_WEBHOOK_URL_CHARS} characters", nullable=True)
GRID = Param("grid", ParamType.BOOL, "also write one image of the job's images side by side (a near-square grid, "
             "Fooocus' image wall), served at the job's grid_url; a job of one image gets none", default=False)
#: the job-level parameters: arguments of queue_gen and fields of every job request, never a pipe's setup
JOB = ParamSet((PROMPT, NEGATIVE_PROMPT, COUNT, SEEDS, PRIORITY, STYLES, WILDCARDS_IN_ORDER, PERFORMANCE,
                ASPECT_RATIO, WEBHOOK_URL, GRID))
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
