"""Prompt grammar and the prompt/seed iterator (metafusion's ``Cfgen``).

A prompt *grammar* describes a family of prompts:

- a ``str`` is itself;
- a ``list`` at the top level is a concatenation of its items joined with ``", "``
  (a leading ``"+"`` is allowed there and ignored);
- a nested ``list`` is a random choice of one of its items;
- a nested ``list`` whose first item is ``"+"`` is the concatenation of the other items,
  joined with a space;
- a ``dict`` ``{"w": grammar, "p": probability}`` is ``w`` with probability ``p`` and is
  left out otherwise.

Items nest freely. Every random choice is made with ``random.Random(seed)``, so the same
seed always gives the same prompt (``expand_prompt(grammar, seed)``), and a server can
re-create the prompt of any image from its seed.

Example::

    >>> grammar = ["a photo of a", ["cat", "dog"], {"w": "at night", "p": 0.5}]
    >>> expand_prompt(grammar, 1) in {"a photo of a, cat", "a photo of a, dog",
    ...                               "a photo of a, cat, at night", "a photo of a, dog, at night"}
    True
"""
from __future__ import annotations

import logging
import random
from collections.abc import Iterator, Sequence
from typing import Any, Union

from .errors import InvalidValueError
from .spec import DRAWN_SEED_MAX, MAX_GRAMMAR_DEPTH, MAX_GRAMMAR_ITEMS, MAX_PROMPT_CHARS, SEEDS

logger = logging.getLogger(__name__)

#: A prompt grammar: a string, a list (concatenation at the top, choice below) or a
#: ``{"w": ..., "p": ...}`` optional item.
Grammar = Union[str, list, dict]

#: Seeds are drawn from [0, MAX_SEED] (the spec's range for drawn seeds); given ones may use the
#: spec's whole seed range.
MAX_SEED = DRAWN_SEED_MAX

CONCAT_MARK = "+"
_END = object()  # the end of an iterator in _check_size
ALLOWED_SHAPES = (
    'a string; a list (top level: parts joined with ", "; nested: one item chosen at random; '
    'nested and starting with "+": the other items joined with a space); '
    'or {"w": <grammar>, "p": <probability 0..1>}'
)


def validate_grammar(grammar: Any, param: str = "prompt") -> None:
    """Check that ``grammar`` is not too big and has only the shapes the prompt grammar allows.

    Its size is checked first, without recursion: at most :data:`~.spec.MAX_GRAMMAR_ITEMS` items,
    :data:`~.spec.MAX_GRAMMAR_DEPTH` levels and :data:`~.spec.MAX_PROMPT_CHARS` characters.

    Args:
        grammar: The grammar to check.
        param: Parameter name used in error messages (``prompt`` or ``negative_prompt``).

    Raises:
        InvalidValueError: Naming the parameter and the cap it exceeds, or the path of the first bad item.
    """
    _check_size(grammar, param)
    _validate(grammar, param, top=True)


def _check_size(grammar: Any, param: str) -> None:
    """Count items, depth and characters with an explicit stack of iterators, stopping as soon as a cap is
    passed: the cost is bounded by the caps, not by the grammar (a body of millions of ``[""]`` stops at the
    first :data:`~.spec.MAX_GRAMMAR_ITEMS`), and no nesting can exhaust the recursion of ``_validate``."""
    items, chars = 0, 0
    stack: list[tuple[Iterator[Any], int]] = [(iter((grammar,)), 0)]
    while stack:
        siblings, depth = stack[-1]
        node = next(siblings, _END)
        if node is _END:
            stack.pop()
            continue
        if not isinstance(node, (str, list, tuple, dict)):
            continue  # not an item (a dict's "p", or a bad value _validate names)
        items += 1
        if items > MAX_GRAMMAR_ITEMS:
            raise _size_error(param, f"has more than {MAX_GRAMMAR_ITEMS} items (lists, dicts and strings "
                                     f"together); at most {MAX_GRAMMAR_ITEMS} are allowed")
        if isinstance(node, str):
            chars += len(node)
            if chars > MAX_PROMPT_CHARS:
                raise _size_error(param, f"has more than {MAX_PROMPT_CHARS} characters; at most "
                                         f"{MAX_PROMPT_CHARS} are allowed")
            continue
        if depth + 1 > MAX_GRAMMAR_DEPTH:
            raise _size_error(param, f"is nested more than {MAX_GRAMMAR_DEPTH} levels deep; at most "
                                     f"{MAX_GRAMMAR_DEPTH} are allowed")
        stack.append((iter(node.values() if isinstance(node, dict) else node), depth + 1))


def _size_error(param: str, what: str) -> InvalidValueError:
    return InvalidValueError(f"Invalid value for '{param}': the prompt {what}.", param=param,
                             allowed=f"a prompt of at most {MAX_PROMPT_CHARS} characters, {MAX_GRAMMAR_ITEMS} "
                                     f"items and {MAX_GRAMMAR_DEPTH} levels")


def _validate(node: Any, path: str, top: bool) -> None:
    if isinstance(node, str):
        return
    if isinstance(node, (list, tuple)):
        if not top and not node:
            raise _shape_error(path, "an empty list: a random choice needs at least one item")
        for i, item in enumerate(node):
            if i == 0 and item == CONCAT_MARK:
                continue
            _validate(item, f"{path}[{i}]", top=False)
        return
    if isinstance(node, dict):
        unknown = sorted(set(node) - {"w", "p"})
        if unknown or "w" not in node or "p" not in node:
            raise _shape_error(path, f"a dict with keys {sorted(node)}: it needs exactly 'w' and 'p'")
        p = node["p"]
        # compared as given: float() of a huge JSON integer (10**400) overflows
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p <= 1:
            raise _shape_error(f"{path}.p", f"{p!r}: a probability must be a number from 0 to 1")
        _validate(node["w"], f"{path}.w", top=False)
        return
    raise _shape_error(path, f"a {type(node).__name__} ({node!r})")


def _shape_error(path: str, what: str) -> InvalidValueError:
    param = path.split("[", 1)[0].split(".", 1)[0]
    return InvalidValueError(
        f"Invalid value for '{param}': {path} is {what}. Allowed: {ALLOWED_SHAPES}.",
        param=param,
        allowed=ALLOWED_SHAPES,
    )


def expand_prompt(grammar: Grammar, seed: int, param: str = "prompt") -> str:
    """Expand a prompt grammar into one prompt, with every random choice made by ``seed``.

    Args:
        grammar: A string, list or ``{"w", "p"}`` dict (see the module docstring).
        seed: Seeds ``random.Random``; the same seed always gives the same prompt.
        param: Parameter name used in error messages.

    Returns:
        The prompt text.

    Raises:
        InvalidValueError: If the grammar has a shape that is not allowed.
    """
    validate_grammar(grammar, param)
    return _expand_top(grammar, random.Random(seed))


def _expand_top(grammar: Grammar, rng: random.Random) -> str:
    if isinstance(grammar, (list, tuple)):
        items = list(grammar)
        if items and items[0] == CONCAT_MARK:
            items = items[1:]
        return _concat(items, rng, ", ")
    return _expand(grammar, rng) or ""


def _concat(items: Sequence[Any], rng: random.Random, delim: str) -> str:
    parts = [_expand(item, rng) for item in items]
    return delim.join(p for p in parts if p)


def _expand(node: Any, rng: random.Random) -> str | None:
    """Expand one nested item; None means "left out" (an optional item not drawn)."""
    if isinstance(node, str):
        return node
    if isinstance(node, (list, tuple)):
        if node and node[0] == CONCAT_MARK:
            return _concat(node[1:], rng, " ")
        return _expand(node[rng.randrange(len(node))], rng)
    # A dict {"w", "p"}: draw even when p is 0 or 1, so that changing p does not shift
    # every later choice of the same seed.
    if rng.random() < float(node["p"]):
        return _expand(node["w"], rng)
    return None


class Cfgen:
    """Iterator of generation inputs: a prompt from the grammar and a seed per image.

    Iterating yields ``(inputs, seed)`` where ``inputs`` is
    ``{"prompt": str, "negative_prompt": str, "seed": int}`` (plus any extra ``inputs``
    given to the constructor). The prompt of a given seed is always the same
    (``expand_prompt(prompt, seed)``).

    Seeds: with ``seeds`` given they are used in order and cycled if more images are
    asked for; without, each seed is drawn at random from [0, 2**32 - 1].
    Count: ``max_count`` images; if it is None, one round through ``seeds`` when given,
    and no limit otherwise (stop the iteration yourself). ``count`` is the number yielded
    so far; raise ``max_count`` to generate more (``GenSession`` does).

    Args:
        prompt: Prompt grammar (see the module docstring).
        negative_prompt: Negative prompt grammar.
        seeds: Seeds to use, in order; None to draw them.
        max_count: Number of items to yield, or None (see above).
        rng: Random source for drawn seeds (tests pass a seeded one); default a fresh
            ``random.Random()`` seeded from the OS.
        **inputs: Extra keys copied into every ``inputs`` dict.

    Raises:
        InvalidValueError: On a bad grammar, seed list or count.
    """

    def __init__(
        self,
        prompt: Grammar,
        negative_prompt: Grammar = "",
        seeds: Sequence[int] | None = None,
        max_count: int | None = None,
        rng: random.Random | None = None,
        **inputs: Any,
    ) -> None:
        validate_grammar(prompt, "prompt")
        validate_grammar("" if negative_prompt is None else negative_prompt, "negative_prompt")
        self.prompt = prompt
        self.negative_prompt = "" if negative_prompt is None else negative_prompt
        self.seeds = _check_seeds(seeds)
        if max_count is not None and (isinstance(max_count, bool) or not isinstance(max_count, int)
                                      or max_count < 0):
            raise InvalidValueError(
                f"Invalid value for 'max_count': {max_count!r}. Allowed: an integer >= 0 or None.",
                param="max_count", allowed="an integer >= 0 or None")
        self.max_count = max_count
        self.count = 0
        self.start_count = 0  # metafusion's GenSession records where a run started
        self.inputs = inputs
        self._rng = rng if rng is not None else random.Random()

    @property
    def limit(self) -> int | None:
        """How many items this iterator yields in all (None: no limit)."""
        if self.max_count is not None:
            return self.max_count
        if self.seeds:
            return len(self.seeds)
        return None

    def next_seed(self) -> int:
        """The seed of the next item (from ``seeds`` in turn, or drawn)."""
        if self.seeds:
            return self.seeds[self.count % len(self.seeds)]
        return self._rng.randint(0, MAX_SEED)

    def make_inputs(self, seed: int) -> dict[str, Any]:
        """The inputs for one image with this seed (does not advance the iterator)."""
        result: dict[str, Any] = dict(self.inputs)
        result.update(
            prompt=expand_prompt(self.prompt, seed, "prompt"),
            negative_prompt=expand_prompt(self.negative_prompt, seed, "negative_prompt"),
            seed=seed,
        )
        return result

    def __iter__(self) -> Iterator[tuple[dict[str, Any], int]]:
        return self

    def __next__(self) -> tuple[dict[str, Any], int]:
        limit = self.limit
        if limit is not None and self.count >= limit:
            raise StopIteration
        seed = self.next_seed()
        self.count += 1
        logger.debug("cfgen item %d seed %d", self.count, seed)
        return self.make_inputs(seed), seed

    def __repr__(self) -> str:
        return (f"Cfgen(prompt={self.prompt!r}, negative_prompt={self.negative_prompt!r}, "
                f"seeds={self.seeds!r}, max_count={self.max_count!r}, count={self.count})")


def _check_seeds(seeds: Sequence[int] | None) -> list[int] | None:
    if seeds is None:
        return None
    allowed = f"a list of integers from {SEEDS.minimum} to 2**64-1"
    if isinstance(seeds, (str, bytes)) or not isinstance(seeds, Sequence):
        raise InvalidValueError(f"Invalid value for 'seeds': {seeds!r}. Allowed: {allowed}.",
                                param="seeds", allowed=allowed)
    out = []
    for i, s in enumerate(seeds):
        if isinstance(s, bool) or not isinstance(s, int) or not SEEDS.minimum <= s <= SEEDS.maximum:
            raise InvalidValueError(f"Invalid value for 'seeds': seeds[{i}] is {s!r}. Allowed: {allowed}.",
                                    param="seeds", allowed=allowed)
        out.append(int(s))
    return out
