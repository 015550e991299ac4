"""Qwen-Image text-to-image, image-to-image, inpainting, LoRAs, previews and Qwen-Image-Edit instruction
editing (``Edit2ImPipe``) on the tiny Qwen-Image models built offline (models/tiny-qwen-image*)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from multigen.pipes import (Cancelled, Edit2ImPipe, Im2ImPipe, InpaintingPipe, MaskedIm2ImPipe, ModelType,
                            Prompt2ImPipe, latents_to_rgb, load_base, pipe_class, pipe_spec)
from multigen.pipes.errors import InvalidValueError
from multigen.pipes.families import (SD, Role, family, family_of_controlnet, family_of_folder, family_of_pipeline,
                                     native_size_of_folder)
from multigen.pipes.model_builder import build_missing_models
from multigen.pipes.tiny import TINY_MODELS
from multigen.pipes.tiny.qwen_image import (QWEN_IMAGE_CONTROLNET_DIR, QWEN_IMAGE_DIR, QWEN_IMAGE_EDIT_DIR,
                                            QWEN_IMAGE_LORA, build_qwen_image_model)

pytestmark = pytest.mark.slow

QWEN = family("qwen-image")
PROMPT = {"prompt": "a watercolour landscape", "seed": 3}
#: the part the masked tests redraw (left, top, right, bottom; right and bottom excluded)
BOX = (20, 16, 44, 40)


@pytest.fixture(scope="module")
def qwen_base(models_dir):
    base, kind = load_base(models_dir / QWEN_IMAGE_DIR)
    assert kind is ModelType.QWEN_IMAGE
    return base


@pytest.fixture(scope="module")
def edit_base(models_dir):
    base, kind = load_base(models_dir / QWEN_IMAGE_EDIT_DIR)
    assert kind is ModelType.QWEN_IMAGE
    return base


@pytest.fixture()
def qwen(qwen_base):
    pipe = Prompt2ImPipe(pipe=qwen_base)
    pipe.setup(width=72, height=64, steps=2)
    return pipe


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def _noise_image(width: int = 72, height: int = 64, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _shapes_image(width: int = 72, height: int = 68) -> Image.Image:
    img = Image.new("RGB", (width, height), (128, 128, 128))
    draw = ImageDraw.Draw(img)
    draw.rectangle((6, 6, width // 2, height // 2), fill=(220, 40, 40))
    draw.ellipse((width // 2, height // 2, width - 4, height - 4), fill=(30, 60, 200))
    return img


def _box_mask(size: tuple[int, int], box: tuple[int, int, int, int] = BOX) -> Image.Image:
    mask = np.zeros((size[1], size[0]), np.uint8)
    mask[box[1]:box[3], box[0]:box[2]] = 255
    return Image.fromarray(mask, mode="L")


def _unchanged_region(size: tuple[int, int], box: tuple[int, int, int, int], blur: float) -> np.ndarray:
    """Farther than a blur's reach (3 r + 2 pixels) from ``box``, from the test's own mask."""
    margin = int(3 * blur + 2)
    keep = np.ones((size[1], size[0]), bool)
    left, top, right, bottom = box
    keep[max(0, top - margin):bottom + margin, max(0, left - margin):right + margin] = False
    return keep


# ---- the tiny models ---------------------------------------------------------------------------------

def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_tiny_qwen_image_builds_offline_byte_identical_and_when_missing(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    first, second = tmp_path / "a", tmp_path / "b"
    build_qwen_image_model(first)
    # build_missing_models finds the model by the files its build writes: here only ours are missing
    ours = next(m for m in TINY_MODELS if m.name == "qwen_image")
    assert ours.folder == QWEN_IMAGE_DIR and QWEN_IMAGE_LORA in ours.written()
    for model in TINY_MODELS:
        for rel in model.written() if model is not ours else ():
            (second / rel).parent.mkdir(parents=True, exist_ok=True)
            (second / rel).write_text("{}")
    assert build_missing_models(second) == {"qwen_image": second / QWEN_IMAGE_DIR}
    assert build_missing_models(second) == {}
    assert all((first / rel).is_file() for rel in ours.written())
    for part in (QWEN_IMAGE_DIR, QWEN_IMAGE_EDIT_DIR, QWEN_IMAGE_CONTROLNET_DIR):
        assert _files(first / part) == _files(second / part), part  # the same seed writes the same bytes
    assert (first / QWEN_IMAGE_LORA).read_bytes() == (second / QWEN_IMAGE_LORA).read_bytes()
    assert not (first / (QWEN_IMAGE_DIR + ".partial")).exists()
    size = sum(len(b) for part in (QWEN_IMAGE_DIR, QWEN_IMAGE_EDIT_DIR, QWEN_IMAGE_CONTROLNET_DIR)
               for b in _files(first / part).values())
    assert size < 5 * 2**20
    index = json.loads((first / QWEN_IMAGE_DIR / "model_index.json").read_text())
    transformer = json.loads((first / QWEN_IMAGE_DIR / "transformer" / "config.json").read_text())
    vae = json.loads((first / QWEN_IMAGE_DIR / "vae" / "config.json").read_text())
    # Qwen-Image's shapes: 16 latent channels packed 2x2 into 64, the VAE's factor 8, no distilled guidance
    assert index["_class_name"] == "QwenImagePipeline" and index["tokenizer"] == ["transformers", "Qwen2Tokenizer"]
    assert transformer["in_channels"] == 64 and transformer["guidance_embeds"] is False
    assert vae["z_dim"] == 16 and len(vae["temperal_downsample"]) == 3
    edit = json.loads((first / QWEN_IMAGE_EDIT_DIR / "model_index.json").read_text())
    assert edit["_class_name"] == "QwenImageEditPipeline" and edit["processor"] == ["transformers", "Qwen2VLProcessor"]
    assert (first / QWEN_IMAGE_EDIT_DIR / "processor" / "preprocessor_config.json").is_file()


def test_family_is_recognised(models_dir, qwen_base, edit_base):
    for folder in (QWEN_IMAGE_DIR, QWEN_IMAGE_EDIT_DIR):
        assert family_of_folder(models_dir / folder) is QWEN
        assert native_size_of_folder(models_dir / folder) == 1024  # diffusers' default: 128 x the VAE's 8
    assert family_of_folder(models_dir / "tiny-sd") is SD
    assert family_of_pipeline(qwen_base) is QWEN and family_of_pipeline(edit_base) is QWEN
    assert ModelType.parse("qwen-image") is ModelType.QWEN_IMAGE and QWEN.title == "Qwen-Image"
    cn_config = json.loads((models_dir / QWEN_IMAGE_CONTROLNET_DIR / "config.json").read_text())
    assert family_of_controlnet(cn_config) is QWEN
    assert {r: QWEN.pipeline_class(r).__name__ for r in QWEN.pipelines} == {
        Role.TEXT2IMAGE: "QwenImagePipeline", Role.IMAGE2IMAGE: "QwenImageImg2ImgPipeline",
        Role.INPAINT: "QwenImageInpaintPipeline", Role.CONTROLNET: "QwenImageControlNetPipeline",
        Role.EDIT: "QwenImageEditPipeline"}
    assert QWEN.latent_channels == 16 and QWEN.size_multiple == 16 and QWEN.aspect_sizes[0] == (1328, 1328)
    QWEN.check_role(Role.CONTROLNET)  # Cond2ImPipe (tests/test_pipes_family_controlnets.py)
    with pytest.raises(InvalidValueError) as e:  # no ControlNet image-to-image class in diffusers
        QWEN.check_role(Role.CONTROLNET_IMAGE2IMAGE)
    assert e.value.param == "model_type" and "QWEN_IMAGE" not in e.value.allowed


def test_defaults_and_size(qwen, qwen_base):
    defaults = Prompt2ImPipe(pipe=qwen_base).default_params()
    assert (defaults["width"], defaults["height"], defaults["steps"], defaults["guidance_scale"]) == (1024, 1024, 50, 4.0)
    image = qwen.gen({"prompt": "a red cat", "seed": 1})
    assert image.size == (72, 64) and _pixels(image).std() > 0  # 72 is padded to 80 and cropped back
    cfg = qwen.get_config()
    assert cfg["model_type"] == "QWEN_IMAGE" and cfg["scheduler_class"] == "FlowMatchEulerDiscreteScheduler"
    qwen.setup(width=80, height=64, steps=2)
    assert qwen.gen({"prompt": "a red cat", "seed": 1}).size == (80, 64)


def test_a_seed_repeats_and_another_differs(qwen):
    a = _pixels(qwen.gen({"prompt": "a lab", "seed": 7}))
    assert np.array_equal(a, _pixels(qwen.gen({"prompt": "a lab", "seed": 7})))
    assert not np.array_equal(a, _pixels(qwen.gen({"prompt": "a lab", "seed": 8})))


def test_guidance_is_true_cfg_with_a_negative_prompt(qwen):
    def run(negative: str | None = None, **params) -> np.ndarray:
        qwen.setup(width=72, height=64, steps=2, **params)
        return _pixels(qwen.gen({"prompt": "a lab", "negative_prompt": negative, "seed": 4}))

    plain = run()
    assert np.array_equal(plain, run(" "))  # no negative prompt runs the guidance against " ", as Qwen's examples
    assert not np.array_equal(plain, run("blurry"))  # the negative prompt takes effect
    assert not np.array_equal(run("blurry"), run("blurry", true_cfg_scale=8.0))
    assert np.array_equal(run("blurry", true_cfg_scale=6.0), run("blurry", guidance_scale=6.0))  # one knob
    no_cfg = run(true_cfg_scale=1.0)
    assert not np.array_equal(no_cfg, plain)
    assert np.array_equal(no_cfg, run("blurry", true_cfg_scale=1.0))  # unused without guidance, and said so
    assert any("negative prompt is not used" in w for w in qwen.get_config()["warnings"])
    assert np.array_equal(no_cfg, run(guidance_scale=1.0))
    for params, name in (({"guidance_scale": 7.0, "true_cfg_scale": 2.0}, "true_cfg_scale"), ({"steps": 1}, "steps"),
                         ({"scheduler": "euler"}, "scheduler"), ({"clip_skip": 1}, "clip_skip")):
        with pytest.raises(InvalidValueError) as e:
            qwen.setup(width=72, height=64, **params)
        assert e.value.param == name
    assert qwen.params["guidance_scale"] == 1.0 and qwen.params["true_cfg_scale"] is None  # the previous setup stays


def test_family_parameters_are_refused_on_sd(models_dir):
    sd, _ = load_base(models_dir / "tiny-sd", dtype="float32")
    pipe = Prompt2ImPipe(pipe=sd)
    with pytest.raises(InvalidValueError) as e:
        pipe.setup(width=64, height=64, steps=2, true_cfg_scale=3.0)
    assert e.value.param == "true_cfg_scale" and "QWEN_IMAGE" in str(e.value)
    with pytest.raises(InvalidValueError) as e:
        Edit2ImPipe(pipe=sd)
    assert e.value.param == "model_type" and "QWEN_IMAGE" in e.value.allowed


def test_weighting_is_applied_without_a_warning(qwen):
    # (tests/test_pipes_llm_weighting.py checks the embeddings themselves)
    weighted = _pixels(qwen.gen({"prompt": "a (red:1.3) cat", "seed": 2}))
    assert "warnings" not in qwen.get_config()
    assert not np.array_equal(weighted, _pixels(qwen.gen({"prompt": "a red cat", "seed": 2})))


def test_step_callback_previews_and_cancel(qwen, qwen_base):
    from diffusers import QwenImagePipeline

    qwen.setup(width=72, height=64, steps=3)
    calls = []
    qwen.gen({"prompt": "a lab", "seed": 1, "callback": lambda step, steps, lat: calls.append((step, steps, lat))})
    assert [(s, n) for s, n, _ in calls] == [(1, 3), (2, 3), (3, 3)]
    latents = calls[-1][2]
    assert tuple(latents.shape) == (1, 16, 64 // 8, 80 // 8)  # padded to 80 wide, the VAE's factor 8
    preview = latents_to_rgb(latents, "QWEN_IMAGE")
    assert preview.size == (10, 8) and preview.mode == "RGB"
    packed = torch.randn(1, (48 // 16) * (64 // 16), 64)  # unpacked as the pipeline itself does (a reference)
    theirs = QwenImagePipeline._unpack_latents(packed, 48, 64, qwen_base.vae_scale_factor)[:, :, 0]
    assert torch.equal(QWEN.step_latents(qwen_base, packed, 48, 64), theirs)
    ran = []
    with pytest.raises(Cancelled):
        qwen.gen({"prompt": "a lab", "seed": 1, "callback": lambda *a: ran.append(a[0]), "cancel": lambda: len(ran) >= 1})
    assert ran == [1]


def test_lora_changes_the_image_and_leaves_exactly(models_dir, qwen):
    lora = str(models_dir / QWEN_IMAGE_LORA)
    base = _pixels(qwen.gen(PROMPT))
    qwen.set_loras([(lora, 1.0)])
    assert qwen.loras == [(lora, 1.0)]
    assert not np.array_equal(base, _pixels(qwen.gen(PROMPT)))
    qwen.set_loras([(lora, 0.0)])
    assert np.array_equal(base, _pixels(qwen.gen(PROMPT)))
    qwen.set_loras([(lora, 1.0)])
    qwen.set_loras([])
    assert np.array_equal(base, _pixels(qwen.gen(PROMPT)))
    qwen.set_loras([(lora, 1.0)])
    qwen.unload_loras()
    assert qwen.loras == [] and np.array_equal(base, _pixels(qwen.gen(PROMPT)))


# ---- image-to-image and inpainting ---------------------------------------------------------------

def test_im2im_size_seed_and_strength(qwen_base):
    src = _noise_image(72, 68)
    pipe = Im2ImPipe(pipe=qwen_base)
    assert type(pipe.pipe).__name__ == "QwenImageImg2ImgPipeline"
    pipe.setup(image=src, steps=4, strength=0.5)
    a = pipe.gen(PROMPT)[0]
    assert a.size == (72, 68) and np.array_equal(_pixels(a), _pixels(pipe.gen(PROMPT)[0]))
    assert not np.array_equal(_pixels(a), _pixels(pipe.gen({**PROMPT, "seed": 4})[0]))
    pipe.setup(image=src, steps=4, strength=1.0)
    assert not np.array_equal(_pixels(a), _pixels(pipe.gen(PROMPT)[0]))


def test_masked_im2im_keeps_unmasked_pixels(qwen_base):
    original = _noise_image(72, 64)
    pipe = MaskedIm2ImPipe(pipe=qwen_base)
    assert type(pipe.pipe).__name__ == "QwenImageInpaintPipeline"
    pipe.setup(image=original, mask=_box_mask(original.size), steps=4, strength=0.8, blur=2, blur_compose=2)
    out = pipe.gen(PROMPT)[0]
    keep = _unchanged_region(original.size, BOX, blur=2)
    assert out.size == original.size and np.array_equal(_pixels(out)[keep], _pixels(original)[keep])
    inside = (slice(BOX[1], BOX[3]), slice(BOX[0], BOX[2]))
    assert np.abs(_pixels(out)[inside] - _pixels(original)[inside]).mean() > 5  # the box was redrawn


def test_inpainting_changes_only_the_masked_region(qwen_base):
    original = _noise_image(80, 64)
    pipe = InpaintingPipe(pipe=qwen_base)
    pipe.setup(image=original, mask=_box_mask(original.size), steps=2, blur=3)
    out = pipe.gen(PROMPT)[0]
    diff = np.abs(_pixels(out) - _pixels(original)).sum(axis=2)
    assert out.size == (80, 64) and (diff[_unchanged_region(original.size, BOX, blur=3)] == 0).all()
    assert (diff[BOX[1]:BOX[3], BOX[0]:BOX[2]] > 0).mean() > 0.9
    assert np.array_equal(_pixels(out), _pixels(pipe.gen(PROMPT)[0]))


# ---- instruction editing ----------------------------------------------------------------------------

def test_edit_pipe_is_registered():
    spec = pipe_spec("Edit2ImPipe")
    assert spec.canonical("fimage") == "image" and spec.required_images == (("image",),)
    assert "strength" not in spec and "scale" in spec and "true_cfg_scale" in spec
    assert pipe_class("Edit2ImPipe") is Edit2ImPipe and Edit2ImPipe.ROLE is Role.EDIT


def test_edit_size_input_and_seed(edit_base, tmp_path):
    pipe = Edit2ImPipe(pipe=edit_base)
    assert type(pipe.pipe).__name__ == "QwenImageEditPipeline"
    source = tmp_path / "shapes.png"
    _shapes_image(72, 68).save(source)
    pipe.setup(fimage=str(source), steps=2)  # neither side a multiple of 16: padded, cropped back
    a = pipe.gen({"prompt": "make the circle green", "seed": 5})[0]
    assert a.size == (72, 68) and _pixels(a).std() > 0
    assert np.array_equal(_pixels(a), _pixels(pipe.gen({"prompt": "make the circle green", "seed": 5})[0]))
    assert not np.array_equal(_pixels(a), _pixels(pipe.gen({"prompt": "make the circle green", "seed": 6})[0]))
    cfg = pipe.get_config()
    assert cfg["pipe"] == "Edit2ImPipe" and cfg["image"] == str(source) and (cfg["width"], cfg["height"]) == (72, 68)
    pipe.setup(image=_noise_image(72, 68), steps=2)  # another input image: another output
    assert not np.array_equal(_pixels(a), _pixels(pipe.gen({"prompt": "make the circle green", "seed": 5})[0]))
    pipe.setup(image=_shapes_image(72, 68), steps=2, width=96, height=80)  # width/height resize the input
    assert pipe.gen({"prompt": "make the circle green", "seed": 5})[0].size == (96, 80)
    pipe.setup(image=_shapes_image(72, 68), steps=2, scale=2.0)
    assert pipe.output_size() == (144, 136)


def test_edit_needs_an_edit_model_and_an_image(qwen_base, edit_base):
    with pytest.raises(InvalidValueError) as e:
        Edit2ImPipe(pipe=qwen_base)  # a Qwen-Image text-to-image folder: no processor
    assert e.value.param == "model_id" and "Qwen-Image-Edit" in str(e.value)
    pipe = Edit2ImPipe(pipe=edit_base)
    with pytest.raises(Exception) as e:
        pipe.setup(steps=2)
    assert getattr(e.value, "param", None) == "image"


def test_tokenizer_leaves_exactly_the_users_text_after_the_system_prompt(qwen_base, edit_base):
    """The pipelines drop the first prompt_template_encode_start_idx tokens (34, 64: Qwen's system prompt);
    the tiny tokenizer holds the templates' words whole so that the user's text is what stays."""
    tok = qwen_base.tokenizer
    for pipe, first in ((qwen_base, "x"), (Edit2ImPipe(pipe=edit_base).pipe, "<|vision_start|>")):
        ids = tok(pipe.prompt_template_encode.format("x")).input_ids
        assert tok.convert_ids_to_tokens(ids[pipe.prompt_template_encode_start_idx]) == first
