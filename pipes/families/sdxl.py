"""Stable Diffusion XL: a UNet with added time/text embeddings, two CLIP text encoders."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .base import Family, Role, Variant, frozen
from .sd import CSCALES, has_text_time, is_sdxl_folder, is_sdxl_pipeline

#: SDXL's trained resolutions (its paper's bucket list, as Fooocus offers them), width x height
SDXL_SIZES = ((1024, 1024), (1152, 896), (896, 1152), (1216, 832), (832, 1216), (1344, 768), (768, 1344),
              (1536, 640), (640, 1536), (1088, 960), (960, 1088), (1280, 768), (768, 1280), (1408, 704),
              (704, 1408), (1472, 704), (704, 1472), (1600, 640), (640, 1600), (1664, 576), (576, 1664),
              (1728, 576), (576, 1728),
              # and the sizes of Fooocus' list (modules/flags.py sdxl_aspect_ratios) missing above
              (1344, 704), (704, 1344), (1152, 832), (832, 1152), (1088, 896), (896, 1088), (1024, 960),
              (960, 1024))



def is_refiner(pipe: Any) -> bool:
    """An SDXL refiner: one text encoder (the second) and aesthetic-score conditioning."""
    config = getattr(pipe, "config", {}) or {}
    return bool(config.get("requires_aesthetics_score")) or (
        getattr(pipe, "text_encoder", None) is None and getattr(pipe, "text_encoder_2", None) is not None)


def is_refiner_folder(folder: Path) -> bool:
    try:
        index = json.loads((folder / "model_index.json").read_text())
    except (OSError, ValueError):
        return False
    return bool(index.get("requires_aesthetics_score")) or (
        (index.get("text_encoder") or [None])[0] is None and (index.get("text_encoder_2") or [None])[0] is not None)


#: an SDXL refiner (stable-diffusion-xl-refiner-1.0's shape) runs no session of its own: it finishes the last
#: steps of a base model that names it (models.yaml `refiner:`, the `refiner_switch` parameter; pipes/refiner.py)
REFINER = Variant(
    name="SDXL refiner",
    recognises=is_refiner,
    pipelines=frozen({}),
    looks_like="an SDXL refiner folder (model_index.json with requires_aesthetics_score, text_encoder_2 only)",
    note="a refiner finishes another SDXL model's last steps: name it as that model's `refiner:` in models.yaml "
         "and set `refiner_switch` in its jobs",
    recognises_folder=is_refiner_folder,
)

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
    image_prompts=True,  # IP-Adapter (pipes/ip_adapter.py)
    variants=(REFINER,),
    # FreeU's recommended factors for SDXL (its authors' README); the refiner: a models.yaml `refiner:`
    quality_params=frozen({"freeu": None, "freeu_b1": 1.3, "freeu_b2": 1.4, "freeu_s1": 0.9, "freeu_s2": 0.2,
                           "sharpness": None, "guidance_rescale": None, "refiner_switch": None}),
)
