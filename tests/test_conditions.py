"""Condition images: edges where the input has edges, none in flat areas; masks; model types."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from multigen.pipes.conditions import (CONDITION_TYPES, inpaint_control_tensor, make_condition)
from multigen.pipes.errors import (InvalidValueError, MaskSizeError, MissingConditionModelError,
                                   MissingImageError, UnknownParameterError)

W, H = 128, 96
BOX = (32, 24, 95, 71)  # left, top, right, bottom (inclusive)


@pytest.fixture()
def rect() -> Image.Image:
    """A grey rectangle on a dark background: edges on its border, flat elsewhere."""
    img = Image.new("RGB", (W, H), (20, 20, 20))
    ImageDraw.Draw(img).rectangle(BOX, fill=(200, 200, 200))
    return img


def border_band(width: int) -> np.ndarray:
    """Pixels within ``width`` of the rectangle's border."""
    yy, xx = np.mgrid[0:H, 0:W]
    x0, y0, x1, y1 = BOX
    inside_outer = (xx >= x0 - width) & (xx <= x1 + width) & (yy >= y0 - width) & (yy <= y1 + width)
    inside_inner = (xx > x0 + width) & (xx < x1 - width) & (yy > y0 + width) & (yy < y1 - width)
    return inside_outer & ~inside_inner


def grey(img: Image.Image) -> np.ndarray:
    arr = np.asarray(img)
    assert img.mode == "RGB" and img.size == (W, H)
    assert (arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all()
    return arr[..., 0]


def test_condition_types_tuple():
    assert CONDITION_TYPES == ("canny", "soft-sobel", "soft", "ip2p", "inpaint", "qr", "depth", "pose")


def test_canny_edges_on_border_only(rect):
    edges = grey(make_condition("canny", rect))
    assert set(np.unique(edges)) <= {0, 255}
    near = border_band(1)
    assert (edges[~near] == 0).all()  # nothing in the flat areas
    x0, y0, x1, y1 = BOX
    # every side of the rectangle is found along most of its length
    assert (edges[y0 + 4:y1 - 4, x0 - 1:x0 + 2].max(axis=1) == 255).all()
    assert (edges[y0 + 4:y1 - 4, x1 - 1:x1 + 2].max(axis=1) == 255).all()
    assert (edges[y0 - 1:y0 + 2, x0 + 4:x1 - 4].max(axis=0) == 255).all()
    assert (edges[y1 - 1:y1 + 2, x0 + 4:x1 - 4].max(axis=0) == 255).all()


def test_canny_thresholds(rect):
    # contrast 180: a high threshold above any gradient finds nothing
    assert grey(make_condition("canny", rect, low=5000, high=9000)).max() == 0
    assert grey(make_condition("canny", rect, low_threshold=50, high_threshold=100)).max() == 255
    with pytest.raises(InvalidValueError) as info:
        make_condition("canny", rect, low=200, high=100)
    assert info.value.param == "low"


@pytest.mark.parametrize("ctype, band", [("soft-sobel", 5), ("soft", 10)])
def test_soft_edges_strong_on_border_zero_in_flat_areas(rect, ctype, band):
    edges = grey(make_condition(ctype, rect))
    assert edges.max() == 255
    near = border_band(band)
    assert edges[~near].max() <= 2  # flat areas far from the border
    assert edges[border_band(1)].mean() > 60  # the border itself is bright
    # soft is softer: more partly-lit pixels than sobel's
    partial = ((edges > 10) & (edges < 245)).sum()
    assert partial > 0


def test_soft_is_softer_than_canny(rect):
    canny = grey(make_condition("canny", rect))
    soft = grey(make_condition("soft", rect))
    assert len(np.unique(soft)) > 20 > len(np.unique(canny))
    assert (soft > 0).sum() > 2 * (canny > 0).sum()


def test_flat_image_has_no_edges():
    flat = Image.new("RGB", (64, 64), (90, 120, 30))
    for ctype in ("canny", "soft-sobel", "soft"):
        assert np.asarray(make_condition(ctype, flat)).max() == 0, ctype


def test_ip2p_is_the_image_and_input_modes_are_converted(rect):
    assert np.array_equal(np.asarray(make_condition("ip2p", rect)), np.asarray(rect))
    out = make_condition("ip2p", rect.convert("L"))
    assert out.mode == "RGB" and out.size == rect.size
    rgba = rect.convert("RGBA")
    assert make_condition("canny", rgba).mode == "RGB"
    assert make_condition("canny", np.asarray(rect)).size == (W, H)


def test_qr_stretches_contrast():
    img = Image.new("RGB", (W, H), (100, 100, 100))
    ImageDraw.Draw(img).rectangle((10, 10, 30, 30), fill=(140, 140, 140))
    out = grey(make_condition("qr", img))
    assert out.min() == 0 and out.max() == 255
    assert set(np.unique(out)) == {0, 255}


def test_inpaint_marks_masked_pixels(rect):
    mask = Image.new("L", (W, H), 0)
    ImageDraw.Draw(mask).rectangle((0, 0, 15, 15), fill=255)
    out = np.asarray(make_condition("inpaint", rect, mask=mask))
    assert (out[:16, :16] == 0).all()
    assert np.array_equal(out[16:, 16:], np.asarray(rect)[16:, 16:])
    tensor = inpaint_control_tensor(rect, mask)
    assert tensor.shape == (1, 3, H, W)
    assert (tensor[0, :, :16, :16] == -1).all()
    expected = torch.from_numpy(np.asarray(rect, dtype=np.float32) / 255).permute(2, 0, 1)
    torch.testing.assert_close(tensor[0, :, 16:, 16:], expected[:, 16:, 16:])
    # numpy boolean masks work too
    bool_mask = np.zeros((H, W), bool)
    bool_mask[:16, :16] = True
    assert np.array_equal(np.asarray(make_condition("inpaint", rect, mask=bool_mask)), out)


def test_inpaint_uses_alpha_without_mask(rect):
    rgba = rect.convert("RGBA")
    alpha = Image.new("L", (W, H), 255)
    ImageDraw.Draw(alpha).rectangle((0, 0, 7, 7), fill=0)
    rgba.putalpha(alpha)
    out = np.asarray(make_condition("inpaint", rgba))
    assert (out[:8, :8] == 0).all() and (out[8:, 8:] > 0).all()


def test_inpaint_mask_errors(rect):
    with pytest.raises(MissingImageError) as info:
        make_condition("inpaint", rect)
    assert info.value.param == "mask"
    with pytest.raises(MaskSizeError) as info:
        make_condition("inpaint", rect, mask=Image.new("L", (W + 1, H)))
    assert info.value.param == "mask" and f"{W}x{H}" in str(info.value)


@pytest.mark.parametrize("ctype", ["depth", "pose"])
def test_model_types_need_a_model(rect, ctype):
    with pytest.raises(MissingConditionModelError) as info:
        make_condition(ctype, rect)
    assert info.value.param == "ctypes"
    assert "condition_models" in str(info.value) and ctype in str(info.value)


def test_model_types_use_the_given_callable(rect):
    calls = []

    def fake_depth(image):
        calls.append(image.size)
        return np.linspace(0.0, 1.0, 32 * 16, dtype=np.float32).reshape(16, 32)  # another size, floats

    out = make_condition("depth", rect, models={"depth": fake_depth, "pose": None})
    assert calls == [(W, H)]
    assert out.mode == "RGB" and out.size == (W, H)
    arr = grey(out)
    assert arr[:, 0].mean() < arr[:, -1].mean()  # the gradient survived the resize
    pose = make_condition("pose", rect, model=lambda im: Image.new("RGB", im.size, (255, 0, 0)))
    assert pose.getpixel((0, 0)) == (255, 0, 0)


def test_depth_model_from_a_local_transformers_folder(rect, tmp_path):
    from transformers import DPTConfig, DPTForDepthEstimation, DPTImageProcessor

    torch.manual_seed(0)
    config = DPTConfig(hidden_size=16, num_hidden_layers=4, num_attention_heads=2, intermediate_size=32,
                       image_size=32, patch_size=8, backbone_out_indices=[0, 1, 2, 3],
                       neck_hidden_sizes=[8, 8, 8, 8], fusion_hidden_size=8, head_hidden_size=8,
                       reassemble_factors=[4, 2, 1, 0.5])
    DPTForDepthEstimation(config).save_pretrained(tmp_path)
    DPTImageProcessor(size={"height": 32, "width": 32}, keep_aspect_ratio=False).save_pretrained(tmp_path)
    out = make_condition("depth", rect, models={"depth": str(tmp_path)})
    assert out.mode == "RGB" and out.size == (W, H)
    with pytest.raises(InvalidValueError) as info:
        make_condition("pose", rect, models={"pose": str(tmp_path)})
    assert info.value.param == "condition_models"


def test_bad_type_and_option(rect):
    with pytest.raises(InvalidValueError) as info:
        make_condition("sketchy", rect)
    assert info.value.param == "ctypes" and "soft-sobel" in str(info.value)
    with pytest.raises(UnknownParameterError) as info:
        make_condition("canny", rect, treshold=3)
    assert info.value.param == "treshold"
    with pytest.raises(MissingImageError) as info:
        make_condition("canny", None)
    assert info.value.param == "image"
    with pytest.raises(InvalidValueError):
        make_condition("soft-sobel", rect, ksize=4)


def test_registry_derives_the_type_lists_and_options():
    import inspect

    from multigen.pipes import spec
    from multigen.pipes.conditions import CONDITIONS, MODEL_FREE_TYPES, MODEL_TYPES, OPTIONS, reads_option

    assert tuple(CONDITIONS) == CONDITION_TYPES
    assert MODEL_FREE_TYPES == ("canny", "soft-sobel", "soft", "ip2p", "inpaint", "qr")
    assert MODEL_TYPES == ("depth", "pose")
    assert OPTIONS == ("low", "high", "ksize", "sigma", "mask", "cutoff", "model", "models")
    for name, cond in CONDITIONS.items():
        # the table's options are exactly the keywords its function takes after the image
        params = list(inspect.signature(cond.make).parameters)[1:]
        assert params == list(cond.options), name
    assert reads_option("inpaint", "mask") and not reads_option("canny", "mask") and not reads_option("x", "mask")
    # the torch-free parameter spec lists the same types for request validation
    assert spec.CONDITION_TYPES == CONDITION_TYPES


def test_one_set_of_options_serves_several_types(rect):
    mask = Image.new("L", (W, H), 0)
    opts = {"mask": mask, "low": 50, "high": 150, "models": {"depth": lambda im: np.zeros((H, W), np.float32)}}
    outs = {c: make_condition(c, rect, **opts) for c in ("canny", "inpaint", "depth")}
    assert np.array_equal(np.asarray(outs["canny"]), np.asarray(make_condition("canny", rect, low=50, high=150)))
    assert np.array_equal(np.asarray(outs["inpaint"]), np.asarray(rect))  # empty mask: nothing blacked out
    assert grey(outs["depth"]).max() == 0
