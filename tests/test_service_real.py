"""ServiceThread on the real pipes and the tiny default models: the whole path."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from multigen.service import ServiceThread
from multigen.service.cache import module_bytes
from multigen.service.devices import cpu_cores

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture()
def service(config_file):
    svc = ServiceThread(config_file).start()
    yield svc
    svc.stop()
    svc.store.close()


def _direct(model_dir: Path, seed: int, loras=(), **setup):
    """The same image made by calling the pipe directly in this thread, with the worker's thread count."""
    from multigen.pipes import Prompt2ImPipe

    old = torch.get_num_threads()
    torch.set_num_threads(cpu_cores())
    try:
        pipe = Prompt2ImPipe(str(model_dir / "tiny-sd"), device="cpu")
        pipe.set_loras(list(loras))
        pipe.setup(**setup)
        return pipe.gen({"prompt": "a red cube", "negative_prompt": "", "seed": seed})[0]
    finally:
        torch.set_num_threads(old)


def test_whole_path_matches_direct_pipe_and_loras_and_schedulers_do_not_leak(service, models_dir):
    with_lora = service.open_session("alice", "cubes", "prompt2image", "tiny-sd", [{"name": "tiny-sd-lora",
                                                                                    "weight": 0.8}])
    plain = service.open_session("alice", "cubes", "prompt2image", "tiny-sd")
    settings = dict(width=64, height=64, steps=2, guidance_scale=5.0)
    # the first job also uses another scheduler: neither it nor the LoRA may leak into the next job
    a = service.queue_gen(with_lora["session_id"], prompt="a red cube", seeds=[7, 8], scheduler="euler_a",
                          **settings)
    b = service.queue_gen(plain["session_id"], prompt="a red cube", seeds=[7], **settings)
    assert service.wait_idle(300)
    ja, jb = service.get_job(a["job_id"]), service.get_job(b["job_id"])
    assert ja["state"] == "succeeded" and jb["state"] == "succeeded", (ja["error"], jb["error"])
    png = Path(service.get_image_pathname(plain["session_id"], 0))
    assert png.name == "00000.png" and png.parent.parts[-3:] == ("alice", "cubes", plain["session_id"])
    got = np.asarray(Image.open(png).convert("RGB"))
    # the job after a LoRA job is pixel-identical to a direct call that never loaded the LoRA
    want = np.asarray(_direct(models_dir, 7, **settings))
    assert np.array_equal(got, want)
    lora_png = Path(service.get_image_pathname(with_lora["session_id"], 0))
    lora_img = np.asarray(Image.open(lora_png).convert("RGB"))
    assert not np.array_equal(lora_img, got)
    lora_path = str(models_dir / "loras" / "tiny-sd-lora.safetensors")
    assert np.array_equal(lora_img, np.asarray(_direct(models_dir, 7, loras=[(lora_path, 0.8)], scheduler="euler_a",
                                                       **settings)))
    with Image.open(png) as im:
        meta = json.loads(im.text["multigen"])
        assert "Seed: 7" in im.text["parameters"] and "Steps: 2" in im.text["parameters"]
    assert meta == json.loads(png.with_suffix(".json").read_text())
    assert meta["threads"] == cpu_cores() == meta["pipe_config"]["torch_threads"]
    assert meta["batch_size"] == 1 and meta["pipe_config"]["seed"] == 7 and meta["seed"] == 7
    # metadata is served to users: models by their names, never the server's paths
    lora_meta = json.loads(lora_png.with_suffix(".json").read_text())
    assert lora_meta["pipe_config"]["model_id"] == "tiny-sd" and lora_meta["pipe_config"]["loras"] == [["tiny-sd-lora", 0.8]]
    assert str(models_dir) not in json.dumps(lora_meta) and str(models_dir) not in json.dumps(meta)


def test_metadata_reproduces_the_image(service):
    """An image's metadata, with models.yaml for the names it gives, makes the same pixels again: the
    pipe class, model, LoRAs, every setup parameter, the expanded prompts, seed, dtype and threads."""
    from multigen.pipes.registry import pipe_class

    sid = service.open_session("frank", "repro", "prompt2image", "tiny-sd",
                               [{"name": "tiny-sd-lora", "weight": 0.6}])["session_id"]
    out = service.queue_gen(sid, prompt=["a", ["red", "blue"], "cube"], negative_prompt="blur", seeds=[4242],
                            width=64, height=72, steps=3, guidance_scale=6.0, scheduler="euler_a")
    assert service.wait_idle(300)
    job = service.get_job(out["job_id"])
    assert job["state"] == "succeeded", job["error"]
    meta = service.image_metadata(job["images"][0]["id"])
    written = np.asarray(Image.open(service.image_file(job["images"][0]["id"])).convert("RGB"))

    models = service.config.models  # names -> files, as a user's own models.yaml would give them
    old = torch.get_num_threads()
    torch.set_num_threads(meta["threads"])
    try:
        pipe = pipe_class(meta["pipe_config"]["pipe"])(str(models.base[meta["model"]].path), device=meta["device"],
                                                       dtype=meta["dtype"])
        pipe.set_loras([(str(models.lora[lora["name"]].path), lora["weight"]) for lora in meta["loras"]])
        pipe.setup(**meta["params"])
        inputs = {"prompt": meta["prompt"], "negative_prompt": meta["negative_prompt"], "seed": meta["seed"]}
        again = pipe.gen(inputs)[0]
        # the comparison tells: the same call without the LoRA the metadata names gives other pixels
        pipe.set_loras([])
        plain = pipe.gen(inputs)[0]
    finally:
        torch.set_num_threads(old)
    assert again.size == (meta["width"], meta["height"]) == (64, 72)
    assert np.array_equal(np.asarray(again.convert("RGB")), written)
    assert not np.array_equal(np.asarray(plain.convert("RGB")), written)


def test_three_pipe_classes_share_one_model(service):
    sessions = {p: service.open_session("bob", "share", p, "tiny-sd")["session_id"]
                for p in ("prompt2image", "image2image", "inpainting")}
    red = Image.new("RGB", (64, 64), (200, 20, 20))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    jobs = [service.queue_gen(sessions["prompt2image"], prompt="x", width=64, height=64, steps=2),
            service.queue_gen(sessions["image2image"], prompt="x", images=[red], strength=0.5, steps=4),
            service.queue_gen(sessions["inpainting"], prompt="x", images=[red, mask], steps=2)]
    assert service.wait_idle(300)
    for j in jobs:
        job = service.get_job(j["job_id"])
        assert job["state"] == "succeeded", job["error"]
    entries = service.cache.entries()
    assert len(entries) == 1 and entries[0]["pipes"] == ["Im2ImPipe", "InpaintingPipe", "Prompt2ImPipe"]
    entry = next(iter(service.cache._entries.values()))
    pipes = list(entry.pipes.values())
    assert all(p.pipe.unet is entry.base.unet for p in pipes)

    class All:  # every module of the three pipes together, shared tensors counted once
        components = {f"{i}-{k}": v for i, p in enumerate(pipes) for k, v in p.pipe.components.items()}

    assert module_bytes(All) <= 1.1 * module_bytes(entry.base)
    assert service.stats()["cache"]["loads"] == 1


def test_controlnet_pipes_through_the_service(service, models_dir):
    from PIL import ImageDraw

    square = Image.new("RGB", (64, 64), "white")
    ImageDraw.Draw(square).rectangle((16, 16, 48, 48), fill="black")
    jobs = []
    for pipe, extra in (("cimage2image", {"ctypes": ["canny"], "strength": 0.8}), ("cond2image", {"cscales": [0.7]})):
        sid = service.open_session("erin", "cn", pipe, "tiny-sd")["session_id"]
        jobs.append(service.queue_gen(sid, images=[square], prompt="a box", steps=2, width=64, height=64, **extra))
    assert service.wait_idle(300)
    for j in jobs:
        job = service.get_job(j["job_id"])
        assert job["state"] == "succeeded", job["error"]
        used = service.image_metadata(job["images"][0]["id"])["pipe_config"]
        assert used["controlnets"]
        text = json.dumps(used)
        assert str(models_dir) not in text and str(service.config.data_dir) not in text, used


def test_cancel_a_running_real_job(service):
    sid = service.open_session("carol", "long", "prompt2image", "tiny-sd")["session_id"]
    out = service.queue_gen(sid, prompt="x", width=64, height=64, steps=200, count=3)
    import time

    deadline = time.monotonic() + 120
    while service.get_job(out["job_id"])["progress"]["step"] < 2:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    preview = service.preview(out["job_id"])  # the first step always makes one (then one every 0.5 s)
    assert preview[:2] == b"\xff\xd8"
    with Image.open(io.BytesIO(preview)) as im:
        assert im.size == (8, 8)  # latent size: 64 / 8
    service.cancel_job(out["job_id"])
    assert service.wait_idle(60)
    job = service.get_job(out["job_id"])
    assert job["state"] == "cancelled" and job["done"] == 0 and service.get_image_count(sid)["image_number"] == 0


def test_bad_input_found_by_the_pipe_fails_the_job_only(service):
    from multigen.service.errors import InvalidInput

    sid = service.open_session("dave", "bad", "image2image", "tiny-sd")["session_id"]
    with pytest.raises(InvalidInput) as e:  # a name the pipe would refuse is refused when queued
        service.queue_gen(sid, prompt="x", images=[Image.new("RGB", (64, 64))], scheduler="NoSuchScheduler")
    assert e.value.field == "scheduler" and "euler" in e.value.message
    # only the pipe can tell that this input image, scaled 8x, is past the largest side (4096 px)
    bad = service.queue_gen(sid, prompt="x", images=[Image.new("RGB", (600, 600))], scale=8.0, steps=2)
    good = service.queue_gen(sid, prompt="x", images=[Image.new("RGB", (64, 64))], steps=2)
    assert service.wait_idle(300)
    err = service.get_job(bad["job_id"])["error"]
    assert err["type"] == "SizeError" and err["field"] == "scale" and "4096" in err["message"]
    assert service.get_job(good["job_id"])["state"] == "succeeded"
