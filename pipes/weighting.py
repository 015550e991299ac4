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

LLM encoders (Qwen-Image's Qwen2.5-VL, Z-Image's Qwen3) read the prompt inside a chat template,
the prompt in the middle (``template_tokens``). There the whole rendered text is tokenized once,
exactly as the pipeline tokenizes it (the syntax removed, ``BREAK`` a space), and each token takes
the weight of the prompt characters it covers (its offsets in the text): a byte-level BPE would
tokenize ``"a "`` + ``"red"`` apart differently from ``"a red"``, so fragments are not tokenized
apart there, and the template's tokens and the unweighted words are the pipeline's own. Their
transformers RMS-normalise each text token, so there a weight scales the token's offset from the
prompt's mean embedding rather than the embedding itself (``encode_in_template`` says why).
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


def apply_weights(hidden: torch.Tensor, weights: Sequence[float], anchor: torch.Tensor | None = None) -> torch.Tensor:
    """Each token's embedding of ``hidden`` (``[batch, tokens, dim]``) times its weight.

    With ``anchor`` (a ``[dim]`` point) the weight scales the embedding's offset from it instead,
    ``anchor + w * (e - anchor)``: what still tells tokens apart after a per-token normalisation
    (see ``encode_in_template``). Computed in float32 and cast back; tokens of weight 1.0 keep
    exactly the encoder's output, and without other weights the tensor is returned as it is.
    """
    if all(w == 1.0 for w in weights):
        return hidden
    w = torch.tensor(list(weights), dtype=torch.float32, device=hidden.device).reshape(1, -1, 1)
    if anchor is None:
        scaled = hidden.float() * w
    else:
        centre = anchor.float().reshape(1, 1, -1)
        scaled = centre + (hidden.float() - centre) * w
    return torch.where(w == 1.0, hidden, scaled.to(hidden.dtype))


#: stands for the prompt while a template is rendered, to find where the prompt goes (a private-use character)
_SLOT = "\ue000"


def plain_text(text: str, parse_weights: bool = True) -> tuple[str, tuple[float, ...]]:
    """The prompt as an LLM encoder reads it, and the weight of each of its characters.

    The weighting syntax is removed (``"a (red:1.5) cat"`` reads ``"a red cat"``, ``"red"`` 1.5) and
    ``BREAK`` becomes one space between words, as ``prompting.strip_weighting`` reads it; without
    weighting syntax the text is left as it is (spaces included), so that it is the pipeline's own.
    ``parse_weights`` False: the text literally, every weight 1.0.
    """
    if not parse_weights:
        return text, (1.0,) * len(text)
    chars: list[str] = []
    weights: list[float] = []
    pending_space = False
    for fragment, weight in parse_prompt_attention(text):
        if fragment == "BREAK" and weight == BREAK_WEIGHT:
            pending_space = bool(chars)
            continue
        if not fragment:
            continue
        if pending_space and not chars[-1].isspace() and not fragment[0].isspace():
            chars.append(" ")
            weights.append(1.0)
        pending_space = False
        chars += fragment
        weights += [float(weight)] * len(fragment)
    return "".join(chars), tuple(weights)


def _token_weight(start: int, end: int, full: str, lo: int, char_weights: Sequence[float]) -> float:
    """The weight of the token covering ``full[start:end]``: that of most of its characters, spaces left
    out unless it has nothing else (``" red"`` after an unweighted word weighs what ``red`` does), the first
    one on a tie; template characters (outside ``lo`` .. ``lo + len(char_weights)``) weigh 1.0."""
    span = range(start, end)
    solid = [c for c in span if not full[c].isspace()] or list(span)
    counts: dict[float, int] = {}
    for c in solid:
        w = char_weights[c - lo] if lo <= c < lo + len(char_weights) else 1.0
        counts[w] = counts.get(w, 0) + 1
    return max(counts, key=lambda w: counts[w]) if counts else 1.0


def template_tokens(text: str, tokenizer: Any, render: Callable[[str], str], max_length: int, *,
                    keep: int | None = None, pad: bool = False, parse_weights: bool = True) -> WeightedTokens:
    """Tokenize a prompt in A1111 syntax inside a text template (an LLM's chat template), with its weights.

    The rendered template is tokenized whole, as the pipeline's own tokenizer call does (truncated
    at ``max_length``, padded to it when ``pad``, on the tokenizer's padding side), so the ids are
    the pipeline's ids for the prompt without the syntax; each token takes the weight of the prompt
    characters it covers (the tokenizer's offsets: a fast tokenizer is needed), the template's
    tokens, special tokens and padding 1.0.

    Args:
        text: the prompt.
        tokenizer: the encoder's (fast) tokenizer.
        render: ``prompt -> text the encoder reads`` (``template.format``, a chat template); it must
            put the prompt in as it is, once.
        max_length: where the pipeline's tokenizer call truncates (and pads to, with ``pad``).
        keep: how many tokens from the start the pipeline keeps (its ``max_sequence_length`` cut,
            after the template's start where it drops one); prompt tokens after it count as
            ``dropped``. Default: ``max_length``.
        pad: pad to ``max_length`` (``padding="max_length"``) rather than not at all.
        parse_weights: False reads the text literally, as the pipeline would.

    Returns:
        The tokens; ``dropped`` counts the prompt tokens cut (by ``max_length`` or ``keep``).

    Raises:
        ValueError: ``render`` changes the prompt's text or holds it more than once, or the tokenizer
            gives no offsets (a slow tokenizer).
    """
    plain, char_weights = plain_text(text, parse_weights)
    prefix, *rest = render(_SLOT).split(_SLOT)
    full = render(plain)
    if len(rest) != 1 or full != prefix + plain + rest[0]:
        raise ValueError("the prompt template does not hold the prompt once, as it is: it cannot be weighted")
    lo, hi = len(prefix), len(prefix) + len(plain)
    padding: str | bool = "max_length" if pad else False
    try:
        enc = tokenizer(full, max_length=int(max_length), truncation=True, padding=padding,
                        return_offsets_mapping=True)
        every = tokenizer(full, truncation=False, return_offsets_mapping=True, verbose=False)
    except NotImplementedError as e:  # transformers' slow tokenizers have no offsets
        raise ValueError(f"{type(tokenizer).__name__} gives no character offsets: a fast tokenizer is needed") from e
    ids, mask = [int(i) for i in enc.input_ids], [int(m) for m in enc.attention_mask]
    weights = tuple(_token_weight(s, e, full, lo, char_weights) for s, e in enc.offset_mapping)
    kept = min(int(keep) if keep is not None else len(ids), int(max_length))
    in_prompt = [s < hi and e > lo for s, e in every.offset_mapping]
    dropped = sum(in_prompt[kept:])
    return WeightedTokens(tuple(ids), weights, tuple(mask), dropped)


def run_encoder(tokens: WeightedTokens, encode: Encoder, device: torch.device | str) -> torch.Tensor:
    """Run ``encode`` once on ``tokens`` (``[1, n]`` ids and mask on ``device``, no grad): ``[1, n, dim]``
    hidden states, no weights applied yet."""
    ids = torch.tensor([tokens.ids], dtype=torch.long, device=device)
    mask = torch.tensor([tokens.mask], dtype=torch.long, device=device)
    with torch.no_grad():
        return encode(ids, mask)


def encode_in_template(text: str, tokenizer: Any, render: Callable[[str], str], encode: Encoder,
                       device: torch.device | str, *, max_length: int, rows: slice = slice(None),
                       pad: bool = False, parse_weights: bool = True) -> tuple[torch.Tensor, WeightedTokens]:
    """Encode a weighted prompt with an LLM encoder through its template: one encoder run, the rows the
    pipeline keeps, then the weights, each scaling its token's offset from the kept rows' mean.

    Why not the plain scaling of T5's embeddings: Qwen-Image's and Z-Image's transformers RMS-normalise
    each text token first (``txt_norm``, ``cap_embedder``), which undoes any scaling of a whole
    embedding (``(red:1.5)`` would give the same image as ``red``). Scaling the token's offset from the
    sequence's mean changes its direction, which the normalisation keeps: above 1 it stands out more
    from the rest of the prompt, below 1 it blends into it (0: the mean, its content gone). The other
    tokens and any prompt without weights keep exactly the encoder's output.

    Args:
        text: the prompt in A1111 syntax.
        tokenizer: the encoder's fast tokenizer.
        render: ``prompt -> the text the encoder reads`` (the pipeline's template).
        encode: ``(input_ids, attention_mask) -> [1, n, dim]`` hidden states (the layer the pipeline reads).
        device: where the ids go (the encoder's execution device).
        max_length: where the pipeline's tokenizer call truncates (and pads to, with ``pad``).
        rows: of the unpadded rows (the mask's), those the pipeline passes on (Qwen-Image drops its
            template's first tokens and cuts at ``max_sequence_length``).
        pad: pad to ``max_length`` as the pipeline does (``padding="max_length"``).
        parse_weights: False reads the prompt literally.

    Returns:
        ``(embeddings [1, kept rows, dim], tokens)``; ``tokens.dropped`` counts the prompt tokens cut.
    """
    tokens = template_tokens(text, tokenizer, render, max_length, keep=rows.stop, pad=pad, parse_weights=parse_weights)
    hidden = run_encoder(tokens, encode, device)
    mask = torch.tensor(tokens.mask, dtype=torch.bool, device=hidden.device)
    kept = hidden[0][mask][rows].unsqueeze(0)
    weights = [w for w, m in zip(tokens.weights, tokens.mask) if m][rows]
    anchor = kept[0].float().mean(dim=0) if kept.shape[1] else None
    return apply_weights(kept, weights, anchor), tokens


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
    return apply_weights(run_encoder(tokens, encode, device), tokens.weights), tokens


def clip_pooled(tokenizer: Any, text_encoder: Any, text: str, device: torch.device | str) -> torch.Tensor:
    """CLIP's pooled output ``[1, dim]`` for a plain text, laid out as diffusers' Flux pipeline does
    (padded to the tokenizer's length, truncated there; no weights: a pooled vector has no tokens)."""
    ids = tokenizer(text, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    with torch.no_grad():
        pooled = text_encoder(ids.to(device), output_hidden_states=False).pooler_output
    return pooled
