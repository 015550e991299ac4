"""The demo model's world: captioned scenes of coloured shapes, and a grader that reads them back."""
from __future__ import annotations

from .scenes import COLOURS, SHAPES, Scene, caption, draw_scene, random_scene
from .grader import Grade, grade_image

__all__ = ["COLOURS", "SHAPES", "Scene", "caption", "draw_scene", "random_scene", "Grade", "grade_image"]
