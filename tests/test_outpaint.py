"""Outpaint and the inpaint prompt (issue 15, items 5 and 6) on the inpaint pipes.

Real pipes on tiny SD and tiny Flux (Flux.1 Fill too): an outpaint extends the image, keeps the input's
pixels exactly at their offset outside the seam band, fills the new area, and blends the seam; no mask is
needed and a mask adds to it. The queue-time checks (HTTP, fake pipes) refuse bad values with a 400 naming the
field and accept an outpaint without a mask; one real job goes through the HTTP API end to end. The inpaint
prompt reaches the text the pipe encodes (the prompt embeddings of the diffusers call) and changes the image.
"""
from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

from multigen.pipes import InpaintingPipe, MaskedIm2ImPipe, load_base
from multigen.pipes import spec as specs
from multigen.pipes.errors import InvalidValueError, MissingImageError, SizeError
from multigen.pipes.model_builder import FLUX_DIR
from multigen.pipes.outpaint import Outpaint, distances, inpaint_prompted
from multigen.pipes.tiny.flux_variants import FLUX_FILL_DIR
from helpers_service import open_session
from pipes_fixtures import noise_image, one_thread, pixels, sd_base  # noqa: F401
# the web test's fixtures (a real server, headless Chromium) and selenium's names, as test_web_forms.py takes them
from test_web_support import By, browser, load_page, make_png, server, set_value, wait  # noqa: F401
from test_web_support import open_session as open_web_session

PROMPT = {"prompt": "a red apple", "seed": 5}
SEAM = specs.OUTPAINT_SEAM.default


@pytest.fixture(scope="module")
def flux_base(models_dir):
    base, _ = load_base(models_dir / FLUX_DIR, dtype="float32")
    return base


@pytest.fixture(scope="module")
def fill_base(models_dir):
    base, _ = load_base(models_dir / FLUX_FILL_DIR, dtype="float32")
    return base


def kept(out: Image.Image, original: Image.Image, offset: tuple[int, int], seam: int) -> tuple[np.ndarray, np.ndarray]:
    """The output's pixels where the input lies, past the seam band of the left and top sides, and the input's."""
    x, y = offset
    w, h = original.size
    return pixels(out)[y + seam:y + h, x + seam:x + w], pixels(original)[seam:, seam:]


# ---- the image work (no model) ------------------------------------------------------------------------------
def test_distances_follow_fooocus_default_and_explicit_values():
    size = (100, 50)
    assert distances({"outpaint": ["left", "top"]}, size) == (30, 15, 0, 0)  # int(W * 0.3), int(H * 0.3)
    assert distances({"outpaint": ["left"], "outpaint_left": 7, "outpaint_bottom": 9}, size) == (7, 0, 0, 9)
    assert Outpaint.from_params({"outpaint_left": 0, "outpaint": None}, size) is None
    with pytest.raises(SizeError) as e:
        Outpaint.from_params({"outpaint_left": 2048, "outpaint_right": 2048}, (100, 50))
    assert e.value.param == "outpaint_left" and "4196 px wide" in str(e.value)


def test_area_mask_ramps_over_the_seam_and_the_fill_continues_the_edges():
    op = Outpaint((40, 30), (8, 0, 0, 4), seam=4)
    assert op.output_size == (48, 34) and op.box == (8, 0, 48, 30)
    mask = np.asarray(op.area_mask)
    assert (mask[:, :8] == 255).all() and (mask[30:, :] == 255).all()  # the new area
    assert list(mask[10, 8:14]) == [204, 153, 102, 51, 0, 0]  # 255 (4 - d) / 5 into the input
    assert (mask[:26, 12:] == 0).all()  # farther in: kept exactly
    image = Image.new("RGB", (40, 30), (10, 200, 30))
    image.paste((250, 0, 0), (0, 0, 40, 15))
    filled = np.asarray(op.extend(image))
    assert (filled[0:5, 0:8, 0] > 200).all() and (filled[25:30, 0:8, 1] > 150).all()  # the edge's colours
    assert (filled[30:, 8:][..., 1] > 150).all() and filled[:, :8].std(axis=0).max() > 0  # smooth, not streaks
    assert np.array_equal(filled[0:30, 8:], np.asarray(image))


def test_inpaint_prompt_goes_before_the_prompt():
    assert inpaint_prompted("a cat", "red hat") == "red hat, a cat"
    assert inpaint_prompted("a cat", None) == inpaint_prompted("a cat", "  ") == "a cat"
    assert inpaint_prompted("", "red hat") == "red hat"
    with pytest.raises(InvalidValueError):
        inpaint_prompted("a", "x" * (specs.MAX_PROMPT_CHARS + 1))


# ---- real pipes ---------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("model", ["sd", "flux"])
def test_outpaint_left_top_keeps_the_original_in_place(model, request):
    base = request.getfixturevalue(f"{model}_base")
    original = noise_image(64, 64, seed=3)
    pipe = InpaintingPipe(pipe=base)
    pipe.setup(image=original, outpaint_left=32, outpaint_top=32, steps=2)  # no mask
    out = pipe.gen(PROMPT)[0]
    assert out.size == pipe.output_size() == (96, 96)
    got, want = kept(out, original, (32, 32), SEAM)
    assert np.array_equal(got, want)  # the original's pixels, exactly, past the seam band
    filled = pixels(Outpaint((64, 64), (32, 32, 0, 0), SEAM).extend(original))  # where the new area started
    assert np.abs(pixels(out)[:32] - filled[:32]).mean() > 10  # the new area was generated
    # the seam blends: in the band the output lies between the original and the generated pixels, fading in
    cfg = pipe.get_config()
    assert cfg["outpaint_box"] == [32, 32, 96, 96] and cfg["outpaint_sides"] == {"left": 32, "top": 32, "right": 0,
                                                                              "bottom": 0}
    mask = np.asarray(pipe.mask)
    assert mask[60, 32] > mask[60, 36] > mask[60, 40] > 0 and mask[60, 32 + SEAM] == 0
    band = np.abs(pixels(out)[50:90, 32:32 + SEAM] - pixels(original)[18:58, :SEAM]).mean(axis=(0, 2))
    assert band[0] > band[-1] and band[-1] > 0  # changed the most at the edge, less inwards, never cut off


@pytest.mark.slow
def test_outpaint_on_flux_fill(fill_base):
    original = noise_image(64, 64, seed=4)
    pipe = InpaintingPipe(pipe=fill_base)
    pipe.setup(image=original, outpaint=["right"], outpaint_seam=8, steps=2)
    out = pipe.gen(PROMPT)[0]
    assert out.size == (64 + int(64 * specs.OUTPAINT_RATIO), 64) == (83, 64)  # not rounded: padded, cropped back
    assert np.array_equal(pixels(out)[:, :64 - 8], pixels(original)[:, :64 - 8])


@pytest.mark.slow
def test_mask_and_outpaint_together(sd_base):
    original = noise_image(64, 64, seed=5)
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (40, 40, 56, 56))
    pipe = InpaintingPipe(pipe=sd_base)
    pipe.setup(image=original, mask=mask, outpaint_bottom=16, outpaint_seam=4, blur=0, steps=2)
    out = pipe.gen(PROMPT)[0]
    assert out.size == (64, 80)
    diff = np.abs(pixels(out)[:64] - pixels(original)).sum(axis=2)
    assert (diff[40:56, 40:56] > 0).mean() > 0.9  # the masked box was redrawn
    keep = np.ones((64, 64), bool)
    keep[40:56, 40:56] = False
    keep[64 - 4:, :] = False  # the seam band above the new area
    assert (diff[keep] == 0).all()
    assert np.asarray(pipe.mask)[48, 48] == 255 and np.asarray(pipe.mask)[70, 5] == 255


@pytest.mark.slow
def test_masked_im2im_outpaints_with_the_fooocus_default(sd_base):
    original = noise_image(80, 64, seed=6)
    pipe = MaskedIm2ImPipe(pipe=sd_base)
    pipe.setup(image=original, outpaint=["left", "top"], steps=4)  # strength 0.75 from the edge fill
    out = pipe.gen(PROMPT)[0]
    assert out.size == (80 + 24, 64 + 19)
    got, want = kept(out, original, (24, 19), SEAM)
    assert np.array_equal(got, want)


@pytest.mark.slow
def test_painted_copy_and_outpaint_together(sd_base):
    original = noise_image(64, 64, seed=10)
    painted = original.copy()
    painted.paste((255, 0, 0), (8, 40, 24, 56))
    pipe = MaskedIm2ImPipe(pipe=sd_base)
    pipe.setup(image=original, image_painted=painted, outpaint_right=16, outpaint_seam=4, blur=0, blur_compose=0,
               steps=4)
    out = pipe.gen(PROMPT)[0]
    assert out.size == (80, 64)
    mask = np.asarray(pipe.mask)
    assert mask[48, 16] == 255 and mask[10, 70] == 255 and mask[10, 30] == 0  # the painted box, the new area
    diff = np.abs(pixels(out)[:, :64] - pixels(original)).sum(axis=2)
    keep = np.ones((64, 64), bool)
    keep[40:56, 8:24] = False
    keep[:, 64 - 4:] = False
    assert (diff[keep] == 0).all() and (diff[40:56, 8:24] > 0).mean() > 0.9


@pytest.mark.slow
def test_full_res_generates_the_band_at_the_generation_size(sd_base):
    original = noise_image(128, 64, seed=7)
    pipe = InpaintingPipe(pipe=sd_base)
    pipe.setup(image=original, outpaint_right=32, full_res=True, full_res_padding=8, width=64, height=64, steps=2)
    assert pipe.denoise_mask.size == (64, 64) and pipe.output_size() == (160, 64)
    out = pipe.gen(PROMPT)[0]
    assert out.size == (160, 64)
    assert np.array_equal(pixels(out)[:, :128 - SEAM], pixels(original)[:, :128 - SEAM])
    left = pipe.full_res_box[0]
    assert 0 < left <= 128 - SEAM - 8  # only a box around the new band, its seam and padding


@pytest.mark.slow
def test_pipe_refuses_bad_outpaints(sd_base):
    pipe = InpaintingPipe(pipe=sd_base)
    image = noise_image(64, 64)
    for bad, param in (({"outpaint_left": -1}, "outpaint_left"), ({"outpaint_top": specs.MAX_OUTPAINT + 1},
                                                                   "outpaint_top"),
                       ({"outpaint": ["diagonal"]}, "outpaint[0]"), ({"outpaint_seam": 300}, "outpaint_seam")):
        with pytest.raises(InvalidValueError) as e:
            pipe.setup(image=image, **bad)
        assert e.value.param == param
    with pytest.raises(MissingImageError):
        pipe.setup(image=image, outpaint_left=0)  # a distance of 0 asks for nothing: a mask is needed


@pytest.mark.slow
def test_inpaint_prompt_reaches_the_encoded_prompt_and_changes_the_image(sd_base, monkeypatch):
    calls: list[dict] = []
    pipe = InpaintingPipe(pipe=sd_base)
    cls = type(pipe.pipe)
    call = cls.__call__

    def spy(self, *args, **kwargs):
        calls.append(kwargs)
        return call(self, *args, **kwargs)

    monkeypatch.setattr(cls, "__call__", spy)
    image = noise_image(64, 64, seed=8)
    runs = {}
    for name, extra, prompt in (("extra", {"inpaint_prompt": "a (red hat:1.3)"}, "a cat"),
                                ("joined", {}, "a (red hat:1.3), a cat"), ("plain", {}, "a cat")):
        pipe.setup(image=image, outpaint_left=16, steps=2, **extra)
        runs[name] = (pixels(pipe.gen({"prompt": prompt, "seed": 1})[0]), calls[-1]["prompt_embeds"])
        if name == "extra":
            cfg = pipe.get_config()
            assert cfg["prompt"] == "a cat" and cfg["inpaint_prompt"] == "a (red hat:1.3)"  # the job's own
    assert np.array_equal(runs["extra"][1].numpy(), runs["joined"][1].numpy())  # weighted, as one text
    assert not np.array_equal(runs["extra"][1].numpy(), runs["plain"][1].numpy())
    assert np.array_equal(runs["extra"][0], runs["joined"][0])
    assert not np.array_equal(runs["extra"][0], runs["plain"][0])


# ---- the service: queue-time checks (fake pipes) and one real job over HTTP ---------------------------------
def data_url(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@pytest.mark.parametrize("body,field", [
    ({"outpaint_left": -1}, "outpaint_left"),
    ({"outpaint_right": specs.MAX_OUTPAINT + 1}, "outpaint_right"),
    ({"outpaint": ["diagonal"]}, "outpaint"),
    ({"outpaint_seam": 257}, "outpaint_seam"),
    ({"inpaint_prompt": 5}, "inpaint_prompt"),
    ({}, "mask"),  # neither a mask nor an outpaint
    ({"outpaint_top": 0}, "mask"),
])
def test_http_refuses_bad_outpaints_before_queueing(client, body, field):
    s = open_session(client, pipe="inpainting")
    r = client.post(f"/api/v1/sessions/{s['id']}/jobs",
                    json={"prompt": "x", "images": [data_url(noise_image(64, 64))], **body})
    assert r.status_code == 400, r.get_json()
    assert field in r.get_json()["error"]["field"], r.get_json()
    assert client.get(f"/api/v1/sessions/{s['id']}/jobs").get_json()["jobs"] == []


@pytest.mark.parametrize("pipe", ["inpainting", "masked_image2image"])
def test_http_takes_an_outpaint_without_a_mask(client, pipe):
    s = open_session(client, pipe=pipe)
    r = client.post(f"/api/v1/sessions/{s['id']}/jobs", json={
        "prompt": "x", "images": [data_url(noise_image(64, 64))], "outpaint": ["left"], "outpaint_top": 24,
        "inpaint_prompt": "a wall"})
    assert r.status_code == 202, r.get_json()
    params = r.get_json()["job"]["params"]
    assert params["outpaint"] == ["left"] and params["outpaint_top"] == 24 and params["inpaint_prompt"] == "a wall"


def test_an_outpaint_past_the_config_limits_is_refused_when_queued_and_charged_at_its_output_size(make_api):
    api = make_api(**{"max_count: 100": "max_count: 100\n  max_width: 200\n  max_height: 160",
                      "max_megapixel_steps_per_job: 20000": "max_megapixel_steps_per_job: 1"})
    client = api.client()
    s = open_session(client, pipe="inpainting")

    def post(**body):
        r = client.post(f"/api/v1/sessions/{s['id']}/jobs",
                        json={"prompt": "x", "images": [data_url(noise_image(64, 64))], "steps": 5, **body})
        return r.status_code, r.get_json()

    for body, field, key in (({"outpaint_right": 150}, "outpaint_right", "limits.max_width"),  # 64 + 150 = 214
                             ({"outpaint_top": 100}, "outpaint_top", "limits.max_height"),  # 64 + 100 = 164
                             ({"outpaint": ["left", "right"], "scale": 2}, "outpaint", "limits.max_width")):  # 128+76
        status, out = post(**body)
        assert status == 400 and out["error"]["field"] == field, out
        assert key in out["error"]["message"], out
    status, out = post(outpaint_right=136)  # 200x64 fits
    assert status == 202, out
    status, out = post(outpaint_right=136, outpaint_bottom=96, steps=40)  # charged at 200x160: 1.28 > 1
    assert status == 400 and "200x160" in out["error"]["message"], out
    assert len(api.svc.list_jobs(s["id"])) == 1


def test_models_list_the_new_parameters_with_their_ranges(client):
    pipes = {p["name"]: p for p in client.get("/api/v1/models").get_json()["pipes"]}
    params = {p["name"]: p for p in pipes["inpainting"]["params"]}
    assert (params["outpaint_left"]["min"], params["outpaint_left"]["max"]) == (0, specs.MAX_OUTPAINT)
    assert params["outpaint"]["choices"] == ["left", "right", "top", "bottom"]
    assert params["inpaint_prompt"]["type"] == "str"
    assert pipes["inpainting"]["images"]["required"][1][:2] == ["mask", "outpaint"]
    schema = client.get("/api/v1/openapi.json").get_json()["components"]["schemas"]["JobCreate_inpainting"]
    assert {"outpaint", "outpaint_left", "outpaint_seam", "inpaint_prompt"} <= set(schema["properties"])


@pytest.mark.slow
def test_real_outpaint_job_over_http(config_file):
    from multigen.service import ServiceThread
    from multigen.service.api import create_app
    from multigen.service.config import load_config

    svc = ServiceThread(config_file).start()
    try:
        client = create_app(load_config(config_file), svc).test_client()
        s = open_session(client, pipe="inpainting")
        original = noise_image(64, 64, seed=9)
        r = client.post(f"/api/v1/sessions/{s['id']}/jobs", json={
            "prompt": "x", "images": [data_url(original)], "outpaint_left": 32, "outpaint_top": 32, "steps": 2})
        assert r.status_code == 202, r.get_json()
        assert svc.wait_idle(120)
        job = svc.get_job(r.get_json()["job"]["id"])
        assert job["state"] == "succeeded", job["error"]
        out = Image.open(svc.get_image_pathname(s["id"], 0)).convert("RGB")
        assert out.size == (96, 96)
        got, want = kept(out, original, (32, 32), SEAM)
        assert np.array_equal(got, want)
    finally:
        svc.stop()
        svc.store.close()


# ---- the web page (headless Chromium against a real server) -----------------------------------------------
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_web_form_outpaints_without_a_mask(server, browser, tmp_path):
    """The inpaint form shows the outpaint fields with the server's ranges; sides, a distance and the inpaint
    prompt reach the job, no mask painted, and the image comes back extended."""
    d = browser
    load_page(d, server)
    sid = open_web_session(d, "web-outpaint", "inpainting")
    d.find_element(By.ID, "image").send_keys(str(make_png(tmp_path / "input.png")))
    wait(d, lambda d: d.find_element(By.ID, "image").get_attribute("data-upload-id"), 30, "upload")
    d.find_element(By.CSS_SELECTOR, "#advanced > summary").click()
    for param in ("outpaint", "outpaint_left", "outpaint_seam", "inpaint_prompt"):
        assert d.find_element(By.ID, param).is_displayed(), param
    assert d.find_element(By.ID, "outpaint_left").get_attribute("max") == str(specs.MAX_OUTPAINT)
    assert "Fooocus" in d.find_element(By.ID, "outpaint").get_attribute("title")
    set_value(d, "prompt", "a wall")
    set_value(d, "steps", "2")
    set_value(d, "outpaint_left", "16")
    set_value(d, "inpaint_prompt", "bricks")
    d.execute_script("document.querySelector('#outpaint option[value=top]').selected = true")
    d.find_element(By.ID, "queue-job").click()
    wait(d, lambda d: d.find_elements(By.CSS_SELECTOR, "#job-list li"), 10, "job card")
    job_id = d.find_element(By.CSS_SELECTOR, "#job-list li").get_attribute("data-job")
    wait(d, lambda d: d.find_element(By.CSS_SELECTOR, "#job-list li").get_attribute("data-state")
         in ("succeeded", "failed"), 180, "the outpaint job to finish")
    job = server.api("GET", f"jobs/{job_id}")["job"]
    assert job["state"] == "succeeded", job.get("error")
    params = job["params"]
    assert params["outpaint"] == ["top"] and params["outpaint_left"] == 16 and params["inpaint_prompt"] == "bricks"
    assert "mask" not in params
    image = server.api("GET", f"sessions/{sid}/images")["images"][0]
    assert (image["width"], image["height"]) == (64 + 16, 64 + int(64 * specs.OUTPAINT_RATIO))
