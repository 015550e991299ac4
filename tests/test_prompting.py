"""A1111 prompt weighting: the parser, and embeddings on the tiny SD and SDXL models."""
from __future__ import annotations

import pytest
import torch

from multigen.pipes.errors import InvalidValueError
from multigen.pipes.prompting import encode_prompts, parse_prompt_attention


def approx(pairs):
    return [(t, pytest.approx(w)) for t, w in pairs]


# ---------------------------------------------------------------- parser
# Expected values are A1111's own docstring examples (modules/prompt_parser.py).
@pytest.mark.parametrize("text, expected", [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.573), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
      (", sun, ", 1.1), ("sky", 1.4641), (".", 1.1)]),
])
def test_parse_a1111_docstring_examples(text, expected):
    assert parse_prompt_attention(text) == approx(expected)


@pytest.mark.parametrize("text, expected", [
    ("((word))", [("word", 1.21)]),
    ("[word]", [("word", 1 / 1.1)]),
    ("[[word]]", [("word", 1 / 1.21)]),
    ("(word:1.3)", [("word", 1.3)]),
    ("(word: 0.5 )", [("word", 0.5)]),
    ("a ((b:2) c)", [("a ", 1.0), ("b", 2.2), (" c", 1.1)]),
    ("[a (b:3)]", [("a ", 1 / 1.1), ("b", 3 / 1.1)]),
    ("x \\[y\\] \\\\z", [("x [y] \\z", 1.0)]),
    ("", [("", 1.0)]),
    ("(a:1.5) (b:1.5)", [("a", 1.5), (" ", 1.0), ("b", 1.5)]),
    ("a: b", [("a: b", 1.0)]),
])
def test_parse_weights(text, expected):
    assert parse_prompt_attention(text) == approx(expected)


def test_parse_break():
    assert parse_prompt_attention("a cat BREAK (a dog)") == approx(
        [("a cat", 1.0), ("BREAK", -1.0), ("a dog", 1.1)])
    # BREAK must be a word of its own and upper case
    assert parse_prompt_attention("BREAKFAST break") == [("BREAKFAST break", 1.0)]


# ---------------------------------------------------------------- embeddings
@pytest.fixture(scope="module")
def sd(models_dir):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(models_dir / "tiny-sd")


@pytest.fixture(scope="module")
def sdxl(models_dir):
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline.from_pretrained(models_dir / "tiny-sdxl")


def _raw_hidden(pipe, ids):
    """Last hidden state of the SD text encoder for explicit token ids."""
    with torch.no_grad():
        return pipe.text_encoder(torch.tensor([ids]))[0]


def _chunk(tok, ids):
    return [tok.bos_token_id, *ids, tok.eos_token_id] + [tok.pad_token_id] * (75 - len(ids))


@pytest.mark.slow
@pytest.mark.parametrize("prompt, negative", [
    ("a cat sitting on a mat", "blurry, lowres"),
    ("", ""),
    ("x" * 75, "y"),  # exactly 75 tokens with the byte-level tokenizer
])
def test_sd_plain_prompt_equals_diffusers(sd, prompt, negative):
    ours = encode_prompts(sd, prompt, negative, "SD")
    pos, neg = sd.encode_prompt(prompt, "cpu", 1, True, negative)
    assert set(ours) == {"prompt_embeds", "negative_prompt_embeds"}
    assert torch.equal(ours["prompt_embeds"], pos)
    assert torch.equal(ours["negative_prompt_embeds"], neg)


@pytest.mark.slow
def test_sd_bf16_plain_prompt_equals_diffusers(models_dir):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(models_dir / "tiny-sd", torch_dtype=torch.bfloat16)
    ours = encode_prompts(pipe, "a cat", "dog", "SD")
    pos, neg = pipe.encode_prompt("a cat", "cpu", 1, True, "dog")
    assert ours["prompt_embeds"].dtype == torch.bfloat16
    assert torch.equal(ours["prompt_embeds"], pos) and torch.equal(ours["negative_prompt_embeds"], neg)
    weighted = encode_prompts(pipe, "a (cat:1.2)", "dog", "SD")["prompt_embeds"]
    assert weighted.dtype == torch.bfloat16 and torch.isfinite(weighted.float()).all()


@pytest.mark.slow
def test_literal_truncated_mode_equals_diffusers(sd, sdxl):
    """parse_weights=False, max_chunks=1: what a pipe uses with prompt weighting off."""
    prompt = "a (red) house, " * 10  # 100+ tokens, brackets taken as text
    ours = encode_prompts(sd, prompt, "[x]", "SD", parse_weights=False, max_chunks=1)
    pos, neg = sd.encode_prompt(prompt, "cpu", 1, True, "[x]")
    assert torch.equal(ours["prompt_embeds"], pos) and torch.equal(ours["negative_prompt_embeds"], neg)
    ours = encode_prompts(sdxl, prompt, "[x]", "SDXL", parse_weights=False, max_chunks=1)
    ref = sdxl.encode_prompt(prompt, device="cpu", do_classifier_free_guidance=True, negative_prompt="[x]")
    keys = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds")
    for key, expected in zip(keys, ref):
        assert torch.equal(ours[key], expected), key
    # and the default mode reads the whole prompt with its weights
    assert encode_prompts(sd, prompt, "", "SD")["prompt_embeds"].shape[1] == 154


@pytest.mark.slow
def test_sdxl_plain_prompt_equals_diffusers(sdxl):
    ours = encode_prompts(sdxl, "a cat sitting on a mat", "blurry", "SDXL")
    ref = sdxl.encode_prompt("a cat sitting on a mat", device="cpu", num_images_per_prompt=1,
                             do_classifier_free_guidance=True, negative_prompt="blurry")
    keys = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds")
    assert set(ours) == set(keys)
    for key, expected in zip(keys, ref):
        assert ours[key].shape == expected.shape, key
        assert torch.equal(ours[key], expected), key


@pytest.mark.slow
def test_sdxl_clip_skip_equals_diffusers_for_the_prompt(sdxl):
    ours = encode_prompts(sdxl, "a cat", "", "SDXL", clip_skip=1)
    ref = sdxl.encode_prompt("a cat", device="cpu", do_classifier_free_guidance=True, negative_prompt="",
                             clip_skip=1)
    assert torch.equal(ours["prompt_embeds"], ref[0])
    assert torch.equal(ours["pooled_prompt_embeds"], ref[2])
    plain = encode_prompts(sdxl, "a cat", "", "SDXL")
    assert not torch.equal(plain["prompt_embeds"], ours["prompt_embeds"])


@pytest.mark.slow
def test_sdxl_none_negative_follows_force_zeros(sdxl):
    saved = sdxl.config.force_zeros_for_empty_prompt
    try:
        sdxl.register_to_config(force_zeros_for_empty_prompt=True)
        out = encode_prompts(sdxl, "a cat", None, "SDXL")
        assert torch.count_nonzero(out["negative_prompt_embeds"]) == 0
        assert torch.count_nonzero(out["negative_pooled_prompt_embeds"]) == 0
        out = encode_prompts(sdxl, "a cat", "", "SDXL")  # an explicit empty prompt is encoded
        assert torch.count_nonzero(out["negative_prompt_embeds"]) > 0
    finally:
        sdxl.register_to_config(force_zeros_for_empty_prompt=saved)


@pytest.mark.slow
def test_sd_clip_skip_uses_penultimate_layer(sd):
    tok = sd.tokenizer
    ids = _chunk(tok, tok("a cat", add_special_tokens=False).input_ids)
    with torch.no_grad():
        out = sd.text_encoder(torch.tensor([ids]), output_hidden_states=True)
        expected = sd.text_encoder.final_layer_norm(out.hidden_states[-2])
    ours = encode_prompts(sd, "a cat", "", "SD", clip_skip=1)
    assert torch.equal(ours["prompt_embeds"], expected)
    assert not torch.equal(ours["prompt_embeds"], encode_prompts(sd, "a cat", "", "SD")["prompt_embeds"])


@pytest.mark.slow
def test_long_prompt_is_chunked_and_negative_padded(sd):
    tok = sd.tokenizer
    prompt = "ab " * 60  # 120 tokens: "a", "b</w>" per word
    ids = tok(prompt, add_special_tokens=False).input_ids
    assert len(ids) == 120
    out = encode_prompts(sd, prompt, "ugly", "SD")
    assert out["prompt_embeds"].shape == (1, 154, 32)
    assert out["negative_prompt_embeds"].shape == (1, 154, 32)
    assert torch.equal(out["prompt_embeds"][:, :77], _raw_hidden(sd, _chunk(tok, ids[:75])))
    assert torch.equal(out["prompt_embeds"][:, 77:], _raw_hidden(sd, _chunk(tok, ids[75:])))
    # the negative prompt: its own chunk, then an empty chunk
    neg_ids = tok("ugly", add_special_tokens=False).input_ids
    assert torch.equal(out["negative_prompt_embeds"][:, :77], _raw_hidden(sd, _chunk(tok, neg_ids)))
    assert torch.equal(out["negative_prompt_embeds"][:, 77:], _raw_hidden(sd, _chunk(tok, [])))


@pytest.mark.slow
def test_long_negative_pads_the_positive(sdxl):
    out = encode_prompts(sdxl, "a cat", "blurry, " * 30, "SDXL")
    assert out["prompt_embeds"].shape == out["negative_prompt_embeds"].shape
    assert out["prompt_embeds"].shape[1] == 77 * 3
    assert out["pooled_prompt_embeds"].shape == (1, 32)


@pytest.mark.slow
def test_break_starts_a_new_chunk(sd):
    tok = sd.tokenizer
    out = encode_prompts(sd, "a cat BREAK a dog", "", "SD")
    assert out["prompt_embeds"].shape[1] == 154
    cat = tok("a cat", add_special_tokens=False).input_ids
    dog = tok("a dog", add_special_tokens=False).input_ids
    assert torch.equal(out["prompt_embeds"][:, :77], _raw_hidden(sd, _chunk(tok, cat)))
    assert torch.equal(out["prompt_embeds"][:, 77:], _raw_hidden(sd, _chunk(tok, dog)))


@pytest.mark.slow
def test_weighting_sdxl_a1111_ratio(sdxl):
    """SDXL's penultimate hidden states have a clear mean: A1111's rescale by a ratio."""
    plain = encode_prompts(sdxl, "a cat", "", "SDXL")["prompt_embeds"]
    assert abs(plain.mean().item()) > 0.01 * plain.abs().mean().item()
    # hand-worked: tokens BOS, a</w>, c, a, t</w>, EOS, pad...; weight 1.5 on c, a, t</w>
    weights = torch.ones(77)
    weights[2:5] = 1.5
    expected = plain * weights.reshape(1, -1, 1)
    expected = expected * (plain.mean() / expected.mean())
    out = encode_prompts(sdxl, "a (cat:1.5)", "", "SDXL")["prompt_embeds"]
    torch.testing.assert_close(out, expected)
    assert out.mean().item() == pytest.approx(plain.mean().item(), rel=1e-5)
    assert not torch.equal(out, plain)


@pytest.mark.slow
def test_weighting_zero_mean_encoder_shifts(sd):
    """The tiny SD encoder's final LayerNorm makes every token zero-mean: restore by a shift."""
    tok = sd.tokenizer
    ids = tok("a cat", add_special_tokens=False).input_ids  # a</w> c a t</w>
    z = _raw_hidden(sd, _chunk(tok, ids))
    assert abs(z.mean().item()) < 1e-6
    weights = torch.ones(77)
    weights[2:5] = 1.5  # c, a, t</w> (position 0 is BOS, 1 is "a</w>")
    expected = z * weights.reshape(1, -1, 1)
    expected = expected + (z.mean() - expected.mean())
    out = encode_prompts(sd, "a (cat:1.5)", "", "SD")["prompt_embeds"]
    torch.testing.assert_close(out, expected)
    # the weighted tokens really are 1.5x as large, the others unchanged
    ratio = out[0, 2:5].norm(dim=-1) / z[0, 2:5].norm(dim=-1)
    torch.testing.assert_close(ratio, torch.full((3,), 1.5), atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(out[0, 5:], z[0, 5:], atol=1e-5, rtol=1e-5)
    # a weight of exactly 1 changes nothing
    assert torch.equal(encode_prompts(sd, "a (cat:1.0)", "", "SD")["prompt_embeds"], z)


@pytest.mark.slow
def test_weighting_changes_sdxl_embeddings(sdxl):
    plain = encode_prompts(sdxl, "a cat", "", "SDXL")
    weighted = encode_prompts(sdxl, "a ((cat))", "", "SDXL")
    assert not torch.equal(plain["prompt_embeds"], weighted["prompt_embeds"])
    assert torch.equal(plain["pooled_prompt_embeds"], weighted["pooled_prompt_embeds"])


@pytest.mark.slow
def test_model_type_enum_and_device(sd):
    class FakeType:  # anything with .value works, like multigen.pipes.ModelType
        value = "SD"

    out = encode_prompts(sd, "a cat", "", FakeType(), device="cpu")
    assert out["prompt_embeds"].device.type == "cpu"
    assert out["prompt_embeds"].dtype == sd.text_encoder.dtype


@pytest.mark.slow
@pytest.mark.parametrize("kwargs, param", [
    ({"model_type": "FLUX"}, "model_type"),
    ({"model_type": "SD", "clip_skip": 5}, "clip_skip"),
    ({"model_type": "SD", "clip_skip": -1}, "clip_skip"),
    ({"model_type": "SD", "max_chunks": 0}, "max_chunks"),
])
def test_errors_name_the_parameter(sd, kwargs, param):
    with pytest.raises(InvalidValueError) as info:
        encode_prompts(sd, "a", "", **kwargs)
    assert info.value.param == param
    assert "Allowed" in str(info.value)


@pytest.mark.slow
def test_textual_inversion_tokens_equal_diffusers(models_dir):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(models_dir / "tiny-sd")  # own copy: the tokenizer changes
    torch.manual_seed(0)
    pipe.load_textual_inversion({"<toy>": torch.randn(2, 32)}, token="<toy>")  # a 2-vector embedding
    ours = encode_prompts(pipe, "a <toy> on a mat", "", "SD")
    pos, _ = pipe.encode_prompt("a <toy> on a mat", "cpu", 1, True, "")
    assert torch.equal(ours["prompt_embeds"], pos)
    weighted = encode_prompts(pipe, "a (<toy>:1.3) on a mat", "", "SD")["prompt_embeds"]
    assert not torch.equal(weighted, pos)


def test_tokenizers_with_short_windows_get_short_chunks():
    """A text encoder with 16 positions (the demo model's) gets chunks of 14 tokens + BOS/EOS, not 75."""
    from types import SimpleNamespace

    from multigen.pipes.prompting import _chunk_ids, chunk_tokens, tokenize_weighted

    class Tok:
        model_max_length, bos_token_id, eos_token_id, pad_token_id = 16, 0, 1, 1

        def __call__(self, text, **kwargs):
            return SimpleNamespace(input_ids=[5] * len(text.split()))

    assert chunk_tokens(Tok()) == 14
    assert chunk_tokens(SimpleNamespace(model_max_length=77)) == 75
    assert chunk_tokens(SimpleNamespace(model_max_length=int(1e30))) == 75  # "no limit" tokenizers
    chunks = tokenize_weighted(None, Tok(), "w " * 20)
    assert [len(c.tokens) for c in chunks] == [14, 6]
    ids, weights, mask = _chunk_ids(Tok(), chunks[1])
    assert len(ids) == len(weights) == len(mask) == 16 and ids[:2] == [0, 5] and ids[7] == 1


def test_brackets_past_the_depth_limit_weigh_nothing_and_the_parse_stays_linear():
    from multigen.pipes.prompting import MAX_ATTENTION_DEPTH

    def nested(n: int) -> float:
        w = 1.0
        for _ in range(n):
            w *= 1.1
        return w

    deep = MAX_ATTENTION_DEPTH + 8
    # the 8 innermost brackets are ignored with their closing ones; the text after them is outside them all
    assert parse_prompt_attention("(" * deep + "x" + ")" * deep + " y") == [("x", nested(MAX_ATTENTION_DEPTH)),
                                                                          (" y", 1.0)]
    assert parse_prompt_attention("(" * deep + "x:2)" + ")" * (deep - 1)) == [("x", nested(MAX_ATTENTION_DEPTH))]
    assert parse_prompt_attention("[" * deep + "x" + "]" * deep) == parse_prompt_attention(
        "[" * MAX_ATTENTION_DEPTH + "x" + "]" * MAX_ATTENTION_DEPTH)
    # within the limit nothing changed: A1111's weights, exactly
    assert parse_prompt_attention("((a:1.5) b)") == [("a", 1.5 * 1.1), (" b", 1.1)]
    # what took seconds (every bracket multiplying the fragments after it) is bounded by 2 x 32 per fragment
    worst = ("(" * 5000 + "a(" * 5000 + ")" * 10000)[:20000]
    parts = parse_prompt_attention(worst)
    assert len(parts) == 1 and parts[0][0] == "a" * 5000 and parts[0][1] == nested(MAX_ATTENTION_DEPTH)
