"""Fixtures for the pipes tests: shared base pipelines, an SDXL ControlNet, test images.

Import the fixtures you use into a test module (``from pipes_fixtures import ...``); they
build on conftest's ``models_dir``. Torch runs on one thread in these tests so pixel
comparisons are deterministic.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from multigen.pipes import load_base

STEPS = 2
SIZE = 64


def tiny_model(models_dir: Path, kind: str) -> Path:
    return models_dir / {"SD": "tiny-sd", "SDXL": "tiny-sdxl"}[kind]


def lora_file(models_dir: Path, kind: str) -> Path:
    return models_dir / "loras" / {"SD": "tiny-sd-lora.safetensors", "SDXL": "tiny-sdxl-lora.safetensors"}[kind]


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image).astype(np.int16)


@pytest.fixture(autouse=True)
def one_thread():
    """Pixel comparisons need one thread count within a test."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def sd_base(models_dir: Path):
    pipe, _ = load_base(tiny_model(models_dir, "SD"), dtype="float32")
    return pipe


@pytest.fixture(scope="module")
def sdxl_base(models_dir: Path):
    pipe, _ = load_base(tiny_model(models_dir, "SDXL"), dtype="float32")
    return pipe


@pytest.fixture(params=["SD", "SDXL"])
def kind_base(request, sd_base, sdxl_base):
    """``(kind, base pipeline)`` for SD and for SDXL."""
    return request.param, (sd_base if request.param == "SD" else sdxl_base)


@pytest.fixture(scope="session")
def sdxl_controlnet_dir(models_dir: Path, tmp_path_factory) -> Path:
    """A tiny SDXL ControlNet (random output layers) saved to a temp folder."""
    from multigen.pipes.model_builder import build_controlnet

    pipe, _ = load_base(tiny_model(models_dir, "SDXL"), dtype="float32")
    out = tmp_path_factory.mktemp("cn") / "tiny-controlnet-sdxl"
    build_controlnet(pipe.unet).save_pretrained(out)
    return out


@pytest.fixture()
def controlnet_dir(kind_base, models_dir: Path, sdxl_controlnet_dir: Path) -> Path:
    kind, _ = kind_base
    return models_dir / "tiny-controlnet-sd" if kind == "SD" else sdxl_controlnet_dir


def shapes_image(width: int = SIZE, height: int = SIZE) -> Image.Image:
    """An RGB image with flat shapes (clear edges) on a grey background."""
    img = Image.new("RGB", (width, height), (128, 128, 128))
    d = ImageDraw.Draw(img)
    d.rectangle((8, 8, width // 2, height // 2), fill=(220, 40, 40))
    d.ellipse((width // 2, height // 2, width - 6, height - 6), fill=(30, 30, 200))
    return img


def noise_image(width: int = SIZE, height: int = SIZE, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
