"""Prompt2ImPipe on tiny SD and SDXL: determinism, parameters, errors, progress, cancel, config."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from multigen.pipes import Cancelled, Prompt2ImPipe, latents_to_rgb
from multigen.pipes.errors import (InvalidValueError, PipeError, SizeError, UnknownParameterError,
                                   UnknownSchedulerError)
from pipes_fixtures import STEPS, SIZE, kind_base, one_thread, pixels, sd_base, sdxl_base  # noqa: F401

pytestmark = pytest.mark.slow  # every test here builds real pipes on the tiny models

PROMPT = {"prompt": "a red house by a lake", "negative_prompt": "blurry", "seed": 7}


def make(kind_base, **setup):
    _, base = kind_base
    pipe = Prompt2ImPipe(pipe=base)
    pipe.setup(**{"width": SIZE, "height": SIZE, "steps": STEPS, **setup})
    return pipe


def test_same_seed_same_pixels_other_seed_differs(kind_base):
    pipe = make(kind_base)
    a, b = pipe.gen(PROMPT), pipe.gen(PROMPT)
    assert len(a) == 1 and a[0].size == (SIZE, SIZE) and a[0].mode == "RGB"
    assert np.array_equal(pixels(a[0]), pixels(b[0]))
    c = pipe.gen({**PROMPT, "seed": 8})
    assert not np.array_equal(pixels(a[0]), pixels(c[0]))


def test_sde_schedulers_repeat_with_the_seed(sd_base):
    """DPM++ SDE's Brownian noise has its own seed (random by default): the pipe seeds it from the job's."""
    pipe = make(("SD", sd_base), scheduler="dpmpp_sde_karras")
    torch.manual_seed(1)  # the global generator (the scheduler's default source) differs between the two calls
    a = pipe.gen(PROMPT)[0]
    torch.manual_seed(2)
    assert np.array_equal(pixels(a), pixels(pipe.gen(PROMPT)[0]))
    assert not np.array_equal(pixels(a), pixels(pipe.gen({**PROMPT, "seed": 8})[0]))
    batch = pipe.gen({**PROMPT, "seed": [7, 8]})
    assert np.array_equal(pixels(batch[0]), pixels(a))


def test_two_pipe_objects_on_one_base_agree(kind_base):
    a = make(kind_base).gen(PROMPT)[0]
    b = make(kind_base).gen(PROMPT)[0]
    assert np.array_equal(pixels(a), pixels(b))


def test_scheduler_changes_output_and_is_per_pipe_object(kind_base):
    base_pipe = make(kind_base)
    other = make(kind_base, scheduler="euler_a")
    assert other.pipe.scheduler is not base_pipe.pipe.scheduler
    assert type(other.pipe.scheduler).__name__ == "EulerAncestralDiscreteScheduler"
    assert type(base_pipe.pipe.scheduler).__name__ == "EulerDiscreteScheduler"
    a, b = base_pipe.gen(PROMPT)[0], other.gen(PROMPT)[0]
    assert not np.array_equal(pixels(a), pixels(b))
    # the first pipe is untouched by the second's scheduler
    assert np.array_equal(pixels(a), pixels(base_pipe.gen(PROMPT)[0]))


def test_prompt_weighting_changes_output(kind_base):
    pipe = make(kind_base)
    plain = pipe.gen({**PROMPT, "prompt": "a red house"})[0]
    weighted = pipe.gen({**PROMPT, "prompt": "a (red:1.6) house"})[0]
    assert not np.array_equal(pixels(plain), pixels(weighted))
    off = make(kind_base, lpw=False)
    assert off.gen({**PROMPT, "prompt": "a red house"})[0].size == (SIZE, SIZE)


def test_timestep_spacing_and_clip_skip_are_applied(kind_base):
    a = make(kind_base).gen(PROMPT)[0]
    b = make(kind_base, timestep_spacing="trailing").gen(PROMPT)[0]
    c = make(kind_base, clip_skip=1).gen(PROMPT)[0]
    assert not np.array_equal(pixels(a), pixels(b))
    assert not np.array_equal(pixels(a), pixels(c))


def test_plain_prompts_without_weighting_take_clip_skip(kind_base):
    plain = make(kind_base, lpw=False).gen(PROMPT)[0]
    skipped = make(kind_base, lpw=False, clip_skip=1).gen(PROMPT)[0]
    weighted = make(kind_base, lpw=True).gen(PROMPT)[0]
    assert not np.array_equal(pixels(plain), pixels(skipped))
    assert np.array_equal(pixels(plain), pixels(weighted)), "a prompt with no weights encodes the same either way"


def test_size_not_multiple_of_8_is_padded_and_cropped(kind_base):
    pipe = make(kind_base, width=70, height=66)
    assert pipe.gen(PROMPT)[0].size == (70, 66)


def test_seed_list_makes_a_batch(kind_base):
    pipe = make(kind_base)
    images = pipe.gen({**PROMPT, "seed": [1, 2]})
    assert len(images) == 2
    assert not np.array_equal(pixels(images[0]), pixels(images[1]))
    assert pipe.get_config()["batch_size"] == 2 and pipe.get_config()["seed"] == [1, 2]


def test_generator_input_is_used(kind_base):
    pipe = make(kind_base)
    a = pipe.gen({"prompt": "x", "generator": torch.Generator("cpu").manual_seed(3)})[0]
    b = pipe.gen({"prompt": "x", "seed": 3})[0]
    assert np.array_equal(pixels(a), pixels(b))


def test_callback_gets_every_step_and_cancel_raises(kind_base):
    pipe = make(kind_base, steps=3)
    seen = []
    pipe.gen({**PROMPT, "callback": lambda step, steps, latents: seen.append((step, steps, latents.shape[1]))})
    assert seen == [(1, 3, 4), (2, 3, 4), (3, 3, 4)]
    calls = []

    def cancel():
        calls.append(1)
        return len(calls) >= 2  # the first check passes (before the run), the next one cancels

    with pytest.raises(Cancelled):
        pipe.gen({**PROMPT, "cancel": cancel})
    assert len(calls) == 2
    # the pipe still works after a cancel, with identical output
    assert np.array_equal(pixels(pipe.gen(PROMPT)[0]), pixels(make(kind_base, steps=3).gen(PROMPT)[0]))


def test_preview_from_callback_latents(kind_base):
    kind, _ = kind_base
    pipe = make(kind_base)
    previews = []
    pipe.gen({**PROMPT, "callback": lambda s, n, lat: previews.append(latents_to_rgb(lat, kind))})
    assert len(previews) == STEPS
    assert previews[0].size == (SIZE // 8, SIZE // 8) and previews[0].mode == "RGB"


def test_config_records_what_changes_pixels(kind_base):
    kind, _ = kind_base
    pipe = make(kind_base, scheduler="euler_a", guidance_scale=5.0)
    pipe.gen(PROMPT)
    cfg = pipe.get_config()
    for key in ("model_id", "model_type", "dtype", "device_type", "torch_threads", "batch_size", "scheduler",
                "width", "height", "steps", "guidance_scale", "clip_skip", "lpw", "loras", "seed", "prompt"):
        assert key in cfg, key
    assert cfg["model_type"] == kind and cfg["dtype"] == "float32" and cfg["device_type"] == "cpu"
    assert cfg["torch_threads"] == 1 and cfg["seed"] == 7 and cfg["scheduler"] == "euler_a"
    # the config reproduces the image in a fresh pipe object
    again = Prompt2ImPipe(pipe=kind_base[1])
    again.setup(**{k: cfg[k] for k in ("width", "height", "steps", "guidance_scale", "clip_skip", "scheduler",
                                       "lpw")})
    same = again.gen({"prompt": cfg["prompt"], "negative_prompt": cfg["negative_prompt"], "seed": cfg["seed"]})
    assert np.array_equal(pixels(same[0]), pixels(pipe.gen(PROMPT)[0]))


def test_bad_inputs_raise_one_error_type_per_kind(sd_base):
    pipe = Prompt2ImPipe(pipe=sd_base)
    with pytest.raises(UnknownParameterError) as e:
        pipe.setup(widht=64)
    assert e.value.param == "widht" and "width" in e.value.allowed
    with pytest.raises(UnknownSchedulerError) as e:
        pipe.setup(scheduler="no-such-scheduler")
    assert e.value.param == "scheduler" and "euler" in str(e.value)
    with pytest.raises(SizeError) as e:
        pipe.setup(width=16)
    assert e.value.param == "width" and "64" in e.value.allowed
    with pytest.raises(SizeError):
        pipe.setup(height=100000)
    with pytest.raises(InvalidValueError) as e:
        pipe.setup(steps=0)
    assert e.value.param == "steps"
    with pytest.raises(InvalidValueError) as e:
        pipe.setup(timestep_spacing="sideways")
    assert "trailing" in str(e.value)
    assert issubclass(SizeError, PipeError) and issubclass(PipeError, ValueError)


REPRO_SCRIPT = """
import json, sys, torch
from multigen.pipes import Prompt2ImPipe
cfg = json.load(open(sys.argv[1]))
torch.set_num_threads(cfg["torch_threads"])
pipe = Prompt2ImPipe(cfg["model_id"], model_type=cfg["model_type"], dtype=cfg["dtype"], device=cfg["device_type"])
pipe.setup(**{k: cfg[k] for k in ("width", "height", "steps", "guidance_scale", "clip_skip", "scheduler",
                                  "timestep_spacing", "lpw", "vae_tiling")})
pipe.set_loras(cfg["loras"])
pipe.gen({"prompt": cfg["prompt"], "negative_prompt": cfg["negative_prompt"], "seed": cfg["seed"]})[0].save(sys.argv[2])
"""


def test_config_reproduces_the_image_bit_for_bit_in_another_process(sd_base, models_dir, tmp_path):
    import json
    import os
    import subprocess
    import sys

    from PIL import Image

    pipe = Prompt2ImPipe(pipe=sd_base)
    pipe.setup(width=SIZE, height=SIZE, steps=STEPS, scheduler="dpmpp_2m", timestep_spacing="trailing")
    pipe.set_loras([(str(models_dir / "loras" / "tiny-sd-lora.safetensors"), 0.6)])
    try:
        image = pipe.gen({"prompt": "a (blue:1.2) door", "negative_prompt": "dark", "seed": 99})[0]
        (tmp_path / "cfg.json").write_text(json.dumps(pipe.get_config()))
    finally:
        pipe.unload_loras()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, "-c", REPRO_SCRIPT, str(tmp_path / "cfg.json"), str(tmp_path / "again.png")],
                   check=True, env=env, timeout=300, capture_output=True)
    assert np.array_equal(pixels(image), pixels(Image.open(tmp_path / "again.png")))
