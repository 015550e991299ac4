"""Single-file Flux.1 checkpoints: BFL's transformer layout (pipes/flux_layout.py), recognising the file,
loading it with its config folder, and the tiny single-file model (pipes/tiny/flux_single.py)."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from multigen.pipes import ModelType, Prompt2ImPipe, load_base
from multigen.pipes.errors import InvalidValueError, PipeError
from multigen.pipes.families import FLUX, SD, family_of_checkpoint
from multigen.pipes.flux_layout import COMFY_PREFIX, to_bfl, to_diffusers
from multigen.pipes.model_builder import FLUX_DIR, LATER_MODELS, SD_SINGLE_CONFIG, SD_SINGLE_FILE
from multigen.pipes.tiny import TINY_MODELS
from multigen.pipes.tiny.common import DEFAULT_SEED
from multigen.pipes.tiny.flux_single import FLUX_SINGLE_CONFIG, FLUX_SINGLE_FILE
from pipes_fixtures import one_thread, pixels  # noqa: F401

SIZE = 64
#: Flux.1's hidden width and its single blocks' MLP width, which diffusers' own conversion assumes
FLUX1_WIDTH, FLUX1_MLP = 3072, 4 * 3072


def _flux1_shaped_checkpoint(double: int = 2, single: int = 2) -> dict[str, torch.Tensor]:
    """A BFL-layout checkpoint with Flux.1's widths along the axis the conversion splits, and 1-2
    columns elsewhere (a few MB): what diffusers' convert_flux_transformer_checkpoint_to_diffusers reads."""
    gen = torch.Generator().manual_seed(0)

    def linear(name: str, rows: int = 6) -> dict[str, torch.Tensor]:
        return {f"{name}.weight": torch.randn(rows, 2, generator=gen), f"{name}.bias": torch.randn(rows, generator=gen)}

    ck: dict[str, torch.Tensor] = {}
    for name in ("time_in.in_layer", "time_in.out_layer", "vector_in.in_layer", "vector_in.out_layer",
                 "guidance_in.in_layer", "guidance_in.out_layer", "txt_in", "final_layer.linear",
                 "final_layer.adaLN_modulation.1"):
        ck.update(linear(name))
    ck.update(linear("img_in", FLUX1_WIDTH))
    for i in range(double):
        for name in ("img_mod.lin", "txt_mod.lin", "img_mlp.0", "img_mlp.2", "txt_mlp.0", "txt_mlp.2",
                     "img_attn.proj", "txt_attn.proj"):
            ck.update(linear(f"double_blocks.{i}.{name}"))
        for name in ("img_attn.qkv", "txt_attn.qkv"):
            ck.update(linear(f"double_blocks.{i}.{name}", 9))
        for name in ("img_attn.norm.query_norm", "img_attn.norm.key_norm", "txt_attn.norm.query_norm",
                     "txt_attn.norm.key_norm"):
            ck[f"double_blocks.{i}.{name}.scale"] = torch.randn(4, generator=gen)
    for i in range(single):
        for name in ("modulation.lin", "linear2"):
            ck.update(linear(f"single_blocks.{i}.{name}"))
        ck.update(linear(f"single_blocks.{i}.linear1", 3 * FLUX1_WIDTH + FLUX1_MLP))
        for name in ("norm.query_norm", "norm.key_norm"):
            ck[f"single_blocks.{i}.{name}.scale"] = torch.randn(4, generator=gen)
    return ck


# ---- the layout (no model) ----------------------------------------------------------------------------

def test_the_layout_is_diffusers_own_conversion_for_flux1_widths():
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    ck = _flux1_shaped_checkpoint()
    theirs = convert_flux_transformer_checkpoint_to_diffusers({COMFY_PREFIX + k: v for k, v in ck.items()})
    ours = to_diffusers({COMFY_PREFIX + k: v for k, v in ck.items()})
    assert set(ours) == set(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    back = to_bfl(ours)  # and the inverse gives the file back, tensor for tensor
    assert set(back) == set(ck) and all(torch.equal(back[k], ck[k]) for k in ck)


def test_a_schnell_file_has_no_guidance_and_a_cut_file_is_refused():
    ck = {k: v for k, v in _flux1_shaped_checkpoint(1, 1).items() if not k.startswith("guidance_in.")}
    assert not any(k.startswith("time_text_embed.guidance_embedder") for k in to_diffusers(ck))
    del ck["single_blocks.0.linear2.bias"]
    with pytest.raises(PipeError) as e:
        to_diffusers(ck)
    assert e.value.param == "model_id" and "single_blocks.0.linear2.bias" in str(e.value)
    with pytest.raises(PipeError) as e:
        to_diffusers({"first_stage_model.decoder.conv_in.weight": torch.zeros(1)})
    assert e.value.param == "model_id" and "img_in.weight" in str(e.value)


def test_the_tiny_single_file_model_is_built_after_tiny_flux():
    names = [m.name for m in TINY_MODELS]
    assert names.index("flux_single") == names.index("flux") + 1
    assert next(m for m in TINY_MODELS if m.name == "flux_single").folder == FLUX_SINGLE_CONFIG


# ---- the tiny single file (models/single) ------------------------------------------------------------

@pytest.fixture(scope="module")
def single_file(models_dir):
    return models_dir / FLUX_SINGLE_FILE


@pytest.fixture(scope="module")
def config_dir(models_dir):
    return models_dir / FLUX_SINGLE_CONFIG


@pytest.fixture(scope="module")
def folder_base(models_dir):
    base, _ = load_base(models_dir / FLUX_DIR, dtype="float32")
    return base


@pytest.fixture(scope="module")
def single_base(single_file, config_dir):
    base, kind = load_base(single_file, config_dir=config_dir, dtype="float32")
    assert kind is ModelType.FLUX
    return base


@pytest.mark.slow
def test_the_file_is_bfls_layout_and_recognised_as_flux(single_file, config_dir, tmp_path):
    names = set(load_file(str(single_file)))
    assert {"img_in.weight", "txt_in.weight", "double_blocks.0.img_attn.qkv.weight",
            "single_blocks.0.linear1.weight", "final_layer.adaLN_modulation.1.weight"} <= names
    assert not (config_dir / "transformer" / "diffusion_pytorch_model.safetensors").exists()
    assert (config_dir / "transformer" / "config.json").is_file()
    assert family_of_checkpoint(single_file) is FLUX
    # ComfyUI's prefix is SD's too: Flux is asked first, so the file is still Flux
    comfy = tmp_path / "comfy-flux.safetensors"
    save_file({COMFY_PREFIX + k: v for k, v in load_file(str(single_file)).items()}, str(comfy))
    assert family_of_checkpoint(comfy) is FLUX
    assert load_base(comfy, config_dir=config_dir, dtype="float32")[1] is ModelType.FLUX


@pytest.mark.slow
def test_it_loads_exactly_the_folder_models_transformer(single_base, folder_base):
    ours, theirs = single_base.transformer.state_dict(), folder_base.transformer.state_dict()
    assert set(ours) == set(theirs) and all(torch.equal(ours[k], theirs[k]) for k in theirs)
    assert type(single_base).__name__ == "FluxPipeline"
    assert single_base.transformer.dtype == torch.float32


@pytest.mark.slow
def test_it_makes_the_folder_models_image(single_file, config_dir, single_base, folder_base):
    pipes = [Prompt2ImPipe(single_file, config_dir=config_dir, device="cpu", dtype="float32"),
             Prompt2ImPipe(pipe=single_base), Prompt2ImPipe(pipe=folder_base)]
    images = []
    for pipe in pipes:
        pipe.setup(width=SIZE, height=SIZE, steps=2)
        images.append(pixels(pipe.gen({"prompt": "a (red:1.2) cat", "seed": 11})[0]))
    assert pipes[0].model_type is ModelType.FLUX and pipes[0].get_config()["model_id"] == str(single_file)
    assert np.array_equal(images[0], images[2]) and np.array_equal(images[1], images[2])


@pytest.mark.slow
def test_a_missing_or_wrong_config_dir_is_refused(single_file, models_dir, tmp_path):
    for config in (None, tmp_path / "nothing"):
        with pytest.raises(PipeError) as e:
            load_base(single_file, config_dir=config)
        assert e.value.param == "config_dir" and "config_dir" in str(e.value)
    with pytest.raises(InvalidValueError) as e:  # an SD config folder for a Flux file, and the other way round
        load_base(single_file, config_dir=models_dir / SD_SINGLE_CONFIG)
    assert e.value.param == "config_dir" and "SD" in str(e.value) and "FLUX" in e.value.allowed
    with pytest.raises(InvalidValueError) as e:
        load_base(models_dir / SD_SINGLE_FILE, config_dir=models_dir / FLUX_SINGLE_CONFIG)
    assert e.value.param == "config_dir" and SD.name in e.value.allowed
    # a schnell-shaped file (no guidance embedder) with a dev-shaped config folder
    schnell = tmp_path / "schnell.safetensors"
    save_file({k: v for k, v in load_file(str(single_file)).items() if not k.startswith("guidance_in.")}, str(schnell))
    with pytest.raises(PipeError) as e:
        load_base(schnell, config_dir=models_dir / FLUX_SINGLE_CONFIG)
    assert e.value.param == "config_dir" and "guidance_embedder" in str(e.value)
    # configs only (as SD's config folders are): Flux needs the other components' weights there
    bare = tmp_path / "configs-only"
    shutil.copytree(models_dir / FLUX_SINGLE_CONFIG, bare)
    for weights in bare.glob("text_encoder/*.safetensors"):
        weights.unlink()
    with pytest.raises(PipeError) as e:
        load_base(single_file, config_dir=bare)
    assert e.value.param == "config_dir" and "weights of every other component" in str(e.value)


@pytest.mark.slow
def test_the_sd_single_file_still_loads(models_dir):
    pipe, kind = load_base(models_dir / SD_SINGLE_FILE, config_dir=models_dir / SD_SINGLE_CONFIG, dtype="float32")
    assert kind is ModelType.SD and type(pipe).__name__ == "StableDiffusionPipeline"


@pytest.mark.slow
def test_the_builder_writes_the_same_file_from_tiny_flux_or_its_seed(models_dir, tmp_path):
    folder, builder = LATER_MODELS["flux_single"]  # what build_missing_models runs when the folder is missing
    assert folder == FLUX_SINGLE_CONFIG
    expected = load_file(str(models_dir / FLUX_SINGLE_FILE))
    from_folder, from_seed = tmp_path / "from-folder", tmp_path / "from-seed"
    shutil.copytree(models_dir / FLUX_DIR, from_folder / FLUX_DIR)
    for out in (from_folder, from_seed):
        assert builder(out, DEFAULT_SEED) == out / FLUX_SINGLE_FILE
        written = load_file(str(out / FLUX_SINGLE_FILE))
        assert written.keys() == expected.keys() and all(torch.equal(written[k], expected[k]) for k in expected)
        assert (out / FLUX_SINGLE_CONFIG / "model_index.json").is_file()
