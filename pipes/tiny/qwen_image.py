"""The tiny Qwen-Image-shaped models: a QwenImagePipeline (a Qwen2.5-VL text encoder with a byte-level
tokenizer made in code, a 16-channel Wan-2.1-style VAE with the real factor 8, a 2-block MMDiT), and
beside it a LoRA for it, a QwenImageControlNetModel and a Qwen-Image-Edit folder with its processor
(under 4 MB in all, seconds to build).

Nothing is downloaded: the tokenizer is the 256 byte symbols, the special tokens Qwen-Image's prompt
templates use and merges that keep the templates' words whole (so that the pipelines drop exactly the
system prompt, as with Qwen's own tokenizer); every weight is a seeded random draw, so the same seed
writes byte-identical files. The main folder is written last and moved into place whole, so its
model_index.json exists only once everything beside it is written.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .common import (DEFAULT_SEED, FULL_SHARD_SIZE, Progress, TinyModel, filler_tokens, linears, replace_path, seeded,
                     write_meta_pipeline)

QWEN_IMAGE_DIR = "tiny-qwen-image"
QWEN_IMAGE_EDIT_DIR = "tiny-qwen-image-edit"
QWEN_IMAGE_CONTROLNET_DIR = "tiny-controlnet-qwen-image"
QWEN_IMAGE_LORA = "loras/tiny-qwen-image-lora.safetensors"
#: the special tokens of Qwen2.5-VL that Qwen-Image's prompt templates (and its edit template's image
#: placeholder) use, in Qwen's own order after ``<|endoftext|>``
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")
#: the system prompts of diffusers' QwenImagePipeline and QwenImageEditPipeline (``prompt_template_encode``
#: up to the user's text): the tokenizer holds their words whole, so that the templates' first 34 and 64
#: tokens are these system prompts, as with Qwen's own tokenizer (the pipelines drop that many)
TEMPLATE_PREFIXES = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, spatial "
    "relationships of the objects and background:<|im_end|>\n<|im_start|>user\n",
    "<|im_start|>system\nDescribe the key features of the input image (color, shape, size, texture, objects, "
    "background), then explain how the user's text instruction should alter or modify the image. Generate a new "
    "image that meets the user's requirements while maintaining consistency with the original input where "
    "appropriate.<|im_end|>\n<|im_start|>user\n")
#: Qwen-Image's scheduler config (its scheduler/scheduler_config.json): exponential time shift
#: between 0.5 and 0.9 over 256 to 8192 image tokens, stretched to end at sigma 0.02
QWEN_SCHEDULER = {"num_train_timesteps": 1000, "shift": 1.0, "use_dynamic_shifting": True, "base_shift": 0.5,
                  "max_shift": 0.9, "base_image_seq_len": 256, "max_image_seq_len": 8192, "shift_terminal": 0.02,
                  "time_shift_type": "exponential"}


@dataclass(frozen=True)
class QwenImageSizes:
    """Architecture sizes of a Qwen-Image-shaped model (the real one: 60 MMDiT blocks of 24 heads of 128,
    Qwen2.5-VL-7B with 3584 hidden, a VAE of base width 96; the same latent channels and VAE factor)."""

    heads: int = 2
    head_dim: int = 16
    rope_axes: tuple[int, int, int] = (8, 4, 4)  # sums to head_dim, as Qwen-Image's (16, 56, 56) sums to 128
    layers: int = 2
    latent_channels: int = 16
    vae_base: int = 4
    vae_mult: tuple[int, ...] = (1, 2, 4, 4)  # four levels: the real VAE factor 8
    text_hidden: int = 32
    text_layers: int = 2
    text_heads: int = 2
    text_inter: int = 64
    mrope: tuple[int, int, int] = (2, 3, 3)  # half the text head dim, as Qwen2.5-VL's (16, 24, 24)
    vision_hidden: int = 32
    vision_depth: int = 2
    vision_heads: int = 2
    vision_inter: int = 64
    #: the processor's image size bounds in pixels (28x28 per merged vision token): 4 to 16 tokens
    min_pixels: int = 28 * 28 * 4
    max_pixels: int = 28 * 28 * 16
    vae_res_blocks: int = 1
    text_kv_heads: int | None = None  # None: as many as text_heads
    text_max_positions: int = 4096
    text_rms_eps: float = 1e-5
    vision_fullatt: tuple[int, ...] = ()  # the vision blocks with full attention; (): the last one
    vision_tokens_per_second: int = 4
    #: the text encoder's vocabulary size: None is the tokenizer made in code's own length, a number pads
    #: the tokenizer to it (``common.filler_tokens``) so that the embedding has the real model's size
    text_vocab: int | None = None


TINY_QWEN_IMAGE = QwenImageSizes()
#: Qwen-Image's real sizes (``models init --full-size``): transformer/config.json of Qwen/Qwen-Image (60
#: layers, 24 heads of 128, joint_attention_dim 3584, in_channels 64, out_channels 16, patch_size 2,
#: axes_dims_rope (16, 56, 56)); its vae/config.json (base_dim 96, z_dim 16, dim_mult (1, 2, 4, 4),
#: num_res_blocks 2); its text_encoder/config.json, Qwen2.5-VL-7B-Instruct's (text: hidden 3584,
#: intermediate 18944, 28 layers, 28 heads, 4 KV heads, vocab 152064, max_position_embeddings 128000,
#: rms_norm_eps 1e-6, mrope_section (16, 24, 24); vision: depth 32, hidden 1280, intermediate 3420,
#: 16 heads, fullatt_block_indexes (7, 15, 23, 31), tokens_per_second 2, out_hidden_size 3584)
FULL_QWEN_IMAGE = QwenImageSizes(heads=24, head_dim=128, rope_axes=(16, 56, 56), layers=60, latent_channels=16,
                                 vae_base=96, vae_mult=(1, 2, 4, 4), vae_res_blocks=2, text_hidden=3584,
                                 text_layers=28, text_heads=28, text_kv_heads=4, text_inter=18944, text_vocab=152064,
                                 text_max_positions=128000, text_rms_eps=1e-6, mrope=(16, 24, 24), vision_hidden=1280,
                                 vision_depth=32, vision_heads=16, vision_inter=3420, vision_fullatt=(7, 15, 23, 31),
                                 vision_tokens_per_second=2)
#: the seed offsets of the Qwen-Image pipeline's models (the full-size writer draws each from its own)
QWEN_OFFSETS = {"text_encoder": 61, "transformer": 62, "vae": 63}


def template_words() -> list[str]:
    """The pre-tokens (Qwen2's split, in byte-level symbols) of the template prefixes, those after a
    space first: BPE then never merges a word's inner pair before its start (" user" stays whole
    although "user" is a word too)."""
    from tokenizers import Regex, pre_tokenizers
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    symbols = bytes_to_unicode()
    split = pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated")
    words: list[str] = []
    specials = "|".join(re.escape(token) for token in SPECIAL_TOKENS)
    for template in TEMPLATE_PREFIXES:
        for part in re.split(specials, template):
            for piece, _ in split.pre_tokenize_str(part):
                word = "".join(symbols[b] for b in piece.encode())
                if len(word) > 1 and word not in words:
                    words.append(word)
    return sorted(words, key=lambda w: not w.startswith(symbols[ord(" ")]))


def make_qwen_tokenizer(vocab_size: int | None = None):
    """A Qwen2 byte-level BPE tokenizer made in code: the 256 byte symbols, Qwen's special tokens, and
    merges that make each word of the prompt templates one token (other text is read byte by byte);
    ``vocab_size`` pads it with unused tokens at the end (``common.filler_tokens``)."""
    from transformers import Qwen2Tokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {symbol: i for i, symbol in enumerate(bytes_to_unicode().values())}
    for token in SPECIAL_TOKENS:
        vocab[token] = len(vocab)
    merges: list[tuple[str, str]] = []
    for word in template_words():
        for k in range(1, len(word)):
            if (word[:k], word[k]) not in merges:
                merges.append((word[:k], word[k]))
            vocab.setdefault(word[:k + 1], len(vocab))
    for filler in filler_tokens(len(vocab), vocab_size, "Qwen2"):
        vocab[filler] = len(vocab)
    return Qwen2Tokenizer(vocab=vocab, merges=merges, extra_special_tokens=list(SPECIAL_TOKENS[1:]),
                          model_max_length=32768)


def make_image_processor(s: QwenImageSizes = TINY_QWEN_IMAGE):
    """Qwen2-VL's image processor (the PIL one: transformers' default one needs torchvision) with small bounds."""
    from transformers import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(min_pixels=s.min_pixels, max_pixels=s.max_pixels)


def qwen_text_encoder(tok: Any, s: QwenImageSizes = TINY_QWEN_IMAGE):
    """A Qwen2.5-VL model (text and vision towers) whose vocabulary and special ids are ``tok``'s."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    ids = {name: tok.convert_tokens_to_ids(token) for name, token in (
        ("bos", "<|endoftext|>"), ("eos", "<|im_end|>"), ("image", "<|image_pad|>"), ("video", "<|video_pad|>"),
        ("start", "<|vision_start|>"), ("end", "<|vision_end|>"))}
    cfg = Qwen2_5_VLConfig(
        text_config={"vocab_size": len(tok), "hidden_size": s.text_hidden, "intermediate_size": s.text_inter,
                     "num_hidden_layers": s.text_layers, "num_attention_heads": s.text_heads,
                     "num_key_value_heads": s.text_kv_heads or s.text_heads,
                     "max_position_embeddings": s.text_max_positions, "rms_norm_eps": s.text_rms_eps,
                     "rope_scaling": {"mrope_section": list(s.mrope), "rope_type": "default", "type": "default"},
                     "rope_theta": 1000000.0, "bos_token_id": ids["bos"], "eos_token_id": ids["eos"],
                     "pad_token_id": ids["bos"]},
        vision_config={"depth": s.vision_depth, "hidden_size": s.vision_hidden, "intermediate_size": s.vision_inter,
                       "num_heads": s.vision_heads, "out_hidden_size": s.text_hidden,
                       "fullatt_block_indexes": list(s.vision_fullatt or (s.vision_depth - 1,)),
                       "tokens_per_second": s.vision_tokens_per_second},
        image_token_id=ids["image"], video_token_id=ids["video"], vision_start_token_id=ids["start"],
        vision_end_token_id=ids["end"])
    return Qwen2_5_VLForConditionalGeneration(cfg).eval()


def qwen_transformer(s: QwenImageSizes = TINY_QWEN_IMAGE):
    from diffusers import QwenImageTransformer2DModel

    # 2x2 patches of the 16-channel latent: 64 channels in, 16 out; not guidance-distilled (as Qwen-Image)
    return QwenImageTransformer2DModel(patch_size=2, in_channels=4 * s.latent_channels,
                                       out_channels=s.latent_channels, num_layers=s.layers,
                                       attention_head_dim=s.head_dim, num_attention_heads=s.heads,
                                       joint_attention_dim=s.text_hidden, guidance_embeds=False,
                                       axes_dims_rope=s.rope_axes)


def qwen_vae(s: QwenImageSizes = TINY_QWEN_IMAGE):
    from diffusers import AutoencoderKLQwenImage

    # Qwen-Image's latents_mean/latents_std (the class defaults) normalise the latents as the real model's
    return AutoencoderKLQwenImage(base_dim=s.vae_base, z_dim=s.latent_channels, dim_mult=list(s.vae_mult),
                                  num_res_blocks=s.vae_res_blocks, temperal_downsample=[False, True, True])


def qwen_models(seed: int, s: QwenImageSizes, tok: Any) -> dict[str, torch.nn.Module]:
    """The Qwen-Image pipeline's models (text encoder, transformer, VAE), each seeded with its
    ``QWEN_OFFSETS`` entry, built where torch builds by default (the meta device for the full-size writer)."""
    seeded(seed, QWEN_OFFSETS["text_encoder"])
    text_encoder = qwen_text_encoder(tok, s)
    seeded(seed, QWEN_OFFSETS["transformer"])
    transformer = qwen_transformer(s)
    seeded(seed, QWEN_OFFSETS["vae"])
    return {"text_encoder": text_encoder, "transformer": transformer, "vae": qwen_vae(s)}


def build_qwen_image(seed: int = DEFAULT_SEED, s: QwenImageSizes = TINY_QWEN_IMAGE):
    """A Qwen-Image-shaped QwenImagePipeline, tiny and random."""
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline

    tok = make_qwen_tokenizer(s.text_vocab)
    return QwenImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(**QWEN_SCHEDULER), tokenizer=tok,
                             **qwen_models(seed, s, tok))


def build_qwen_image_full(out_dir: str | Path, seed: int = DEFAULT_SEED, progress: Progress | None = None,
                          s: QwenImageSizes = FULL_QWEN_IMAGE, max_shard_size: int | str = FULL_SHARD_SIZE) -> Path:
    """Write a Qwen-Image-shaped QwenImagePipeline with random bf16 weights to ``out_dir/QWEN_IMAGE_DIR``
    (about 58 GB with ``FULL_QWEN_IMAGE``: transformer 40.9 GB, text encoder 16.6 GB) and return its path.

    The models are built on the meta device and written a shard at a time (``write_meta_pipeline``), so
    memory holds one shard, not the model. The tiny model's LoRA, ControlNet and edit model beside it
    (which no longer fit) are removed.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline

    tok = make_qwen_tokenizer(s.text_vocab)
    with torch.device("meta"):
        models = qwen_models(seed, s, tok)
    pipe = QwenImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(**QWEN_SCHEDULER), tokenizer=tok, **models)
    out = Path(out_dir)
    for stale in (QWEN_IMAGE_LORA, QWEN_IMAGE_CONTROLNET_DIR, QWEN_IMAGE_EDIT_DIR):
        replace_path(out / stale)
    return write_meta_pipeline(pipe, out / QWEN_IMAGE_DIR, seed, QWEN_OFFSETS, max_shard_size=max_shard_size,
                               progress=progress)


def build_qwen_controlnet(transformer: Any, seed: int = DEFAULT_SEED, s: QwenImageSizes = TINY_QWEN_IMAGE):
    """A QwenImageControlNetModel started from ``transformer`` (as ControlNets are trained), its
    zero-initialised output layers drawn at random so that it changes the image."""
    from diffusers import QwenImageControlNetModel

    controlnet = QwenImageControlNetModel.from_transformer(transformer, num_layers=s.layers,
                                                           attention_head_dim=s.head_dim, num_attention_heads=s.heads)
    gen = torch.Generator().manual_seed(seed * 1000 + 64)
    with torch.no_grad():
        for name, param in controlnet.named_parameters():
            if name.startswith(("controlnet_blocks.", "controlnet_x_embedder.")):
                param.copy_(torch.randn(param.shape, generator=gen) * 0.05)
    return controlnet


def build_qwen_lora(transformer: Any, seed: int = DEFAULT_SEED, rank: int = 4) -> dict[str, torch.Tensor]:
    """A LoRA on the attention projections of ``transformer``, in the layout ComfyUI and musubi-tuner
    write for Qwen-Image (``diffusion_model.<module>.lora_A/lora_B.weight``), which diffusers' Qwen-Image
    loader converts."""
    gen = torch.Generator().manual_seed(seed * 1000 + 65)
    out: dict[str, torch.Tensor] = {}
    for name, lin in linears(transformer, ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj")):
        out[f"diffusion_model.{name}.lora_A.weight"] = (torch.randn(rank, lin.in_features, generator=gen) * 0.3)
        out[f"diffusion_model.{name}.lora_B.weight"] = (torch.randn(lin.out_features, rank, generator=gen) * 0.3)
    return {k: v.contiguous() for k, v in out.items()}


def write_edit_model(pipe: Any, folder: Path, seed: int = DEFAULT_SEED, s: QwenImageSizes = TINY_QWEN_IMAGE) -> None:
    """Write a Qwen-Image-Edit-shaped folder: ``pipe``'s text encoder, tokenizer and VAE (as the real edit
    model shares Qwen-Image's), its own transformer, and the Qwen2-VL processor under ``processor/``.

    The folder is written as diffusers writes a QwenImageEditPipeline; the processor is written part by
    part (tokenizer and image processor) because transformers builds a Qwen2VLProcessor object only
    with torchvision installed, which this project does without.
    """
    from diffusers import QwenImagePipeline

    seeded(seed, 66)
    edit = QwenImagePipeline(scheduler=pipe.scheduler, vae=pipe.vae, text_encoder=pipe.text_encoder,
                             tokenizer=pipe.tokenizer, transformer=qwen_transformer(s))
    edit.save_pretrained(folder, safe_serialization=True)
    processor = folder / "processor"
    pipe.tokenizer.save_pretrained(processor)
    make_image_processor(s).save_pretrained(processor)
    config = {"processor_class": "Qwen2VLProcessor"}
    (processor / "processor_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    index_path = folder / "model_index.json"
    index = json.loads(index_path.read_text())
    index.update({"_class_name": "QwenImageEditPipeline", "processor": ["transformers", "Qwen2VLProcessor"]})
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def build_qwen_image_model(out_dir: str | Path, seed: int = DEFAULT_SEED) -> Path:
    """Write the tiny Qwen-Image model to ``out_dir/QWEN_IMAGE_DIR`` with its LoRA, ControlNet and edit
    model beside it (replacing them) and return its path."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    path = out / QWEN_IMAGE_DIR
    pipe = build_qwen_image(seed)
    (out / "loras").mkdir(parents=True, exist_ok=True)
    save_file(build_qwen_lora(pipe.transformer, seed), str(out / QWEN_IMAGE_LORA))
    replace_path(out / QWEN_IMAGE_CONTROLNET_DIR)
    build_qwen_controlnet(pipe.transformer, seed).save_pretrained(out / QWEN_IMAGE_CONTROLNET_DIR,
                                                                  safe_serialization=True)
    replace_path(out / QWEN_IMAGE_EDIT_DIR)
    write_edit_model(pipe, out / QWEN_IMAGE_EDIT_DIR, seed)
    partial = out / (QWEN_IMAGE_DIR + ".partial")
    replace_path(partial)
    pipe.save_pretrained(partial, safe_serialization=True)
    replace_path(path)
    partial.rename(path)
    return path


MODEL = TinyModel("qwen_image", QWEN_IMAGE_DIR, build_qwen_image_model,
                  extras=(QWEN_IMAGE_LORA, f"{QWEN_IMAGE_CONTROLNET_DIR}/config.json",
                          f"{QWEN_IMAGE_CONTROLNET_DIR}/diffusion_pytorch_model.safetensors",
                          f"{QWEN_IMAGE_EDIT_DIR}/model_index.json",
                          f"{QWEN_IMAGE_EDIT_DIR}/processor/preprocessor_config.json"),
                  full_build=build_qwen_image_full)
