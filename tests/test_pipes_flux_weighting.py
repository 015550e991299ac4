"""T5 prompt weighting (pipes/weighting.py) and Flux's prompt encoding, negative prompt and true_cfg_scale.

The tokenizer tests use the tiny T5 and CLIP tokenizers built in code (fast); the rest runs the
tiny Flux model (models/tiny-flux) and is marked slow.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from multigen.pipes import ModelType, Prompt2ImPipe, load_base
from multigen.pipes.errors import InvalidValueError
from multigen.pipes.families import FLUX
from multigen.pipes.model_builder import FLUX_DIR
from multigen.pipes.tiny.common import make_t5_tokenizer, make_tokenizer
from multigen.pipes.weighting import apply_weights, special_tokens, weighted_tokens
from pipes_fixtures import one_thread, pixels, sd_base  # noqa: F401

SIZE = 64


def _diffusers_ids(tokenizer, text: str, length: int) -> list[int]:
    """The ids FluxPipeline gives T5 (its _get_t5_prompt_embeds' tokenizer call)."""
    return tokenizer(text, padding="max_length", max_length=length, truncation=True).input_ids


# ---- tokens and weights (no model) ------------------------------------------------------------------

def test_special_tokens_are_found_for_t5_and_clip():
    t5, clip = make_t5_tokenizer(), make_tokenizer()
    assert special_tokens(t5) == ([], [t5.eos_token_id])
    assert special_tokens(clip) == ([clip.bos_token_id], [clip.eos_token_id])


@pytest.mark.parametrize("text", ["a red cat", "", "a photo, 35mm: dusk"])
def test_an_unweighted_prompt_gives_the_pipelines_own_ids(text):
    t5 = make_t5_tokenizer()
    tokens = weighted_tokens(text, t5, 32)
    assert list(tokens.ids) == _diffusers_ids(t5, text, 32)
    assert not tokens.weighted and tokens.dropped == 0
    assert tokens.mask == tuple(1 if i < len(t5(text).input_ids) else 0 for i in range(32))


def test_a_weight_applies_to_exactly_its_fragments_tokens():
    t5 = make_t5_tokenizer()
    tokens = weighted_tokens("a (red:1.5) cat", t5, 16)
    red = t5("red", add_special_tokens=False).input_ids
    assert list(tokens.ids) == _diffusers_ids(t5, "a red cat", 16)  # the same words, now weighted
    assert tokens.weights[1:1 + len(red)] == (1.5,) * len(red)
    assert set(tokens.weights[:1] + tokens.weights[1 + len(red):]) == {1.0}
    # A1111 syntax from the one parser: (x) is 1.1, [x] 1/1.1, BREAK adds no token
    nested = weighted_tokens("((a)) [b] BREAK c", t5, 16)
    assert nested.weights[:3] == pytest.approx((1.21, 1 / 1.1, 1.0))
    assert list(nested.ids) == _diffusers_ids(t5, "a b c", 16)
    literal = weighted_tokens("a (red:1.5) cat", t5, 32, parse_weights=False)
    assert list(literal.ids) == _diffusers_ids(t5, "a (red:1.5) cat", 32) and not literal.weighted


def test_a_long_prompt_is_cut_as_the_pipeline_cuts_it():
    t5 = make_t5_tokenizer()
    text = "a (very:1.2) long prompt " * 4
    tokens = weighted_tokens(text, t5, 20)
    assert len(tokens.ids) == 20 and tokens.ids[-1] == t5.eos_token_id
    assert list(tokens.ids) == _diffusers_ids(t5, text.replace("(very:1.2)", "very"), 20)
    assert tokens.dropped == len(t5(text.replace("(very:1.2)", "very"), add_special_tokens=False).input_ids) - 19
    with pytest.raises(InvalidValueError) as e:
        weighted_tokens(text, t5, 0)
    assert e.value.param == "max_sequence_length" and "0" in str(e.value)


def test_left_padding_tokenizers_pad_before_the_prompt():
    t5 = make_t5_tokenizer()
    t5.padding_side = "left"
    tokens = weighted_tokens("a (b:2)", t5, 8)
    assert tokens.ids[-3:] == (*t5("a b", add_special_tokens=False).input_ids, t5.eos_token_id)
    assert tokens.mask == (0,) * 5 + (1,) * 3 and tokens.weights[-2] == 2.0


def test_weights_scale_embeddings_and_ones_change_nothing():
    hidden = torch.randn(1, 4, 3, dtype=torch.bfloat16)
    assert apply_weights(hidden, [1.0] * 4) is hidden
    scaled = apply_weights(hidden, [1.0, 2.0, 0.5, 1.0])
    assert scaled.dtype == torch.bfloat16
    assert torch.equal(scaled[:, [0, 3]], hidden[:, [0, 3]])
    assert torch.equal(scaled[:, 1], (hidden[:, 1].float() * 2).to(torch.bfloat16))


# ---- Flux: embeddings (tiny-flux) --------------------------------------------------------------------

@pytest.fixture(scope="module")
def flux_base(models_dir):
    base, kind = load_base(models_dir / FLUX_DIR, dtype="float32")
    assert kind is ModelType.FLUX
    return base


@pytest.fixture()
def flux(flux_base):
    pipe = Prompt2ImPipe(pipe=flux_base)
    pipe.setup(width=SIZE, height=SIZE, steps=2)
    return pipe


def _theirs(base, text: str, length: int = 512):
    """diffusers' own FluxPipeline.encode_prompt, as its __call__ runs it (no grad)."""
    with torch.no_grad():
        embeds, pooled, _ = base.encode_prompt(text, device="cpu", max_sequence_length=length)
    return embeds, pooled


def test_flux_declares_weighting_and_its_encoder():
    assert FLUX.weighted_prompts and FLUX.encode_prompt is not None
    assert {"true_cfg_scale", "max_sequence_length"} <= FLUX.params


@pytest.mark.slow
def test_unweighted_prompts_give_diffusers_own_embeddings(flux, flux_base):
    ours = FLUX.encode_prompt(flux, "a red cat on a mat", None)
    embeds, pooled = _theirs(flux_base, "a red cat on a mat")
    assert set(ours) == {"prompt_embeds", "pooled_prompt_embeds"}
    assert torch.equal(ours["prompt_embeds"], embeds) and torch.equal(ours["pooled_prompt_embeds"], pooled)
    # lpw off: the text is read literally, brackets and all, exactly as diffusers reads it
    flux.setup(width=SIZE, height=SIZE, steps=2, lpw=False)
    literal = FLUX.encode_prompt(flux, "a (red:1.5) cat", None)
    embeds, pooled = _theirs(flux_base, "a (red:1.5) cat")
    assert torch.equal(literal["prompt_embeds"], embeds) and torch.equal(literal["pooled_prompt_embeds"], pooled)


@pytest.mark.slow
def test_a_weight_scales_exactly_its_tokens_t5_embeddings(flux, flux_base):
    plain = FLUX.encode_prompt(flux, "a red cat", None)
    weighted = FLUX.encode_prompt(flux, "a (red:1.5) cat", None)
    red = flux_base.tokenizer_2("red", add_special_tokens=False).input_ids
    rows = list(range(1, 1 + len(red)))  # after "a"
    changed = (weighted["prompt_embeds"] != plain["prompt_embeds"]).any(dim=-1)[0].nonzero().flatten().tolist()
    assert changed == rows
    torch.testing.assert_close(weighted["prompt_embeds"][0, rows], plain["prompt_embeds"][0, rows] * 1.5)
    # CLIP's pooled vector reads the text without the syntax: no tokens to weight there
    assert torch.equal(weighted["pooled_prompt_embeds"], plain["pooled_prompt_embeds"])


@pytest.mark.slow
def test_a_weight_changes_the_image_and_a_batch_runs(flux):
    plain = pixels(flux.gen({"prompt": "a red cat", "seed": 4})[0])
    weighted = flux.gen({"prompt": "a (red:1.5) cat", "seed": 4})
    assert not np.array_equal(plain, pixels(weighted[0])) and flux.warnings == []
    batch = flux.gen({"prompt": "a (red:1.5) cat", "seed": [4, 5]})
    assert len(batch) == 2 and not np.array_equal(pixels(batch[0]), pixels(batch[1]))


@pytest.mark.slow
def test_a_prompt_longer_than_max_sequence_length_is_cut_with_a_warning(flux, flux_base):
    flux.setup(width=SIZE, height=SIZE, steps=2, max_sequence_length=24)
    text = "a cat on a mat in the sun " * 3
    ours = FLUX.encode_prompt(flux, text, None)
    embeds, _ = _theirs(flux_base, text, 24)  # diffusers cuts it the same way
    assert torch.equal(ours["prompt_embeds"], embeds)
    assert flux.gen({"prompt": text, "seed": 1})[0].size == (SIZE, SIZE)
    assert any("longer than max_sequence_length 24" in w for w in flux.warnings)
    assert flux.get_config()["warnings"] == flux.warnings
    flux.gen({"prompt": "a cat", "seed": 1})
    assert flux.warnings == []


@pytest.mark.slow
def test_max_sequence_length_sets_the_t5_length_and_512_is_the_most(flux):
    assert FLUX.encode_prompt(flux, "a cat", None)["prompt_embeds"].shape[1] == 512  # Flux's default
    flux.setup(width=SIZE, height=SIZE, steps=2, max_sequence_length=64)
    assert FLUX.encode_prompt(flux, "a cat", None)["prompt_embeds"].shape[1] == 64
    flux.setup(width=SIZE, height=SIZE, steps=2, max_sequence_length=600)
    with pytest.raises(InvalidValueError) as e:
        flux.gen({"prompt": "a cat", "seed": 1})
    assert e.value.param == "max_sequence_length" and "600" in str(e.value) and "512" in e.value.allowed


# ---- negative prompt and true_cfg_scale ----------------------------------------------------------------

@pytest.mark.slow
def test_true_cfg_scale_with_a_negative_prompt_changes_the_image(flux, flux_base):
    base = pixels(flux.gen({"prompt": "a lab", "seed": 6})[0])
    # without true_cfg_scale the negative prompt is unused, and the job says so
    same = pixels(flux.gen({"prompt": "a lab", "negative_prompt": "(blurry:1.3)", "seed": 6})[0])
    assert np.array_equal(base, same) and any("true_cfg_scale" in w for w in flux.warnings)
    flux.setup(width=SIZE, height=SIZE, steps=2, true_cfg_scale=4.0)
    kwargs = FLUX.encode_prompt(flux, "a lab", "(blurry:1.3)")
    negative, _ = _theirs(flux_base, "blurry")
    assert set(kwargs) == {"prompt_embeds", "pooled_prompt_embeds", "negative_prompt_embeds",
                           "negative_pooled_prompt_embeds"}
    assert not torch.equal(kwargs["negative_prompt_embeds"], negative)  # weighted too
    cfg = pixels(flux.gen({"prompt": "a lab", "negative_prompt": "(blurry:1.3)", "seed": 6})[0])
    assert not np.array_equal(base, cfg) and flux.warnings == []
    assert flux.get_config()["true_cfg_scale"] == 4.0
    # true_cfg_scale without a negative prompt: nothing to guide away from, said so
    alone = pixels(flux.gen({"prompt": "a lab", "seed": 6})[0])
    assert np.array_equal(base, alone) and any("negative prompt" in w for w in flux.warnings)


@pytest.mark.slow
def test_true_cfg_scale_is_refused_on_sd(sd_base):
    pipe = Prompt2ImPipe(pipe=sd_base)
    with pytest.raises(InvalidValueError) as e:
        pipe.setup(width=SIZE, height=SIZE, steps=2, true_cfg_scale=4.0)
    assert e.value.param == "true_cfg_scale" and "SD" in str(e.value) and "FLUX" in str(e.value)
