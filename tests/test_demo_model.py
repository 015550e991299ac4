"""The built-in demo model, through the real server: the prompts it is given are what the grader reads back.

Also: the weights travel with the package (safetensors, at most 25 MB), the embedded config lists the demo
model first with its native size, and a job that names no size gets that size.
"""
from __future__ import annotations

import io
import random
from pathlib import Path

import pytest
from PIL import Image
from test_e2e_api import Server

from multigen.pipes.demo import caption, grade_image, random_scene
from multigen.service.client import MultigenClient
from multigen.service.config import builtin_model_path, load_config

#: fixed prompts and seeds; the shipped weights' counts out of PROMPTS are in the issue note, and these
#: minimums sit a margin below them (a CPU with other float rounding may flip a close call)
PROMPTS = 16
MINIMUM = {"bg": 15, "fg": 15, "shape": 15, "all": 14}  # shipped (UNet 13,500, decoder 2,500): 16 of 16 each


def test_weights_travel_with_the_package():
    folder = builtin_model_path("demo")
    files = [p for p in folder.rglob("*") if p.is_file()]
    weights = [p for p in files if p.suffix == ".safetensors"]
    assert {p.parent.name for p in weights} == {"unet", "vae", "text_encoder"}
    assert not [p for p in files if p.suffix in (".bin", ".pt", ".ckpt")]
    assert sum(p.stat().st_size for p in files) <= 25 * 2**20


def test_embedded_config_lists_the_demo_model_first(config_file: Path):
    cfg = load_config(config_file)
    first = next(iter(cfg.models.base.values()))
    assert first.name == "demo" and first.path == builtin_model_path("demo")
    assert first.native_size() == (128, 128)


@pytest.fixture()
def server(config_file):
    s = Server(config_file)
    assert s.url, "".join(s.lines)
    yield s
    s.stop()


@pytest.mark.slow
def test_demo_model_draws_what_it_is_asked(server):
    mg = MultigenClient(server.url, timeout=60)
    demo = next(m for m in mg.models()["models"] if m["name"] == "demo")
    assert demo["native_size"] == [128, 128]
    sid = mg.create_session(project="demo", pipe="prompt2image", model="demo")["id"]
    rng = random.Random(2026)
    scenes = [random_scene(rng) for _ in range(PROMPTS)]
    jobs = [mg.create_job(sid, prompt=caption(s), seeds=[1000 + i]) for i, s in enumerate(scenes)]
    hits, misses = dict.fromkeys(MINIMUM, 0), []
    for scene, job in zip(scenes, jobs):
        done = mg.wait_job(job["id"], timeout=120)
        assert done["state"] == "succeeded", done.get("error")
        image = Image.open(io.BytesIO(mg.download_image(done["images"][0]["id"])))
        assert image.size == (128, 128)  # no size in the job: the model's native size
        grade = grade_image(image)
        match = grade.matches(scene.fg, scene.bg, scene.shape)
        for key in hits:
            hits[key] += match[key]
        if not match["all"]:
            misses.append((caption(scene), grade))
    print("demo model hits out of", PROMPTS, hits)
    assert all(hits[k] >= MINIMUM[k] for k in MINIMUM), (hits, misses)
