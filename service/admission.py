"""Admission of a job: everything a queued job asks for is checked before it is stored.

Names, counts, seeds, prompts, priority and every setup parameter against the session's
pipe (its parameter spec and the config's limits), what the model's family refuses (scheduler
names of the other kind, other families' parameters), and the input images against what the
pipe takes. The job-level tools are resolved here, each by its own module: styles (styles.py),
``<lora:...>`` tags, ``[[...]]`` arrays and wildcards (prompt_tools.py), performance presets and
aspect ratios (presets.py), the webhook and grid (webhook_targets.py), the output size of an upscale or an
outpaint (grown.py: within ``limits.max_width``/``max_height``, charged at that size). Each error is an
:class:`InvalidInput` naming the field.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from multigen.pipes.registry import pipe_spec
from multigen.pipes.spec import STEPS

from .budget import CostBudget, job_cost
from .grown import grown_size
from .catalog import ModelCatalog
from .config import Config
from .jobs import JobState
from .presets import apply_job_presets
from .prompt_tools import array_count, check_in_order, check_wildcards, take_lora_tags
from .records import JobRecord, SessionRecord
from .validation import (check_count_and_seeds, check_has_image, check_priority, check_prompt, check_setup_params,
                         images_to_params)
from .views import now_iso
from .webhook_targets import take_job_extras


@dataclass(frozen=True)
class AdmittedJob:
    """A job request that passed every check, seeds fixed."""

    count: int
    seeds: list[int]
    prompt: Any
    negative_prompt: Any
    priority: int
    #: setup parameters, input images among them (PIL images, arrays or paths, not stored yet), and the
    #: job's ``styles`` (their names, as the library spells them; the runner takes them out before setup)
    params: dict[str, Any]
    #: megapixel-steps charged to the user's budget (budget.py)
    cost: float

    def record(self, job_id: str, session: SessionRecord, stored_params: dict[str, Any]) -> JobRecord:
        """The job as the store keeps it, queued now (``stored_params``: images saved as files)."""
        return JobRecord(id=job_id, session_id=session.id, user=session.user, model=session.model,
                         state=JobState.QUEUED.value, priority=self.priority, count=self.count, seeds=self.seeds,
                         prompt=self.prompt, negative_prompt=self.negative_prompt, params=stored_params,
                         created_at=now_iso())


def admit_job(catalog: ModelCatalog, config: Config, budget: CostBudget, session: SessionRecord, *, images: Any,
              prompt: Any, count: Any, seeds: Any, negative_prompt: Any, priority: Any,
              setup_params: dict[str, Any]) -> AdmittedJob:
    """Check a job for ``session`` and charge its cost to the user's budget; seeds not given are drawn now.

    ``setup_params`` holds the pipe's setup parameters and the job-level ones (``spec.JOB``) beyond the
    arguments: ``styles`` (names of the config's library), checked here and kept with the parameters; the
    prompt tools: ``<lora:...>`` tags leave the prompt for the params' ``job_loras``, ``[[...]]`` arrays
    multiply the count, every ``__wildcard__`` must be in the config's wildcards (``wildcards_in_order`` is
    kept); ``performance`` and ``aspect_ratio`` fill in setup parameters the job leaves out; ``webhook_url``
    (a host the config allows) and ``grid`` are kept.

    Raises:
        InvalidInput: naming the offending field and what is allowed (a job over the per-job cost too).
        OverBudget: the user's hourly budget has no room for it now.
    """
    classname = catalog.pipe(session.pipe).classname
    prompt, tag_loras = take_lora_tags(prompt, negative_prompt, catalog.models.lora, catalog.model_type(session.model))
    limits = config.limits
    count = array_count(prompt, count, seeds, limits.max_count)  # count images per combination of the arrays
    count, seeds = check_count_and_seeds(count, seeds, limits)
    prompt = check_prompt(prompt, "prompt")
    negative_prompt = check_prompt(negative_prompt, "negative_prompt") or None
    for text, field in ((prompt, "prompt"), (negative_prompt, "negative_prompt")):
        check_wildcards(text, config.wildcards, field)
    in_order = check_in_order(setup_params.pop("wildcards_in_order", None))
    priority = check_priority(priority)
    extras = take_job_extras(setup_params, config.webhooks)  # webhook_url, grid (webhooks.py)
    params = {k: v for k, v in setup_params.items() if v is not None and k != "styles"}
    style_names = config.styles.check(setup_params.get("styles"))
    # `performance` and `aspect_ratio` (presets.py) fill in setup parameters the job leaves out, checked below
    job_level = apply_job_presets(params, config.presets, catalog.family(session.model),
                                  catalog.defaults(session.model), catalog.models.lora)
    check_setup_params(params, pipe_spec(classname), session.pipe, limits)
    # what the model's family refuses (its schedulers, its own parameters) fails now, not when the job runs
    catalog.check_job_params(session.model, params)
    images_to_params(classname, images, params, session.pipe)
    check_has_image(classname, params, session.pipe)
    steps, width, height = _expected_size(catalog, session.model, params)
    grown = grown_size(params, limits)  # an upscale's or an outpaint's output: within the limits, charged at it
    if grown is not None:
        width, height = grown
        steps = 1 if params.get("uov") == "upscale_fast" else steps  # the enlargement alone: no diffusion step
    cost = job_cost(count, steps, width, height)
    budget.charge(session.user, cost, {"count": count, "steps": steps, "size": f"{width}x{height}"}, images=count)
    params.update(job_level)  # the preset's name, its LoRA as the job's own (job_loras), the aspect ratio
    if style_names:
        params["styles"] = style_names
    if tag_loras:  # the job's own LoRAs, after any a preset gave (runner: on top of the session's)
        params["job_loras"] = list(params.get("job_loras") or []) + tag_loras
    if in_order:
        params["wildcards_in_order"] = True
    params.update(extras)
    return AdmittedJob(count, seeds, prompt, negative_prompt, priority, params, cost)


def _expected_size(catalog: ModelCatalog, model: str, params: dict[str, Any]) -> tuple[int, int, int]:
    """Steps, width and height a job will most likely run with: its own, else the model's defaults (models.yaml's,
    else its family's), else the model's native size and the spec's default steps (an estimate for image
    pipes that size from their input)."""
    defaults = catalog.expected_defaults(model)
    native = catalog.native_size(model) or (512, 512)
    steps = params.get("steps") or defaults.get("steps") or STEPS.default
    width = params.get("width") or defaults.get("width") or native[0]
    height = params.get("height") or defaults.get("height") or native[1]
    return int(steps), int(width), int(height)
