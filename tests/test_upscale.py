"""Upscale or vary, Fooocus' ``uov`` (issue 15, item 4), on ``Im2ImPipe``.

The image work without a model (tiles, blending, progress over tiles, sizes); the tiny ESRGAN through spandrel
without torchvision; real pipes on tiny SD and the demo model: vary gives the input's size at 0.5 / 0.85, upscale
1.5x and 2x the right sizes at 0.382, a large upscale runs in tiles (deterministic, every tile's steps on the
step callback, cancellable), upscale_fast runs no diffusion; the queue-time checks over HTTP (fake pipes) and
one real upscale job end to end.
"""
from __future__ import annotations

import base64
import io
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import multigen.pipes
from multigen.pipes import Im2ImPipe, load_base, upscale
from multigen.pipes import spec as specs
from multigen.pipes.errors import Cancelled, InvalidValueError, SizeError
from multigen.pipes.tiny.upscaler import FILE as ESRGAN_FILE
from helpers_service import open_session
# the browser test's fixtures (one server for this module, started only when it runs)
from test_web_support import browser, server  # noqa: F401
from pipes_fixtures import noise_image, one_thread, pixels, sd_base  # noqa: F401

DEMO = Path(multigen.pipes.__file__).parent / "demo" / "model"
PROMPT = {"prompt": "a red circle on a blue background", "seed": 5}


def shapes(size: int = 64) -> Image.Image:
    """A red disc on blue, as the demo model draws."""
    from PIL import ImageDraw

    image = Image.new("RGB", (size, size), (40, 90, 200))
    ImageDraw.Draw(image).ellipse((size // 4, size // 4, size * 3 // 4, size * 3 // 4), fill=(220, 40, 40))
    return image


# ---- the image work (no model) ------------------------------------------------------------------------------
def test_tile_plan_covers_the_image_with_overlapping_tiles_of_the_native_size():
    assert upscale.tile_plan((128, 128), native=64, multiple=8) is None  # 4x the native area: whole
    boxes = upscale.tile_plan((200, 136), native=64, multiple=8)
    assert boxes is not None and {(b[2] - b[0], b[3] - b[1]) for b in boxes} == {(64, 64)}
    covered = np.zeros((136, 200), bool)
    for left, top, right, bottom in boxes:
        covered[top:bottom, left:right] = True
    assert covered.all()
    xs = sorted({(b[0], b[2]) for b in boxes})
    assert xs[0][0] == 0 and xs[-1][1] == 200 and all(a[1] - b[0] >= 16 for a, b in zip(xs, xs[1:]))
    assert upscale.spans(50, 64, 16) == [(0, 50)]


def test_blending_feathers_the_overlap_no_hard_edge():
    blender = upscale.Blender((96, 32), band=32)
    blender.add(Image.new("RGB", (64, 32), (200, 0, 0)), (0, 0, 64, 32))
    blender.add(Image.new("RGB", (64, 32), (0, 0, 200)), (32, 0, 96, 32))
    row = pixels(blender.image())[10, :, 0].astype(int)
    assert row[0] == 200 and row[-1] == 0  # each tile alone where it is alone
    assert np.abs(np.diff(row)).max() <= 200 // 32 + 2  # a ramp over the band, no step
    alone = upscale.Blender((32, 32), band=8)
    alone.add(Image.new("RGB", (32, 32), (1, 2, 3)), (0, 0, 32, 32))  # edges of the image are not feathered
    assert (pixels(alone.image()) == (1, 2, 3)).all()


def test_progress_counts_the_steps_of_every_tile():
    seen = []
    progress = upscale.TileProgress(lambda step, steps, latents: seen.append((step, steps)), tiles=3)
    for _ in range(3):
        for step in (1, 2):
            progress(step, 2, None)
    assert seen == [(1, 6), (2, 6), (3, 6), (4, 6), (5, 6), (6, 6)]


def test_sizes_strengths_and_the_checks_of_the_parameters():
    assert upscale.output_size((64, 48), 1.5) == (96, 72)
    with pytest.raises(SizeError) as e:
        upscale.output_size((2048, 64), 2.5)
    assert e.value.param == "upscale_factor" and "4096" in str(e.value)
    merged = {"uov": "vary_strong", "strength": 0.75}
    upscale.apply_uov_strength(merged, {})
    assert merged["strength"] == 0.85
    merged = {"uov": "upscale", "strength": 0.3}
    upscale.apply_uov_strength(merged, {"strength": 0.3})  # a strength given wins
    assert merged["strength"] == 0.3
    with pytest.raises(InvalidValueError) as e:
        upscale.check_uov({"uov": "upscale", "width": 512})
    assert e.value.param == "width" and "upscale_factor" in str(e.value)
    upscale.check_uov({"uov": "vary_subtle", "width": 512})  # vary sizes as image to image does
    with pytest.raises(InvalidValueError) as e:
        upscale.check_uov({"upscaler": "nope"}, upscalers={"tiny-esrgan": "x"})
    assert e.value.param == "upscaler" and "tiny-esrgan, lanczos" in str(e.value)
    assert upscale.upscaler_path(None, {}) == ("lanczos", None)
    assert upscale.upscaler_path(None, {"a": "/a.pth", "b": "/b.pth"}) == ("a", "/a.pth")
    assert upscale.upscaler_path("lanczos", {"a": "/a.pth"}) == ("lanczos", None)
    assert {"uov", "upscale_factor", "upscaler"} <= set(specs.PIPE_SPECS["Im2ImPipe"].names)


# ---- the upscaler model through spandrel -----------------------------------------------------------------------
@pytest.mark.slow
def test_tiny_esrgan_loads_through_spandrel_without_torchvision(models_dir: Path):
    model = upscale.load_upscaler(models_dir / ESRGAN_FILE)
    assert model.architecture.name == "ESRGAN" and model.scale == 4
    assert "torchvision" not in sys.modules  # the stand-in is gone after the import
    image = shapes(40)
    out = upscale.run_model(model, image)
    assert out.size == (160, 160)
    # an identity path plus noise: nearest-neighbour x4, roughly
    assert np.abs(pixels(out.resize((40, 40), Image.NEAREST)).astype(int) - pixels(image)).mean() < 30
    sized = upscale.upscale_image(image, (60, 60), str(models_dir / ESRGAN_FILE))
    lanczos = image.resize((60, 60), Image.LANCZOS)
    assert sized.size == (60, 60) and np.abs(pixels(sized).astype(int) - pixels(lanczos)).max() > 10


# ---- real pipes ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sd_pipe(sd_base, models_dir: Path):
    return Im2ImPipe(pipe=sd_base, upscalers={"tiny-esrgan": models_dir / ESRGAN_FILE})


@pytest.mark.slow
def test_vary_keeps_the_size_at_fooocus_strengths_and_subtle_differs_from_strong(sd_pipe):
    image = noise_image(80, 64, seed=3)
    out = {}
    for mode, strength in (("vary_subtle", 0.5), ("vary_strong", 0.85)):
        sd_pipe.setup(image=image, steps=4, uov=mode)
        assert sd_pipe.params["strength"] == strength and sd_pipe.get_config()["uov"] == mode
        out[mode] = sd_pipe.gen(PROMPT)[0]
        assert out[mode].size == (80, 64)
    assert np.abs(pixels(out["vary_subtle"]).astype(int) - pixels(out["vary_strong"])).max() > 10
    sd_pipe.setup(image=image, steps=4, uov="vary_strong", strength=0.3)  # a strength given wins
    assert sd_pipe.params["strength"] == 0.3


@pytest.mark.slow
def test_upscale_gives_the_factor_times_the_input_at_0_382(sd_pipe):
    image = noise_image(64, 64, seed=4)
    for factor, side in ((1.5, 96), (2, 128)):
        steps = []
        sd_pipe.setup(image=image, steps=4, uov="upscale", upscale_factor=factor)
        out = sd_pipe.gen({**PROMPT, "callback": lambda s, n, latents: steps.append((s, n))})[0]
        assert out.size == (side, side)
        config = sd_pipe.get_config()
        assert config["strength"] == upscale.UPSCALE_STRENGTH and config["upscaler"] == "tiny-esrgan"
        assert (config["width"], config["height"]) == (side, side)
        assert steps == [(1, 1)]  # int(4 x 0.382): one step, the whole image (below the comfortable size)
    sd_pipe.setup(image=image, steps=4, uov="upscale", width=512)  # a model's default size is not used
    assert sd_pipe.output_size() == (128, 128)
    with pytest.raises(InvalidValueError) as e:
        sd_pipe.setup(image=image, steps=4, uov="upscale", scale=2)
    assert e.value.param == "scale"
    with pytest.raises(InvalidValueError) as e:
        sd_pipe.setup(image=image, steps=2, uov="upscale")  # 2 x 0.382 runs no step
    assert e.value.param == "strength" and "uov upscale" in str(e.value)
    with pytest.raises(InvalidValueError) as e:
        sd_pipe.setup(image=image, uov="upscale", upscaler="nope")
    assert e.value.param == "upscaler"


@pytest.mark.slow
def test_upscale_fast_runs_no_diffusion_and_uses_the_upscaler_model(sd_pipe, models_dir: Path):
    image = shapes(48)
    calls = []
    sd_pipe.setup(image=image, uov="upscale_fast", upscale_factor=2)
    out = sd_pipe.gen({**PROMPT, "callback": lambda *a: calls.append(a)})[0]
    assert calls == [] and out.size == (96, 96)
    assert np.array_equal(pixels(out), pixels(upscale.upscale_image(image, (96, 96), str(models_dir / ESRGAN_FILE))))
    lanczos = image.resize((96, 96), Image.LANCZOS)
    assert np.abs(pixels(out).astype(int) - pixels(lanczos)).max() > 10
    sd_pipe.setup(image=image, uov="upscale_fast", upscaler="lanczos", upscale_factor=2)
    assert np.array_equal(pixels(sd_pipe.gen(PROMPT)[0]), pixels(lanczos))
    assert sd_pipe.get_config()["seed"] == PROMPT["seed"]
    with pytest.raises(Cancelled):
        sd_pipe.gen({**PROMPT, "cancel": lambda: True})


@pytest.mark.slow
def test_large_upscale_runs_in_tiles_deterministic_with_progress_and_cancel_and_demo_varies():
    base, _ = load_base(DEMO, dtype="float32")
    pipe = Im2ImPipe(pipe=base)
    pipe.setup(image=shapes(72), steps=4, uov="upscale", upscale_factor=4, upscaler="lanczos")
    tiles = upscale.tile_plan((288, 288), 128, 8)
    assert tiles is not None and len(tiles) == 9
    steps = []
    first = pipe.gen({**PROMPT, "callback": lambda s, n, latents: steps.append((s, n, latents.shape[-1]))})[0]
    assert first.size == (288, 288)
    assert [s[:2] for s in steps] == [(i, 9) for i in range(1, 10)]  # one step per tile, counted over all
    assert {s[2] for s in steps} == {16}  # a tile's latents (128 px)
    again = pipe.gen(PROMPT)[0]
    assert np.array_equal(pixels(first), pixels(again))
    left = pixels(first)[:, :100].astype(int)
    assert np.abs(left - pixels(shapes(72).resize((288, 288), Image.LANCZOS))[:, :100]).mean() < 60  # redrawn lightly
    calls = []
    with pytest.raises(Cancelled):
        pipe.gen({**PROMPT, "callback": lambda *a: calls.append(a), "cancel": lambda: len(calls) >= 4})
    assert len(calls) == 4  # stopped in the fifth tile
    # vary on the demo model (the docs' grid): its own size, redrawn near the input
    pipe.setup(image=shapes(128), steps=4, uov="vary_subtle")
    varied = pipe.gen(PROMPT)[0]
    assert varied.size == (128, 128) and 0 < np.abs(pixels(varied).astype(int) - pixels(shapes(128))).mean() < 60


# ---- the service -------------------------------------------------------------------------------------------
def data_url(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@pytest.mark.parametrize("body, field", [
    ({"uov": "upscale", "upscaler": "nope"}, "upscaler"),
    ({"uov": "upscale", "upscale_factor": 4.5}, "upscale_factor"),
    ({"uov": "upscale", "upscale_factor": 1}, "upscale_factor"),
    ({"uov": "upscale_fast", "width": 256}, "width"),
    ({"uov": "upscale", "scale": 2}, "scale"),
    ({"uov": "sharpen"}, "uov"),
])
def test_http_refuses_bad_uov_values_before_queueing(client, body, field):
    s = open_session(client, pipe="image2image")
    r = client.post(f"/api/v1/sessions/{s['id']}/jobs", json={"prompt": "x", "images": [data_url(shapes())], **body})
    assert r.status_code == 400, r.get_json()
    error = r.get_json()["error"]
    assert error["field"] == field, error
    assert "upscaler" not in body or "tiny-esrgan" in error["message"]


LIMITS = {"max_count: 100": "max_count: 100\n  max_width: 200\n  max_height: 160",
          "max_megapixel_steps_per_job: 20000": "max_megapixel_steps_per_job: 1"}


def test_an_upscale_past_the_config_limits_is_refused_when_queued_and_charged_at_its_output_size(make_api):
    api = make_api(**LIMITS)
    client = api.client()
    s = open_session(client, pipe="image2image")

    def post(**body):
        r = client.post(f"/api/v1/sessions/{s['id']}/jobs", json={"prompt": "x", "images": [data_url(shapes())],
                                                                  "uov": "upscale", **body})
        return r.status_code, r.get_json()

    status, body = post(upscale_factor=4, steps=5)  # 64 px x 4 = 256 > limits.max_width 200
    assert status == 400 and body["error"]["field"] == "upscale_factor", body
    assert "limits.max_width" in body["error"]["message"] and "256x256" in body["error"]["message"]
    status, body = post(upscale_factor=3, steps=5)  # 192 wide fits, but 192 tall > limits.max_height 160
    assert status == 400 and body["error"]["field"] == "upscale_factor", body
    assert "limits.max_height" in body["error"]["message"] and "up to 2.5" in body["error"]["message"]
    status, body = post(upscale_factor=2.5, steps=20)  # 160x160 x 20 steps = 0.51 megapixel-steps: within 1
    assert status == 202, body
    status, body = post(upscale_factor=2.5, steps=40)  # charged at the output: 160x160 x 40 = 1.02 > 1
    assert status == 400 and "160x160" in body["error"]["message"], body
    status, body = post(upscale_factor=2.5, steps=40, uov="upscale_fast")  # no diffusion: one step's worth
    assert status == 202, body
    # aspect_ratio with an upscale names aspect_ratio (not the width it would have filled in)
    status, body = post(aspect_ratio="16:9")
    assert status == 400 and body["error"]["field"] == "aspect_ratio", body
    assert "input's x upscale_factor" in body["error"]["message"]
    assert len(api.svc.list_jobs(s["id"])) == 2


def test_models_and_openapi_list_the_upscalers_and_the_parameters_with_their_ranges(client):
    models = client.get("/api/v1/models").get_json()
    assert models["upscalers"] == [{"name": "tiny-esrgan"}]
    params = {p["name"]: p for p in next(p for p in models["pipes"] if p["name"] == "image2image")["params"]}
    assert params["uov"]["choices"] == list(specs.UOV_MODES)
    assert (params["upscale_factor"]["min"], params["upscale_factor"]["max"]) == (1.0, 4.0)
    props = client.get("/api/v1/openapi.json").get_json()["components"]["schemas"]["JobCreate_image2image"]
    assert {"uov", "upscale_factor", "upscaler"} <= set(props["properties"])
    assert "'maximum': 4.0" in str(props["properties"]["upscale_factor"])


def test_models_yaml_upscaler_section_and_the_pipe_kwargs(tmp_path: Path, config_file: Path):
    from multigen.service.catalog import ModelCatalog
    from multigen.service.config import load_config
    from multigen.service.errors import ConfigError
    from multigen.service.models_config import check_model_files, load_models
    from multigen.service.records import SessionRecord

    cfg = load_config(config_file)
    assert cfg.models.upscaler["tiny-esrgan"].path.name == "tiny-esrgan.safetensors"
    catalog = ModelCatalog(cfg.models, cfg.model_dir)
    session = SessionRecord(id="s", user="u", project="p", pipe="image2image", model="tiny-sd", loras=[],
                            folder=str(tmp_path), state="open", created_at="now")
    assert catalog.pipe_kwargs(session)["upscalers"] == {"tiny-esrgan": str(cfg.models.upscaler["tiny-esrgan"].path)}
    bad = tmp_path / "models.yaml"
    bad.write_text(cfg.models.file.read_text().replace("upscalers/tiny-esrgan.safetensors", "upscalers/none.pth"))
    with pytest.raises(ConfigError) as e:
        check_model_files(load_models(bad, cfg.model_dir))
    assert "upscaler.tiny-esrgan.id" in str(e.value)


@pytest.mark.slow
def test_real_upscale_jobs_over_http(config_file: Path):
    from multigen.service import ServiceThread
    from multigen.service.api import create_app
    from multigen.service.config import load_config

    svc = ServiceThread(config_file).start()
    try:
        client = create_app(load_config(config_file), svc).test_client()
        s = open_session(client, pipe="image2image")
        jobs = []
        for extra in ({"uov": "upscale_fast"}, {"uov": "upscale", "upscale_factor": 1.5, "steps": 3}):
            r = client.post(f"/api/v1/sessions/{s['id']}/jobs", json={
                "prompt": "x", "images": [data_url(shapes(64))], **extra})
            assert r.status_code == 202, r.get_json()
            jobs.append(r.get_json()["job"]["id"])
        assert svc.wait_idle(120)
        for i, (job_id, side) in enumerate(zip(jobs, (128, 96))):
            job = svc.get_job(job_id)
            assert job["state"] == "succeeded", job["error"]
            assert Image.open(svc.get_image_pathname(s["id"], i)).size == (side, side)
        meta = client.get(f"/api/v1/images/{svc.get_job(jobs[0])['images'][0]['id']}/metadata").get_json()["metadata"]
        assert meta["pipe_config"]["upscaler"] == "tiny-esrgan" and meta["params"]["uov"] == "upscale_fast"
        # A1111's extras with the model upscaler: a real upscale_fast job on the caller's model (demo)
        image = data_url(shapes(64)).split(",", 1)[1]
        r = client.post("/sdapi/v1/extra-single-image", json={"image": image, "upscaler_1": "tiny-esrgan",
                                                              "upscaling_resize": 1.5})
        assert r.status_code == 200, r.get_json()
        out = Image.open(io.BytesIO(base64.b64decode(r.get_json()["image"]))).convert("RGB")
        assert out.size == (96, 96)
        want = upscale.upscale_image(shapes(64), (96, 96), str(svc.config.models.upscaler["tiny-esrgan"].path))
        assert np.array_equal(pixels(out), pixels(want))
    finally:
        svc.stop()
        svc.store.close()


# ---- A1111's extras with a model upscaler -------------------------------------------------------------------
def test_a1111_extra_single_image_runs_a_model_upscaler_as_an_upscale_fast_job(client):
    from helpers_service import REC

    names = [u["name"] for u in client.get("/sdapi/v1/upscalers").get_json()]
    assert names[:2] == ["None", "Lanczos"] and "tiny-esrgan" in names
    image = data_url(shapes(64)).split(",", 1)[1]
    r = client.post("/sdapi/v1/extra-single-image", json={"image": image, "upscaler_1": "tiny-esrgan",
                                                          "upscaling_resize": 2})
    assert r.status_code == 200, r.get_json()
    assert Image.open(io.BytesIO(base64.b64decode(r.get_json()["image"]))).size == (128, 128)
    setup = REC.setups[-1]  # what reached the (fake) pipe's setup
    assert (setup["uov"], setup["upscale_factor"], setup["upscaler"]) == ("upscale_fast", 2.0, "tiny-esrgan")
    r = client.post("/sdapi/v1/extra-single-image", json={"image": image, "upscaler_1": "tiny-esrgan",
                                                          "upscaling_resize": 6})
    assert r.status_code == 422 and r.get_json()["detail"][0]["loc"] == ["body", "upscaling_resize"]


# ---- the web page -------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_web_form_sends_uov_and_its_ranges_come_from_the_server(server, browser, tmp_path: Path):  # noqa: F811
    from test_web_support import By, Select, load_page, make_png, set_value, wait
    from test_web_support import open_session as open_web_session

    d = browser
    load_page(d, server)
    sid = open_web_session(d, "web-uov", "image2image")
    d.execute_script("document.getElementById('advanced').open = true")
    shown = d.execute_script("return [...document.querySelectorAll('#advanced [data-param]')]"
                             ".filter(e => !e.hidden).map(e => e.dataset.param)")
    assert {"uov", "upscale_factor", "upscaler"} <= set(shown), shown
    attr = lambda k, a: d.find_element(By.ID, k).get_attribute(a)  # noqa: E731
    assert (attr("upscale_factor", "min"), attr("upscale_factor", "max")) == ("1", "4")
    assert "upscale_fast" in attr("uov", "title") and "lanczos" in attr("upscaler", "title")
    options = d.execute_script("return [...document.getElementById('upscaler').options].map(o => o.value)")
    assert options == ["", "tiny-esrgan", "lanczos"]
    set_value(d, "prompt", "upscale me")
    d.find_element(By.ID, "image").send_keys(str(make_png(tmp_path / "input.png")))
    wait(d, lambda d: d.find_element(By.ID, "image").get_attribute("data-upload-id"), 30, "upload")
    Select(d.find_element(By.ID, "uov")).select_by_value("upscale_fast")
    assert attr("strength", "value") == ""  # the mode's strength applies
    set_value(d, "upscale_factor", "1.5")
    Select(d.find_element(By.ID, "upscaler")).select_by_value("tiny-esrgan")
    d.find_element(By.ID, "queue-job").click()
    wait(d, lambda d: d.find_elements(By.CSS_SELECTOR, "#job-list li"), 10, "job card")
    job_id = d.find_element(By.CSS_SELECTOR, "#job-list li").get_attribute("data-job")
    job = server.api("GET", f"jobs/{job_id}")["job"]
    params = job["params"]
    assert (params["uov"], params["upscale_factor"], params["upscaler"]) == ("upscale_fast", 1.5, "tiny-esrgan")
    assert "width" not in params and "strength" not in params, params
    wait(d, lambda d: server.api("GET", f"jobs/{job_id}")["job"]["state"] in ("succeeded", "failed"), 120, "job")
    images = server.api("GET", f"sessions/{sid}/images")["images"]
    assert server.api("GET", f"jobs/{job_id}")["job"]["state"] == "succeeded"
    assert (images[0]["width"], images[0]["height"]) == (96, 96)
