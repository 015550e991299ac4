"""Prompt weighting for T5 and LLM text encoders: one token sequence, one weight per token.

CLIP encoders read 77-token chunks and their weighting lives in ``prompting.py``. T5 (Flux.1)
and LLM encoders read one sequence of up to ``max_sequence_length`` tokens; this module makes
that sequence from a prompt in A1111 syntax (``(word:1.3)``, ``[word]``, parsed by
``prompting.parse_prompt_attention``, the same parser as for CLIP):

1. each weighted fragment is tokenized on its own (no special tokens), the ids are
   concatenated, each id keeping its fragment's weight;
2. the tokenizer's own special tokens are put around them (T5: ``</s>`` after), the prompt
   tokens cut to fit ``max_sequence_length``, and the rest padded, as the pipelines'
   ``tokenizer(..., padding="max_length", truncation=True)`` lays them out;
3. the encoder runs once on that sequence, and each token's output embedding is multiplied by
   its weight (special and padding tokens keep 1.0).

A prompt without weights is one fragment, tokenized whole: its ids, and so its embeddings, are
exactly the ones the diffusers pipeline makes itself. ``BREAK`` ends a 75-token CLIP chunk; a
T5/LLM sequence has no chunks, so here it separates words and adds no token (as
``prompting.strip_weighting`` turns it into a space).

Why plain scaling, without A1111's restoring of the mean: A1111 rescales a CLIP chunk so that
its mean stays what it was, which moves every token of the 77, weighted or not. A T5 sequence
is up to 512 tokens, most of them padding the model attends to (Flux passes no attention mask),
and T5's last RMSNorm does not centre its output; restoring the mean would shift the padding
and the unweighted words by a factor that depends on the prompt's length. Scaling only the
weighted tokens' embeddings is what sd_embed does for Flux and keeps "weight 1.0 changes
nothing" exact.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .errors import InvalidValueError
from .prompting import BREAK_WEIGHT, parse_prompt_attention

#: ``(input_ids [1, n], attention_mask [1, n]) -> hidden states [1, n, dim]``: one encoder call
Encoder = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class WeightedTokens:
    """A prompt as the encoder reads it: ids, per-token weights and attention mask, padded.

    Attributes:
        ids: ``max_length`` token ids (special tokens and padding included).
        weights: one weight per id (1.0 for special and padding tokens).
        mask: 1 for the prompt's and the special tokens, 0 for padding.
        dropped: prompt tokens cut off because they did not fit in ``max_length``.
    """

    ids: tuple[int, ...]
    weights: tuple[float, ...]
    mask: tuple[int, ...]
    dropped: int = 0

    @property
    def weighted(self) -> bool:
        """Whether any token has a weight other than 1.0."""
        return any(w != 1.0 for w in self.weights)


def special_tokens(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The ids ``tokenizer`` puts before and after a text (T5: none and ``</s>``; CLIP: BOS and EOS).

    Found by tokenizing a probe with and without special tokens, so it works for any tokenizer
    without knowing its class.
    """
    probe = "a"
    plain = list(tokenizer(probe, add_special_tokens=False).input_ids)
    full = list(tokenizer(probe).input_ids)
    for start in range(len(full) - len(plain) + 1):
        if full[start:start + len(plain)] == plain:
            return full[:start], full[start + len(plain):]
    raise ValueError(f"{type(tokenizer).__name__} changes a text's own tokens when it adds its special tokens")


def _fragments(text: str, parse_weights: bool) -> list[tuple[str, float]]:
    if not parse_weights:
        return [(text, 1.0)]
    # BREAK markers are CLIP chunk boundaries: nothing to encode in one sequence
    return [(t, w) for t, w in parse_prompt_attention(text) if not (t == "BREAK" and w == BREAK_WEIGHT)]


def weighted_tokens(text: str, tokenizer: Any, max_length: int, *, parse_weights: bool = True) -> WeightedTokens:
    """Tokenize a prompt in A1111 syntax into ``max_length`` ids with their weights.

    Args:
        text: the prompt; weights such as ``(red:1.5)`` apply to that fragment's tokens.
        tokenizer: a Hugging Face tokenizer (T5, an LLM's).
        max_length: the sequence length the encoder reads (``max_sequence_length``).
        parse_weights: False reads the text literally (brackets are text), as the pipeline would.

    Returns:
        The padded sequence; ``dropped`` counts the prompt tokens that did not fit.

    Raises:
        InvalidValueError: ``max_length`` leaves no room for the tokenizer's special tokens.
    """
    prefix, suffix = special_tokens(tokenizer)
    room = int(max_length) - len(prefix) - len(suffix)
    if room < 0:
        raise InvalidValueError(f"max_sequence_length {max_length} is shorter than the {len(prefix) + len(suffix)} "
                                f"special tokens of the text encoder; allowed: at least {len(prefix) + len(suffix)}",
                                "max_sequence_length", f"at least {len(prefix) + len(suffix)}")
    ids: list[int] = []
    weights: list[float] = []
    for fragment, weight in _fragments(text, parse_weights):
        if not fragment:
            continue
        part = tokenizer(fragment, add_special_tokens=False, truncation=False, verbose=False).input_ids
        ids += [int(i) for i in part]
        weights += [float(weight)] * len(part)
    dropped = max(0, len(ids) - room)
    ids = prefix + ids[:room] + suffix
    weights = [1.0] * len(prefix) + weights[:room] + [1.0] * len(suffix)
    n_pad = int(max_length) - len(ids)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    pad, pad_weights, pad_mask = [int(pad_id)] * n_pad, [1.0] * n_pad, [0] * n_pad
    mask = [1] * len(ids)
    if getattr(tokenizer, "padding_side", "right") == "left":
        ids, weights, mask = pad + ids, pad_weights + weights, pad_mask + mask
    else:
        ids, weights, mask = ids + pad, weights + pad_weights, mask + pad_mask
    return WeightedTokens(tuple(ids), tuple(weights), tuple(mask), dropped)


def apply_weights(hidden: torch.Tensor, weights: Sequence[float]) -> torch.Tensor:
    """Each token's embedding of ``hidden`` (``[batch, tokens, dim]``) times its weight.

    Computed in float32 and cast back; without weights other than 1.0 the tensor is returned
    as it is, so an unweighted prompt keeps exactly the encoder's output.
    """
    if all(w == 1.0 for w in weights):
        return hidden
    w = torch.tensor(list(weights), dtype=torch.float32, device=hidden.device).reshape(1, -1, 1)
    return (hidden.float() * w).to(hidden.dtype)


def encode_weighted(text: str, tokenizer: Any, encode: Encoder, max_length: int, device: torch.device | str,
                    *, parse_weights: bool = True) -> tuple[torch.Tensor, WeightedTokens]:
    """Encode a weighted prompt with a T5/LLM encoder: one encoder run, then the per-token weights.

    Args:
        text: the prompt in A1111 syntax.
        tokenizer: the encoder's tokenizer.
        encode: ``(input_ids, attention_mask) -> [1, max_length, dim]`` hidden states; callers
            whose pipeline passes no mask (Flux) ignore the second argument.
        max_length: ``max_sequence_length``.
        device: where the ids go (the encoder's execution device).
        parse_weights: False reads the prompt literally.

    Returns:
        ``(embeddings [1, max_length, dim], tokens)``; ``tokens.dropped`` says whether the
        prompt was cut.
    """
    tokens = weighted_tokens(text, tokenizer, max_length, parse_weights=parse_weights)
    ids = torch.tensor([tokens.ids], dtype=torch.long, device=device)
    mask = torch.tensor([tokens.mask], dtype=torch.long, device=device)
    with torch.no_grad():
        hidden = encode(ids, mask)
    return apply_weights(hidden, tokens.weights), tokens


def clip_pooled(tokenizer: Any, text_encoder: Any, text: str, device: torch.device | str) -> torch.Tensor:
    """CLIP's pooled output ``[1, dim]`` for a plain text, laid out as diffusers' Flux pipeline does
    (padded to the tokenizer's length, truncated there; no weights: a pooled vector has no tokens)."""
    ids = tokenizer(text, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    with torch.no_grad():
        pooled = text_encoder(ids.to(device), output_hidden_states=False).pooler_output
    return pooled
