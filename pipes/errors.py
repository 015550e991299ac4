"""Errors raised by :mod:`multigen.pipes`.

Every error caused by bad input derives from :class:`PipeError` (a ``ValueError``) and
names the parameter (``param``) and, where it helps, the allowed values (``allowed``).
:class:`Cancelled` is not an input error: ``gen`` raises it when the cancel check said so.
"""
from __future__ import annotations


class PipeError(ValueError):
    """Base of every bad-input error of the pipes.

    Args:
        message: Human-readable text; should name the parameter and the allowed values.
        param: Name of the offending parameter, or None.
        allowed: Text describing the allowed values, or None.
    """

    def __init__(self, message: str, param: str | None = None, allowed: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.allowed = allowed


class UnknownSchedulerError(PipeError):
    """A scheduler name that is not known."""


class SizeError(PipeError):
    """A width, height or scale that gives an image too small or too large."""


class MissingImageError(PipeError):
    """An image pipe was set up or run without its input image."""


class MaskSizeError(PipeError):
    """A mask (or painted image) whose size differs from the input image."""


class ModelTypeMismatchError(PipeError):
    """A declared model type that disagrees with the one found in the weights."""


class MissingConditionModelError(PipeError):
    """A condition type (depth, pose) that needs a model that is not configured."""


class UnknownParameterError(PipeError):
    """A setup parameter that the pipe does not accept."""


class InvalidValueError(PipeError):
    """A parameter value of the wrong type or out of range."""


class Cancelled(Exception):
    """Raised by ``gen`` when the cancel check returned True; the partial image is discarded."""


__all__ = [
    "PipeError", "UnknownSchedulerError", "SizeError", "MissingImageError", "MaskSizeError",
    "ModelTypeMismatchError", "MissingConditionModelError", "UnknownParameterError",
    "InvalidValueError", "Cancelled",
]
