"""Cfgen and the prompt grammar (pure Python, no models)."""
from __future__ import annotations

import random

import pytest

from multigen.pipes.cfgen import MAX_SEED, Cfgen, expand_prompt, validate_grammar
from multigen.pipes.errors import InvalidValueError, PipeError


def test_plain_string_is_itself():
    assert expand_prompt("a red house", 7) == "a red house"


def test_top_level_list_is_joined_with_commas():
    assert expand_prompt(["a house", "red", "at night"], 0) == "a house, red, at night"
    # a leading "+" at the top level changes nothing
    assert expand_prompt(["+", "a house", "red"], 0) == "a house, red"


def test_plus_list_joins_with_space():
    assert expand_prompt(["a", ["+", "very", "red", "house"]], 3) == "a, very red house"


def test_choice_follows_random_with_seed():
    options = ["cat", "dog", "bird"]
    for seed in range(20):
        # hand-worked: one choice, made by random.Random(seed).randrange(3)
        expected = options[random.Random(seed).randrange(3)]
        assert expand_prompt(["a", options], seed) == f"a, {expected}"


def test_choice_reaches_every_option():
    seen = {expand_prompt([["cat", "dog", "bird"]], seed) for seed in range(60)}
    assert seen == {"cat", "dog", "bird"}


def test_optional_item_probability_0_and_1():
    assert expand_prompt(["house", {"w": "red", "p": 1.0}, {"w": "blue", "p": 0}], 5) == "house, red"


def test_optional_item_is_drawn_with_its_probability():
    hits = sum(expand_prompt(["x", {"w": "y", "p": 0.25}], s) == "x, y" for s in range(2000))
    assert 400 < hits < 600
    # hand-worked for one seed: first draw of Random(seed) against p
    for seed in range(10):
        present = random.Random(seed).random() < 0.25
        assert expand_prompt(["x", {"w": "y", "p": 0.25}], seed) == ("x, y" if present else "x")


def test_nesting_is_deterministic_per_seed():
    grammar = ["portrait", ["+", ["old", "young"], ["man", "woman"]],
               {"w": ["oil painting", ["+", "pencil", "sketch"]], "p": 0.5}]
    for seed in range(30):
        rng = random.Random(seed)
        age = ["old", "young"][rng.randrange(2)]
        who = ["man", "woman"][rng.randrange(2)]
        parts = ["portrait", f"{age} {who}"]
        if rng.random() < 0.5:
            parts.append(["oil painting", "pencil sketch"][rng.randrange(2)])
        assert expand_prompt(grammar, seed) == ", ".join(parts)
        assert expand_prompt(grammar, seed) == expand_prompt(grammar, seed)


@pytest.mark.parametrize("bad, where", [
    (42, "prompt"),
    (["a", None], "prompt[1]"),
    (["a", []], "prompt[1]"),
    (["a", {"w": "x"}], "prompt[1]"),
    (["a", {"w": "x", "p": 2}], "prompt[1].p"),
    (["a", {"w": "x", "p": "often"}], "prompt[1].p"),
    (["a", {"w": "x", "p": 0.5, "q": 1}], "prompt[1]"),
    (["a", ["b", {"w": 3, "p": 0.5}]], "prompt[1][1].w"),
])
def test_bad_shapes_name_prompt_and_the_path(bad, where):
    with pytest.raises(InvalidValueError) as info:
        expand_prompt(bad, 0)
    assert info.value.param == "prompt"
    assert isinstance(info.value, PipeError)
    assert where in str(info.value)
    assert "Allowed" in str(info.value)


def _nested(depth: int) -> object:
    grammar: object = "a"
    for _ in range(depth):
        grammar = [grammar] if depth % 2 else {"w": grammar, "p": 0.5}
    return grammar


def test_grammar_size_is_capped_in_items_depth_and_characters():
    """The caps of the API's request models are validate_grammar's: Cfgen and queue_gen callers get them too."""
    from multigen.pipes.spec import MAX_GRAMMAR_DEPTH, MAX_GRAMMAR_ITEMS, MAX_PROMPT_CHARS

    too_big = [
        ([[""] for _ in range(100_001)], MAX_GRAMMAR_ITEMS, "items"),  # no character at all
        ([{"w": "", "p": 0.5} for _ in range(MAX_GRAMMAR_ITEMS)], MAX_GRAMMAR_ITEMS, "items"),
        ("x" * (MAX_PROMPT_CHARS + 1), MAX_PROMPT_CHARS, "characters"),
        (["x" * 15000, ["y" * 15000]], MAX_PROMPT_CHARS, "characters"),
        (_nested(MAX_GRAMMAR_DEPTH + 1), MAX_GRAMMAR_DEPTH, "deep"),
        (_nested(MAX_GRAMMAR_DEPTH + 2), MAX_GRAMMAR_DEPTH, "deep"),
        (_nested(100_000), MAX_GRAMMAR_DEPTH, "deep"),  # no RecursionError
    ]
    for grammar, cap, word in too_big:
        for param in ("prompt", "negative_prompt"):
            with pytest.raises(InvalidValueError) as info:
                validate_grammar(grammar, param)
            assert info.value.param == param and str(cap) in str(info.value) and word in str(info.value)
        with pytest.raises(InvalidValueError):
            Cfgen(grammar, "")
    # at the caps
    validate_grammar(["a"] * (MAX_GRAMMAR_ITEMS - 1))
    validate_grammar("x" * MAX_PROMPT_CHARS)
    validate_grammar(_nested(MAX_GRAMMAR_DEPTH))
    assert expand_prompt(_nested(MAX_GRAMMAR_DEPTH - 1), 0) == "a"


def test_validate_negative_prompt_param_name():
    with pytest.raises(InvalidValueError) as info:
        validate_grammar([1], "negative_prompt")
    assert info.value.param == "negative_prompt"


def test_cfgen_cycles_given_seeds():
    gen = Cfgen("a house", "blurry", seeds=[11, 22, 33], max_count=5)
    items = list(gen)
    assert [seed for _, seed in items] == [11, 22, 33, 11, 22]
    inputs, seed = items[0]
    assert inputs == {"prompt": "a house", "negative_prompt": "blurry", "seed": 11}
    assert gen.count == 5


def test_cfgen_one_round_of_seeds_without_max_count():
    assert [s for _, s in Cfgen("x", seeds=[5, 6])] == [5, 6]


def test_cfgen_same_seed_same_prompt():
    grammar = ["a", ["cat", "dog", "bird", "fish"], {"w": "in snow", "p": 0.5}]
    neg = [["blurry", "ugly"]]
    gen = Cfgen(grammar, neg, seeds=[3, 9, 3, 9])
    items = list(gen)
    assert items[0] == items[2] and items[1] == items[3]
    for inputs, seed in items:
        assert inputs["prompt"] == expand_prompt(grammar, seed)
        assert inputs["negative_prompt"] == expand_prompt(neg, seed)
        assert inputs["seed"] == seed


def test_cfgen_draws_seeds_and_can_be_extended():
    gen = Cfgen("x", rng=random.Random(1), max_count=3)
    seeds = [s for _, s in gen]
    assert len(seeds) == 3 and all(0 <= s <= MAX_SEED for s in seeds)
    assert len(set(seeds)) == 3
    assert list(gen) == []  # exhausted
    gen.max_count += 2  # what GenSession does to add images
    assert len(list(gen)) == 2
    # same rng seed -> same drawn seeds
    assert [s for _, s in Cfgen("x", rng=random.Random(1), max_count=3)] == seeds


def test_cfgen_unlimited_without_seeds_and_count():
    gen = Cfgen("x", rng=random.Random(2))
    assert len([next(gen) for _ in range(7)]) == 7


def test_cfgen_extra_inputs_are_copied():
    inputs, _ = next(Cfgen("x", seeds=[1], guidance=3))
    assert inputs["guidance"] == 3


@pytest.mark.parametrize("kwargs, param", [
    ({"prompt": {"p": 1}}, "prompt"),
    ({"prompt": "x", "negative_prompt": 5}, "negative_prompt"),
    ({"prompt": "x", "seeds": [1, -1]}, "seeds"),
    ({"prompt": "x", "seeds": "123"}, "seeds"),
    ({"prompt": "x", "max_count": -1}, "max_count"),
])
def test_cfgen_rejects_bad_arguments(kwargs, param):
    with pytest.raises(InvalidValueError) as info:
        Cfgen(**kwargs)
    assert info.value.param == param
