"""Prompt weighting in A1111 syntax and long prompts, turned into diffusers embeddings.

Syntax (as in AUTOMATIC1111's web UI, ``modules/prompt_parser.py``):

- ``(word)`` multiplies the attention to ``word`` by 1.1, ``((word))`` by 1.21, ...
- ``(word:1.3)`` multiplies it by 1.3 (any number, also below 1).
- ``[word]`` divides it by 1.1.
- ``\\(``, ``\\)``, ``\\[``, ``\\]`` and ``\\\\`` are the literal characters.
- ``BREAK`` (upper case, a word of its own) ends the current 75-token chunk.
- Brackets nest; an unclosed bracket applies to the end of the prompt.

Encoding: the text is split into weighted fragments, each fragment is tokenized, and the
tokens are cut into chunks of 75. Each chunk gets BOS, EOS and padding to 77 tokens (like
a plain diffusers call) and is encoded on its own; the chunks' hidden states are
concatenated along the sequence axis, so a prompt of any length is used in full (diffusers
truncates at 77). The positive and negative prompts are padded with empty chunks to the
same number of chunks.

Weighting method (A1111's, ``sd_hijack_clip.py``): each token's hidden state is multiplied by
its weight, then the whole chunk is rescaled so that its mean equals the mean before
weighting. (Where that mean is ~0, e.g. the tiny test models, the mean is restored by a
shift instead of a ratio of two near-zero numbers.) With no weights (all 1.0) nothing is
changed, so a plain prompt of up to 75 tokens gives exactly
the embeddings of diffusers' own ``encode_prompt``.
"""
from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import InvalidValueError

logger = logging.getLogger(__name__)

#: Tokens per chunk between BOS and EOS (CLIP's 77 minus the two special tokens); a tokenizer with a
#: shorter ``model_max_length`` (the demo model's 16) gets shorter chunks, see :func:`chunk_tokens`.
CHUNK_TOKENS = 75
ROUND_BRACKET_MULTIPLIER = 1.1
SQUARE_BRACKET_MULTIPLIER = 1 / 1.1
#: The weight ``parse_prompt_attention`` gives a BREAK marker (as in A1111).
BREAK_WEIGHT = -1.0
#: Brackets of one kind open at once that still weigh (1.1**32 is 21x); deeper ones are ignored, with their
#: closing brackets: this bounds the parser's work by the prompt's length times 2 x 32, where A1111's grows
#: with the square of the number of brackets (seconds for a prompt at the length limit).
MAX_ATTENTION_DEPTH = 32
#: Below this fraction of the mean absolute value, a chunk mean counts as zero (see _apply_weights).
MEAN_EPSILON = 1e-3

_RE_ATTENTION = re.compile(
    r"""
    \\\(|
    \\\)|
    \\\[|
    \\]|
    \\\\|
    \\|
    \(|
    \[|
    :\s*([+-]?[.\d]+)\s*\)|
    \)|
    ]|
    [^\\()\[\]:]+|
    :
    """,
    re.X,
)
_RE_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)


def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
    """Split a prompt into fragments with their attention weights (A1111 semantics).

    Adjacent fragments of equal weight are merged. A ``BREAK`` keyword becomes the
    fragment ``("BREAK", -1.0)`` (never merged).

    Args:
        text: The prompt.

    Returns:
        A list of ``(text, weight)`` pairs; ``[("", 1.0)]`` for an empty prompt.

    Examples (from A1111's docstring)::

        >>> parse_prompt_attention('an (important) word')
        [('an ', 1.0), ('important', 1.1), (' word', 1.0)]
        >>> parse_prompt_attention('(unbalanced')
        [('unbalanced', 1.1)]
        >>> parse_prompt_attention('\\\\(literal\\\\]')
        [('(literal]', 1.0)]
    """
    res: list[list[Any]] = []
    round_brackets: list[int] = []
    square_brackets: list[int] = []
    ignored = {"(": 0, "[": 0}  # brackets opened past MAX_ATTENTION_DEPTH, not yet closed

    def multiply_range(start: int, multiplier: float) -> None:
        for p in range(start, len(res)):
            if res[p][1] != BREAK_WEIGHT or res[p][0] != "BREAK":
                res[p][1] *= multiplier

    for m in _RE_ATTENTION.finditer(text):
        token = m.group(0)
        weight = m.group(1)
        if token.startswith("\\"):
            res.append([token[1:], 1.0])
        elif token in ("(", "[") and len(round_brackets if token == "(" else square_brackets) >= MAX_ATTENTION_DEPTH:
            ignored[token] += 1
        elif token == "(":
            round_brackets.append(len(res))
        elif token == "[":
            square_brackets.append(len(res))
        elif (weight is not None or token == ")") and ignored["("]:
            ignored["("] -= 1
        elif token == "]" and ignored["["]:
            ignored["["] -= 1
        elif weight is not None and round_brackets:
            multiply_range(round_brackets.pop(), _to_float(weight))
        elif token == ")" and round_brackets:
            multiply_range(round_brackets.pop(), ROUND_BRACKET_MULTIPLIER)
        elif token == "]" and square_brackets:
            multiply_range(square_brackets.pop(), SQUARE_BRACKET_MULTIPLIER)
        else:
            for i, part in enumerate(_RE_BREAK.split(token)):
                if i > 0:
                    res.append(["BREAK", BREAK_WEIGHT])
                if part or i == 0:  # A1111 keeps the empty text around a BREAK; it encodes to nothing
                    res.append([part, 1.0])

    for pos in round_brackets:
        multiply_range(pos, ROUND_BRACKET_MULTIPLIER)
    for pos in square_brackets:
        multiply_range(pos, SQUARE_BRACKET_MULTIPLIER)

    if not res:
        res = [["", 1.0]]

    # merge runs of identical weights (BREAK markers stay apart)
    i = 0
    while i + 1 < len(res):
        if res[i][1] == res[i + 1][1] and not _is_break(res[i]) and not _is_break(res[i + 1]):
            res[i][0] += res[i + 1][0]
            res.pop(i + 1)
        else:
            i += 1
    return [(str(t), float(w)) for t, w in res]


def strip_weighting(text: str) -> str:
    """The prompt without A1111 weighting syntax: ``"a (red:1.3) [dull] cat"`` -> ``"a red dull cat"``.

    For families whose prompts go to diffusers as plain text (Flux): the weights are dropped, not
    applied; escaped brackets stay as literal characters and ``BREAK`` becomes a space.
    """
    parts = [" " if _is_break(item) else item[0] for item in parse_prompt_attention(text)]
    return re.sub(r"\s{2,}", " ", "".join(parts)).strip()


def _is_break(item: list[Any] | tuple[str, float]) -> bool:
    return item[0] == "BREAK" and item[1] == BREAK_WEIGHT


def _to_float(text: str) -> float:
    """A weight such as ``1.3`` or ``.5``; a malformed one (``1.2.3``) or one too big for a float (400 digits:
    inf, NaN embeddings) counts as 1.0."""
    try:
        value = float(text)
    except ValueError:
        value = math.inf
    if not math.isfinite(value):
        logger.warning("ignoring malformed prompt weight %r", text)
        return 1.0
    return value


@dataclass
class TokenChunk:
    """Up to 75 tokens of a prompt with their weights (no BOS/EOS yet)."""

    tokens: list[int] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)


def chunk_tokens(tokenizer: Any) -> int:
    """Tokens per chunk for ``tokenizer``: its ``model_max_length`` minus BOS and EOS, at most 75."""
    length = getattr(tokenizer, "model_max_length", None)
    if not isinstance(length, int) or length < 3:
        return CHUNK_TOKENS
    return min(CHUNK_TOKENS, length - 2)


def tokenize_weighted(pipe: Any, tokenizer: Any, text: str, parse_weights: bool = True) -> list[TokenChunk]:
    """Tokenize a weighted prompt into chunks of at most 75 tokens (:func:`chunk_tokens`).

    Args:
        pipe: The diffusers pipeline (for textual-inversion tokens, if it has any).
        tokenizer: A CLIP tokenizer.
        text: The prompt in A1111 syntax.
        parse_weights: False takes the text literally (brackets are text, BREAK is a word).

    Returns:
        At least one chunk (an empty prompt gives one empty chunk).
    """
    chunks: list[TokenChunk] = []
    current = TokenChunk()
    size = chunk_tokens(tokenizer)
    fragments = parse_prompt_attention(text) if parse_weights else [(text, 1.0)]
    # textual-inversion tokens are added tokens; without any, skip the (slow) conversion
    convert = hasattr(pipe, "maybe_convert_prompt") and bool(
        set(getattr(tokenizer, "added_tokens_encoder", {})) - set(getattr(tokenizer, "all_special_tokens", [])))
    for fragment, weight in fragments:
        if parse_weights and _is_break((fragment, weight)):
            chunks.append(current)
            current = TokenChunk()
            continue
        if not fragment:
            continue
        if convert:
            fragment = pipe.maybe_convert_prompt(fragment, tokenizer)
        ids = tokenizer(fragment, add_special_tokens=False, truncation=False, verbose=False).input_ids
        for token in ids:
            if len(current.tokens) == size:
                chunks.append(current)
                current = TokenChunk()
            current.tokens.append(int(token))
            current.weights.append(weight)
    if current.tokens or not chunks:
        chunks.append(current)
    return chunks


def _chunk_ids(tokenizer: Any, chunk: TokenChunk) -> tuple[list[int], list[float], list[int]]:
    """Token ids, weights and attention mask of one 77-token chunk, laid out like diffusers.

    ``[BOS] tokens [EOS] [PAD]...``: the same ids as ``tokenizer(text, padding="max_length")``
    for a text of up to 75 tokens.
    """
    n_pad = chunk_tokens(tokenizer) - len(chunk.tokens)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = [tokenizer.bos_token_id, *chunk.tokens, tokenizer.eos_token_id] + [pad_id] * n_pad
    weights = [1.0, *chunk.weights, 1.0] + [1.0] * n_pad
    mask = [1] * (len(chunk.tokens) + 2) + [0] * n_pad
    return ids, weights, mask


def _execution_device(module: Any) -> torch.device:
    try:
        from diffusers.utils.torch_utils import get_module_execution_device

        return get_module_execution_device(module)
    except (ImportError, AttributeError):  # older diffusers
        return next(module.parameters()).device


def _is_sdxl(model_type: Any) -> bool:
    value = getattr(model_type, "value", model_type)
    if value not in ("SD", "SDXL"):
        raise InvalidValueError(
            f"Invalid value for 'model_type': {model_type!r}. Allowed: SD, SDXL.",
            param="model_type", allowed="SD, SDXL")
    return value == "SDXL"


def _check_clip_skip(clip_skip: int, text_encoder: Any, offset: int) -> None:
    n_layers = int(text_encoder.config.num_hidden_layers)
    highest = n_layers + 1 - offset
    if isinstance(clip_skip, bool) or not isinstance(clip_skip, int) or not 0 <= clip_skip <= highest:
        raise InvalidValueError(
            f"Invalid value for 'clip_skip': {clip_skip!r}. Allowed: an integer from 0 to {highest} "
            f"for this model ({n_layers} text-encoder layers).",
            param="clip_skip", allowed=f"0..{highest}")


@dataclass
class _Encoder:
    """A tokenizer, its text encoder and the device the encoder's inputs go to."""

    tokenizer: Any
    text_encoder: Any
    device: torch.device


def _encode_chunk(
    encoder: _Encoder,
    ids: list[int],
    mask: list[int],
    clip_skip: int,
    sdxl: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Hidden states ``[1, 77, dim]`` of one chunk and the pooled/projected output if 2-D."""
    text_encoder, device = encoder.text_encoder, encoder.device
    input_ids = torch.tensor([ids], dtype=torch.long, device=device)
    attention_mask = None
    if getattr(text_encoder.config, "use_attention_mask", False):
        attention_mask = torch.tensor([mask], dtype=torch.long, device=device)
    if sdxl:
        out = text_encoder(input_ids, output_hidden_states=True)
        pooled = out[0] if out[0].ndim == 2 else None
        # "+2": SDXL always starts from the penultimate layer
        return out.hidden_states[-(clip_skip + 2)], pooled
    if clip_skip == 0:
        return text_encoder(input_ids, attention_mask=attention_mask)[0], None
    out = text_encoder(input_ids, attention_mask=attention_mask, output_hidden_states=True)
    hidden = out.hidden_states[-(clip_skip + 1)]
    # transformers 5's CLIPTextModel holds final_layer_norm itself; 4.x had it under text_model
    # (diffusers 0.42.1's own SD clip_skip path still looks under text_model and fails on 5.x)
    final_layer_norm = getattr(getattr(text_encoder, "text_model", text_encoder), "final_layer_norm")
    return final_layer_norm(hidden), None


def _apply_weights(z: torch.Tensor, weights: list[float]) -> torch.Tensor:
    """A1111 weighting of one chunk: scale each token, then restore the chunk's mean.

    A1111 restores the mean by multiplying with ``original_mean / new_mean``. When a mean is
    negligible against the values themselves (e.g. a text encoder whose final LayerNorm has
    no bias makes every token zero-mean) that ratio is the quotient of two rounding errors
    and would scale the embeddings by an arbitrary factor, so the mean is then restored by
    adding the difference instead.
    """
    if all(w == 1.0 for w in weights):
        return z
    zf = z.float()
    original_mean = zf.mean()
    w = torch.tensor(weights, dtype=torch.float32, device=z.device).reshape(1, -1, 1)
    zf = zf * w
    new_mean = zf.mean()
    tiny = MEAN_EPSILON * zf.abs().mean()
    if original_mean.abs() > tiny and new_mean.abs() > tiny and original_mean * new_mean > 0:
        zf = zf * (original_mean / new_mean)
    else:
        zf = zf + (original_mean - new_mean)
    return zf.to(z.dtype)


def _encode_text(
    encoders: list[_Encoder],
    chunk_lists: list[list[TokenChunk]],
    clip_skip: int,
    sdxl: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Encode one prompt (already chunked per tokenizer) with every text encoder."""
    chunk_outputs = []
    pooled = None
    n_chunks = len(chunk_lists[0])
    for c in range(n_chunks):
        per_encoder = []
        weights: list[float] = []
        for encoder, chunks in zip(encoders, chunk_lists):
            ids, weights, mask = _chunk_ids(encoder.tokenizer, chunks[c])
            hidden, chunk_pooled = _encode_chunk(encoder, ids, mask, clip_skip, sdxl)
            if c == 0 and chunk_pooled is not None and pooled is None:
                pooled = chunk_pooled
            per_encoder.append(hidden)
        # weights are per token, the same for both tokenizers of SDXL (same text, same vocab)
        z = torch.cat(per_encoder, dim=-1) if len(per_encoder) > 1 else per_encoder[0]
        chunk_outputs.append(_apply_weights(z, weights))
    return torch.cat(chunk_outputs, dim=1), pooled


def _pad_chunks(chunk_lists: list[list[TokenChunk]], n: int) -> list[list[TokenChunk]]:
    return [chunks + [TokenChunk() for _ in range(n - len(chunks))] for chunks in chunk_lists]


def encode_prompts(
    pipe: Any,
    prompt: str,
    negative_prompt: str | None,
    model_type: Any,
    clip_skip: int | None = 0,
    device: torch.device | str | None = None,
    *,
    parse_weights: bool = True,
    max_chunks: int | None = None,
) -> dict[str, torch.Tensor]:
    """Encode a weighted prompt and negative prompt into the kwargs of a diffusers call.

    Args:
        pipe: A diffusers SD or SDXL pipeline (its tokenizers and text encoders are used).
        prompt: Prompt in A1111 syntax, any length.
        negative_prompt: Negative prompt in A1111 syntax. None behaves as in diffusers:
            for SDXL models whose config sets ``force_zeros_for_empty_prompt`` the negative
            embeddings are zeros, otherwise it is the empty prompt.
        model_type: ``ModelType.SD`` or ``ModelType.SDXL`` (or the strings).
        clip_skip: Text-encoder layers to skip, as in diffusers: 0 uses the normal output
            (SD: last layer; SDXL: penultimate); 1 the layer before, and so on. Unlike
            diffusers (which skips only for the positive prompt) it applies to both prompts.
        device: Device of the returned tensors; default the (last) text encoder's execution device.
        parse_weights: False reads the prompts literally (no weights, no BREAK).
        max_chunks: Keep at most this many 75-token chunks per prompt (1 truncates at 77
            tokens like diffusers); None keeps the whole prompt. With
            ``parse_weights=False, max_chunks=1`` the result equals diffusers' own
            encoding (also with clip_skip, which diffusers 0.42.1 cannot do for SD 1.x on
            transformers 5), so a pipe can use it when prompt weighting is off.

    Returns:
        SD: ``{"prompt_embeds", "negative_prompt_embeds"}``, each ``[1, 77 * chunks, dim]``.
        SDXL: also ``{"pooled_prompt_embeds", "negative_pooled_prompt_embeds"}`` ``[1, dim2]``
        (from ``text_encoder_2`` on the first chunk).

    Raises:
        InvalidValueError: For an unknown model type, a clip_skip or max_chunks out of range.
    """
    sdxl = _is_sdxl(model_type)
    clip_skip = 0 if clip_skip is None else clip_skip  # diffusers spells "no skip" None
    if sdxl:
        pairs = [(t, e) for t, e in ((getattr(pipe, "tokenizer", None), getattr(pipe, "text_encoder", None)),
                                     (pipe.tokenizer_2, pipe.text_encoder_2)) if t is not None and e is not None]
        out_dtype = pipe.text_encoder_2.dtype
    else:
        pairs = [(pipe.tokenizer, pipe.text_encoder)]
        out_dtype = pipe.text_encoder.dtype
    for _, text_encoder in pairs:
        _check_clip_skip(clip_skip, text_encoder, 2 if sdxl else 1)
    # looked up once per call: finding the execution device walks every module
    encoders = [_Encoder(t, e, _execution_device(e)) for t, e in pairs]
    if device is None:
        device = encoders[-1].device

    zero_negative = (sdxl and negative_prompt is None
                     and bool(getattr(pipe.config, "force_zeros_for_empty_prompt", False)))
    negative_text = negative_prompt or ""
    if max_chunks is not None and (isinstance(max_chunks, bool) or not isinstance(max_chunks, int)
                                   or max_chunks < 1):
        raise InvalidValueError(f"Invalid value for 'max_chunks': {max_chunks!r}. Allowed: an integer >= 1 or None.",
                                param="max_chunks", allowed="an integer >= 1 or None")
    pos_chunks = [tokenize_weighted(pipe, e.tokenizer, prompt or "", parse_weights)[:max_chunks] for e in encoders]
    neg_chunks = [tokenize_weighted(pipe, e.tokenizer, negative_text, parse_weights)[:max_chunks] for e in encoders]
    n = max(len(c) for c in pos_chunks + neg_chunks)
    pos_chunks, neg_chunks = _pad_chunks(pos_chunks, n), _pad_chunks(neg_chunks, n)
    if n > 1:
        logger.debug("prompt encoded in %d chunks of %d tokens", n, chunk_tokens(encoders[0].tokenizer))

    with torch.no_grad():
        prompt_embeds, pooled = _encode_text(encoders, pos_chunks, clip_skip, sdxl)
        if zero_negative:
            negative_embeds, negative_pooled = torch.zeros_like(prompt_embeds), torch.zeros_like(pooled)
        else:
            negative_embeds, negative_pooled = _encode_text(encoders, neg_chunks, clip_skip, sdxl)

    result = {
        "prompt_embeds": prompt_embeds.to(dtype=out_dtype, device=device),
        "negative_prompt_embeds": negative_embeds.to(dtype=out_dtype, device=device),
    }
    if sdxl:
        result["pooled_prompt_embeds"] = pooled.to(dtype=out_dtype, device=device)
        result["negative_pooled_prompt_embeds"] = negative_pooled.to(dtype=out_dtype, device=device)
    return result
