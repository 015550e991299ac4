"""The embedded default models: built deterministically, loadable by diffusers, offline."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from multigen.pipes import model_builder as mb


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_models_init_is_deterministic(tmp_path: Path, models_dir: Path):
    mb.build_default_models(tmp_path / "again")
    again = _digest(tmp_path / "again")
    first = {k: v for k, v in _digest(models_dir).items() if k != ".complete"}
    assert again == first
    assert len(again) > 20


def _run(pipe, **kw):
    out = pipe(prompt="a red circle on a blue background", num_inference_steps=2, width=64, height=64,
               generator=torch.Generator("cpu").manual_seed(7), output_type="np", **kw).images
    return out[0]


@pytest.mark.slow
def test_sd_pipeline_runs_and_downsamples_by_8(models_dir: Path):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(models_dir / mb.SD_DIR)
    assert pipe.vae_scale_factor == 8
    a, b = _run(pipe), _run(pipe)
    assert a.shape == (64, 64, 3) and np.isfinite(a).all()
    assert np.array_equal(a, b)


@pytest.mark.slow
def test_sdxl_pipeline_runs(models_dir: Path):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(models_dir / mb.SDXL_DIR)
    assert pipe.vae_scale_factor == 8
    assert pipe.text_encoder_2.config.projection_dim == pipe.text_encoder_2.config.hidden_size
    img = _run(pipe)
    assert img.shape == (64, 64, 3) and np.isfinite(img).all()


@pytest.mark.slow
def test_controlnet_runs_and_changes_output(models_dir: Path):
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline, StableDiffusionPipeline
    from PIL import Image

    base = StableDiffusionPipeline.from_pretrained(models_dir / mb.SD_DIR)
    cn = ControlNetModel.from_pretrained(models_dir / mb.CONTROLNET_DIR)
    pipe = StableDiffusionControlNetPipeline.from_pipe(base, controlnet=cn)
    cond = Image.fromarray((np.indices((64, 64)).sum(0) % 16 < 8).astype(np.uint8) * 255).convert("RGB")
    with_cn = _run(pipe, image=cond)
    assert not np.array_equal(with_cn, _run(base)), "the ControlNet's output layers must not be zero"


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_lora_files_load_and_change_output(models_dir: Path, family: str):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    cls, folder, lora = ((StableDiffusionPipeline, mb.SD_DIR, mb.SD_LORA) if family == "sd"
                         else (StableDiffusionXLPipeline, mb.SDXL_DIR, mb.SDXL_LORA))
    pipe = cls.from_pretrained(models_dir / folder)
    base = _run(pipe)
    path = models_dir / lora
    pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name="tiny")
    assert not np.array_equal(base, _run(pipe))
    pipe.unload_lora_weights()
    assert np.array_equal(base, _run(pipe))


@pytest.mark.slow
def test_single_file_checkpoint_loads_offline(models_dir: Path, monkeypatch):
    from diffusers import StableDiffusionPipeline

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    single = StableDiffusionPipeline.from_single_file(str(models_dir / mb.SD_SINGLE_FILE),
                                                      config=str(models_dir / mb.SD_SINGLE_CONFIG))
    folder = StableDiffusionPipeline.from_pretrained(models_dir / mb.SD_DIR)
    for comp in ("unet", "vae", "text_encoder"):
        got, want = getattr(single, comp).state_dict(), getattr(folder, comp).state_dict()
        assert not [n for n, p in getattr(single, comp).named_parameters() if p.is_meta]
        assert set(want) <= set(got)
        assert all(torch.equal(got[k], want[k]) for k in want), comp
    assert np.array_equal(_run(single), _run(folder))


def test_full_size_shapes_match_sd15_and_sdxl():
    """--full-size builds the real SD 1.5 / SDXL architectures (counted on the meta device: no memory)."""
    with torch.device("meta"):
        sd_unet = mb._sd_unet(mb.FULL_SD, mb.FULL_SD.te_hidden)
        xl_unet = mb._sdxl_unet(mb.FULL_SDXL, mb.FULL_SDXL.te_hidden + mb.FULL_SDXL.te2_hidden,
                                mb.FULL_SDXL.te2_hidden)
        vae = mb._vae(mb.FULL_SD)
        te2 = mb._text_encoder(1280, 32, 20, 5120, 49408, True, 1280)

    def count(m):
        return sum(p.numel() for p in m.parameters())

    # the published parameter counts of SD 1.5's UNet, SDXL base's UNet, their VAE and OpenCLIP bigG
    assert count(sd_unet) == 859_520_964
    assert count(xl_unet) == 2_567_463_684
    assert count(vae) == 83_653_863
    assert count(te2) == 694_659_840
