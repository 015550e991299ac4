"""A1111's request bodies (``modules/api/models.py``): its field names and defaults.

Every field A1111 takes is accepted; fields of features multigen lacks (hires fix, face restoration,
tiling, scripts...) are accepted and ignored as A1111 ignores what an extension it lacks would
read, and unknown fields are ignored too (``extra="allow"``), so a client made for another A1111
version still works. What a field changes here is said in docs/clients.md.
"""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")


class GenerationRequest(_Body):
    """The fields txt2img and img2img share (``StableDiffusionProcessing``)."""

    prompt: str = ""
    negative_prompt: str = ""
    styles: list[str] = Field(default_factory=list)
    seed: int = -1
    subseed: int = -1
    subseed_strength: float = 0.0
    seed_resize_from_h: int = -1
    seed_resize_from_w: int = -1
    sampler_name: str | None = None
    sampler_index: str | None = None  # deprecated by A1111 for sampler_name; read when that is missing
    scheduler: str | None = None
    batch_size: int = Field(1, ge=1)
    n_iter: int = Field(1, ge=1)
    steps: int = Field(50, ge=1)
    cfg_scale: float = Field(7.0, ge=0)
    width: int = Field(512, ge=8)
    height: int = Field(512, ge=8)
    restore_faces: bool | None = None
    tiling: bool | None = None
    do_not_save_samples: bool = False
    do_not_save_grid: bool = False
    eta: float | None = None
    denoising_strength: float | None = Field(None, ge=0, le=1)
    override_settings: dict[str, Any] | None = None
    override_settings_restore_afterwards: bool = True
    script_name: str | None = None
    script_args: list[Any] = Field(default_factory=list)
    alwayson_scripts: dict[str, Any] = Field(default_factory=dict)
    send_images: bool = True
    save_images: bool = False
    force_task_id: str | None = None
    infotext: str | None = None


class Txt2ImgRequest(GenerationRequest):
    """``POST /sdapi/v1/txt2img`` (``StableDiffusionTxt2ImgProcessingAPI``)."""

    enable_hr: bool = False
    hr_scale: float = 2.0
    hr_upscaler: str | None = None
    hr_second_pass_steps: int = 0
    hr_resize_x: int = 0
    hr_resize_y: int = 0
    firstphase_width: int = 0
    firstphase_height: int = 0
    # SDXL refiner: the model's models.yaml `refiner:` (docs/features.md, "Quality switches")
    refiner_checkpoint: str | None = None
    refiner_switch_at: float | None = Field(None, gt=0, lt=1)


class Img2ImgRequest(GenerationRequest):
    """``POST /sdapi/v1/img2img`` (``StableDiffusionImg2ImgProcessingAPI``)."""

    init_images: list[str] = Field(default_factory=list)
    resize_mode: int = Field(0, ge=0, le=3)
    image_cfg_scale: float | None = None
    denoising_strength: float | None = Field(0.75, ge=0, le=1)
    mask: str | None = None
    mask_blur: int | None = Field(None, ge=0, le=64)
    mask_blur_x: int = Field(4, ge=0, le=64)
    mask_blur_y: int = Field(4, ge=0, le=64)
    inpainting_fill: int = Field(0, ge=0, le=3)
    inpaint_full_res: bool | int = True
    inpaint_full_res_padding: int = 0
    inpainting_mask_invert: int = Field(0, ge=0, le=1)
    initial_noise_multiplier: float | None = None
    latent_mask: str | None = None
    include_init_images: bool = False


class PngInfoRequest(_Body):
    """``POST /sdapi/v1/png-info``."""

    image: str


class ExtraSingleImageRequest(_Body):
    """``POST /sdapi/v1/extra-single-image`` (``ExtrasSingleImageRequest``)."""

    image: str
    resize_mode: int = Field(0, ge=0, le=1)
    show_extras_results: bool = True
    gfpgan_visibility: float = 0
    codeformer_visibility: float = 0
    codeformer_weight: float = 0
    upscaling_resize: float = Field(2.0, gt=0, le=8)
    upscaling_resize_w: int = Field(512, ge=1)
    upscaling_resize_h: int = Field(512, ge=1)
    upscaling_crop: bool = True
    upscaler_1: str = "None"
    upscaler_2: str = "None"
    extras_upscaler_2_visibility: float = 0
    upscale_first: bool = False


class OptionsRequest(_Body):
    """``POST /sdapi/v1/options``: any of A1111's option keys (those multigen uses are read from it)."""
