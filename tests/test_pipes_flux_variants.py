"""Flux.1 Fill (inpainting with FluxFillPipeline) and Flux.1 Kontext (instruction editing with
FluxKontextPipeline) through the ordinary pipe classes, on the tiny variants built offline
(models/tiny-flux-fill, models/tiny-flux-kontext)."""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from PIL import Image

from multigen.pipes import (Edit2ImPipe, Im2ImPipe, InpaintingPipe, MaskedIm2ImPipe, ModelType, Prompt2ImPipe,
                            load_base)
from multigen.pipes.errors import InvalidValueError
from multigen.pipes.families import FLUX, Role, family_of_folder
from multigen.pipes.families.flux import FILL, KONTEXT
from multigen.pipes.tiny import TINY_MODELS
from multigen.pipes.tiny.flux import FLUX_DIR
from multigen.pipes.tiny.flux_variants import (FLUX_FILL_DIR, FLUX_KONTEXT_DIR, build_flux_fill,
                                               build_flux_fill_model, build_flux_kontext_model)
from pipes_fixtures import noise_image, one_thread, pixels, shapes_image  # noqa: F401

pytestmark = pytest.mark.slow

PROMPT = "a red apple"
W, H = 72, 68  # neither a multiple of 16: padded to 80x80, cropped back


@pytest.fixture(scope="module")
def fill_base(models_dir):
    base, kind = load_base(models_dir / FLUX_FILL_DIR)
    assert kind is ModelType.FLUX
    return base


@pytest.fixture(scope="module")
def kontext_base(models_dir):
    base, _ = load_base(models_dir / FLUX_KONTEXT_DIR)
    return base


@pytest.fixture(scope="module")
def flux_base(models_dir):
    base, _ = load_base(models_dir / FLUX_DIR)
    return base


def _box_mask(box: tuple[int, int, int, int], size: tuple[int, int] = (W, H)) -> Image.Image:
    mask = Image.new("L", size, 0)
    mask.paste(255, box)
    return mask


def _files(folder) -> dict[str, str]:
    return {str(f.relative_to(folder)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(folder.rglob("*")) if f.is_file()}


# ---- the tiny variants and how they are recognised ----------------------------------------------------

def test_tiny_variants_build_offline_byte_identical(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    names = [m.name for m in TINY_MODELS]
    assert names.index("flux_fill") > names.index("flux") and "flux_kontext" in names
    for build, folder, pipeline in ((build_flux_fill_model, FLUX_FILL_DIR, "FluxFillPipeline"),
                                    (build_flux_kontext_model, FLUX_KONTEXT_DIR, "FluxKontextPipeline")):
        first, second = build(tmp_path / "a"), build(tmp_path / "b")
        assert first.name == folder and _files(first) == _files(second), folder  # same seed, same bytes
        assert json.loads((first / "model_index.json").read_text())["_class_name"] == pipeline
        assert str(tmp_path) not in "".join(p.read_text() for p in first.rglob("*.json"))
        assert family_of_folder(first) is FLUX
    transformer = json.loads((tmp_path / "a" / FLUX_FILL_DIR / "transformer" / "config.json").read_text())
    # FluxFillPipeline's layout: 64 packed latents + 64 packed masked-image latents + 4 x 8 x 8 mask channels
    assert transformer["in_channels"] == 384 and transformer["out_channels"] == 64
    kontext = json.loads((tmp_path / "a" / FLUX_KONTEXT_DIR / "transformer" / "config.json").read_text())
    assert kontext["in_channels"] == 64


def test_variants_are_recognised(fill_base, kontext_base, flux_base):
    from diffusers import FluxPipeline

    assert type(fill_base).__name__ == "FluxPipeline"  # the shared base; the variant picks the classes
    assert FLUX.variant(fill_base) is FILL and FLUX.variant(kontext_base) is KONTEXT
    assert FLUX.variant(flux_base) is None
    # a Fill transformer is told by its input channels alone (no folder to read)
    assert FLUX.variant(FluxPipeline(**build_flux_fill().components)) is FILL
    assert FLUX.pipeline_class(Role.INPAINT, fill_base).__name__ == "FluxFillPipeline"
    assert FLUX.pipeline_class(Role.INPAINT, flux_base).__name__ == "FluxInpaintPipeline"
    assert FLUX.pipeline_class(Role.EDIT, kontext_base).__name__ == "FluxKontextPipeline"
    assert FLUX.pipeline_class(Role.TEXT2IMAGE, kontext_base).__name__ == "FluxPipeline"
    FLUX.check_role(Role.EDIT)  # the family runs edit (with a Kontext model)
    described = {v["name"]: v for v in FLUX.describe()["variants"]}
    assert described["Flux.1 Fill"]["roles"] == ["inpaint"] and "edit" in described["Flux.1 Kontext"]["roles"]


# ---- Flux.1 Fill ----------------------------------------------------------------------------------------

def test_fill_inpaints_with_its_own_defaults(fill_base):
    pipe = InpaintingPipe(pipe=fill_base)
    assert type(pipe.pipe).__name__ == "FluxFillPipeline"
    defaults = pipe.default_params()
    assert (defaults["guidance_scale"], defaults["steps"]) == (30.0, 50)  # FLUX.1-Fill-dev's settings
    image = shapes_image(W, H)
    pipe.setup(image=image, mask=_box_mask((10, 10, 50, 44)), steps=2)
    a = pipe.gen({"prompt": PROMPT, "seed": 3})[0]
    assert a.size == (W, H) and pipe.get_config()["guidance_scale"] == 30.0
    assert np.array_equal(pixels(a), pixels(pipe.gen({"prompt": PROMPT, "seed": 3})[0]))  # the seed repeats
    assert not np.array_equal(pixels(a), pixels(pipe.gen({"prompt": PROMPT, "seed": 4})[0]))
    # the mask decides what is redrawn: another mask, another image; outside the mask, the original
    pipe.setup(image=image, mask=_box_mask((30, 20, 70, 60)), steps=2, blur=0)  # no blur: an exact edge
    b = pipe.gen({"prompt": PROMPT, "seed": 3})[0]
    assert not np.array_equal(pixels(a), pixels(b))
    outside = np.asarray(_box_mask((30, 20, 70, 60))) == 0
    assert np.array_equal(pixels(b)[outside], pixels(image)[outside])
    assert not np.array_equal(pixels(b)[~outside], pixels(image)[~outside])
    pipe.setup(image=shapes_image(64, 64), mask=_box_mask((0, 0, 32, 32), (64, 64)), steps=2)
    assert pipe.gen({"prompt": PROMPT, "seed": 3})[0].size == (64, 64)


def test_fill_masked_pipe_keeps_unmasked_pixels(fill_base):
    pipe = MaskedIm2ImPipe(pipe=fill_base)
    assert type(pipe.pipe).__name__ == "FluxFillPipeline"
    image = noise_image(W, H, seed=1)
    mask = _box_mask((20, 16, 56, 52))
    # strength: how much of the input is noised; no blur, so that the kept pixels end at the mask's edge
    pipe.setup(image=image, mask=mask, steps=4, strength=0.5, blur=0, blur_compose=0)
    out = pipe.gen({"prompt": PROMPT, "seed": 1})[0]
    outside = np.asarray(mask) == 0
    assert out.size == (W, H) and np.array_equal(pixels(out)[outside], pixels(image)[outside])
    assert not np.array_equal(pixels(out)[~outside], pixels(image)[~outside])


def test_fill_refuses_what_it_cannot_run(fill_base):
    for cls, role in ((Prompt2ImPipe, "text2image"), (Im2ImPipe, "image2image"), (Edit2ImPipe, "edit")):
        with pytest.raises(InvalidValueError) as e:
            cls(pipe=fill_base)
        assert e.value.param == "model_id" and FLUX_FILL_DIR in str(e.value), cls
        assert f"not {role}" in str(e.value) and "InpaintingPipe" in str(e.value) and "mask" in str(e.value)
    pipe = InpaintingPipe(pipe=fill_base)
    with pytest.raises(InvalidValueError) as e:  # FluxFillPipeline takes no negative prompt, no true CFG
        pipe.setup(image=shapes_image(W, H), mask=_box_mask((0, 0, 20, 20)), steps=2, true_cfg_scale=3.0)
    assert e.value.param == "true_cfg_scale" and "Flux.1 Fill" in str(e.value)
    # a negative prompt runs unused, and the job says so; the step previews see [1, 16, h/8, w/8] latents
    pipe.setup(image=shapes_image(W, H), mask=_box_mask((0, 0, 20, 20)), steps=2)
    seen = []
    pipe.gen({"prompt": PROMPT, "negative_prompt": "blurry", "seed": 1,
              "callback": lambda step, steps, latents: seen.append((step, steps, tuple(latents.shape)))})
    assert seen == [(1, 2, (1, 16, 10, 10)), (2, 2, (1, 16, 10, 10))]
    assert any("negative prompt is not used" in w for w in pipe.warnings)


# ---- Flux.1 Kontext ---------------------------------------------------------------------------------------

def test_kontext_edits_at_the_input_size(kontext_base, monkeypatch):
    pipe = Edit2ImPipe(pipe=kontext_base)
    assert type(pipe.pipe).__name__ == "FluxKontextPipeline" and pipe.default_params()["guidance_scale"] == 2.5
    vae, seen = pipe.pipe.vae, {}
    encode, decode = vae.encode, vae.decode
    monkeypatch.setattr(vae, "encode", lambda x, *a, **k: seen.setdefault("in", tuple(x.shape)) and encode(x, *a, **k))
    monkeypatch.setattr(vae, "decode", lambda z, *a, **k: seen.setdefault("out", tuple(z.shape)) and decode(z, *a, **k))
    pipe.setup(image=shapes_image(W, H), steps=2)
    a = pipe.gen({"prompt": "make the circle green", "seed": 5})[0]
    # not resized to a Kontext resolution nor scaled to a megapixel: read and made at the padded 80x80
    assert a.size == (W, H) and seen["in"][-2:] == (80, 80) and seen["out"][-2:] == (10, 10)
    assert np.array_equal(pixels(a), pixels(pipe.gen({"prompt": "make the circle green", "seed": 5})[0]))
    assert not np.array_equal(pixels(a), pixels(pipe.gen({"prompt": "make the circle green", "seed": 6})[0]))
    seen["steps"] = []  # real classifier-free guidance with a negative prompt; previews of the output only
    pipe.setup(image=shapes_image(W, H), steps=2, true_cfg_scale=2.0)
    guided = pipe.gen({"prompt": "make the circle green", "negative_prompt": "blurry", "seed": 5,
                       "callback": lambda step, steps, latents: seen["steps"].append(tuple(latents.shape))})[0]
    assert seen["steps"] == [(1, 16, 10, 10)] * 2 and not pipe.warnings
    assert not np.array_equal(pixels(a), pixels(guided))
    pipe.setup(image=noise_image(W, H), steps=2)  # the input decides
    assert not np.array_equal(pixels(a), pixels(pipe.gen({"prompt": "make the circle green", "seed": 5})[0]))
    pipe.setup(image=shapes_image(W, H), steps=2, width=100, height=70)  # width/height resize the input
    assert pipe.gen({"prompt": "make the circle green", "seed": 5})[0].size == (100, 70)


def test_edit_needs_a_kontext_model(flux_base, kontext_base):
    with pytest.raises(InvalidValueError) as e:
        Edit2ImPipe(pipe=flux_base)
    assert e.value.param == "model_id" and FLUX_DIR in str(e.value) and "FluxKontextPipeline" in str(e.value)
    # a Kontext model runs text-to-image too (FluxPipeline: its transformer has the plain shape)
    pipe = Prompt2ImPipe(pipe=kontext_base)
    assert type(pipe.pipe).__name__ == "FluxPipeline"
    pipe.setup(width=W, height=H, steps=2)
    out = pipe.gen({"prompt": PROMPT, "seed": 1})[0]
    assert out.size == (W, H) and pixels(out).std() > 0
