"""What a parameter is: :class:`Param` (type, range, default, help, check), :class:`ParamSet`
(parameters in order, and the derivations model families need) and :class:`PipeSpec` (the
parameters of one pipe class, its aliases and its image slots).

The declarations themselves are in :mod:`.spec`. Torch-free: only :mod:`.errors` is imported.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from enum import Enum
from types import MappingProxyType
from typing import Any

from .errors import InvalidValueError, PipeError


class ParamType(str, Enum):
    """What kind of value a parameter takes (``str`` Enum: it goes to JSON as it is)."""

    INT = "int"
    FLOAT = "float"
    BOOL = "bool"
    STR = "str"
    CHOICE = "choice"  #: one of ``choices``
    SCALE = "scale"  #: a factor, or ``[width, height]`` in pixels
    IMAGE = "image"  #: a PIL image, array or path; checked by the pipe that loads it
    PROMPT = "prompt"  #: a string or a Cfgen grammar (list/dict); checked by ``cfgen.validate_grammar``
    ANY = "any"  #: a name no spec declares (classes without ``SPEC``): passed on unchecked


def _fmt(x: Any) -> str:
    """A number as people write it: ``0`` not ``0.0``, ``0.01``, ``18446744073709551615``."""
    if isinstance(x, float) and x.is_integer() and abs(x) < 1e15:
        return str(int(x))
    return str(x)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


@dataclass(frozen=True)
class Param:
    """One parameter.

    Args:
        name: the name ``setup`` (or the job) takes.
        type: what kind of value.
        description: one line of help for people (API docs, the web form).
        default: the value when none is given (None: decided at run time, see ``description``).
        minimum, maximum: the range of numbers, bounds included (None: unbounded on that side).
        exclusive_minimum, exclusive_maximum: the bound itself is not allowed (a strength of 0
            redraws nothing, so the pipe refuses it).
        unit: what the numbers count ("px", "layers"), for help texts.
        choices: the allowed values of a ``CHOICE`` parameter.
        many: one value or a list of them (one per ControlNet, one per image).
        max_items: the longest list a ``many`` parameter takes.
        nullable: None is a value (it means "automatic"/"the pipe's default").
        sides: for ``SCALE``, the parameters of the two sides of ``[width, height]``.
        limit: the config key that set ``maximum`` (it is named in the error message).
        range_error: the error class of an out-of-range value.
    """

    name: str
    type: ParamType
    description: str
    default: Any = None
    minimum: int | float | None = None
    maximum: int | float | None = None
    exclusive_minimum: bool = False
    exclusive_maximum: bool = False
    unit: str | None = None
    choices: tuple[str, ...] = ()
    many: bool = False
    max_items: int | None = None
    nullable: bool = False
    sides: tuple[Param, Param] | None = None
    limit: str | None = None
    range_error: type[PipeError] = InvalidValueError

    @property
    def image(self) -> bool:
        """True when the parameter carries an image."""
        return self.type is ParamType.IMAGE

    # ---- texts ----------------------------------------------------------------------------------
    def range_text(self) -> str:
        """``"1 to 1000"``, with the unit and the config key that set the maximum."""
        lo = None if self.minimum is None else _fmt(self.minimum) + (" (exclusive)" if self.exclusive_minimum else "")
        hi = None if self.maximum is None else _fmt(self.maximum) + (" (exclusive)" if self.exclusive_maximum else "")
        if lo is None and hi is None:
            text = "any number"
        elif hi is None:
            text = f"more than {lo}" if self.exclusive_minimum else f"{lo} or more"
        elif lo is None:
            text = f"below {hi}" if self.exclusive_maximum else f"at most {hi}"
        else:
            text = f"{lo} to {hi}"
        if self.unit:
            text += f" {self.unit}"
        if self.limit:
            text += f" ({self.limit} in config.yaml)"
        return text

    def allowed(self) -> str:
        """What the parameter takes, for error messages and help texts."""
        t = self.type
        if t is ParamType.INT:
            one = f"an integer from {self.range_text()}"
        elif t is ParamType.FLOAT:
            one = f"a number from {self.range_text()}"
        elif t is ParamType.BOOL:
            one = "true or false"
        elif t is ParamType.CHOICE:
            one = "one of " + ", ".join(self.choices)
        elif t is ParamType.SCALE:
            one = f"a factor from {self.range_text()}"
            if self.sides:
                one += (f", or [width, height] in pixels ({self.sides[0].range_text()} by "
                        f"{self.sides[1].range_text()})")
        elif t is ParamType.IMAGE:
            one = "an image (PIL image, array or file path)"
        elif t is ParamType.PROMPT:
            one = "a string or a prompt grammar (list/dict)"
        elif t is ParamType.STR:
            one = "a string"
        else:
            one = "any value"
        if self.many:
            one += ", or a list of them"
        if self.nullable:
            one += ", or null (the default)"
        return one

    def describe(self) -> dict[str, Any]:
        """The JSON description of ``GET /api/v1/models`` (and the web form)."""
        out: dict[str, Any] = {"name": self.name, "type": self.type.value, "min": self.minimum,
                               "max": self.maximum, "default": self.default, "unit": self.unit,
                               "description": self.description, "image": self.image}
        if self.exclusive_minimum:
            out["exclusive_min"] = True
        if self.exclusive_maximum:
            out["exclusive_max"] = True
        if self.choices:
            out["choices"] = list(self.choices)
        if self.many:
            out["many"] = True
            out["max_items"] = self.max_items
        if self.nullable:
            out["nullable"] = True
        if self.limit:
            out["limit"] = self.limit
        if self.sides:
            out["pixels"] = {"min": [s.minimum for s in self.sides], "max": [s.maximum for s in self.sides]}
        return out

    # ---- checking ---------------------------------------------------------------------------------
    def check(self, value: Any, label: str | None = None) -> Any:
        """``value`` checked and normalised (an integral float becomes an int, an int a float).

        Args:
            value: what was given.
            label: the name used in messages (default ``name``); list items are ``label[i]``.

        Raises:
            InvalidValueError: the wrong type, or a choice that is not known (naming ``label``
                and what is allowed).
            PipeError: ``range_error`` for a number out of range.
        """
        name = label or self.name
        if value is None:
            if self.nullable or self.image:
                return None
            raise InvalidValueError(f"{name} must be {self.allowed()}, not None", name, self.allowed())
        if self.many and isinstance(value, (list, tuple)):
            if not value:
                raise InvalidValueError(f"{name} is an empty list; allowed: {self.allowed()}", name, self.allowed())
            if self.max_items is not None and len(value) > self.max_items:
                raise InvalidValueError(f"{name} has {len(value)} values; allowed: at most {self.max_items}", name,
                                        f"at most {self.max_items} values")
            return [self._check_one(v, f"{name}[{i}]") for i, v in enumerate(value)]
        return self._check_one(value, name)

    def _check_one(self, value: Any, name: str) -> Any:
        t = self.type
        if t in (ParamType.IMAGE, ParamType.ANY):
            return value
        if t is ParamType.INT:
            return self._number(value, name, integer=True)
        if t is ParamType.FLOAT:
            return self._number(value, name, integer=False)
        if t is ParamType.SCALE:
            if isinstance(value, (list, tuple)):
                if len(value) != 2 or self.sides is None:
                    raise InvalidValueError(f"{name} must be {self.allowed()}, not {_short(value)}", name,
                                            self.allowed())
                return [self.sides[0].check(value[0], f"{name}[0]"), self.sides[1].check(value[1], f"{name}[1]")]
            return self._number(value, name, integer=False)
        if t is ParamType.CHOICE:
            if isinstance(value, str) and value in self.choices:
                return value
            raise InvalidValueError(f"{name} {_short(value)} is not known; allowed: {', '.join(self.choices)}", name,
                                    ", ".join(self.choices))
        ok = {ParamType.BOOL: isinstance(value, bool), ParamType.STR: isinstance(value, str),
              ParamType.PROMPT: isinstance(value, (str, list, tuple, dict))}[t]
        if not ok:
            raise InvalidValueError(f"{name} must be {self.allowed()}, not {_short(value)}", name, self.allowed())
        return value

    def _number(self, value: Any, name: str, integer: bool) -> int | float:
        ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
        if ok and not isinstance(value, numbers.Integral):
            # NaN and infinities are no numbers here; 2.0 is the integer 2
            ok = math.isfinite(value) and (not integer or float(value).is_integer())
        if not ok:
            raise InvalidValueError(f"{name} must be {self.allowed()}, not {_short(value)}", name, self.allowed())
        number = int(value) if integer else float(value)
        lo, hi = self.minimum, self.maximum
        if (lo is not None and (number < lo or (self.exclusive_minimum and number == lo))) or (
                hi is not None and (number > hi or (self.exclusive_maximum and number == hi))):
            raise self.range_error(f"{name} {_fmt(value)} is out of range; allowed: {self.range_text()}", name,
                                   self.range_text())
        return number

    # ---- derivation -------------------------------------------------------------------------------
    def narrowed(self, *, minimum: float | None = None, maximum: float | None = None,
                 max_items: int | None = None, choices: Iterable[str] | None = None,
                 limit: str | None = None) -> Param:
        """This parameter with the tighter of its own range and the one given.

        Args:
            minimum, maximum, max_items: a bound; the spec's own wins where it is tighter.
            choices: the allowed subset of ``choices``.
            limit: the config key of ``maximum``, recorded when it is the one that binds.

        Raises:
            ValueError: the result allows nothing (a declaration error).
        """
        lo, hi, items, kept = self.minimum, self.maximum, self.max_items, self.limit
        lo_out, hi_out = self.exclusive_minimum, self.exclusive_maximum
        if minimum is not None and (lo is None or minimum > lo):
            lo, lo_out = minimum, False
        if maximum is not None and (hi is None or maximum <= hi):
            if hi is None or maximum < hi:
                hi, hi_out = maximum, False
            kept = limit or kept  # the config's bound binds (an equal one too: it is the one to change)
        if max_items is not None:
            items = max_items if items is None else min(items, max_items)
        allowed = self.choices if choices is None else tuple(c for c in self.choices if c in set(choices))
        if (lo is not None and hi is not None and (lo > hi or (lo == hi and (lo_out or hi_out)))) or (
                self.choices and not allowed):
            raise ValueError(f"narrowing {self.name} leaves no allowed value")
        return replace(self, minimum=lo, maximum=hi, exclusive_minimum=lo_out, exclusive_maximum=hi_out,
                       max_items=items, choices=allowed, limit=kept)


@dataclass(frozen=True)
class ParamSet:
    """Parameters in a fixed order, looked up by name; derivations return new sets."""

    params: tuple[Param, ...]
    _index: Mapping[str, Param] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        index = {p.name: p for p in self.params}
        if len(index) != len(self.params):
            raise ValueError(f"parameters declared twice in {[p.name for p in self.params]}")
        object.__setattr__(self, "params", tuple(self.params))
        object.__setattr__(self, "_index", MappingProxyType(index))

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.params)

    def __getitem__(self, name: str) -> Param:
        return self._index[name]

    def get(self, name: str) -> Param | None:
        return self._index.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._index

    def __iter__(self) -> Iterator[Param]:
        return iter(self.params)

    def __len__(self) -> int:
        return len(self.params)

    def defaults(self) -> dict[str, Any]:
        """``{name: default}`` of every parameter."""
        return {p.name: p.default for p in self.params}

    def describe(self) -> list[dict[str, Any]]:
        """The JSON description of every parameter, in order."""
        return [p.describe() for p in self.params]

    def replaced(self, *params: Param) -> ParamSet:
        """This set with the parameters of the same names replaced by ``params`` (in place)."""
        new = {p.name: p for p in params}
        missing = set(new) - set(self._index)
        if missing:
            raise KeyError(f"no parameter {', '.join(sorted(missing))} to replace")
        return replace(self, params=tuple(new.get(p.name, p) for p in self.params))

    def narrowed(self, name: str, **bounds: Any) -> ParamSet:
        """This set with ``name`` narrowed (see :meth:`Param.narrowed`)."""
        return self.replaced(self[name].narrowed(**bounds))

    def extended(self, *params: Param) -> ParamSet:
        """This set with ``params`` added at the end (or replacing those of the same names)."""
        known = [p for p in params if p.name in self._index]
        added = tuple(p for p in params if p.name not in self._index)
        base = self.replaced(*known) if known else self
        return replace(base, params=base.params + added)

    def without(self, *names: str) -> ParamSet:
        """This set without ``names``."""
        return replace(self, params=tuple(p for p in self.params if p.name not in names))


@dataclass(frozen=True)
class PipeSpec(ParamSet):
    """The parameters of one pipe class.

    Args:
        params: what ``setup`` takes, in order.
        classname: the pipe class.
        aliases: metafusion's other names, ``{alias: name}`` (``fimage`` -> ``image``).
        image_slots: the image parameters ``images=[...]`` fill, in order; when the first is a
            ``many`` parameter, the whole list goes to it.
        required_images: groups of parameters, each led by an image parameter; at least one of each group
            must be given (a non-image member counts when its value asks for something: not 0, false or an
            empty list; the inpaint pipes' outpaint distances stand in for the mask).
    """

    classname: str = ""
    aliases: Mapping[str, str] = field(default_factory=dict)
    image_slots: tuple[str, ...] = ()
    required_images: tuple[tuple[str, ...], ...] = ()

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "aliases", MappingProxyType(dict(self.aliases)))
        for alias, name in self.aliases.items():
            if name not in self or alias in self:
                raise ValueError(f"{self.classname}: alias {alias} -> {name} does not name one parameter")
        for name in self.image_slots + tuple(group[0] for group in self.required_images):
            if name not in self or not self[name].image:
                raise ValueError(f"{self.classname}: {name} is not an image parameter of the spec")
        for name in (n for group in self.required_images for n in group):
            if name not in self:
                raise ValueError(f"{self.classname}: required {name} is not a parameter of the spec")
        if self.image_slots and self[self.image_slots[0]].many and not self[self.image_slots[0]].max_items:
            raise ValueError(f"{self.classname}: the list image parameter {self.image_slots[0]} needs max_items")

    @property
    def accepted(self) -> tuple[str, ...]:
        """Every name ``setup`` accepts: the parameters and their aliases."""
        return self.names + tuple(self.aliases)

    @property
    def image_params(self) -> tuple[Param, ...]:
        return tuple(p for p in self.params if p.image)

    @property
    def max_images(self) -> int:
        """The most images ``images=[...]`` may hold."""
        if not self.image_slots:
            return 0
        first = self[self.image_slots[0]]
        return first.max_items if first.many else len(self.image_slots)

    def __hash__(self) -> int:  # the aliases mapping is not hashable itself
        return hash((self.params, self.classname, tuple(sorted(self.aliases.items())), self.image_slots,
                     self.required_images))

    def canonical(self, name: str) -> str:
        """The parameter an alias stands for (other names as they are)."""
        return self.aliases.get(name, name)

    def given(self, params: Mapping[str, Any], name: str) -> Any:
        """The value ``params`` gives ``name``, under its own name or an alias (None if none)."""
        if params.get(name) is not None:
            return params[name]
        for alias in self._aliases_of(name):
            if params.get(alias) is not None:
                return params[alias]
        return None

    def _aliases_of(self, name: str) -> tuple[str, ...]:
        return tuple(a for a, t in self.aliases.items() if t == name)

    def without(self, *names: str) -> PipeSpec:
        """This spec without ``names`` (and the aliases of those)."""
        aliases = {a: t for a, t in self.aliases.items() if t not in names}
        return replace(self, params=tuple(p for p in self.params if p.name not in names), aliases=aliases)

    def _group_of(self, name: str) -> tuple[str, ...]:
        return next((g for g in self.required_images if name in g), (name,))

    def assign_images(self, images: list[Any], params: dict[str, Any]) -> None:
        """Put metafusion's ``images=[...]`` into ``params`` (in place) by ``image_slots``.

        Raises:
            InvalidValueError: images for a pipe that takes none, too many of them, or an image
                whose slot ``params`` already fills (naming ``images``).
        """
        if not images:
            return
        if not self.image_slots:
            raise InvalidValueError(f"{self.classname} takes no input images", "images", "no images")
        first = self[self.image_slots[0]]
        if first.many:
            slots = (first.name,)
            values = [images[0] if len(images) == 1 else list(images)]
        else:
            slots, values = self.image_slots, list(images)
        if len(images) > self.max_images:
            what = (f"up to {self.max_images} images ({', '.join(self.image_slots)})" if len(self.image_slots) > 1
                    else f"{'one image' if self.max_images == 1 else f'up to {self.max_images} images'} "
                         f"({first.name})")
            raise InvalidValueError(f"{self.classname} takes {what}, got {len(images)}", "images", what)
        for i, (slot, value) in enumerate(zip(slots, values)):
            taken = [key for n in self._group_of(slot) for key in (n, *self._aliases_of(n))
                     if params.get(key) is not None]
            if taken:
                raise InvalidValueError(f"images[{i}] would be {slot}, but {taken[0]} is given as well: pass one "
                                        "of them", "images", f"images or {taken[0]}")
            params[slot] = value

    def missing_images(self, params: Mapping[str, Any]) -> list[tuple[str, ...]]:
        """The groups of ``required_images`` of which ``params`` gives none."""
        return [g for g in self.required_images if not any(self.fills(params, n) for n in g)]

    def fills(self, params: Mapping[str, Any], name: str) -> bool:
        """Whether ``params`` gives ``name`` for its group of ``required_images``: an image given, or another
        parameter with a value that asks for something (an outpaint distance of 0 does not)."""
        value = self.given(params, name)
        return value is not None and (self[name].image or bool(value))

    def describe_images(self) -> dict[str, Any]:
        """How images reach this pipe, for ``GET /api/v1/models``."""
        return {"slots": list(self.image_slots), "required": [list(g) for g in self.required_images],
                "max": self.max_images, "aliases": dict(self.aliases)}
