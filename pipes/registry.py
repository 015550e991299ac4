"""The pipe classes by name: each one's parameter spec, and a loader that imports the class on demand.

Torch-free until a class is loaded: the service and the API look up specs (``pipe_spec``)
without importing the pipes, and get a class (``pipe_class``) only where a pipe is built.
This replaces ``getattr(multigen.pipes, classname)``, which accepted any attribute name.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from . import spec as specs
from .errors import PipeError
from .families.base import Role
from .parameters import PipeSpec


class UnknownPipeClassError(PipeError):
    """A class name that is not a pipe class (the message lists the known ones)."""


@dataclass(frozen=True)
class PipeClassEntry:
    """One pipe class: its name, its spec and the module that defines it."""

    classname: str
    spec: PipeSpec
    module: str  #: relative to ``multigen.pipes``
    #: the task it runs (its class's ``ROLE``), known without importing it (the service checks a
    #: session's pipe against the model's family); None: asked of the class, which imports it
    role: Role | None = None

    def load(self) -> type:
        """Import the class (torch and diffusers with it)."""
        cls = getattr(importlib.import_module(self.module, __package__), self.classname)
        if getattr(cls, "SPEC", None) is not self.spec:  # a class must check what the service checks
            raise TypeError(f"{self.classname}.SPEC is not the registered spec of {self.classname}")
        if self.role is not None and getattr(cls, "ROLE", None) is not self.role:
            raise TypeError(f"{self.classname}.ROLE is not the registered role {self.role.value}")
        return cls


_ENTRIES: dict[str, PipeClassEntry] = {e.classname: e for e in (
    PipeClassEntry("Prompt2ImPipe", specs.PROMPT2IM, ".prompt2im", Role.TEXT2IMAGE),
    PipeClassEntry("Im2ImPipe", specs.IM2IM, ".im2im", Role.IMAGE2IMAGE),
    PipeClassEntry("MaskedIm2ImPipe", specs.MASKED_IM2IM, ".im2im", Role.INPAINT),
    PipeClassEntry("InpaintingPipe", specs.INPAINTING, ".im2im", Role.INPAINT),
    PipeClassEntry("Cond2ImPipe", specs.COND2IM, ".controlnet", Role.CONTROLNET),
    PipeClassEntry("CIm2ImPipe", specs.CIM2IM, ".controlnet", Role.CONTROLNET_IMAGE2IMAGE),
    PipeClassEntry("Edit2ImPipe", specs.EDIT2IM, ".edit", Role.EDIT),
)}
if set(_ENTRIES) != set(specs.PIPE_SPECS):  # every declared spec has a class, and every class a spec
    raise ImportError(f"pipe registry {sorted(_ENTRIES)} and specs {sorted(specs.PIPE_SPECS)} differ")


def pipe_names() -> tuple[str, ...]:
    """The names of the pipe classes, in declaration order."""
    return tuple(_ENTRIES)


def pipe_entry(classname: str) -> PipeClassEntry:
    """The registry entry of ``classname``.

    Raises:
        UnknownPipeClassError: not a pipe class; the message lists the known ones.
    """
    entry = _ENTRIES.get(classname) if isinstance(classname, str) else None
    if entry is None:
        known = ", ".join(_ENTRIES)
        raise UnknownPipeClassError(f"unknown pipe class {classname!r}; known: {known}", "classname", known)
    return entry


def pipe_spec(classname: str) -> PipeSpec:
    """The parameter spec of a pipe class (no torch import).

    Raises:
        UnknownPipeClassError: not a pipe class.
    """
    return pipe_entry(classname).spec


def pipe_role(classname: str) -> Role:
    """The task (:class:`Role`) a pipe class runs: which of a family's diffusers classes it uses.

    Raises:
        UnknownPipeClassError: not a pipe class.
    """
    entry = pipe_entry(classname)
    return entry.role if entry.role is not None else Role(entry.load().ROLE)


def pipe_class(classname: str) -> type:
    """The pipe class itself (imports torch and diffusers on first use).

    Raises:
        UnknownPipeClassError: not a pipe class.
    """
    return pipe_entry(classname).load()


def spec_of(pipe_cls: Any) -> PipeSpec:
    """The spec of a pipe class or of a stand-in for one (tests' fakes).

    A :class:`PipeSpec` as it is; else its ``SPEC``; else the registered spec of its name; else
    one built from its ``PARAMS`` and ``ALIASES`` (names some pipe class declares are checked as
    declared there, others not at all).
    """
    if isinstance(pipe_cls, PipeSpec):
        return pipe_cls
    found = getattr(pipe_cls, "SPEC", None)
    if isinstance(found, PipeSpec):
        return found
    name = getattr(pipe_cls, "__name__", None) or str(pipe_cls)
    if name in _ENTRIES:
        return _ENTRIES[name].spec
    return specs.spec_from_names(name, getattr(pipe_cls, "PARAMS", ()), getattr(pipe_cls, "ALIASES", None))
