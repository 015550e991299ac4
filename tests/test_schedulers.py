"""Schedulers by name: lookup, options, errors, and a real run of every listed one."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from multigen.pipes.errors import InvalidValueError, PipeError, UnknownSchedulerError
from multigen.pipes import schedulers
from multigen.pipes.schedulers import list_schedulers, make_scheduler, normalize_name

BASE = {
    "_class_name": "EulerDiscreteScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "use_karras_sigmas": True,  # a model config that turns Karras on
}


def test_list_has_class_and_a1111_names():
    names = list_schedulers()
    for name in ("EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler", "DPMSolverMultistepScheduler",
                 "euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras", "dpmpp_2m_sde", "dpmpp_2m_sde_karras",
                 "ddim", "ddpm", "pndm", "lcm", "unipc", "heun", "dpm2", "dpm2_a", "deis", "tcd"):
        assert name in names
    assert len(names) == len(set(names))


def test_optional_packages_decide_what_is_listed(monkeypatch):
    names = list_schedulers()  # scipy and torchsde are dependencies: everything is listed
    for name in ("dpmpp_sde", "dpmpp_sde_karras", "DPMSolverSDEScheduler", "lms", "lms_karras"):
        assert name in names
    monkeypatch.setattr(schedulers, "_installed", lambda package: package != "torchsde")
    names = list_schedulers()
    assert "dpmpp_sde" not in names and "DPMSolverSDEScheduler" not in names and "lms" in names


@pytest.mark.parametrize("display, norm", [
    ("DPM++ 2M Karras", "dpmpp_2m_karras"),
    ("Euler a", "euler_a"),
    ("DPM++ 2M SDE Karras", "dpmpp_2m_sde_karras"),
    ("DPM2 a Karras", "dpm2_a_karras"),
    ("  UniPC ", "unipc"),
])
def test_normalize_display_names(display, norm):
    assert normalize_name(display) == norm


@pytest.mark.parametrize("name, cls, options", [
    ("euler", "EulerDiscreteScheduler", {"use_karras_sigmas": False}),
    ("EULER_KARRAS", "EulerDiscreteScheduler", {"use_karras_sigmas": True}),
    ("Euler a", "EulerAncestralDiscreteScheduler", {}),
    ("DPM++ 2M", "DPMSolverMultistepScheduler", {"use_karras_sigmas": False, "algorithm_type": "dpmsolver++"}),
    ("DPM++ 2M Karras", "DPMSolverMultistepScheduler", {"use_karras_sigmas": True, "algorithm_type": "dpmsolver++"}),
    ("dpmpp_2m_sde_karras", "DPMSolverMultistepScheduler",
     {"use_karras_sigmas": True, "algorithm_type": "sde-dpmsolver++"}),
    ("dpmpp_2m_sde_gpu", "DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    ("eulerdiscretescheduler", "EulerDiscreteScheduler", {"use_karras_sigmas": True}),  # config as is
    ("ddim", "DDIMScheduler", {"clip_sample": False, "set_alpha_to_one": False}),
    ("PLMS", "PNDMScheduler", {"skip_prk_steps": True}),
    ("DPM2 a Karras", "KDPM2AncestralDiscreteScheduler", {"use_karras_sigmas": True}),
    ("lcm", "LCMScheduler", {}),
])
def test_names_build_the_right_class_and_options(name, cls, options):
    sched = make_scheduler(name, BASE)
    assert type(sched).__name__ == cls
    for key, value in options.items():
        assert sched.config[key] == value, key
    assert sched.config["beta_schedule"] == "scaled_linear"  # taken from the base config


def test_each_call_makes_a_new_instance():
    a, b = make_scheduler("euler", BASE), make_scheduler("euler", BASE)
    assert a is not b
    a.set_timesteps(3)
    assert b.timesteps is None or len(b.timesteps) != 3


def test_timestep_spacing():
    assert make_scheduler("euler", BASE, timestep_spacing="trailing").config["timestep_spacing"] == "trailing"
    assert make_scheduler("euler", BASE).config["timestep_spacing"] == "leading"
    with pytest.raises(InvalidValueError) as info:
        make_scheduler("euler", BASE, timestep_spacing="sideways")
    assert info.value.param == "timestep_spacing"
    assert "trailing" in str(info.value)


@pytest.mark.parametrize("bad", ["euler_z", "", "KarrasVeScheduler", None])
def test_unknown_scheduler_names_parameter_and_allowed(bad):
    with pytest.raises(UnknownSchedulerError) as info:
        make_scheduler(bad, BASE)
    err = info.value
    assert isinstance(err, PipeError)
    assert err.param == "scheduler"
    assert "scheduler" in str(err) and "dpmpp_2m_karras" in str(err)
    assert "EulerDiscreteScheduler" in err.allowed


def test_missing_optional_package_says_what_to_install(monkeypatch):
    monkeypatch.setattr(schedulers, "_installed", lambda package: package != "torchsde")
    with pytest.raises(UnknownSchedulerError) as info:
        make_scheduler("DPM++ SDE Karras", BASE)
    assert "torchsde" in str(info.value) and info.value.param == "scheduler"


@pytest.mark.slow
def test_every_listed_scheduler_runs_on_tiny_sd(models_dir):
    """4 steps at 64x64 each: finite output; schedulers with different configs differ."""
    from diffusers import StableDiffusionPipeline

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _run_every_scheduler(StableDiffusionPipeline.from_pretrained(models_dir / "tiny-sd"))
    finally:
        torch.set_num_threads(threads)


def _run_every_scheduler(pipe):
    pipe.set_progress_bar_config(disable=True)
    base = dict(pipe.scheduler.config)
    images, configs = {}, {}
    for name in list_schedulers():
        pipe.scheduler = make_scheduler(name, base)
        if hasattr(pipe.scheduler, "noise_sampler_seed"):  # DPM++ SDE: random unless seeded (the pipes seed it)
            pipe.scheduler.noise_sampler_seed = 7
        settings = {k: v for k, v in pipe.scheduler.config.items() if not k.startswith("_")}
        configs[name] = (type(pipe.scheduler).__name__, sorted(settings.items()))
        out = pipe("a red house", num_inference_steps=4, width=64, height=64,
                   generator=torch.Generator().manual_seed(7), output_type="np").images[0]
        assert np.isfinite(out).all(), name
        images[name] = (out * 255).round().astype(np.uint8)
    for a, b in itertools.combinations(images, 2):
        if configs[a] == configs[b]:  # e.g. "euler" and EulerDiscreteScheduler on this config
            assert np.array_equal(images[a], images[b]), (a, b)
        else:
            assert not np.array_equal(images[a], images[b]), (a, b)
