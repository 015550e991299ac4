"""Flow-matching schedulers on the tiny Flux model (models/tiny-flux, tiny-controlnet-flux): each name of
``FLOW_SCHEDULERS`` runs 2 steps in every Flux pipe class, keeps the model's own shift, gives the default's
image where it builds the default's sampler and another where it does not, repeats with a seed; SD-style
names are refused on Flux and flow names on SD."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipes_fixtures import noise_image, shapes_image, one_thread  # noqa: F401 (autouse)
from multigen.pipes import CIm2ImPipe, Cond2ImPipe, Im2ImPipe, InpaintingPipe, MaskedIm2ImPipe, Prompt2ImPipe, load_base
from multigen.pipes.errors import InvalidValueError, UnknownSchedulerError
from multigen.pipes.families import FLUX, SD, family
from multigen.pipes.schedulers import FLOW_SCHEDULERS, list_flow_schedulers, list_schedulers
from multigen.pipes.tiny.flux import FLUX_CONTROLNET_DIR, FLUX_DIR

pytestmark = pytest.mark.slow

W, H = 64, 64
PROMPT = {"prompt": "a lighthouse at dusk", "seed": 5}
#: options that change which sampler a flow-matching scheduler is (not its schedule's shape)
SAMPLER_KEYS = ("stochastic_sampling",)


@pytest.fixture(scope="module")
def flux_base(models_dir: Path):
    base, _ = load_base(models_dir / FLUX_DIR, dtype="float32")
    return base


def px(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def _run(pipe: Prompt2ImPipe, steps: int, scheduler: str | None, seed: int = 5) -> tuple[np.ndarray, tuple]:
    """The image of ``scheduler`` (None: the model's own) and what decides it: class, sampler options, sigmas."""
    pipe.setup(width=W, height=H, steps=steps, scheduler=scheduler)
    out = px(pipe.gen({**PROMPT, "seed": seed}))
    sched = pipe.pipe.scheduler
    decides = (type(sched).__name__, tuple(sched.config.get(k) for k in SAMPLER_KEYS),
               tuple(np.round(sched.sigmas.numpy(), 5)))
    return out, decides


def test_every_flow_scheduler_is_listed_and_is_the_flow_families():
    assert list_flow_schedulers() == list(FLOW_SCHEDULERS)  # scipy is a dependency: all installed
    for fam in (FLUX, family("QWEN_IMAGE"), family("Z_IMAGE")):
        assert fam.schedulers == FLOW_SCHEDULERS and fam.scheduler_choice
    assert not set(FLOW_SCHEDULERS) & set(list_schedulers())  # no name means two things


@pytest.mark.parametrize("steps", [2, 3])
def test_each_runs_and_differs_from_the_default_where_it_should(flux_base, steps):
    """2 steps: the sigma spacings (Karras, exponential, beta) keep both ends of the schedule and equal the
    default; 3 steps: they move the middle one. The image is the default's exactly when the class, the
    sampler and the sigmas are; stochastic sampling and LCM differ always."""
    pipe = Prompt2ImPipe(pipe=flux_base)
    default, default_decides = _run(pipe, steps, None)
    assert default_decides[0] == "FlowMatchEulerDiscreteScheduler"  # tiny-flux's own
    differ = []
    for name in FLOW_SCHEDULERS:
        image, decides = _run(pipe, steps, name)
        assert image.shape == (H, W, 3) and 0 < image.mean() < 255, name
        same = decides == default_decides
        assert np.array_equal(image, default) == same, (name, decides, default_decides)
        differ += [] if same else [name]
    assert {"flow_euler_stochastic", "flow_lcm", "FlowMatchLCMScheduler"} <= set(differ)
    if steps == 3:
        assert {"flow_euler_karras", "flow_euler_exponential", "flow_euler_beta"} <= set(differ)
    assert "flow_euler" not in differ and "FlowMatchEulerDiscreteScheduler" not in differ


def test_the_models_shift_and_dynamic_shifting_are_kept(flux_base):
    own = dict(flux_base.scheduler.config)
    assert own["shift"] == 3.0 and own["use_dynamic_shifting"]  # tiny-flux's config (Flux.1-dev's shape)
    pipe = Prompt2ImPipe(pipe=flux_base)
    for name in FLOW_SCHEDULERS:
        pipe.setup(width=W, height=H, steps=2, scheduler=name)
        cfg = pipe.pipe.scheduler.config
        assert (cfg["shift"], cfg["use_dynamic_shifting"], cfg["base_shift"], cfg["max_shift"]) == (
            own["shift"], own["use_dynamic_shifting"], own["base_shift"], own["max_shift"]), name
    assert pipe.get_config()["scheduler"] == "flow_lcm" and pipe.get_config()["scheduler_class"] == "FlowMatchLCMScheduler"
    pipe.setup(width=W, height=H, steps=2, scheduler="Flow Euler Karras")  # any spelling, as SD names
    assert pipe.pipe.scheduler.config["use_karras_sigmas"] is True


@pytest.mark.parametrize("name", ["flow_euler_stochastic", "flow_lcm"])
def test_the_noise_they_add_comes_from_the_seed(flux_base, name):
    """Flux's pipelines call scheduler.step without a generator: the noise is drawn from the job's seed."""
    pipe = Prompt2ImPipe(pipe=flux_base)
    first, _ = _run(pipe, 3, name)
    torch.manual_seed(1234)  # the global generator plays no part
    again, _ = _run(pipe, 3, name)
    assert np.array_equal(first, again)
    other, _ = _run(pipe, 3, name, seed=6)
    assert not np.array_equal(first, other)
    pipe.setup(width=W, height=H, steps=3, scheduler=name)
    batch = pipe.gen({**PROMPT, "seed": [5, 6]})  # one generator per image of a batch
    assert len(batch) == 2 and not np.array_equal(px(batch[0]), px(batch[1]))


def test_each_runs_two_steps_in_every_flux_pipe_class(flux_base, models_dir):
    """Image-to-image, inpainting and the ControlNet pipes pass sigmas and call scale_noise too."""
    cn = models_dir / FLUX_CONTROLNET_DIR
    src, mask = noise_image(W, H), Image.new("L", (W, H), 0)
    mask.paste(255, (16, 16, 48, 48))
    pipes = [(Im2ImPipe(pipe=flux_base), {"image": src, "strength": 1.0}),
             (MaskedIm2ImPipe(pipe=flux_base), {"image": src, "mask": mask, "strength": 1.0}),
             (InpaintingPipe(pipe=flux_base), {"image": src, "mask": mask}),
             (Cond2ImPipe(pipe=flux_base, controlnets=cn), {"image": shapes_image(W, H)}),
             (CIm2ImPipe(pipe=flux_base, controlnets={"canny": cn}, ctypes=["canny"]),
              {"image": shapes_image(W, H), "strength": 1.0})]
    for pipe, inputs in pipes:
        pipe.setup(steps=2, **inputs)
        default = px(pipe.gen(PROMPT))
        for name in FLOW_SCHEDULERS:
            pipe.setup(steps=2, scheduler=name, **inputs)
            out = px(pipe.gen(PROMPT))
            assert out.shape == (H, W, 3), (type(pipe).__name__, name)
            if name in ("flow_euler_stochastic", "flow_lcm"):  # a sampler of its own
                assert not np.array_equal(out, default), (type(pipe).__name__, name)
            if name == "flow_euler":  # tiny-flux's own sampler, built by name
                assert np.array_equal(out, default), type(pipe).__name__


def test_sd_style_names_on_flux_and_flow_names_on_sd_are_refused(flux_base, models_dir):
    flux = Prompt2ImPipe(pipe=flux_base)
    flux.setup(width=W, height=H, steps=2, scheduler="flow_euler")
    for name in ("euler_a", "DDIMScheduler", "DPM++ 2M Karras"):
        with pytest.raises(InvalidValueError) as e:
            flux.setup(width=W, height=H, steps=2, scheduler=name)
        assert e.value.param == "scheduler" and "flow_euler" in e.value.allowed and "SD-style" in str(e.value)
    assert flux.params["scheduler"] == "flow_euler"  # a refused setup keeps the previous one
    with pytest.raises(UnknownSchedulerError) as e:
        flux.setup(width=W, height=H, steps=2, scheduler="flow_nope")
    assert e.value.param == "scheduler" and "flow_lcm" in str(e.value) and "euler_a" not in str(e.value)
    sd_base, _ = load_base(models_dir / "tiny-sd", dtype="float32")
    sd = Prompt2ImPipe(pipe=sd_base)
    assert SD.schedulers is None
    for name in ("flow_euler", "FlowMatchEulerDiscreteScheduler", "Flow LCM"):
        with pytest.raises(InvalidValueError) as e:
            sd.setup(width=W, height=H, steps=2, scheduler=name)
        assert e.value.param == "scheduler" and "flow-matching" in str(e.value) and "euler_a" in e.value.allowed


@pytest.mark.parametrize("folder", ["tiny-qwen-image", "tiny-z-image"])
def test_each_runs_on_the_other_flow_families_and_repeats_with_a_seed(models_dir, folder):
    base, _ = load_base(models_dir / folder, dtype="float32")
    pipe = Prompt2ImPipe(pipe=base)
    i2i = Im2ImPipe(pipe=base)
    images = {}
    for name in FLOW_SCHEDULERS:
        first, _ = _run(pipe, 2, name)
        assert first.shape == (H, W, 3) and np.array_equal(first, _run(pipe, 2, name)[0]), name
        i2i.setup(image=noise_image(W, H), strength=0.6, steps=3, scheduler=name)
        assert i2i.gen(PROMPT)[0].size == (W, H)
        images[name] = first
    assert not np.array_equal(images["flow_euler"], images["flow_euler_stochastic"])
