"""``GenSession``: generate N images into a folder, each with a JSON sidecar (metafusion's)."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Callable

from .cfgen import Cfgen
from .errors import InvalidValueError

logger = logging.getLogger(__name__)


class GenSession:
    """Generate images from a pipe and a ``Cfgen`` into ``session_dir``.

    Files are ``{name_prefix}{index:05d}.png`` with ``{name_prefix}{index:05d}.json`` next to
    it holding the pipe's ``get_config()`` plus the prompt and seed of that image. Numbering
    continues after the files already in the folder. Each file is written to a temporary
    name and renamed, so a reader never sees half an image.

    Args:
        session_dir: folder for the images (created).
        pipe: a set-up pipe object (``setup`` already called).
        config: the prompt and seed iterator.
        name_prefix: prefix of the file names.
    """

    def __init__(self, session_dir: str | os.PathLike[str], pipe: Any, config: Cfgen, name_prefix: str = "") -> None:
        self.session_dir = Path(session_dir)
        self.pipe = pipe
        self.confg = config
        self.name_prefix = name_prefix
        self.last_conf: dict[str, Any] | None = None
        self.last_img_name: str | None = None
        self.last_index = -1

    def _next_index(self) -> int:
        taken = [int(p.stem[len(self.name_prefix):]) for p in self.session_dir.glob(f"{self.name_prefix}*.png")
                 if p.stem[len(self.name_prefix):].isdigit()]
        return max(taken, default=-1) + 1

    def get_last_conf(self) -> dict[str, Any]:
        """Config of the last image: the pipe's config plus this image's inputs."""
        return dict(self.last_conf or {})

    def get_last_file_prefix(self) -> str:
        """Path of the last image without its extension."""
        return str(self.session_dir / f"{self.name_prefix}{self.last_index:05d}")

    def save_last_conf(self) -> str:
        """Write the JSON sidecar of the last image; returns its path."""
        path = Path(self.get_last_file_prefix() + ".json")
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.get_last_conf(), indent=2, default=str))
        os.replace(tmp, path)
        return str(path)

    def gen_sess(self, add_count: int = 0, save_img: bool = True, drop_cfg: bool = False,
                 callback: Callable[..., Any] | None = None, inputs: dict[str, Any] | None = None) -> list[Any]:
        """Generate ``add_count`` more images (all the ``Cfgen`` yields when 0).

        Args:
            add_count: number of images to add.
            save_img: write PNG files (else the images are only returned).
            drop_cfg: do not write the JSON sidecars.
            callback: called with the image path (or the image, when not saved) after each one.
            inputs: extra ``gen`` inputs (``callback``/``cancel`` for progress and cancellation).

        Returns:
            The image paths (or images when ``save_img`` is False).
        """
        self.session_dir.mkdir(parents=True, exist_ok=True)
        if add_count:
            self.confg.max_count = self.confg.count + add_count
        elif self.confg.max_count is None and not self.confg.seeds:
            raise InvalidValueError("add_count is 0 and the Cfgen has neither seeds nor max_count: it would never "
                                    "stop", "add_count", "a positive count, or a Cfgen with seeds or max_count")
        self.confg.start_count = self.confg.count
        results: list[Any] = []
        index = self._next_index()
        for item_inputs, seed in self.confg:
            run_inputs = dict(item_inputs)
            run_inputs.update(inputs or {})
            images = self.pipe.gen(run_inputs)
            for image in images:
                self.last_index = index
                index += 1
                conf = self.pipe.get_config()
                conf.update({k: v for k, v in item_inputs.items() if isinstance(v, (str, int, float, list))})
                conf["seed"] = seed
                self.last_conf = conf
                if save_img:
                    path = Path(self.get_last_file_prefix() + ".png")
                    tmp = path.with_suffix(".tmp.png")
                    image.save(tmp)
                    os.replace(tmp, path)
                    self.last_img_name = str(path)
                    if not drop_cfg:
                        self.save_last_conf()
                    results.append(str(path))
                    if callback is not None:
                        callback(str(path))
                else:
                    results.append(image)
                    if callback is not None:
                        callback(image)
        return results
