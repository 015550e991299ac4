"""Qwen-Image (and Qwen-Image-Edit): an MMDiT over 2x2-packed latents, a Qwen2.5-VL text encoder, the
16-channel Wan 2.1 VAE.

Guidance: Qwen-Image's released transformers are not guidance-distilled, and diffusers' Qwen pipelines
ignore their ``guidance_scale`` for them (with a log line). Its classifier-free guidance is diffusers'
``true_cfg_scale``, which runs only with a negative prompt. So here the common ``guidance_scale`` (the
"CFG scale" of every family) is passed as ``true_cfg_scale``; ``true_cfg_scale`` itself is the same knob
under diffusers' name and wins when given (the two set to different values are refused). A job without
a negative prompt gets ``" "``, as Qwen-Image's own examples pass, so that the guidance runs; with the
guidance at 1 a negative prompt is unused, and the job's warnings say so.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from ..errors import InvalidValueError
from ..schedulers import FLOW_SCHEDULERS
from .base import (Family, Role, Variant, folder_classes, folder_pipeline, frozen, read_json, transformer_folder,
                   transformer_pipeline, unpack_2x2, vae_factor)

#: the diffusers class of Qwen-Image's denoiser, as a folder's transformer/config.json names it
TRANSFORMER = "QwenImageTransformer2DModel"
CONTROLNET = "QwenImageControlNetModel"
PIPELINES = {
    Role.TEXT2IMAGE: "QwenImagePipeline",
    Role.IMAGE2IMAGE: "QwenImageImg2ImgPipeline",
    Role.INPAINT: "QwenImageInpaintPipeline",
    Role.CONTROLNET: "QwenImageControlNetPipeline",
    Role.EDIT: "QwenImageEditPipeline",
}
#: every diffusers pipeline of the family, as a folder's model_index.json names it
FOLDER_PIPELINES = frozenset(PIPELINES.values()) | {
    "QwenImageEditPlusPipeline", "QwenImageEditInpaintPipeline", "QwenImageControlNetInpaintPipeline"}
#: Qwen-Image's published resolutions (its model card's aspect ratios: 1:1, 16:9, 9:16, 4:3, 3:4, 3:2, 2:3)
QWEN_IMAGE_SIZES = ((1328, 1328), (1664, 928), (928, 1664), (1472, 1140), (1140, 1472), (1584, 1056), (1056, 1584))
#: diffusers' QwenImagePipeline default: 128 latent pixels a side (1024 px with the VAE's factor 8)
DEFAULT_SAMPLE_SIZE = 128
#: the negative prompt Qwen-Image's examples pass when there is nothing to avoid: diffusers runs true CFG
#: only with a negative prompt
EMPTY_NEGATIVE = " "
#: the default guidance (diffusers' true_cfg_scale default and Qwen-Image's examples)
DEFAULT_GUIDANCE = 4.0
#: where an edit model keeps its Qwen2-VL processor (the folder's model_index.json entry)
PROCESSOR = "processor"


def native_size(pipe: Any) -> int:
    return int(getattr(pipe, "default_sample_size", DEFAULT_SAMPLE_SIZE)) * int(pipe.vae_scale_factor)


def folder_native_size(folder: Path) -> int:
    # as native_size; the VAE factor from vae/config.json's temperal_downsample (vae_factor knows it)
    return DEFAULT_SAMPLE_SIZE * vae_factor(folder)


def guidance(params: Mapping[str, Any]) -> float:
    """The classifier-free guidance scale a setup runs with: ``true_cfg_scale`` when given, else ``guidance_scale``."""
    value = params.get("true_cfg_scale")
    return float(value if value is not None else params.get("guidance_scale", DEFAULT_GUIDANCE))


def extra_checks(params: Mapping[str, Any]) -> None:
    """Refuse what diffusers' Qwen pipelines would ignore or break on.

    Raises:
        InvalidValueError: ``guidance_scale`` and ``true_cfg_scale`` both set to different values (one
            would be ignored); ``steps`` 1 (Qwen-Image's scheduler stretches its sigmas to end at
            ``shift_terminal``: with one step diffusers divides by zero and returns a black image).
    """
    true_cfg, scale = params.get("true_cfg_scale"), params.get("guidance_scale")
    if true_cfg is not None and scale is not None and scale not in (DEFAULT_GUIDANCE, true_cfg):
        raise InvalidValueError(f"guidance_scale {scale} and true_cfg_scale {true_cfg} disagree: on Qwen-Image "
                                "models both are its classifier-free guidance scale; allowed: set one of them (or "
                                "both to the same value)", "true_cfg_scale", "one of guidance_scale, true_cfg_scale")
    if params.get("steps") == 1:
        raise InvalidValueError("steps 1 is not supported for Qwen-Image models: their scheduler stretches the "
                                "sigmas to end at shift_terminal, which one step cannot; allowed: 2 or more", "steps",
                                "2 or more")


def negative_unused(params: Mapping[str, Any]) -> str | None:
    """Why these settings leave the negative prompt unused: diffusers runs it only with the guidance above 1."""
    if guidance(params) > 1.0:
        return None
    return (f"with guidance_scale/true_cfg_scale {guidance(params):g} (allowed: above 1 for it to take "
            "effect)")


def finish_call(pipe_obj: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The diffusers call with Qwen-Image's guidance: ``guidance_scale`` passed as ``true_cfg_scale``
    (unless that was given), and a missing negative prompt as ``" "`` so that the guidance runs."""
    scale = kwargs.pop("guidance_scale")
    kwargs.setdefault("true_cfg_scale", scale)
    # with embeddings (encode_prompt) a given negative prompt comes as negative_prompt_embeds; none given,
    # diffusers encodes " " itself, next to the prompt's embeddings
    if (kwargs["true_cfg_scale"] > 1 and not kwargs.get("negative_prompt")
            and kwargs.get("negative_prompt_embeds") is None):
        kwargs["negative_prompt"] = EMPTY_NEGATIVE
    return kwargs


#: diffusers' Qwen pipelines' default ``max_sequence_length`` (their check_inputs allows up to 1024)
DEFAULT_SEQUENCE_LENGTH = 512


def encode_prompt(pipe_obj: Any, prompt: str, negative: str | None) -> dict[str, Any]:
    """Qwen-Image's prompt encoding with A1111 weights: the Qwen2.5-VL hidden states of diffusers'
    ``_get_qwen_prompt_embeds``, each weighted token's scaled by its weight around the prompt's mean
    (``weighting.encode_in_template``: the transformer RMS-normalises each text token, which would undo
    a plain scaling).

    The prompt goes into the pipeline's ``prompt_template_encode`` and is tokenized as diffusers does;
    the template's first ``prompt_template_encode_start_idx`` tokens (its system prompt) are dropped
    and the rest cut at ``max_sequence_length`` (512 by default), a longer prompt with a warning. An
    unweighted prompt, or any prompt with ``lpw`` off (read literally), gives diffusers' own
    embeddings. A negative prompt is encoded the same way; none given, ``finish_call`` passes ``" "``
    for diffusers to encode. Qwen-Image-Edit's prompt holds the input image's vision tokens, which
    diffusers' edit pipeline makes itself from the image it resizes: there the prompt goes as text,
    the weighting syntax removed with a warning.

    Returns:
        ``prompt_embeds`` and ``prompt_embeds_mask`` (``[1, n, dim]``, ``[1, n]``) and their ``negative_``
        twins when there is a negative prompt; the edit role: ``prompt`` and ``negative_prompt``.
    """
    from diffusers.utils.torch_utils import get_module_execution_device

    from ..prompting import strip_weighting
    from ..weighting import encode_in_template

    params, pipe = pipe_obj.params, pipe_obj.pipe
    parse = bool(params.get("lpw", True))
    texts = (("", prompt), ("negative_", negative))
    if getattr(pipe_obj, "ROLE", None) is Role.EDIT:
        out = {f"{key}prompt": strip_weighting(text) if parse else text for key, text in texts if text is not None}
        if any(out[f"{key}prompt"] != text for key, text in texts if text is not None):
            pipe_obj.warn("prompt weighting is not applied by Qwen-Image-Edit (its prompt holds the image): the "
                          "syntax was removed")
        return out
    import torch

    length = int(params.get("max_sequence_length") or DEFAULT_SEQUENCE_LENGTH)
    encoder, drop = pipe.text_encoder, int(pipe.prompt_template_encode_start_idx)
    device = get_module_execution_device(encoder)

    def run(ids: Any, mask: Any) -> Any:  # as _get_qwen_prompt_embeds: the last layer's hidden states
        return encoder(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]

    out: dict[str, Any] = {}
    for key, text in texts:
        if text is None:
            continue
        embeds, tokens = encode_in_template(text, pipe.tokenizer, pipe.prompt_template_encode.format, run, device,
                                            max_length=int(pipe.tokenizer_max_length) + drop,
                                            rows=slice(drop, drop + length), parse_weights=parse)
        if tokens.dropped:
            pipe_obj.warn(f"the {key.replace('_', ' ')}prompt does not fit in max_sequence_length {length} tokens: "
                          f"its last {tokens.dropped} tokens were cut")
        out[f"{key}prompt_embeds"] = embeds.to(dtype=encoder.dtype, device=pipe_obj.device)
        out[f"{key}prompt_embeds_mask"] = torch.ones(embeds.shape[:2], dtype=torch.long, device=pipe_obj.device)
    return out


def role_components(base: Any, role: Role) -> dict[str, Any]:
    """What Qwen-Image-Edit needs beyond the base pipeline: its Qwen2-VL processor (the base is a
    QwenImagePipeline, which drops it), loaded from the model's folder.

    Raises:
        InvalidValueError: an edit role on a model whose folder has no processor (not an edit model).
    """
    if role is not Role.EDIT or getattr(base, PROCESSOR, None) is not None:
        return {}
    folder = Path(str(base.config.get("_name_or_path") or ""))
    entry = read_json(folder / "model_index.json").get(PROCESSOR)
    if not entry or not (folder / PROCESSOR).is_dir():
        index = read_json(folder / "model_index.json").get("_class_name", "no model_index.json")
        raise InvalidValueError(f"model {folder} is not a Qwen-Image-Edit model ({index}, no {PROCESSOR}/ folder); "
                                "allowed: a Qwen-Image-Edit diffusers folder (QwenImageEditPipeline)", "model_id",
                                "a Qwen-Image-Edit diffusers folder")
    return {PROCESSOR: load_processor(folder / PROCESSOR)}


def load_processor(folder: Path) -> Any:
    """The Qwen2-VL processor of an edit model: its tokenizer and image processor, read with transformers'
    PIL image processor (the default one needs torchvision, which this project does without; the PIL one
    gives the same pixels wherever it runs), in a Qwen2VLProcessor without a video processor."""
    from transformers import Qwen2Tokenizer, Qwen2VLImageProcessorPil, Qwen2VLProcessor

    class ImageQwen2VLProcessor(Qwen2VLProcessor):
        """Qwen2VLProcessor for images only: transformers checks the class of each of a processor's parts,
        a missing video processor's too, and without torchvision it has no video-processor class to check
        against (the check fails); a processor without that part is not checked for it."""

        def __init__(self, image_processor: Any = None, tokenizer: Any = None, chat_template: Any = None,
                     **kwargs: Any) -> None:
            super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    return ImageQwen2VLProcessor(image_processor=Qwen2VLImageProcessorPil.from_pretrained(str(folder)),
                                 tokenizer=Qwen2Tokenizer.from_pretrained(str(folder)))


def is_edit_folder(folder: Path) -> bool:
    """A Qwen-Image-Edit folder (model_index.json naming an edit pipeline, with its processor), torch-free."""
    return (folder_classes(folder, "transformer")[0] in EDIT_PIPELINES and (folder / PROCESSOR).is_dir())


#: the model_index.json classes of the edit models (what EDIT runs on)
EDIT_PIPELINES = frozenset({"QwenImageEditPipeline", "QwenImageEditPlusPipeline", "QwenImageEditInpaintPipeline"})
EDIT = Variant(
    name="Qwen-Image-Edit",
    recognises=lambda base: getattr(base, PROCESSOR, None) is not None or folder_pipeline(base) in EDIT_PIPELINES,
    pipelines=frozen(PIPELINES),
    looks_like="a Qwen-Image-Edit diffusers folder (model_index.json naming QwenImageEditPipeline, with its "
               "processor/ folder)",
    note="QwenImageEditPipeline edits an image as the prompt says (Edit2ImPipe); the edit models run the other "
         "tasks too",
    recognises_folder=is_edit_folder,
)

FAMILY = Family(
    name="QWEN_IMAGE",
    title="Qwen-Image",
    pipelines=frozen(PIPELINES),
    folder_load_kwargs=frozen({}),
    recognises_folder=transformer_folder(FOLDER_PIPELINES, TRANSFORMER),
    # single-file Qwen-Image checkpoints are recognised by family_of_checkpoint to say "not supported yet"
    checkpoint_prefixes=(),
    recognises_pipeline=transformer_pipeline(TRANSFORMER),
    recognises_controlnet=lambda config: config.get("_class_name") == CONTROLNET,
    # ComfyUI comfy/latent_formats.py (Wan21: Qwen-Image uses the Wan 2.1 VAE), for latents normalised as
    # (z - latents_mean) / latents_std, which is what diffusers' Qwen-Image pipelines denoise too
    latent_rgb_factors=((-0.1299, -0.1692, 0.2932),
                        (0.0671, 0.0406, 0.0442),
                        (0.3568, 0.2548, 0.1747),
                        (0.0372, 0.2344, 0.1420),
                        (0.0313, 0.0189, -0.0328),
                        (0.0296, -0.0956, -0.0665),
                        (-0.3477, -0.4059, -0.2925),
                        (0.0166, 0.1902, 0.1975),
                        (-0.0412, 0.0267, -0.1364),
                        (-0.1293, 0.0740, 0.1636),
                        (0.0680, 0.3019, 0.1128),
                        (0.0032, 0.0581, 0.0639),
                        (-0.1251, 0.0927, 0.1699),
                        (0.0060, -0.0633, 0.0005),
                        (0.3477, 0.2275, 0.2950),
                        (0.1984, 0.0913, 0.1861)),
    latent_rgb_bias=(-0.1835, -0.0868, -0.3360),
    controlnet_class=CONTROLNET,
    multi_controlnet_class="QwenImageMultiControlNetModel",
    denoiser="transformer",
    native_size=native_size,
    folder_native_size=folder_native_size,
    aspect_sizes=QWEN_IMAGE_SIZES,
    # the VAE's 8 times the 2x2 patches the transformer packs
    size_multiple=16,
    # (word:1.3) scales that word's Qwen2.5-VL hidden states (not for Qwen-Image-Edit: syntax removed there)
    weighted_prompts=True,
    encode_prompt=encode_prompt,
    negative_prompts=True,
    negative_unused=negative_unused,
    params=frozenset({"true_cfg_scale", "max_sequence_length"}),
    # diffusers' QwenImageLoraLoaderMixin loads into the transformer only (diffusers, kohya and
    # ComfyUI/musubi-tuner layouts)
    supports_loras=True,
    schedulers=FLOW_SCHEDULERS,
    # diffusers' QwenImagePipeline documentation: 50 steps, true_cfg_scale 4.0 (guidance_scale here)
    param_defaults=frozen({"guidance_scale": DEFAULT_GUIDANCE, "steps": 50}),
    step_latents=unpack_2x2,
    # no ControlNet image-to-image class in diffusers for Qwen-Image (CIm2ImPipe is refused)
    working_roles=frozenset({Role.TEXT2IMAGE, Role.IMAGE2IMAGE, Role.INPAINT, Role.CONTROLNET, Role.EDIT}),
    extra_checks=extra_checks,
    finish_call=finish_call,
    role_components=role_components,
    variants=(EDIT,),
    variant_roles=frozenset({Role.EDIT}),
)
