"""The real ``webuiapi`` client (AUTOMATIC1111's Python client) against a real ``multigen serve`` with two
users: generation with LoRA tags, img2img with a mask, progress and interrupt (each user sees only their
own job), options switching the model, png-info, the listings, and a restart while a call waits.

One server for the module (starting one costs seconds); the restart test runs last and replaces it.
"""
from __future__ import annotations

import base64
import io
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests
import webuiapi
from PIL import Image

from conftest import CONFIG_DIR, ROOT
from multigen.service.client import MultigenClient
from test_e2e_api import Server, add_user

pytestmark = pytest.mark.slow

SMALL = {"steps": 2, "width": 64, "height": 64}
#: a job that runs for seconds on the CPU (tiny-sd at 64 px)
LONG = {"steps": 400, "width": 64, "height": 64, "batch_size": 2}


@pytest.fixture(scope="module")
def served(tmp_path_factory, models_dir: Path):
    """``{"config", "server", "tokens"}``: a server with users alice and bob (the restart test swaps it)."""
    cfg = tmp_path_factory.mktemp("a1111") / "config"
    cfg.mkdir()
    shutil.copy(CONFIG_DIR / "models.yaml", cfg / "models.yaml")
    (cfg / "config.yaml").write_text((CONFIG_DIR / "config.yaml").read_text().replace(
        "model_dir: ../models", f"model_dir: {models_dir}"))
    config_file = cfg / "config.yaml"
    tokens = {name: add_user(config_file, name) for name in ("alice", "bob")}
    state = {"config": config_file, "server": Server(config_file), "tokens": tokens}
    assert state["server"].url, "".join(state["server"].lines)
    yield state
    state["server"].stop()


def webui(served, user: str = "alice") -> webuiapi.WebUIApi:
    """webuiapi as its README sets it up, with ``--api-auth`` credentials (the user's token as password)."""
    return webuiapi.WebUIApi(baseurl=served["server"].url + "sdapi/v1", username=user,
                             password=served["tokens"][user], sampler="Euler a", steps=2)


def session_api(served, user: str = "alice") -> MultigenClient:
    return MultigenClient(served["server"].url, token=served["tokens"][user])


def test_txt2img_with_a_lora_tag_and_a_batch(served):
    api = webui(served)
    result = api.txt2img(prompt="a cat <lora:tiny-sd-lora:0.8>", negative_prompt="dog", seed=11, batch_size=2,
                         override_settings={"sd_model_checkpoint": "tiny-sd"}, **SMALL)
    assert len(result.images) == 2 and result.images[0].size == (64, 64)
    info = result.info
    assert info["all_seeds"] == [11, 12] and info["sd_model_name"] == "tiny-sd"
    assert len(info["infotexts"]) == 2 and "Sampler: Euler a" in info["infotexts"][0]
    assert "tiny-sd-lora" in result.images[0].info["parameters"]
    [session] = [s for s in session_api(served).list_sessions(project="a1111") if s["loras"]]
    assert session["loras"] == [{"name": "tiny-sd-lora", "weight": 0.8}]
    # png-info on an image it made
    png = api.png_info(result.images[1])
    assert png.info.startswith("a cat\n") and png.parameters["Seed"] == "12"


def test_img2img_with_a_mask(served):
    api = webui(served)
    image = Image.new("RGB", (64, 64), "red")
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    result = api.img2img(images=[image], mask_image=mask, inpainting_fill=1, denoising_strength=0.6, seed=3,
                         override_settings={"sd_model_checkpoint": "tiny-sd"}, **SMALL)
    assert len(result.images) == 1 and result.info["denoising_strength"] == 0.6
    assert result.images[0].getpixel((0, 0))[0] > 200  # outside the mask the image is kept
    pipes = {s["pipe"] for s in session_api(served).list_sessions(project="a1111")}
    assert "masked_image2image" in pipes


def test_listings_and_options_switch_the_model(served):
    api = webui(served)
    titles = api.util_get_model_names()
    assert any(t.startswith("tiny-sdxl [") for t in titles)
    assert "Euler a" in api.util_get_sampler_names() and "Karras" in {s["label"] for s in api.get_schedulers()}
    assert "tiny-sd-lora" in {x["name"] for x in api.get_loras()}
    api.set_options({"sd_model_checkpoint": "tiny-sdxl"})
    assert api.util_get_current_model().startswith("tiny-sdxl [")
    assert api.txt2img(prompt="x", seed=1, **SMALL).info["sd_model_name"] == "tiny-sdxl"
    assert webui(served, "bob").util_get_current_model().startswith("demo [")  # bob's default is his own
    api.set_options({"sd_model_checkpoint": "tiny-sd"})
    with pytest.raises(RuntimeError) as e:  # webuiapi raises RuntimeError(status, text) on an error
        api.txt2img(prompt="x", override_settings={"sd_model_checkpoint": "nope"}, **SMALL)
    assert e.value.args[0] == 422 and "sd_model_checkpoint" in e.value.args[1]


def _run_in_thread(call) -> tuple[threading.Thread, dict]:
    out: dict = {}

    def run():
        try:
            out["result"] = call()
        except Exception as e:  # noqa: BLE001 - the test looks at what the call raised
            out["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


def _wait_running(api: webuiapi.WebUIApi, timeout: float = 120) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        progress = api.get_progress()
        if progress["state"]["sampling_step"] > 0:
            return progress
        time.sleep(0.1)
    raise AssertionError(f"no job running: {progress}")


def test_progress_and_interrupt_are_per_user(served):
    alice, bob = webui(served), webui(served, "bob")
    thread, out = _run_in_thread(lambda: alice.txt2img(prompt="long", seed=5, **LONG))
    progress = _wait_running(alice)
    assert 0 <= progress["progress"] < 1 and progress["state"]["job_count"] == 1
    assert progress["current_image"] is None or Image.open(io.BytesIO(base64.b64decode(progress["current_image"])))
    assert bob.get_progress()["state"]["job_count"] == 0  # bob never sees alice's job
    bob.interrupt()
    time.sleep(0.5)
    assert thread.is_alive() and alice.get_progress()["state"]["job_count"] == 1  # bob's interrupt did nothing
    alice.interrupt()
    thread.join(120)
    assert not thread.is_alive() and "error" not in out, out
    assert len(out["result"].images) < 2  # what A1111 answers: the images made before the interrupt
    session = next(s for s in session_api(served).list_sessions(project="a1111") if s["job_counts"]["cancelled"])
    assert [j["state"] for j in session_api(served).list_jobs(session["id"])][-1] == "cancelled"
    assert alice.get_progress()["state"]["job_count"] == 0


def test_the_curl_example_of_the_docs_works(served, tmp_path):
    block = re.search(r"<!-- a1111-curl -->\s*```sh\n(.*?)```", (ROOT / "docs" / "clients.md").read_text(),
                      re.S).group(1)
    command = block.replace("http://127.0.0.1:8000/", served["server"].url)
    env = dict(os.environ, MULTIGEN_USER="alice", MULTIGEN_TOKEN=served["tokens"]["alice"],
               PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", command], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    image = Image.open(tmp_path / "out.png")
    assert image.size == (64, 64) and "Seed: 1" in image.info["parameters"]


def test_a_restart_while_a_call_waits_resumes_its_job(served):
    alice = webui(served)
    thread, out = _run_in_thread(lambda: alice.txt2img(prompt="survive", seed=7, **LONG))
    _wait_running(alice)
    assert served["server"].stop() == 0
    thread.join(60)
    # the waiting call fails: 503 (the server is stopping) or, past the drain, a closed connection
    assert "error" in out and isinstance(out["error"], (RuntimeError, requests.ConnectionError)), out
    served["server"] = Server(served["config"])
    assert served["server"].url, "".join(served["server"].lines)
    mg = session_api(served)
    jobs = [j for s in mg.list_sessions(project="a1111") for j in mg.list_jobs(s["id"]) if j["prompt"] == "survive"]
    assert len(jobs) == 1
    job = mg.wait_job(jobs[0]["id"], timeout=300)
    assert job["state"] == "succeeded" and [im["seed"] for im in job["images"]] == [7, 8]

