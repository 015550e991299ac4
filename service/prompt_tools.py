"""Prompt tools: wildcards ``__name__`` and ``[[a, b]]`` arrays (Fooocus' prompt syntax).

**Wildcards.** ``__name__`` in a prompt or negative prompt is replaced by one line of the wildcard
file ``name.txt``. The server ships a few files of its own (``defaults/wildcards/``); users add
theirs in the config's ``wildcards_dir`` (``wildcards/`` beside config.yaml; a missing folder holds
none), a user file replacing the built-in one of the same name. Names are letters, digits, ``_``
and ``-``; a subfolder is named with ``/`` (``__people/job__`` is ``people/job.txt``); nothing
else (no ``..``, no absolute paths) so a name never leaves its folder. Blank lines and lines
starting with ``#`` are skipped.

- The line is drawn from the image's seed (the same seed draws the same lines, so a resumed job
  makes the same pixels); each ``__name__`` of the prompt draws on its own.
- A line may hold wildcards itself: they are replaced in turn, at most :data:`MAX_DEPTH` deep. A
  wildcard that names itself, directly or through others, is a cycle: refused at queue time.
- In-order mode (the job's ``wildcards_in_order``): image ``i`` of the job takes line ``i`` modulo
  the file's length, for every wildcard (Fooocus' "read wildcards in order").

**Arrays.** ``[[a, b, c]]`` in a string prompt makes one image per entry (entries split at commas
and stripped; a ``[[...]]`` without a comma is no array and stays as written, as it does for
AUTOMATIC1111's weighting). Several arrays make their cartesian product. A job's ``count`` is the
number of images per combination, so the job makes ``count x combinations`` images; image ``i``
takes combination ``i mod combinations``, the first array changing fastest (Fooocus' order).
Arrays are read in the ``prompt`` only, and only when it is a string (not a Cfgen grammar).

Order per image: the Cfgen grammar (runner), arrays, wildcards (so an array entry may be a wildcard),
then the styles. The job keeps the prompt as written; each image's metadata has both.
"""
from __future__ import annotations

import functools
import random
import re
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from multigen.pipes.errors import InvalidValueError, PipeError
from multigen.pipes.spec import LORA_WEIGHT, MAX_LORAS, MAX_PROMPT_CHARS, WILDCARDS_IN_ORDER

from .errors import InvalidInput
from .loratags import LORA_TAG_RE, split_lora_tags

#: the wildcard files that ship with the server
BUILTIN_DIR = Path(__file__).resolve().parent / "defaults" / "wildcards"
#: deepest nesting of wildcards in wildcards (a cycle is refused before that; this bounds the rest)
MAX_DEPTH = 8
#: largest wildcard file read (a wildcard is a list of words or phrases; bigger is a mistake)
MAX_FILE_BYTES = 1024 * 1024
#: most combinations a prompt's arrays may make before the job's count is even looked at
MAX_COMBINATIONS = 10**6
#: a wildcard as written: loose on purpose, so a bad name (``__../x__``) is an error rather than plain text
WILDCARD_RE = re.compile(r"__([A-Za-z0-9./\\][\w./\\:-]*?)__")
#: a valid wildcard name: path segments of letters, digits, ``_`` and ``-``, starting with a letter or digit
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*(?:/[A-Za-z0-9][A-Za-z0-9_-]*)*$")
#: ``[[a, b]]``: at least one comma inside, no brackets
#: (the part before the first comma holds no comma: one way to match, linear time; ``[^\[\]]*,`` backtracked
#: quadratically, seconds for ``[[`` and 20000 commas)
ARRAY_RE = re.compile(r"\[\[([^\[\],]*,[^\[\]]*)\]\]")


class WildcardError(InvalidValueError):
    """A wildcard that cannot be expanded when the job runs (a file removed since the job was queued...)."""


@dataclass(frozen=True)
class WildcardFile:
    """One wildcard: its name, its file and where it came from (``builtin`` or ``user``)."""

    name: str
    path: Path
    source: str


# ---- the library -------------------------------------------------------------------------------------------
class WildcardLibrary:
    """The wildcard files of the built-in folder with the users' folder on top.

    Files are read when used (and kept until they change), so a file added or edited while the server
    runs is used by the next job.

    Args:
        user_dir: the config's ``wildcards_dir`` (None or a missing folder: the built-in files only).
        builtin_dir: the server's own files.
    """

    def __init__(self, user_dir: Path | None = None, builtin_dir: Path = BUILTIN_DIR) -> None:
        self.user_dir = user_dir
        self.builtin_dir = builtin_dir
        self._lines: dict[Path, tuple[int, int, tuple[str, ...]]] = {}
        self._lock = threading.Lock()

    def folders(self) -> list[tuple[Path, str]]:
        """The folders looked in, the users' first (theirs replace the built-in files)."""
        out = [(self.user_dir, "user")] if self.user_dir is not None else []
        return out + [(self.builtin_dir, "builtin")]

    def where(self) -> str:
        """Where wildcards are looked for, for error messages (users read them: folder names, no server paths)."""
        user = f"the folder {self.user_dir.name}/ (config.yaml's wildcards_dir), then " if self.user_dir else ""
        return user + "the server's built-in wildcards"

    def find(self, name: str) -> WildcardFile | None:
        """The file of a (valid) name, the user's before the built-in one; None when there is none."""
        for folder, source in self.folders():
            root = folder.resolve()
            path = (root / f"{name}.txt").resolve()
            if path.is_relative_to(root) and path.is_file():  # a symlink out of the folder is not followed
                return WildcardFile(name, path, source)
        return None

    def lines(self, name: str, field: str = "prompt") -> tuple[str, ...]:
        """The lines of wildcard ``name`` (blank and ``#`` lines skipped).

        Raises:
            WildcardError: a bad name, no such file, an empty, unreadable or too large file (naming ``field``).
        """
        check_name(name, field, WildcardError)
        found = self.find(name)
        if found is None:
            raise WildcardError(f"{field}: unknown wildcard __{name}__: there is no {name}.txt in {self.where()}; "
                                "GET /api/v1/wildcards lists them", field)
        return self._read(found, field)

    def _read(self, found: WildcardFile, field: str) -> tuple[str, ...]:
        try:
            st = found.path.stat()
            with self._lock:
                cached = self._lines.get(found.path)
            if cached and cached[:2] == (st.st_mtime_ns, st.st_size):
                return cached[2]
            if st.st_size > MAX_FILE_BYTES:
                raise WildcardError(f"{field}: wildcard file {found.name}.txt ({found.source}) is larger than "
                                    f"{MAX_FILE_BYTES} bytes; split it", field)
            text = found.path.read_text(encoding="utf-8-sig")
        except (OSError, UnicodeDecodeError) as e:
            raise WildcardError(f"{field}: cannot read wildcard file {found.name}.txt ({found.source}, "
                                f"{type(e).__name__}): make it a readable UTF-8 text file", field) from None
        lines = tuple(s for s in (line.strip() for line in text.splitlines()) if s and not s.startswith("#"))
        if not lines:
            raise WildcardError(f"{field}: wildcard file {found.name}.txt ({found.source}) has no lines: write one "
                                "choice per line", field)
        with self._lock:
            self._lines[found.path] = (st.st_mtime_ns, st.st_size, lines)
        return lines

    def files(self) -> Iterator[WildcardFile]:
        """Every wildcard, by name (a user file hides the built-in one of its name)."""
        seen: dict[str, WildcardFile] = {}
        for folder, source in self.folders():
            if not folder.is_dir():
                continue
            root = folder.resolve()
            for path in sorted(folder.rglob("*.txt")):
                name = path.relative_to(folder).with_suffix("").as_posix()
                if NAME_RE.match(name) and name not in seen and path.is_file() and path.resolve().is_relative_to(root):
                    seen[name] = WildcardFile(name, path.resolve(), source)
        return iter(sorted(seen.values(), key=lambda f: f.name))

    def describe(self) -> list[dict[str, Any]]:
        """The wildcards as ``GET /api/v1/wildcards`` lists them: name, line count, source (bad files: 0 lines
        and their error, so a user sees why one does not work)."""
        out: list[dict[str, Any]] = []
        for f in self.files():
            entry: dict[str, Any] = {"name": f.name, "source": f.source}
            try:
                entry["lines"] = len(self._read(f, "wildcards"))
            except WildcardError as e:
                entry.update(lines=0, error=e.message)
            out.append(entry)
        return out


@functools.cache
def builtin_library() -> WildcardLibrary:
    """The built-in files only (what a service without a ``wildcards_dir`` uses)."""
    return WildcardLibrary(None)


def check_name(name: str, field: str, error: type[Exception] = InvalidInput) -> None:
    """Refuse a wildcard name that is not letters, digits, ``_``, ``-`` and ``/`` between segments."""
    if not NAME_RE.match(name):
        message = (f"{field}: wildcard name {name!r} is not allowed: use letters, digits, '_' and '-', and '/' "
                   "between the names of subfolders (no '.', no leading '/')")
        raise error(message, field=field) if error is InvalidInput else error(message, field)


def check_in_order(value: Any) -> bool:
    """A job's ``wildcards_in_order`` (None: False).

    Raises:
        InvalidInput: not a boolean (naming the field).
    """
    try:
        return bool(WILDCARDS_IN_ORDER.check(False if value is None else value, "wildcards_in_order"))
    except PipeError as e:
        raise InvalidInput(e.message, field="wildcards_in_order") from None


def wildcard_names(text: str) -> list[str]:
    """The wildcard names ``text`` holds, in order."""
    return WILDCARD_RE.findall(text)


# ---- checks at queue time ------------------------------------------------------------------------------------
def check_wildcards(prompt: Any, library: WildcardLibrary, field: str) -> None:
    """Every wildcard ``prompt`` names (a string or every string of a Cfgen grammar) exists, with its nested
    ones, and none leads back to itself or nests deeper than :data:`MAX_DEPTH`.

    Raises:
        InvalidInput: naming ``field``, the wildcard and where wildcards are looked for.
    """
    done: set[str] = set()

    def visit(name: str, chain: tuple[str, ...]) -> None:
        if name in chain:
            loop = " -> ".join(f"__{n}__" for n in chain[chain.index(name):] + (name,))
            raise InvalidInput(f"{field}: the wildcards form a cycle: {loop}; remove the reference from one of "
                               "the files", field=field, code="wildcard_cycle")
        if len(chain) >= MAX_DEPTH:
            raise InvalidInput(f"{field}: wildcards nest deeper than {MAX_DEPTH} (" + " -> ".join(
                f"__{n}__" for n in chain + (name,)) + ")", field=field)
        if name in done:
            return
        try:
            lines = library.lines(name, field)
        except WildcardError as e:
            raise InvalidInput(e.message, field=field, code="unknown_wildcard") from None
        for line in lines:
            for inner in wildcard_names(line):
                visit(inner, chain + (name,))
        done.add(name)

    for text in _strings(prompt):
        for name in wildcard_names(text):
            check_name(name, field)
            visit(name, ())


def _strings(prompt: Any) -> Iterator[str]:
    if isinstance(prompt, str):
        yield prompt
    elif isinstance(prompt, dict):
        for key, value in prompt.items():
            yield from _strings(key)
            yield from _strings(value)
    elif isinstance(prompt, (list, tuple)):
        for item in prompt:
            yield from _strings(item)


def arrays(prompt: Any) -> list[list[str]]:
    """The entries of each ``[[...]]`` array of a string prompt, in order (none for a grammar)."""
    if not isinstance(prompt, str):
        return []
    return [_entries(body) for body in ARRAY_RE.findall(prompt)]


def _entries(body: str) -> list[str]:
    """An array's entries: split at commas, stripped, empty ones left out (``[[ , ]]``: one empty entry)."""
    return [e for e in (part.strip() for part in body.split(",")) if e] or [""]


def combinations(prompt: Any) -> int:
    """How many prompts the arrays of ``prompt`` make (1 without arrays; at most MAX_COMBINATIONS + 1)."""
    n = 1
    for entries in arrays(prompt):
        n = min(n * len(entries), MAX_COMBINATIONS + 1)
    return n


def array_count(prompt: Any, count: Any, seeds: Any, max_count: int) -> Any:
    """A job's total image count with the arrays of its ``prompt`` (``count`` images per combination; with
    ``seeds`` and no ``count``: one seed per image of the expanded job). The count as given without arrays.

    Raises:
        InvalidInput: naming ``prompt`` and the number of images it expands to when that is more than
            ``max_count`` (limits.max_count), or ``seeds`` when they do not fit the combinations.
    """
    n = combinations(prompt)
    if n == 1:
        return count
    if count is None and isinstance(seeds, (list, tuple)) and seeds:
        if len(seeds) % n:
            raise InvalidInput(f"seeds has {len(seeds)} values but the prompt's [[...]] arrays make {n} "
                               f"combinations: give a multiple of {n} seeds (one per image), or a count",
                               field="seeds")
        per = len(seeds) // n
    else:
        per = 1 if count is None else count
    if not isinstance(per, int) or isinstance(per, bool) or per < 1:
        return count  # the count check names the bad value
    total = per * n
    if total > max_count:
        shown = f"more than {MAX_COMBINATIONS}" if n > MAX_COMBINATIONS else str(total)
        raise InvalidInput(f"prompt: its [[...]] arrays make {n if n <= MAX_COMBINATIONS else shown} combinations "
                           f"x count {per} = {shown} images, more than a job may make (limits.max_count = "
                           f"{max_count}): use fewer entries or a smaller count, or split the job",
                           field="prompt", code="too_many_images")
    if isinstance(seeds, (list, tuple)) and seeds and len(seeds) != total:
        raise InvalidInput(f"seeds has {len(seeds)} values but the job makes {total} images ({n} combinations of "
                           f"the prompt's [[...]] arrays x count {per}): give one seed per image", field="seeds")
    return total


# ---- per image -------------------------------------------------------------------------------------------------
def apply_arrays(text: str, index: int) -> str:
    """``text`` with each array replaced by its entry for image ``index`` (the first array changing fastest)."""
    mult = 1
    parts: list[str] = []
    pos = 0
    for match in ARRAY_RE.finditer(text):
        entries = _entries(match.group(1))
        parts += [text[pos:match.start()], entries[(index // mult) % len(entries)]]
        mult *= len(entries)
        pos = match.end()
    return "".join(parts) + text[pos:]


def expand_wildcards(text: str, library: WildcardLibrary, seed: int, index: int, in_order: bool = False,
                     field: str = "prompt") -> str:
    """``text`` with every wildcard replaced by a line of its file, nested ones too.

    Args:
        seed: the image's seed (a wildcard's line is drawn from it: the same seed draws the same line).
        index: the image's place in its job (in-order mode takes line ``index`` modulo the file's length).
        in_order: the job's ``wildcards_in_order``.
        field: ``prompt`` or ``negative_prompt`` (each draws on its own).

    Raises:
        WildcardError: an unknown wildcard, nesting deeper than MAX_DEPTH, or a result longer than
            MAX_PROMPT_CHARS.
    """
    if "__" not in text:
        return text
    # a string seed is hashed with SHA-512: the same draw in every process and Python run
    rng = random.Random(f"multigen-wildcards:{field}:{seed}")
    too_long = WildcardError(f"{field}: the prompt's wildcards expand to more than {MAX_PROMPT_CHARS} characters",
                             field)
    size = [0, 0]  # the pass's text so far, its cap

    def pick(match: re.Match[str]) -> str:
        lines = library.lines(match.group(1), field)
        line = lines[index % len(lines)] if in_order else rng.choice(lines)
        # counted as it grows: 4000 wildcards of a 1 MB line would build 4 GB before the check after the pass
        # (the cap leaves room for later wildcards that shrink the text: past it the result is too long anyway)
        size[0] += len(line) - len(match.group(0))
        if size[0] > size[1]:
            raise too_long
        return line

    for _ in range(MAX_DEPTH + 1):
        if not WILDCARD_RE.search(text):
            return text
        size[:] = [len(text), MAX_PROMPT_CHARS + len(text)]
        text = WILDCARD_RE.sub(pick, text)
        if len(text) > MAX_PROMPT_CHARS:
            raise too_long
    raise WildcardError(f"{field}: wildcards nest deeper than {MAX_DEPTH}", field)


def expand_image_prompt(text: str, library: WildcardLibrary, seed: int, index: int, in_order: bool = False,
                        field: str = "prompt", with_arrays: bool = True) -> str:
    """One image's prompt from the string ``text``: arrays (in the ``prompt`` of a job whose prompt was a
    string: ``with_arrays``), then wildcards (arguments: :func:`expand_wildcards`)."""
    if field == "prompt" and with_arrays:
        text = apply_arrays(text, index)
    return expand_wildcards(text, library, seed, index, in_order, field)


def has_tools(text: Any) -> bool:
    """Whether a prompt holds wildcards or arrays (its image metadata then keeps it as written too)."""
    return isinstance(text, str) and bool(WILDCARD_RE.search(text) or ARRAY_RE.search(text))



# ---- <lora:name:weight> tags in a job's prompt ------------------------------------------------------------------
def take_lora_tags(prompt: Any, negative_prompt: Any, loras: Mapping[str, Any],
                   model_type: str | None) -> tuple[Any, list[dict[str, Any]]]:
    """A string ``prompt`` without its ``<lora:name:weight>`` tags, and the LoRAs they name (the job's own,
    ``[{"name", "weight"}]``), checked against the LoRAs of the model's family (``loras``: models.yaml's
    ``lora`` section; an entry of no declared type fits every family).

    Raises:
        InvalidInput: an unknown LoRA or one of another family (naming the usable ones), a weight out of
            range, too many LoRAs, or a tag in ``negative_prompt`` (where it means nothing).
    """
    if isinstance(negative_prompt, str) and LORA_TAG_RE.search(negative_prompt):
        raise InvalidInput("negative_prompt: <lora:...> tags belong in the prompt", field="negative_prompt")
    if not isinstance(prompt, str) or not LORA_TAG_RE.search(prompt):
        return prompt, []
    usable = [name for name, entry in loras.items() if getattr(entry, "type", None) in (None, model_type)]
    text, tags = split_lora_tags(prompt, usable)
    if len(tags) > MAX_LORAS:
        raise InvalidInput(f"prompt: {len(tags)} <lora:...> tags; a job takes at most {MAX_LORAS}", field="prompt")
    for tag in tags:
        try:
            tag["weight"] = float(LORA_WEIGHT.check(tag["weight"], f"prompt: the weight of <lora:{tag['name']}>"))
        except PipeError as e:
            raise InvalidInput(e.message, field="prompt") from None
    return text, tags


def escape_arrays(text: str) -> str:
    """``text`` with each ``[[a, b]]`` written ``[ [a, b] ]``: no array, the same prompt weighting (a
    dialect whose ``[[...]]`` means AUTOMATIC1111's weakening passes its prompts through this)."""
    return ARRAY_RE.sub(lambda m: f"[ [{m.group(1)}] ]", text)
