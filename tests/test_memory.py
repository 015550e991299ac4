"""Memory options per model (models.yaml ``dtype``, ``quantize``, ``offload``) and a cache budget that
counts what it really holds: config checks, device refusals, torchao byte counts, the cache's refusal,
and int8 on the tiny models (slow)."""
from __future__ import annotations

import importlib.util
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from helpers_service import FakeBase, fake_pipe_factory, fake_service, open_fake_session, write_fake_config
from multigen.pipes import memory
from multigen.pipes.errors import InvalidValueError
from multigen.service.cache import ModelCache, ModelTooLarge, disk_bytes, module_bytes
from multigen.service.config import load_config, load_models
from multigen.service.errors import ConfigError

MiB = 2**20


def _models_yaml(tmp_path: Path, base: dict[str, Any], **sections: Any) -> Path:
    data = {"base": base, "pipes": {"prompt2image": {"classname": "Prompt2ImPipe"}}, **sections}
    path = tmp_path / "models.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


# ---- models.yaml --------------------------------------------------------------------------------------------
def test_memory_options_are_read_per_model_and_normalised(tmp_path):
    models = load_models(_models_yaml(tmp_path, {
        "a": {"id": "a", "type": "SD", "dtype": "BF16", "quantize": "INT8"},
        "b": {"id": "b", "type": "SD", "quantize": False, "offload": None},  # YAML `off`/`no`: none
        "c": {"id": "c", "type": "SD", "offload": "sequential", "dtype": "torch.float16"},
    }), tmp_path)
    a, b, c = models.base["a"], models.base["b"], models.base["c"]
    assert (a.dtype, a.quantize, a.offload) == ("bf16", "int8", "none")
    assert (b.dtype, b.quantize, b.offload) == (None, "none", "none")
    assert (c.dtype, c.quantize, c.offload) == ("float16", "none", "sequential")
    assert not a.extra and not c.extra  # the options are fields, not leftovers


@pytest.mark.parametrize("key,value,allowed", [
    ("quantize", "int4", "none, int8, fp8"),
    ("quantize", "in8", "none, int8, fp8"),  # a typo lists what is allowed
    ("offload", "cpu", "model, sequential"),
    ("offload", True, "model, sequential"),
    ("dtype", "fp64", "bfloat16"),
])
def test_unknown_values_name_the_model_field_and_list_the_allowed_ones(tmp_path, key, value, allowed):
    path = _models_yaml(tmp_path, {"m": {"id": "m", "type": "SD", key: value}})
    with pytest.raises(ConfigError) as e:
        load_models(path, tmp_path)
    msg = str(e.value)
    assert e.value.key == f"base.m.{key}" and str(path) in msg and repr(value) in msg and allowed in msg


def test_memory_options_on_a_lora_are_refused(tmp_path):
    path = _models_yaml(tmp_path, {"m": {"id": "m"}}, lora={"l": {"id": "l.safetensors", "quantize": "int8"}})
    with pytest.raises(ConfigError, match="lora.l.quantize: quantize applies to base models only"):
        load_models(path, tmp_path)


def _config_with(tmp_path: Path, devices: Any, **options: Any) -> Path:
    config = write_fake_config(tmp_path, devices=devices)
    models = yaml.safe_load((tmp_path / "models.yaml").read_text())
    models["base"]["m2"].update(options)
    (tmp_path / "models.yaml").write_text(yaml.safe_dump(models))
    return config


@pytest.mark.parametrize("options,field,words", [
    ({"quantize": "fp8"}, "base.m2.quantize", ["'fp8'", "compute capability 8.9", "cpu", "none or int8"]),
    ({"offload": "model"}, "base.m2.offload", ["'model'", "runs on the CPU", "set offload to none"]),
    ({"quantize": "int8", "offload": "sequential"}, "base.m2.offload", ["'sequential'"]),
])
def test_gpu_only_options_are_refused_at_start_on_a_cpu(tmp_path, options, field, words):
    config = _config_with(tmp_path, ["cpu"], **options)
    load_config(config, check_models_exist=False)  # `multigen models init` reads it without device checks
    with pytest.raises(ConfigError) as e:
        load_config(config, check_models_exist=False, check_devices=True)
    msg = str(e.value)
    assert e.value.key == field and "model 'm2'" in msg and "models.yaml" in msg, msg
    assert all(w in msg for w in words), msg


def test_int8_is_accepted_on_a_cpu(tmp_path):
    cfg = load_config(_config_with(tmp_path, ["cpu"], quantize="int8"), check_models_exist=False, check_devices=True)
    assert cfg.models.base["m2"].quantize == "int8"


# ---- the device checks ----------------------------------------------------------------------------------------
def _fake_gpu(monkeypatch, capability: tuple[int, int]) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: "Fake GPU")


def test_fp8_needs_compute_capability_8_9(monkeypatch):
    _fake_gpu(monkeypatch, (8, 0))
    with pytest.raises(InvalidValueError) as e:
        memory.check_memory_options("fp8", "none", "cuda:0", "big")
    assert e.value.param == "quantize" and e.value.allowed == "none, int8"
    assert "model 'big'" in str(e.value) and "compute capability 8.0" in str(e.value) and "Fake GPU" in str(e.value)
    _fake_gpu(monkeypatch, (9, 0))
    assert memory.check_memory_options("FP8", "model", "cuda:0", "big") == ("fp8", "model")
    assert memory.check_memory_options(None, "sequential", "cuda", "big") == ("none", "sequential")


def test_fp8_and_offload_are_refused_on_the_cpu_naming_model_and_field():
    with pytest.raises(InvalidValueError, match=r"model 'x': quantize 'fp8' needs a CUDA GPU.*runs on cpu") as e:
        memory.check_memory_options("fp8", "none", "cpu", "x")
    assert e.value.param == "quantize"
    with pytest.raises(InvalidValueError, match=r"model 'x': offload 'model' .* runs on the CPU") as e:
        memory.check_memory_options("none", "model", "cpu", "x")
    assert e.value.param == "offload" and e.value.allowed == "none"
    with pytest.raises(InvalidValueError, match="quantize 'int4' is not supported; allowed: none, int8, fp8"):
        memory.check_memory_options("int4", "none", "cpu", "x")


def test_quantize_without_torchao_says_what_is_missing(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torchao" else real(name, *a))
    with pytest.raises(InvalidValueError, match=r"model 'x': quantize 'int8' cannot run: the torchao package is "
                                                r"not installed \(pip install torchao==0.18.0\)") as e:
        memory.check_memory_options("int8", "none", "cpu", "x")
    assert e.value.param == "quantize"


# ---- real bytes ---------------------------------------------------------------------------------------------
def test_module_bytes_counts_torchao_tensors_by_their_int8_data_and_scales():
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.Linear(128, 32))
    plain = module_bytes(model)
    assert plain == (64 * 128 + 128 + 128 * 32 + 32) * 4
    quantize_(model, Int8WeightOnlyConfig())
    weight = model[0].weight
    assert memory.is_quantized(model) and type(weight).__name__ == "Int8Tensor"
    # the storage a torchao tensor shows is a placeholder the size of the fp32 weight: not what it holds
    assert weight.untyped_storage().nbytes() == 64 * 128 * 4
    parts = list(memory.leaf_tensors(weight))
    assert {p.dtype for p in parts} >= {torch.int8} and all(type(p) is torch.Tensor for p in parts)
    expected = sum(t.untyped_storage().nbytes() for m in model for w in (m.weight,)
                   for t in memory.leaf_tensors(w)) + (128 + 32) * 4
    assert module_bytes(model) == expected and module_bytes(model) < 0.4 * plain


def test_disk_estimate_of_offloaded_models_counts_what_goes_to_the_gpu(tmp_path):
    for sub, size in (("unet", 300), ("text_encoder", 100), ("vae", 50)):
        (tmp_path / "m" / sub).mkdir(parents=True)
        (tmp_path / "m" / sub / "w.safetensors").write_bytes(b"\0" * size)
    models = load_models(_models_yaml(tmp_path, {
        "full": {"id": "m"}, "model": {"id": "m", "offload": "model"}, "seq": {"id": "m", "offload": "sequential"},
    }), tmp_path)
    assert [disk_bytes(models.base[n]) for n in ("full", "model", "seq")] == [450, 300, 0]


# ---- the cache ----------------------------------------------------------------------------------------------
class SizedLoader:
    """A ``load_base`` stand-in: each model's measured size in MiB, and every call's arguments."""

    def __init__(self, sizes: dict[str, int]) -> None:
        self.sizes = sizes
        self.calls: list[dict[str, Any]] = []
        self.lock = threading.Lock()

    def __call__(self, path: str, **kwargs: Any) -> tuple[FakeBase, str]:
        name = Path(path).name
        with self.lock:
            self.calls.append({"model": name, **kwargs})
        return FakeBase(path, nbytes=self.sizes.get(name, 100) * MiB), "SD"


def _cache(tmp_path: Path, base: dict[str, Any], budget_mib: int, loader: SizedLoader) -> ModelCache:
    models = load_models(_models_yaml(tmp_path, base), tmp_path)
    return ModelCache(models.base, budget_mib * MiB, loader=loader, pipe_factory=fake_pipe_factory)


def test_cache_loads_with_each_models_dtype_and_memory_options(tmp_path):
    loader = SizedLoader({})
    cache = _cache(tmp_path, {"a": {"id": "a"}, "q": {"id": "q", "quantize": "int8", "dtype": "bf16"}}, 1000, loader)
    cache.get("a", "Prompt2ImPipe", "cpu", "float32")
    pipe = cache.get("q", "Prompt2ImPipe", "cpu", "float32")
    assert loader.calls[0] == {"model": "a", "model_type": None, "config_dir": None, "device": "cpu",
                               "dtype": "float32"}  # no memory options: a loader of before gets none
    assert loader.calls[1]["quantize"] == "int8" and "offload" not in loader.calls[1]
    assert loader.calls[1]["dtype"] is torch.bfloat16 and pipe.base.path.endswith("q")
    # the model's dtype is its key: another worker dtype finds the same entry
    cache.get("q", "Prompt2ImPipe", "cpu", "float16")
    assert len(loader.calls) == 2
    entries = {e["model"]: e for e in cache.entries()}
    assert entries["q"]["dtype"] == "bfloat16" and entries["q"]["quantize"] == "int8"
    assert entries["a"]["offload"] == "none" and entries["a"]["bytes"] == 100 * MiB


def test_cache_refuses_fp8_on_the_cpu_before_loading(tmp_path):
    loader = SizedLoader({})
    cache = _cache(tmp_path, {"f": {"id": "f", "quantize": "fp8"}}, 1000, loader)
    with pytest.raises(InvalidValueError, match="model 'f': quantize 'fp8' needs a CUDA GPU") as e:
        cache.get("f", "Prompt2ImPipe", "cpu", "float32")
    assert e.value.param == "quantize" and loader.calls == []


def test_a_model_that_does_not_fit_is_refused_naming_the_missing_gib(tmp_path):
    loader = SizedLoader({"big": 700, "small": 200, "other": 200, "third": 200})
    cache = _cache(tmp_path, {n: {"id": n} for n in ("big", "small", "other", "third")}, 500, loader)
    cache.get("small", "Prompt2ImPipe", "cpu", "float32")
    with pytest.raises(ModelTooLarge) as e:
        cache.get("big", "Prompt2ImPipe", "cpu", "float32")
    msg = str(e.value)
    assert "model 'big' needs 0.684 GiB on cpu" in msg and "budget there is 0.488 GiB" in msg
    assert "0.195 GiB missing" in msg and "no other model in use" in msg
    assert "raise cache.memory_budget_gb" in msg and "quantize: int8" in msg and "offload" not in msg.split("Fix:")[1]
    assert e.value.field == "model" and e.value.code == "model_too_large"
    assert cache.held("cpu") == {"small"}  # a refused model evicts nothing
    # with one model in use, what it holds is missing too, and said
    with cache.lease("small", "Prompt2ImPipe", "cpu", "float32"):
        cache.get("other", "Prompt2ImPipe", "cpu", "float32")  # fits beside it
        with cache.lease("other", "Prompt2ImPipe", "cpu", "float32"):
            with pytest.raises(ModelTooLarge, match=r"0.391 GiB of it held by models in use \(other, small\): "
                                                    r"0.0977 GiB missing"):
                cache.get("third", "Prompt2ImPipe", "cpu", "float32")
    cache.get("third", "Prompt2ImPipe", "cpu", "float32")  # once they are idle, the oldest goes
    assert cache.held("cpu") == {"other", "third"} and cache.used_bytes("cpu") <= 500 * MiB


def test_a_job_on_a_model_too_large_fails_with_the_message_for_its_user(tmp_path):
    with fake_service(tmp_path, cache={"memory_budget_gb": 0.05}) as svc:  # the fake models hold 100 MiB
        sid = open_fake_session(svc, model="m1")
        job = svc.queue_gen(sid, prompt="x", count=1)
        assert svc.wait_idle(20)
        error = svc.get_job(job["job_id"])["error"]
    assert error["type"] == "ModelTooLarge" and error["field"] == "model"
    assert "model 'm1' needs 0.0977 GiB" in error["message"] and "0.0477 GiB missing" in error["message"]


# ---- int8 on the tiny models (real pipes) -------------------------------------------------------------------
@pytest.mark.slow
def test_int8_flux_loads_quantized_generates_and_holds_fewer_bytes(models_dir):
    from multigen.pipes import Prompt2ImPipe, load_base

    plain, _ = load_base(models_dir / "tiny-flux", dtype="float32")
    base, _ = load_base(models_dir / "tiny-flux", dtype="float32", quantize="int8")
    fp = memory.footprint(base)
    assert fp.quantized == ("text_encoder_2", "transformer") and fp.quantize == "int8"  # T5 yes, CLIP no
    assert memory.is_quantized(base.transformer) and not memory.is_quantized(base.text_encoder)
    assert base.transformer.dtype is torch.float32  # the model's dtype stays
    assert module_bytes(base.transformer) < 0.5 * module_bytes(plain.transformer)
    assert fp.total_bytes == module_bytes(base) < module_bytes(plain) and fp.device_bytes == fp.total_bytes
    pipe = Prompt2ImPipe(pipe=base)
    pipe.setup(width=80, height=64, steps=2)
    image = pipe.gen({"prompt": "a red square", "seed": 3})[0]
    assert image.size == (80, 64)


@pytest.mark.slow
def test_the_cache_loads_int8_sd_through_load_base_and_budgets_its_real_size(tmp_path, models_dir):
    models = load_models(_models_yaml(tmp_path, {
        "plain": {"id": "tiny-sd", "type": "SD"}, "int8": {"id": "tiny-sd", "type": "SD", "quantize": "int8"},
        "single": {"id": "single/tiny-sd.safetensors", "config": "single/tiny-sd-config", "quantize": "int8"},
    }), models_dir)
    cache = ModelCache(models.base, 1024 * MiB)  # the real loader and pipe classes
    with cache.lease("int8", "Prompt2ImPipe", "cpu", torch.float32) as lease:
        assert memory.is_quantized(lease.entry.base.unet) and lease.entry.quantize == "int8"
        lease.pipe.setup(width=64, height=64, steps=2)
        assert lease.pipe.gen({"prompt": "x", "seed": 1})[0].size == (64, 64)
        lease.pipe.set_loras([(str(models_dir / "loras" / "tiny-sd-lora.safetensors"), 0.8)])  # peft's torchao layers
        lease.pipe.setup(width=64, height=64, steps=2)
        assert lease.pipe.gen({"prompt": "x", "seed": 1})[0].size == (64, 64)
        lease.pipe.set_loras([])
    cache.get("plain", "Prompt2ImPipe", "cpu", torch.float32)
    single = cache.get("single", "Im2ImPipe", "cpu", torch.float32)  # single files are quantized after loading
    assert memory.is_quantized(single.base.unet)
    sizes = {e["model"]: e["bytes"] for e in cache.entries()}
    assert sizes["int8"] < sizes["plain"] and sizes["single"] < sizes["plain"]
    assert cache.used_bytes("cpu") == sum(sizes.values())


@pytest.mark.slow
def test_model_offload_records_what_the_device_holds_at_once(models_dir):
    # offload is refused on the CPU; its mechanics (diffusers' hooks, from_pipe, the pipes' execution
    # device) are run here with the CPU standing in for the GPU, through the function load_base calls
    from multigen.pipes import Prompt2ImPipe, load_base

    base, _ = load_base(models_dir / "tiny-sd", dtype="float32")
    fp = memory.apply_memory_options(base, "none", "model", "cpu")
    assert fp.offload == "model" and fp.device_bytes == module_bytes(base.unet) < fp.total_bytes
    assert memory.footprint(base) is fp and memory.execution_device(base, base.unet) == torch.device("cpu")
    pipe = Prompt2ImPipe(pipe=base)
    pipe.setup(width=64, height=64, steps=2)
    assert pipe.gen({"prompt": "x", "seed": 1})[0].size == (64, 64)
