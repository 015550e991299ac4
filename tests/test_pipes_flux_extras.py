"""Flux.1 LoRAs and Flux ControlNets (one or several) on the tiny Flux model, its kohya-format LoRA and its
ControlNet, all built offline beside it (models/tiny-flux, loras/tiny-flux-lora.safetensors,
tiny-controlnet-flux)."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipes_fixtures import noise_image, shapes_image, one_thread  # noqa: F401 (autouse)
from multigen.pipes import CIm2ImPipe, Cond2ImPipe, Im2ImPipe, Prompt2ImPipe, load_base
from multigen.pipes import lora as lora_mod
from multigen.pipes import model_builder
from multigen.pipes.errors import InvalidValueError, MissingConditionModelError, ModelTypeMismatchError, PipeError
from multigen.pipes.families import FLUX, Role
from multigen.pipes.tiny.flux import FLUX_CONTROLNET_DIR, FLUX_DIR, FLUX_LORA, MODEL, build_flux_model

pytestmark = pytest.mark.slow

W, H = 72, 64  # 72 is no multiple of Flux's 16: padded for the model, cropped back
PROMPT = {"prompt": "a lighthouse at dusk", "seed": 5}


@pytest.fixture(scope="module")
def flux_base(models_dir: Path):
    base, _ = load_base(models_dir / FLUX_DIR, dtype="float32")
    return base


@pytest.fixture(scope="module")
def sd_base(models_dir: Path):
    base, _ = load_base(models_dir / "tiny-sd", dtype="float32")
    return base


@pytest.fixture()
def flux_lora(models_dir: Path) -> str:
    return str(models_dir / FLUX_LORA)


@pytest.fixture()
def flux_cn(models_dir: Path) -> Path:
    return models_dir / FLUX_CONTROLNET_DIR


def px(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def _digests(root: Path, rels: tuple[str, ...]) -> dict[str, str]:
    return {rel: hashlib.sha256((root / rel).read_bytes()).hexdigest() for rel in rels}


# ---- the tiny LoRA and ControlNet ------------------------------------------------------------------

def test_extras_build_byte_identical_and_when_missing(tmp_path: Path, monkeypatch):
    a, b = tmp_path / "a", tmp_path / "b"
    build_flux_model(a)
    build_flux_model(b)
    rels = MODEL.written() + (f"{FLUX_DIR}/transformer/diffusion_pytorch_model.safetensors",)
    assert FLUX_LORA in rels and f"{FLUX_CONTROLNET_DIR}/config.json" in rels
    assert _digests(a, rels) == _digests(b, rels)
    # kohya names in BFL's layout (fused q/k/v), as published Flux LoRAs have them
    from safetensors import safe_open

    with safe_open(str(a / FLUX_LORA), framework="pt") as f:
        keys = set(f.keys())
    assert "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight" in keys
    assert any(k.startswith("lora_te1_") for k in keys)
    # a models folder that has the model but not a file beside it gets the model built again
    monkeypatch.setattr(model_builder, "TINY_MODELS", (MODEL,))
    assert not MODEL.missing(a) and model_builder.build_missing_models(a) == {}
    for rel in (FLUX_LORA, f"{FLUX_CONTROLNET_DIR}/diffusion_pytorch_model.safetensors"):
        (a / rel).unlink()
        assert MODEL.missing(a)
        assert model_builder.build_missing_models(a) == {"flux": a / FLUX_DIR}
        assert _digests(a, rels) == _digests(b, rels)


# ---- LoRAs -------------------------------------------------------------------------------------------

@pytest.fixture()
def flux(flux_base):
    pipe = Prompt2ImPipe(pipe=flux_base)
    pipe.setup(width=W, height=H, steps=2)
    yield pipe
    pipe.unload_loras()


def test_lora_changes_the_image_weight_zero_and_unloading_give_the_base(flux, flux_lora):
    assert FLUX.supports_loras
    plain = px(flux.gen(PROMPT))
    flux.set_loras([(flux_lora, 1.0)])
    assert flux.loras == [(flux_lora, 1.0)]
    adapters = flux.pipe.get_list_adapters()
    assert adapters["transformer"] and adapters["text_encoder"]  # both parts of the kohya file loaded
    with_lora = px(flux.gen(PROMPT))
    assert np.abs(with_lora - plain).mean() > 1.0
    assert np.array_equal(with_lora, px(flux.gen(PROMPT)))  # a seed repeats with the LoRA on
    flux.set_loras([(flux_lora, 0.0)])
    assert np.array_equal(px(flux.gen(PROMPT)), plain)
    flux.set_loras([(flux_lora, 0.5)])
    half = px(flux.gen(PROMPT))
    assert not np.array_equal(half, plain) and not np.array_equal(half, with_lora)
    assert flux.get_config()["loras"] == [[flux_lora, 0.5]]
    flux.unload_loras()
    assert lora_mod.loaded_adapters(flux.pipe) == set() and flux.loras == []
    assert np.array_equal(px(flux.gen(PROMPT)), plain)


def test_two_pipe_objects_on_one_base_see_their_own_lora_set(flux_base, flux_lora):
    plain_pipe, lora_pipe = Prompt2ImPipe(pipe=flux_base), Prompt2ImPipe(pipe=flux_base)
    for pipe in (plain_pipe, lora_pipe):
        pipe.setup(width=W, height=H, steps=2)
    try:
        plain = px(plain_pipe.gen(PROMPT))
        lora_pipe.set_loras([(flux_lora, 1.0)])
        with_lora = px(lora_pipe.gen(PROMPT))
        assert not np.array_equal(plain, with_lora)
        # the adapters live in the shared transformer: each gen puts its own pipe's set back
        assert np.array_equal(px(plain_pipe.gen(PROMPT)), plain)
        assert np.array_equal(px(lora_pipe.gen(PROMPT)), with_lora)
        img2img = Im2ImPipe(pipe=flux_base)  # another pipe class on the same weights
        img2img.setup(image=noise_image(W, H), steps=2, strength=1.0)
        a = px(img2img.gen(PROMPT))
        img2img.set_loras([(flux_lora, 1.0)])
        assert not np.array_equal(a, px(img2img.gen(PROMPT)))
        assert np.array_equal(px(plain_pipe.gen(PROMPT)), plain)
    finally:
        lora_pipe.unload_loras()


def _foreign_lora(tmp_path: Path) -> Path:
    """An SD LoRA in diffusers' own format: no key diffusers' Flux loader maps (it only warns)."""
    from safetensors.torch import save_file

    path = tmp_path / "sd-diffusers-lora.safetensors"
    save_file({"unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": torch.zeros(4, 32),
               "unet.down_blocks.0.attentions.0.proj_in.lora_B.weight": torch.zeros(32, 4)}, str(path))
    return path


def test_loras_of_another_family_are_refused_both_ways(flux, sd_base, models_dir, flux_lora, tmp_path):
    plain = px(flux.gen(PROMPT))
    for foreign in (models_dir / "loras" / "tiny-sd-lora.safetensors", _foreign_lora(tmp_path)):
        with pytest.raises(InvalidValueError) as e:
            flux.set_loras([(str(foreign), 1.0)])
        assert e.value.param == "loras" and "FLUX" in str(e.value) and str(foreign) in str(e.value)
        assert lora_mod.loaded_adapters(flux.pipe) == set()  # nothing half-loaded stays behind
    assert flux.loras == [] and np.array_equal(px(flux.gen(PROMPT)), plain)
    sd = Prompt2ImPipe(pipe=sd_base)
    sd.setup(width=64, height=64, steps=2)
    with pytest.raises(InvalidValueError) as e:
        sd.set_loras([(flux_lora, 1.0)])
    assert e.value.param == "loras" and "SD" in str(e.value)
    assert lora_mod.loaded_adapters(sd.pipe) == set()


# ---- ControlNets -------------------------------------------------------------------------------------

def test_cond2im_one_controlnet_uses_its_condition(flux_base, flux_cn):
    assert FLUX.runs(Role.CONTROLNET) and FLUX.runs(Role.CONTROLNET_IMAGE2IMAGE)
    pipe = Cond2ImPipe(pipe=flux_base, controlnets=flux_cn)
    assert type(pipe.pipe).__name__ == "FluxControlNetPipeline"
    assert type(pipe.pipe.controlnet).__name__ == "FluxControlNetModel"
    pipe.setup(image=shapes_image(W, H), steps=2)
    a = pipe.gen(PROMPT)
    assert a.size == (W, H)
    assert np.array_equal(px(a), px(pipe.gen(PROMPT)))
    assert not np.array_equal(px(a), px(pipe.gen({**PROMPT, "seed": 6})))
    pipe.setup(image=noise_image(W, H), steps=2)
    assert np.abs(px(pipe.gen(PROMPT)) - px(a)).mean() > 1.0  # another condition, another image
    # at scale 0 the condition has no effect: any condition image gives the same pixels
    pipe.setup(image=shapes_image(W, H), steps=2, cscales=0.0)
    zero = px(pipe.gen(PROMPT))
    pipe.setup(image=noise_image(W, H), steps=2, cscales=0.0)
    assert np.array_equal(zero, px(pipe.gen(PROMPT))) and not np.array_equal(zero, px(a))
    # the guidance window matters; SD's guess_mode has no Flux counterpart and is refused by name
    pipe.setup(image=shapes_image(W, H), steps=4, control_guidance_start=0.5)
    late = px(pipe.gen(PROMPT))
    pipe.setup(image=shapes_image(W, H), steps=4)
    assert not np.array_equal(late, px(pipe.gen(PROMPT)))
    with pytest.raises(InvalidValueError) as e:
        pipe.setup(image=shapes_image(W, H), steps=2, guess_mode=True)
    assert e.value.param == "guess_mode" and "FluxControlNetPipeline" in str(e.value)
    cfg = pipe.get_config()
    assert cfg["controlnets"] == [str(flux_cn)] and cfg["model_type"] == "FLUX" and cfg["steps"] == 4


def test_cond2im_two_controlnets_each_with_its_scale(flux_base, flux_cn):
    pipe = Cond2ImPipe(pipe=flux_base, controlnets=[flux_cn, flux_cn], ctypes=["canny", "soft"])
    assert type(pipe.pipe.controlnet).__name__ == FLUX.multi_controlnet_class
    first = shapes_image(W, H)

    def run(second: Image.Image, cscales: list[float]) -> np.ndarray:
        pipe.setup(image=[first, second], steps=2, cscales=cscales)
        return px(pipe.gen(PROMPT))

    off = run(shapes_image(W, H), [1.0, 0.0])
    assert off.shape == (H, W, 3)
    # the second ControlNet at scale 0 adds nothing: its condition image does not matter
    assert np.array_equal(off, run(noise_image(W, H), [1.0, 0.0]))
    # at scale 1 it does
    assert not np.array_equal(run(shapes_image(W, H), [1.0, 1.0]), run(noise_image(W, H), [1.0, 1.0]))
    assert not np.array_equal(off, run(shapes_image(W, H), [0.0, 1.0]))
    with pytest.raises(InvalidValueError) as e:
        pipe.setup(image=[first], steps=2)
    assert e.value.param == "image"
    assert pipe.get_config()["control_type"] == ["canny", "soft"]


def test_cim2im_with_a_computed_canny_condition(flux_base, flux_cn):
    pipe = CIm2ImPipe(pipe=flux_base, controlnets={"canny": flux_cn}, ctypes=["canny"])
    assert type(pipe.pipe).__name__ == "FluxControlNetImg2ImgPipeline"
    src = shapes_image(W, H)
    pipe.setup(image=src, steps=4, strength=0.75)
    out = pipe.gen(PROMPT)
    assert out.size == (W, H) and np.array_equal(px(out), px(pipe.gen(PROMPT)))
    cond = np.asarray(pipe.condition_images[0].convert("L"))
    assert cond.shape == (H, W) and 0.0 < (cond > 127).mean() < 0.3  # edges of the shapes, not the shapes
    pipe.setup(image=src, steps=4, strength=0.75, cscales=0.0)
    assert not np.array_equal(px(out), px(pipe.gen(PROMPT)))  # the canny ControlNet acted
    # FluxControlNetImg2ImgPipeline runs no real CFG: a negative prompt is dropped with a warning,
    # true_cfg_scale refused by name
    pipe.gen({**PROMPT, "negative_prompt": "fog"})
    assert any("negative prompt" in w for w in pipe.warnings)
    with pytest.raises(InvalidValueError) as e:
        pipe.setup(image=src, steps=4, true_cfg_scale=2.0)
    assert e.value.param == "true_cfg_scale"
    assert pipe.params["cscales"] == [0.0]  # a refused setup keeps the previous one


def test_controlnets_of_another_family_are_refused(flux_base, sd_base, flux_cn, models_dir):
    sd_cn = models_dir / "tiny-controlnet-sd"
    for base, net, found, model in ((sd_base, flux_cn, "FLUX", "SD"), (flux_base, sd_cn, "SD", "FLUX")):
        for cls in (Cond2ImPipe, CIm2ImPipe):
            with pytest.raises(ModelTypeMismatchError) as e:
                cls(pipe=base, controlnets=[net], ctypes=["canny"])
            assert e.value.param == "controlnets" and str(net) in str(e.value)
            assert f"for {found} models" in str(e.value) and f"base model is {model}" in str(e.value)
    # a transformer is no ControlNet; a Flux ControlNet of another width does not fit
    with pytest.raises(InvalidValueError) as e:
        Cond2ImPipe(pipe=flux_base, controlnets=flux_base.transformer)
    assert e.value.param == "controlnets"
    from diffusers import FluxControlNetModel

    narrow = FluxControlNetModel(num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
                                 joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(2, 2, 4))
    with pytest.raises(ModelTypeMismatchError) as e:
        Cond2ImPipe(pipe=flux_base, controlnets=narrow)
    assert e.value.param == "controlnets" and "hidden width" in str(e.value)
    # Flux has no metafusion default folders: ctypes alone are not enough
    with pytest.raises(MissingConditionModelError) as e:
        Cond2ImPipe(pipe=flux_base, ctypes=["canny"])
    assert e.value.param == "controlnets" and "FLUX models have no default ControlNet folders" in str(e.value)
    cim = CIm2ImPipe(pipe=flux_base)  # ControlNets chosen at setup: none to be found
    with pytest.raises(PipeError) as e:
        cim.setup(image=shapes_image(W, H), steps=2, ctypes=["canny"])
    assert e.value.param == "controlnets"


def test_a_lora_acts_through_a_controlnet_pipe(flux_base, flux_cn, flux_lora):
    pipe = Cond2ImPipe(pipe=flux_base, controlnets=flux_cn)
    pipe.setup(image=shapes_image(W, H), steps=2)
    plain = px(pipe.gen(PROMPT))
    try:
        pipe.set_loras([(flux_lora, 1.0)])
        assert not np.array_equal(plain, px(pipe.gen(PROMPT)))
    finally:
        pipe.unload_loras()
    assert np.array_equal(plain, px(pipe.gen(PROMPT)))
