"""``(word:1.3)`` weighting for the LLM-encoded families: Qwen-Image (Qwen2.5-VL) and Z-Image (Qwen3).

The prompt goes inside a chat template (``weighting.template_tokens``): the tokenizer tests use the
tiny byte-level Qwen tokenizers built in code; the rest runs the tiny models (models/tiny-qwen-image,
tiny-qwen-image-edit, tiny-z-image) and is marked slow. A weighted token's hidden states are the
unweighted prompt's with their offset from the prompt's mean embedding times the weight (both
transformers RMS-normalise each text token: a plain scaling would change nothing, as a test shows);
everything else, and any prompt without weights, is exactly what diffusers' own ``encode_prompt`` gives.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from pipes_fixtures import one_thread, pixels  # noqa: F401  (autouse: one torch thread for pixel comparisons)

from multigen.pipes import Edit2ImPipe, ModelType, Prompt2ImPipe, load_base
from multigen.pipes.families import family
from multigen.pipes.tiny.qwen_image import QWEN_IMAGE_DIR, QWEN_IMAGE_EDIT_DIR, make_qwen_tokenizer
from multigen.pipes.tiny.z_image import Z_IMAGE_DIR
from multigen.pipes.tiny.z_image import make_qwen_tokenizer as make_qwen3_tokenizer
from multigen.pipes.weighting import apply_weights, plain_text, template_tokens

QWEN, Z_IMAGE = family("QWEN_IMAGE"), family("Z_IMAGE")
SIZE = 64
#: a chat template of the Qwen-Image kind, the prompt in the middle
TEMPLATE = "<|im_start|>system\nDescribe the image:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
SLOT = "\x00"


def _rows(tokenizer, prefix: str, before: str, word: str, start: int = 0) -> list[int]:
    """The token rows of ``word`` when the text reads ``prefix + before + word``, found by tokenizing the
    text up to it and through it (the byte-level pre-tokenizer splits before a space), less ``start``."""
    a = len(tokenizer(prefix + before).input_ids)
    b = len(tokenizer(prefix + before + word).input_ids)
    return list(range(a - start, b - start))


def _changed(a: torch.Tensor, b: torch.Tensor) -> list[int]:
    """The rows (tokens) where two ``[tokens, dim]`` embeddings differ."""
    return (a != b).any(dim=-1).nonzero().flatten().tolist()


def _norm_change(norm: torch.nn.Module, plain: torch.Tensor, weighted: torch.Tensor) -> float:
    """How much of the change weighting makes to the transformer's normalised text tokens a plain scaling
    by the same 1.5 would make: (nearly) none, the normalisation undoes it (up to its epsilon)."""
    with torch.no_grad():
        scaled = (norm(plain * 1.5) - norm(plain)).abs().max()
        ours = (norm(weighted) - norm(plain)).abs().max()
    assert ours > 0
    return float(scaled / ours)


def _weighted(plain: torch.Tensor, rows: list[int], weight: float) -> torch.Tensor:
    """What ``rows`` of the unweighted ``[tokens, dim]`` embeddings become with ``weight``: their offset
    from the mean of all the rows, times the weight."""
    mean = plain.mean(dim=0)
    return mean + (plain[rows] - mean) * weight


# ---- the prompt's text and its tokens (tokenizers only) ---------------------------------------------------

def test_plain_text_removes_the_syntax_and_keeps_unweighted_text_as_it_is():
    assert plain_text("a (red:1.5) cat") == ("a red cat", (1.0,) * 2 + (1.5,) * 3 + (1.0,) * 4)
    text, weights = plain_text("((a)) [b] BREAK c")
    assert text == "a b c" and weights == pytest.approx((1.21, 1.0, 1 / 1.1, 1.0, 1.0))
    assert plain_text("two  spaces: 35mm, f/2") == ("two  spaces: 35mm, f/2", (1.0,) * 22)
    assert plain_text("a (red:1.5) cat", parse_weights=False) == ("a (red:1.5) cat", (1.0,) * 15)
    assert plain_text("BREAK") == ("", ())


def test_template_tokens_are_the_pipelines_own_with_the_weights_on_the_words_characters():
    tok = make_qwen_tokenizer()
    prefix = TEMPLATE.split("{}")[0]
    tokens = template_tokens("a (red:1.5) cat", tok, TEMPLATE.format, 128)
    assert list(tokens.ids) == tok(TEMPLATE.format("a red cat")).input_ids  # tokenized whole, as diffusers does
    red = _rows(tok, prefix, "a", " red")
    assert [i for i, w in enumerate(tokens.weights) if w != 1.0] == red and tokens.weights[red[0]] == 1.5
    assert tokens.mask == (1,) * len(tokens.ids) and tokens.dropped == 0
    # no weights: the ids of the literal text, every weight 1.0
    plain = template_tokens("a red cat", tok, TEMPLATE.format, 128)
    assert plain.ids == tokens.ids and not plain.weighted
    literal = template_tokens("a (red:1.5) cat", tok, TEMPLATE.format, 128, parse_weights=False)
    assert list(literal.ids) == tok(TEMPLATE.format("a (red:1.5) cat")).input_ids and not literal.weighted


def test_template_tokens_cut_pad_and_count_the_prompt_tokens_dropped():
    tok = make_qwen3_tokenizer()  # byte-level, no merges: one token a byte

    def render(text: str) -> str:
        return tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                       add_generation_prompt=True, enable_thinking=True)

    prefix = render(SLOT).split(SLOT)[0]
    n_prefix = len(tok(prefix).input_ids)
    tokens = template_tokens("a (b:2)", tok, render, 40, pad=True)
    full = tok(render("a b"), padding="max_length", max_length=40, truncation=True)
    assert list(tokens.ids) == full.input_ids and list(tokens.mask) == full.attention_mask
    assert tokens.weights[n_prefix + 2] == 2.0 and sum(w != 1.0 for w in tokens.weights) == 1
    # cut where the pipeline cuts: the prompt's tokens past it are counted (the template's are not)
    cut = template_tokens("abcdefgh", tok, render, n_prefix + 3, pad=True)
    assert len(cut.ids) == n_prefix + 3 and cut.dropped == 5
    assert template_tokens("abcdefgh", tok, render, 100, keep=n_prefix + 6).dropped == 2
    tok.padding_side = "left"
    left = template_tokens("a (b:2)", tok, render, 40, pad=True)
    assert left.mask[0] == 0 and left.mask[-1] == 1 and left.weights[40 - sum(left.mask) + n_prefix + 2] == 2.0


def test_anchored_weights_scale_the_offset_and_leave_weight_one_rows_exact():
    hidden = torch.randn(1, 4, 3, dtype=torch.bfloat16)
    anchor = torch.tensor([0.5, -1.0, 2.0])
    assert apply_weights(hidden, [1.0] * 4, anchor) is hidden
    out = apply_weights(hidden, [1.0, 2.0, 0.0, 1.0], anchor)
    assert out.dtype == torch.bfloat16 and torch.equal(out[:, [0, 3]], hidden[:, [0, 3]])
    assert torch.equal(out[0, 1], (anchor + (hidden[0, 1].float() - anchor) * 2).to(torch.bfloat16))
    assert torch.equal(out[0, 2], anchor.to(torch.bfloat16))  # weight 0: the anchor itself


def test_a_template_that_changes_the_prompt_is_refused():
    tok = make_qwen_tokenizer()
    for render in (str.upper, lambda text: text + text):
        with pytest.raises(ValueError, match="template"):
            template_tokens("a (red:1.5) cat", tok, render, 64)


# ---- Qwen-Image (tiny-qwen-image) ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def qwen_base(models_dir):
    base, kind = load_base(models_dir / QWEN_IMAGE_DIR, dtype="float32")
    assert kind is ModelType.QWEN_IMAGE
    return base


@pytest.fixture()
def qwen(qwen_base):
    pipe = Prompt2ImPipe(pipe=qwen_base)
    pipe.setup(width=SIZE, height=SIZE, steps=2)
    return pipe


def _qwen_theirs(base, text: str, length: int = 512) -> torch.Tensor:
    """diffusers' own QwenImagePipeline.encode_prompt (its mask is None: one prompt, no padding)."""
    with torch.no_grad():
        embeds, mask = base.encode_prompt(text, device="cpu", max_sequence_length=length)
    assert mask is None
    return embeds


def _qwen_rows(base, before: str, word: str) -> list[int]:
    prefix = base.prompt_template_encode.split("{}")[0]
    return _rows(base.tokenizer, prefix, before, word, start=base.prompt_template_encode_start_idx)


@pytest.mark.slow
def test_qwen_unweighted_prompts_give_diffusers_own_embeddings(qwen, qwen_base):
    assert QWEN.weighted_prompts and QWEN.encode_prompt is not None
    ours = QWEN.encode_prompt(qwen, "a red cat on a mat", None)
    assert set(ours) == {"prompt_embeds", "prompt_embeds_mask"}
    theirs = _qwen_theirs(qwen_base, "a red cat on a mat")
    assert torch.equal(ours["prompt_embeds"], theirs) and ours["prompt_embeds_mask"].all()
    assert ours["prompt_embeds_mask"].shape == theirs.shape[:2]
    qwen.setup(width=SIZE, height=SIZE, steps=2, lpw=False)  # the text literally, brackets and all
    literal = QWEN.encode_prompt(qwen, "a (red:1.5) cat", None)
    assert torch.equal(literal["prompt_embeds"], _qwen_theirs(qwen_base, "a (red:1.5) cat"))


@pytest.mark.slow
def test_qwen_a_weight_scales_exactly_its_tokens_hidden_states(qwen, qwen_base):
    plain = QWEN.encode_prompt(qwen, "a red cat", None)["prompt_embeds"][0]
    weighted = QWEN.encode_prompt(qwen, "a (red:1.5) cat", None)["prompt_embeds"][0]
    rows = _qwen_rows(qwen_base, "a", " red")
    assert rows and _changed(weighted, plain) == rows  # the template's and the other words' rows unchanged
    torch.testing.assert_close(weighted[rows], _weighted(plain, rows, 1.5))
    # why not a plain scaling: the transformer RMS-normalises each text token, which undoes it
    assert _norm_change(qwen_base.transformer.txt_norm, plain[rows], weighted[rows]) < 0.1
    # weight 1.0 is exactly no weight
    assert torch.equal(QWEN.encode_prompt(qwen, "a (red:1.0) cat", None)["prompt_embeds"][0], plain)


@pytest.mark.slow
def test_qwen_negative_prompt_is_weighted_and_a_missing_one_stays_a_space(qwen, qwen_base):
    out = QWEN.encode_prompt(qwen, "a lab", "(blurry:1.3) dark")
    assert set(out) == {"prompt_embeds", "prompt_embeds_mask", "negative_prompt_embeds", "negative_prompt_embeds_mask"}
    plain = _qwen_theirs(qwen_base, "blurry dark")[0]
    rows = _qwen_rows(qwen_base, "", "blurry")
    assert _changed(out["negative_prompt_embeds"][0], plain) == rows
    torch.testing.assert_close(out["negative_prompt_embeds"][0][rows], _weighted(plain, rows, 1.3))
    # finish_call: with negative embeddings no " " is added; without, " " as before (diffusers encodes it)
    call = QWEN.finish_call(qwen, {"guidance_scale": 4.0, **out})
    assert "negative_prompt" not in call and call["true_cfg_scale"] == 4.0
    assert QWEN.finish_call(qwen, {"guidance_scale": 4.0, "prompt_embeds": 0})["negative_prompt"] == " "
    a = pixels(qwen.gen({"prompt": "a lab", "negative_prompt": "blurry dark", "seed": 3})[0])
    b = pixels(qwen.gen({"prompt": "a lab", "negative_prompt": "(blurry:1.3) dark", "seed": 3})[0])
    assert not np.array_equal(a, b) and qwen.warnings == []


@pytest.mark.slow
def test_qwen_a_weight_changes_the_image_and_weight_one_does_not(qwen):
    plain = pixels(qwen.gen({"prompt": "a red cat", "seed": 4})[0])
    assert not np.array_equal(plain, pixels(qwen.gen({"prompt": "a (red:1.5) cat", "seed": 4})[0]))
    assert qwen.warnings == []
    assert np.array_equal(plain, pixels(qwen.gen({"prompt": "a (red:1.0) cat", "seed": 4})[0]))
    batch = qwen.gen({"prompt": "a (red:1.5) cat", "seed": [4, 5]})
    assert len(batch) == 2 and not np.array_equal(pixels(batch[0]), pixels(batch[1]))


@pytest.mark.slow
def test_qwen_a_prompt_longer_than_max_sequence_length_is_cut_with_a_warning(qwen, qwen_base):
    qwen.setup(width=SIZE, height=SIZE, steps=2, max_sequence_length=12)
    text = "a cat on a mat in the sun"
    ours = QWEN.encode_prompt(qwen, text, None)
    assert torch.equal(ours["prompt_embeds"], _qwen_theirs(qwen_base, text, 12))  # diffusers cuts it the same way
    assert ours["prompt_embeds"].shape[1] == 12
    assert qwen.gen({"prompt": text, "seed": 1})[0].size == (SIZE, SIZE)
    assert any("max_sequence_length 12" in w and "cut" in w for w in qwen.warnings)
    assert qwen.get_config()["warnings"] == qwen.warnings
    qwen.gen({"prompt": "a cat", "seed": 1})
    assert qwen.warnings == []


@pytest.mark.slow
def test_qwen_edit_keeps_diffusers_encoding_with_the_syntax_removed(models_dir):
    base, _ = load_base(models_dir / QWEN_IMAGE_EDIT_DIR, dtype="float32")
    pipe = Edit2ImPipe(pipe=base)
    source = np.random.default_rng(0).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    pipe.setup(image=Image.fromarray(source), steps=2)
    assert QWEN.encode_prompt(pipe, "make it (red:1.3)", None) == {"prompt": "make it red"}
    weighted = pixels(pipe.gen({"prompt": "make it (red:1.3)", "seed": 2})[0])
    assert any("not applied by Qwen-Image-Edit" in w for w in pipe.warnings)
    assert np.array_equal(weighted, pixels(pipe.gen({"prompt": "make it red", "seed": 2})[0]))
    assert pipe.warnings == []


# ---- Z-Image (tiny-z-image) ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def z_base(models_dir):
    base, kind = load_base(models_dir / Z_IMAGE_DIR, dtype="float32")
    assert kind is ModelType.Z_IMAGE
    return base


@pytest.fixture()
def z_pipe(z_base):
    pipe = Prompt2ImPipe(pipe=z_base)
    pipe.setup(width=SIZE, height=SIZE, steps=2)
    return pipe


def _z_theirs(base, text: str, negative: str | None = None, length: int = 512):
    """diffusers' own ZImagePipeline.encode_prompt: ``(prompt tensor, negative tensor or None)``."""
    with torch.no_grad():
        embeds, negatives = base.encode_prompt(text, device="cpu", do_classifier_free_guidance=negative is not None,
                                               negative_prompt=negative or None, max_sequence_length=length)
    return embeds[0], (negatives[0] if negatives else None)


def _z_rows(base, before: str, word: str) -> list[int]:
    prefix = base.tokenizer.apply_chat_template([{"role": "user", "content": SLOT}], tokenize=False,
                                                add_generation_prompt=True, enable_thinking=True).split(SLOT)[0]
    return _rows(base.tokenizer, prefix, before, word)


@pytest.mark.slow
def test_z_image_unweighted_prompts_give_diffusers_own_embeddings(z_pipe, z_base):
    assert Z_IMAGE.weighted_prompts and Z_IMAGE.encode_prompt is not None
    ours = Z_IMAGE.encode_prompt(z_pipe, "a red cat on a mat", None)
    assert set(ours) == {"prompt_embeds"} and len(ours["prompt_embeds"]) == 1  # guidance 0: no negative
    assert torch.equal(ours["prompt_embeds"][0], _z_theirs(z_base, "a red cat on a mat")[0])
    # with guidance a missing negative prompt is diffusers' own "", given as embeddings
    z_pipe.setup(width=SIZE, height=SIZE, steps=2, guidance_scale=3.0)
    guided = Z_IMAGE.encode_prompt(z_pipe, "a red cat", None)
    assert torch.equal(guided["negative_prompt_embeds"][0], _z_theirs(z_base, "a red cat", "")[1])
    z_pipe.setup(width=SIZE, height=SIZE, steps=2, lpw=False)
    literal = Z_IMAGE.encode_prompt(z_pipe, "a (red:1.5) cat", None)
    assert torch.equal(literal["prompt_embeds"][0], _z_theirs(z_base, "a (red:1.5) cat")[0])


@pytest.mark.slow
def test_z_image_a_weight_scales_exactly_its_tokens_hidden_states(z_pipe, z_base):
    plain = Z_IMAGE.encode_prompt(z_pipe, "a red cat", None)["prompt_embeds"][0]
    weighted = Z_IMAGE.encode_prompt(z_pipe, "a (red:1.5) cat", None)["prompt_embeds"][0]
    rows = _z_rows(z_base, "a", " red")[1:]  # one token a byte: " ", "r", "e", "d"; the space is unweighted
    assert len(rows) == 3 and _changed(weighted, plain) == rows
    torch.testing.assert_close(weighted[rows], _weighted(plain, rows, 1.5))
    # Z-Image's caption embedder RMS-normalises each token first too
    assert _norm_change(z_base.transformer.cap_embedder[0], plain[rows], weighted[rows]) < 0.1


@pytest.mark.slow
def test_z_image_negative_prompt_is_weighted_and_weights_change_the_image(z_pipe, z_base):
    z_pipe.setup(width=SIZE, height=SIZE, steps=2, guidance_scale=3.0)
    out = Z_IMAGE.encode_prompt(z_pipe, "a lab", "(blurry:1.3) dark")
    _, plain = _z_theirs(z_base, "a lab", "blurry dark")
    rows = _z_rows(z_base, "", "blurry")
    assert _changed(out["negative_prompt_embeds"][0], plain) == rows
    torch.testing.assert_close(out["negative_prompt_embeds"][0][rows], _weighted(plain, rows, 1.3))
    a = pixels(z_pipe.gen({"prompt": "a lab", "negative_prompt": "blurry dark", "seed": 3})[0])
    b = pixels(z_pipe.gen({"prompt": "a lab", "negative_prompt": "(blurry:1.3) dark", "seed": 3})[0])
    assert not np.array_equal(a, b) and z_pipe.warnings == []
    c = pixels(z_pipe.gen({"prompt": "a (lab:1.5)", "negative_prompt": "blurry dark", "seed": 3})[0])
    assert not np.array_equal(a, c)
    assert np.array_equal(a, pixels(z_pipe.gen({"prompt": "a (lab:1)", "negative_prompt": "blurry dark",
                                                 "seed": 3})[0]))


@pytest.mark.slow
def test_z_image_a_prompt_longer_than_max_sequence_length_is_cut_with_a_warning(z_pipe, z_base):
    z_pipe.setup(width=SIZE, height=SIZE, steps=2, max_sequence_length=16)
    text = "a cat on a (mat:1.2) in the sun"
    ours = Z_IMAGE.encode_prompt(z_pipe, text, None)["prompt_embeds"][0]
    assert ours.shape[0] == 16
    theirs = _z_theirs(z_base, "a cat on a mat in the sun", length=16)[0]
    assert torch.equal(ours, theirs)  # the weighted word is past the cut: nothing left to scale
    assert z_pipe.gen({"prompt": text, "seed": 1})[0].size == (SIZE, SIZE)
    assert any("max_sequence_length 16" in w and "cut" in w for w in z_pipe.warnings)
    z_pipe.gen({"prompt": "a cat", "seed": 1})
    assert z_pipe.warnings == []
