"""Build the embedded default models from local code only (nothing from a hub).

The models have the real architectures (SD 1.x and SDXL shapes, a VAE that
downsamples by 8, a ControlNet, kohya-style LoRA files, an LDM single-file
checkpoint, a Flux.1-shaped transformer model with 16 latent channels) with small,
deterministic random weights, so the server and the tests run on a fresh machine with
no GPU and no network. ``full_size=True`` writes SD 1.5-, SDXL-, FLUX.1-dev- and Qwen-Image-shaped
random weights for benchmarks on a GPU (the models with a ``TinyModel.full_build``, built on the meta
device and written a shard at a time; the other tiny models are not written).

Models added after a checkout first built its folder are built by ``build_missing_models``
(only what is missing), so adding one never rebuilds the others.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save_file

from .ldm_layout import diffusers_to_ldm
from .tiny import TINY_MODELS
from .tiny.common import (DEFAULT_SEED, byte_tokenizer_parts, clip_text_encoder, linear_lora_tensors, linears,
                          make_t5_tokenizer, make_tokenizer, replace_path, seeded)
from .tiny.flux import FLUX_DIR, build_flux, build_flux_model

__all__ = ["DEFAULT_SEED", "build_default_models", "build_missing_models", "build_sd", "build_sdxl",
           "build_controlnet", "build_lora", "build_flux", "build_flux_model", "byte_tokenizer_parts",
           "make_tokenizer", "make_t5_tokenizer", "write_config_folder", "FLUX_DIR"]
#: the former private names (tests read them)
_text_encoder, _seeded, _replace = clip_text_encoder, seeded, replace_path

#: names of what ``build_default_models`` writes, relative to its folder
SD_DIR = "tiny-sd"
SDXL_DIR = "tiny-sdxl"
CONTROLNET_DIR = "tiny-controlnet-sd"
SD_LORA = "loras/tiny-sd-lora.safetensors"
SDXL_LORA = "loras/tiny-sdxl-lora.safetensors"
SD_SINGLE_FILE = "single/tiny-sd.safetensors"
SD_SINGLE_CONFIG = "single/tiny-sd-config"


@dataclass(frozen=True)
class Sizes:
    """Architecture sizes of one family (tiny or full)."""

    unet_channels: tuple[int, ...]
    unet_layers: int
    unet_heads: int | tuple[int, ...]
    transformer_layers: int | tuple[int, ...]
    vae_channels: tuple[int, ...]
    vae_layers: int
    vae_groups: int
    te_hidden: int
    te_layers: int
    te_heads: int
    te_inter: int
    te2_hidden: int = 0
    te2_layers: int = 0
    te2_heads: int = 0
    te2_inter: int = 0
    time_embed_dim: int = 256
    groups: int = 32


TINY_SD = Sizes(unet_channels=(32, 64), unet_layers=1, unet_heads=8, transformer_layers=1,
                vae_channels=(16, 16, 32, 32), vae_layers=1, vae_groups=8,
                te_hidden=32, te_layers=2, te_heads=4, te_inter=64, groups=8)
TINY_SDXL = Sizes(unet_channels=(32, 64), unet_layers=1, unet_heads=8, transformer_layers=1,
                  vae_channels=(16, 16, 32, 32), vae_layers=1, vae_groups=8,
                  te_hidden=32, te_layers=2, te_heads=4, te_inter=64,
                  te2_hidden=32, te2_layers=2, te2_heads=4, te2_inter=64, time_embed_dim=8, groups=8)
FULL_SD = Sizes(unet_channels=(320, 640, 1280, 1280), unet_layers=2, unet_heads=8, transformer_layers=1,
                vae_channels=(128, 256, 512, 512), vae_layers=2, vae_groups=32,
                te_hidden=768, te_layers=12, te_heads=12, te_inter=3072)
FULL_SDXL = Sizes(unet_channels=(320, 640, 1280), unet_layers=2, unet_heads=(5, 10, 20),
                  transformer_layers=(1, 2, 10), vae_channels=(128, 256, 512, 512), vae_layers=2,
                  vae_groups=32, te_hidden=768, te_layers=12, te_heads=12, te_inter=3072,
                  te2_hidden=1280, te2_layers=32, te2_heads=20, te2_inter=5120, time_embed_dim=256)


def _vae(s: Sizes):
    from diffusers import AutoencoderKL

    n = len(s.vae_channels)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                         down_block_types=("DownEncoderBlock2D",) * n,
                         up_block_types=("UpDecoderBlock2D",) * n,
                         block_out_channels=s.vae_channels, layers_per_block=s.vae_layers,
                         norm_num_groups=s.vae_groups, sample_size=512)


def _scheduler():
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                  beta_schedule="scaled_linear", timestep_spacing="leading",
                                  steps_offset=1)


def _sd_unet(s: Sizes, cross_dim: int):
    from diffusers import UNet2DConditionModel

    n = len(s.unet_channels)
    if n == 2:  # tiny: attention on the coarser level only; at 64x64 latents it would cost 6x more
        down = ("DownBlock2D", "CrossAttnDownBlock2D")
        up = ("CrossAttnUpBlock2D", "UpBlock2D")
    else:
        down = ("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",)
        up = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1)
    return UNet2DConditionModel(sample_size=64, in_channels=4, out_channels=4,
                                down_block_types=down, up_block_types=up,
                                block_out_channels=s.unet_channels, layers_per_block=s.unet_layers,
                                cross_attention_dim=cross_dim, attention_head_dim=s.unet_heads,
                                norm_num_groups=s.groups)


def _sdxl_unet(s: Sizes, cross_dim: int, pooled_dim: int):
    from diffusers import UNet2DConditionModel

    n = len(s.unet_channels)
    down = ("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n - 1)
    up = ("CrossAttnUpBlock2D",) * (n - 1) + ("UpBlock2D",)
    if n == 2:  # tiny: keep attention on the coarser level, as SDXL does
        down, up = ("DownBlock2D", "CrossAttnDownBlock2D"), ("CrossAttnUpBlock2D", "UpBlock2D")
    return UNet2DConditionModel(sample_size=128, in_channels=4, out_channels=4,
                                down_block_types=down, up_block_types=up,
                                block_out_channels=s.unet_channels, layers_per_block=s.unet_layers,
                                cross_attention_dim=cross_dim, attention_head_dim=s.unet_heads,
                                transformer_layers_per_block=s.transformer_layers,
                                use_linear_projection=True, addition_embed_type="text_time",
                                addition_time_embed_dim=s.time_embed_dim,
                                projection_class_embeddings_input_dim=6 * s.time_embed_dim + pooled_dim,
                                norm_num_groups=s.groups)


def build_sd(seed: int = DEFAULT_SEED, full_size: bool = False):
    """An SD 1.x-shaped StableDiffusionPipeline with deterministic random weights."""
    from diffusers import StableDiffusionPipeline

    s = FULL_SD if full_size else TINY_SD
    tok = make_tokenizer()
    seeded(seed, 1)
    te = clip_text_encoder(s.te_hidden, s.te_layers, s.te_heads, s.te_inter, len(tok), False, s.te_hidden)
    seeded(seed, 2)
    unet = _sd_unet(s, s.te_hidden)
    seeded(seed, 3)
    vae = _vae(s)
    return StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet,
                                   scheduler=_scheduler(), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)


def build_sdxl(seed: int = DEFAULT_SEED, full_size: bool = False):
    """An SDXL-shaped pipeline: two text encoders (the second with projection), text_time embeddings."""
    from diffusers import StableDiffusionXLPipeline

    s = FULL_SDXL if full_size else TINY_SDXL
    tok, tok2 = make_tokenizer(), make_tokenizer()
    seeded(seed, 11)
    te = clip_text_encoder(s.te_hidden, s.te_layers, s.te_heads, s.te_inter, len(tok), False, s.te_hidden)
    seeded(seed, 12)
    te2 = clip_text_encoder(s.te2_hidden, s.te2_layers, s.te2_heads, s.te2_inter, len(tok2), True, s.te2_hidden)
    seeded(seed, 13)
    unet = _sdxl_unet(s, s.te_hidden + s.te2_hidden, s.te2_hidden)
    seeded(seed, 14)
    vae = _vae(s)
    return StableDiffusionXLPipeline(vae=vae, text_encoder=te, text_encoder_2=te2, tokenizer=tok,
                                     tokenizer_2=tok2, unet=unet, scheduler=_scheduler(),
                                     force_zeros_for_empty_prompt=False)


def build_controlnet(unet, seed: int = DEFAULT_SEED):
    """A ControlNet matching ``unet``, its zero-initialised output layers randomised."""
    from diffusers import ControlNetModel

    seeded(seed, 21)
    cn = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32, 64, 128)
                                   if unet.config.block_out_channels[0] < 320 else (16, 32, 96, 256))
    with torch.no_grad():
        for name, p in cn.named_parameters():
            if name.startswith(("controlnet_down_blocks", "controlnet_mid_block",
                                "controlnet_cond_embedding.conv_out")):
                p.normal_(0.0, 0.2)
    return cn


def build_lora(pipe, seed: int = DEFAULT_SEED, rank: int = 4) -> dict[str, torch.Tensor]:
    """A kohya/A1111-style LoRA state dict for ``pipe`` (UNet attention and text-encoder attention)."""
    gen = torch.Generator("cpu").manual_seed(seed * 1000 + 31)
    out: dict[str, torch.Tensor] = {}
    unet_kinds = ("to_q", "to_k", "to_v", "to_out.0")
    te_kinds = ("q_proj", "k_proj", "v_proj", "out_proj")
    for name, sub in pipe.unet.named_modules():
        if isinstance(sub, torch.nn.Linear) and (name.endswith(".to_out.0") or name.rsplit(".", 1)[-1] in unet_kinds):
            out.update(linear_lora_tensors("lora_unet_" + name.replace(".", "_"), sub, rank, rank, gen, 0.3))
    encoders = [("lora_te_", pipe.text_encoder)]
    if getattr(pipe, "text_encoder_2", None) is not None:
        encoders = [("lora_te1_", pipe.text_encoder), ("lora_te2_", pipe.text_encoder_2)]
    for prefix, te in encoders:
        # kohya names always start text_model_, whether or not transformers nests a text_model
        for dotted, sub in linears(te, te_kinds):
            name = dotted.replace(".", "_")
            kohya = name if name.startswith("text_model_") else "text_model_" + name
            out.update(linear_lora_tensors(prefix + kohya, sub, rank, rank, gen, 0.3))
    return out


def write_config_folder(pipe, folder: Path) -> None:
    """Save ``pipe``'s JSON configs, tokenizers and scheduler, no weights: what single-file loading needs."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, comp in pipe.components.items():
        if comp is None:
            continue
        sub = folder / name
        sub.mkdir(exist_ok=True)
        if hasattr(comp, "save_config") and not hasattr(comp, "save_pretrained"):
            comp.save_config(sub)  # scheduler
        elif hasattr(comp, "save_vocabulary"):
            comp.save_pretrained(sub)  # tokenizer
        elif hasattr(comp, "config") and hasattr(comp.config, "to_json_file"):
            comp.config.to_json_file(sub / "config.json")  # transformers model
        else:
            comp.save_config(sub)  # diffusers model
    model_index = {"_class_name": type(pipe).__name__, "_diffusers_version": _diffusers_version()}
    for name, comp in pipe.components.items():
        lib = "transformers" if type(comp).__module__.startswith("transformers") else "diffusers"
        model_index[name] = [None, None] if comp is None else [lib, type(comp).__name__]
    model_index["requires_safety_checker"] = False
    (folder / "model_index.json").write_text(json.dumps(model_index, indent=2, sort_keys=True) + "\n")


def _diffusers_version() -> str:
    import diffusers

    return diffusers.__version__


Progress = Callable[[str], None]


def build_default_models(out_dir: str | Path, seed: int = DEFAULT_SEED, full_size: bool = False,
                         progress: Progress | None = None) -> dict[str, Path]:
    """Write every default model into ``out_dir`` and return their paths by name.

    Args:
        out_dir: destination folder; existing entries are replaced.
        seed: the same seed gives byte-identical files.
        full_size: SD 1.5- and SDXL-shaped weights (fp16 files) instead of tiny ones, then the tiny
            models that have a full-size form (``TinyModel.full_build``: FLUX.1-dev, Qwen-Image; bf16).
        progress: called with a label before each part is built (and, for a full-size model, with
            ``"<name> model (full size): <component> <shard>/<shards>"`` as its weights are written).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tick = progress or (lambda label: None)
    dtype = torch.float16 if full_size else torch.float32
    variant_kwargs = {"safe_serialization": True}

    tick("SD pipeline")
    sd = build_sd(seed, full_size)
    replace_path(out / SD_DIR)
    _to(sd, dtype).save_pretrained(out / SD_DIR, **variant_kwargs)

    tick("SDXL pipeline")
    sdxl = build_sdxl(seed, full_size)
    replace_path(out / SDXL_DIR)
    _to(sdxl, dtype).save_pretrained(out / SDXL_DIR, **variant_kwargs)
    sdxl_lora = build_lora(sdxl, seed)
    del sdxl

    tick("ControlNet")
    cn = build_controlnet(sd.unet, seed)
    replace_path(out / CONTROLNET_DIR)
    _to(cn, dtype).save_pretrained(out / CONTROLNET_DIR, **variant_kwargs)
    del cn

    tick("LoRA files")
    (out / "loras").mkdir(exist_ok=True)
    save_file(_cast(build_lora(sd, seed), dtype), str(out / SD_LORA))
    save_file(_cast(sdxl_lora, dtype), str(out / SDXL_LORA))

    tick("single-file checkpoint")
    (out / "single").mkdir(exist_ok=True)
    save_file(_cast(diffusers_to_ldm(sd), dtype), str(out / SD_SINGLE_FILE))
    replace_path(out / SD_SINGLE_CONFIG)
    write_config_folder(sd, out / SD_SINGLE_CONFIG)
    del sd  # (GBs at full size) before the full-size Flux and Qwen-Image are written

    paths = {"sd": out / SD_DIR, "sdxl": out / SDXL_DIR, "controlnet": out / CONTROLNET_DIR,
             "sd_lora": out / SD_LORA, "sdxl_lora": out / SDXL_LORA,
             "sd_single_file": out / SD_SINGLE_FILE, "sd_single_config": out / SD_SINGLE_CONFIG}
    for model in TINY_MODELS:
        if not full_size:
            tick(f"{model.name} model")
            paths[model.name] = model.build(out, seed)
        elif model.full_build is not None:
            label = f"{model.name} model (full size)"
            tick(label)
            paths[model.name] = model.full_build(out, seed, lambda detail, label=label: tick(f"{label}: {detail}"))
    return paths


#: the models ``build_missing_models`` adds to a folder built before they existed: name -> (folder, builder)
LATER_MODELS: dict[str, tuple[str, Callable[[Path, int], Path]]] = {m.name: (m.folder, m.build) for m in TINY_MODELS}


def build_missing_models(out_dir: str | Path, seed: int = DEFAULT_SEED,
                         progress: Progress | None = None) -> dict[str, Path]:
    """Build the models added after ``out_dir`` was first built: those missing a file their build
    writes (the folder's model_index.json, or a LoRA or ControlNet beside it, ``TinyModel.extras``).

    ``build_default_models`` writes everything; a checkout whose models are already built (its
    ``.complete`` marker exists) calls this instead, so a new model never rebuilds the others.

    Returns:
        The paths of the models built now, by name (empty when nothing was missing).
    """
    out = Path(out_dir)
    tick = progress or (lambda label: None)
    built: dict[str, Path] = {}
    for model in TINY_MODELS:
        if model.missing(out):
            tick(f"{model.name} model")
            built[model.name] = model.build(out, seed)
    return built


def _to(model, dtype: torch.dtype):
    return model if dtype == torch.float32 else model.to(dtype)


def _cast(sd: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {k: v.to(dtype).contiguous() for k, v in sd.items()}
