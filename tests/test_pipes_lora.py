"""LoRAs on shared base pipelines: change the output, switch per call, remove exactly."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file, save_file

from multigen.pipes import Im2ImPipe, Prompt2ImPipe
from multigen.pipes.errors import InvalidValueError, PipeError
from pipes_fixtures import (STEPS, SIZE, kind_base, lora_file, noise_image, one_thread, pixels,  # noqa: F401
                            sd_base, sdxl_base)

pytestmark = pytest.mark.slow  # every test here builds real pipes on the tiny models

PROMPT = {"prompt": "a castle", "seed": 11}


@pytest.fixture()
def pipe(kind_base):
    p = Prompt2ImPipe(pipe=kind_base[1])
    p.setup(width=SIZE, height=SIZE, steps=STEPS)
    yield p
    p.unload_loras()


def second_lora(models_dir: Path, kind: str, tmp_path: Path) -> Path:
    """Another LoRA file: the first one's up weights mirrored."""
    sd = load_file(str(lora_file(models_dir, kind)))
    out = tmp_path / f"other-{kind}.safetensors"
    save_file({k: (-v if "lora_up" in k else v).contiguous() for k, v in sd.items()}, str(out))
    return out


def img(p):
    return pixels(p.gen(PROMPT)[0])


def test_lora_changes_output_and_set_empty_restores_exactly(pipe, kind_base, models_dir):
    kind, base = kind_base
    plain = img(pipe)
    weights = {n: t.clone() for n, t in base.unet.state_dict().items()}
    pipe.set_loras([(lora_file(models_dir, kind), 1.0)])
    with_lora = img(pipe)
    assert not np.array_equal(plain, with_lora)
    pipe.set_loras([(lora_file(models_dir, kind), 0.4)])
    weaker = img(pipe)
    assert not np.array_equal(weaker, with_lora) and not np.array_equal(weaker, plain)
    pipe.set_loras([])
    assert np.array_equal(img(pipe), plain)
    pipe.set_loras([(lora_file(models_dir, kind), 1.0)])  # switched back on without reloading
    assert np.array_equal(img(pipe), with_lora)
    pipe.unload_loras()
    assert np.array_equal(img(pipe), plain)
    assert base.get_list_adapters() == {}
    after = base.unet.state_dict()
    assert set(after) == set(weights) and all(np.array_equal(after[n], weights[n]) for n in weights)


def test_two_loras_at_once_and_removing_one(pipe, kind_base, models_dir, tmp_path):
    kind, _ = kind_base
    first, second = lora_file(models_dir, kind), second_lora(models_dir, kind, tmp_path)
    pipe.set_loras([(first, 1.0)])
    only_first = img(pipe)
    pipe.set_loras([(first, 1.0), (second, 0.7)])
    both = img(pipe)
    assert not np.array_equal(both, only_first)
    assert pipe.get_config()["loras"] == [[str(first), 1.0], [str(second), 0.7]]
    pipe.unload_loras([second])
    assert np.array_equal(img(pipe), only_first)


def test_lora_state_does_not_leak_between_pipe_objects(kind_base, models_dir):
    kind, base = kind_base
    p2i = Prompt2ImPipe(pipe=base)
    p2i.setup(width=SIZE, height=SIZE, steps=STEPS)
    plain = img(p2i)
    i2i = Im2ImPipe(pipe=base)
    i2i.setup(image=noise_image(), steps=STEPS, strength=1.0)
    i2i_plain = pixels(i2i.gen(PROMPT)[0])
    i2i.set_loras([(lora_file(models_dir, kind), 1.0)])  # active in the shared modules now
    assert not np.array_equal(pixels(i2i.gen(PROMPT)[0]), i2i_plain)
    try:
        assert np.array_equal(img(p2i), plain)  # p2i asked for no LoRA, and gets none
        assert not np.array_equal(pixels(i2i.gen(PROMPT)[0]), i2i_plain)
    finally:
        i2i.unload_loras()


def test_bad_lora_entries(pipe, tmp_path):
    with pytest.raises(PipeError) as e:
        pipe.set_loras([(tmp_path / "missing.safetensors", 1.0)])
    assert e.value.param == "loras"
    with pytest.raises(InvalidValueError):
        pipe.set_loras([("x.safetensors", "strong")])


def test_a_failed_lora_load_does_not_leak_into_the_next_call(pipe, kind_base, models_dir, tmp_path):
    # set_loras([A, B, missing]) loads B (which activates B alone), then fails on the missing file;
    # the next set_loras([A]) must not take the recorded state "A active" at its word
    kind, base = kind_base
    a, b = lora_file(models_dir, kind), second_lora(models_dir, kind, tmp_path)
    pipe.set_loras([(a, 1.0)])
    with_a = img(pipe)
    with pytest.raises(PipeError) as err:
        pipe.set_loras([(a, 1.0), (b, 1.0), (tmp_path / "missing.safetensors", 1.0)])
    assert err.value.param == "loras"
    pipe.set_loras([(a, 1.0)])
    assert np.array_equal(img(pipe), with_a)
    # a pipe object whose own set is still [A] (another object's load failed) re-applies it in gen
    other = Prompt2ImPipe(pipe=base)
    other.setup(width=SIZE, height=SIZE, steps=STEPS)
    with pytest.raises(PipeError):
        other.set_loras([(b, 1.0), (tmp_path / "missing.safetensors", 1.0)])
    assert np.array_equal(img(pipe), with_a)


def test_a_corrupt_lora_file_is_a_pipe_error_naming_loras(pipe, tmp_path):
    bad = tmp_path / "corrupt.safetensors"
    bad.write_bytes(b"not a safetensors file" * 4)
    with pytest.raises(PipeError) as err:
        pipe.set_loras([(bad, 1.0)])
    assert err.value.param == "loras" and "corrupt.safetensors" in str(err.value)
