#!/usr/bin/env python
"""Draw the README's demo-model images: fixed prompts and seeds through multigen's Prompt2ImPipe.

Each image is graded (background, foreground colour, shape) and the verdicts are printed as the
Markdown table the README shows, so what is shown is what the model does, not a pick.

    .venv/bin/python scripts/demo_images.py --out docs/images
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from multigen.pipes import Prompt2ImPipe
from multigen.pipes.demo import grade_image
from multigen.service.config import builtin_model_path, load_config

#: (prompt, what the grader should read back or None when the prompt is outside the model's world)
PROMPTS = [
    ("a red circle on a blue background", ("red", "blue", "circle")),
    ("a yellow triangle on a black background", ("yellow", "black", "triangle")),
    ("a white square on a green background", ("white", "green", "square")),
    ("an orange circle on a purple background", ("orange", "purple", "circle")),
    ("green background with a blue triangle", ("blue", "green", "triangle")),
    ("black square on yellow", ("black", "yellow", "square")),
    ("a photo of a cat", None),
    ("two red circles on a white background", None),
]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="docs/images", help="folder for demo-N.png")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    defaults = load_config(check_models_exist=False).models.base["demo"].defaults
    pipe = Prompt2ImPipe(str(builtin_model_path("demo")), device="cpu")
    pipe.setup(**defaults)
    print("| image | prompt | the grader reads |\n|---|---|---|")
    for i, (prompt, want) in enumerate(PROMPTS):
        image = pipe.gen({"prompt": prompt, "seed": args.seed + i})[0]
        name = f"demo-{i + 1}.png"
        image.save(out / name, optimize=True)
        g = grade_image(image)
        read = f"{g.fg or '?'} {g.shape or '?'} on {g.bg or '?'}"
        verdict = ("" if want is None else " ✓" if (g.fg, g.bg, g.shape) == want else " ✗")
        print(f"| ![{prompt}](docs/images/{name}) | {prompt} | {read}{verdict} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
