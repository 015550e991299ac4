"""Property tests (hypothesis) of the prompt's text tools: A1111 weighting (``pipes/prompting.py``,
``pipes/weighting.py``), the Cfgen grammar (``pipes/cfgen.py``), wildcards and ``[[...]]`` arrays
(``service/prompt_tools.py``), styles (``service/styles.py``), ``<lora:...>`` tags (``service/loratags.py``),
the tiny models' real tokenizers, and the HTTP API (sessions, the A1111 and OpenAI dialects) on fake pipes
(nothing is drawn).

The properties: only the project's bad-input errors escape (``PipeError``/``InvalidInput``/``ConfigError``,
a 4xx naming its field through the API, never a 5xx); results are the same for the same seed; everything
ends fast (hypothesis' deadline per example; the worst inputs the caps allow, timed); round trips (a plain
prompt reads as itself).

Profiles (``HYPOTHESIS_PROFILE``; CI=true picks ``ci``):

- ``ci``: derandomized (the same examples every run, reproducible), few examples: this file takes ~15 s.
- ``dev`` (default elsewhere): random examples, as many as ``ci``.
- ``long``: 20x the examples, random, no deadline (a slow machine shares its cores), for a local hunt (~2.5 min)::

      HYPOTHESIS_PROFILE=long .venv/bin/python -m pytest -p no:cacheprovider tests/test_properties.py -q

The profiles are applied per test (``settings(parent=...)``), never loaded globally, so they change no other
test that uses hypothesis (schemathesis). No example database is written (``database=None``): a failure
prints its example, and ``@example(...)`` keeps it.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import string
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, event, example, given, settings
from hypothesis import strategies as st

from helpers_service import open_session, wait_job
from multigen.pipes.cfgen import Cfgen, expand_prompt, validate_grammar
from multigen.pipes.errors import InvalidValueError, PipeError
from multigen.pipes.prompting import BREAK_WEIGHT, parse_prompt_attention, strip_weighting
from multigen.pipes.spec import MAX_GRAMMAR_DEPTH, MAX_GRAMMAR_ITEMS, MAX_LORAS, MAX_PROMPT_CHARS
from multigen.pipes.prompting import chunk_tokens, tokenize_weighted
from multigen.pipes.weighting import plain_text, template_tokens, weighted_tokens
from multigen.service import prompt_tools as pt
from multigen.service.errors import ConfigError, InvalidInput
from multigen.service.loratags import LORA_TAG_RE, split_lora_tags
from multigen.service.styles import PLACEHOLDER, RANDOM, StyleLibrary, builtin_styles, merge, read_style_file

# ---- profiles -------------------------------------------------------------------------------------------------
settings.register_profile("ci", derandomize=True, database=None, deadline=500, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
settings.register_profile("dev", database=None, deadline=500,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
settings.register_profile("long", database=None, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
PROFILE = os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if os.environ.get("CI") == "true" else "dev")
SCALE = 20 if PROFILE == "long" else 1


def props(n: int, **kwargs: Any) -> settings:
    """This file's profile with ``n`` examples (``long``: 20x)."""
    return settings(settings.get_profile(PROFILE), max_examples=n * SCALE, **kwargs)


BUILTIN = pt.builtin_library()
#: the characters of the prompt syntaxes, with a little text around them
SYNTAX = "()[]:\\,._-/ <>{}|\n" + "ab1" + "É猫\ue000"  # U+E000: weighting's stand-in for the prompt
syntax_text = st.text(alphabet=SYNTAX, max_size=60)
#: fragments that make the syntaxes more often than characters drawn one at a time
FRAGMENTS = ["(", ")", "[", "]", "[[", "]]", "(word:1.3)", ":0.5)", ":-2)", ":1.2.3)", "\\(", "\\)", "\\\\", "\\",
             " BREAK ", "BREAK", "__", "__color__", "__animal__", "__a/b__", "__../x__", "__/etc/passwd__",
             "__a.b__", "__nope__", "__c:\\x__", "[[a, b]]", "[[x]]", ", ", "<lora:", "<lora:x:0.5>",
             "<lyco:y>", "<lora:z:nan>", "<lora:q:1e999>", ">", "<lora:tiny-sd-lora:nan>", "<lora:tiny-sd-lora:-inf>",
             "<lora:tiny-sd-lora:0.5>", "<lora:tiny-sdxl-lora>", "<LORA:tiny-sd-lora:1:2>", "{prompt}", "{", "}",
             "cat", " "]
prompts = st.one_of(syntax_text, st.lists(st.sampled_from(FRAGMENTS) | syntax_text, max_size=12).map("".join))


def _timed(fn: Any, *args: Any, limit: float = 1.0) -> Any:
    start = time.perf_counter()
    out = fn(*args)
    took = time.perf_counter() - start
    assert took < limit, f"{getattr(fn, '__name__', fn)} took {took:.2f}s on {len(str(args[0]))} characters"
    return out


# ---- A1111 prompt weighting ------------------------------------------------------------------------------------
@props(150)
@given(prompts)
@example("(a:" + "9" * 400 + ")")  # a weight past float's range: inf, NaN embeddings (now read as 1.0)
@example("((a:0):99)")
def test_weighting_parses_any_text_into_fragments_of_finite_weight(text):
    parts = parse_prompt_attention(text)
    assert parts and all(isinstance(t, str) and isinstance(w, float) for t, w in parts)
    assert all(math.isfinite(w) for _, w in parts), parts
    assert parse_prompt_attention(text) == parts  # no state between calls
    # the text's characters survive, syntax aside: every fragment's text is in the prompt's letters
    letters = set(text)
    assert all(set(t) <= letters | set("BREAK") for t, _ in parts)
    # adjacent fragments of one weight are merged (BREAK markers apart)
    assert all(a[1] != b[1] or BREAK_WEIGHT in (a[1], b[1]) for a, b in zip(parts, parts[1:]))
    stripped = strip_weighting(text)
    assert stripped == stripped.strip() and "  " not in stripped
    plain, weights = plain_text(text)
    assert len(plain) == len(weights) and all(math.isfinite(w) for w in weights)


@props(100)
@given(st.text(alphabet=st.characters(blacklist_characters="()[]:\\", blacklist_categories=("Cs",)), max_size=80))
def test_a_prompt_without_weighting_syntax_reads_as_itself(text):
    assume("BREAK" not in text)
    assert parse_prompt_attention(text) == [(text, 1.0)]
    assert plain_text(text) == (text, (1.0,) * len(text))
    stripped = strip_weighting(text)  # only runs of whitespace are collapsed
    assert stripped.split() == text.split() and stripped == stripped.strip()


@props(100)
@given(prompts)
def test_weighting_off_leaves_any_prompt_unchanged(text):
    assert plain_text(text, parse_weights=False) == (text, (1.0,) * len(text))


@props(100)
@given(st.lists(st.tuples(st.text(alphabet=string.ascii_letters + " ", min_size=1, max_size=10),
                          st.floats(0.0, 10.0).map(lambda w: round(w, 2))), min_size=1, max_size=6))
def test_explicit_weights_round_trip(pieces):
    text = "".join(f"({word}:{weight})" for word, weight in pieces)
    plain, weights = plain_text(text)
    assert plain == "".join(word for word, _ in pieces)
    expected = [w for word, weight in pieces for w in [float(weight)] * len(word)]
    assert list(weights) == expected


@props(60)
@given(st.integers(1, 60), st.sampled_from(["(", "["]))
def test_nesting_multiplies_and_an_unclosed_bracket_runs_to_the_end(depth, bracket):
    from multigen.pipes.prompting import MAX_ATTENTION_DEPTH

    parts = parse_prompt_attention(bracket * depth + "x")
    assert [t for t, _ in parts] == ["x"]
    factor = 1.1 if bracket == "(" else 1 / 1.1
    # brackets past MAX_ATTENTION_DEPTH weigh nothing (they keep the parse linear)
    assert math.isclose(parts[0][1], factor ** min(depth, MAX_ATTENTION_DEPTH), rel_tol=1e-9)


@props(100)
@given(prompts)
@example("[[[[a,b]]]]")
def test_escaped_arrays_are_no_arrays_and_weigh_the_same(text):
    escaped = pt.escape_arrays(text)
    assert not pt.arrays(escaped)
    def weighed(t: str) -> list[tuple[str, float]]:
        plain, weights = plain_text(t)
        return [(c, w) for c, w in zip(plain, weights) if not c.isspace()]
    assert weighed(escaped) == weighed(text)


@pytest.fixture(scope="module")
def tokenizers(models_dir):
    """The tiny models' real tokenizers: CLIP (tiny-sd) and T5 (tiny-flux's second)."""
    from transformers import AutoTokenizer

    return (AutoTokenizer.from_pretrained(models_dir / "tiny-sd" / "tokenizer"),
            AutoTokenizer.from_pretrained(models_dir / "tiny-flux" / "tokenizer_2"))


@pytest.mark.slow
@props(60)
@given(text=prompts, max_length=st.integers(0, 40), parse=st.booleans())
def test_weighted_tokens_fill_the_sequence_with_finite_weights(tokenizers, text, max_length, parse):
    clip, t5 = tokenizers
    chunks = tokenize_weighted(None, clip, text, parse_weights=parse)
    assert chunks and all(len(c.tokens) == len(c.weights) <= chunk_tokens(clip) for c in chunks)
    assert all(math.isfinite(w) for c in chunks for w in c.weights)
    try:
        tokens = weighted_tokens(text, t5, max_length, parse_weights=parse)
    except InvalidValueError as e:  # no room for T5's </s>
        assert max_length == 0 and e.param == "max_sequence_length"
        return
    assert len(tokens.ids) == len(tokens.weights) == len(tokens.mask) == max_length and tokens.dropped >= 0
    assert all(math.isfinite(w) for w in tokens.weights) and (parse or not tokens.weighted)
    inside = template_tokens(text, t5, "Describe: {} now.".format, max_length, parse_weights=parse)
    assert len(inside.ids) == len(inside.weights) <= max_length and inside.dropped >= 0


@pytest.mark.slow
@props(60)
@given(text=st.text(alphabet=string.ascii_letters + " ,.!'-" + "é", max_size=120), max_length=st.integers(2, 64))
def test_a_prompt_without_weights_is_tokenized_as_the_pipeline_does(tokenizers, text, max_length):
    assume("BREAK" not in text)
    _, t5 = tokenizers
    tokens = weighted_tokens(text, t5, max_length)
    own = t5(text, padding="max_length", max_length=max_length, truncation=True).input_ids
    assert list(tokens.ids) == list(own) and not tokens.weighted


# ---- the Cfgen grammar ------------------------------------------------------------------------------------------
words = st.text(alphabet=string.ascii_letters + " ,+", max_size=8)
grammars = st.recursive(
    words,
    lambda inner: st.one_of(
        st.lists(inner, min_size=1, max_size=4),
        st.lists(inner, min_size=1, max_size=4).map(lambda items: ["+", *items]),
        st.fixed_dictionaries({"w": inner, "p": st.floats(0.0, 1.0)})),
    max_leaves=30)
#: any JSON value (what a request body may hold where a grammar goes)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**30, 10**30) | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=10) | st.just("+") | st.sampled_from(FRAGMENTS),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(["w", "p", "x"]), inner, max_size=3),
    max_leaves=25)


@props(150)
@given(grammars, st.integers(0, 2**64 - 1))
def test_a_valid_grammar_expands_the_same_for_the_same_seed(grammar, seed):
    validate_grammar(grammar)
    prompt = expand_prompt(grammar, seed)
    assert isinstance(prompt, str) and prompt == expand_prompt(grammar, seed)
    # never longer than its strings together with their separators
    assert len(prompt) <= len(json.dumps(grammar))
    gen = Cfgen(grammar, grammar, seeds=[seed, seed])
    (first, s1), (second, s2) = list(gen)
    assert s1 == s2 == seed and first == second and first["prompt"] == prompt == first["negative_prompt"]


@props(200)
@given(json_values)
@example([{"w": "a", "p": 10**400}])  # float(p) overflowed: an OverflowError, a 500
@example([{"w": "a", "p": math.nan}])
@example({"w": ["x", []], "p": 0.5})
def test_any_json_value_is_a_grammar_or_an_invalid_value_naming_the_param(value):
    try:
        validate_grammar(value, "negative_prompt")
    except InvalidValueError as e:
        assert e.param == "negative_prompt" and "negative_prompt" in str(e)
        return
    assert isinstance(expand_prompt(value, 7), str)


@props(30)
@given(st.integers(MAX_GRAMMAR_DEPTH + 1, 20000), st.sampled_from(["list", "dict", "concat"]))
def test_deep_grammars_hit_the_depth_cap_not_the_recursion_limit(depth, kind):
    wrap = {"list": lambda g: [g], "dict": lambda g: {"w": g, "p": 1}, "concat": lambda g: ["+", g]}[kind]
    grammar: Any = "x"
    for _ in range(depth):
        grammar = wrap(grammar)
    with pytest.raises(InvalidValueError, match=f"more than {MAX_GRAMMAR_DEPTH} levels") as e:
        _timed(validate_grammar, grammar)
    assert e.value.param == "prompt"


@props(20)
@given(st.integers(MAX_GRAMMAR_ITEMS + 1, 200000), st.sampled_from([[""], "", ["+"]]))
def test_wide_grammars_hit_the_item_cap_fast(width, item):
    with pytest.raises(InvalidValueError, match=f"more than {MAX_GRAMMAR_ITEMS} items"):
        _timed(validate_grammar, [item] * width)


def test_the_largest_grammar_the_caps_allow_validates_and_expands_fast():
    chars = MAX_PROMPT_CHARS // (MAX_GRAMMAR_ITEMS // 2)
    grammar = [["x" * chars] for _ in range(MAX_GRAMMAR_ITEMS // 2 - 1)]
    _timed(validate_grammar, grammar)
    assert len(_timed(expand_prompt, grammar, 1)) > MAX_PROMPT_CHARS // 2
    deepest: Any = "x"
    for _ in range(MAX_GRAMMAR_DEPTH // 2 - 1):  # each round: a list and a dict
        deepest = [deepest, {"w": deepest, "p": 0.5}]  # shared objects: 2**15 items as it is walked
    with pytest.raises(InvalidValueError, match="items"):
        _timed(validate_grammar, deepest)


# ---- wildcards and [[...]] arrays --------------------------------------------------------------------------------
@props(150)
@given(prompts, st.integers(0, 2**64 - 1), st.integers(0, 10**6), st.booleans())
@example("__../x__", 0, 0, False)
@example("__x\\y__", 0, 0, False)
@example("__color____animal__", 1, 0, True)
@example("__a" + "_a" * 10000, 0, 0, False)  # the cap's 20000 characters, no closing __
@example("__color__ " * 2000, 3, 0, False)
def test_wildcards_in_any_text_expand_or_name_the_field(text, seed, index, in_order):
    try:
        _timed(pt.check_wildcards, text, BUILTIN, "negative_prompt")
    except InvalidInput as e:
        assert e.field == "negative_prompt" and e.http_status == 400
        with pytest.raises(PipeError):  # what queue time refuses, run time cannot expand either
            pt.expand_wildcards(text, BUILTIN, seed, index, in_order, "negative_prompt")
        return
    out = _timed(pt.expand_wildcards, text, BUILTIN, seed, index, in_order, "negative_prompt")
    assert out == pt.expand_wildcards(text, BUILTIN, seed, index, in_order, "negative_prompt")
    assert not pt.WILDCARD_RE.search(out) or out == text and not pt.wildcard_names(text)


@props(150)
@given(prompts, st.integers(0, 10**6))
@example("[[" + "," * 20000, 0)  # the array pattern backtracked quadratically: seconds per call
def test_arrays_in_any_text_count_and_apply_fast(text, index):
    entries = _timed(pt.arrays, text)
    n = pt.combinations(text)
    assert n == math.prod(len(e) for e in entries) if entries else n == 1
    out = _timed(pt.apply_arrays, text, index)
    assert out == pt.apply_arrays(text, index + n) or n > pt.MAX_COMBINATIONS  # combinations cycle
    if entries:
        assert out in {pt.apply_arrays(text, i) for i in range(min(n, 64))} or n > 64
    else:
        assert out == text


@props(60)
@given(st.lists(st.sampled_from(["[[", "]]", ", ", "__color__", "__season__", "__nope__", "a", " "]), max_size=12)
       .map("".join), st.integers(0, 2**32))
def test_an_images_prompt_takes_its_array_entry_then_its_wildcards(text, seed):
    try:
        pt.check_wildcards(text, BUILTIN, "prompt")
    except InvalidInput as e:
        assert "__nope__" in text and e.field == "prompt"
        return
    n = min(pt.combinations(text), 50)
    outs = [pt.expand_image_prompt(text, BUILTIN, seed, i) for i in range(n)]
    assert outs == [pt.expand_image_prompt(text, BUILTIN, seed, i) for i in range(n)]
    assert not any(pt.WILDCARD_RE.search(o) for o in outs)
    # the negative prompt takes no arrays
    assert pt.expand_image_prompt(text, BUILTIN, seed, 0, field="negative_prompt").count("[[") == text.count("[[")


@props(60)
@given(st.text(alphabet=string.ascii_letters + string.digits + "_-./\\:~ $%", min_size=1, max_size=20))
@example("a/../../etc/passwd")
@example("/abs")
@example("a//b")
def test_a_wildcard_name_is_valid_or_refused_and_never_leaves_its_folder(name):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "wildcards"
        (root / "sub").mkdir(parents=True)
        (root / "sub" / "w.txt").write_text("sub\n")
        (Path(tmp) / "outside.txt").write_text("secret\n")
        lib = pt.WildcardLibrary(root)
        try:
            pt.check_name(name, "prompt")
        except InvalidInput as e:
            assert e.field == "prompt" and not pt.NAME_RE.match(name)
            with pytest.raises(pt.WildcardError):
                lib.lines(name)
            return
        found = lib.find(name)
        assert found is None or found.path.is_relative_to(root.resolve()) or found.source == "builtin"


@st.composite
def wildcard_folders(draw: Any) -> dict[str, list[str]]:
    """A folder of 1-6 wildcard files whose lines name each other (cycles included) and text."""
    names = draw(st.lists(st.sampled_from(["a", "b", "c", "d/e", "d/f", "g-h"]), min_size=1, max_size=6, unique=True))
    line = st.lists(st.sampled_from(names).map(lambda n: f"__{n}__") | st.sampled_from(["x", "y z", " ", "#c"]),
                    min_size=1, max_size=3).map(" ".join)
    return {name: draw(st.lists(line, min_size=1, max_size=3)) for name in names}


@props(80)
@given(wildcard_folders(), st.integers(0, 2**32), st.booleans())
def test_nested_wildcard_files_expand_fully_or_are_refused_at_queue_time(files, seed, in_order):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for name, lines in files.items():
            (root / f"{name}.txt").parent.mkdir(parents=True, exist_ok=True)
            (root / f"{name}.txt").write_text("\n".join(lines) + "\n")
        lib = pt.WildcardLibrary(root)
        prompt = " ".join(f"__{n}__" for n in files)
        try:
            pt.check_wildcards(prompt, lib, "prompt")
        except InvalidInput as e:
            assert e.field == "prompt" and e.code in ("wildcard_cycle", "unknown_wildcard", "invalid"), e.code
            return
        for index in range(3):
            try:
                out = pt.expand_wildcards(prompt, lib, seed, index, in_order)
            except pt.WildcardError as e:  # the only way out of a checked prompt: the length cap
                assert "more than" in e.message and e.param == "prompt"
                continue
            assert "__" not in out
            assert out == pt.expand_wildcards(prompt, lib, seed, index, in_order)


@props(40)
@given(st.dictionaries(st.sampled_from(["a", "b", "sub/c", "x.y", "-d", "sub/.e"]),
                       st.binary(max_size=40) | st.text(max_size=40).map(str.encode), min_size=1, max_size=5))
@example({"a": b"\xff\xfe", "b": b"#only\n\n", "sub/c": "\u2028x\r\ny\x0bz".encode()})
def test_a_folder_of_odd_wildcard_files_is_listed_and_read_or_named(files):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "wildcards"
        (root / "sub").mkdir(parents=True)
        (root / "sub" / "loop").symlink_to(root)  # a folder cycle
        (root / "leak.txt").symlink_to(Path(tmp) / "outside.txt")
        (Path(tmp) / "outside.txt").write_text("secret\n")
        for name, data in files.items():
            (root / f"{name}.txt").write_bytes(data)
        lib = pt.WildcardLibrary(root)
        listed = {w["name"]: w for w in lib.describe() if w["source"] == "user"}
        assert set(listed) <= {n for n in files if pt.NAME_RE.match(n)} and "leak" not in listed
        for name, entry in listed.items():
            try:
                lines = lib.lines(name, "negative_prompt")
            except pt.WildcardError as e:
                assert entry["lines"] == 0 and entry["error"] and e.param == "negative_prompt"
                continue
            assert entry["lines"] == len(lines) > 0 and all(s == s.strip() and not s.startswith("#") for s in lines)
        with pytest.raises(pt.WildcardError):
            lib.lines("leak")


def test_a_wildcard_cycle_is_refused_and_the_largest_expansions_end_fast(tmp_path):
    (tmp_path / "loop.txt").write_text("__loop__ again\n")
    (tmp_path / "big.txt").write_text("y" * (pt.MAX_FILE_BYTES - 10) + "\n")
    (tmp_path / "two.txt").write_text("__big__ __big__\n")
    lib = pt.WildcardLibrary(tmp_path)
    with pytest.raises(InvalidInput) as e:
        pt.check_wildcards("__loop__", lib, "prompt")
    assert e.value.code == "wildcard_cycle"
    with pytest.raises(pt.WildcardError, match="nest deeper"):
        _timed(pt.expand_wildcards, "__loop__", lib, 1, 0)
    # thousands of wildcards of a line of ~1 MB: refused as it grows (it built gigabytes before the length check)
    with pytest.raises(pt.WildcardError, match=f"more than {MAX_PROMPT_CHARS}"):
        _timed(pt.expand_wildcards, "__two__" * (MAX_PROMPT_CHARS // 7), lib, 1, 0)


# ---- styles --------------------------------------------------------------------------------------------------------
templates = st.lists(st.sampled_from(["{prompt}", "{", "}", "{{", "}}", ", ", "a", " ", "\n", "{x}", "{}"])
                     | st.text(alphabet="ab{}, ", max_size=5), max_size=6).map("".join)


@props(100)
@given(templates, st.text(alphabet="ab{}, \n" + "猫", max_size=20))
@example("{prompt}", "{prompt}")
def test_merge_puts_the_prompt_in_the_placeholder_or_after(template, text):
    out = merge(template, text)
    if PLACEHOLDER in template:
        assert out == template.replace(PLACEHOLDER, text) or not text
    else:
        assert out == ", ".join(p for p in (text, template) if p)


@props(100)
@given(st.lists(st.sampled_from([s.name for s in builtin_styles()][:40] + [RANDOM, RANDOM.upper()]), max_size=16),
       prompts, st.integers(0, 2**64 - 1))
def test_styles_apply_the_same_for_the_same_seed_and_random_never_repeats_one(names, prompt, seed):
    lib = StyleLibrary(builtin_styles())
    checked = lib.check(names)
    first = lib.apply(checked, prompt, "neg", seed)
    assert first == lib.apply(checked, prompt, "neg", seed)
    assert len(first.styles) == len(names) and RANDOM not in first.styles
    drawn = [s for n, s in zip(checked, first.styles) if n == RANDOM]
    named = {n.casefold() for n in checked if n != RANDOM}
    assert len({s.casefold() for s in drawn}) == len(drawn) and not named & {s.casefold() for s in drawn}


@props(60)
@given(json_values | st.lists(st.fixed_dictionaries(
    {"name": st.text(max_size=12), "prompt": templates | json_values}, optional={"negative_prompt": templates})))
@example([{"name": "x", "prompt": "{prompt}", "negative_prompt": None}])
def test_a_user_style_json_file_loads_or_is_a_config_error(data):
    with tempfile.TemporaryDirectory() as tmp:
        file = Path(tmp) / "mine.json"
        file.write_text(json.dumps(data))
        _loads_or_config_error(file)


@props(60)
@given(st.lists(st.lists(templates | st.text(max_size=8), max_size=4), max_size=5),
       st.sampled_from(["name,prompt,negative_prompt", "prompt,name", "name", "x,y", "", '"name"']))
def test_a_user_style_csv_file_loads_or_is_a_config_error(rows, header):
    with tempfile.TemporaryDirectory() as tmp:
        file = Path(tmp) / "styles.csv"
        body = io.StringIO()
        csv.writer(body).writerows(rows)
        file.write_text(header + "\n" + body.getvalue())
        _loads_or_config_error(file)


@pytest.mark.parametrize("name, text", [
    ("deep.json", "[" * 100000 + "]" * 100000),  # RecursionError out of json.loads
    ("big.csv", 'name,prompt\nx,"' + "a" * 200000 + '"\n'),  # csv.Error: a field over csv's limit
    ("nul.csv", "name,prompt\nx,\0\n"), ("quote.csv", 'name,prompt\n"x\n'), ("bad.json", "{"),
    ("bytes.json", b"\xff\xfe\x00".decode("latin-1")),
])
def test_odd_style_files_load_or_are_a_config_error_naming_the_file(tmp_path, name, text):
    (tmp_path / name).write_text(text)
    _loads_or_config_error(tmp_path / name)


def _loads_or_config_error(file: Path) -> None:
    try:
        styles = read_style_file(file)
    except ConfigError as e:
        assert file.name in e.message and e.http_status == 500  # a start-up error, named
        return
    lib = StyleLibrary(styles)
    for style in styles:
        assert style.name.strip() and style.name.casefold() != RANDOM and lib.get(style.name) is not None
        assert style.prompt.count(PLACEHOLDER) <= 1
        assert isinstance(lib.apply([style.name], "p", "n", 0).prompt, str)


# ---- <lora:...> tags -------------------------------------------------------------------------------------------------
@props(150)
@given(prompts, st.sampled_from([None, ["x", "y", "z", "q"]]))
@example("<lora:<lora:x>a>", None)
@example("<lora:" + "a:" * 10000, None)  # the cap's 20000 characters of one unclosed tag
@example("<lora:a" * 3000, ["x"])
@example("<lora:x:nan><lora:x:1e999>", ["x"])
def test_lora_tags_split_or_name_the_field(text, known):
    try:
        rest, tags = _timed(split_lora_tags, text, known, "prompt")
    except InvalidInput as e:
        assert e.field == "prompt" and e.http_status == 400
        return
    assert len(rest) <= len(text) and rest == rest.strip(" \t,")
    assert len({t["name"] for t in tags}) == len(tags)
    assert all(known is None or t["name"] in known for t in tags)
    assert len(tags) <= len(LORA_TAG_RE.findall(text))


@props(150)
@given(prompts, st.one_of(st.none(), prompts))
def test_a_jobs_lora_tags_are_checked_loras_of_finite_weight(prompt, negative):
    loras = {"x": None, "y": None, "z": None}
    try:
        text, tags = pt.take_lora_tags(prompt, negative, loras, "sd")
    except InvalidInput as e:
        assert e.field in ("prompt", "negative_prompt")
        return
    assert len(tags) <= MAX_LORAS
    assert all(t["name"] in loras and math.isfinite(t["weight"]) and -10 <= t["weight"] <= 10 for t in tags)
    assert (text == prompt) == (not tags and not LORA_TAG_RE.search(prompt))


# ---- through the HTTP API (fake pipes) ------------------------------------------------------------------------------
def _refused_cleanly(r: Any) -> None:
    event(f"HTTP {r.status_code}")  # --hypothesis-show-statistics shows the spread
    assert r.status_code < 500, (r.status_code, r.get_data(as_text=True)[:500])
    if r.status_code >= 400:
        body = r.get_json()
        assert body and body["error"]["message"], body
        if r.status_code in (400, 422) and "error" in body:
            assert body["error"].get("field"), body  # a bad input names its field


@pytest.fixture()
def session_id(api, client) -> str:
    return open_session(client)["id"]


job_bodies = st.fixed_dictionaries({"prompt": prompts | json_values | grammars}, optional={
    "negative_prompt": prompts | json_values,
    "styles": st.lists(st.sampled_from(["Cinematic", "Anime", "random", "Nope", ""]) | json_values, max_size=3)
    | json_values,
    "wildcards_in_order": json_values,
    "count": st.integers(-1, 3) | json_values,
    "seeds": st.lists(st.integers(-1, 2**64), max_size=3) | json_values,
})


@props(40, deadline=2000)
@given(body=job_bodies)
@example(body={"prompt": [{"w": "a", "p": 10**400}]})
@example(body={"prompt": "[[" + "," * 20000})
@example(body={"prompt": "<lora:tiny-sd-lora:nan> __color__ [[a, b]]", "styles": ["random"]})
@example(body={"prompt": "<lora:tiny-sd-lora:1e999>"})
def test_posting_any_prompt_grammar_or_tool_values_never_answers_5xx(api, client, session_id, body):
    r = client.post(f"/api/v1/sessions/{session_id}/jobs", json=body)
    _refused_cleanly(r)
    if r.status_code == 202:  # what queue time accepts, run time makes (grammar, arrays, wildcards, styles)
        job = wait_job(client, r.get_json()["job"]["id"])
        assert job["state"] == "succeeded", job.get("error")


@props(25, deadline=3000)
@given(prompt=prompts, negative=prompts, styles=st.lists(st.sampled_from(["Cinematic", "Nope", "random"]), max_size=2))
@example(prompt="<lora:x:nan>", negative="", styles=[])
@example(prompt="<lora:tiny-sd-lora:nan>", negative="", styles=[])
@example(prompt="<lora:tiny-sd-lora:1e999>", negative="", styles=[])
@example(prompt="a", negative="<lora:tiny-sd-lora>", styles=[])
def test_the_a1111_dialect_answers_any_prompt_without_5xx(api, client, prompt, negative, styles):
    r = client.post("/sdapi/v1/txt2img", json={"prompt": prompt, "negative_prompt": negative, "styles": styles,
                                              "steps": 1, "width": 64, "height": 64, "seed": 1,
                                              "override_settings": {"sd_model_checkpoint": "tiny-sd"}})
    event(f"HTTP {r.status_code}")
    assert r.status_code < 500, (r.status_code, r.get_data(as_text=True)[:500])
    if r.status_code == 422:  # A1111's (FastAPI's) shape: the field is the detail's loc
        assert r.get_json()["detail"][0]["loc"][-1], r.get_json()


@props(25, deadline=3000)
@given(prompt=prompts | json_values, n=st.integers(-1, 2) | json_values)
@example(prompt="<lora:tiny-sd-lora:nan> [[a, b]] __nope__", n=1)
@example(prompt=[{"w": "a", "p": 10**400}], n=1)
def test_the_openai_dialect_answers_any_prompt_without_5xx(api, client, prompt, n):
    r = client.post("/v1/images/generations", json={"prompt": prompt, "n": n, "model": "tiny-sd", "size": "64x64",
                                                    "steps": 1})
    event(f"HTTP {r.status_code}")
    assert r.status_code < 500, (r.status_code, r.get_data(as_text=True)[:500])
    if r.status_code == 400:
        assert r.get_json()["error"]["param"], r.get_json()  # OpenAI's name for the field
