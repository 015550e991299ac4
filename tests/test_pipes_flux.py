"""Flux.1 text-to-image, image-to-image and inpainting on the tiny Flux model built offline (models/tiny-flux)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from PIL import Image

from multigen.pipes import (Cancelled, Cond2ImPipe, Im2ImPipe, InpaintingPipe, MaskedIm2ImPipe, ModelType,
                            Prompt2ImPipe, latents_to_rgb, load_base)
from multigen.pipes.errors import InvalidValueError
from multigen.pipes.families import FLUX, SD, SDXL, Role, family, family_of_folder, family_of_pipeline
from multigen.pipes.model_builder import FLUX_DIR, SD_DIR, build_flux_model, build_missing_models
from multigen.pipes.prompting import strip_weighting

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def flux_base(models_dir):
    base, kind = load_base(models_dir / FLUX_DIR)
    assert kind is ModelType.FLUX
    return base


@pytest.fixture()
def flux(flux_base):
    pipe = Prompt2ImPipe(pipe=flux_base)
    pipe.setup(width=72, height=64, steps=2)
    return pipe


def _pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def test_tiny_flux_builds_offline_and_only_when_missing(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = build_flux_model(tmp_path)
    index = json.loads((path / "model_index.json").read_text())
    assert index["_class_name"] == "FluxPipeline"
    transformer = json.loads((path / "transformer" / "config.json").read_text())
    vae = json.loads((path / "vae" / "config.json").read_text())
    # Flux.1's shapes: 16 latent channels, packed 2x2 into 64 transformer channels, distilled guidance
    assert transformer["_class_name"] == "FluxTransformer2DModel" and transformer["in_channels"] == 64
    assert transformer["guidance_embeds"] is True and vae["latent_channels"] == 16
    assert (path / "tokenizer_2" / "tokenizer.json").is_file()
    assert family_of_folder(path) is FLUX
    # an existing folder is left alone; a missing one is built without touching the others
    (tmp_path / SD_DIR).mkdir()
    (tmp_path / SD_DIR / "keep.txt").write_text("x")
    assert "flux" not in build_missing_models(tmp_path)  # (the later families' models are built)
    (path / "model_index.json").unlink()
    # (the IP-Adapters wait for real tiny SD/SDXL folders: this tiny-sd holds only keep.txt)
    built = build_missing_models(tmp_path)
    assert built["flux"] == path and set(built) <= {"flux", "ip_adapter"}, built
    assert (path / "model_index.json").is_file() and (tmp_path / SD_DIR / "keep.txt").read_text() == "x"


def test_family_is_recognised(models_dir, flux_base):
    assert family_of_folder(models_dir / FLUX_DIR) is FLUX
    assert family_of_folder(models_dir / "tiny-sdxl") is SDXL and family_of_folder(models_dir / "tiny-sd") is SD
    assert family_of_pipeline(flux_base) is FLUX and family("flux") is FLUX
    assert type(flux_base).__name__ == "FluxPipeline"
    assert FLUX.pipeline_class(Role.TEXT2IMAGE).__name__ == "FluxPipeline"
    assert FLUX.pipeline_class(Role.IMAGE2IMAGE).__name__ == "FluxImg2ImgPipeline"
    assert FLUX.latent_channels == 16 and FLUX.denoiser == "transformer"
    assert FLUX.working_roles == {Role.TEXT2IMAGE, Role.IMAGE2IMAGE, Role.INPAINT, Role.CONTROLNET,
                                  Role.CONTROLNET_IMAGE2IMAGE, Role.EDIT}
    # instruction editing is a Kontext model's only (tests/test_pipes_flux_variants.py): this one is refused
    with pytest.raises(InvalidValueError) as e:
        FLUX.pipeline_class(Role.EDIT, flux_base)
    assert e.value.param == "model_id" and "Kontext" in str(e.value)
    # its ControlNet pipes need explicit ControlNets (tests/test_pipes_flux_extras.py): no default folders
    with pytest.raises(InvalidValueError) as e:
        Cond2ImPipe(pipe=flux_base)
    assert e.value.param == "controlnets"


def test_defaults_follow_the_family(flux_base):
    pipe = Prompt2ImPipe(pipe=flux_base)
    defaults = pipe.default_params()
    assert (defaults["width"], defaults["height"]) == (1024, 1024)  # FluxPipeline's native size
    assert defaults["guidance_scale"] == 3.5 and defaults["steps"] == 28
    assert pipe.device.type == "cpu" and pipe.dtype == flux_base.transformer.dtype
    assert pipe.padded(72) == 80 and pipe.padded(64) == 64


def test_makes_an_image_of_the_requested_size(flux):
    image = flux.gen({"prompt": "a red cat", "seed": 1})
    assert image.size == (72, 64)
    assert _pixels(image).std() > 0  # not a flat (black or NaN) image
    cfg = flux.get_config()
    assert cfg["model_type"] == "FLUX" and cfg["scheduler_class"] == "FlowMatchEulerDiscreteScheduler"
    assert (cfg["width"], cfg["height"], cfg["steps"], cfg["seed"]) == (72, 64, 2, 1)


def test_model_id_and_pipe_give_the_same_image(models_dir, flux):
    own = Prompt2ImPipe(models_dir / FLUX_DIR, device="cpu")
    assert own.model_type is ModelType.FLUX
    own.setup(width=72, height=64, steps=2)
    a = own.gen({"prompt": "a red cat", "seed": 5})
    b = flux.gen({"prompt": "a red cat", "seed": 5})
    assert np.array_equal(_pixels(a), _pixels(b))


def test_a_seed_repeats_and_another_differs(flux):
    a = _pixels(flux.gen({"prompt": "a lab", "seed": 7}))
    b = _pixels(flux.gen({"prompt": "a lab", "seed": 7}))
    c = _pixels(flux.gen({"prompt": "a lab", "seed": 8}))
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_guidance_and_prompt_change_the_image(flux):
    base = _pixels(flux.gen({"prompt": "a lab", "seed": 3}))
    flux.setup(width=72, height=64, steps=2, guidance_scale=9.0)
    assert not np.array_equal(base, _pixels(flux.gen({"prompt": "a lab", "seed": 3})))
    flux.setup(width=72, height=64, steps=2)
    assert not np.array_equal(base, _pixels(flux.gen({"prompt": "a garden", "seed": 3})))


def test_weighting_syntax_is_applied(flux):
    assert strip_weighting("a (red:1.3) [dull] cat") == "a red dull cat"
    assert strip_weighting(r"x BREAK \(y\)") == "x (y)"
    weighted = _pixels(flux.gen({"prompt": "a (red:1.3) cat", "seed": 2}))
    plain = _pixels(flux.gen({"prompt": "a red cat", "seed": 2}))
    assert not np.array_equal(weighted, plain)  # T5 weighting: tests/test_pipes_flux_weighting.py
    flux.setup(width=72, height=64, steps=2, lpw=False)  # lpw off: the text goes to diffusers as it is
    assert not np.array_equal(plain, _pixels(flux.gen({"prompt": "a (red:1.3) cat", "seed": 2})))


def test_step_callback_once_per_step_with_unpacked_latents(flux):
    flux.setup(width=72, height=64, steps=3)
    calls = []
    flux.gen({"prompt": "a lab", "seed": 1, "callback": lambda step, steps, lat: calls.append((step, steps, lat))})
    assert [(s, n) for s, n, _ in calls] == [(1, 3), (2, 3), (3, 3)]
    latents = calls[-1][2]
    assert tuple(latents.shape) == (1, 16, 64 // 8, 80 // 8)  # padded to 80 wide, the VAE's factor 8
    preview = latents_to_rgb(latents, "FLUX")
    assert preview.size == (10, 8) and preview.mode == "RGB"


def test_cancel_stops_it(flux):
    flux.setup(width=72, height=64, steps=4)
    calls = []
    with pytest.raises(Cancelled):
        flux.gen({"prompt": "a lab", "seed": 1, "callback": lambda *a: calls.append(a[0]),
                  "cancel": lambda: len(calls) >= 1})
    assert calls == [1]  # one step ran, then the cancel check stopped it
    with pytest.raises(Cancelled):
        flux.gen({"prompt": "a lab", "seed": 1, "cancel": lambda: True})


def test_parameters_flux_cannot_honour_are_refused(flux, models_dir):
    for params, name in (({"clip_skip": 1}, "clip_skip"), ({"scheduler": "euler"}, "scheduler"),
                         ({"timestep_spacing": "trailing"}, "timestep_spacing")):
        with pytest.raises(InvalidValueError) as e:
            flux.setup(width=72, height=64, **params)
        assert e.value.param == name
    assert flux.params["steps"] == 2  # a refused setup keeps the previous one
    flux.set_loras([])  # what the service does before every job
    assert flux.loras == []
    with pytest.raises(InvalidValueError) as e:
        flux.set_loras([(str(models_dir / "loras" / "tiny-sd-lora.safetensors"), 1.0)])
    assert e.value.param == "loras"
    assert flux.gen({"prompt": "a lab", "seed": 1}).size == (72, 64)


def test_a_transformer_file_that_is_not_flux1_is_refused(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "flux.safetensors"
    save_file({"double_blocks.0.img_attn.qkv.weight": torch.zeros(1)}, str(path))
    with pytest.raises(InvalidValueError) as e:
        load_base(path, config_dir=tmp_path)
    assert "takes no single-file checkpoints" in str(e.value) and e.value.param == "model_type"


def test_step_latents_unpack_as_the_flux_pipeline_does(flux_base):
    import torch
    from diffusers import FluxPipeline

    from multigen.pipes.families import FLUX

    packed = torch.randn(1, (48 // 16) * (64 // 16), 64)
    ours = FLUX.step_latents(flux_base, packed, 48, 64)
    theirs = FluxPipeline._unpack_latents(packed, 48, 64, flux_base.vae_scale_factor)  # the reference, in a test
    assert torch.equal(ours, theirs)


# ---- image-to-image and inpainting --------------------------------------------------------------

PROMPT = {"prompt": "a watercolour landscape", "seed": 3}
#: the part the masked tests redraw (left, top, right, bottom; right and bottom excluded)
BOX = (20, 16, 44, 40)


def _noise_image(width: int = 72, height: int = 64) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _box_mask(size: tuple[int, int], box: tuple[int, int, int, int] = BOX) -> Image.Image:
    mask = np.zeros((size[1], size[0]), np.uint8)
    mask[box[1]:box[3], box[0]:box[2]] = 255
    return Image.fromarray(mask, mode="L")


def _unchanged_region(size: tuple[int, int], box: tuple[int, int, int, int], blur: float) -> np.ndarray:
    """Farther than a blur's reach (3 r + 2 pixels) from ``box``: computed from the test's own mask
    as tests/test_pipes_im2im.py does, not from the pipe's."""
    margin = int(3 * blur + 2)
    keep = np.ones((size[1], size[0]), bool)
    left, top, right, bottom = box
    keep[max(0, top - margin):bottom + margin, max(0, left - margin):right + margin] = False
    return keep


def test_im2im_size_seed_and_strength(flux_base):
    src = _noise_image(72, 68)  # neither side a multiple of 16: padded for the model, cropped back
    pipe = Im2ImPipe(pipe=flux_base)
    assert type(pipe.pipe).__name__ == "FluxImg2ImgPipeline"
    pipe.setup(image=src, steps=4, strength=0.5)
    a, b = pipe.gen(PROMPT)[0], pipe.gen(PROMPT)[0]
    assert a.size == (72, 68) and np.array_equal(_pixels(a), _pixels(b))
    assert not np.array_equal(_pixels(a), _pixels(pipe.gen({**PROMPT, "seed": 4})[0]))
    pipe.setup(image=src, steps=4, strength=1.0)
    full = _pixels(pipe.gen(PROMPT)[0])
    assert not np.array_equal(full, _pixels(a))
    cfg = pipe.get_config()
    assert cfg["model_type"] == "FLUX" and cfg["strength"] == 1.0 and cfg["pipe"] == "Im2ImPipe"
    pipe.setup(image=src, steps=2, strength=0.5, width=96, height=80)  # width/height resize the input
    assert pipe.gen(PROMPT)[0].size == (96, 80)


def test_im2im_steps_follow_strength_and_latents_unpack(flux_base):
    pipe = Im2ImPipe(pipe=flux_base)
    pipe.setup(image=_noise_image(72, 64), steps=4, strength=0.5)
    calls = []
    pipe.gen({**PROMPT, "callback": lambda step, steps, lat: calls.append((step, steps, tuple(lat.shape)))})
    # half the steps run; the latents are the padded input's (80x64), not Flux's native 1024x1024
    assert calls == [(1, 2, (1, 16, 8, 10)), (2, 2, (1, 16, 8, 10))]
    with pytest.raises(Cancelled):
        pipe.gen({**PROMPT, "cancel": lambda: True})
    with pytest.raises(InvalidValueError) as e:
        pipe.setup(image=_noise_image(), steps=2, strength=0.2)  # no step would run
    assert e.value.param == "strength"


def test_masked_im2im_keeps_unmasked_pixels(flux_base):
    original = _noise_image(72, 64)
    pipe = MaskedIm2ImPipe(pipe=flux_base)
    assert type(pipe.pipe).__name__ == "FluxInpaintPipeline"
    pipe.setup(image=original, mask=_box_mask(original.size), steps=4, strength=0.8, blur=2, blur_compose=2)
    out = pipe.gen(PROMPT)[0]
    assert out.size == original.size
    keep = _unchanged_region(original.size, BOX, blur=2)
    assert np.array_equal(_pixels(out)[keep], _pixels(original)[keep])
    inside = (slice(BOX[1], BOX[3]), slice(BOX[0], BOX[2]))
    assert np.abs(_pixels(out)[inside] - _pixels(original)[inside]).mean() > 5  # the box was redrawn
    assert np.array_equal(_pixels(out), _pixels(pipe.gen(PROMPT)[0]))  # a seed repeats its image
    pipe.setup(image=original, mask=_box_mask(original.size), steps=4, strength=0.4, blur=2, blur_compose=2)
    weaker = pipe.gen(PROMPT)[0]
    assert not np.array_equal(_pixels(weaker), _pixels(out))
    assert np.array_equal(_pixels(weaker)[keep], _pixels(original)[keep])


def test_masked_im2im_from_a_painted_copy(flux_base):
    original = _noise_image(72, 64)
    arr = np.asarray(original).copy()
    arr[BOX[1]:BOX[3], BOX[0]:BOX[2]] = (0, 255, 0)
    pipe = MaskedIm2ImPipe(pipe=flux_base)
    pipe.setup(original_image=original, image_painted=Image.fromarray(arr), steps=2, strength=0.5,
               blur=0, blur_compose=0)
    out = pipe.gen(PROMPT)[0]
    keep = _unchanged_region(original.size, BOX, blur=0)
    assert out.size == (72, 64) and np.array_equal(_pixels(out)[keep], _pixels(original)[keep])


def test_inpainting_changes_mostly_the_masked_region(flux_base):
    original = _noise_image(80, 64)
    pipe = InpaintingPipe(pipe=flux_base)
    pipe.setup(image=original, mask=_box_mask(original.size), steps=2, blur=3)
    assert pipe.params["strength"] == 1.0  # InpaintingPipe draws the masked part from noise
    out = pipe.gen(PROMPT)[0]
    assert out.size == (80, 64)
    diff = np.abs(_pixels(out) - _pixels(original)).sum(axis=2)
    keep = _unchanged_region(original.size, BOX, blur=3)
    assert (diff[keep] == 0).all()
    inside = np.zeros_like(keep)
    inside[BOX[1]:BOX[3], BOX[0]:BOX[2]] = True
    assert (diff[inside] > 0).mean() > 0.9 and diff[~inside].sum() < diff[inside].sum()
    assert np.array_equal(_pixels(out), _pixels(pipe.gen(PROMPT)[0]))
    assert not np.array_equal(_pixels(out), _pixels(pipe.gen({**PROMPT, "seed": 9})[0]))
    with pytest.raises(Exception) as e:
        pipe.setup(image=original, steps=2)  # no mask
    assert getattr(e.value, "param", None) == "mask"
