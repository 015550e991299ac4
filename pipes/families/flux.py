"""Flux.1 (dev and schnell shapes): a transformer over 2x2-packed latents, CLIP-L and T5 text encoders,
a 16-channel VAE."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from .base import NO_SCHEDULERS, Family, Role, folder_classes, frozen, unpack_2x2, vae_factor

#: the diffusers class of Flux.1's denoiser, as a folder's transformer/config.json names it
TRANSFORMER = "FluxTransformer2DModel"
PIPELINES = {
    Role.TEXT2IMAGE: "FluxPipeline",
    Role.IMAGE2IMAGE: "FluxImg2ImgPipeline",
    Role.INPAINT: "FluxInpaintPipeline",
    Role.CONTROLNET: "FluxControlNetPipeline",
    Role.CONTROLNET_IMAGE2IMAGE: "FluxControlNetImg2ImgPipeline",
}


def is_flux_folder(folder: Path, unet: dict[str, Any]) -> bool:
    if unet:
        return False
    index, transformer = folder_classes(folder, "transformer")
    return index in PIPELINES.values() or transformer == TRANSFORMER


def is_flux_pipeline(pipe: Any) -> bool:
    transformer = getattr(pipe, "transformer", None)
    return transformer is not None and type(transformer).__name__ == TRANSFORMER


def native_size(pipe: Any) -> int:
    # FluxPipeline's own default: 128 latent pixels, 1024 px for Flux.1's VAE
    return int(getattr(pipe, "default_sample_size", 128)) * int(pipe.vae_scale_factor)


def folder_native_size(folder: Path) -> int:
    # FluxPipeline's default_sample_size (128) times its VAE's factor, as native_size
    return 128 * vae_factor(folder)


#: the resolutions Flux.1 is commonly run at (about one megapixel, sides multiples of 64), width x height
FLUX_SIZES = ((1024, 1024), (1152, 896), (896, 1152), (1216, 832), (832, 1216), (1344, 768), (768, 1344),
              (1536, 640), (640, 1536))

FAMILY = Family(
    name="FLUX",
    title="Flux.1",
    pipelines=frozen(PIPELINES),
    folder_load_kwargs=frozen({}),
    recognises_folder=is_flux_folder,
    # single-file Flux checkpoints are recognised by family_of_checkpoint to say "not supported yet"
    checkpoint_prefixes=(),
    recognises_pipeline=is_flux_pipeline,
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
    weighted_prompts=False,
    # guidance_scale is Flux's distilled guidance (an input of the transformer); a negative prompt
    # takes effect with true_cfg_scale > 1 (real classifier-free guidance, two passes a step)
    negative_prompts=True,
    params=frozenset({"true_cfg_scale", "max_sequence_length"}),
    supports_loras=False,
    lora_components=("transformer", "text_encoder"),
    schedulers=NO_SCHEDULERS,
    # Flux.1-dev's recommended settings (diffusers' FluxPipeline documentation)
    param_defaults=frozen({"guidance_scale": 3.5, "steps": 28}),
    step_latents=unpack_2x2,
    working_roles=frozenset({Role.TEXT2IMAGE, Role.IMAGE2IMAGE, Role.INPAINT}),
)
