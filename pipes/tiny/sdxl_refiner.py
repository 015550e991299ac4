"""The tiny SDXL refiner: an SDXL image-to-image model shaped as stabilityai's refiner, for tiny-sdxl.

As the real refiner (stable-diffusion-xl-refiner-1.0): a ``StableDiffusionXLImg2ImgPipeline`` with the second
text encoder only (no ``text_encoder``/``tokenizer``), a UNet whose cross-attention reads that encoder alone
and whose added time embedding takes five ids (size, crop and the aesthetic score:
``requires_aesthetics_score``). Its text encoder and VAE are tiny-sdxl's (same seeds), as the real refiner
shares the base's. config/models.yaml names it as tiny-sdxl's ``refiner:``.
"""
from __future__ import annotations

from pathlib import Path

from .common import DEFAULT_SEED, TinyModel, replace_path, seeded

SDXL_REFINER_DIR = "tiny-sdxl-refiner"
#: the ids of the refiner's added time embedding: original size (2), crop (2), aesthetic score (1)
REFINER_TIME_IDS = 5


def build_sdxl_refiner(out_dir: str | Path, seed: int = DEFAULT_SEED) -> Path:
    """Write ``tiny-sdxl-refiner`` under ``out_dir`` (replacing it) and return its path."""
    from diffusers import StableDiffusionXLImg2ImgPipeline, UNet2DConditionModel

    from ..model_builder import TINY_SDXL, build_sdxl

    s = TINY_SDXL
    base = build_sdxl(seed)  # tiny-sdxl's second text encoder, tokenizer and VAE
    seeded(seed, 15)
    unet = UNet2DConditionModel(sample_size=128, in_channels=4, out_channels=4,
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                                block_out_channels=s.unet_channels, layers_per_block=s.unet_layers,
                                cross_attention_dim=s.te2_hidden, attention_head_dim=s.unet_heads,
                                transformer_layers_per_block=s.transformer_layers, use_linear_projection=True,
                                addition_embed_type="text_time", addition_time_embed_dim=s.time_embed_dim,
                                projection_class_embeddings_input_dim=REFINER_TIME_IDS * s.time_embed_dim
                                + s.te2_hidden, norm_num_groups=s.groups)
    pipe = StableDiffusionXLImg2ImgPipeline(vae=base.vae, text_encoder=None, text_encoder_2=base.text_encoder_2,
                                            tokenizer=None, tokenizer_2=base.tokenizer_2, unet=unet,
                                            scheduler=base.scheduler, requires_aesthetics_score=True,
                                            force_zeros_for_empty_prompt=False)
    folder = Path(out_dir) / SDXL_REFINER_DIR
    replace_path(folder)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


MODEL = TinyModel("sdxl_refiner", SDXL_REFINER_DIR, build_sdxl_refiner)
