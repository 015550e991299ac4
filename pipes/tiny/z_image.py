"""The tiny Z-Image-shaped model: a ZImagePipeline with a 2-layer single-stream transformer, a Qwen3
text encoder whose byte-level BPE tokenizer (with Qwen3's chat tokens and template) is made in code,
and Flux.1's 16-channel VAE shape; beside it a LoRA file and a ZImageControlNetModel (about 1 MB).

Nothing is downloaded and every weight is a seeded random draw: the same seed writes byte-identical
files.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .common import DEFAULT_SEED, TinyModel, linear_lora_tensors, linears, replace_path, seeded
from .flux import FLUX_VAE_SCALE, FLUX_VAE_SHIFT, TINY_FLUX

Z_IMAGE_DIR = "tiny-z-image"
Z_IMAGE_CONTROLNET_DIR = "tiny-controlnet-z-image"
Z_IMAGE_LORA = "loras/tiny-z-image-lora.safetensors"

#: Qwen3's chat template reduced to what the Z-Image pipelines use (plain-text messages and the
#: generation prompt): ``<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n``, plus the
#: empty thinking block Qwen3 adds when ``enable_thinking`` is false
QWEN3_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}{{- '<think>\\n\\n</think>\\n\\n' -}}"
    "{%- endif -%}{%- endif -%}"
)
#: Qwen's special tokens the chat template and the padding use
QWEN_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


@dataclass(frozen=True)
class ZImageSizes:
    """Architecture sizes of a Z-Image-shaped model (the real one: 30 layers of dim 3840, 30 heads,
    2 refiner layers, Qwen3-4B's 2560-wide hidden states, Flux.1's 16-channel VAE)."""

    dim: int = 32
    layers: int = 2
    refiner_layers: int = 1
    heads: int = 2
    #: sums to the head size (dim / heads), as Z-Image's (32, 48, 48) sums to 128
    rope_axes: tuple[int, int, int] = (8, 4, 4)
    #: Z-Image's own RoPE table lengths (text positions, height and width in patches): no weights
    rope_lens: tuple[int, int, int] = (1536, 512, 512)
    control_layers: tuple[int, ...] = (0, 1)
    text_hidden: int = 32
    text_layers: int = 2
    text_heads: int = 2
    text_kv_heads: int = 1
    text_inter: int = 64


TINY_Z_IMAGE = ZImageSizes()


def make_qwen_tokenizer(chat_template: str = QWEN3_CHAT_TEMPLATE, max_length: int = 131072):
    """A Qwen2-style byte-level BPE tokenizer built in code: the 256 byte symbols (every text
    encodes, one token a byte), no merges, Qwen's ``<|endoftext|>`` (padding), ``<|im_start|>`` and
    ``<|im_end|>`` (end of text, as Qwen3's), and ``chat_template``; no download."""
    from transformers import Qwen2Tokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {symbol: i for i, symbol in enumerate(bytes_to_unicode().values())}
    for token in QWEN_SPECIAL_TOKENS:
        vocab[token] = len(vocab)
    return Qwen2Tokenizer(vocab=vocab, merges=[], eos_token="<|im_end|>", pad_token="<|endoftext|>",
                          extra_special_tokens=list(QWEN_SPECIAL_TOKENS[1:]), chat_template=chat_template,
                          model_max_length=max_length)


def qwen3_text_encoder(s: ZImageSizes, vocab_size: int, pad_token_id: int):
    """A tiny ``Qwen3Model`` (Z-Image reads the hidden states of its last-but-one layer)."""
    from transformers import Qwen3Config, Qwen3Model

    cfg = Qwen3Config(vocab_size=vocab_size, hidden_size=s.text_hidden, intermediate_size=s.text_inter,
                      num_hidden_layers=s.text_layers, num_attention_heads=s.text_heads,
                      num_key_value_heads=s.text_kv_heads, head_dim=s.text_hidden // s.text_heads,
                      max_position_embeddings=2048, pad_token_id=pad_token_id)
    return Qwen3Model(cfg).eval()


def flux_vae():
    """A tiny AutoencoderKL of Flux.1's shape (16 latent channels, factor 8, Flux.1's normalisation),
    which is Z-Image's VAE."""
    from diffusers import AutoencoderKL

    n = len(TINY_FLUX.vae_channels)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=TINY_FLUX.latent_channels,
                         down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
                         block_out_channels=TINY_FLUX.vae_channels, layers_per_block=1,
                         norm_num_groups=TINY_FLUX.vae_groups, sample_size=1024, use_quant_conv=False,
                         use_post_quant_conv=False, scaling_factor=FLUX_VAE_SCALE, shift_factor=FLUX_VAE_SHIFT)


def _randomise(module: torch.nn.Module, names: tuple[str, ...], std: float = 0.2) -> None:
    """Draw the parameters whose names contain one of ``names`` anew (zero-initialised ones, the pad
    tokens and the ControlNet's output projections, would otherwise do nothing)."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if any(n in name for n in names):
                p.normal_(0.0, std)


def build_z_image(seed: int = DEFAULT_SEED, s: ZImageSizes = TINY_Z_IMAGE):
    """A Z-Image-Turbo-shaped ZImagePipeline, tiny and random."""
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel

    tok = make_qwen_tokenizer()
    seeded(seed, 61)
    te = qwen3_text_encoder(s, len(tok), tok.pad_token_id)
    seeded(seed, 62)
    # 2x2 patches of the 16-channel latent (all_patch_size 2): sizes are multiples of 16 pixels
    transformer = ZImageTransformer2DModel(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=s.dim,
                                           n_layers=s.layers, n_refiner_layers=s.refiner_layers, n_heads=s.heads,
                                           n_kv_heads=s.heads, cap_feat_dim=s.text_hidden,
                                           axes_dims=list(s.rope_axes), axes_lens=list(s.rope_lens))
    _randomise(transformer, ("pad_token",))
    seeded(seed, 63)
    vae = flux_vae()
    # Z-Image-Turbo's scheduler config: a fixed shift of 3, no resolution-dependent shift
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)
    return ZImagePipeline(scheduler=scheduler, vae=vae, text_encoder=te, tokenizer=tok, transformer=transformer)


def build_z_image_controlnet(seed: int = DEFAULT_SEED, s: ZImageSizes = TINY_Z_IMAGE):
    """A tiny ZImageControlNetModel of the Z-Image-Turbo-Fun-Controlnet-Union (1.0) shape: control
    blocks at ``control_layers`` over the 16-channel latent of the control image. Its output
    projections start at zero in diffusers; here they are random so that it changes the image."""
    from diffusers import ZImageControlNetModel

    seeded(seed, 64)
    cn = ZImageControlNetModel(control_layers_places=list(s.control_layers), control_in_dim=16,
                               all_patch_size=(2,), all_f_patch_size=(1,), dim=s.dim,
                               n_refiner_layers=s.refiner_layers, n_heads=s.heads, n_kv_heads=s.heads)
    _randomise(cn, ("before_proj", "after_proj"))
    return cn


def build_z_image_lora(pipe, seed: int = DEFAULT_SEED, rank: int = 4) -> dict[str, torch.Tensor]:
    """A kohya-style LoRA of the transformer's attention and feed-forward layers
    (``lora_unet_layers_0_attention_to_q.lora_down.weight``, ``.alpha``), which diffusers' Z-Image
    LoRA loader converts."""
    gen = torch.Generator("cpu").manual_seed(seed * 1000 + 65)
    out: dict[str, torch.Tensor] = {}
    kinds = ("to_q", "to_k", "to_v", "to_out.0", "w1", "w2", "w3")
    for dotted, lin in linears(pipe.transformer.layers, kinds):
        out.update(linear_lora_tensors("lora_unet_layers_" + dotted.replace(".", "_"), lin, rank, rank, gen, 0.3))
    return out


def build_z_image_model(out_dir: str | Path, seed: int = DEFAULT_SEED) -> Path:
    """Write the tiny Z-Image model to ``out_dir/Z_IMAGE_DIR``, its ControlNet to
    ``out_dir/Z_IMAGE_CONTROLNET_DIR`` and its LoRA to ``out_dir/Z_IMAGE_LORA`` (replacing them)
    and return the model's path."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    path = out / Z_IMAGE_DIR
    pipe = build_z_image(seed)
    replace_path(path)
    pipe.save_pretrained(path, safe_serialization=True)
    replace_path(out / Z_IMAGE_CONTROLNET_DIR)
    build_z_image_controlnet(seed).save_pretrained(out / Z_IMAGE_CONTROLNET_DIR, safe_serialization=True)
    (out / Z_IMAGE_LORA).parent.mkdir(parents=True, exist_ok=True)
    save_file(build_z_image_lora(pipe, seed), str(out / Z_IMAGE_LORA))
    return path


MODEL = TinyModel("z_image", Z_IMAGE_DIR, build_z_image_model)
