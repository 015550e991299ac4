"""Diffusers -> original (LDM) key layout for SD 1.x checkpoints.

The inverse of diffusers' single-file conversion, written for any number of
blocks and layers so the tiny default model can be saved as the kind of
single ``.safetensors`` file people download (``model.diffusion_model.…``,
``first_stage_model.…``, ``cond_stage_model.transformer.text_model.…``).
"""
from __future__ import annotations

import torch

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."

_RESNET = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"),
           ("conv2", "out_layers.3"), ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection")]
_UNET_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
             "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}
_VAE_ATTN = [("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")]


def _resnet(rest: str) -> str:
    for old, new in _RESNET:
        if rest.startswith(old + "."):
            return new + rest[len(old):]
    return rest


def unet_key_to_ldm(key: str, layers_per_block: int, attn_up_blocks: set[int]) -> str:
    """Map one diffusers UNet key to its LDM name."""
    step = layers_per_block + 1
    parts = key.split(".")
    for n in (2, 1):
        head = ".".join(parts[:n])
        if head in _UNET_TOP:
            return _UNET_TOP[head] + "." + ".".join(parts[n:])
    if parts[0] == "down_blocks":
        b = int(parts[1])
        kind, j, rest = parts[2], int(parts[3]), ".".join(parts[4:])
        if kind == "resnets":
            return f"input_blocks.{1 + b * step + j}.0.{_resnet(rest)}"
        if kind == "attentions":
            return f"input_blocks.{1 + b * step + j}.1.{rest}"
        if kind == "downsamplers":  # downsamplers.0.conv.weight
            return f"input_blocks.{(b + 1) * step}.0.op.{parts[-1]}"
    if parts[0] == "mid_block":
        kind, j, rest = parts[1], int(parts[2]), ".".join(parts[3:])
        if kind == "resnets":
            return f"middle_block.{2 * j}.{_resnet(rest)}"
        return f"middle_block.1.{rest}"
    if parts[0] == "up_blocks":
        b = int(parts[1])
        kind, j, rest = parts[2], int(parts[3]), ".".join(parts[4:])
        if kind == "resnets":
            return f"output_blocks.{b * step + j}.0.{_resnet(rest)}"
        if kind == "attentions":
            return f"output_blocks.{b * step + j}.1.{rest}"
        if kind == "upsamplers":
            slot = 2 if b in attn_up_blocks else 1
            return f"output_blocks.{b * step + layers_per_block}.{slot}.conv.{parts[-1]}"
    raise KeyError(f"no LDM name for UNet key {key!r}")


def vae_key_to_ldm(key: str, n_blocks: int) -> str:
    """Map one diffusers AutoencoderKL key to its LDM name (without the prefix)."""
    parts = key.split(".")
    if parts[0] in ("quant_conv", "post_quant_conv"):
        return key
    coder, rest = parts[0], parts[1:]
    if rest[0] == "conv_norm_out":
        return f"{coder}.norm_out.{rest[-1]}"
    if rest[0] in ("conv_in", "conv_out"):
        return key
    if rest[0] in ("down_blocks", "up_blocks"):
        i = int(rest[1])
        name, idx = ("down", i) if rest[0] == "down_blocks" else ("up", n_blocks - 1 - i)
        if rest[2] == "resnets":
            tail = ".".join(rest[4:]).replace("conv_shortcut", "nin_shortcut")
            return f"{coder}.{name}.{idx}.block.{rest[3]}.{tail}"
        sample = "downsample" if name == "down" else "upsample"
        return f"{coder}.{name}.{idx}.{sample}.conv.{rest[-1]}"
    if rest[0] == "mid_block":
        if rest[1] == "resnets":
            tail = ".".join(rest[3:]).replace("conv_shortcut", "nin_shortcut")
            return f"{coder}.mid.block_{int(rest[2]) + 1}.{tail}"
        tail = ".".join(rest[3:])
        for old, new in _VAE_ATTN:
            if tail.startswith(old + "."):
                return f"{coder}.mid.attn_1.{new}{tail[len(old):]}"
    raise KeyError(f"no LDM name for VAE key {key!r}")


def diffusers_to_ldm(pipe) -> dict[str, torch.Tensor]:
    """The state dict of an SD 1.x pipeline in the original single-file layout."""
    out: dict[str, torch.Tensor] = {}
    cfg = pipe.unet.config
    attn_up = {i for i, t in enumerate(cfg.up_block_types) if "CrossAttn" in t}
    for k, v in pipe.unet.state_dict().items():
        out[UNET_PREFIX + unet_key_to_ldm(k, cfg.layers_per_block, attn_up)] = v
    n = len(pipe.vae.config.block_out_channels)
    for k, v in pipe.vae.state_dict().items():
        name = vae_key_to_ldm(k, n)
        if ".mid.attn_1." in name and name.endswith("weight") and v.ndim == 2:
            v = v[:, :, None, None]  # LDM stores the VAE attention projections as 1x1 convolutions
        out[VAE_PREFIX + name] = v
    for k, v in pipe.text_encoder.state_dict().items():
        if k.endswith("position_ids"):
            continue
        out[CLIP_PREFIX + (k if k.startswith("text_model.") else "text_model." + k)] = v
    return out
