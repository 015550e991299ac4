"""The tiny Flux.1 variants: ``tiny-flux-fill`` (a FluxFillPipeline, FLUX.1-Fill-dev's shape) and
``tiny-flux-kontext`` (a FluxKontextPipeline, FLUX.1-Kontext-dev's shape), each about 1.8 MB.

Both take tiny-flux's text encoders, tokenizers, VAE and scheduler from ``flux.build_flux`` (the real
variants share FLUX.1-dev's too) and a transformer of their own, drawn from its own seed offset with
tiny-flux's sizes (its config): Fill's reads 384 channels (the packed latents, the packed latents of
the masked image and the packed 8x8 mask) and writes the 64 of the packed latents; Kontext's has the
plain shape (it reads the input image's latents as more tokens). Built from the seed, never loaded
and saved again (a loaded pipeline records its own path): the same seed writes byte-identical files.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from .common import DEFAULT_SEED, TinyModel, replace_path, seeded
from .flux import build_flux

FLUX_FILL_DIR = "tiny-flux-fill"
FLUX_KONTEXT_DIR = "tiny-flux-kontext"
#: seed offsets of the variants' transformers (tiny-flux's parts use 41 to 46)
FILL_OFFSET = 47
KONTEXT_OFFSET = 48


def fill_in_channels(latent_channels: int, vae_factor: int) -> int:
    """The input channels FluxFillPipeline feeds its transformer: packed latents (4 x latent channels),
    packed masked-image latents (as many) and the mask as ``vae_factor ** 2`` channels packed 2x2."""
    return 4 * latent_channels + 4 * latent_channels + 4 * vae_factor * vae_factor


def variant_transformer(base: Any, seed: int, offset: int, **changes: Any) -> Any:
    """A FluxTransformer2DModel of ``base``'s transformer's sizes (its config) with ``changes``, its
    weights drawn anew from ``(seed, offset)``."""
    from diffusers import FluxTransformer2DModel

    config = {k: v for k, v in dict(base.transformer.config).items() if not k.startswith("_")}
    seeded(seed, offset)
    return FluxTransformer2DModel.from_config({**config, **changes}).eval()


def build_flux_fill(seed: int = DEFAULT_SEED) -> Any:
    """A FLUX.1-Fill-dev-shaped FluxFillPipeline, tiny and random (guidance-distilled, as Fill-dev)."""
    from diffusers import FluxFillPipeline

    base = build_flux(seed)
    latent = int(base.vae.config.latent_channels)
    transformer = variant_transformer(base, seed, FILL_OFFSET,
                                      in_channels=fill_in_channels(latent, int(base.vae_scale_factor)),
                                      out_channels=4 * latent)
    return FluxFillPipeline(scheduler=base.scheduler, vae=base.vae, text_encoder=base.text_encoder,
                            tokenizer=base.tokenizer, text_encoder_2=base.text_encoder_2,
                            tokenizer_2=base.tokenizer_2, transformer=transformer)


def build_flux_kontext(seed: int = DEFAULT_SEED) -> Any:
    """A FLUX.1-Kontext-dev-shaped FluxKontextPipeline, tiny and random (the plain transformer shape)."""
    from diffusers import FluxKontextPipeline

    base = build_flux(seed)
    transformer = variant_transformer(base, seed, KONTEXT_OFFSET)
    return FluxKontextPipeline(scheduler=base.scheduler, vae=base.vae, text_encoder=base.text_encoder,
                               tokenizer=base.tokenizer, text_encoder_2=base.text_encoder_2,
                               tokenizer_2=base.tokenizer_2, transformer=transformer)


def save_whole(pipe: Any, path: Path) -> Path:
    """``pipe`` saved to ``path`` (replacing it), written beside it and renamed so that a cut build leaves
    no folder with a model_index.json (``build_missing_models`` would take it for a complete one)."""
    partial = path.with_name(path.name + ".partial")
    replace_path(partial)
    pipe.save_pretrained(partial, safe_serialization=True)
    replace_path(path)
    partial.rename(path)
    return path


def build_flux_fill_model(out_dir: str | Path, seed: int = DEFAULT_SEED) -> Path:
    """Write ``tiny-flux-fill`` under ``out_dir`` (replacing it) and return its path."""
    return save_whole(build_flux_fill(seed), Path(out_dir) / FLUX_FILL_DIR)


def build_flux_kontext_model(out_dir: str | Path, seed: int = DEFAULT_SEED) -> Path:
    """Write ``tiny-flux-kontext`` under ``out_dir`` (replacing it) and return its path."""
    return save_whole(build_flux_kontext(seed), Path(out_dir) / FLUX_KONTEXT_DIR)


MODELS = (TinyModel("flux_fill", FLUX_FILL_DIR, build_flux_fill_model),
          TinyModel("flux_kontext", FLUX_KONTEXT_DIR, build_flux_kontext_model))
