"""Im2ImPipe, MaskedIm2ImPipe and InpaintingPipe on tiny SD and SDXL."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from multigen.pipes import Im2ImPipe, InpaintingPipe, MaskedIm2ImPipe
from multigen.pipes.errors import InvalidValueError, MaskSizeError, MissingImageError, SizeError
from pipes_fixtures import (STEPS, SIZE, kind_base, noise_image, one_thread, pixels, sd_base,  # noqa: F401
                            sdxl_base, shapes_image)

PROMPT = {"prompt": "a watercolour landscape", "seed": 3}


def painted_copy(image: Image.Image, box=(20, 16, 44, 40), colour=(0, 255, 0)) -> Image.Image:
    arr = np.asarray(image).copy()
    arr[box[1]:box[3], box[0]:box[2]] = colour
    return Image.fromarray(arr)


def unchanged_region(size: tuple[int, int], box: tuple[int, int, int, int], blur: float) -> np.ndarray:
    """Where a pipe must leave the pixels exactly as they were: farther than a blur's reach from
    ``box`` (left, top, right, bottom, right and bottom excluded: the part the test painted or
    masked). PIL's Gaussian blur of radius r reaches about 2.5 r; 3 r + 2 leaves room. Computed from
    the test's own mask, not the pipe's."""
    margin = int(3 * blur + 2)
    width, height = size
    keep = np.ones((height, width), bool)
    left, top, right, bottom = box
    keep[max(0, top - margin):bottom + margin, max(0, left - margin):right + margin] = False
    return keep


@pytest.mark.slow
def test_im2im_deterministic_strength_matters(kind_base):
    src = noise_image(72, 64)
    pipe = Im2ImPipe(pipe=kind_base[1])
    pipe.setup(image=src, steps=4, strength=0.5)
    a, b = pipe.gen(PROMPT)[0], pipe.gen(PROMPT)[0]
    assert a.size == (72, 64) and np.array_equal(pixels(a), pixels(b))
    pipe.setup(image=src, steps=4, strength=1.0)
    assert not np.array_equal(pixels(pipe.gen(PROMPT)[0]), pixels(a))


@pytest.mark.slow
def test_im2im_scale_padding_and_path_input(kind_base, tmp_path):
    path = tmp_path / "in.png"
    noise_image(68, 60).save(path)
    pipe = Im2ImPipe(pipe=kind_base[1])
    pipe.setup(fimage=str(path), steps=STEPS, strength=0.5, scale=1.5)  # metafusion's alias
    out = pipe.gen(PROMPT)[0]
    assert out.size == (102, 90)  # not multiples of 8: padded for the model, cropped back
    assert pipe.get_config()["source_image"] == str(path)
    pipe.setup(image=str(path), steps=STEPS, strength=0.5, width=80, height=64)
    assert pipe.gen(PROMPT)[0].size == (80, 64)


@pytest.mark.slow
def test_im2im_converts_rgba_and_greyscale(sd_base):
    pipe = Im2ImPipe(pipe=sd_base)
    rgb = noise_image()
    for image in (rgb.convert("RGBA"), rgb.convert("L"), rgb.convert("P")):
        pipe.setup(image=image, steps=STEPS, strength=0.5)
        assert pipe.gen(PROMPT)[0].mode == "RGB"
    # an opaque RGBA input gives the same result as its RGB version
    pipe.setup(image=rgb.convert("RGBA"), steps=STEPS, strength=0.5)
    rgba_out = pipe.gen(PROMPT)[0]
    pipe.setup(image=rgb, steps=STEPS, strength=0.5)
    assert np.array_equal(pixels(rgba_out), pixels(pipe.gen(PROMPT)[0]))


@pytest.mark.slow
def test_im2im_bad_inputs(sd_base, tmp_path):
    pipe = Im2ImPipe(pipe=sd_base)
    with pytest.raises(MissingImageError) as e:
        pipe.setup(steps=STEPS)
    assert e.value.param == "image"
    with pytest.raises(MissingImageError):
        pipe.gen(PROMPT)  # gen without setup sets up with defaults: still no image
    with pytest.raises(MissingImageError):
        pipe.setup(image=tmp_path / "nope.png")
    with pytest.raises(SizeError) as e:
        pipe.setup(image=noise_image(), scale=0.1)
    assert e.value.param == "scale"
    with pytest.raises(SizeError):
        pipe.setup(image=noise_image(32, 32))
    with pytest.raises(InvalidValueError) as e:
        pipe.setup(image=noise_image(), strength=1.5)
    assert e.value.param == "strength"
    with pytest.raises(InvalidValueError) as e:
        pipe.setup(image=noise_image(), strength=0.1, steps=4)  # would run no step
    assert e.value.param == "strength"


@pytest.mark.slow
def test_masked_from_painted_copy_keeps_unmasked_pixels(kind_base):
    original = noise_image(72, 64, seed=1)
    box = (20, 16, 44, 40)
    painted = painted_copy(original, box)
    pipe = MaskedIm2ImPipe(pipe=kind_base[1])
    pipe.setup(original_image=original, image_painted=painted, steps=4, strength=0.8, blur=2, blur_compose=2)
    out = pipe.gen(PROMPT)[0]
    assert out.size == original.size
    keep = unchanged_region(original.size, box, blur=2)
    assert keep.mean() > 0.5  # most of the image is far from the painted box
    assert np.array_equal(pixels(out)[keep], pixels(original)[keep])  # there: exactly the original
    changed = np.any(pixels(out) != pixels(original), axis=-1)
    assert changed[20:36, 24:40].all()  # inside the painted box: redrawn
    assert np.array_equal(pixels(out), pixels(pipe.gen(PROMPT)[0]))


@pytest.mark.slow
def test_masked_explicit_mask_and_size_mismatch(kind_base):
    original = noise_image(seed=2)
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[8:24, 8:24] = 255
    pipe = MaskedIm2ImPipe(pipe=kind_base[1])
    pipe.setup(image=original, mask=Image.fromarray(mask), steps=STEPS, strength=1.0, blur=0, blur_compose=0)
    out = pipe.gen(PROMPT)[0]
    changed = np.any(pixels(out) != pixels(original), axis=-1)
    assert not changed[mask == 0].any() and changed[mask > 0].mean() > 0.5
    with pytest.raises(MaskSizeError) as e:
        pipe.setup(image=original, mask=Image.new("L", (SIZE, SIZE + 8)))
    assert e.value.param == "mask"
    with pytest.raises(MaskSizeError) as e:
        pipe.setup(image=original, image_painted=noise_image(SIZE + 8, SIZE))
    assert e.value.param == "image_painted"
    with pytest.raises(MissingImageError) as e:
        pipe.setup(image=original)
    assert e.value.param == "mask"


@pytest.mark.slow
def test_painted_colour_steers_the_result(sd_base):
    original = noise_image(seed=4)
    outs = []
    for colour in ((255, 0, 0), (0, 0, 255)):
        pipe = MaskedIm2ImPipe(pipe=sd_base)
        pipe.setup(image=original, image_painted=painted_copy(original, colour=colour), steps=4, strength=0.5)
        outs.append(pixels(pipe.gen(PROMPT)[0]))
    assert not np.array_equal(outs[0], outs[1])


@pytest.mark.slow
def test_inpainting_on_ordinary_checkpoint(kind_base):
    original = shapes_image(72, 64)
    box = (30, 20, 60, 50)
    mask = Image.new("L", original.size, 0)
    mask.paste(255, box)
    pipe = InpaintingPipe(pipe=kind_base[1])
    pipe.setup(image=original, mask=mask, steps=STEPS, blur=3)
    out = pipe.gen(PROMPT)[0]
    keep = unchanged_region(original.size, box, blur=3)
    assert keep.mean() > 0.35  # the left side and the top rows are far from the mask
    assert np.array_equal(pixels(out)[keep], pixels(original)[keep])  # there: exactly the original
    changed = np.any(pixels(out) != pixels(original), axis=-1)
    assert changed[20:50, 30:60].mean() > 0.9  # the masked part is redrawn
    assert np.array_equal(pixels(out), pixels(pipe.gen(PROMPT)[0]))
    with pytest.raises(MissingImageError) as e:
        pipe.setup(image=original)
    assert e.value.param == "mask"
    with pytest.raises(MaskSizeError):
        pipe.setup(image=original, mask=Image.new("L", (64, 64)))


@pytest.mark.slow
def test_im2im_positional_image_progress_and_cancel(sd_base, tmp_path):
    from multigen.pipes import Cancelled

    path = tmp_path / "in.png"
    noise_image().save(path)
    pipe = Im2ImPipe(pipe=sd_base)
    pipe.setup(str(path), strength=0.5, steps=6)  # metafusion's positional form
    steps = []
    pipe.gen({**PROMPT, "callback": lambda s, n, lat: steps.append((s, n))})
    assert steps == [(1, 3), (2, 3), (3, 3)]  # strength 0.5 of 6 steps
    with pytest.raises(Cancelled):
        pipe.gen({**PROMPT, "cancel": lambda: len(steps) >= 4, "callback": lambda s, n, lat: steps.append(s)})
    assert len(steps) == 4  # stopped at the first step after the cancel check turned True


@pytest.mark.slow
def test_vae_tiling_flag(sd_base):
    from multigen.pipes import Prompt2ImPipe

    pipe = Prompt2ImPipe(pipe=sd_base)
    pipe.setup(width=SIZE, height=SIZE, steps=STEPS, vae_tiling=True)
    pipe.gen(PROMPT)
    assert pipe.pipe.vae.use_tiling and pipe.get_config()["vae_tiling"] is True
    pipe.setup(width=SIZE, height=SIZE, steps=STEPS)
    pipe.gen(PROMPT)
    assert not pipe.pipe.vae.use_tiling and pipe.get_config()["vae_tiling"] is False
    pipe.setup(width=2048, height=2048, steps=STEPS)  # automatic: large images are tiled
    assert pipe.get_config()["vae_tiling"] is True


def test_undecodable_mask_files_and_bad_arrays_are_errors_naming_the_parameter(tmp_path):
    from multigen.pipes.images import load_image, load_mask

    bad = tmp_path / "mask.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(InvalidValueError) as err:
        load_mask(bad, "mask")
    assert err.value.param == "mask" and "mask.png" in str(err.value)
    for value in (np.zeros((4, 4, 2, 2), np.uint8), np.zeros((0, 0), np.uint8)):
        with pytest.raises(InvalidValueError) as err:
            load_mask(value, "mask")
        assert err.value.param == "mask"
        with pytest.raises(InvalidValueError) as err:
            load_image(value, "image")
        assert err.value.param == "image"


def test_infinite_or_nan_scale_is_an_error_naming_scale():
    from multigen.pipes.images import scale_image

    for bad in (float("inf"), float("nan")):
        with pytest.raises(InvalidValueError) as err:
            scale_image(noise_image(), bad)
        assert err.value.param == "scale"


@pytest.mark.slow
def test_a_failed_setup_leaves_the_previous_setup_in_place(sd_base):
    # the image is preprocessed before the scheduler name is checked: a setup that fails must not leave
    # the new image behind with the old parameters (gen would crop the new image to the old size)
    from multigen.pipes.errors import UnknownSchedulerError

    pipe = Im2ImPipe(pipe=sd_base)
    pipe.setup(image=noise_image(seed=1), steps=STEPS)
    want = pixels(pipe.gen(PROMPT)[0])
    config = pipe.get_config()
    with pytest.raises(UnknownSchedulerError):
        pipe.setup(image=noise_image(96, 80, seed=2), steps=STEPS, scheduler="no-such-sampler")
    assert np.array_equal(pixels(pipe.gen(PROMPT)[0]), want)
    assert pipe.get_config() == config
