"""Tiny IP-Adapters for tiny-sd and tiny-sdxl, and the tiny CLIP image encoder they read.

Written in the layouts real ones come in, so the same code loads both:

- ``ip-adapter/tiny-sd.safetensors``, ``ip-adapter/tiny-sdxl.safetensors``: h94/IP-Adapter's single
  file (``image_proj.*``: the projection of the image embedding to 4 extra cross-attention tokens;
  ``ip_adapter.<n>.to_k_ip/to_v_ip``: the key and value of those tokens in each cross-attention
  layer, numbered as diffusers' ``load_ip_adapter`` reads them), sized for each model's UNet (its
  cross-attention width and block channels, read from its config).
- ``ip-adapter/tiny-image-encoder/``: a ``CLIPVisionModelWithProjection`` folder (32 px, a few layers)
  with the ``preprocessor_config.json`` of its ``CLIPImageProcessor``.

Seeded random weights, as the other tiny models: the same seed writes the same files.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .common import DEFAULT_SEED, TinyModel, seeded

IP_ADAPTER_DIR = "ip-adapter"
IMAGE_ENCODER_DIR = f"{IP_ADAPTER_DIR}/tiny-image-encoder"
#: the adapter file of each tiny model: models folder of the model -> adapter file
ADAPTERS = {"tiny-sd": f"{IP_ADAPTER_DIR}/tiny-sd.safetensors", "tiny-sdxl": f"{IP_ADAPTER_DIR}/tiny-sdxl.safetensors"}
#: the image embedding's width (the encoder's ``projection_dim``, the adapters' input)
EMBED_DIM = 32
#: the encoder's input side in pixels (real ones: 224)
IMAGE_SIZE = 32
#: extra cross-attention tokens an IP-Adapter adds per image (h94's base adapters: 4)
TOKENS = 4


def build_image_encoder(out: Path, seed: int = DEFAULT_SEED) -> Path:
    """Write the tiny CLIP image encoder and its image processor config into ``out/IMAGE_ENCODER_DIR``."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    folder = Path(out) / IMAGE_ENCODER_DIR
    seeded(seed, 71)
    config = CLIPVisionConfig(hidden_size=32, intermediate_size=37, projection_dim=EMBED_DIM, num_hidden_layers=2,
                              num_attention_heads=4, image_size=IMAGE_SIZE, patch_size=4, num_channels=3)
    CLIPVisionModelWithProjection(config).eval().save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
                       ).save_pretrained(folder)
    return folder


def adapter_state_dict(unet_config: dict, seed: int, offset: int) -> dict[str, torch.Tensor]:
    """An IP-Adapter for a UNet of ``unet_config``, in h94's single-file names.

    Its cross-attention layers are numbered as diffusers numbers them (``_convert_ip_adapter_attn_to_diffusers``):
    every attention layer of the UNet in order counts, the self-attention ones (``attn1``) taking the
    even numbers, so the cross-attention ones are 1, 3, 5, ...
    """
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):  # only the layer names and sizes are read
        unet = UNet2DConditionModel.from_config(unet_config)
    cross = int(unet_config["cross_attention_dim"])
    channels = list(unet_config["block_out_channels"])
    seeded(seed, offset)
    out: dict[str, torch.Tensor] = {}
    key = 1
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"):
            continue
        if name.startswith("mid_block"):
            hidden = channels[-1]
        elif name.startswith("up_blocks"):
            hidden = channels[::-1][int(name[len("up_blocks.")])]
        else:
            hidden = channels[int(name[len("down_blocks.")])]
        out[f"ip_adapter.{key}.to_k_ip.weight"] = torch.randn(hidden, cross) * cross ** -0.5
        out[f"ip_adapter.{key}.to_v_ip.weight"] = torch.randn(hidden, cross) * cross ** -0.5
        key += 2
    out["image_proj.proj.weight"] = torch.randn(TOKENS * cross, EMBED_DIM) * EMBED_DIM ** -0.5
    out["image_proj.proj.bias"] = torch.zeros(TOKENS * cross)
    out["image_proj.norm.weight"] = torch.ones(cross)
    out["image_proj.norm.bias"] = torch.zeros(cross)
    return {k: v.contiguous() for k, v in out.items()}


def build_ip_adapters(out: str | Path, seed: int = DEFAULT_SEED) -> Path:
    """Write the image encoder and an IP-Adapter for each tiny SD/SDXL model built in ``out`` already."""
    from safetensors.torch import save_file

    out = Path(out)
    build_image_encoder(out, seed)
    for i, (model, file) in enumerate(sorted(ADAPTERS.items())):
        unet_config = out / model / "unet" / "config.json"
        if not unet_config.is_file():  # its model is not built (yet): its adapter waits for the next build
            continue
        config = json.loads(unet_config.read_text())
        save_file(adapter_state_dict(config, seed, 72 + i), str(out / file), metadata={"format": "pt"})
    return out / IP_ADAPTER_DIR


class _Files(TinyModel):
    """A TinyModel of plain files (no diffusers folder): complete when its ``extras`` are all there."""

    def written(self) -> tuple[str, ...]:
        return self.extras


MODEL = _Files("ip_adapter", IP_ADAPTER_DIR, build_ip_adapters,
               extras=(*ADAPTERS.values(), f"{IMAGE_ENCODER_DIR}/config.json",
                       f"{IMAGE_ENCODER_DIR}/preprocessor_config.json"))
