"""Z-Image text-to-image, image-to-image, inpainting, LoRAs and previews on the tiny Z-Image model built
offline (models/tiny-z-image, its LoRA and ControlNet beside it)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from pipes_fixtures import one_thread  # noqa: F401  (autouse: one torch thread for pixel comparisons)

from multigen.pipes import (Cancelled, CIm2ImPipe, Im2ImPipe, InpaintingPipe, MaskedIm2ImPipe, ModelType,
                            Prompt2ImPipe, latents_to_rgb, load_base)
from multigen.pipes.errors import InvalidValueError, PipeError
from multigen.pipes.families import (FLUX, Role, family, family_of_checkpoint, family_of_controlnet,
                                     family_of_folder, family_of_pipeline, native_size_of_folder)
from multigen.pipes.tiny.z_image import (Z_IMAGE_CONTROLNET_DIR, Z_IMAGE_DIR, Z_IMAGE_LORA, build_z_image_model)

pytestmark = pytest.mark.slow

Z_IMAGE = family("Z_IMAGE")
PROMPT = {"prompt": "a watercolour landscape", "seed": 3}
#: the part the masked tests redraw (left, top, right, bottom; right and bottom excluded)
BOX = (20, 16, 44, 40)


@pytest.fixture(scope="module")
def z_base(models_dir):
    base, kind = load_base(models_dir / Z_IMAGE_DIR, dtype="float32")
    assert kind is ModelType.Z_IMAGE
    return base


@pytest.fixture()
def z_pipe(z_base):
    pipe = Prompt2ImPipe(pipe=z_base)
    pipe.setup(width=72, height=64, steps=2)
    yield pipe
    pipe.unload_loras()  # the adapters live in the shared transformer


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def _noise_image(width: int = 72, height: int = 64) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _box_mask(size: tuple[int, int]) -> Image.Image:
    mask = np.zeros((size[1], size[0]), np.uint8)
    mask[BOX[1]:BOX[3], BOX[0]:BOX[2]] = 255
    return Image.fromarray(mask, mode="L")


def _unchanged_region(size: tuple[int, int], blur: float) -> np.ndarray:
    """Farther than a blur's reach (3 r + 2 pixels) from ``BOX``, from the test's own mask."""
    margin = int(3 * blur + 2)
    keep = np.ones((size[1], size[0]), bool)
    left, top, right, bottom = BOX
    keep[max(0, top - margin):bottom + margin, max(0, left - margin):right + margin] = False
    return keep


# ---- the model and the family ------------------------------------------------------------------------

def test_tiny_model_builds_offline_byte_identical(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    first, second = build_z_image_model(tmp_path / "a"), build_z_image_model(tmp_path / "b")
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert {str(f) for f in files} >= {f"{Z_IMAGE_DIR}/model_index.json", Z_IMAGE_LORA,
                                       f"{Z_IMAGE_CONTROLNET_DIR}/config.json"}
    for rel in files:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel
    assert sum((tmp_path / "a" / f).stat().st_size for f in files) < 5_000_000
    index = json.loads((first / "model_index.json").read_text())
    assert index["_class_name"] == "ZImagePipeline" and index["text_encoder"] == ["transformers", "Qwen3Model"]
    transformer = json.loads((first / "transformer" / "config.json").read_text())
    vae = json.loads((first / "vae" / "config.json").read_text())
    assert transformer["in_channels"] == 16 and transformer["all_patch_size"] == [2]
    assert vae["latent_channels"] == 16 and (vae["scaling_factor"], vae["shift_factor"]) == (0.3611, 0.1159)
    assert (first / "tokenizer" / "chat_template.jinja").is_file()  # the pipelines apply the chat template
    assert family_of_folder(second) is Z_IMAGE and native_size_of_folder(second) == 1024


def test_family_is_recognised(models_dir, z_base, tmp_path):
    assert family_of_folder(models_dir / Z_IMAGE_DIR) is Z_IMAGE and family_of_pipeline(z_base) is Z_IMAGE
    assert family_of_folder(models_dir / "tiny-flux") is FLUX  # asked before Z-Image, still Flux
    assert family("z-image") is Z_IMAGE and Z_IMAGE.model_type is ModelType.Z_IMAGE
    assert Z_IMAGE.pipeline_class(Role.IMAGE2IMAGE).__name__ == "ZImageImg2ImgPipeline"
    assert Z_IMAGE.pipeline_class(Role.INPAINT).__name__ == "ZImageInpaintPipeline"
    assert Z_IMAGE.latent_channels == 16 and Z_IMAGE.latent_rgb_factors == FLUX.latent_rgb_factors
    described = Z_IMAGE.describe()
    assert described["roles"] == ["text2image", "image2image", "inpaint", "controlnet"] and described["loras"] is True
    assert described["params"] == ["max_sequence_length"] and described["prompt_weighting"] is True
    assert [1024, 1024] in described["aspect_sizes"]
    assert all(w % 16 == 0 and h % 16 == 0 for w, h in Z_IMAGE.aspect_sizes)
    # its ControlNet is recognised; CIm2ImPipe has no diffusers class to run it (refused, naming who does)
    config = json.loads((models_dir / Z_IMAGE_CONTROLNET_DIR / "config.json").read_text())
    assert family_of_controlnet(config) is Z_IMAGE
    with pytest.raises(InvalidValueError) as e:
        CIm2ImPipe(pipe=z_base, controlnets=[str(models_dir / Z_IMAGE_CONTROLNET_DIR)], ctypes=["canny"])
    assert e.value.param == "model_type" and "Z_IMAGE" not in e.value.allowed
    # an original-layout (single-file) Z-Image checkpoint is refused as a transformer checkpoint
    from safetensors.torch import save_file

    single = tmp_path / "z-image.safetensors"
    save_file({"layers.0.attention.qkv.weight": torch.zeros(1)}, str(single))
    with pytest.raises(InvalidValueError) as e:
        family_of_checkpoint(single)
    assert e.value.param == "model_type" and "single-file" in str(e.value)


def test_defaults_follow_the_family(z_base):
    pipe = Prompt2ImPipe(pipe=z_base)
    defaults = pipe.default_params()
    assert (defaults["width"], defaults["height"]) == (1024, 1024)  # ZImagePipeline's default size
    assert defaults["steps"] == 8 and defaults["guidance_scale"] == 0.0  # Z-Image-Turbo's settings
    assert pipe.padded(72) == 80 and pipe.padded(64) == 64


# ---- text to image ---------------------------------------------------------------------------------------

def test_makes_an_image_of_the_requested_size(z_pipe):
    image = z_pipe.gen({"prompt": "a red cat", "seed": 1})  # 72 is no multiple of 16: padded, cropped back
    assert image.size == (72, 64) and _pixels(image).std() > 0
    cfg = z_pipe.get_config()
    assert cfg["model_type"] == "Z_IMAGE" and cfg["scheduler_class"] == "FlowMatchEulerDiscreteScheduler"
    assert (cfg["width"], cfg["height"], cfg["steps"], cfg["seed"]) == (72, 64, 2, 1)
    z_pipe.setup(width=100, height=80, steps=2)
    assert z_pipe.gen({"prompt": "a red cat", "seed": 1}).size == (100, 80)
    images = z_pipe.gen({"prompt": "a red cat", "seed": [1, 2]})
    assert [im.size for im in images] == [(100, 80), (100, 80)]


def test_a_seed_repeats_and_another_differs(z_pipe):
    a = _pixels(z_pipe.gen({"prompt": "a lab", "seed": 7}))
    assert np.array_equal(a, _pixels(z_pipe.gen({"prompt": "a lab", "seed": 7})))
    assert not np.array_equal(a, _pixels(z_pipe.gen({"prompt": "a lab", "seed": 8})))
    assert not np.array_equal(a, _pixels(z_pipe.gen({"prompt": "a garden", "seed": 7})))


def test_negative_prompt_takes_effect_with_guidance(z_pipe):
    plain = _pixels(z_pipe.gen({"prompt": "a lab", "seed": 3}))
    # guidance 0 (the default) runs no classifier-free guidance: the negative prompt is unused, and the job says so
    unused = _pixels(z_pipe.gen({"prompt": "a lab", "negative_prompt": "blurry", "seed": 3}))
    assert np.array_equal(plain, unused)
    assert any("negative prompt is not used" in w and "guidance_scale" in w
               for w in z_pipe.get_config()["warnings"])
    z_pipe.setup(width=72, height=64, steps=2, guidance_scale=3.0)
    guided = _pixels(z_pipe.gen({"prompt": "a lab", "seed": 3}))
    negative = _pixels(z_pipe.gen({"prompt": "a lab", "negative_prompt": "blurry", "seed": 3}))
    assert not np.array_equal(guided, plain) and not np.array_equal(guided, negative)
    assert "warnings" not in z_pipe.get_config()


def test_max_sequence_length_truncates_the_prompt(z_pipe):
    prompt = {"prompt": "a lab full of exotic flowers and glass", "seed": 2}
    full = _pixels(z_pipe.gen(prompt))
    z_pipe.setup(width=72, height=64, steps=2, max_sequence_length=8)  # the chat template's first tokens only
    assert z_pipe.get_config()["max_sequence_length"] == 8
    assert not np.array_equal(full, _pixels(z_pipe.gen(prompt)))


def test_weighting_is_applied_without_a_warning(z_pipe):
    # (tests/test_pipes_llm_weighting.py checks the embeddings themselves)
    weighted = _pixels(z_pipe.gen({"prompt": "a (red:1.3) cat", "seed": 2}))
    assert "warnings" not in z_pipe.get_config()
    assert not np.array_equal(weighted, _pixels(z_pipe.gen({"prompt": "a red cat", "seed": 2})))


def test_parameters_z_image_cannot_honour_are_refused(z_pipe):
    for params, name in (({"clip_skip": 1}, "clip_skip"), ({"scheduler": "euler"}, "scheduler"),
                         ({"true_cfg_scale": 4.0}, "true_cfg_scale"), ({"timestep_spacing": "trailing"},
                                                                       "timestep_spacing")):
        with pytest.raises(InvalidValueError) as e:
            z_pipe.setup(width=72, height=64, **params)
        assert e.value.param == name and name in str(e.value) and "Z_IMAGE" in str(e.value)
    assert z_pipe.params["steps"] == 2  # a refused setup keeps the previous one


def test_step_callback_latents_and_previews(z_pipe):
    z_pipe.setup(width=72, height=64, steps=3)
    calls = []
    z_pipe.gen({"prompt": "a lab", "seed": 1, "callback": lambda step, steps, lat: calls.append((step, steps, lat))})
    assert [(s, n) for s, n, _ in calls] == [(1, 3), (2, 3), (3, 3)]
    latents = calls[-1][2]
    assert tuple(latents.shape) == (1, 16, 64 // 8, 80 // 8)  # [b, c, h, w] as denoised, padded to 80 wide
    preview = latents_to_rgb(latents, "Z_IMAGE")
    assert preview.size == (10, 8) and preview.mode == "RGB"


def test_cancel_stops_it(z_pipe):
    z_pipe.setup(width=72, height=64, steps=4)
    calls = []
    with pytest.raises(Cancelled):
        z_pipe.gen({"prompt": "a lab", "seed": 1, "callback": lambda *a: calls.append(a[0]),
                    "cancel": lambda: len(calls) >= 1})
    assert calls == [1]
    with pytest.raises(Cancelled):
        z_pipe.gen({"prompt": "a lab", "seed": 1, "cancel": lambda: True})


# ---- LoRAs ---------------------------------------------------------------------------------------------------

def test_lora_changes_the_image_and_comes_off_exactly(z_pipe, models_dir):
    lora = str(models_dir / Z_IMAGE_LORA)
    base = _pixels(z_pipe.gen(PROMPT))
    z_pipe.set_loras([(lora, 1.0)])
    assert z_pipe.loras == [(lora, 1.0)]
    with_lora = _pixels(z_pipe.gen(PROMPT))
    assert not np.array_equal(base, with_lora)
    assert z_pipe.get_config()["loras"] == [[lora, 1.0]]
    z_pipe.set_loras([(lora, 0.0)])
    assert np.array_equal(base, _pixels(z_pipe.gen(PROMPT)))
    z_pipe.set_loras([(lora, 1.0)])
    assert np.array_equal(with_lora, _pixels(z_pipe.gen(PROMPT)))
    z_pipe.set_loras([])
    assert np.array_equal(base, _pixels(z_pipe.gen(PROMPT)))
    z_pipe.set_loras([(lora, 0.5)])
    z_pipe.unload_loras()
    assert z_pipe.loras == [] and np.array_equal(base, _pixels(z_pipe.gen(PROMPT)))


def test_a_lora_of_another_family_is_refused(z_pipe, models_dir):
    base = _pixels(z_pipe.gen(PROMPT))
    with pytest.raises(PipeError) as e:
        z_pipe.set_loras([(str(models_dir / "loras" / "tiny-sd-lora.safetensors"), 1.0)])
    assert e.value.param == "loras"
    z_pipe.set_loras([])
    assert np.array_equal(base, _pixels(z_pipe.gen(PROMPT)))


# ---- image to image and inpainting ----------------------------------------------------------------------

def test_im2im_size_seed_and_strength(z_base):
    src = _noise_image(72, 68)  # neither side a multiple of 16: padded for the model, cropped back
    pipe = Im2ImPipe(pipe=z_base)
    assert type(pipe.pipe).__name__ == "ZImageImg2ImgPipeline"
    pipe.setup(image=src, steps=4, strength=0.5)
    calls = []
    a = pipe.gen({**PROMPT, "callback": lambda step, steps, lat: calls.append((step, steps, tuple(lat.shape)))})[0]
    assert calls == [(1, 2, (1, 16, 10, 10)), (2, 2, (1, 16, 10, 10))]  # half the steps, the padded 80x80 input
    assert a.size == (72, 68) and np.array_equal(_pixels(a), _pixels(pipe.gen(PROMPT)[0]))
    assert not np.array_equal(_pixels(a), _pixels(pipe.gen({**PROMPT, "seed": 4})[0]))
    pipe.setup(image=src, steps=4, strength=1.0)
    assert not np.array_equal(_pixels(a), _pixels(pipe.gen(PROMPT)[0]))
    assert pipe.get_config()["model_type"] == "Z_IMAGE"
    pipe.setup(image=src, steps=2, strength=0.5, width=96, height=80)  # width/height resize the input
    assert pipe.gen(PROMPT)[0].size == (96, 80)


def test_masked_im2im_keeps_unmasked_pixels(z_base):
    original = _noise_image(72, 64)
    pipe = MaskedIm2ImPipe(pipe=z_base)
    assert type(pipe.pipe).__name__ == "ZImageInpaintPipeline"
    pipe.setup(image=original, mask=_box_mask(original.size), steps=4, strength=0.8, blur=2, blur_compose=2)
    out = pipe.gen(PROMPT)[0]
    keep = _unchanged_region(original.size, blur=2)
    assert out.size == original.size and np.array_equal(_pixels(out)[keep], _pixels(original)[keep])
    inside = (slice(BOX[1], BOX[3]), slice(BOX[0], BOX[2]))
    assert np.abs(_pixels(out)[inside] - _pixels(original)[inside]).mean() > 5  # the box was redrawn
    assert np.array_equal(_pixels(out), _pixels(pipe.gen(PROMPT)[0]))


def test_inpainting_changes_only_the_masked_region(z_base):
    original = _noise_image(80, 64)
    pipe = InpaintingPipe(pipe=z_base)
    pipe.setup(image=original, mask=_box_mask(original.size), steps=2, blur=3)
    assert pipe.params["strength"] == 1.0
    out = pipe.gen(PROMPT)[0]
    diff = np.abs(_pixels(out) - _pixels(original)).sum(axis=2)
    assert out.size == (80, 64) and (diff[_unchanged_region(original.size, blur=3)] == 0).all()
    inside = np.zeros_like(diff, bool)
    inside[BOX[1]:BOX[3], BOX[0]:BOX[2]] = True
    assert (diff[inside] > 0).mean() > 0.9
    assert not np.array_equal(_pixels(out), _pixels(pipe.gen({**PROMPT, "seed": 9})[0]))
