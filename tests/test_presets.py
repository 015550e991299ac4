"""Performance presets and aspect ratios (service/presets.py): the built-in presets, config.yaml's
``presets:``, the job parameters ``performance`` and ``aspect_ratio`` at admission and on a real
tiny-model job (values read back from the image's metadata), the job's own LoRAs (``job_loras``),
``GET /api/v1/presets`` and the OpenAPI document."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from helpers_service import fake_config, open_session, queue_job, wait_job
from multigen.pipes import spec as specs
from multigen.pipes.families import FAMILIES
from multigen.pipes.families.flux import FAMILY as FLUX
from multigen.pipes.families.qwen_image import FAMILY as QWEN
from multigen.pipes.families.sd import FAMILY as SD
from multigen.pipes.families.sdxl import FAMILY as SDXL
from multigen.pipes.families.z_image import FAMILY as Z_IMAGE
from multigen.service import ServiceThread
from multigen.service.errors import ConfigError, InvalidInput
from multigen.service.presets import apply_job_presets, builtin_presets, nearest_size, parse_ratio, resolve_size

#: Fooocus' SDXL list (modules/flags.py ``sdxl_aspect_ratios``)
FOOOCUS_SDXL = ["704*1408", "704*1344", "768*1344", "768*1280", "832*1216", "832*1152", "896*1152", "896*1088",
                "960*1088", "960*1024", "1024*1024", "1024*960", "1088*960", "1088*896", "1152*896", "1152*832",
                "1216*832", "1280*768", "1344*768", "1344*704", "1408*704", "1472*704", "1536*640", "1600*640",
                "1664*576", "1728*576"]


# ---- the presets -------------------------------------------------------------------------------------------
def test_builtin_presets_follow_fooocus_and_suit_each_family():
    lib = builtin_presets()
    for fam in FAMILIES:
        assert {"speed", "quality", "extreme_speed"} <= set(lib.names(fam.name)), fam.name
        for preset in lib.by_family[fam.name].values():
            fam.check_params(preset.values)  # the family takes every value (flow schedulers for flow families)
            assert preset.description and preset.values["steps"] >= 1
    sdxl = {n: lib.get("SDXL", n) for n in lib.names("SDXL")}
    assert sdxl["speed"].values["steps"] == 30 and sdxl["quality"].values["steps"] == 60
    assert dict(sdxl["extreme_speed"].values) == {"steps": 8, "guidance_scale": 1.0, "scheduler": "lcm"}
    assert sdxl["extreme_speed"].lora == {"name": "sdxl-lcm-lora", "weight": 1.0}
    assert sdxl["lightning"].values["steps"] == 4 and sdxl["lightning"].lora["name"] == "sdxl-lightning-4step-lora"
    assert sdxl["hyper_sd"].values["steps"] == 4
    assert lib.get("FLUX", "speed").values["scheduler"] == "flow_euler"
    assert "guidance_scale" not in lib.get("FLUX", "quality").values  # Flux.1 Fill's 30 stays its own
    assert lib.get("Z_IMAGE", "speed").values == {"steps": 8, "guidance_scale": 0.0, "scheduler": "flow_euler"}
    # Fooocus' spellings name the same preset
    assert lib.get("SDXL", "Extreme Speed") is lib.get("SDXL", "extreme-speed") is sdxl["extreme_speed"]


def test_config_presets_override_builtins_key_by_key_and_add_new_ones(tmp_path):
    cfg = fake_config(tmp_path, presets={
        "SDXL": {"lightning": {"lora": {"name": "l-xl", "weight": 0.9}, "steps": 6},
                 "Turbo Draft": {"steps": 3, "scheduler": "euler_a", "guidance_scale": 2.0,
                                 "description": "mine"}},
        "sd": {"speed": {"guidance_scale": None}}})
    lightning = cfg.presets.get("SDXL", "lightning")
    assert lightning.source == "user" and lightning.lora == {"name": "l-xl", "weight": 0.9}
    assert dict(lightning.values) == {"steps": 6, "guidance_scale": 1.0, "scheduler": "euler",
                                      "timestep_spacing": "trailing"}
    assert cfg.presets.get("SDXL", "turbo_draft").values["steps"] == 3
    assert "guidance_scale" not in cfg.presets.get("SD", "speed").values  # null drops a built-in's value
    assert cfg.presets.get("SDXL", "quality").source == "builtin"
    listed = {(p["family"], p["name"]): p for p in cfg.presets.describe(cfg.models.lora)}
    assert listed[("SDXL", "lightning")]["lora"] == {"name": "l-xl", "weight": 0.9, "configured": True,
                                                    "note": None}
    assert listed[("SDXL", "extreme_speed")]["lora"]["configured"] is False  # sdxl-lcm-lora is not in models.yaml


@pytest.mark.parametrize("presets,key", [
    ({"SDXXL": {"x": {"steps": 4}}}, "presets.SDXXL"),
    ({"SDXL": {"x": {"stepz": 4}}}, "presets.SDXL.x.stepz"),
    ({"SDXL": {"x": {"steps": 0}}}, "presets.SDXL.x.steps"),
    ({"SDXL": {"x": {"guidance_scale": "high"}}}, "presets.SDXL.x.guidance_scale"),
    ({"FLUX": {"x": {"scheduler": "dpmpp_2m_karras"}}}, "presets.FLUX.x.scheduler"),
    ({"FLUX": {"x": {"timestep_spacing": "trailing"}}}, "presets.FLUX.x.timestep_spacing"),
    ({"SDXL": {"x": {"lora": {"name": "nope"}}}}, "presets.SDXL.x.lora.name"),
    ({"SDXL": {"x": {"lora": {"name": "l-sd"}}}}, "presets.SDXL.x.lora.name"),  # an SD LoRA for SDXL
    ({"SDXL": {"x": {"lora": {"name": "l-xl", "weight": 99}}}}, "presets.SDXL.x.lora.weight"),
    ({"SDXL": {"bad name!": {"steps": 4}}}, "presets.SDXL.bad name!"),
    ({"SDXL": ["speed"]}, "presets.SDXL"),
    (["speed"], "presets"),
])
def test_a_bad_config_preset_is_a_config_error_naming_the_key(tmp_path, presets, key):
    with pytest.raises(ConfigError) as e:
        fake_config(tmp_path, presets=presets)
    assert e.value.key == key and "Fix:" in e.value.message, e.value.message


def test_a_presets_lora_of_another_family_or_not_configured_is_not_used_and_the_job_says_why():
    from types import SimpleNamespace

    lib = builtin_presets()
    loras = {"sdxl-lcm-lora": SimpleNamespace(type="SD"), "sdxl-lightning-4step-lora": SimpleNamespace(type=None)}
    params = {"steps": 3}
    out = apply_job_presets(params, lib, SDXL, {}, loras)
    assert params == {"steps": 3} and out == {}  # neither named: nothing changes
    params = {"performance": "extreme_speed", "steps": 3}
    out = apply_job_presets(params, lib, SDXL, {}, loras)
    assert params == {"steps": 3, "guidance_scale": 1.0, "scheduler": "lcm"}  # the other values still apply
    assert "job_loras" not in out and out["performance_note"] == (
        "the preset's LoRA was not used: LoRA 'sdxl-lcm-lora' is for SD models, not SDXL")
    out = apply_job_presets({"performance": "lightning"}, lib, SDXL, {}, loras)  # a LoRA of no declared type
    assert out["job_loras"] == [{"name": "sdxl-lightning-4step-lora", "weight": 1.0}]


# ---- aspect ratios -----------------------------------------------------------------------------------------
def test_sdxl_sizes_include_fooocus_list():
    assert {tuple(int(x) for x in s.split("*")) for s in FOOOCUS_SDXL} <= set(SDXL.aspect_sizes)
    assert SDXL.aspect_sizes[0] == (1024, 1024)


@pytest.mark.parametrize("fam,ratio,size", [
    (SDXL, "1:1", (1024, 1024)), (SDXL, "16:9", (1344, 768)), (SDXL, "9:16", (768, 1344)),
    (SDXL, "4:3", (1152, 896)), (SDXL, "3:2", (1216, 832)), (SDXL, "21:9", (1536, 640)), (SDXL, "2:1", (1408, 704)),
    (SDXL, "3:1", (1728, 576)), (SDXL, "1:3", (576, 1728)), (SDXL, "15:14", (1024, 960)),
    (SD, "1:1", (512, 512)), (SD, "16:9", (640, 384)), (SD, "2:3", (512, 768)), (SD, "4:3", (576, 448)),
    (FLUX, "16:9", (1344, 768)), (FLUX, "3:4", (896, 1152)),
    (QWEN, "16:9", (1664, 928)), (QWEN, "1:1", (1328, 1328)), (QWEN, "4:3", (1472, 1140)),
    (Z_IMAGE, "16:9", (1280, 720)), (Z_IMAGE, "4:3", (1152, 864)),
])
def test_an_aspect_ratio_picks_the_familys_nearest_trained_size(fam, ratio, size):
    w, h = parse_ratio(ratio)
    assert nearest_size(w / h, fam) == size
    assert size in fam.aspect_sizes


def test_a_tie_goes_to_the_larger_size_then_the_earlier_one():
    from dataclasses import replace

    # 2:1 lies halfway (in log space) between 1:1 and 4:1
    assert nearest_size(2.0, replace(SD, aspect_sizes=((512, 512), (768, 192)))) == (512, 512)
    assert nearest_size(2.0, replace(SD, aspect_sizes=((512, 512), (1152, 288)))) == (1152, 288)
    assert nearest_size(2.0, replace(SD, aspect_sizes=((512, 512), (1024, 256)))) == (512, 512)


def test_ratio_spellings_sizes_scaled_to_a_declared_model_size_and_explicit_sides():
    assert parse_ratio("16x9") == parse_ratio("16×9") == parse_ratio(" 16 : 9 ") == parse_ratio("16*9") == (16, 9)
    assert parse_ratio("1.85:1") == (1.85, 1.0)
    # a model that declares its size (models.yaml defaults) gets the family's list scaled to it
    assert nearest_size(16 / 9, SD, (128, 128)) == (160, 96)
    assert nearest_size(16 / 9, SDXL, (1024, 1024)) == (1344, 768)
    assert nearest_size(16 / 9, SD, (64, 64)) == (104, 64)  # never below 64 px: scaled up, the ratio kept
    assert nearest_size(9 / 16, SDXL, (64, 64)) == (64, 112)
    # explicit sides win; one side: the other follows the ratio, in the family's size multiple
    assert resolve_size("16:9", SDXL, 1000, 500) == ("16:9", 1000, 500)
    assert resolve_size("16:9", SDXL, 1024, None) == ("16:9", 1024, 576)
    assert resolve_size("16:9", QWEN, None, 720) == ("16:9", 1280, 720)
    assert resolve_size("2:1", None, 512, None) == ("2:1", 512, 256)  # a family unknown until load: multiple 8
    assert resolve_size("2:1", SD, "wide", None) == ("2:1", "wide", None)  # left to the setup checks to name
    with pytest.raises(InvalidInput) as e:
        resolve_size("2:1", None, None, None)
    assert e.value.field == "aspect_ratio"


@pytest.mark.parametrize("bad", ["16-9", "wide", "0:1", "5:1", "1:5", "", "16:9:1", 1.5, None])
def test_a_bad_ratio_names_aspect_ratio_and_the_form(bad):
    with pytest.raises(InvalidInput) as e:
        parse_ratio(bad)
    assert e.value.field == "aspect_ratio" and '"16:9"' in e.value.message and "1:4 to 4:1" in e.value.message


# ---- admission through the service (not started: nothing runs) ---------------------------------------------
@pytest.fixture()
def admission(config_file):
    svc = ServiceThread(config_file)
    yield svc
    svc.stop()
    svc.store.close()


def test_admission_resolves_ratios_for_sd_sdxl_and_flow_families_and_charges_that_size(admission):
    expect = {"tiny-sd": (640, 384), "tiny-sdxl": (1344, 768), "tiny-flux": (1344, 768),
              "tiny-qwen-image": (1664, 928), "tiny-z-image": (1280, 720)}
    for model, (w, h) in expect.items():
        sid = admission.open_session("alice", "ratios", "prompt2image", model)["session_id"]
        out = admission.queue_gen(sid, prompt="x", aspect_ratio="16x9", steps=2)
        params = out["job"]["params"]
        assert (params["width"], params["height"], params["aspect_ratio"]) == (w, h, "16:9"), model
    sid = admission.open_session("alice", "ratios", "prompt2image", "tiny-sdxl")["session_id"]
    params = admission.queue_gen(sid, prompt="x", aspect_ratio="9:16", width=512, height=512)["job"]["params"]
    assert (params["width"], params["height"]) == (512, 512)  # the job's own sides win
    params = admission.queue_gen(sid, prompt="x", aspect_ratio="2:1", width=1024, performance="lightning")["job"]
    assert (params["params"]["width"], params["params"]["height"]) == (1024, 512)
    # the cost estimate is taken at the resolved size and the preset's steps (4): megapixel-steps
    assert params["params"]["steps"] == 4 and params["params"]["performance"] == "lightning"
    assert params["params"]["performance_note"].startswith("the preset's LoRA was not used: LoRA "
                                                           "'sdxl-lightning-4step-lora' is not configured")
    assert "job_loras" not in params["params"]
    with pytest.raises(InvalidInput) as e:
        admission.queue_gen(sid, prompt="x", aspect_ratio="8:1")
    assert e.value.field == "aspect_ratio"
    with pytest.raises(InvalidInput) as e:
        admission.queue_gen(sid, prompt="x", performance="ludicrous")
    assert e.value.field == "performance" and "speed, quality, extreme_speed, lightning, hyper_sd" in e.value.message


def test_the_cost_estimate_is_taken_at_the_resolved_size_and_the_presets_steps(config_file):
    text = config_file.read_text()
    config_file.write_text(text.replace("max_megapixel_steps_per_job: 20000", "max_megapixel_steps_per_job: 1"))
    svc = ServiceThread(config_file)
    try:
        sid = svc.open_session("alice", "cost", "prompt2image", "tiny-sdxl")["session_id"]
        svc.queue_gen(sid, prompt="x", width=64, height=64, steps=2)  # 0.008 megapixel-steps
        with pytest.raises(InvalidInput) as e:  # 1344 x 768 x 2 steps: 2.1
            svc.queue_gen(sid, prompt="x", aspect_ratio="16:9", steps=2)
        assert "max_megapixel_steps_per_job" in e.value.message and "1344x768" in e.value.message
        svc.queue_gen(sid, prompt="x", width=256, height=256, steps=2)  # 0.13
        with pytest.raises(InvalidInput) as e:  # the same at quality's 60 steps: 3.9
            svc.queue_gen(sid, prompt="x", width=256, height=256, performance="quality")
        assert "60" in e.value.message, e.value.message
    finally:
        svc.stop()
        svc.store.close()


# ---- the API -----------------------------------------------------------------------------------------------
def test_the_api_refuses_unknown_presets_and_bad_ratios_with_a_400_and_lists_presets(api, client):
    session = open_session(client)
    r = client.post(f"/api/v1/sessions/{session['id']}/jobs", json={"prompt": "x", "performance": "lightning"})
    body = r.get_json()["error"]
    assert r.status_code == 400 and body["field"] == "performance", body
    assert "known: speed, quality, extreme_speed, hyper_sd" in body["message"]  # tiny-sd is SD: no lightning
    r = client.post(f"/api/v1/sessions/{session['id']}/jobs", json={"prompt": "x", "aspect_ratio": "wide"})
    assert r.status_code == 400 and r.get_json()["error"]["field"] == "aspect_ratio"
    assert api.svc.list_jobs(session["id"]) == []
    job = queue_job(client, session["id"], aspect_ratio="1:1", width=64, height=64, performance="Quality",
                    steps=2, scheduler="euler")
    assert job["params"]["performance"] == "quality" and job["params"]["steps"] == 2
    assert job["params"]["guidance_scale"] == 7.0 and job["params"]["scheduler"] == "euler"
    presets = client.get("/api/v1/presets").get_json()["presets"]
    sd = [p for p in presets if p["family"] == "SD"]
    assert [p["name"] for p in sd] == ["speed", "quality", "extreme_speed", "hyper_sd"]
    assert sd[0]["sets"] == {"steps": 30, "guidance_scale": 7.0, "scheduler": "dpmpp_2m_karras"}
    assert {p["family"] for p in presets} == {f.name for f in FAMILIES}
    doc = client.get("/api/v1/openapi.json").get_json()
    assert doc["paths"]["/api/v1/presets"]["get"]["responses"]["200"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/PresetList"}
    props = doc["components"]["schemas"]["JobCreate_prompt2image"]["properties"]
    assert "1:4 to 4:1" in props["aspect_ratio"]["description"]
    assert props["aspect_ratio"]["pattern"] == specs.ASPECT_RATIO_PATTERN
    assert "GET /api/v1/presets" in props["performance"]["description"]
    assert {"performance", "aspect_ratio"} <= {p["name"] for p in client.get("/api/v1/models").get_json()["job_params"]}


def test_job_loras_come_on_top_of_the_sessions_and_replace_a_weight(admission):
    cat = admission.catalog
    files = cat.job_lora_files([{"name": "tiny-sd-lora", "weight": 0.5}], [{"name": "tiny-sd-lora", "weight": 0.9}])
    assert files == [(str(cat.models.lora["tiny-sd-lora"].path), 0.9)]
    assert cat.job_lora_files([], None) == []


@pytest.mark.parametrize("where, field", [("tag", "job_loras"), ("session", "loras")])
def test_a_lora_removed_from_models_yaml_before_the_job_runs_fails_it_naming_the_lora(make_api, where, field):
    api = make_api(start=False)
    client = api.client()
    session = open_session(client, loras=[{"name": "tiny-sd-lora"}] if where == "session" else [])
    prompt = "x <lora:tiny-sd-lora:0.5>" if where == "tag" else "x"
    job = queue_job(client, session["id"], prompt=prompt, steps=2)
    del api.svc.catalog.models.lora["tiny-sd-lora"]  # as a restart with an edited models.yaml leaves it
    api.svc.start()
    done = wait_job(client, job["id"])
    assert done["state"] == "failed", done
    error = done["error"]
    assert error["field"] == field, error
    assert "'tiny-sd-lora'" in error["message"] and "models.yaml" in error["message"], error


# ---- a real job on the tiny models -------------------------------------------------------------------------
@pytest.fixture()
def real(config_file):
    """A started service on the real pipes; tiny-sd declares 128 px, a built-in preset's LoRA is configured
    (the tiny SD LoRA under Hyper-SD's name) and config.yaml adds a preset."""
    models = config_file.parent / "models.yaml"
    data = yaml.safe_load(models.read_text())
    data["base"]["tiny-sd"]["defaults"] = {"width": 128, "height": 128}
    data["lora"]["sd-hyper-sd-4step-lora"] = {"id": "loras/tiny-sd-lora.safetensors", "type": "SD"}
    models.write_text(yaml.safe_dump(data))
    with config_file.open("a") as f:
        f.write("\npresets:\n  SD:\n    draft:\n      steps: 3\n      scheduler: euler_a\n      guidance_scale: 2.5\n"
                "      lora: {name: tiny-sd-lora, weight: 0.8}\n")
    svc = ServiceThread(config_file).start()
    yield svc
    svc.stop()
    svc.store.close()


def _image(svc, job_id):
    job = svc.get_job(job_id)
    assert job["state"] == "succeeded", job["error"]
    image = job["images"][0]
    return svc.image_metadata(image["id"]), np.asarray(Image.open(svc.image_file(image["id"])).convert("RGB"))


@pytest.mark.slow
def test_presets_and_ratios_reach_the_pipe_and_the_presets_lora_is_this_jobs_only(real):
    sid = real.open_session("alice", "presets", "prompt2image", "tiny-sd")["session_id"]
    small = dict(width=64, height=64, seeds=[5])
    before = real.queue_gen(sid, prompt="a cube", steps=2, **small)["job_id"]
    draft = real.queue_gen(sid, prompt="a cube", performance="draft", steps=2, **small)["job_id"]
    after = real.queue_gen(sid, prompt="a cube", steps=2, **small)["job_id"]
    hyper = real.queue_gen(sid, prompt="a cube", performance="hyper_sd", aspect_ratio="16:9", seeds=[6])["job_id"]
    assert real.wait_idle(300)
    meta_before, px_before = _image(real, before)
    meta, px = _image(real, draft)
    cfg = meta["pipe_config"]
    # the job's own steps win; the preset's scheduler, guidance and LoRA fill in the rest
    assert (cfg["steps"], cfg["scheduler"], cfg["guidance_scale"]) == (2, "euler_a", 2.5)
    assert cfg["loras"] == [["tiny-sd-lora", 0.8]]
    assert meta["performance"] == "draft" and meta["job_loras"] == [{"name": "tiny-sd-lora", "weight": 0.8}]
    assert meta["loras"] == []  # the session's own: none
    assert not np.array_equal(px, px_before)
    # the next job of the session has no LoRA again: the same pixels as the job before the preset's
    meta_after, px_after = _image(real, after)
    assert meta_after["pipe_config"]["loras"] == [] and "performance" not in meta_after
    assert np.array_equal(px_after, px_before)
    # a built-in preset whose LoRA is configured, with an aspect ratio on the model's declared 128 px
    meta, px = _image(real, hyper)
    cfg = meta["pipe_config"]
    assert (cfg["steps"], cfg["scheduler"], cfg["timestep_spacing"], cfg["guidance_scale"]) == (
        4, "ddim", "trailing", 1.0)
    # (pipe_config names the file by one of its models.yaml names: the tiny LoRA has two)
    assert [w for _, w in cfg["loras"]] == [1.0] and "performance_note" not in meta
    assert meta["job_loras"] == [{"name": "sd-hyper-sd-4step-lora", "weight": 1.0}]
    assert px.shape[:2] == (96, 160) and (meta["width"], meta["height"]) == (160, 96)
    assert meta["aspect_ratio"] == "16:9" and meta["performance"] == "hyper_sd"
    sidecar = Path(real.image_file(real.get_job(hyper)["images"][0]["id"])).with_suffix(".json")
    assert json.loads(sidecar.read_text())["aspect_ratio"] == "16:9"
