"""The tiny Flux.1-dev-shaped model: a FluxPipeline with a 2-head transformer, CLIP and T5 encoders
whose tokenizers are made in code, and a 16-channel VAE (1.8 MB)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .common import DEFAULT_SEED, TinyModel, clip_text_encoder, make_t5_tokenizer, make_tokenizer, replace_path, seeded

FLUX_DIR = "tiny-flux"


@dataclass(frozen=True)
class FluxSizes:
    """Architecture sizes of a Flux.1-shaped model (the real one: 19 double and 38 single blocks,
    24 heads of 128, T5-XXL and CLIP-L text encoders, a 16-channel VAE)."""

    heads: int = 2
    head_dim: int = 16
    rope_axes: tuple[int, int, int] = (4, 4, 8)  # sums to head_dim, as Flux's (16, 56, 56) sums to 128
    double_layers: int = 1
    single_layers: int = 1
    latent_channels: int = 16
    vae_channels: tuple[int, ...] = (16, 16, 32, 32)
    vae_groups: int = 8
    clip_hidden: int = 32
    clip_layers: int = 2
    clip_heads: int = 4
    clip_inter: int = 64
    t5_hidden: int = 32
    t5_layers: int = 2
    t5_heads: int = 4
    t5_kv: int = 8
    t5_inter: int = 64


TINY_FLUX = FluxSizes()
#: Flux.1's VAE normalisation (its vae/config.json): latents = (z - shift) * scale
FLUX_VAE_SCALE = 0.3611
FLUX_VAE_SHIFT = 0.1159


def t5_encoder(s: FluxSizes, vocab_size: int):
    from transformers import T5Config, T5EncoderModel

    cfg = T5Config(vocab_size=vocab_size, d_model=s.t5_hidden, d_kv=s.t5_kv, d_ff=s.t5_inter,
                   num_layers=s.t5_layers, num_heads=s.t5_heads, relative_attention_num_buckets=8,
                   feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    return T5EncoderModel(cfg).eval()


def build_flux(seed: int = DEFAULT_SEED, s: FluxSizes = TINY_FLUX):
    """A Flux.1-dev-shaped FluxPipeline (guidance-distilled: ``guidance_embeds=True``), tiny and random."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    tok, tok2 = make_tokenizer(), make_t5_tokenizer()
    seeded(seed, 41)
    te = clip_text_encoder(s.clip_hidden, s.clip_layers, s.clip_heads, s.clip_inter, len(tok), False, s.clip_hidden)
    seeded(seed, 42)
    te2 = t5_encoder(s, len(tok2))
    seeded(seed, 43)
    # packed latents: 2x2 patches of the VAE latent, so the transformer sees 4x the latent channels
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=4 * s.latent_channels,
                                         num_layers=s.double_layers, num_single_layers=s.single_layers,
                                         attention_head_dim=s.head_dim, num_attention_heads=s.heads,
                                         joint_attention_dim=s.t5_hidden, pooled_projection_dim=s.clip_hidden,
                                         guidance_embeds=True, axes_dims_rope=s.rope_axes)
    seeded(seed, 44)
    n = len(s.vae_channels)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=s.latent_channels,
                        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
                        block_out_channels=s.vae_channels, layers_per_block=1, norm_num_groups=s.vae_groups,
                        sample_size=1024, use_quant_conv=False, use_post_quant_conv=False,
                        scaling_factor=FLUX_VAE_SCALE, shift_factor=FLUX_VAE_SHIFT)
    # Flux.1-dev's scheduler config: resolution-dependent shift of the sigmas
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                                base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                                                max_image_seq_len=4096)
    return FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=te, tokenizer=tok, text_encoder_2=te2,
                        tokenizer_2=tok2, transformer=transformer)


def build_flux_model(out_dir: str | Path, seed: int = DEFAULT_SEED) -> Path:
    """Write the tiny Flux model to ``out_dir/FLUX_DIR`` (replacing it) and return its path."""
    path = Path(out_dir) / FLUX_DIR
    replace_path(path)
    build_flux(seed).save_pretrained(path, safe_serialization=True)
    return path



MODEL = TinyModel("flux", FLUX_DIR, build_flux_model)
