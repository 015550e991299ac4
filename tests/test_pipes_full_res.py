"""Inpainting at full resolution (``full_res``): MaskedIm2ImPipe and InpaintingPipe generate only a box
around the mask at the generation size and paste it back, on tiny SD and tiny Flux."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from multigen.pipes import InpaintingPipe, MaskedIm2ImPipe, load_base
from multigen.pipes.errors import InvalidValueError, SizeError
from multigen.pipes.model_builder import FLUX_DIR
from pipes_fixtures import noise_image, one_thread, pixels, sd_base  # noqa: F401

pytestmark = pytest.mark.slow

PROMPT = {"prompt": "a red apple", "seed": 5}
#: a 24x24 mask in a 256x256 image: what full_res is for
BIG = 256
BOX = (116, 100, 140, 124)


@pytest.fixture(scope="module")
def flux_base(models_dir):
    base, _ = load_base(models_dir / FLUX_DIR)
    return base


@pytest.fixture(params=["SD", "FLUX"])
def base(request):
    """A tiny SD and a tiny Flux base pipeline (the sizes come from the family: multiples of 8 and of 16)."""
    return request.getfixturevalue("sd_base" if request.param == "SD" else "flux_base")


def box_mask(size: tuple[int, int], box: tuple[int, int, int, int]) -> Image.Image:
    mask = Image.new("L", size, 0)
    mask.paste(255, box)
    return mask


def far_from(size: tuple[int, int], box: tuple[int, int, int, int], blur: int) -> np.ndarray:
    """Pixels farther than the blur's reach (3 r + 2) from ``box``: they must stay the original's exactly."""
    margin = 3 * blur + 2
    keep = np.ones((size[1], size[0]), bool)
    keep[max(0, box[1] - margin):box[3] + margin, max(0, box[0] - margin):box[2] + margin] = False
    return keep


def contains(outer, inner) -> bool:
    return outer[0] <= inner[0] and outer[1] <= inner[1] and outer[2] >= inner[2] and outer[3] >= inner[3]


def padded_box(box, padding: int, size: tuple[int, int]) -> tuple[int, int, int, int]:
    return (max(0, box[0] - padding), max(0, box[1] - padding), min(size[0], box[2] + padding),
            min(size[1], box[3] + padding))


def check_box(crop, size: tuple[int, int], box, padding: int, gen: tuple[int, int]) -> None:
    """Inside the image, around the mask's box plus padding, with the generation's aspect (to a pixel)."""
    left, top, right, bottom = crop
    assert 0 <= left < right <= size[0] and 0 <= top < bottom <= size[1]
    assert contains(crop, padded_box(box, padding, size))
    assert abs((right - left) * gen[1] - (bottom - top) * gen[0]) <= max(gen), (crop, gen)


def test_full_res_generates_the_box_at_full_size_and_keeps_the_rest(base):
    original = noise_image(BIG, BIG, seed=7)
    mask = box_mask(original.size, BOX)
    pipe = MaskedIm2ImPipe(pipe=base)
    pipe.setup(image=original, mask=mask, full_res=True, full_res_padding=16, width=64, height=64, steps=4,
               strength=0.8, blur=2, blur_compose=2)
    assert pipe.output_size() == (BIG, BIG) and pipe.denoise_mask.size == (64, 64)
    out = pipe.gen(PROMPT)[0]
    assert out.size == original.size
    keep = far_from(original.size, BOX, blur=2)
    assert np.array_equal(pixels(out)[keep], pixels(original)[keep])
    cfg = pipe.get_config()
    assert (cfg["full_res"], cfg["full_res_padding"], cfg["width"], cfg["height"]) == (True, 16, 64, 64)
    check_box(cfg["full_res_box"], original.size, BOX, 16, (64, 64))
    assert list(pipe.full_res_box) == cfg["full_res_box"]
    inside = (slice(BOX[1], BOX[3]), slice(BOX[0], BOX[2]))
    assert np.abs(pixels(out)[inside] - pixels(original)[inside]).mean() > 5  # the box was redrawn
    assert np.array_equal(pixels(out), pixels(pipe.gen(PROMPT)[0]))  # a seed repeats its image
    # the same without full_res: the whole 256x256 image is generated, and the masked area comes out otherwise
    pipe.setup(image=original, mask=mask, steps=4, strength=0.8, blur=2, blur_compose=2)
    whole = pipe.gen(PROMPT)[0]
    assert whole.size == original.size and "full_res_box" not in pipe.get_config()
    assert pipe.get_config()["width"] == BIG and pipe.full_res_box is None
    assert not np.array_equal(pixels(whole)[inside], pixels(out)[inside])


def test_inpainting_full_res_keeps_unmasked_pixels_exactly(base):
    original = noise_image(BIG, 192, seed=3)
    box = (40, 60, 70, 84)
    pipe = InpaintingPipe(pipe=base)
    pipe.setup(image=original, mask=box_mask(original.size, box), full_res=True, width=96, height=64, steps=2,
               blur=0)
    out = pipe.gen(PROMPT)[0]
    assert out.size == original.size
    outside = np.asarray(box_mask(original.size, box)) == 0
    assert np.array_equal(pixels(out)[outside], pixels(original)[outside])
    inside = (slice(box[1], box[3]), slice(box[0], box[2]))
    assert np.abs(pixels(out)[inside] - pixels(original)[inside]).mean() > 5
    cfg = pipe.get_config()
    assert (cfg["width"], cfg["height"]) == (96, 64)
    check_box(cfg["full_res_box"], original.size, box, 32, (96, 64))  # the default padding: 32 px


def test_full_res_mask_on_the_border(base):
    original = noise_image(160, 128, seed=4)
    pipe = MaskedIm2ImPipe(pipe=base)
    for box in ((0, 0, 20, 16), (140, 100, 160, 128), (60, 0, 100, 128), (0, 50, 160, 70)):
        mask = box_mask(original.size, box)
        pipe.setup(image=original, mask=mask, full_res=True, full_res_padding=8, width=64, height=64, steps=2,
                   strength=0.8, blur=0, blur_compose=0)
        out = pipe.gen(PROMPT)[0]
        assert out.size == original.size
        outside = np.asarray(mask) == 0
        assert np.array_equal(pixels(out)[outside], pixels(original)[outside])
        crop = pipe.get_config()["full_res_box"]
        assert contains(crop, padded_box(box, 8, original.size))
        assert 0 <= crop[0] < crop[2] <= 160 and 0 <= crop[1] < crop[3] <= 128
        if box[2] - box[0] < 128:  # a square around it fits in the image: it has the generation's aspect
            check_box(crop, original.size, box, 8, (64, 64))
        else:  # a mask as wide as the image: no square holds it, the box is the whole image
            assert crop == [0, 0, 160, 128]


def test_full_res_default_size_is_the_native_area_at_the_box_aspect(base):
    """No width/height: the model's native area at the box's aspect, sides multiples of the family's size."""
    pipe = MaskedIm2ImPipe(pipe=base)
    native, multiple = pipe.family.native_size(base), pipe.family.size_multiple
    original = noise_image(BIG, BIG, seed=1)
    box = (100, 40, 124, 200)  # a tall mask
    pipe.setup(image=original, mask=box_mask(original.size, box), full_res=True, full_res_padding=4, steps=2,
               blur=0, blur_compose=0)
    width, height = pipe.params["width"], pipe.params["height"]
    assert width % multiple == 0 and height % multiple == 0 and height > width
    assert abs(width * height - native * native) <= 0.25 * native * native
    check_box(pipe.get_config()["full_res_box"], original.size, box, 4, (width, height))
    assert pipe.output_size() == original.size
    # one side given: the other follows the box's aspect
    pipe.setup(image=original, mask=box_mask(original.size, box), full_res=True, full_res_padding=4, steps=2,
               width=64, blur=0, blur_compose=0)
    assert pipe.params["width"] == 64 and pipe.params["height"] > 64 and pipe.params["height"] % multiple == 0


def test_full_res_bad_values_name_the_field(sd_base):
    original = noise_image(BIG, BIG)
    mask = box_mask(original.size, BOX)
    pipe = MaskedIm2ImPipe(pipe=sd_base)
    for bad in (-1, 1025, 2.5, "wide"):
        with pytest.raises(InvalidValueError) as e:
            pipe.setup(image=original, mask=mask, full_res=True, full_res_padding=bad)
        assert e.value.param == "full_res_padding" and "1024" in e.value.allowed
    for bad in ("yes", 2):
        with pytest.raises(InvalidValueError) as e:
            pipe.setup(image=original, mask=mask, full_res=bad)
        assert e.value.param == "full_res"
    with pytest.raises(SizeError) as e:  # the generation's size has the spec's range
        pipe.setup(image=original, mask=mask, full_res=True, width=32, height=64)
    assert e.value.param == "width"
    inpaint = InpaintingPipe(pipe=sd_base)
    with pytest.raises(InvalidValueError) as e:
        inpaint.setup(image=original, mask=mask, full_res=True, full_res_padding=-5)
    assert e.value.param == "full_res_padding"


def test_full_res_with_an_empty_mask_returns_the_original(sd_base):
    original = noise_image(96, 80, seed=2)
    pipe = MaskedIm2ImPipe(pipe=sd_base)
    pipe.setup(image=original, mask=Image.new("L", original.size, 0), full_res=True, width=64, height=64,
               steps=2, strength=0.8)
    out = pipe.gen(PROMPT)[0]
    assert np.array_equal(pixels(out), pixels(original))
    crop = pipe.get_config()["full_res_box"]
    assert 0 <= crop[0] < crop[2] <= 96 and 0 <= crop[1] < crop[3] <= 80


def test_full_res_with_a_painted_copy_keeps_the_size_and_the_rest(sd_base):
    """The mask from image_painted: the painted colours are cropped with the box and steer the result."""
    original = noise_image(192, 160, seed=6)
    box = (150, 20, 170, 44)
    arr = np.asarray(original).copy()
    arr[box[1]:box[3], box[0]:box[2]] = (0, 255, 0)
    pipe = MaskedIm2ImPipe(pipe=sd_base)
    pipe.setup(original_image=original, image_painted=Image.fromarray(arr), full_res=True, full_res_padding=12,
               width=64, height=96, steps=4, strength=0.5, blur=0, blur_compose=0)
    out = pipe.gen(PROMPT)[0]
    assert out.size == original.size
    outside = np.ones((160, 192), bool)
    outside[box[1]:box[3], box[0]:box[2]] = False
    assert np.array_equal(pixels(out)[outside], pixels(original)[outside])
    check_box(pipe.get_config()["full_res_box"], original.size, box, 12, (64, 96))
    inside = pixels(out)[box[1]:box[3], box[0]:box[2]]
    assert inside[..., 1].mean() > inside[..., 0].mean()  # strength 0.5 keeps some of the painted green
