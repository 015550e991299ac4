"""Prompt styles: named templates that wrap a prompt (Fooocus' and AUTOMATIC1111's styles).

A style is ``{"name", "prompt", "negative_prompt"}``. The server ships a library of its own
(``defaults/styles.json``); users add theirs as files in the config's ``styles_dir`` (``styles/``
beside config.yaml; a missing folder holds none): ``*.json`` (a list of styles, as the built-in
file) or ``*.csv`` with a ``name,prompt,negative_prompt`` header (AUTOMATIC1111's ``styles.csv``).
A user style replaces the built-in one of the same name; names are unique, case-insensitive.
A bad file is a :class:`ConfigError` at start-up naming the file and the entry.

Applying styles to an image's prompt (:meth:`StyleLibrary.apply`), in the order given, each one
wrapping the result of the ones before it:

- a template holding ``{prompt}`` has it replaced by the prompt so far;
- a template without ``{prompt}`` is added after the prompt, joined by ", " (AUTOMATIC1111's rule:
  its ``styles.csv`` files, the ones users bring, are written for it; Fooocus' styles always hold
  ``{prompt}``, so they read the same under either rule).

The negative prompt is built the same way from each style's ``negative_prompt``: the user's
negative prompt, then the styles' negatives, joined by ", ". ``random`` is no style of its own: it
draws one from the library with the image's seed (the same seed draws the same style; a drawn
style is never one the list names or has drawn already).
"""
from __future__ import annotations

import csv
import functools
import json
import random
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from multigen.pipes.errors import InvalidValueError
from multigen.pipes.spec import MAX_PROMPT_CHARS, MAX_STYLES

from .errors import ConfigError, InvalidInput

#: the library that ships with the server
BUILTIN_FILE = Path(__file__).resolve().parent / "defaults" / "styles.json"
#: the name that draws a style from the image's seed
RANDOM = "random"
#: where a template takes the prompt
PLACEHOLDER = "{prompt}"
#: longest style name
MAX_NAME_CHARS = 100
_PLACEHOLDER_RE = re.compile(r"\{[^{}]*\}")
_KEYS = ("name", "prompt", "negative_prompt")


@dataclass(frozen=True)
class Style:
    """One style: its templates and where it came from (``builtin`` or ``user``)."""

    name: str
    prompt: str
    negative_prompt: str = ""
    source: str = "builtin"

    def describe(self) -> dict[str, str]:
        """The style as ``GET /api/v1/styles`` lists it."""
        return {"name": self.name, "prompt": self.prompt, "negative_prompt": self.negative_prompt,
                "source": self.source}


@dataclass(frozen=True)
class StyledPrompt:
    """An image's prompts after its styles, and the style names applied (``random`` resolved)."""

    prompt: str
    negative_prompt: str
    styles: tuple[str, ...]


class UnknownStyleError(InvalidValueError):
    """A job names a style the library no longer has (a user file changed between queue and run)."""


def merge(template: str, text: str) -> str:
    """``text`` wrapped by one style's template (the module's rules)."""
    if PLACEHOLDER in template:
        out = template.replace(PLACEHOLDER, text)
        return out if text else out.strip(" ,\n")
    return ", ".join(part for part in (text, template) if part)


class StyleLibrary:
    """Styles by case-insensitive name, in listing order (built-in ones first)."""

    def __init__(self, styles: Iterable[Style] = ()) -> None:
        self._styles: dict[str, Style] = {}
        for style in styles:
            self._styles[style.name.casefold()] = style

    def __len__(self) -> int:
        return len(self._styles)

    def __iter__(self) -> Iterator[Style]:
        return iter(self._styles.values())

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.casefold() in self._styles

    def get(self, name: str) -> Style | None:
        return self._styles.get(name.casefold())

    def describe(self) -> list[dict[str, str]]:
        return [s.describe() for s in self]

    def check(self, names: Any, field: str = "styles") -> list[str]:
        """A job's ``styles`` checked: a list of at most ``MAX_STYLES`` known names (or ``random``); returns
        them as the library spells them (an empty list for None; one name alone, from Python, is a list of one).

        Raises:
            InvalidInput: naming ``styles`` or the item ``styles.N`` and where the names are listed.
        """
        if names is None:
            return []
        if isinstance(names, str):
            names = [names]
        if not isinstance(names, (list, tuple)):
            raise InvalidInput(f"{field} must be a list of style names, got {type(names).__name__}", field=field)
        if len(names) > MAX_STYLES:
            raise InvalidInput(f"{field} has {len(names)} names; a job takes at most {MAX_STYLES}", field=field)
        out = []
        for i, name in enumerate(names):
            if isinstance(name, str) and name.casefold() == RANDOM:
                out.append(RANDOM)
                continue
            style = self.get(name) if isinstance(name, str) else None
            if style is None:
                raise InvalidInput(f"{field}.{i}: unknown style {name!r}; GET /api/v1/styles lists the "
                                   f"{len(self)} styles of this server (or use {RANDOM!r}: one drawn from "
                                   "the image's seed)", field=f"{field}.{i}", code="unknown_style")
            out.append(style.name)
        return out

    def resolve(self, names: Iterable[str], seed: int) -> list[Style]:
        """The styles ``names`` (checked ones) stand for at ``seed``: each ``random`` drawn, deterministically.

        Raises:
            UnknownStyleError: a name the library no longer has (naming ``styles.N``).
        """
        names = list(names)
        taken = {n.casefold() for n in names if n.casefold() != RANDOM}
        out: list[Style] = []
        for i, name in enumerate(names):
            if name.casefold() == RANDOM:
                pool = [s for key, s in self._styles.items() if key not in taken]
                if not pool:
                    continue
                # a string seed is hashed with SHA-512: the same draw in every process and Python run
                style = random.Random(f"multigen-style:{seed}:{i}").choice(pool)
                taken.add(style.name.casefold())
            else:
                found = self.get(name)
                if found is None:
                    raise UnknownStyleError(f"styles.{i}: style {name!r} is no longer on this server (GET "
                                            "/api/v1/styles lists them)", f"styles.{i}")
                style = found
            out.append(style)
        return out

    def apply(self, names: Iterable[str], prompt: str, negative_prompt: str, seed: int) -> StyledPrompt:
        """``prompt`` and ``negative_prompt`` with the styles ``names`` applied in order (module docstring)."""
        styles = self.resolve(names, seed)
        for style in styles:
            prompt = merge(style.prompt, prompt)
            negative_prompt = merge(style.negative_prompt, negative_prompt)
        return StyledPrompt(prompt, negative_prompt, tuple(s.name for s in styles))


# ---- reading style files ------------------------------------------------------------------------------
def _check_template(value: Any, file: Path, where: str, key: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(str(file), f"{where}.{key}", f"expected a string, got {type(value).__name__}",
                          f"write {key} as a string (it may hold {PLACEHOLDER} once)")
    if len(value) > MAX_PROMPT_CHARS:
        raise ConfigError(str(file), f"{where}.{key}", f"longer than {MAX_PROMPT_CHARS} characters",
                          "shorten it")
    others = [m for m in _PLACEHOLDER_RE.findall(value) if m != PLACEHOLDER]
    if others or value.count(PLACEHOLDER) > 1:
        problem = f"unknown placeholder {others[0]}" if others else f"{PLACEHOLDER} appears more than once"
        raise ConfigError(str(file), f"{where}.{key}", problem,
                          f"use {PLACEHOLDER} (lower case) at most once, where the prompt goes")
    return value


def style_from(entry: Any, file: Path, where: str, source: str) -> Style:
    """One entry of a style file, checked.

    Raises:
        ConfigError: naming the file and the entry (``where``: ``[3]`` or ``row 4``).
    """
    if not isinstance(entry, Mapping):
        raise ConfigError(str(file), where, f"expected an object with {', '.join(_KEYS)}",
                          'write each style as {"name": ..., "prompt": "... {prompt} ...", "negative_prompt": ...}')
    extra = sorted(str(k) for k in entry if k not in _KEYS)
    if extra:
        raise ConfigError(str(file), where, f"unknown keys {extra}", f"use only {', '.join(_KEYS)}")
    name = entry.get("name")
    if not isinstance(name, str) or not name.strip() or len(name) > MAX_NAME_CHARS or not name.isprintable():
        raise ConfigError(str(file), f"{where}.name", f"bad style name {name!r}",
                          f"give a name of 1-{MAX_NAME_CHARS} printable characters")
    name = name.strip()
    if name.casefold() == RANDOM:
        raise ConfigError(str(file), f"{where}.name", f"{RANDOM!r} is reserved (it draws a style from the seed)",
                          "rename the style")
    prompt = _check_template(entry.get("prompt", ""), file, where, "prompt")
    negative = _check_template(entry.get("negative_prompt") or "", file, where, "negative_prompt")
    return Style(name, prompt, negative, source)


def read_style_file(file: Path, source: str = "user") -> list[Style]:
    """The styles of one ``.json`` or ``.csv`` file.

    Raises:
        ConfigError: unreadable, malformed, or an entry that is not a style (naming it).
    """
    try:
        text = file.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(str(file), None, f"cannot read the style file ({type(e).__name__})",
                          "make it a readable UTF-8 file") from None
    if file.suffix.lower() == ".csv":
        try:
            rows = list(csv.DictReader(text.splitlines()))
        except csv.Error as e:  # a field over csv's limit (128 KiB)...
            raise ConfigError(str(file), None, f"not valid CSV ({e})", "fix the CSV") from None
        if rows and "name" not in rows[0]:
            raise ConfigError(str(file), "row 1", "no `name` column", "start the file with the header "
                              "name,prompt,negative_prompt")
        return [style_from({k: v for k, v in row.items() if k in _KEYS and v is not None}, file, f"row {i + 2}",
                           source) for i, row in enumerate(rows) if (row.get("name") or "").strip()]
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as e:  # RecursionError: arrays nested thousands deep
        raise ConfigError(str(file), None, f"not valid JSON ({e})", "fix the JSON") from None
    if not isinstance(data, list):
        raise ConfigError(str(file), None, "expected a JSON list of styles",
                          'write [{"name": ..., "prompt": ..., "negative_prompt": ...}, ...]')
    return [style_from(entry, file, f"[{i}]", source) for i, entry in enumerate(data)]


def _unique(styles: list[Style], file: Path, seen: dict[str, Path]) -> None:
    for style in styles:
        key = style.name.casefold()
        if key in seen:
            other = "" if seen[key] == file else f" (also in {seen[key].name})"
            raise ConfigError(str(file), style.name, f"a second style named {style.name!r}{other}; names are "
                              "unique, case-insensitive", "rename or remove one of them")
        seen[key] = file


@functools.cache
def builtin_styles() -> tuple[Style, ...]:
    """The built-in library (read once)."""
    styles = read_style_file(BUILTIN_FILE, "builtin")
    _unique(styles, BUILTIN_FILE, {})
    return tuple(styles)


def load_styles(styles_dir: Path | None) -> StyleLibrary:
    """The built-in library with the users' files of ``styles_dir`` on top (``*.json``, ``*.csv``, by name).

    Raises:
        ConfigError: a bad file, or two user styles of one name (naming the file and the entry).
    """
    styles = list(builtin_styles())
    if styles_dir is not None and styles_dir.is_dir():
        seen: dict[str, Path] = {}
        for file in sorted(p for p in styles_dir.iterdir() if p.suffix.lower() in (".json", ".csv") and p.is_file()):
            mine = read_style_file(file, "user")
            _unique(mine, file, seen)
            styles += mine
    return StyleLibrary(styles)
