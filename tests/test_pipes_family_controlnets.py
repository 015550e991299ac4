"""ControlNets of the Qwen-Image and Z-Image families through the family-generic ControlNet pipes: the
tiny ControlNets built beside their models steer the image, one of another family is refused, and what a
family's ControlNet pipeline cannot take (several ControlNets on Z-Image, a ControlNet window there) is
refused with the parameter named."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipes_fixtures import one_thread  # noqa: F401 (autouse)
from multigen.pipes import Cond2ImPipe, load_base
from multigen.pipes.errors import InvalidValueError, PipeError

pytestmark = pytest.mark.slow

#: family -> (model folder, ControlNet folder)
MODELS = {"QWEN_IMAGE": ("tiny-qwen-image", "tiny-controlnet-qwen-image"),
          "Z_IMAGE": ("tiny-z-image", "tiny-controlnet-z-image")}


@pytest.fixture(scope="module", params=sorted(MODELS))
def family_case(request, models_dir: Path):
    folder, controlnet = MODELS[request.param]
    base, found = load_base(models_dir / folder, dtype="float32")
    assert found.value == request.param
    return request.param, base, str(models_dir / controlnet)


def _condition(colour: tuple[int, int, int]) -> Image.Image:
    image = Image.new("RGB", (80, 64), (128, 128, 128))
    image.paste(colour, (10, 10, 50, 40))
    return image


def _gen(pipe: Cond2ImPipe, condition: Image.Image, seed: int = 3, **setup) -> np.ndarray:
    pipe.setup(image=condition, steps=2, **setup)
    return np.asarray(pipe.gen({"prompt": "a red square", "seed": seed})[0])


def test_the_condition_steers_the_image_and_seeds_repeat(family_case):
    name, base, controlnet = family_case
    pipe = Cond2ImPipe(pipe=base, controlnets=[controlnet])
    red = _gen(pipe, _condition((220, 20, 20)))
    assert red.shape == (64, 80, 3)  # the condition's size (80 is a multiple of 16: no padding)
    assert np.array_equal(red, _gen(pipe, _condition((220, 20, 20))))
    assert not np.array_equal(red, _gen(pipe, _condition((20, 20, 220))))
    assert pipe.get_config()["model_type"] == name


def test_another_familys_controlnet_is_refused(family_case, models_dir: Path):
    _, base, _ = family_case
    with pytest.raises(PipeError) as e:
        Cond2ImPipe(pipe=base, controlnets=[str(models_dir / "tiny-controlnet-sd")])
    assert e.value.param == "controlnets"


def test_what_z_images_controlnet_pipeline_cannot_take_is_refused(models_dir: Path):
    folder, controlnet = MODELS["Z_IMAGE"]
    base, _ = load_base(models_dir / folder, dtype="float32")
    net = str(models_dir / controlnet)
    with pytest.raises(InvalidValueError) as e:  # ZImageControlNetPipeline runs one (union) ControlNet
        Cond2ImPipe(pipe=base, controlnets=[net, net]).setup(image=[_condition((1, 2, 3))] * 2, steps=2)
    assert e.value.param == "controlnets"
    pipe = Cond2ImPipe(pipe=base, controlnets=[net])
    with pytest.raises(InvalidValueError) as e:  # ...on every step: it has no ControlNet window
        pipe.setup(image=_condition((1, 2, 3)), steps=2, control_guidance_end=0.5)
    assert e.value.param == "control_guidance_end"
