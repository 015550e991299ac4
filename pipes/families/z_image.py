"""Z-Image (Tongyi-MAI's Z-Image and Z-Image-Turbo): a single-stream transformer over 2x2 patches of
Flux.1's 16-channel latent, a Qwen3 text encoder prompted through its chat template.

What diffusers 0.42's Z-Image pipelines do, as this family relies on it:

* latents stay ``[b, 16, h, w]`` through the step callback (the pipelines patchify inside the
  transformer call), so the previews need no unpacking;
* ``guidance_scale`` is real classifier-free guidance with the negative prompt, applied as
  ``pos + g * (pos - neg)``: any ``g > 0`` runs two passes a step and uses the negative prompt,
  ``0`` (Z-Image-Turbo's setting) runs one pass and uses no negative prompt;
* the prompt is encoded as diffusers does (the Qwen3 chat template, up to ``max_sequence_length``
  tokens), ``(word:1.3)`` scaling that word's hidden states (``encode_prompt``); there is no
  ``true_cfg_scale``;
* ``ZImageLoraLoaderMixin`` loads LoRAs into the transformer only (diffusers, kohya and ai-toolkit
  layouts).

Torch-free: diffusers is imported only when a pipeline class is asked for.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..schedulers import FLOW_SCHEDULERS
from .base import Family, Role, frozen, transformer_folder, transformer_pipeline
from .flux import FAMILY as FLUX

#: the diffusers class of Z-Image's denoiser, as a folder's transformer/config.json names it
TRANSFORMER = "ZImageTransformer2DModel"
CONTROLNET = "ZImageControlNetModel"
PIPELINES = {
    Role.TEXT2IMAGE: "ZImagePipeline",
    Role.IMAGE2IMAGE: "ZImageImg2ImgPipeline",
    Role.INPAINT: "ZImageInpaintPipeline",
    # Cond2ImPipe (condition images given); diffusers has no
    # ControlNet image-to-image class for Z-Image (ZImageControlNetInpaintPipeline is inpainting)
    Role.CONTROLNET: "ZImageControlNetPipeline",
}
#: ZImagePipeline's own default side when no size is given (``height = height or 1024``), whatever the VAE
DEFAULT_SIDE = 1024

#: the resolutions of Z-Image-Turbo's own demo (the Tongyi-MAI/Z-Image-Turbo Hugging Face Space,
#: app.py ``RES_CHOICES["1024"]``): about one megapixel, sides multiples of 16, width x height
Z_IMAGE_SIZES = ((1024, 1024), (1152, 896), (896, 1152), (1152, 864), (864, 1152), (1248, 832), (832, 1248),
                 (1280, 720), (720, 1280), (1344, 576), (576, 1344))


def native_size(pipe: Any) -> int:
    """ZImagePipeline's default side (1024 pixels, not derived from the model's configs)."""
    return DEFAULT_SIDE


def folder_native_size(folder: Path) -> int:
    """The native side of a Z-Image folder: ZImagePipeline's default, as ``native_size``."""
    return DEFAULT_SIDE


def negative_unused(params: Mapping[str, Any]) -> str | None:
    """Why these settings leave the negative prompt unused: guidance 0 (Z-Image-Turbo's default) turns
    classifier-free guidance off, and the pipelines then encode no negative prompt."""
    if float(params.get("guidance_scale") or 0.0) > 0.0:
        return None
    return "with guidance_scale 0 (allowed: guidance_scale above 0 for it to take effect)"


#: ZImagePipeline's default ``max_sequence_length``
DEFAULT_SEQUENCE_LENGTH = 512


def encode_prompt(pipe_obj: Any, prompt: str, negative: str | None) -> dict[str, Any]:
    """Z-Image's prompt encoding with A1111 weights: the Qwen3 hidden states of diffusers' ``_encode_prompt``
    (its last-but-one layer), each weighted token's scaled by its weight around the prompt's mean
    (``weighting.encode_in_template``: the transformer RMS-normalises each text token, which would undo a
    plain scaling).

    The prompt goes into the tokenizer's chat template (a user message, the generation prompt, thinking
    on) and is tokenized as diffusers does: padded to ``max_sequence_length`` (512 by default) and cut
    there, a prompt that does not fit with a warning; the padding's rows are left out. An unweighted
    prompt, or any prompt with ``lpw`` off (read literally), gives diffusers' own embeddings. With
    guidance on (``guidance_scale`` above 0) the negative prompt is encoded the same way, ``""`` when
    none is given (diffusers' own default), since the pipelines need it as embeddings too.

    Returns:
        ``prompt_embeds`` (a list of one ``[tokens, dim]`` tensor, as the pipelines take it) and, with
        guidance, ``negative_prompt_embeds``.
    """
    from diffusers.utils.torch_utils import get_module_execution_device

    from ..weighting import encode_in_template

    params, pipe = pipe_obj.params, pipe_obj.pipe
    parse = bool(params.get("lpw", True))
    length = int(params.get("max_sequence_length") or DEFAULT_SEQUENCE_LENGTH)
    tokenizer, encoder = pipe.tokenizer, pipe.text_encoder
    device = get_module_execution_device(encoder)

    def render(text: str) -> str:
        return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True, enable_thinking=True)

    def run(ids: Any, mask: Any) -> Any:  # as _encode_prompt: a boolean mask, the last-but-one layer
        return encoder(input_ids=ids, attention_mask=mask.bool(), output_hidden_states=True).hidden_states[-2]

    texts = [("", prompt)]
    if float(params.get("guidance_scale") or 0.0) > 0.0:
        texts.append(("negative_", negative or ""))
    out: dict[str, Any] = {}
    for key, text in texts:
        embeds, tokens = encode_in_template(text, tokenizer, render, run, device, max_length=length, pad=True,
                                            parse_weights=parse)
        if tokens.dropped:
            pipe_obj.warn(f"the {key.replace('_', ' ')}prompt does not fit in max_sequence_length {length} tokens "
                          f"with the chat template: its last {tokens.dropped} tokens were cut")
        out[f"{key}prompt_embeds"] = [embeds[0].to(device=pipe_obj.device)]
    return out


FAMILY = Family(
    name="Z_IMAGE",
    title="Z-Image",
    pipelines=frozen(PIPELINES),
    folder_load_kwargs=frozen({}),
    recognises_folder=transformer_folder(PIPELINES.values(), TRANSFORMER),
    # single-file Z-Image checkpoints ("layers.N.attention...") are recognised by family_of_checkpoint
    # as a transformer checkpoint of a family that takes no single files
    checkpoint_prefixes=(),
    recognises_pipeline=transformer_pipeline(TRANSFORMER),
    recognises_controlnet=lambda config: config.get("_class_name") == CONTROLNET,
    # Z-Image's VAE is Flux.1's, normalised the same way ((z - 0.1159) * 0.3611): the same factors
    latent_rgb_factors=FLUX.latent_rgb_factors,
    latent_rgb_bias=FLUX.latent_rgb_bias,
    controlnet_class=CONTROLNET,
    # ZImageControlNetPipeline takes one ControlNet model (the Fun "Union" models cover several
    # condition types in one); diffusers has no multi-ControlNet class for Z-Image
    multi_controlnet_class=None,
    max_controlnets=1,
    denoiser="transformer",
    native_size=native_size,
    folder_native_size=folder_native_size,
    aspect_sizes=Z_IMAGE_SIZES,
    # the VAE's 8 times the transformer's 2x2 patches (all_patch_size 2): the pipelines refuse other sizes
    size_multiple=16,
    # (word:1.3) scales that word's Qwen3 hidden states
    weighted_prompts=True,
    encode_prompt=encode_prompt,
    negative_prompts=True,
    negative_unused=negative_unused,
    params=frozenset({"max_sequence_length"}),
    supports_loras=True,
    schedulers=FLOW_SCHEDULERS,
    # Z-Image-Turbo's settings in diffusers' documentation (ZImagePipeline's example and the Z-Image
    # page): 8 steps, guidance 0 (distilled; the base Z-Image model wants more steps and guidance)
    param_defaults=frozen({"steps": 8, "guidance_scale": 0.0}),
    working_roles=frozenset({Role.TEXT2IMAGE, Role.IMAGE2IMAGE, Role.INPAINT, Role.CONTROLNET}),
)
