"""GenSession (images + JSON sidecars in a folder) and latent previews.

What a preview costs against a step is measured by scripts/bench_service.py (item 4), not here:
a timing comparison fails on a busy machine. tests/test_service_fakes.py counts the previews the
service makes (at most one per step and per PREVIEW_INTERVAL_SECONDS)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from multigen.pipes import Cfgen, GenSession, ModelType, Prompt2ImPipe, latents_to_rgb
from multigen.pipes.errors import InvalidValueError
from multigen.pipes.preview import SD_FACTORS
from pipes_fixtures import STEPS, SIZE, kind_base, one_thread, pixels, sd_base, sdxl_base  # noqa: F401


@pytest.mark.slow
def test_gensession_writes_images_and_sidecars(sd_base, tmp_path):
    pipe = Prompt2ImPipe(pipe=sd_base)
    pipe.setup(width=SIZE, height=SIZE, steps=STEPS)
    seen = []
    session = GenSession(tmp_path / "proj", pipe, Cfgen(["a house", ["red", "blue"]], "ugly", seeds=[4, 5, 6]))
    paths = session.gen_sess(add_count=3, callback=seen.append)
    assert [p.rsplit("/", 1)[-1] for p in paths] == ["00000.png", "00001.png", "00002.png"] and seen == paths
    for index, seed in enumerate((4, 5, 6)):
        conf = json.loads((tmp_path / "proj" / f"{index:05d}.json").read_text())
        assert conf["seed"] == seed and conf["prompt"].startswith("a house, ") and conf["negative_prompt"] == "ugly"
        assert conf["model_type"] == "SD" and conf["steps"] == STEPS
        again = pipe.gen({"prompt": conf["prompt"], "negative_prompt": conf["negative_prompt"], "seed": seed})[0]
        assert np.array_equal(pixels(Image.open(paths[index]).convert("RGB")), pixels(again))
    # a second run continues the numbering
    more = GenSession(tmp_path / "proj", pipe, Cfgen("a house", seeds=[9])).gen_sess(add_count=1)
    assert more[0].endswith("00003.png")
    assert not list((tmp_path / "proj").glob("*.tmp*"))


def test_preview_projection_values():
    lat = torch.zeros(1, 4, 2, 3)
    lat[0, 0] = 1.0  # channel 0 only: RGB = (factor row 0 + 1) * 127.5
    img = latents_to_rgb(lat, ModelType.SD)
    assert img.size == (3, 2)
    expected = [int((f + 1.0) * 127.5) for f in SD_FACTORS[0]]
    assert np.abs(np.asarray(img)[0, 0].astype(int) - expected).max() <= 1
    xl = np.asarray(latents_to_rgb(torch.zeros(4, 2, 2), "SDXL"))[0, 0]
    assert tuple(xl) != (127, 127, 127)  # SDXL has a bias
    with pytest.raises(InvalidValueError):
        latents_to_rgb(torch.zeros(1, 16, 2, 2), "SD")


@pytest.mark.slow
def test_gensession_refuses_an_endless_run(sd_base, tmp_path):
    pipe = Prompt2ImPipe(pipe=sd_base)
    with pytest.raises(InvalidValueError) as e:
        GenSession(tmp_path / "proj", pipe, Cfgen("a house")).gen_sess(add_count=0)
    assert e.value.param == "add_count"
