"""Flux.1 transformer tensors: Black Forest Labs' single-file layout <-> diffusers' layout.

BFL's files (``flux1-dev.safetensors``, ``flux1-schnell.safetensors`` and the fine-tunes shared
in that form) name the transformer's tensors ``double_blocks.N.img_attn.qkv.weight``,
``single_blocks.N.linear1.weight``, ``img_in``, ``txt_in``, ... (ComfyUI saves them under
``model.diffusion_model.``); diffusers' ``FluxTransformer2DModel`` splits the fused projections
(``qkv``, ``linear1``) and swaps the final modulation's (shift, scale) halves.

The mapping is the one of diffusers' ``convert_flux_transformer_checkpoint_to_diffusers``
(``loaders/single_file_utils.py``), tensor for tensor, but the fused projections are split by the
checkpoint's own width (``img_in``'s output size) where diffusers' function takes Flux.1's 3072 as
a constant and so cannot read a Flux-shaped model of another width (the tiny test model).
:func:`to_diffusers` is what loading a single file uses; :func:`to_bfl` is its exact inverse, which
writes the tiny single-file model. Torch is only used through tensor methods.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .errors import PipeError

#: the prefix ComfyUI's Flux checkpoints put before BFL's names
COMFY_PREFIX = "model.diffusion_model."
LINEAR = (("weight", "weight"), ("bias", "bias"))
#: BFL's QK norms call their one tensor ``scale``, diffusers' RMSNorm ``weight``
NORM = (("scale", "weight"),)


@dataclass(frozen=True)
class Rule:
    """One BFL module and the diffusers module(s) its tensors become.

    Attributes:
        bfl: the BFL module name within its scope (``img_attn.qkv``).
        diffusers: the diffusers module names, several when BFL fuses them (q, k, v [, mlp]).
        suffixes: ``(BFL tensor suffix, diffusers tensor suffix)`` pairs.
        swap: the two halves of the tensor trade places (BFL's shift-scale, diffusers' scale-shift).
        optional: only some models have it (``guidance_in``: the guidance-distilled dev, not schnell).
    """

    bfl: str
    diffusers: tuple[str, ...]
    suffixes: tuple[tuple[str, str], ...] = LINEAR
    swap: bool = False
    optional: bool = False


TOP = (
    Rule("time_in.in_layer", ("time_text_embed.timestep_embedder.linear_1",)),
    Rule("time_in.out_layer", ("time_text_embed.timestep_embedder.linear_2",)),
    Rule("vector_in.in_layer", ("time_text_embed.text_embedder.linear_1",)),
    Rule("vector_in.out_layer", ("time_text_embed.text_embedder.linear_2",)),
    Rule("guidance_in.in_layer", ("time_text_embed.guidance_embedder.linear_1",), optional=True),
    Rule("guidance_in.out_layer", ("time_text_embed.guidance_embedder.linear_2",), optional=True),
    Rule("txt_in", ("context_embedder",)),
    Rule("img_in", ("x_embedder",)),
    Rule("final_layer.linear", ("proj_out",)),
    Rule("final_layer.adaLN_modulation.1", ("norm_out.linear",), swap=True),
)
DOUBLE = (
    Rule("img_mod.lin", ("norm1.linear",)),
    Rule("txt_mod.lin", ("norm1_context.linear",)),
    Rule("img_attn.qkv", ("attn.to_q", "attn.to_k", "attn.to_v")),
    Rule("txt_attn.qkv", ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")),
    Rule("img_attn.norm.query_norm", ("attn.norm_q",), NORM),
    Rule("img_attn.norm.key_norm", ("attn.norm_k",), NORM),
    Rule("txt_attn.norm.query_norm", ("attn.norm_added_q",), NORM),
    Rule("txt_attn.norm.key_norm", ("attn.norm_added_k",), NORM),
    Rule("img_mlp.0", ("ff.net.0.proj",)),
    Rule("img_mlp.2", ("ff.net.2",)),
    Rule("txt_mlp.0", ("ff_context.net.0.proj",)),
    Rule("txt_mlp.2", ("ff_context.net.2",)),
    Rule("img_attn.proj", ("attn.to_out.0",)),
    Rule("txt_attn.proj", ("attn.to_add_out",)),
)
SINGLE = (
    Rule("modulation.lin", ("norm.linear",)),
    Rule("linear1", ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")),
    Rule("norm.query_norm", ("attn.norm_q",), NORM),
    Rule("norm.key_norm", ("attn.norm_k",), NORM),
    Rule("linear2", ("proj_out",)),
)
#: ``(rules, BFL block prefix, diffusers block prefix)``; the top-level rules have no block
SCOPES = ((DOUBLE, "double_blocks", "transformer_blocks"), (SINGLE, "single_blocks", "single_transformer_blocks"))


def _swap_halves(tensor: Any) -> Any:
    """(a, b) -> (b, a) along the first axis: BFL's (shift, scale) is diffusers' (scale, shift), and back."""
    first, second = tensor.chunk(2, dim=0)
    return _cat([second, first])


def _cat(parts: list[Any]) -> Any:
    import torch

    return torch.cat(parts, dim=0).contiguous()


def _blocks(names: Any, prefix: str) -> int:
    """How many blocks ``prefix.N.`` the tensor names hold."""
    found = {int(n.split(".")[1]) for n in names if n.startswith(prefix + ".") and n.split(".")[1].isdigit()}
    return max(found) + 1 if found else 0


def _all_rules(names: Any, bfl_side: bool) -> list[tuple[Rule, str, str]]:
    """Every rule with its BFL and diffusers prefix, for the blocks the names hold."""
    out = [(rule, "", "") for rule in TOP]
    for rules, bfl, diffusers in SCOPES:
        for i in range(_blocks(names, bfl if bfl_side else diffusers)):
            out += [(rule, f"{bfl}.{i}.", f"{diffusers}.{i}.") for rule in rules]
    return out


def to_diffusers(checkpoint: Mapping[str, Any]) -> dict[str, Any]:
    """A BFL-layout Flux.1 transformer state dict in diffusers' ``FluxTransformer2DModel`` layout.

    Tensors of other models in the same file (a ComfyUI file's VAE or text encoders) are left out,
    as diffusers' conversion leaves them out.

    Raises:
        PipeError: the checkpoint lacks tensors of a Flux.1 transformer (another model, or cut short).
    """
    state = {(k[len(COMFY_PREFIX):] if k.startswith(COMFY_PREFIX) else k): v for k, v in checkpoint.items()}
    if "img_in.weight" not in state:
        raise PipeError("the checkpoint has no Flux.1 transformer tensors (img_in.weight); allowed: a Flux.1 "
                        "transformer file in Black Forest Labs' layout", "model_id")
    width = int(state["img_in.weight"].shape[0])  # the hidden size: q, k and v are this wide each
    out: dict[str, Any] = {}
    missing: list[str] = []
    for rule, bfl_prefix, diffusers_prefix in _all_rules(state, bfl_side=True):
        for bfl_suffix, diffusers_suffix in rule.suffixes:
            name = f"{bfl_prefix}{rule.bfl}.{bfl_suffix}"
            if name not in state:
                if not rule.optional:
                    missing.append(name)
                continue
            tensor = state[name]
            if rule.swap:
                parts = [_swap_halves(tensor)]
            elif len(rule.diffusers) == 3:
                parts = list(tensor.chunk(3, dim=0))
            elif len(rule.diffusers) == 4:  # q, k, v and the MLP's input projection, fused
                parts = list(tensor.split([width, width, width, tensor.shape[0] - 3 * width], dim=0))
            else:
                parts = [tensor]
            for module, part in zip(rule.diffusers, parts):
                out[f"{diffusers_prefix}{module}.{diffusers_suffix}"] = part
    if missing:
        shown = ", ".join(missing[:6]) + (" ..." if len(missing) > 6 else "")
        raise PipeError(f"the checkpoint lacks {len(missing)} tensors of a Flux.1 transformer: {shown}; allowed: a "
                        "complete Flux.1 transformer in Black Forest Labs' layout", "model_id")
    return out


def to_bfl(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """A diffusers ``FluxTransformer2DModel`` state dict in BFL's single-file layout (the inverse of
    :func:`to_diffusers`; fused projections concatenated in q, k, v [, mlp] order)."""
    out: dict[str, Any] = {}
    for rule, bfl_prefix, diffusers_prefix in _all_rules(state_dict, bfl_side=False):
        for bfl_suffix, diffusers_suffix in rule.suffixes:
            names = [f"{diffusers_prefix}{module}.{diffusers_suffix}" for module in rule.diffusers]
            if rule.optional and names[0] not in state_dict:
                continue
            parts = [state_dict[n] for n in names]
            tensor = _cat(parts) if len(parts) > 1 else parts[0].contiguous()
            out[f"{bfl_prefix}{rule.bfl}.{bfl_suffix}"] = _swap_halves(tensor) if rule.swap else tensor
    return out
