"""The tiny Flux model as a single-file checkpoint: its transformer alone in Black Forest Labs' layout
(``double_blocks.N...``, ``single_blocks.N...``, ``img_in``, ...), the form Flux.1 fine-tunes are
shared in, next to a config folder that holds everything else.

``single/tiny-flux.safetensors`` is the tiny-flux transformer written with
``flux_layout.to_bfl``; ``single/tiny-flux-config`` is the tiny-flux diffusers folder without
the transformer's weights (its ``transformer/config.json`` stays: loading reads the sizes there).
Loading the two with ``load_base(file, config_dir=folder)`` gives exactly tiny-flux's weights.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..flux_layout import to_bfl
from .common import DEFAULT_SEED, TinyModel, replace_path
from .flux import build_flux

FLUX_SINGLE_FILE = "single/tiny-flux.safetensors"
FLUX_SINGLE_CONFIG = "single/tiny-flux-config"


def write_folder_without_transformer(pipe: Any, folder: Path) -> None:
    """``pipe`` saved to ``folder`` without its transformer's weights (configs, tokenizers, scheduler,
    text encoders and VAE stay), written beside it and renamed so that a cut build leaves no half folder."""
    partial = folder.with_name(folder.name + ".partial")
    replace_path(partial)
    pipe.save_pretrained(partial, safe_serialization=True)
    for weights in (partial / "transformer").iterdir():
        if weights.name != "config.json":
            weights.unlink()
    replace_path(folder)
    partial.rename(folder)


def build_flux_single(out_dir: str | Path, seed: int = DEFAULT_SEED) -> Path:
    """Write ``single/tiny-flux.safetensors`` and ``single/tiny-flux-config`` under ``out_dir`` (replacing
    them) and return the checkpoint's path."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    # built anew from the seed (not read from tiny-flux: a loaded pipeline records its own path in
    # model_index.json, and the files must not depend on where they were built)
    pipe = build_flux(seed)
    path = out / FLUX_SINGLE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(to_bfl(pipe.transformer.state_dict()), str(path))
    # last: its model_index.json marks the model built (build_missing_models)
    write_folder_without_transformer(pipe, out / FLUX_SINGLE_CONFIG)
    return path


MODEL = TinyModel("flux_single", FLUX_SINGLE_CONFIG, build_flux_single)
