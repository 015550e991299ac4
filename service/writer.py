"""Writing generated images: atomic PNG files with their parameters, and a JSON sidecar.

``<folder>/<index:05d>.png`` carries two PNG text chunks, ``parameters`` (the A1111-style
text most image tools read) and ``multigen`` (the full JSON), and ``<index:05d>.json``
holds the same JSON. Each file is written to a hidden temporary name in the same folder,
flushed and renamed over the final name, so a reader or a crash never sees half a file.
The sidecar is renamed first and the PNG last: an existing PNG means both are complete.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from PIL import Image
from PIL.PngImagePlugin import PngInfo

log = logging.getLogger(__name__)

TMP_SUFFIX = ".tmp"
#: zlib level 1: noise-like images barely compress better at 9 and take ~10x longer to write
PNG_COMPRESS_LEVEL = 1


def image_name(index: int, ext: str = "png") -> str:
    """File name of the image with this session index (metafusion's ``00000.png`` style)."""
    return f"{index:05d}.{ext}"


def a1111_parameters(meta: dict[str, Any]) -> str:
    """The ``parameters`` text A1111-style tools show: prompt, negative prompt, then settings.

    Args:
        meta: the image metadata (``prompt``, ``negative_prompt``, ``seed``, ``params``, ...).
    """
    # what the job and its model set, over the values the pipe used (its own defaults)
    params = {**(meta.get("pipe_config") or {}), **(meta.get("params") or {})}
    lines = [str(meta.get("prompt") or "")]
    if meta.get("negative_prompt"):
        lines.append(f"Negative prompt: {meta['negative_prompt']}")
    settings: list[tuple[str, Any]] = [
        ("Steps", params.get("steps")), ("Sampler", params.get("scheduler")),
        ("CFG scale", params.get("guidance_scale")), ("Seed", meta.get("seed")),
        ("Size", f"{meta['width']}x{meta['height']}" if meta.get("width") else None),
        ("Model", meta.get("model")), ("Clip skip", params.get("clip_skip")),
        ("Denoising strength", params.get("strength")),
    ]
    loras = meta.get("loras") or []
    if loras:
        settings.append(("Lora", ", ".join(f"{x['name']}:{x['weight']}" for x in loras)))
    settings.append(("Threads", meta.get("threads")))
    lines.append(", ".join(f"{k}: {v}" for k, v in settings if v is not None and v != ""))
    return "\n".join(lines)


def write_temp(path: Path, write, fsync: bool) -> Path:
    """Write the temporary file beside ``path`` that :func:`atomic_write` renames over it (``write(file)``,
    fsynced when asked); returns the temporary file's path. Nothing is left behind on an error."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}{TMP_SUFFIX}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            if fsync:
                os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def atomic_write(path: Path, write, fsync: bool) -> None:
    """Write ``path`` through a temporary file beside it (``write(file)``), fsynced when asked, then renamed over
    it: readers see the old file or the whole new one, never a part."""
    tmp = write_temp(path, write, fsync)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class PendingImage:
    """An image's two files written under temporary names: :meth:`publish` renames them into place (the
    sidecar first, the PNG last), :meth:`discard` deletes them."""

    def __init__(self, renames: list[tuple[Path, Path]]) -> None:
        self.renames = renames
        self.path = renames[-1][1]

    def publish(self) -> Path:
        """Rename the files into place; again after a store call retried past a rename is a no-op."""
        for tmp, final in self.renames:
            if tmp.exists() or not final.exists():
                os.replace(tmp, final)
        return self.path

    def discard(self) -> None:
        for tmp, _ in self.renames:
            tmp.unlink(missing_ok=True)


class ImageWriter:
    """Writes one image and its sidecar atomically.

    Args:
        fsync: flush files to disk before renaming (survives power loss, not only a killed process).
        compress_level: zlib level of the PNG.
    """

    def __init__(self, fsync: bool = True, compress_level: int = PNG_COMPRESS_LEVEL) -> None:
        self.fsync = fsync
        self.compress_level = compress_level

    def write(self, folder: Path, index: int, image: Image.Image, meta: dict[str, Any]) -> Path:
        """Write ``image`` as ``folder/<index>.png`` with ``meta`` in text chunks and a sidecar.

        Returns:
            the PNG path.
        """
        return self.prepare(folder, index, image, meta).publish()

    def prepare(self, folder: Path, index: int, image: Image.Image, meta: dict[str, Any]) -> PendingImage:
        """:meth:`write` up to the renames: both files complete under temporary names (the caller publishes them,
        e.g. only while it still holds its job's lease, or discards them)."""
        folder.mkdir(parents=True, exist_ok=True)
        text = json.dumps(meta, sort_keys=True, default=str)
        png, sidecar = folder / image_name(index), folder / image_name(index, "json")
        renames = [(write_temp(sidecar, lambda f: f.write(text.encode()), self.fsync), sidecar)]
        try:
            info = PngInfo()
            info.add_text("parameters", a1111_parameters(meta))
            info.add_text("multigen", text)
            if image.mode not in ("RGB", "RGBA", "L"):
                image = image.convert("RGB")
            renames.append((write_temp(png, lambda f: image.save(f, format="PNG", pnginfo=info,
                                                                 compress_level=self.compress_level),
                                       self.fsync), png))
        except BaseException:
            PendingImage(renames).discard()
            raise
        return PendingImage(renames)

    @staticmethod
    def remove_temp_files(folder: Path) -> int:
        """Delete temporary files a killed process left in ``folder``; returns how many."""
        n = 0
        if folder.is_dir():
            for p in folder.glob(f".*{TMP_SUFFIX}"):
                p.unlink(missing_ok=True)
                n += 1
        return n

    @staticmethod
    def read_metadata(png: Path) -> dict[str, Any]:
        """The full JSON stored in a PNG written by :meth:`write`."""
        with Image.open(png) as im:
            return json.loads(im.text["multigen"])  # type: ignore[attr-defined]
