"""Loading: folders and single files, model type detection, precision, weight sharing."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from multigen.pipes import ModelType, Prompt2ImPipe, load_base
from multigen.pipes.base import BasePipe
from multigen.pipes.errors import InvalidValueError, ModelTypeMismatchError, PipeError
from multigen.pipes.im2im import Im2ImPipe
from multigen.pipes.loading import cpu_has_native_bf16, default_dtype, parse_dtype
from pipes_fixtures import SIZE, one_thread, pixels, sd_base  # noqa: F401


@pytest.mark.slow
def test_folders_are_detected(models_dir):
    _, sd_type = load_base(models_dir / "tiny-sd")
    pipe, xl_type = load_base(models_dir / "tiny-sdxl", model_type="SDXL")
    assert (sd_type, xl_type) == (ModelType.SD, ModelType.SDXL)
    assert type(pipe).__name__ == "StableDiffusionXLPipeline"


@pytest.mark.slow
def test_declared_type_that_disagrees_is_an_error(models_dir):
    with pytest.raises(ModelTypeMismatchError) as e:
        load_base(models_dir / "tiny-sd", model_type=ModelType.SDXL)
    assert e.value.param == "model_type" and "SD" in str(e.value) and "SDXL" in str(e.value)
    with pytest.raises(ModelTypeMismatchError):
        Prompt2ImPipe(models_dir / "tiny-sdxl", model_type="SD")
    sd, _ = load_base(models_dir / "tiny-sd")
    with pytest.raises(ModelTypeMismatchError):
        Prompt2ImPipe(pipe=sd, model_type="SDXL")
    with pytest.raises(InvalidValueError):
        load_base(models_dir / "tiny-sd", model_type="FLUX2")


@pytest.mark.slow
def test_single_file_checkpoint_matches_folder(models_dir, sd_base):
    single, kind = load_base(models_dir / "single" / "tiny-sd.safetensors",
                             config_dir=models_dir / "single" / "tiny-sd-config", dtype="float32")
    assert kind == ModelType.SD
    a, b = Prompt2ImPipe(pipe=single), Prompt2ImPipe(pipe=sd_base)
    for p in (a, b):
        p.setup(width=SIZE, height=SIZE, steps=2)
    img_a, img_b = a.gen({"prompt": "a tree", "seed": 1})[0], b.gen({"prompt": "a tree", "seed": 1})[0]
    assert np.abs(pixels(img_a) - pixels(img_b)).max() <= 1
    with pytest.raises(PipeError) as e:
        load_base(models_dir / "single" / "tiny-sd.safetensors")
    assert e.value.param == "config_dir"


@pytest.mark.slow
def test_missing_path_is_an_error(tmp_path):
    with pytest.raises(PipeError) as e:
        load_base(tmp_path / "nothing")
    assert e.value.param == "model_id"


def test_dtype_choice(monkeypatch):
    monkeypatch.delenv("MULTIGEN_DTYPE", raising=False)
    native = cpu_has_native_bf16()
    assert default_dtype("cpu") == (torch.bfloat16 if native else torch.float32)
    assert default_dtype("cuda") == torch.float16
    assert default_dtype("cpu", "bf16") == torch.bfloat16
    monkeypatch.setenv("MULTIGEN_DTYPE", "float32")
    assert default_dtype("cuda") == torch.float32
    with pytest.raises(InvalidValueError) as e:
        parse_dtype("float8")
    assert "bfloat16" in e.value.allowed


@pytest.mark.slow
def test_bf16_pipeline_runs_and_records_dtype(models_dir):
    p = Prompt2ImPipe(models_dir / "tiny-sd", dtype="bf16")
    p.setup(width=SIZE, height=SIZE, steps=2)
    image = p.gen({"prompt": "x", "seed": 1})[0]
    assert image.size == (SIZE, SIZE) and p.get_config()["dtype"] == "bfloat16"
    assert p.pipe.unet.dtype == torch.bfloat16


@pytest.mark.slow
def test_pipe_objects_share_weights_and_keep_dtype(models_dir):
    base, _ = load_base(models_dir / "tiny-sd", dtype="bf16")
    p2i, i2i = Prompt2ImPipe(pipe=base), Im2ImPipe(pipe=base)
    assert p2i.pipe.unet is base.unet and i2i.pipe.unet is base.unet and i2i.pipe.vae is base.vae
    assert base.unet.dtype == torch.bfloat16 and base.text_encoder.dtype == torch.bfloat16
    assert p2i.pipe.scheduler is not base.scheduler and i2i.pipe.scheduler is not p2i.pipe.scheduler


def test_params_lists_are_what_setup_accepts():
    from multigen.pipes import CIm2ImPipe, Cond2ImPipe, InpaintingPipe, MaskedIm2ImPipe

    for cls in (Prompt2ImPipe, Im2ImPipe, MaskedIm2ImPipe, InpaintingPipe, Cond2ImPipe, CIm2ImPipe):
        assert set(BasePipe.PARAMS) <= set(cls.PARAMS)
    assert {"image", "strength", "scale"} <= set(Im2ImPipe.PARAMS)
    assert {"image_painted", "mask", "blur", "blur_compose"} <= set(MaskedIm2ImPipe.PARAMS)
    assert {"cscales", "guess_mode", "control_guidance_start", "control_guidance_end"} <= set(Cond2ImPipe.PARAMS)
    assert "ctypes" in CIm2ImPipe.PARAMS


@pytest.mark.slow
@pytest.mark.parametrize("name", ["broken.safetensors", "broken.ckpt"])
def test_corrupt_checkpoint_is_an_error_naming_model_id(tmp_path, name):
    bad = tmp_path / name
    bad.write_bytes(b"\x00not a checkpoint" * 8)
    with pytest.raises(PipeError) as err:
        load_base(bad, config_dir=tmp_path)
    assert err.value.param == "model_id" and name in str(err.value)


@pytest.mark.slow
def test_families_recognise_folders_files_and_pipelines(models_dir, sd_base, tmp_path):
    from safetensors.torch import save_file

    from multigen.pipes.families import (SD, SDXL, family, family_of_checkpoint, family_of_folder,
                                         family_of_pipeline)

    assert family_of_folder(models_dir / "tiny-sd") is SD and family_of_folder(models_dir / "tiny-sdxl") is SDXL
    assert family_of_checkpoint(models_dir / "single" / "tiny-sd.safetensors") is SD
    assert family_of_pipeline(sd_base) is SD and family("sdxl") is SDXL and family(ModelType.SD) is SD
    # an SDXL file holds SD's UNet names too: the second text encoder decides
    xl = tmp_path / "xl.safetensors"
    save_file({"model.diffusion_model.x": torch.zeros(1), "conditioner.embedders.1.model.y": torch.zeros(1)}, xl)
    assert family_of_checkpoint(xl) is SDXL
    flux = tmp_path / "flux.safetensors"
    save_file({"double_blocks.0.img_attn.qkv.weight": torch.zeros(1)}, flux)
    with pytest.raises(InvalidValueError) as e:
        load_base(flux, config_dir=tmp_path)
    assert "takes no single-file checkpoints" in str(e.value) and e.value.param == "model_type"
    (tmp_path / "fluxdir" / "transformer").mkdir(parents=True)
    with pytest.raises(InvalidValueError) as e:
        load_base(tmp_path / "fluxdir")
    assert "transformer" in str(e.value)


@pytest.mark.slow
def test_each_pipe_class_gets_its_family_pipeline(sd_base, models_dir):
    import diffusers

    from multigen.pipes import InpaintingPipe, MaskedIm2ImPipe
    from multigen.pipes.families import FAMILIES, Role

    xl, _ = load_base(models_dir / "tiny-sdxl", dtype="float32")
    for base, prefix in ((sd_base, "StableDiffusion"), (xl, "StableDiffusionXL")):
        for cls, kind in ((Prompt2ImPipe, "Pipeline"), (Im2ImPipe, "Img2ImgPipeline"),
                          (MaskedIm2ImPipe, "InpaintPipeline"), (InpaintingPipe, "InpaintPipeline")):
            assert type(cls(pipe=base).pipe).__name__ == prefix + kind
    for fam in FAMILIES:  # every role of every family names a diffusers class
        assert {r: fam.pipeline_class(r) for r in fam.pipelines} == {r: getattr(diffusers, n)
                                                                      for r, n in fam.pipelines.items()}
        assert len(fam.latent_rgb_factors) == fam.latent_channels  # one RGB row per latent channel
    assert [f.latent_channels for f in FAMILIES if f.model_type in ("SD", "SDXL")] == [4, 4]
