"""Scenes for the demo model: one shape of a named colour on a background of another.

The training script draws these with captions; the grader reads them back from images.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass

from PIL import Image, ImageDraw

#: named colours, far enough apart that a slightly-off colour is still read as its name
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 30),
    "orange": (245, 140, 20),
    "purple": (140, 40, 180),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
SHAPES = ("circle", "square", "triangle")

_REWORDINGS = (
    "a {fg} {shape} on a {bg} background",
    "{fg} {shape} on {bg}",
    "a {fg} {shape}, {bg} background",
    "a {shape} in {fg} on a {bg} background",
    "{bg} background with a {fg} {shape}",
)


@dataclass(frozen=True)
class Scene:
    fg: str
    bg: str
    shape: str
    cx: float  # centre, as a fraction of the image size
    cy: float
    size: float  # side / diameter, as a fraction of the image size


def caption(scene: Scene, rng: random.Random | None = None, reword: float = 0.0) -> str:
    """The caption of ``scene``: the canonical form, or (with probability ``reword``) another wording."""
    template = _REWORDINGS[0]
    if rng is not None and rng.random() < reword:
        template = rng.choice(_REWORDINGS[1:])
    text = template.format(fg=scene.fg, bg=scene.bg, shape=scene.shape)
    return re.sub(r"\ba (?=[aeiou])", "an ", text)  # "an orange circle"


def random_scene(rng: random.Random) -> Scene:
    fg, bg = rng.sample(sorted(COLOURS), 2)
    size = rng.uniform(0.35, 0.6)
    margin = size / 2 + 0.04
    return Scene(fg=fg, bg=bg, shape=rng.choice(SHAPES), cx=rng.uniform(margin, 1 - margin),
                 cy=rng.uniform(margin, 1 - margin), size=size)


def draw_scene(scene: Scene, size: int = 128) -> Image.Image:
    """Render ``scene`` as an RGB image of ``size`` x ``size`` pixels."""
    img = Image.new("RGB", (size, size), COLOURS[scene.bg])
    d = ImageDraw.Draw(img)
    cx, cy, half = scene.cx * size, scene.cy * size, scene.size * size / 2
    box = (cx - half, cy - half, cx + half, cy + half)
    colour = COLOURS[scene.fg]
    if scene.shape == "circle":
        d.ellipse(box, fill=colour)
    elif scene.shape == "square":
        d.rectangle(box, fill=colour)
    else:
        d.polygon([(cx, cy - half), (cx + half, cy + half), (cx - half, cy + half)], fill=colour)
    return img
