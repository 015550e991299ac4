"""AUTOMATIC1111's ``/sdapi/v1`` dialect on the Flask app over fake pipes: shapes, names, errors,
per-user options and isolation. The real ``webuiapi`` client against a real server: test_a1111_webuiapi.py."""
from __future__ import annotations

import base64
import io
import json

import pytest
from PIL import Image

from multigen.service.api.a1111.common import OptionsStore
from multigen.service.api.a1111.infotext import infotext, parse_infotext
from multigen.service.api.a1111.names import UnknownName, from_scheduler, listed_samplers, to_scheduler
from multigen.service.errors import InvalidInput
from multigen.service.loratags import split_lora_tags

SMALL = {"steps": 2, "width": 64, "height": 64}


def b64png(size=(64, 64), color="white", prefix: bool = False) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    text = base64.b64encode(buf.getvalue()).decode()
    return "data:image/png;base64," + text if prefix else text


def detail_loc(r) -> list:
    assert r.status_code == 422, r.get_json()
    return r.get_json()["detail"][0]["loc"]


# ---- pure functions ----------------------------------------------------------------------------------
def test_lora_tags_are_taken_out_of_the_prompt():
    text, loras = split_lora_tags("a cat <lora:a:0.5>, sitting <LORA:b> <lora:a:0.7>", known=["a", "b"])
    assert text == "a cat, sitting"
    assert loras == [{"name": "b", "weight": 1.0}, {"name": "a", "weight": 0.7}]
    assert split_lora_tags("plain", known=[]) == ("plain", [])
    with pytest.raises(InvalidInput) as e:
        split_lora_tags("x <lora:nope:1>", known=["a"])
    assert e.value.field == "prompt" and "nope" in e.value.message
    with pytest.raises(InvalidInput):
        split_lora_tags("x <lora:a:heavy>", known=["a"])


def test_sampler_names_map_both_ways_per_family():
    assert to_scheduler("DPM++ 2M", "Karras", flow=False) == "dpmpp_2m_karras"
    assert to_scheduler("DPM++ 2M Karras", None, flow=False) == "dpmpp_2m_karras"  # the legacy spelling
    assert to_scheduler("euler a", "automatic", flow=False) == "euler_a"
    assert to_scheduler("k_dpmpp_2m", None, flow=False) == "dpmpp_2m"
    assert to_scheduler("Euler", "Exponential", flow=True) == "flow_euler_exponential"
    assert to_scheduler("Euler", "Karras", flow=True) == "flow_euler_karras"
    assert to_scheduler("LCM", None, flow=True) == "flow_lcm"
    for sampler, schedule, flow, field in (("Nope", None, False, "sampler_name"), ("Euler", "Zigzag", False,
                                           "scheduler"), ("DPM++ 2M", None, True, "sampler_name")):
        with pytest.raises(UnknownName) as e:
            to_scheduler(sampler, schedule, flow)
        assert e.value.field == field
    assert from_scheduler("dpmpp_2m_karras") == ("DPM++ 2M", "Karras")
    assert from_scheduler("flow_euler_beta") == ("Euler", "Beta")
    assert from_scheduler("euler_a") == ("Euler a", "Automatic")
    assert {"Euler a", "DPM++ 2M", "DDIM"} <= {s["name"] for s in listed_samplers()}


def test_infotext_round_trip():
    text = infotext("a cat, b", "ugly", {"Steps": 2, "Sampler": "Euler a", "Size": "64x64", "Lora hashes": "a: 1"})
    parsed = parse_infotext(text)
    assert parsed["Prompt"] == "a cat, b" and parsed["Negative prompt"] == "ugly"
    assert parsed["Steps"] == "2" and parsed["Sampler"] == "Euler a" and parsed["Lora hashes"] == "a: 1"
    assert (parsed["Size-1"], parsed["Size-2"]) == ("64", "64")


def test_options_store_survives_a_restart(tmp_path):
    OptionsStore(tmp_path / "o.json").update("alice", {"sd_model_checkpoint": "tiny-sdxl"})
    assert OptionsStore(tmp_path / "o.json").get("alice") == {"sd_model_checkpoint": "tiny-sdxl"}
    assert OptionsStore(tmp_path / "o.json").get("bob") == {}


# ---- generation --------------------------------------------------------------------------------------
def test_txt2img_batches_seeds_loras_and_info(api, client):
    body = {"prompt": "a cat <lora:tiny-sd-lora:0.8>", "negative_prompt": "dog", "seed": 5, "batch_size": 2,
            "n_iter": 2, "override_settings": {"sd_model_checkpoint": "tiny-sd"}, "some_new_field": 1, **SMALL}
    r = client.post("/sdapi/v1/txt2img", json=body)
    assert r.status_code == 200, r.get_json()
    out = r.get_json()
    assert set(out) == {"images", "parameters", "info"} and isinstance(out["info"], str)
    info = json.loads(out["info"])
    assert info["all_seeds"] == [5, 6, 7, 8] and info["seed"] == 5
    assert info["all_prompts"] == [body["prompt"]] * 4 and info["all_negative_prompts"] == ["dog"] * 4
    assert info["sd_model_name"] == "tiny-sd" and info["width"] == 64 and info["steps"] == 2
    assert len(info["infotexts"]) == 4 and "Seed: 6" in info["infotexts"][1]
    assert out["parameters"]["prompt"] == body["prompt"] and out["parameters"]["batch_size"] == 2
    assert len(out["images"]) == 4
    png = Image.open(io.BytesIO(base64.b64decode(out["images"][0])))
    assert png.format == "PNG" and "Seed: 5" in png.info["parameters"] and "tiny-sd-lora" in png.info["parameters"]
    [session] = api.svc.list_sessions(user="local", project="a1111")
    assert session["model"] == "tiny-sd" and session["loras"] == [{"name": "tiny-sd-lora", "weight": 0.8}]
    [job] = api.svc.list_jobs(session["id"])
    assert job["prompt"] == "a cat" and job["count"] == 4 and job["state"] == "succeeded"
    # the same pipe, model and LoRAs again: the same implicit session
    assert client.post("/sdapi/v1/txt2img", json={**body, "send_images": False}).get_json()["images"] == []
    assert len(api.svc.list_sessions(user="local", project="a1111")) == 1


def test_seed_minus_one_draws_consecutive_seeds(client):
    info = json.loads(client.post("/sdapi/v1/txt2img", json={"batch_size": 3, **SMALL}).get_json()["info"])
    first = info["all_seeds"][0]
    assert first >= 0 and info["all_seeds"] == [first, first + 1, first + 2]


def test_sampler_reaches_the_job_as_our_scheduler_name(api, client):
    client.post("/sdapi/v1/txt2img", json={"sampler_name": "DPM++ 2M", "scheduler": "Karras", **SMALL})
    [session] = api.svc.list_sessions(project="a1111")
    assert api.svc.list_jobs(session["id"])[0]["params"]["scheduler"] == "dpmpp_2m_karras"


def test_img2img_picks_the_pipe_by_mask(api, client):
    for extra, pipe in (({}, "image2image"), ({"mask": b64png(color="black")}, "masked_image2image"),
                        ({"mask": b64png(), "inpainting_fill": 2, "inpainting_mask_invert": 1}, "inpainting")):
        r = client.post("/sdapi/v1/img2img", json={"init_images": [b64png(prefix=True)], "denoising_strength": 0.5,
                                                   **extra, **SMALL})
        assert r.status_code == 200, r.get_json()
        out = r.get_json()
        assert out["parameters"]["init_images"] is None and len(out["images"]) == 1
        assert json.loads(out["info"])["denoising_strength"] == 0.5
        sessions = api.svc.list_sessions(project="a1111")
        assert sessions[-1]["pipe"] == pipe
        assert api.svc.list_jobs(sessions[-1]["id"])[0]["params"]["strength"] == 0.5


@pytest.mark.parametrize("path,body,loc", [
    ("img2img", {"init_images": ["not base64 at all!"]}, ["body", "init_images"]),
    ("img2img", {"init_images": [base64.b64encode(b"not an image").decode()]}, ["body", "init_images"]),
    ("img2img", {"init_images": [b64png()], "mask": b64png((32, 32))}, ["body", "mask"]),
    ("img2img", {"init_images": []}, ["body", "init_images"]),
    ("txt2img", {"sampler_name": "Nope"}, ["body", "sampler_name"]),
    ("txt2img", {"scheduler": "Zigzag", "sampler_name": "Euler"}, ["body", "scheduler"]),
    ("txt2img", {"override_settings": {"sd_model_checkpoint": "nope [123456]"}},
     ["body", "override_settings", "sd_model_checkpoint"]),
    ("txt2img", {"width": 8192}, ["body", "width"]),
    ("txt2img", {"steps": "many"}, ["body", "steps"]),
    ("txt2img", {"batch_size": 0}, ["body", "batch_size"]),
    ("txt2img", {"prompt": "x <lora:nope:1>"}, ["body", "prompt"]),
    ("txt2img", {"prompt": "x <lora:tiny-sdxl-lora:1>"}, ["body", "prompt"]),  # a LoRA of another family
    ("txt2img", {"styles": ["cinematic", "no such style"]}, ["body", "styles", "1"]),
])
def test_bad_bodies_are_422_naming_the_field(api, client, path, body, loc):
    assert detail_loc(client.post(f"/sdapi/v1/{path}", json={**SMALL, **body})) == loc
    assert api.svc.list_sessions(project="a1111") == [] or path == "txt2img" and "lora" in body.get("prompt", "")


def test_count_past_max_count_and_a_body_that_is_not_json(make_api):
    api = make_api(**{"max_count: 100": "max_count: 3"})
    client = api.client()
    assert detail_loc(client.post("/sdapi/v1/txt2img", json={"batch_size": 2, "n_iter": 2, **SMALL})) == [
        "body", "batch_size"]
    r = client.post("/sdapi/v1/txt2img", data=b"{nope", content_type="application/json")
    assert r.status_code == 422 and r.get_json()["detail"][0]["type"] == "json_invalid"
    r = client.post("/sdapi/v1/txt2img", data=b"[1, 2]", content_type="application/json")
    assert r.status_code == 422


# ---- options, listings, utilities --------------------------------------------------------------------
def test_options_switch_the_callers_model(client):
    assert client.get("/sdapi/v1/options").get_json()["sd_model_checkpoint"].startswith("demo [")
    r = client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "tiny-sdxl", "samples_format": "jpg"})
    assert r.status_code == 200 and r.get_json() is None
    options = client.get("/sdapi/v1/options").get_json()
    assert options["sd_model_checkpoint"].startswith("tiny-sdxl [") and options["samples_format"] == "png"
    info = json.loads(client.post("/sdapi/v1/txt2img", json=SMALL).get_json()["info"])
    assert info["sd_model_name"] == "tiny-sdxl"
    assert detail_loc(client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "nope"})) == [
        "body", "sd_model_checkpoint"]
    assert detail_loc(client.post("/sdapi/v1/options", json={"CLIP_stop_at_last_layers": 0})) == [
        "body", "CLIP_stop_at_last_layers"]
    # a title from sd-models selects its model too
    title = next(m["title"] for m in client.get("/sdapi/v1/sd-models").get_json() if m["model_name"] == "tiny-sd")
    client.post("/sdapi/v1/options", json={"sd_model_checkpoint": title})
    assert client.get("/sdapi/v1/options").get_json()["sd_model_checkpoint"] == title


def test_listings(client):
    models = client.get("/sdapi/v1/sd-models").get_json()
    tiny = next(m for m in models if m["model_name"] == "tiny-sd")
    assert tiny["title"] == f"tiny-sd [{tiny['hash']}]" and tiny["sha256"].startswith(tiny["hash"])
    assert "/" not in tiny["filename"]  # no server paths
    assert {"Euler a", "DPM++ 2M"} <= {s["name"] for s in client.get("/sdapi/v1/samplers").get_json()}
    assert "Karras" in {s["label"] for s in client.get("/sdapi/v1/schedulers").get_json()}
    assert {"name": "tiny-sd-lora", "alias": "tiny-sd-lora"}.items() <= next(
        x for x in client.get("/sdapi/v1/loras").get_json() if x["name"] == "tiny-sd-lora").items()
    assert [u["name"] for u in client.get("/sdapi/v1/upscalers").get_json()][:2] == ["None", "Lanczos"]
    styles = client.get("/sdapi/v1/prompt-styles").get_json()
    assert len(styles) >= 100 and all(set(s) == {"name", "prompt", "negative_prompt"} for s in styles)
    assert client.get("/sdapi/v1/scripts").get_json() == {"txt2img": [], "img2img": []}
    assert client.get("/sdapi/v1/embeddings").get_json() == {"loaded": {}, "skipped": {}}
    assert client.get("/sdapi/v1/latent-upscale-modes").get_json()[0]["name"] == "Latent"
    for path in ("sd-vae", "sd-modules", "cmd-flags", "memory"):
        assert client.get(f"/sdapi/v1/{path}").status_code == 200
    for path in ("refresh-checkpoints", "refresh-loras"):
        assert client.post(f"/sdapi/v1/{path}").status_code == 200


def test_png_info_and_extras(client):
    image = client.post("/sdapi/v1/txt2img", json={"prompt": "a red ball", "seed": 9, **SMALL}).get_json()["images"][0]
    out = client.post("/sdapi/v1/png-info", json={"image": "data:image/png;base64," + image}).get_json()
    assert out["info"].startswith("a red ball\n") and out["parameters"]["Seed"] == "9"
    assert out["parameters"]["Prompt"] == "a red ball" and "multigen" in out["items"]
    r = client.post("/sdapi/v1/extra-single-image", json={"image": image, "upscaler_1": "Lanczos",
                                                          "upscaling_resize": 2})
    assert Image.open(io.BytesIO(base64.b64decode(r.get_json()["image"]))).size == (128, 128)
    assert detail_loc(client.post("/sdapi/v1/extra-single-image", json={"image": image, "upscaler_1": "R-ESRGAN 4x+"})
                      ) == ["body", "upscaler_1"]
    assert detail_loc(client.post("/sdapi/v1/png-info", json={"image": "%%%"})) == ["body", "image"]


# ---- auth and isolation ------------------------------------------------------------------------------
def test_progress_and_interrupt_see_only_the_callers_job(make_api):
    api = make_api(users=("alice", "bob"), start=False)  # jobs stay queued
    client = api.client()
    assert client.get("/sdapi/v1/progress").status_code == 401
    basic = base64.b64encode(f"alice:{api.tokens['alice']}".encode()).decode()
    alice, bob = {"Authorization": f"Basic {basic}"}, api.headers("bob")
    session = api.svc.create_session("alice", "a1111", "prompt2image", "tiny-sd")
    job = api.svc.queue_gen(session["id"], prompt="x", count=2, **SMALL)["job"]
    idle = client.get("/sdapi/v1/progress", headers=bob).get_json()
    assert idle["state"]["job_count"] == 0 and idle["progress"] == 0.0 and idle["current_image"] is None
    assert client.post("/sdapi/v1/interrupt", headers=bob).status_code == 200
    assert api.svc.get_job(job["id"])["state"] == "queued"
    mine = client.get("/sdapi/v1/progress", headers=alice).get_json()
    assert mine["state"]["job_count"] == 1 and mine["textinfo"] == "queued"
    assert client.post("/sdapi/v1/skip", headers=alice).get_json() == {}  # queued: no image is being made
    assert api.svc.get_job(job["id"])["state"] == "queued"
    assert client.post("/sdapi/v1/interrupt", headers=alice).get_json() == {}
    assert api.svc.get_job(job["id"])["state"] == "cancelled"
    # options are per user
    client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "tiny-sdxl"}, headers=alice)
    assert client.get("/sdapi/v1/options", headers=bob).get_json()["sd_model_checkpoint"].startswith("demo")


def test_a_call_past_the_timeout_or_during_a_stop(make_api):
    api = make_api(start=False, **{"sync_call_timeout: 600": "sync_call_timeout: 0.3"})  # jobs stay queued
    client = api.client()
    r = client.post("/sdapi/v1/txt2img", json={"prompt": "slow", **SMALL})
    assert r.status_code == 504 and r.get_json()["error"] == "CallTimedOut"
    [session] = api.svc.list_sessions(project="a1111")
    assert [j["state"] for j in api.svc.list_jobs(session["id"])] == ["cancelled"]
    api.app.extensions["multigen.stopping"].set()  # the server stops: the call ends, its job is kept
    r = client.post("/sdapi/v1/txt2img", json={"prompt": "kept", **SMALL})
    assert r.status_code == 503 and set(r.get_json()) == {"error", "detail", "body", "errors"}
    assert [j["state"] for j in api.svc.list_jobs(session["id"])] == ["cancelled", "queued"]


def test_refusals_before_the_body_is_read_are_in_a1111s_shape(make_api):
    """A missing token or a body past its limit is refused from the request's head (before Flask runs),
    in A1111's ``handle_exception`` shape on /sdapi, in multigen's on its own API."""
    api = make_api(users=("alice",))
    guard = api.app.extensions["multigen.guard"]
    headers = {"Content-Length": str(10**9)}
    error, _ = guard.check_head("POST", "/sdapi/v1/txt2img", "", headers.get)
    assert error.http_status == 401 and set(error.to_dict()) == {"error", "detail", "body", "errors"}
    headers["Authorization"] = f"Bearer {api.tokens['alice']}"
    error, limit = guard.check_head("POST", "/sdapi/v1/img2img", "", headers.get)
    assert error.http_status == 413 and error.to_dict()["errors"].startswith("413: ")
    assert limit > 1024 * 1024  # img2img carries images: the upload limit
    error, _ = guard.check_head("POST", "/api/v1/sessions", "", headers.get)
    assert set(error.to_dict()) == {"error"}  # the session API keeps its shape


def test_img2img_inpaint_full_res_reaches_the_job_as_full_res(api, client):
    """A1111's "inpaint at full resolution" (on by default there and in webuiapi) is the masked pipes' full_res,
    its padding full_res_padding; off, or without a mask, neither is sent; a padding past the spec is a 422."""
    from helpers_service import REC

    body = {"init_images": [b64png((96, 80))], "mask": b64png((96, 80)), "denoising_strength": 0.5, **SMALL}
    r = client.post("/sdapi/v1/img2img", json={**body, "inpaint_full_res": True, "inpaint_full_res_padding": 24})
    assert r.status_code == 200, r.get_json()
    [session] = api.svc.list_sessions(project="a1111")
    params = api.svc.list_jobs(session["id"])[0]["params"]
    assert (params["full_res"], params["full_res_padding"], params["width"], params["height"]) == (True, 24, 64, 64)
    setup = REC.setups[-1]
    assert (setup["full_res"], setup["full_res_padding"]) == (True, 24)
    # A1111's default is on (its padding 0); 0 turns it off
    assert client.post("/sdapi/v1/img2img", json=body).status_code == 200
    assert (REC.setups[-1]["full_res"], REC.setups[-1]["full_res_padding"]) == (True, 0)
    assert client.post("/sdapi/v1/img2img", json={**body, "inpaint_full_res": 0}).status_code == 200
    assert REC.setups[-1]["full_res"] is False and "full_res_padding" not in REC.setups[-1]
    assert client.post("/sdapi/v1/img2img", json={"init_images": [b64png()], **SMALL}).status_code == 200
    assert "full_res" not in REC.setups[-1]  # no mask: Im2ImPipe, which has no full_res
    r = client.post("/sdapi/v1/img2img", json={**body, "inpaint_full_res_padding": 5000})
    assert detail_loc(r) == ["body", "inpaint_full_res_padding"]


def test_styles_wrap_the_prompt_through_txt2img_and_are_listed_by_prompt_styles(api, client):
    """A1111's ``styles`` apply the server's styles (GET /sdapi/v1/prompt-styles) to each image; the job gets the
    prompt without its <lora:...> tags, styled; the answer's prompts and infotexts are styled as A1111's are."""
    from helpers_service import REC

    listed = {s["name"]: s for s in client.get("/sdapi/v1/prompt-styles").get_json()}
    assert listed == {s.name: {"name": s.name, "prompt": s.prompt, "negative_prompt": s.negative_prompt}
                      for s in api.svc.config.styles}
    cinematic, line_art = listed["Cinematic"], listed["Line Art"]

    def wrap(style: dict, text: str, key: str = "prompt") -> str:
        return style[key].replace("{prompt}", text)

    body = {"prompt": "a cat <lora:tiny-sd-lora:0.5>", "negative_prompt": "dog", "seed": 3,
            "styles": ["cinematic", "Line Art"], **SMALL}
    r = client.post("/sdapi/v1/txt2img", json=body)
    assert r.status_code == 200, r.get_json()
    info = json.loads(r.get_json()["info"])
    assert REC.gens[-1]["prompt"] == wrap(line_art, wrap(cinematic, "a cat"))  # what the pipe got
    assert info["prompt"] == wrap(line_art, wrap(cinematic, body["prompt"])) == info["all_prompts"][0]
    assert info["negative_prompt"] == f"dog, {cinematic['negative_prompt']}, {line_art['negative_prompt']}"
    assert info["styles"] == ["cinematic", "Line Art"] and info["infotexts"][0].startswith(info["prompt"])
    png = Image.open(io.BytesIO(base64.b64decode(r.get_json()["images"][0])))
    assert png.info["parameters"].startswith(wrap(line_art, wrap(cinematic, "a cat")))
    [session] = api.svc.list_sessions(project="a1111")
    assert api.svc.list_jobs(session["id"])[-1]["params"]["styles"] == ["Cinematic", "Line Art"]
    # random: one style per image, drawn from its seed, the same on every call
    body = {"prompt": "a dog", "seed": 20, "batch_size": 3, "styles": ["random"], **SMALL}
    first = json.loads(client.post("/sdapi/v1/txt2img", json=body).get_json()["info"])["all_prompts"]
    again = json.loads(client.post("/sdapi/v1/txt2img", json=body).get_json()["info"])["all_prompts"]
    assert first == again == [g["prompt"] for g in REC.gens[-3:]]
    assert all(any(p == wrap(s, "a dog") for s in listed.values()) for p in first)
