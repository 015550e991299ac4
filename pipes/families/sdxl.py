"""Stable Diffusion XL: a UNet with added time/text embeddings, two CLIP text encoders."""
from __future__ import annotations

from .base import Family, Role, frozen
from .sd import CSCALES, has_text_time, is_sdxl_folder, is_sdxl_pipeline

#: SDXL's trained resolutions (its paper's bucket list, as Fooocus offers them), width x height
SDXL_SIZES = ((1024, 1024), (1152, 896), (896, 1152), (1216, 832), (832, 1216), (1344, 768), (768, 1344),
              (1536, 640), (640, 1536), (1088, 960), (960, 1088), (1280, 768), (768, 1280), (1408, 704),
              (704, 1408), (1472, 704), (704, 1472), (1600, 640), (640, 1600), (1664, 576), (576, 1664),
              (1728, 576), (576, 1728))

FAMILY = Family(
    name="SDXL",
    title="Stable Diffusion XL",
    pipelines=frozen({
        Role.TEXT2IMAGE: "StableDiffusionXLPipeline",
        Role.IMAGE2IMAGE: "StableDiffusionXLImg2ImgPipeline",
        Role.INPAINT: "StableDiffusionXLInpaintPipeline",
        Role.CONTROLNET: "StableDiffusionXLControlNetPipeline",
        Role.CONTROLNET_IMAGE2IMAGE: "StableDiffusionXLControlNetImg2ImgPipeline",
    }),
    folder_load_kwargs=frozen({}),
    recognises_folder=is_sdxl_folder,
    # the second text encoder; SDXL files also hold SD's "model.diffusion_model." names
    checkpoint_prefixes=("conditioner.embedders.1.",),
    recognises_pipeline=is_sdxl_pipeline,
    recognises_controlnet=lambda config: config.get("_class_name", "ControlNetModel") == "ControlNetModel"
    and has_text_time(config),
    # ComfyUI comfy/latent_formats.py (SDXL)
    latent_rgb_factors=((0.3651, 0.4232, 0.4341),
                        (-0.2533, -0.0042, 0.1068),
                        (0.1076, 0.1111, -0.0362),
                        (-0.3165, -0.2492, -0.2188)),
    latent_rgb_bias=(0.1084, -0.0175, -0.0011),
    controlnet_folder="models-cn-xl",
    controlnet_models=frozen({
        "soft": "controlnet-softedge-sdxl",
        "scribble": "controlnet-scribble-sdxl",
        "canny": "controlnet-canny-sdxl",
        "pose": "controlnet-openpose-sdxl",
        "depth": "controlnet-depth-sdxl",
        "inpaint": "controlnet-inpaint-sdxl",
        "qr": "controlnet-qr-pattern-sdxl",
    }),
    controlnet_scales=frozen({**CSCALES, "qr": 0.5}),
    aspect_sizes=SDXL_SIZES,
)
