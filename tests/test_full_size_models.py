"""``models init --full-size`` writes FLUX.1-dev- and Qwen-Image-shaped random weights for GPU benchmarks.

The real sizes are checked on the meta device (no memory, no disk): parameter counts against the published
ones and the configs' key numbers. The writer itself (meta device, one shard at a time) runs with the tiny
sizes through the same full-size code path, and its folders load with diffusers and generate.
"""
from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors import safe_open

from multigen.pipes import model_builder as mb
from multigen.pipes.tiny import common
from multigen.pipes.tiny import flux as tflux
from multigen.pipes.tiny import qwen_image as tqwen

#: the tiny sizes with padded vocabularies: the full-size path with every option the real sizes use
SMALL_FLUX = dataclasses.replace(tflux.TINY_FLUX, clip_vocab=600, t5_vocab=300, vae_layers=2)
SMALL_QWEN = dataclasses.replace(tqwen.TINY_QWEN_IMAGE, text_vocab=1000, text_kv_heads=1, vae_res_blocks=2,
                                 vision_fullatt=(0, 1), vision_tokens_per_second=2)
SHARD = "200KB"  # small enough that the tiny transformers and encoders are written in several shards


def _count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _near(got: int, published: int) -> bool:
    return abs(got - published) <= 0.01 * published


@pytest.fixture(scope="module")
def full_flux() -> dict[str, Any]:
    tok, tok2 = tflux.flux_tokenizers(tflux.FULL_FLUX)
    with torch.device("meta"):
        models = tflux.flux_models(1234, tflux.FULL_FLUX, len(tok), len(tok2))
    return {"tokenizer": tok, "tokenizer_2": tok2, **models}


@pytest.fixture(scope="module")
def full_qwen() -> dict[str, Any]:
    tok = tqwen.make_qwen_tokenizer(tqwen.FULL_QWEN_IMAGE.text_vocab)
    with torch.device("meta"):
        models = tqwen.qwen_models(1234, tqwen.FULL_QWEN_IMAGE, tok)
    return {"tokenizer": tok, **models}


def test_full_flux_has_flux1_dev_sizes(full_flux: dict[str, Any]):
    t, vae = full_flux["transformer"], full_flux["vae"]
    te, te2 = full_flux["text_encoder"], full_flux["text_encoder_2"]
    # FLUX.1-dev's transformer index: total_size 23,802,816,640 bytes of bf16 = 11,901,408,320 (≈ 11.9 B)
    assert _near(_count(t), 11_901_408_320) and _count(t) == 11_901_408_320
    # T5 v1.1 XXL's encoder (FLUX.1-dev's text_encoder_2: 9,524,621,312 bytes of bf16) ≈ 4.76 B
    assert _near(_count(te2), 4_762_310_656) and _count(te2) == 4_762_310_656
    assert _count(te) == 123_060_480  # CLIP ViT-L/14's text model
    assert _count(vae) == 83_819_683  # FLUX.1's 16-channel VAE without quant convs
    c = t.config
    assert (c.num_layers, c.num_single_layers, c.num_attention_heads, c.attention_head_dim) == (19, 38, 24, 128)
    assert (c.joint_attention_dim, c.pooled_projection_dim, c.in_channels, c.patch_size) == (4096, 768, 64, 1)
    assert c.guidance_embeds and tuple(c.axes_dims_rope) == (16, 56, 56)
    v = vae.config
    assert (v.latent_channels, tuple(v.block_out_channels), v.layers_per_block, v.norm_num_groups) == \
        (16, (128, 256, 512, 512), 2, 32)
    assert (v.scaling_factor, v.shift_factor, v.use_quant_conv, v.use_post_quant_conv) == (0.3611, 0.1159, False, False)
    t5 = te2.config
    assert (t5.d_model, t5.d_ff, t5.d_kv, t5.num_layers, t5.num_heads, t5.relative_attention_num_buckets,
            t5.vocab_size, t5.feed_forward_proj) == (4096, 10240, 64, 24, 64, 32, 32128, "gated-gelu")
    assert (te.config.hidden_size, te.config.num_hidden_layers, te.config.vocab_size) == (768, 12, 49408)


def test_full_qwen_image_has_qwen_image_sizes(full_qwen: dict[str, Any]):
    t, vae, te = full_qwen["transformer"], full_qwen["vae"], full_qwen["text_encoder"]
    # Qwen-Image's transformer index: 40,860,802,176 bytes of bf16 = 20,430,401,088 (the "20 B" MMDiT)
    assert _near(_count(t), 20_430_401_088) and _count(t) == 20_430_401_088
    # Qwen2.5-VL-7B-Instruct (Qwen-Image's text_encoder: 16,584,333,312 bytes of bf16) ≈ 8.29 B
    assert _near(_count(te), 8_292_166_656) and _count(te) == 8_292_166_656
    assert _near(_count(vae), 127_000_000)  # Qwen-Image's vae: 254 MB of bf16
    c = t.config
    assert (c.num_layers, c.num_attention_heads, c.attention_head_dim, c.joint_attention_dim) == (60, 24, 128, 3584)
    assert (c.in_channels, c.out_channels, c.patch_size, c.guidance_embeds) == (64, 16, 2, False)
    assert tuple(c.axes_dims_rope) == (16, 56, 56)
    v = vae.config
    assert (v.base_dim, v.z_dim, list(v.dim_mult), v.num_res_blocks) == (96, 16, [1, 2, 4, 4], 2)
    text, vision = te.config.text_config, te.config.vision_config
    assert (text.hidden_size, text.intermediate_size, text.num_hidden_layers, text.num_attention_heads,
            text.num_key_value_heads, text.vocab_size) == (3584, 18944, 28, 28, 4, 152064)
    assert not te.config.tie_word_embeddings
    assert (vision.depth, vision.hidden_size, vision.intermediate_size, vision.num_heads, vision.out_hidden_size,
            list(vision.fullatt_block_indexes)) == (32, 1280, 3420, 16, 3584, [7, 15, 23, 31])


def test_padded_tokenizers_fill_the_embeddings_and_never_emit_fillers(full_flux: dict[str, Any],
                                                                      full_qwen: dict[str, Any]):
    clip, t5, qwen = full_flux["tokenizer"], full_flux["tokenizer_2"], full_qwen["tokenizer"]
    assert (len(clip), len(t5), len(qwen)) == (49408, 32128, 152064)
    # CLIP's specials stay the last two ids, as in CLIP's own vocabulary (the pooled output finds the eos)
    assert (clip.bos_token_id, clip.eos_token_id) == (49406, 49407) == (full_flux["text_encoder"].config.bos_token_id,
                                                                        full_flux["text_encoder"].config.eos_token_id)
    text = "a photo of <|unused5|> and <|unused17|>, a cat"
    fillers = {tok: set(tok.convert_tokens_to_ids(common.filler_tokens(0, 20, "test"))) for tok in (clip, t5, qwen)}
    for tok, ids in fillers.items():
        assert len(ids) == 20 and not ids & set(tok(text).input_ids), type(tok).__name__
    # unpadded: the tiny tokenizers keep their own length
    assert len(common.make_tokenizer()) == 514 and len(common.make_t5_tokenizer()) < 300
    with pytest.raises(ValueError, match="smaller than"):
        common.make_t5_tokenizer(vocab_size=10)


def _small_model() -> torch.nn.Module:
    with torch.device("meta"):
        return common.clip_text_encoder(32, 2, 4, 64, 600, False, 32)


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_meta_writer_draws_each_weight_from_the_seed_and_by_kind(tmp_path: Path):
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        common.write_meta_model(_small_model(), tmp_path / name, seed, 41, max_shard_size="40KB")
    a, b, c = (_files(tmp_path / n) for n in "abc")
    assert a == b, "the same seed writes byte-identical files"
    shards = sorted(name for name in a if name.endswith(".safetensors"))
    assert a.keys() == c.keys() and all(a[name] != c[name] for name in shards)
    index = json.loads(a["model.safetensors.index.json"])
    assert len(shards) > 1 and sorted(set(index["weight_map"].values())) == shards  # an index names the shards
    assert json.loads(a["config.json"])["dtype"] == "bfloat16"
    weights = {}
    for shard in sorted((tmp_path / "a").glob("*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            assert sum(f.get_tensor(k).numel() * 2 for k in f.keys()) <= 40_000  # one shard at a time, ≤ 40 KB
            weights.update({k: f.get_tensor(k) for k in f.keys()})
    assert all(t.dtype == torch.bfloat16 for t in weights.values())
    assert torch.equal(weights["final_layer_norm.weight"], torch.ones(32, dtype=torch.bfloat16))  # a norm's gain
    assert not weights["encoder.layers.0.mlp.fc1.bias"].any()  # biases start at zero
    fc1 = weights["encoder.layers.0.mlp.fc1.weight"].float()
    assert abs(fc1.std().item() - (3 * 32) ** -0.5) < 0.02  # torch's default Linear scale, 1/sqrt(3 fan_in)
    with pytest.raises(ValueError, match="meta device"):
        common.write_meta_model(common.clip_text_encoder(32, 1, 4, 64, 600, False, 32), tmp_path / "d", 1, 41)


def _tensors(folder: Path) -> dict[tuple[str, str], tuple[tuple[int, ...], str]]:
    out = {}
    for path in sorted(folder.rglob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            for key in f.keys():
                part = f.get_slice(key)
                out[(str(path.parent.relative_to(folder)), key)] = (tuple(part.get_shape()), part.get_dtype())
    return out


def _jsons(folder: Path) -> dict[str, Any]:
    return {str(p.relative_to(folder)): json.loads(p.read_text()) for p in sorted(folder.rglob("*.json"))}


@pytest.mark.parametrize("family", ["flux", "qwen_image"])
def test_full_size_writer_writes_what_save_pretrained_writes(tmp_path: Path, family: str):
    """Same files, configs, tokenizers, weight names, shapes and dtypes as the pipeline's save_pretrained."""
    if family == "flux":
        tflux.build_flux_full(tmp_path, 7, s=SMALL_FLUX, max_shard_size=SHARD)
        pipe, folder = tflux.build_flux(7, SMALL_FLUX), tflux.FLUX_DIR
    else:
        tqwen.build_qwen_image_full(tmp_path, 7, s=SMALL_QWEN, max_shard_size=SHARD)
        pipe, folder = tqwen.build_qwen_image(7, SMALL_QWEN), tqwen.QWEN_IMAGE_DIR
    for component in pipe.components.values():  # as the writer casts: no warnings about keeping fp32 modules
        if isinstance(component, torch.nn.Module):
            torch.nn.Module.to(component, dtype=torch.bfloat16)
    pipe.save_pretrained(tmp_path / "reference", max_shard_size=SHARD)
    ours, reference = tmp_path / folder, tmp_path / "reference"
    assert sorted(_files(ours)) == sorted(_files(reference))
    assert any(name.endswith(".safetensors.index.json") for name in _files(ours))  # sharded, as the real sizes are
    assert _tensors(ours) == _tensors(reference)
    assert _jsons(ours) == _jsons(reference)
    assert not (tmp_path / (folder + ".partial")).exists()


def _run(pipe: Any) -> np.ndarray:
    return pipe(prompt="a red circle on a blue background", num_inference_steps=2, width=64, height=64,
                generator=torch.Generator("cpu").manual_seed(7), output_type="np").images[0]


@pytest.mark.slow
def test_full_size_models_init_writes_loadable_folders(tmp_path: Path, monkeypatch):
    """``build_default_models(full_size=True)`` through the full-size path with the tiny sizes: the
    folders load with diffusers' ``from_pretrained`` and generate; the tiny extras beside them go."""
    from diffusers import FluxPipeline, QwenImagePipeline

    from multigen.pipes import load_base

    sd, sdxl = mb.build_sd, mb.build_sdxl  # SD/SDXL tiny: their full sizes are tested in test_models_init
    monkeypatch.setattr(mb, "build_sd", lambda seed, full_size: sd(seed, False))
    monkeypatch.setattr(mb, "build_sdxl", lambda seed, full_size: sdxl(seed, False))
    models = (dataclasses.replace(tflux.MODEL, full_build=functools.partial(
                  tflux.build_flux_full, s=SMALL_FLUX, max_shard_size=SHARD)),
              dataclasses.replace(tqwen.MODEL, full_build=functools.partial(
                  tqwen.build_qwen_image_full, s=SMALL_QWEN, max_shard_size=SHARD)))
    monkeypatch.setattr(mb, "TINY_MODELS", models)
    (tmp_path / "loras").mkdir()
    (tmp_path / tflux.FLUX_LORA).write_bytes(b"tiny")
    (tmp_path / tqwen.QWEN_IMAGE_EDIT_DIR).mkdir()
    labels: list[str] = []
    paths = mb.build_default_models(tmp_path, full_size=True, progress=labels.append)
    assert paths["flux"] == tmp_path / tflux.FLUX_DIR and paths["qwen_image"] == tmp_path / tqwen.QWEN_IMAGE_DIR
    for name in ("flux", "qwen_image"):
        assert f"{name} model (full size)" in labels
        assert any(label.startswith(f"{name} model (full size): transformer 1/") for label in labels)
    assert not (tmp_path / tflux.FLUX_LORA).exists() and not (tmp_path / tqwen.QWEN_IMAGE_EDIT_DIR).exists()
    for cls, name in ((FluxPipeline, "flux"), (QwenImagePipeline, "qwen_image")):
        pipe = cls.from_pretrained(paths[name], dtype=torch.float32)
        assert len(pipe.tokenizer) == pipe.text_encoder.get_input_embeddings().num_embeddings  # padded to it
        image = _run(pipe)
        assert image.shape == (64, 64, 3) and np.isfinite(image).all() and image.std() > 0
        _, model_type = load_base(paths[name], dtype="float32")  # the server's loader takes them as well
        assert str(model_type).upper().endswith(name.upper())


def test_cli_counts_the_full_size_models_and_not_their_shards(tmp_path: Path, monkeypatch, capsys):
    """``models init --full-size``: one bar step per part, a full-size model's shards shown, not counted."""
    import tqdm

    from multigen.service import cli

    bars: list[Any] = []

    class Bar:
        def __init__(self, total: int, **_: Any) -> None:
            self.total, self.n, self.labels = total, 0, []
            bars.append(self)

        def __enter__(self) -> "Bar":
            return self

        def __exit__(self, *_: Any) -> None:
            return None

        def update(self, n: int) -> None:
            self.n += n

        def set_postfix_str(self, label: str) -> None:
            self.labels.append((label, self.n))

    def fake_build(out: Path, seed: int, full_size: bool, progress: Any) -> dict[str, Path]:
        assert full_size
        for label in ("SD pipeline", "SDXL pipeline", "ControlNet", "LoRA files", "single-file checkpoint",
                      "flux model (full size)", "flux model (full size): transformer 1/3",
                      "flux model (full size): transformer 2/3", "qwen_image model (full size)",
                      "qwen_image model (full size): vae 1/1"):
            progress(label)
        return {"flux": out / tflux.FLUX_DIR}

    monkeypatch.setattr(tqdm, "tqdm", Bar)
    monkeypatch.setattr(mb, "build_default_models", fake_build)
    assert cli.main(["models", "init", "--dir", str(tmp_path), "--full-size"]) == 0
    (bar,) = bars
    full = [m.name for m in mb.TINY_MODELS if m.full_build is not None]
    assert full == ["flux", "qwen_image"] and bar.total == 5 + len(full)
    steps = dict(bar.labels)
    assert steps["flux model (full size)"] == 5 and steps["flux model (full size): transformer 2/3"] == 5
    assert steps["qwen_image model (full size): vae 1/1"] == 6 == bar.total - 1
    assert "flux: " in capsys.readouterr().out
