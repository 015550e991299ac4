"""Flux.1 (dev and schnell shapes): a transformer over 2x2-packed latents, CLIP-L and T5 text encoders,
a 16-channel VAE; and two variants of it (:class:`~.base.Variant`) that run other diffusers classes:

- Flux.1 Fill (FLUX.1-Fill-dev): inpainting only, with ``FluxFillPipeline``; its transformer reads the
  packed latents, the packed latents of the masked image and the packed 8x8 mask (384 channels);
- Flux.1 Kontext (FLUX.1-Kontext-dev): instruction editing (``Role.EDIT``) with ``FluxKontextPipeline``,
  which no plain Flux.1 model runs; it runs every plain Flux.1 role too (same transformer shape).

Prompts are weighted on T5 (``(word:1.3)`` scales that word's T5 embeddings, ``weighting.py``);
single-file checkpoints are the transformer alone in BFL's layout (``flux_layout.py``), loaded into
a diffusers config folder that holds the rest.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import InvalidValueError
from ..flux_layout import COMFY_PREFIX, to_diffusers
from ..schedulers import FLOW_SCHEDULERS
from .base import (Family, Role, Variant, folder_classes, folder_pipeline, frozen, read_json, transformer_folder, transformer_pipeline, unpack_2x2,
                   vae_factor)

#: the diffusers class of Flux.1's denoiser, as a folder's transformer/config.json names it
TRANSFORMER = "FluxTransformer2DModel"
PIPELINES = {
    Role.TEXT2IMAGE: "FluxPipeline",
    Role.IMAGE2IMAGE: "FluxImg2ImgPipeline",
    Role.INPAINT: "FluxInpaintPipeline",
    Role.CONTROLNET: "FluxControlNetPipeline",
    Role.CONTROLNET_IMAGE2IMAGE: "FluxControlNetImg2ImgPipeline",
}
#: the diffusers classes of the variants, as their folders' model_index.json names them
FILL_PIPELINE = "FluxFillPipeline"
KONTEXT_PIPELINE = "FluxKontextPipeline"
#: every Flux.1 pipeline a folder's model_index.json may name (all recognised as Flux.1)
FOLDER_PIPELINES = frozenset(PIPELINES.values()) | {FILL_PIPELINE, KONTEXT_PIPELINE}
#: FLUX.1-Fill-dev's settings (diffusers' FluxFillPipeline example and call defaults)
FILL_DEFAULTS = {"guidance_scale": 30.0, "steps": 50}
#: FLUX.1-Kontext-dev's settings (diffusers' FluxKontextPipeline example: guidance 2.5; its 28 steps)
KONTEXT_DEFAULTS = {"guidance_scale": 2.5, "steps": 28}


def native_size(pipe: Any) -> int:
    # FluxPipeline's own default: 128 latent pixels, 1024 px for Flux.1's VAE
    return int(getattr(pipe, "default_sample_size", 128)) * int(pipe.vae_scale_factor)


def folder_native_size(folder: Path) -> int:
    # FluxPipeline's default_sample_size (128) times its VAE's factor, as native_size
    return 128 * vae_factor(folder)


#: a tensor every Flux.1 transformer in BFL's layout has (diffusers' single_file_utils checks it too)
BFL_MARKER = "double_blocks.0.img_attn.norm.key_norm.scale"
#: the most T5 tokens FluxPipeline reads (its check_inputs refuses more), and its default
MAX_SEQUENCE_LENGTH = 512


def negative_unused(params: Mapping[str, Any]) -> str | None:
    """Why these settings leave the negative prompt unused: FluxPipeline runs it only with real
    classifier-free guidance (``true_cfg_scale`` above 1)."""
    if float(params.get("true_cfg_scale") or 1.0) > 1.0:
        return None
    return "without true_cfg_scale (allowed: true_cfg_scale above 1 for it to take effect)"


def encode_prompt(pipe_object: Any, prompt: str, negative: str | None) -> dict[str, Any]:
    """Flux's prompt encoding: T5 embeddings with A1111 weights, CLIP-L's pooled vector of the plain text.

    ``(red:1.5)`` scales the T5 embeddings of the tokens of "red" (``weighting.py``); CLIP-L gives
    Flux only its pooled output, which has no tokens to weight, so it reads the text with the syntax
    removed. T5 reads up to ``max_sequence_length`` tokens (512); a longer prompt is cut with a
    warning. With ``lpw`` off both encoders read the text as it is: diffusers' own encoding.

    Returns:
        ``prompt_embeds`` and ``pooled_prompt_embeds``, and their ``negative_`` twins when there is
        a negative prompt, for one prompt (``[1, ...]``): FluxPipeline makes ``num_images_per_prompt``
        images of each, its transformer broadcasting them over the batch.

    Raises:
        InvalidValueError: ``max_sequence_length`` above 512.
    """
    from diffusers.utils.torch_utils import get_module_execution_device

    from ..prompting import strip_weighting
    from ..weighting import clip_pooled, encode_weighted

    params, pipe = pipe_object.params, pipe_object.pipe
    length = int(params.get("max_sequence_length") or MAX_SEQUENCE_LENGTH)
    if length > MAX_SEQUENCE_LENGTH:
        raise InvalidValueError(f"max_sequence_length {length} is more than Flux's T5 encoder reads; allowed: 1 "
                                f"to {MAX_SEQUENCE_LENGTH}", "max_sequence_length", f"1 to {MAX_SEQUENCE_LENGTH}")
    if float(params.get("true_cfg_scale") or 1.0) > 1.0 and not negative:
        pipe_object.warn("true_cfg_scale takes effect with a negative prompt only: none was given")
    parse = bool(params.get("lpw", True))
    t5, clip = pipe.text_encoder_2, pipe.text_encoder
    t5_device, clip_device = get_module_execution_device(t5), get_module_execution_device(clip)

    def run_t5(ids: Any, mask: Any) -> Any:  # FluxPipeline passes T5 no attention mask
        return t5(ids, output_hidden_states=False)[0]

    out: dict[str, Any] = {}
    for key, text in (("", prompt), ("negative_", negative)):
        if text is None:
            continue
        embeds, tokens = encode_weighted(text, pipe.tokenizer_2, run_t5, length, t5_device, parse_weights=parse)
        if tokens.dropped:
            pipe_object.warn(f"the {key.replace('_', ' ')}prompt is {tokens.dropped} T5 tokens longer than "
                             f"max_sequence_length {length}: its end was cut")
        pooled = clip_pooled(pipe.tokenizer, clip, strip_weighting(text) if parse else text, clip_device)
        out[f"{key}prompt_embeds"] = embeds.to(dtype=t5.dtype, device=pipe_object.device)
        out[f"{key}pooled_prompt_embeds"] = pooled.to(dtype=clip.dtype, device=pipe_object.device)
    return out


def fill_channels(base: Any) -> int:
    """The input channels of a Fill transformer for ``base``'s VAE (FluxFillPipeline concatenates them):
    the packed latents and the packed latents of the masked image (4x the VAE's channels each) and the
    mask, one channel per pixel of a VAE-factor square, packed 2x2 (4 x 8 x 8 = 256): 384 for Flux.1."""
    latent, factor = int(base.vae.config.latent_channels), int(base.vae_scale_factor)
    return 4 * latent + 4 * latent + 4 * factor * factor


def is_fill(base: Any) -> bool:
    """A Flux.1 Fill model: its folder (or the pipeline) is a FluxFillPipeline, or its transformer takes
    the Fill layout's channels (a FluxPipeline cannot run such a transformer)."""
    if FILL_PIPELINE in (type(base).__name__, folder_pipeline(base)):
        return True
    return int(base.transformer.config.in_channels) == fill_channels(base)


def is_kontext(base: Any) -> bool:
    """A Flux.1 Kontext model: its folder (or the pipeline) is a FluxKontextPipeline. Its transformer has
    the plain shape, so nothing else tells it from Flux.1-dev."""
    return KONTEXT_PIPELINE in (type(base).__name__, folder_pipeline(base))


def is_fill_folder(folder: Path) -> bool:
    """``is_fill`` from a diffusers folder's configs (torch-free)."""
    index, transformer = folder_classes(folder, "transformer")
    if index == FILL_PIPELINE:
        return True
    vae = read_json(folder / "vae" / "config.json")
    channels = read_json(folder / "transformer" / "config.json").get("in_channels")
    if not vae or channels is None:
        return False
    latent, factor = int(vae.get("latent_channels", 16)), vae_factor(folder)
    return int(channels) == 4 * latent + 4 * latent + 4 * factor * factor


FILL = Variant(
    name="Flux.1 Fill",
    recognises=is_fill,
    pipelines=frozen({Role.INPAINT: FILL_PIPELINE}),
    looks_like="a Flux.1 Fill diffusers folder (model_index.json naming FluxFillPipeline, or a transformer "
               "with the Fill layout's in_channels: 384 for Flux.1)",
    note="FluxFillPipeline fills the masked part of an image, so it needs an image and a mask: InpaintingPipe "
         "or MaskedIm2ImPipe",
    param_defaults=frozen(FILL_DEFAULTS),
    refused_params=frozen({"true_cfg_scale": "FluxFillPipeline has no real classifier-free guidance and takes no "
                                             "negative prompt"}),
    recognises_folder=is_fill_folder,
)
KONTEXT = Variant(
    name="Flux.1 Kontext",
    recognises=is_kontext,
    pipelines=frozen({**PIPELINES, Role.EDIT: KONTEXT_PIPELINE}),
    looks_like="a Flux.1 Kontext diffusers folder (model_index.json naming FluxKontextPipeline)",
    note="FluxKontextPipeline edits an image as the prompt says (Edit2ImPipe)",
    param_defaults=frozen(KONTEXT_DEFAULTS),
    recognises_folder=lambda folder: folder_classes(folder, "transformer")[0] == KONTEXT_PIPELINE,
)


def finish_call(pipe_obj: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The diffusers call of a Kontext edit at the requested size. FluxKontextPipeline otherwise scales
    the output to ``max_area`` (a megapixel) and resizes the input to the nearest of its preferred
    resolutions; Edit2ImPipe promises the (padded) input's size, so the input is read as it is
    (``_auto_resize`` off) and the area is the requested one (its sides are already multiples of 16,
    which is what the pipeline rounds them to). Every other call is unchanged."""
    if type(pipe_obj.pipe).__name__ == KONTEXT_PIPELINE and kwargs.get("image") is not None:
        kwargs["max_area"] = int(kwargs["width"]) * int(kwargs["height"])
        kwargs["_auto_resize"] = False
    return kwargs


#: the resolutions Flux.1 is commonly run at (about one megapixel, sides multiples of 64), width x height
FLUX_SIZES = ((1024, 1024), (1152, 896), (896, 1152), (1216, 832), (832, 1216), (1344, 768), (768, 1344),
              (1536, 640), (640, 1536))

FAMILY = Family(
    name="FLUX",
    title="Flux.1",
    pipelines=frozen({**PIPELINES, Role.EDIT: KONTEXT_PIPELINE}),
    folder_load_kwargs=frozen({}),
    recognises_folder=transformer_folder(FOLDER_PIPELINES, TRANSFORMER),
    # BFL's single-file transformer, by the tensor diffusers checks for it, bare or under ComfyUI's prefix
    # (Flux is asked before SD, whose "model.diffusion_model." would take ComfyUI's files otherwise)
    checkpoint_prefixes=(BFL_MARKER, COMFY_PREFIX + BFL_MARKER),
    recognises_pipeline=transformer_pipeline(TRANSFORMER),
    recognises_controlnet=lambda config: config.get("_class_name") == "FluxControlNetModel",
    # ComfyUI comfy/latent_formats.py (Flux), for latents normalised as (z - 0.1159) * 0.3611,
    # which is what diffusers' FluxPipeline denoises too
    latent_rgb_factors=((-0.0346, 0.0244, 0.0681),
                        (0.0034, 0.0210, 0.0687),
                        (0.0275, -0.0668, -0.0433),
                        (-0.0174, 0.0160, 0.0617),
                        (0.0859, 0.0721, 0.0329),
                        (0.0004, 0.0383, 0.0115),
                        (0.0405, 0.0861, 0.0915),
                        (-0.0236, -0.0185, -0.0259),
                        (-0.0245, 0.0250, 0.1180),
                        (0.1008, 0.0755, -0.0421),
                        (-0.0515, 0.0201, 0.0011),
                        (0.0428, -0.0012, -0.0036),
                        (0.0817, 0.0765, 0.0749),
                        (-0.1264, -0.0522, -0.1103),
                        (-0.0280, -0.0881, -0.0499),
                        (-0.1262, -0.0982, -0.0778)),
    latent_rgb_bias=(-0.0329, -0.0718, -0.0851),
    controlnet_class="FluxControlNetModel",
    multi_controlnet_class="FluxMultiControlNetModel",
    denoiser="transformer",
    native_size=native_size,
    folder_native_size=folder_native_size,
    aspect_sizes=FLUX_SIZES,
    # the VAE's 8 times the 2x2 patches the transformer packs
    size_multiple=16,
    weighted_prompts=True,
    encode_prompt=encode_prompt,
    # guidance_scale is Flux's distilled guidance (an input of the transformer); a negative prompt
    # takes effect with true_cfg_scale > 1 (real classifier-free guidance, two passes a step)
    negative_prompts=True,
    negative_unused=negative_unused,
    params=frozenset({"true_cfg_scale", "max_sequence_length"}),
    # kohya (BFL names), diffusers/peft and xlabs Flux LoRAs, through diffusers' FluxLoraLoaderMixin
    supports_loras=True,
    schedulers=FLOW_SCHEDULERS,
    # Flux.1-dev's recommended settings (diffusers' FluxPipeline documentation)
    param_defaults=frozen({"guidance_scale": 3.5, "steps": 28}),
    step_latents=unpack_2x2,
    # single files hold the transformer alone (BFL's layout); the rest comes from a config folder
    single_file_class=TRANSFORMER,
    single_file_layout=to_diffusers,
    working_roles=frozenset({Role.TEXT2IMAGE, Role.IMAGE2IMAGE, Role.INPAINT, Role.CONTROLNET,
                             Role.CONTROLNET_IMAGE2IMAGE, Role.EDIT}),
    finish_call=finish_call,
    # Fill runs inpainting only (FluxFillPipeline); edit needs a Kontext model
    variants=(FILL, KONTEXT),
    variant_roles=frozenset({Role.EDIT}),
)
