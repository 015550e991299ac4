#!/usr/bin/env python
"""Draw docs/features.md's images: styles, vary, upscale and outpaint on the demo model, through the real service.

Every image is made by a ``ServiceThread`` on the embedded config (its own temporary data folder),
as a client's job would be: the styles are applied by the service's runner, vary and upscale are the
image-to-image pipe's ``uov``, outpaint the masked pipe's ``outpaint``. Each image is read back by the
demo model's grader (and, for vary, how far it moved from its source: the mean absolute difference of
its pixels, 0-255) and the verdicts are printed as the Markdown tables docs/features.md shows, so what
is shown is what the model does.

    .venv/bin/python scripts/feature_images.py --out docs/images

The demo model knows coloured shapes only: a style's extra words are outside its world, so what
a style shows on it is how much those words pull the picture away from the prompt.
"""
from __future__ import annotations

import argparse
import logging
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from multigen.pipes.demo import grade_image

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["a red circle on a blue background", "a yellow triangle on a black background"]
#: none (the prompt as written), then styles of the built-in library
STYLES: list[str | None] = [None, "Minimalist", "Flat Design", "Pixel Art", "Neon Noir"]
#: the vary modes shown next to their source image
VARY = ["vary_subtle", "vary_strong"]
VARY_SEEDS = [11, 12, 13]
SEED = 7


def make_config(tmp: Path, model_dir: Path) -> Path:
    shutil.copy(ROOT / "config" / "models.yaml", tmp / "models.yaml")
    text = (ROOT / "config" / "config.yaml").read_text().replace("model_dir: ../models", f"model_dir: {model_dir}")
    # the data, images and logs of this run stay in its temporary folder (../x is beside the config)
    (tmp / "config.yaml").write_text(text)
    return tmp / "config.yaml"


def run_job(svc: Any, session_id: str, **job: Any) -> list[Path]:
    """Queue a job, wait for it, and return its images' files in order."""
    out = svc.queue_gen(session_id, **job)
    svc.wait_idle()
    state = svc.get_job(out["job_id"])
    if state["state"] != "succeeded":
        raise SystemExit(f"job {out['job_id']} {state['state']}: {state.get('error')}")
    images = [i for i in svc.list_images(session_id) if i["job_id"] == out["job_id"]]
    return [svc.image_file(i["id"]) for i in sorted(images, key=lambda i: i["index"])]


def grid(rows: list[list[Image.Image]], gap: int = 4) -> Image.Image:
    """Rows of equal-sized images, with a white gap between them."""
    w, h = rows[0][0].size
    cols = max(len(r) for r in rows)
    sheet = Image.new("RGB", (cols * w + (cols - 1) * gap, len(rows) * h + (len(rows) - 1) * gap), "white")
    for y, row in enumerate(rows):
        for x, image in enumerate(row):
            sheet.paste(image.convert("RGB"), (x * (w + gap), y * (h + gap)))
    return sheet


def moved(image: Image.Image, source: Image.Image) -> float:
    """Mean absolute difference of two images' pixels (0-255)."""
    a = np.asarray(image.convert("RGB"), dtype=np.float32)
    b = np.asarray(source.convert("RGB"), dtype=np.float32)
    return float(np.abs(a - b).mean())


def read(image: Image.Image) -> str:
    g = grade_image(image)
    return f"{g.fg or '?'} {g.shape or '?'} on {g.bg or '?'}"


def styles_section(svc: Any, out: Path) -> None:
    sid = svc.open_session("docs", "features", "prompt2image", "demo")["session_id"]
    rows: list[list[Image.Image]] = []
    print("| prompt | " + " | ".join(s or "no style" for s in STYLES) + " |")
    print("|---" * (len(STYLES) + 1) + "|")
    for prompt in PROMPTS:
        row = []
        for style in STYLES:
            job = {"prompt": prompt, "seeds": [SEED]}
            if style:
                job["styles"] = [style]
            (path,) = run_job(svc, sid, **job)
            row.append(Image.open(path).convert("RGB"))
        rows.append(row)
        print(f"| {prompt} | " + " | ".join(read(im) for im in row) + " |")
    grid(rows).save(out / "features-styles.png", optimize=True)


def vary_section(svc: Any, out: Path) -> None:
    sid = svc.open_session("docs", "features", "prompt2image", "demo")["session_id"]
    vid = svc.open_session("docs", "features", "image2image", "demo")["session_id"]
    rows: list[list[Image.Image]] = []
    print("\n| source | " + " | ".join(f"{m} (seed {s})" for m in VARY for s in VARY_SEEDS) + " |")
    print("|---" * (len(VARY) * len(VARY_SEEDS) + 1) + "|")
    for prompt in PROMPTS:
        (source,) = run_job(svc, sid, prompt=prompt, seeds=[SEED])
        row = [Image.open(source).convert("RGB")]
        for mode in VARY:
            for path in run_job(svc, vid, prompt=prompt, seeds=VARY_SEEDS, images=[str(source)], uov=mode):
                row.append(Image.open(path).convert("RGB"))
        rows.append(row)
        print(f"| {read(row[0])} | " + " | ".join(f"{read(im)}, moved {moved(im, row[0]):.0f}" for im in row[1:])
              + " |")
    grid(rows).save(out / "features-vary.png", optimize=True)


def image_tools_section(svc: Any, out: Path) -> None:
    """One source image, upscaled 2x (Lanczos alone, then redrawn at 0.382) and outpainted to the right."""
    prompt = PROMPTS[0]
    sid = svc.open_session("docs", "features", "prompt2image", "demo")["session_id"]
    vid = svc.open_session("docs", "features", "image2image", "demo")["session_id"]
    mid = svc.open_session("docs", "features", "masked_image2image", "demo")["session_id"]
    (source,) = run_job(svc, sid, prompt=prompt, seeds=[SEED])
    fast = run_job(svc, vid, prompt=prompt, seeds=[SEED], images=[str(source)], uov="upscale_fast",
                   upscaler="lanczos")[0]
    redrawn = run_job(svc, vid, prompt=prompt, seeds=[SEED], images=[str(source)], uov="upscale",
                      upscaler="lanczos")[0]
    wide = run_job(svc, mid, prompt=prompt, seeds=[SEED], images=[str(source)], outpaint_right=64)[0]
    images = [Image.open(p).convert("RGB") for p in (source, fast, redrawn, wide)]
    gap = 4
    sheet = Image.new("RGB", (sum(i.width for i in images) + gap * (len(images) - 1), max(i.height for i in images)),
                      "white")
    x = 0
    for image in images:
        sheet.paste(image, (x, 0))
        x += image.width + gap
    sheet.save(out / "features-image-tools.png", optimize=True)
    src = images[0]
    kept = np.array_equal(np.asarray(images[3])[:, :src.width - 16], np.asarray(src)[:, :src.width - 16])
    print("\n| source | upscale_fast (Lanczos) | upscale (redrawn at 0.382) | outpaint_right 64 |\n|---|---|---|---|")
    print(f"| {src.width}x{src.height}, {read(src)} | " + " | ".join(f"{i.width}x{i.height}, {read(i)}"
                                                                   for i in images[1:3])
          + f" | {images[3].width}x{images[3].height}, the source's pixels kept exactly: {kept} |")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="docs/images", help="folder for features-*.png")
    p.add_argument("--models-dir", default=str(ROOT / "models"))
    args = p.parse_args(argv)
    from multigen.service import ServiceThread

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="feature_images_"))
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("multigen").setLevel(logging.WARNING)
    (tmp / "config").mkdir()
    svc = ServiceThread(make_config(tmp / "config", Path(args.models_dir))).start()
    try:
        styles_section(svc, out)
        vary_section(svc, out)
        image_tools_section(svc, out)
    finally:
        svc.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
