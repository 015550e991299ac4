"""The demo-model grader reads background, foreground colour and shape back from scene images."""
from __future__ import annotations

import io
import random

import numpy as np
from PIL import Image, ImageFilter

from multigen.pipes.demo import caption, draw_scene, grade_image, random_scene
from multigen.pipes.demo.scenes import Scene


def _score(images_and_scenes) -> dict[str, float]:
    hits = {"bg": 0, "fg": 0, "shape": 0, "all": 0}
    n = 0
    for img, s in images_and_scenes:
        m = grade_image(img).matches(s.fg, s.bg, s.shape)
        for k in hits:
            hits[k] += m[k]
        n += 1
    return {k: v / n for k, v in hits.items()}


def test_grader_on_ground_truth_is_exact():
    rng = random.Random(1)
    scenes = [random_scene(rng) for _ in range(300)]
    assert _score((draw_scene(s), s) for s in scenes) == {"bg": 1.0, "fg": 1.0, "shape": 1.0, "all": 1.0}


def _degrade(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """What a generated image looks like: soft edges, colour noise, JPEG-like artefacts."""
    img = img.filter(ImageFilter.GaussianBlur(1.5))
    a = np.asarray(img, dtype=np.float32) + rng.normal(0, 12, (img.height, img.width, 3))
    img = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=60)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def test_grader_is_robust_to_blur_noise_and_jpeg():
    rng, nrng = random.Random(2), np.random.default_rng(2)
    scenes = [random_scene(rng) for _ in range(200)]
    score = _score((_degrade(draw_scene(s), nrng), s) for s in scenes)
    assert score["all"] >= 0.97, score


def test_grader_says_so_when_there_is_no_shape():
    g = grade_image(Image.new("RGB", (128, 128), (30, 60, 220)))
    assert g.bg == "blue" and g.fg is None and g.shape is None


def test_caption_forms():
    s = Scene(fg="red", bg="blue", shape="circle", cx=0.5, cy=0.5, size=0.4)
    assert caption(s) == "a red circle on a blue background"
    orange = Scene(fg="orange", bg="purple", shape="square", cx=0.5, cy=0.5, size=0.4)
    assert caption(orange) == "an orange square on a purple background"
    assert caption(Scene(fg="red", bg="orange", shape="circle", cx=0.5, cy=0.5, size=0.4), random.Random(1), 0) \
        == "a red circle on an orange background"
    rng = random.Random(0)
    reworded = {caption(s, rng, reword=1.0) for _ in range(50)}
    assert len(reworded) > 2 and all("red" in c and "blue" in c and "circle" in c for c in reworded)
