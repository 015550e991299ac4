"""Stable Diffusion 1.x: a UNet, one CLIP text encoder, a 4-channel VAE."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from .base import Family, Role, frozen


def has_text_time(config: Mapping[str, Any]) -> bool:
    """An SDXL UNet or ControlNet (its added time and text embeddings)."""
    return config.get("addition_embed_type") == "text_time"


def is_sdxl_folder(folder: Path, unet: dict[str, Any]) -> bool:
    return bool(unet) and (has_text_time(unet) or (folder / "text_encoder_2").is_dir())


def is_sdxl_pipeline(pipe: Any) -> bool:
    unet = getattr(pipe, "unet", None)
    return getattr(pipe, "text_encoder_2", None) is not None or (unet is not None and has_text_time(unet.config))


#: metafusion's SD ControlNet scales (its ``cond_scales_defaults``)
CSCALES = {"canny": 0.75, "pose": 1.0, "ip2p": 0.5, "soft-sobel": 0.3, "soft": 0.95, "scribble": 0.95,
           "depth": 0.5, "inpaint": 1.0, "qr": 1.5}

FAMILY = Family(
    name="SD",
    title="Stable Diffusion 1.x",
    pipelines=frozen({
        Role.TEXT2IMAGE: "StableDiffusionPipeline",
        Role.IMAGE2IMAGE: "StableDiffusionImg2ImgPipeline",
        Role.INPAINT: "StableDiffusionInpaintPipeline",
        Role.CONTROLNET: "StableDiffusionControlNetPipeline",
        Role.CONTROLNET_IMAGE2IMAGE: "StableDiffusionControlNetImg2ImgPipeline",
    }),
    # the tiny and most community SD folders have no safety checker; do not ask for one
    folder_load_kwargs=frozen({"safety_checker": None, "requires_safety_checker": False}),
    recognises_folder=lambda folder, unet: bool(unet) and not is_sdxl_folder(folder, unet),
    checkpoint_prefixes=("cond_stage_model.", "model.diffusion_model."),
    recognises_pipeline=lambda pipe: getattr(pipe, "unet", None) is not None and not is_sdxl_pipeline(pipe),
    recognises_controlnet=lambda config: config.get("_class_name", "ControlNetModel") == "ControlNetModel"
    and not has_text_time(config),
    # ComfyUI comfy/latent_formats.py (SD15): no bias
    latent_rgb_factors=((0.3512, 0.2297, 0.3227),
                        (0.3250, 0.4974, 0.2350),
                        (-0.2829, 0.1762, 0.2721),
                        (-0.2120, -0.2616, -0.7177)),
    latent_rgb_bias=(0.0, 0.0, 0.0),
    controlnet_folder="models-cn",
    controlnet_models=frozen({
        "canny": "sd-controlnet-canny",
        "pose": "control_v11p_sd15_openpose",
        "ip2p": "control_v11e_sd15_ip2p",
        "soft-sobel": "control_v11p_sd15_softedge",
        "soft": "control_v11p_sd15_softedge",
        "scribble": "control_v11p_sd15_scribble",
        "depth": "control_v11f1p_sd15_depth",
        "inpaint": "control_v11p_sd15_inpaint",
        "qr": "controlnet_qrcode-control_v1p_sd15",
    }),
    controlnet_scales=frozen(CSCALES),
    # SD 1.5's 512 px and the sizes of the same area people use with it
    aspect_sizes=((512, 512), (512, 768), (768, 512), (448, 576), (576, 448), (384, 640), (640, 384)),
    image_prompts=True,  # IP-Adapter (pipes/ip_adapter.py)
    # FreeU's recommended factors for SD 1.5 (its authors' README); no refiner
    quality_params=frozen({"freeu": None, "freeu_b1": 1.5, "freeu_b2": 1.6, "freeu_s1": 0.9, "freeu_s2": 0.2,
                           "sharpness": None, "guidance_rescale": None}),
)
