"""Cond2ImPipe and CIm2ImPipe on tiny SD and SDXL ControlNets."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from multigen.pipes import CIm2ImPipe, Cond2ImPipe
from multigen.pipes.errors import (InvalidValueError, MissingConditionModelError, MissingImageError,
                                   ModelTypeMismatchError, UnknownParameterError)
from pipes_fixtures import (STEPS, SIZE, controlnet_dir, kind_base, noise_image, one_thread, pixels,  # noqa: F401
                            sd_base, sdxl_base, sdxl_controlnet_dir, shapes_image)

pytestmark = pytest.mark.slow  # every test here builds real pipes on the tiny models

PROMPT = {"prompt": "a robot", "seed": 5}


def test_cond2im_condition_matters_and_is_deterministic(kind_base, controlnet_dir):
    pipe = Cond2ImPipe(pipe=kind_base[1], controlnets=controlnet_dir)
    cond = shapes_image(72, 64)
    pipe.setup(image=cond, steps=STEPS)
    a, b = pipe.gen(PROMPT)[0], pipe.gen(PROMPT)[0]
    assert a.size == (72, 64) and np.array_equal(pixels(a), pixels(b))
    pipe.setup(image=cond.transpose(Image.FLIP_LEFT_RIGHT), steps=STEPS)
    assert not np.array_equal(pixels(pipe.gen(PROMPT)[0]), pixels(a))
    pipe.setup(image=cond, steps=STEPS, cscales=0.3)
    weaker = pipe.gen(PROMPT)[0]
    assert not np.array_equal(pixels(weaker), pixels(a))
    pipe.setup(image=cond, steps=STEPS, guess_mode=True)
    assert not np.array_equal(pixels(pipe.gen(PROMPT)[0]), pixels(a))
    pipe.setup(image=cond, steps=4, control_guidance_start=0.5)
    late = pipe.gen(PROMPT)[0]
    pipe.setup(image=cond, steps=4)
    assert not np.array_equal(pixels(late), pixels(pipe.gen(PROMPT)[0]))


def test_cond2im_with_zero_scale_is_plain_generation(kind_base, controlnet_dir):
    from multigen.pipes import Prompt2ImPipe

    pipe = Cond2ImPipe(pipe=kind_base[1], controlnets=controlnet_dir)
    pipe.setup(image=shapes_image(), steps=STEPS, cscales=0.0)
    plain = Prompt2ImPipe(pipe=kind_base[1])
    plain.setup(width=SIZE, height=SIZE, steps=STEPS)
    diff = np.abs(pixels(pipe.gen(PROMPT)[0]) - pixels(plain.gen(PROMPT)[0]))
    assert diff.max() <= 1


def test_several_controlnets_at_once(kind_base, controlnet_dir):
    pipe = Cond2ImPipe(pipe=kind_base[1], controlnets=[controlnet_dir, controlnet_dir])
    a_img, b_img = shapes_image(), noise_image()
    pipe.setup(image=[a_img, b_img], cscales=[1.0, 0.0], steps=STEPS)
    both = pipe.gen(PROMPT)[0]
    single = Cond2ImPipe(pipe=kind_base[1], controlnets=controlnet_dir)
    single.setup(image=a_img, steps=STEPS)
    assert np.abs(pixels(both) - pixels(single.gen(PROMPT)[0])).max() <= 1  # second net at scale 0
    pipe.setup(image=[a_img, b_img], cscales=[1.0, 1.0], steps=STEPS)
    assert not np.array_equal(pixels(pipe.gen(PROMPT)[0]), pixels(both))
    with pytest.raises(InvalidValueError) as e:
        pipe.setup(image=a_img)
    assert e.value.param == "image"
    with pytest.raises(InvalidValueError) as e:
        pipe.setup(image=[a_img, b_img], cscales=[1.0])
    assert e.value.param == "cscales"


def test_controlnet_errors(sd_base, sdxl_controlnet_dir, models_dir):
    with pytest.raises(ModelTypeMismatchError) as e:
        Cond2ImPipe(pipe=sd_base, controlnets=sdxl_controlnet_dir)
    assert e.value.param == "controlnets"
    with pytest.raises(InvalidValueError):
        Cond2ImPipe(pipe=sd_base)
    pipe = Cond2ImPipe(pipe=sd_base, controlnets=models_dir / "tiny-controlnet-sd")
    with pytest.raises(MissingImageError):
        pipe.setup(steps=STEPS)
    with pytest.raises(UnknownParameterError):
        pipe.setup(image=shapes_image(), ctypes=["canny"])


def edge_fraction(image: Image.Image) -> float:
    return float((np.asarray(image.convert("L")) > 127).mean())


def test_cim2im_canny_condition_looks_like_edges(kind_base, controlnet_dir):
    src = shapes_image(72, 64)
    pipe = CIm2ImPipe(pipe=kind_base[1], controlnets=[controlnet_dir], ctypes=["canny"])
    pipe.setup(image=src, steps=4, strength=0.75)
    (cond,) = pipe.condition_images
    arr = np.asarray(cond.convert("L"))
    assert cond.size == src.size
    assert set(np.unique(arr)) <= {0, 255}  # canny: binary edge map
    assert 0.01 < edge_fraction(cond) < 0.3  # thin lines, not a filled image
    assert arr[7:10, 8:37].max() == 255 and arr[14:26, 14:30].max() == 0  # rectangle top edge; inside
    a, b = pipe.gen(PROMPT)[0], pipe.gen(PROMPT)[0]
    assert a.size == src.size and np.array_equal(pixels(a), pixels(b))


def test_cim2im_conditions_per_type_and_setup_ctypes(kind_base, controlnet_dir):
    src = shapes_image()
    pipe = CIm2ImPipe(pipe=kind_base[1], controlnets={"canny": controlnet_dir, "soft-sobel": controlnet_dir,
                                                      "ip2p": controlnet_dir}, ctypes=["canny"])
    pipe.setup(image=src, steps=STEPS, ctypes=["soft-sobel", "ip2p"])
    sobel, ip2p = pipe.condition_images
    assert np.array_equal(np.asarray(ip2p), np.asarray(src))  # ip2p: the image itself
    grey = np.asarray(sobel.convert("L")).astype(int)
    assert grey[8, 8:30].mean() > grey[2:5, 40:60].mean() + 30  # strong response on edges, none on flat grey
    assert pipe.get_config()["control_type"] == ["soft-sobel", "ip2p"]
    first = pipe.gen(PROMPT)[0]
    pipe.setup(image=src, steps=STEPS, ctypes=["canny"])
    assert len(pipe.condition_images) == 1
    assert not np.array_equal(pixels(pipe.gen(PROMPT)[0]), pixels(first))


def test_cim2im_model_conditions_need_configured_models(sd_base, models_dir):
    pipe = CIm2ImPipe(pipe=sd_base, controlnets={"depth": models_dir / "tiny-controlnet-sd"}, ctypes=["depth"])
    with pytest.raises(MissingConditionModelError) as e:
        pipe.setup(image=shapes_image(), steps=STEPS)
    assert "depth" in str(e.value)
    with pytest.raises(InvalidValueError) as e:
        CIm2ImPipe(pipe=sd_base, controlnets=[models_dir / "tiny-controlnet-sd"], ctypes=["sketchy"])
    assert e.value.param == "ctypes" and "canny" in e.value.allowed


def test_cim2im_inpaint_qr_soft_and_callable_depth_model(sd_base, models_dir):
    cn = models_dir / "tiny-controlnet-sd"
    src = shapes_image()
    mask = Image.new("L", src.size, 0)
    mask.paste(255, (40, 40, 60, 60))

    def fake_depth(image):  # a stand-in depth estimator: brightness as depth
        return np.asarray(image.convert("L"), dtype=np.float32)

    pipe = CIm2ImPipe(pipe=sd_base, controlnets={c: cn for c in ("inpaint", "qr", "soft", "depth")},
                      ctypes=["inpaint", "qr", "soft", "depth"], condition_models={"depth": fake_depth})
    pipe.setup(image=src, mask=mask, steps=STEPS, strength=1.0)
    inpaint, qr, soft, depth = (np.asarray(c) for c in pipe.condition_images)
    assert inpaint[45, 45].max() == 0 and np.array_equal(inpaint[:30, :30], np.asarray(src)[:30, :30])
    assert qr.min() == 0 and qr.max() == 255  # contrast stretched
    assert soft[8, 8:30].mean() > soft[2:5, 40:60].mean()  # edges stand out from flat areas
    assert depth.shape == (SIZE, SIZE, 3)
    assert pipe.gen(PROMPT)[0].size == src.size
    with pytest.raises(MissingImageError) as e:
        pipe.setup(image=src, steps=STEPS)  # inpaint without a mask
    assert e.value.param == "mask"
    rgba = src.convert("RGBA")
    rgba.putalpha(Image.eval(mask, lambda v: 255 - v))  # transparent where the mask is
    pipe.setup(image=rgba, steps=STEPS, strength=1.0)
    assert np.asarray(pipe.condition_images[0])[45, 45].max() == 0


def test_cond2im_ctypes_pick_controlnets_and_default_scales(sd_base, models_dir):
    cn = models_dir / "tiny-controlnet-sd"
    pipe = Cond2ImPipe(pipe=sd_base, controlnets={"canny": cn, "depth": cn}, ctypes=["canny"])
    pipe.setup(image=shapes_image(), steps=STEPS)
    cfg = pipe.get_config()
    assert cfg["control_type"] == ["canny"] and cfg["cscales"] == [0.75] and len(pipe.controlnets) == 1
    with pytest.raises(InvalidValueError) as e:
        Cond2ImPipe(pipe=sd_base, controlnets={"canny": cn}, ctypes=["pose"])
    assert e.value.param == "ctypes"


def test_every_pipe_config_is_json(sd_base, models_dir, tmp_path):
    import json

    from multigen.pipes import Im2ImPipe, InpaintingPipe, MaskedIm2ImPipe, Prompt2ImPipe

    cn = models_dir / "tiny-controlnet-sd"
    src, mask = shapes_image(), Image.new("L", (SIZE, SIZE), 255)
    path = tmp_path / "src.png"
    src.save(path)
    cases = [(Prompt2ImPipe(pipe=sd_base), {"width": SIZE, "height": SIZE}),
             (Im2ImPipe(pipe=sd_base), {"image": path}),
             (MaskedIm2ImPipe(pipe=sd_base), {"original_image": src, "mask": mask}),
             (InpaintingPipe(pipe=sd_base), {"image": src, "mask": mask}),
             (Cond2ImPipe(pipe=sd_base, controlnets=[cn, cn]), {"image": [src, path]}),
             (CIm2ImPipe(pipe=sd_base, controlnets=[cn], ctypes=["canny"]), {"image": src})]
    for pipe, params in cases:
        pipe.setup(steps=STEPS, **params)
        pipe.gen({"prompt": "x", "seed": np.int64(3)})
        cfg = json.loads(json.dumps(pipe.get_config()))
        assert cfg["pipe"] == type(pipe).__name__ and cfg["seed"] == 3 and cfg["steps"] == STEPS
    assert cfg["control_type"] == ["canny"] and cfg["controlnets"] == [str(cn)]


def test_cim2im_failed_setup_with_other_ctypes_keeps_the_working_setup(sd_base, models_dir):
    # setup(ctypes=[two types]) rebuilds the pipeline with two ControlNets before cscales is checked;
    # when the check fails, the pipe must still run its previous one-ControlNet setup
    cn = models_dir / "tiny-controlnet-sd"
    pipe = CIm2ImPipe(pipe=sd_base, controlnets={"canny": cn, "soft": cn}, ctypes=["canny"])
    pipe.setup(image=shapes_image(), steps=STEPS)
    want = pixels(pipe.gen(PROMPT)[0])
    with pytest.raises(InvalidValueError) as e:
        pipe.setup(image=shapes_image(), steps=STEPS, ctypes=["canny", "soft"], cscales=[1.0, 1.0, 1.0])
    assert e.value.param == "cscales"
    assert pipe.ctypes == ["canny"] and len(pipe.condition_images) == 1
    assert np.array_equal(pixels(pipe.gen(PROMPT)[0]), want)
