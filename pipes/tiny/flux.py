"""The tiny Flux.1-dev-shaped model: a FluxPipeline with a 2-head transformer, CLIP and T5 encoders
whose tokenizers are made in code, and a 16-channel VAE (1.8 MB); beside it a kohya-format Flux LoRA
(BFL tensor names, as Flux LoRAs are shared) and an InstantX-style FluxControlNetModel matching its
transformer."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from .common import (DEFAULT_SEED, FULL_SHARD_SIZE, Progress, TinyModel, clip_text_encoder, linears,
                     make_t5_tokenizer, make_tokenizer, replace_path, seeded, write_meta_pipeline)

FLUX_DIR = "tiny-flux"
#: the tiny Flux LoRA and ControlNet, relative to the models folder (written with the model)
FLUX_LORA = "loras/tiny-flux-lora.safetensors"
FLUX_CONTROLNET_DIR = "tiny-controlnet-flux"


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
    t5_buckets: int = 8
    vae_layers: int = 1
    #: the text encoders' vocabulary sizes: None is the tokenizer made in code's own length, a number pads
    #: the tokenizer to it (``common.filler_tokens``) so that the embedding has the real model's size
    clip_vocab: int | None = None
    t5_vocab: int | None = None


TINY_FLUX = FluxSizes()
#: FLUX.1-dev's real sizes (``models init --full-size``): transformer/config.json of black-forest-labs/
#: FLUX.1-dev (19 double and 38 single blocks, 24 heads of 128, axes_dims_rope (16, 56, 56),
#: joint_attention_dim 4096, pooled_projection_dim 768, guidance_embeds, in_channels 64); its vae/config.json
#: (latent_channels 16, block_out_channels (128, 256, 512, 512), layers_per_block 2, norm_num_groups 32);
#: text_encoder/config.json, CLIP ViT-L/14's text model (hidden 768, 12 layers, 12 heads, intermediate
#: 3072, vocab 49408); text_encoder_2/config.json, T5 v1.1 XXL's encoder (d_model 4096, d_kv 64, d_ff
#: 10240, 24 layers, 64 heads, 32 relative-attention buckets, vocab 32128)
FULL_FLUX = FluxSizes(heads=24, head_dim=128, rope_axes=(16, 56, 56), double_layers=19, single_layers=38,
                      latent_channels=16, vae_channels=(128, 256, 512, 512), vae_groups=32, vae_layers=2,
                      clip_hidden=768, clip_layers=12, clip_heads=12, clip_inter=3072, clip_vocab=49408,
                      t5_hidden=4096, t5_layers=24, t5_heads=64, t5_kv=64, t5_inter=10240, t5_buckets=32,
                      t5_vocab=32128)
#: the seed offsets of the Flux pipeline's models (the full-size writer draws each from its own)
FLUX_OFFSETS = {"text_encoder": 41, "text_encoder_2": 42, "transformer": 43, "vae": 44}
#: Flux.1's VAE normalisation (its vae/config.json): latents = (z - shift) * scale
FLUX_VAE_SCALE = 0.3611
FLUX_VAE_SHIFT = 0.1159


def t5_encoder(s: FluxSizes, vocab_size: int):
    from transformers import T5Config, T5EncoderModel

    cfg = T5Config(vocab_size=vocab_size, d_model=s.t5_hidden, d_kv=s.t5_kv, d_ff=s.t5_inter,
                   num_layers=s.t5_layers, num_heads=s.t5_heads, relative_attention_num_buckets=s.t5_buckets,
                   feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    return T5EncoderModel(cfg).eval()


def flux_tokenizers(s: FluxSizes = TINY_FLUX) -> tuple[Any, Any]:
    """The CLIP and T5 tokenizers made in code, padded to ``s``'s vocabulary sizes where it sets them."""
    return make_tokenizer(s.clip_vocab), make_t5_tokenizer(vocab_size=s.t5_vocab)


def flux_models(seed: int, s: FluxSizes, clip_vocab: int, t5_vocab: int) -> dict[str, torch.nn.Module]:
    """The Flux pipeline's models (text encoders, transformer, VAE), each seeded with its ``FLUX_OFFSETS``
    entry, built where torch builds by default (the meta device for the full-size writer)."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel

    seeded(seed, FLUX_OFFSETS["text_encoder"])
    te = clip_text_encoder(s.clip_hidden, s.clip_layers, s.clip_heads, s.clip_inter, clip_vocab, False, s.clip_hidden)
    seeded(seed, FLUX_OFFSETS["text_encoder_2"])
    te2 = t5_encoder(s, t5_vocab)
    seeded(seed, FLUX_OFFSETS["transformer"])
    # packed latents: 2x2 patches of the VAE latent, so the transformer sees 4x the latent channels
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=4 * s.latent_channels,
                                         num_layers=s.double_layers, num_single_layers=s.single_layers,
                                         attention_head_dim=s.head_dim, num_attention_heads=s.heads,
                                         joint_attention_dim=s.t5_hidden, pooled_projection_dim=s.clip_hidden,
                                         guidance_embeds=True, axes_dims_rope=s.rope_axes)
    seeded(seed, FLUX_OFFSETS["vae"])
    n = len(s.vae_channels)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=s.latent_channels,
                        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
                        block_out_channels=s.vae_channels, layers_per_block=s.vae_layers, norm_num_groups=s.vae_groups,
                        sample_size=1024, use_quant_conv=False, use_post_quant_conv=False,
                        scaling_factor=FLUX_VAE_SCALE, shift_factor=FLUX_VAE_SHIFT)
    return {"text_encoder": te, "text_encoder_2": te2, "transformer": transformer, "vae": vae}


def flux_scheduler():
    """Flux.1-dev's scheduler config: resolution-dependent shift of the sigmas."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                           base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                                           max_image_seq_len=4096)


def build_flux(seed: int = DEFAULT_SEED, s: FluxSizes = TINY_FLUX):
    """A Flux.1-dev-shaped FluxPipeline (guidance-distilled: ``guidance_embeds=True``), tiny and random."""
    from diffusers import FluxPipeline

    tok, tok2 = flux_tokenizers(s)
    return FluxPipeline(scheduler=flux_scheduler(), tokenizer=tok, tokenizer_2=tok2,
                        **flux_models(seed, s, len(tok), len(tok2)))


def build_flux_full(out_dir: str | Path, seed: int = DEFAULT_SEED, progress: Progress | None = None,
                    s: FluxSizes = FULL_FLUX, max_shard_size: int | str = FULL_SHARD_SIZE) -> Path:
    """Write a FLUX.1-dev-shaped FluxPipeline with random bf16 weights to ``out_dir/FLUX_DIR`` (about
    33 GB with ``FULL_FLUX``: transformer 23.8 GB, T5 9.5 GB) and return its path.

    The models are built on the meta device and written a shard at a time (``write_meta_pipeline``), so
    memory holds one shard, not the model. The tiny model's LoRA and ControlNet beside it (which no
    longer fit its transformer) are removed.
    """
    from diffusers import FluxPipeline

    tok, tok2 = flux_tokenizers(s)
    with torch.device("meta"):
        models = flux_models(seed, s, len(tok), len(tok2))
    pipe = FluxPipeline(scheduler=flux_scheduler(), tokenizer=tok, tokenizer_2=tok2, **models)
    out = Path(out_dir)
    for stale in (FLUX_LORA, FLUX_CONTROLNET_DIR):
        replace_path(out / stale)
    return write_meta_pipeline(pipe, out / FLUX_DIR, seed, FLUX_OFFSETS, max_shard_size=max_shard_size,
                               progress=progress)


def _lora_pair(name: str, in_features: int, out_features: int, rank: int, gen: torch.Generator,
               scale: float) -> dict[str, torch.Tensor]:
    """kohya ``lora_down``/``lora_up``/``alpha`` tensors of one (possibly fused) linear layer."""
    down = torch.randn(rank, in_features, generator=gen) * scale
    up = torch.randn(out_features, rank, generator=gen) * scale
    return {f"{name}.lora_down.weight": down.contiguous(), f"{name}.lora_up.weight": up.contiguous(),
            f"{name}.alpha": torch.tensor(float(rank))}


def build_flux_lora(pipe, seed: int = DEFAULT_SEED, rank: int = 4, scale: float = 0.3) -> dict[str, torch.Tensor]:
    """A kohya (sd-scripts) Flux LoRA for ``pipe``, in BFL's layout as Flux LoRAs are published.

    BFL's double blocks fuse q, k and v (``img_attn_qkv``: 3 x inner outputs), which diffusers'
    ``_convert_kohya_flux_lora_to_diffusers`` splits into ``to_q``/``to_k``/``to_v``. Single blocks
    carry only ``linear2`` (``proj_out``): diffusers splits ``linear1`` with Flux.1's full-size widths
    hard-coded (3072, 12288), which a tiny transformer cannot have. The CLIP text encoder gets
    ``lora_te1_`` attention LoRAs (T5 takes none, as in diffusers' Flux loader).
    """
    gen = torch.Generator("cpu").manual_seed(seed * 1000 + 51)
    t = pipe.transformer
    inner = int(t.config.num_attention_heads) * int(t.config.attention_head_dim)
    out: dict[str, torch.Tensor] = {}
    for i, block in enumerate(t.transformer_blocks):
        ff_hidden = block.ff.net[2].in_features
        for side in ("img", "txt"):
            prefix = f"lora_unet_double_blocks_{i}_{side}"
            out.update(_lora_pair(f"{prefix}_attn_qkv", inner, 3 * inner, rank, gen, scale))
            out.update(_lora_pair(f"{prefix}_attn_proj", inner, inner, rank, gen, scale))
            out.update(_lora_pair(f"{prefix}_mlp_0", inner, ff_hidden, rank, gen, scale))
            out.update(_lora_pair(f"{prefix}_mlp_2", ff_hidden, inner, rank, gen, scale))
    for i, block in enumerate(t.single_transformer_blocks):
        out.update(_lora_pair(f"lora_unet_single_blocks_{i}_linear2", block.proj_out.in_features, inner, rank, gen,
                              scale))
    for dotted, lin in linears(pipe.text_encoder, ("q_proj", "k_proj", "v_proj", "out_proj")):
        # kohya names always start text_model_, whether or not transformers nests a text_model
        name = dotted.replace(".", "_")
        kohya = name if name.startswith("text_model_") else "text_model_" + name
        out.update(_lora_pair("lora_te1_" + kohya, lin.in_features, lin.out_features, rank, gen, scale))
    return out


def build_flux_controlnet(transformer, seed: int = DEFAULT_SEED, scale: float = 0.2):
    """An InstantX-style FluxControlNetModel (the condition image goes through the VAE) matching
    ``transformer``: one double and one single block, initialised from the transformer as diffusers'
    ``from_transformer`` does, its zero-initialised output layers randomised so it has an effect."""
    from diffusers import FluxControlNetModel

    c = transformer.config
    seeded(seed, 45)
    net = FluxControlNetModel(patch_size=c.patch_size, in_channels=c.in_channels, num_layers=1, num_single_layers=1,
                              attention_head_dim=c.attention_head_dim, num_attention_heads=c.num_attention_heads,
                              joint_attention_dim=c.joint_attention_dim, pooled_projection_dim=c.pooled_projection_dim,
                              guidance_embeds=c.guidance_embeds, axes_dims_rope=tuple(c.axes_dims_rope))
    for name in ("pos_embed", "time_text_embed", "context_embedder", "x_embedder"):
        getattr(net, name).load_state_dict(getattr(transformer, name).state_dict())
    net.transformer_blocks.load_state_dict(transformer.transformer_blocks[:1].state_dict())
    net.single_transformer_blocks.load_state_dict(transformer.single_transformer_blocks[:1].state_dict())
    gen = torch.Generator("cpu").manual_seed(seed * 1000 + 46)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.startswith(("controlnet_blocks", "controlnet_single_blocks", "controlnet_x_embedder")):
                p.copy_(torch.randn(p.shape, generator=gen) * scale)
    return net.eval()


def build_flux_model(out_dir: str | Path, seed: int = DEFAULT_SEED) -> Path:
    """Write the tiny Flux model to ``out_dir/FLUX_DIR``, its LoRA to ``FLUX_LORA`` and its ControlNet to
    ``FLUX_CONTROLNET_DIR`` (replacing them) and return the model's path."""
    out = Path(out_dir)
    path = out / FLUX_DIR
    pipe = build_flux(seed)
    replace_path(path)
    pipe.save_pretrained(path, safe_serialization=True)
    (out / FLUX_LORA).parent.mkdir(parents=True, exist_ok=True)
    save_file(build_flux_lora(pipe, seed), str(out / FLUX_LORA))
    replace_path(out / FLUX_CONTROLNET_DIR)
    build_flux_controlnet(pipe.transformer, seed).save_pretrained(out / FLUX_CONTROLNET_DIR, safe_serialization=True)
    return path


MODEL = TinyModel("flux", FLUX_DIR, build_flux_model,
                  extras=(FLUX_LORA, f"{FLUX_CONTROLNET_DIR}/config.json",
                          f"{FLUX_CONTROLNET_DIR}/diffusion_pytorch_model.safetensors"),
                  full_build=build_flux_full)
