"""Read background colour, foreground colour and shape back from an image of a scene.

The background is the most common colour along the border; the foreground is the set of pixels far
from it (largest blob); its colour is their median, and its shape follows from how much of its
bounding box it fills (square ~1.0, circle ~0.79, triangle ~0.5) and where the width is greatest.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from .scenes import COLOURS

_NAMES = list(COLOURS)
_RGB = np.array([COLOURS[n] for n in _NAMES], dtype=np.float32)


@dataclass(frozen=True)
class Grade:
    bg: str | None
    fg: str | None
    shape: str | None

    def matches(self, fg: str, bg: str, shape: str) -> dict[str, bool]:
        return {"bg": self.bg == bg, "fg": self.fg == fg, "shape": self.shape == shape,
                "all": (self.bg, self.fg, self.shape) == (bg, fg, shape)}


def nearest_colour(rgb: np.ndarray) -> str:
    return _NAMES[int(np.argmin(((_RGB - rgb.astype(np.float32)) ** 2).sum(-1)))]


def _largest_component(mask: np.ndarray) -> np.ndarray:
    import cv2

    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=4)
    if n <= 1:
        return mask
    best = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    return labels == best


def _shape(mask: np.ndarray) -> str | None:
    ys, xs = np.nonzero(mask)
    if len(xs) < 12:
        return None
    h, w = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
    fill = len(xs) / float(h * w)
    if fill > 0.9:
        return "square"
    # a triangle is widest at the bottom and narrow at the top; a circle is widest in the middle
    rows = mask[ys.min():ys.max() + 1].sum(1).astype(np.float32)
    top, bottom = rows[: max(1, h // 4)].mean(), rows[-max(1, h // 4):].mean()
    if fill < 0.66 or bottom > 2.2 * max(top, 1.0):
        return "triangle"
    return "circle"


def grade_image(image: Image.Image) -> Grade:
    """Read (background, foreground, shape) from ``image``; a part it cannot read is None."""
    a = np.asarray(image.convert("RGB"), dtype=np.float32)
    border = np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]])
    bg_rgb = np.median(border, axis=0)
    bg = nearest_colour(bg_rgb)
    names = np.argmin(((a[..., None, :] - _RGB) ** 2).sum(-1), axis=-1)
    dist = np.sqrt(((a - _RGB[_NAMES.index(bg)]) ** 2).sum(-1))
    mask = (dist > 60) & (names != _NAMES.index(bg))
    if mask.sum() < 12:
        return Grade(bg=bg, fg=None, shape=None)
    mask = _largest_component(mask)
    fg = nearest_colour(np.median(a[mask], axis=0))
    if fg == bg:
        fg = None
    return Grade(bg=bg, fg=fg, shape=_shape(mask))
