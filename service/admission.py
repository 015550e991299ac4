"""Admission of a job: everything a queued job asks for is checked before it is stored.

Names, counts, seeds, prompts, priority and every setup parameter against the session's
pipe (its parameter spec and the config's limits; scheduler names against the schedulers'
registry), and the input images against what the pipe takes. Each error is an :class:`InvalidInput` naming the field.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from multigen.pipes.errors import UnknownSchedulerError
from multigen.pipes.registry import pipe_spec
from multigen.pipes.schedulers import resolve_name

from .catalog import ModelCatalog
from .errors import InvalidInput
from .config import Limits
from .records import SessionRecord
from .validation import (check_count_and_seeds, check_has_image, check_priority, check_prompt, check_setup_params,
                         images_to_params)


@dataclass(frozen=True)
class AdmittedJob:
    """A job request that passed every check, seeds fixed."""

    count: int
    seeds: list[int]
    prompt: Any
    negative_prompt: Any
    priority: int
    #: setup parameters, input images among them (PIL images, arrays or paths, not stored yet)
    params: dict[str, Any]


def admit_job(catalog: ModelCatalog, limits: Limits, session: SessionRecord, *, images: Any, prompt: Any,
              count: Any, seeds: Any, negative_prompt: Any, priority: Any,
              setup_params: dict[str, Any]) -> AdmittedJob:
    """Check a job for ``session``; seeds not given are drawn now.

    Raises:
        InvalidInput: naming the offending field and what is allowed.
    """
    classname = catalog.pipe(session.pipe).classname
    count, seeds = check_count_and_seeds(count, seeds, limits)
    prompt = check_prompt(prompt, "prompt")
    negative_prompt = check_prompt(negative_prompt, "negative_prompt") or None
    priority = check_priority(priority)
    params = {k: v for k, v in setup_params.items() if v is not None}
    check_setup_params(params, pipe_spec(classname), session.pipe, limits)
    if params.get("scheduler") is not None:  # a name the pipe would refuse fails now, not when the job runs
        try:
            resolve_name(params["scheduler"])
        except UnknownSchedulerError as e:
            raise InvalidInput(str(e), field="scheduler") from None
    images_to_params(classname, images, params, session.pipe)
    check_has_image(classname, params, session.pipe)
    return AdmittedJob(count, seeds, prompt, negative_prompt, priority, params)
