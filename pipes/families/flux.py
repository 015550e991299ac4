"""Flux.1 (dev and schnell shapes): a transformer over 2x2-packed latents, CLIP-L and T5 text encoders,
a 16-channel VAE.

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
from .base import Family, Role, frozen, transformer_folder, transformer_pipeline, unpack_2x2, vae_factor

#: the diffusers class of Flux.1's denoiser, as a folder's transformer/config.json names it
TRANSFORMER = "FluxTransformer2DModel"
PIPELINES = {
    Role.TEXT2IMAGE: "FluxPipeline",
    Role.IMAGE2IMAGE: "FluxImg2ImgPipeline",
    Role.INPAINT: "FluxInpaintPipeline",
    Role.CONTROLNET: "FluxControlNetPipeline",
    Role.CONTROLNET_IMAGE2IMAGE: "FluxControlNetImg2ImgPipeline",
}


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


#: the resolutions Flux.1 is commonly run at (about one megapixel, sides multiples of 64), width x height
FLUX_SIZES = ((1024, 1024), (1152, 896), (896, 1152), (1216, 832), (832, 1216), (1344, 768), (768, 1344),
              (1536, 640), (640, 1536))

FAMILY = Family(
    name="FLUX",
    title="Flux.1",
    pipelines=frozen(PIPELINES),
    folder_load_kwargs=frozen({}),
    recognises_folder=transformer_folder(PIPELINES.values(), TRANSFORMER),
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
    lora_components=("transformer", "text_encoder"),
    schedulers=FLOW_SCHEDULERS,
    # Flux.1-dev's recommended settings (diffusers' FluxPipeline documentation)
    param_defaults=frozen({"guidance_scale": 3.5, "steps": 28}),
    step_latents=unpack_2x2,
    # single files hold the transformer alone (BFL's layout); the rest comes from a config folder
    single_file_class=TRANSFORMER,
    single_file_layout=to_diffusers,
    working_roles=frozenset({Role.TEXT2IMAGE, Role.IMAGE2IMAGE, Role.INPAINT, Role.CONTROLNET,
                             Role.CONTROLNET_IMAGE2IMAGE}),
)
