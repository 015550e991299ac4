"""Image prompts (IP-Adapter): real pipes on tiny-sd and tiny-sdxl with the tiny adapters `models init` builds,
the service's queue-time checks, models.yaml's `ip_adapter:` section and the HTTP API end to end."""
from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from multigen.pipes.errors import InvalidValueError, MissingConditionModelError
from multigen.pipes.tiny.ip_adapter import ADAPTERS, IMAGE_ENCODER_DIR
# the browser test's fixtures (one server per module; skipped or failed as test_web_support's rule says)
from test_web_support import (By, browser, load_page, make_png, open_session as open_page_session,  # noqa: F401
                              server, set_value, wait as wait_page)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

STEPS = 4


def reference(seed: int = 0, size: tuple[int, int] = (64, 64)) -> Image.Image:
    return Image.fromarray((np.random.RandomState(seed).rand(size[1], size[0], 3) * 255).astype("uint8"))


@pytest.fixture(scope="module", params=["tiny-sd", "tiny-sdxl"])
def pipes(request, models_dir: Path):
    """A Prompt2ImPipe and an Im2ImPipe sharing one base (as the model cache shares it), with the model's adapter."""
    import torch

    from multigen.pipes import Im2ImPipe, Prompt2ImPipe
    from multigen.pipes.loading import load_base

    base, _ = load_base(models_dir / request.param, dtype=torch.float32)
    adapter = {"weights": str(models_dir / ADAPTERS[request.param]),
               "image_encoder": str(models_dir / IMAGE_ENCODER_DIR)}
    return Prompt2ImPipe(pipe=base, ip_adapter=adapter), Im2ImPipe(pipe=base, ip_adapter=adapter)


def run(pipe, callback=None, **params) -> np.ndarray:
    pipe.setup(width=64, height=64, steps=STEPS, **params)
    inputs = {"prompt": "a red house", "seed": 11}
    if callback is not None:
        inputs["callback"] = callback
    return np.asarray(pipe.gen(inputs), dtype=np.int16)


def test_image_prompts_change_the_result_weight_0_does_not_and_nothing_leaks(pipes):
    p2i, i2i = pipes
    before = run(p2i)
    prompted = run(p2i, image_prompts=[reference()])
    assert np.abs(prompted - before).max() > 10  # the reference image steers the result
    assert np.array_equal(run(p2i, image_prompts=[reference()], image_prompt_weights=0), before)
    assert np.array_equal(run(p2i, image_prompts=[reference()]), prompted)  # the same again
    # per-image weights: a second image of weight 0 changes nothing, one of weight 1 does
    two = [reference(), reference(1, (48, 80))]
    assert np.array_equal(run(p2i, image_prompts=two, image_prompt_weights=[1.0, 0.0]), prompted)
    assert not np.array_equal(run(p2i, image_prompts=two, image_prompt_weights=[1.0, 1.0]), prompted)
    # the adapter in the shared UNet: another pipe class, then a job without image prompts, as before
    source = reference(2)
    i2i_before = run(i2i, image=source, strength=0.8)
    assert not np.array_equal(run(i2i, image=source, strength=0.8, image_prompts=[reference()]), i2i_before)
    assert np.array_equal(run(p2i), before)
    assert np.array_equal(run(i2i, image=source, strength=0.8), i2i_before)
    assert "ip_adapter" not in p2i.get_config()


def test_stop_at_switches_the_image_off_mid_run(pipes):
    p2i, _ = pipes
    from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0

    full = run(p2i, image_prompts=[reference()], image_prompt_weights=0.8)
    scales: list[float] = []

    def record(step, steps, latents):  # the scale the next step runs with
        procs = [p for p in p2i.pipe.unet.attn_processors.values() if isinstance(p, IPAdapterAttnProcessor2_0)]
        scales.append(procs[0].scale[0])

    half = run(p2i, callback=record, image_prompts=[reference()], image_prompt_weights=0.8, image_prompt_stop_at=0.5)
    assert scales == [0.8, 0.0, 0.0, 0.0]  # steps 1 and 2 with the image, 3 and 4 without
    config = p2i.get_config()
    assert config["image_prompt_stop_at"] == [0.5] and config["image_prompt_weights"] == [0.8]
    assert config["image_prompts"] == ["<image 64x64>"] and config["ip_adapter"].endswith(".safetensors")
    assert not np.array_equal(half, full)
    assert not np.array_equal(half, run(p2i))


def test_bad_image_prompts_are_refused_by_the_pipe(pipes, models_dir: Path):
    p2i, _ = pipes
    from multigen.pipes import Prompt2ImPipe

    with pytest.raises(InvalidValueError) as e:
        p2i.setup(image_prompts=[reference(), reference(1)], image_prompt_weights=[1.0, 0.5, 0.2])
    assert e.value.param == "image_prompt_weights"
    with pytest.raises(InvalidValueError) as e:
        p2i.setup(image_prompts=[reference()] * 5)
    assert e.value.param == "image_prompts"
    with pytest.raises(MissingConditionModelError) as e:  # no adapter given to the pipe
        Prompt2ImPipe(pipe=p2i.base).setup(image_prompts=[reference()])
    assert e.value.param == "image_prompts" and "ip_adapter" in str(e.value)


def test_families_without_ip_adapter_refuse_image_prompts():
    from multigen.pipes.families import FAMILIES

    takes = {f.name for f in FAMILIES if f.image_prompts}
    assert takes == {"SD", "SDXL"}
    for fam in FAMILIES:
        if fam.name in takes:
            fam.check_params({"image_prompts": ["x"], "image_prompt_weights": 0.5})
            continue
        assert "image_prompts" in fam.refused_params
        fam.check_params({"image_prompt_weights": 1.0, "image_prompt_stop_at": 1.0})  # defaults ask for nothing
        with pytest.raises(InvalidValueError) as e:
            fam.check_params({"image_prompts": ["x"]})
        assert e.value.param == "image_prompts" and "SDXL, SD" in str(e.value)


def test_models_yaml_ip_adapter_section(tmp_path: Path, models_dir: Path):
    from multigen.service.errors import ConfigError
    from multigen.service.models_config import check_model_files, load_models

    repo_yaml = Path(__file__).resolve().parents[1] / "config" / "models.yaml"
    models = load_models(repo_yaml, models_dir)
    entry = models.ip_adapter["tiny-sd-ip-adapter"]
    assert entry.type == "SD" and entry.path == (models_dir / ADAPTERS["tiny-sd"]).resolve()
    assert entry.extra["image_encoder"] == (models_dir / IMAGE_ENCODER_DIR).resolve()
    assert entry.extra["models"] == ["tiny-sd", "tiny-sd-single"]
    check_model_files(models)
    text = repo_yaml.read_text()
    for old, new, key in (
            ("    image_encoder: ip-adapter/tiny-image-encoder\n    type: SDXL\n", "    type: SDXL\n",
             "ip_adapter.tiny-sdxl-ip-adapter.image_encoder"),
            ("models: [tiny-sd, tiny-sd-single]", "models: [tiny-sd, nowhere]", "ip_adapter.tiny-sd-ip-adapter.models"),
            ("    image_encoder: ip-adapter/tiny-image-encoder\n    type: SDXL\n",
             "    image_encoder: ip-adapter/tiny-image-encoder\n", "ip_adapter.tiny-sdxl-ip-adapter.type")):
        bad = tmp_path / "models.yaml"
        bad.write_text(text.replace(old, new, 1))
        with pytest.raises(ConfigError) as e:
            load_models(bad, models_dir)
        assert key in str(e.value)
    bad.write_text(text.replace("image_encoder: ip-adapter/tiny-image-encoder", "image_encoder: ip-adapter/none", 1))
    with pytest.raises(ConfigError) as e:
        check_model_files(load_models(bad, models_dir))
    assert "ip_adapter.tiny-sd-ip-adapter.image_encoder" in str(e.value)


def test_unconfigured_model_is_a_400_naming_what_to_configure(client):
    from helpers_service import open_session

    for model, words in (("demo", ("ip_adapter:", "type SD", "models.yaml")), ("tiny-flux", ("FLUX", "SD"))):
        sid = open_session(client, model=model)["id"]
        r = client.post(f"/api/v1/sessions/{sid}/jobs", json={"prompt": "x", "image_prompts": [data_url(reference())]})
        assert r.status_code == 400, r.get_json()
        error = r.get_json()["error"]
        assert error["field"] == "image_prompts", error
        assert all(w in error["message"] for w in words), error["message"]
        assert client.get(f"/api/v1/sessions/{sid}/jobs").get_json()["jobs"] == []  # nothing queued
    sid = open_session(client, model="tiny-sd")["id"]
    for body, field in (({"image_prompts": [data_url(reference())] * 5}, "image_prompts"),
                        ({"image_prompt_weights": 2.5}, "image_prompt_weights"),
                        ({"image_prompt_stop_at": 0}, "image_prompt_stop_at"),
                        ({"image_prompts": [data_url(reference())] * 2, "image_prompt_weights": [1, 1, 1]},
                         "image_prompt_weights")):
        r = client.post(f"/api/v1/sessions/{sid}/jobs", json={"prompt": "x", **body})
        assert r.status_code == 400 and r.get_json()["error"]["field"].startswith(field), r.get_json()


def test_openapi_and_models_list_the_parameters_with_their_ranges(client):
    doc = client.get("/api/v1/openapi.json").get_json()
    props = doc["components"]["schemas"]["JobCreate_prompt2image"]["properties"]
    assert props["image_prompts"]["anyOf"][0]["maxItems"] == 4
    weights = str(props["image_prompt_weights"])
    assert "'maximum': 2.0" in weights and "'minimum': 0.0" in weights
    stop = str(props["image_prompt_stop_at"])
    assert "'exclusiveMinimum': 0.0" in stop and "'maximum': 1.0" in stop
    models = client.get("/api/v1/models").get_json()
    text = str(models)
    assert "image_prompt_weights" in text and "image_prompt_stop_at" in text
    adapters = {m["name"]: m["ip_adapter"] for m in models["models"]}
    assert adapters["tiny-sd"] == "tiny-sd-ip-adapter" and adapters["tiny-sdxl"] == "tiny-sdxl-ip-adapter"
    assert adapters["demo"] is None and adapters["tiny-flux"] is None


def data_url(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def test_http_api_end_to_end_with_a_data_url_reference(config_file: Path):
    from multigen.service.api import create_app
    from multigen.service.config import load_config
    from multigen.service.serviceThread import ServiceThread

    cfg = load_config(config_file)
    svc = ServiceThread(cfg).start()
    app = create_app(cfg, svc)
    client = app.test_client()
    try:
        sid = client.post("/api/v1/sessions", json={"project": "ipa", "pipe": "prompt2image",
                                                    "model": "tiny-sd"}).get_json()["session"]["id"]
        common = {"prompt": "a boat", "steps": 2, "width": 64, "height": 64, "seeds": [3]}
        ref = data_url(reference())
        pixels = []
        for extra in ({}, {"image_prompts": [ref]}, {"image_prompts": [ref], "image_prompt_weights": [0]}, {}):
            r = client.post(f"/api/v1/sessions/{sid}/jobs", json={**common, **extra})
            assert r.status_code == 202, r.get_json()
            job = wait(client, r.get_json()["job"]["id"])
            assert job["state"] == "succeeded", job["error"]
            png = client.get(f"/api/v1/images/{job['images'][0]['id']}").data
            pixels.append(np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16))
            if extra:
                assert job["params"]["image_prompts"] == ["<image image_prompts_0.png>"], job["params"]
                meta = client.get(f"/api/v1/images/{job['images'][0]['id']}/metadata").get_json()
                used = meta.get("pipe_config") or meta.get("metadata", {}).get("pipe_config")
                assert used["ip_adapter"] == "tiny-sd-ip-adapter" and used["image_prompts"] == ["<image 64x64>"]
        assert np.abs(pixels[1] - pixels[0]).max() > 10
        assert np.array_equal(pixels[2], pixels[0])
        assert np.array_equal(pixels[3], pixels[0])  # the adapter of the jobs before does not leak into this one
    finally:
        app.extensions["multigen.stopping"].set()
        svc.stop()


def wait(client, job_id: str, timeout: float = 180) -> dict:
    from helpers_service import wait_job

    return wait_job(client, job_id, timeout=timeout)


def test_web_form_sends_image_prompts_with_weight_and_stop_at(server, browser, tmp_path: Path):
    """The job form: the reference images (uploaded as chosen) and, in Advanced, one weight and stop-at with the
    server's ranges; hidden for a family that refuses them."""
    d = browser
    load_page(d, server)
    sid = open_page_session(d, "web-ipa", "prompt2image")
    attr = lambda k, a: d.find_element(By.ID, k).get_attribute(a)  # noqa: E731
    assert d.find_element(By.ID, "image_prompts").is_displayed()
    assert (attr("image_prompt_weights", "min"), attr("image_prompt_weights", "max")) == ("0", "2")
    assert attr("image_prompt_stop_at", "max") == "1" and "exclusive" in attr("image_prompt_stop_at", "title")
    assert "at most 4" in attr("image_prompts", "title") or "IP-Adapter" in attr("image_prompts", "title")
    d.find_element(By.ID, "image_prompts").send_keys(str(make_png(tmp_path / "ref.png")))
    d.execute_script("document.getElementById('advanced').open = true")
    set_value(d, "prompt", "a reference")
    set_value(d, "steps", "2")
    set_value(d, "image_prompt_weights", "0.6")
    set_value(d, "image_prompt_stop_at", "0.5")
    wait_page(d, lambda d: d.find_element(By.ID, "image_prompts").get_attribute("data-upload-ids"), 20, "upload")
    d.find_element(By.ID, "queue-job").click()
    wait_page(d, lambda d: d.find_elements(By.CSS_SELECTOR, "#job-list li"), 20, "job card")
    job = server.api("GET", f"sessions/{sid}/jobs")["jobs"][0]
    assert job["params"]["image_prompts"] == ["<image image_prompts_0.png>"], job["params"]
    assert job["params"]["image_prompt_weights"] == 0.6 and job["params"]["image_prompt_stop_at"] == 0.5
    open_page_session(d, "web-ipa-flux", "prompt2image", model="tiny-flux")
    assert not d.find_element(By.ID, "image_prompts").is_displayed()
    assert d.find_element(By.CSS_SELECTOR, "[data-param=image_prompt_weights]").get_attribute("hidden") is not None
