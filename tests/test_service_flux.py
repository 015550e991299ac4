"""A Flux model in models.yaml through ServiceThread with the real pipes (models/tiny-flux)."""
from __future__ import annotations

import io
import json
import shutil
import time
from pathlib import Path

import pytest
from PIL import Image

from multigen.service import ServiceThread
from multigen.service.config import load_config

pytestmark = pytest.mark.slow

MODELS_YAML = """\
base:
  flux:
    id: {flux}
  flux-declared:
    id: {copy}
    type: FLUX
pipes:
  prompt2image:
    name: "Prompt to Image"
    classname: Prompt2ImPipe
    need_imgs: False
    needs_cnet: False
  image2image:
    name: "Image to Image"
    classname: Im2ImPipe
    need_imgs: True
    needs_cnet: False
"""


@pytest.fixture()
def flux_config(tmp_path: Path, models_dir: Path) -> Path:
    cfg = tmp_path / "config"
    cfg.mkdir()
    # a second folder for the declared entry: image metadata names a model by its path's models.yaml name
    copy = shutil.copytree(models_dir / "tiny-flux", tmp_path / "flux-copy")
    (cfg / "models.yaml").write_text(MODELS_YAML.format(flux=models_dir / "tiny-flux", copy=copy))
    (cfg / "config.yaml").write_text(f"model_list: models.yaml\nmodel_dir: {models_dir}\n"
                                     f"data_dir: {tmp_path / 'data'}\noutput_dir: {tmp_path / 'out'}\n"
                                     f"logging_folder: {tmp_path / 'logs'}\ndevices: [cpu]\n")
    return cfg / "config.yaml"


@pytest.fixture()
def service(flux_config: Path):
    svc = ServiceThread(flux_config).start()
    yield svc
    svc.stop()
    svc.store.close()


def test_flux_native_size_is_read_from_the_folder(flux_config: Path):
    cfg = load_config(flux_config)
    assert cfg.models.base["flux"].native_size() == (1024, 1024)  # FluxPipeline's 128 latent pixels x 8
    assert cfg.models.base["flux-declared"].native_size() == (1024, 1024)


def test_flux_prompt2image_job_images_metadata_and_type(service):
    sid = service.open_session("alice", "flux", "prompt2image", "flux")["session_id"]
    assert service.get_session(sid)["model"] == "flux"
    out = service.queue_gen(sid, prompt="a red cat", count=2, width=64, height=64, steps=2)
    assert len(out["seeds"]) == 2
    assert service.wait_idle(300)
    job = service.get_job(out["job_id"])
    assert job["state"] == "succeeded", job["error"]
    assert len(job["images"]) == 2 and service.get_image_count(sid)["image_number"] == 2
    seeds = []
    for index, image in enumerate(job["images"]):
        with Image.open(service.get_image_pathname(sid, index)) as im:
            assert im.size == (64, 64)
        meta = service.image_metadata(image["id"])
        cfg = meta["pipe_config"]
        assert cfg["model_id"] == "flux" and cfg["model_type"] == "FLUX" and cfg["pipe"] == "Prompt2ImPipe"
        assert (cfg["width"], cfg["height"], cfg["steps"]) == (64, 64, 2)
        assert cfg["scheduler_class"] == "FlowMatchEulerDiscreteScheduler"
        seeds.append(meta["seed"])
        assert str(service.config.model_dir) not in json.dumps(meta)  # models by their names only
    assert seeds == out["seeds"]


def test_flux_image2image_job(service):
    sid = service.open_session("bob", "flux", "image2image", "flux-declared")["session_id"]
    src = Image.new("RGB", (80, 64), (200, 30, 30))
    out = service.queue_gen(sid, images=[src], prompt="a red wall", steps=2, strength=0.5)
    assert service.wait_idle(300)
    job = service.get_job(out["job_id"])
    assert job["state"] == "succeeded", job["error"]
    meta = service.image_metadata(job["images"][0]["id"])
    assert meta["pipe_config"]["pipe"] == "Im2ImPipe" and meta["pipe_config"]["model_type"] == "FLUX"
    assert meta["pipe_config"]["model_id"] == "flux-declared" and meta["pipe_config"]["strength"] == 0.5
    with Image.open(service.image_file(job["images"][0]["id"])) as im:
        assert im.size == (80, 64)


def test_flux_preview_while_running_and_cancel(service):
    sid = service.open_session("carol", "flux", "prompt2image", "flux")["session_id"]
    out = service.queue_gen(sid, prompt="x", width=64, height=64, steps=200, count=3)
    deadline = time.monotonic() + 120
    while service.get_job(out["job_id"])["progress"]["step"] < 2:
        assert time.monotonic() < deadline and service.get_job(out["job_id"])["state"] in ("queued", "running")
        time.sleep(0.05)
    preview = service.preview(out["job_id"])
    assert preview is not None and preview[:2] == b"\xff\xd8"
    with Image.open(io.BytesIO(preview)) as im:
        assert im.size == (8, 8)  # Flux's 16 latent channels, unpacked: 64 / 8
    service.cancel_job(out["job_id"])
    assert service.wait_idle(60)
    job = service.get_job(out["job_id"])
    assert job["state"] == "cancelled" and job["done"] == 0 and service.get_image_count(sid)["image_number"] == 0


def test_models_endpoint_gives_flux_its_native_size(service):
    from multigen.service.api import create_app

    app = create_app(service.config, service)
    app.config["TESTING"] = True
    try:
        body = app.test_client().get("/api/v1/models").get_json()
    finally:
        app.extensions["multigen.stopping"].set()
    models = {m["name"]: m for m in body["models"]}
    assert models["flux"]["native_size"] == [1024, 1024] and models["flux-declared"]["native_size"] == [1024, 1024]
    assert models["flux-declared"]["type"] == "FLUX"


def test_models_init_adds_flux_to_a_folder_built_before(tmp_path: Path, models_dir: Path, capsys):
    from multigen.service.cli import main

    old = shutil.copytree(models_dir, tmp_path / "models")
    shutil.rmtree(old / "tiny-flux")
    sd_weights = next((old / "tiny-sd" / "unet").glob("*.safetensors"))
    before = (sd_weights.read_bytes(), sd_weights.stat().st_mtime_ns)
    assert main(["models", "init", "--dir", str(old)]) == 0
    assert "added flux" in capsys.readouterr().out
    assert (old / "tiny-flux" / "model_index.json").is_file()
    assert (sd_weights.read_bytes(), sd_weights.stat().st_mtime_ns) == before  # the others left alone
    assert main(["models", "init", "--dir", str(old)]) == 0
    assert "nothing missing" in capsys.readouterr().out
