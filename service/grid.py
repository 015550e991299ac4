"""A job's grid: its images side by side in one image, as Fooocus' image wall shows them.

A job queued with ``grid: true`` and two images or more gets, after its last image, one more file
in its session folder: ``grid-<job id>.png`` (images in job order, row by row, in a near-square
grid of ``ceil(sqrt(n))`` columns), with a JSON sidecar ``grid-<job id>.json`` like the images'
(which images, where). Both are written atomically, sidecar first and PNG last. A resumed job
writes it when it ends, from all its images (those written before the restart too). A job of one
image gets no grid (its image is its own grid). The API serves it at ``GET /api/v1/jobs/{id}/grid``.
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from .records import JobRecord, SessionRecord
from .store import Store
from .views import now_iso
from .writer import PNG_COMPRESS_LEVEL, atomic_write

log = logging.getLogger(__name__)


def grid_shape(n: int) -> tuple[int, int]:
    """Columns and rows of a near-square grid of ``n`` images (4: 2x2, 5: 3x2, 10: 4x3)."""
    columns = max(1, math.ceil(math.sqrt(n)))
    return columns, max(1, math.ceil(n / columns))


def make_grid(images: list[Image.Image]) -> Image.Image:
    """The images row by row in one RGB image; each cell is the largest image's size (smaller ones at its
    top left, on black)."""
    columns, rows = grid_shape(len(images))
    width = max(im.width for im in images)
    height = max(im.height for im in images)
    out = Image.new("RGB", (columns * width, rows * height))
    for i, im in enumerate(images):
        out.paste(im.convert("RGB"), ((i % columns) * width, (i // columns) * height))
    return out


def grid_file(folder: str | Path, job_id: str, ext: str = "png") -> Path:
    """Where a job's grid is (its session's folder)."""
    return Path(folder) / f"grid-{job_id}.{ext}"


def write_grid(store: Store, job: JobRecord, session: SessionRecord, fsync: bool = True) -> Path | None:
    """Write the grid of ``job``'s written images (2 or more) into its session folder; returns its path.

    Raises:
        OSError: an image could not be read or the grid not written (the job fails with it).
    """
    records = sorted(store.list_images(job_id=job.id), key=lambda r: r.pos)
    if len(records) < 2:
        return None
    images = []
    for rec in records:
        with Image.open(rec.path) as im:
            im.load()
            images.append(im)
    grid = make_grid(images)
    columns, rows = grid_shape(len(images))
    meta: dict[str, Any] = {
        "job_id": job.id, "session_id": job.session_id, "user": session.user, "project": session.project,
        "model": session.model, "columns": columns, "rows": rows, "width": grid.width, "height": grid.height,
        "cell": [grid.width // columns, grid.height // rows], "created_at": now_iso(),
        "images": [{"image_id": r.id, "index": r.idx, "job_image": r.pos, "seed": r.seed,
                    "column": i % columns, "row": i // columns} for i, r in enumerate(records)]}
    text = json.dumps(meta, sort_keys=True)
    folder = Path(session.folder)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(grid_file(folder, job.id, "json"), lambda f: f.write(text.encode()), fsync)
    info = PngInfo()
    info.add_text("multigen", text)
    path = grid_file(folder, job.id)
    atomic_write(path, lambda f: grid.save(f, format="PNG", pnginfo=info, compress_level=PNG_COMPRESS_LEVEL), fsync)
    log.info("session=%s job=%s grid of %d image(s) written: %s (%dx%d)", job.session_id, job.id, len(images),
             path.name, grid.width, grid.height)
    return path


__all__ = ["grid_shape", "make_grid", "grid_file", "write_grid"]
