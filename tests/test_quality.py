"""Quality switches (issue 15, item 8): FreeU, sharpness, guidance rescale and the SDXL refiner switch, on the
real pipes and tiny models, and their refusals at queue time."""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from multigen.pipes import Im2ImPipe, Prompt2ImPipe, load_base
from multigen.pipes import quality
from multigen.pipes.errors import InvalidValueError
from multigen.pipes.families import FAMILIES, FLUX, SD, SDXL
from multigen.pipes import spec as specs
from multigen.service.errors import ConfigError

SMALL = {"width": 64, "height": 64, "steps": 3, "guidance_scale": 6.0}


@pytest.fixture(scope="module")
def sd(models_dir: Path) -> Any:
    return load_base(models_dir / "tiny-sd", dtype="float32")[0]


@pytest.fixture(scope="module")
def sdxl(models_dir: Path) -> Any:
    return load_base(models_dir / "tiny-sdxl", dtype="float32")[0]


def _image(pipe: Any, seed: int = 3, **setup: Any) -> np.ndarray:
    pipe.setup(**SMALL, **setup)
    return np.asarray(pipe.gen({"prompt": "a red cube", "negative_prompt": "blurry", "seed": seed})).astype(int)


# ---- FreeU --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("base", ["sd", "sdxl"])
def test_freeu_changes_the_image_and_leaves_the_shared_unet_as_it_was(base: str, request: Any) -> None:
    model = request.getfixturevalue(base)
    pipe = Prompt2ImPipe(pipe=model)
    before = _image(pipe)
    with_freeu = _image(pipe, freeu=True)
    assert np.abs(with_freeu - before).max() > 0
    assert not np.array_equal(_image(pipe, freeu=True, freeu_b1=1.0, freeu_b2=1.0), with_freeu)  # factors count
    # the UNet is shared by every pipe object and job of the model: nothing of FreeU stays on it
    assert all(getattr(block, "b1", None) is None for block in model.unet.up_blocks)
    other = Im2ImPipe(pipe=model)  # another pipe class on the same base
    assert np.array_equal(_image(pipe), before)
    assert np.array_equal(_image(pipe, freeu=False), before)
    del other


@pytest.mark.slow
def test_freeu_factors_left_out_take_the_familys_recommendation(sd: Any, monkeypatch: Any) -> None:
    seen: list[dict[str, float]] = []
    original = type(sd.unet).enable_freeu

    def spy(unet: Any, **factors: float) -> None:
        seen.append(factors)
        original(unet, **factors)

    monkeypatch.setattr(type(sd.unet), "enable_freeu", spy)
    pipe = Prompt2ImPipe(pipe=sd)
    _image(pipe, freeu=True, freeu_s2=0.5)
    assert seen == [{"b1": 1.5, "b2": 1.6, "s1": 0.9, "s2": 0.5}]  # SD 1.5's, with the one given
    assert SDXL.quality_params["freeu_b1"] == 1.3 and SDXL.quality_params["freeu_b2"] == 1.4


@pytest.mark.slow
# ---- guidance rescale -----------------------------------------------------------------------------------------------
def test_guidance_rescale_reaches_the_diffusers_call_and_changes_the_image(sd: Any, monkeypatch: Any) -> None:
    pipe = Prompt2ImPipe(pipe=sd)
    before = _image(pipe)
    calls: list[dict[str, Any]] = []
    cls = type(pipe.pipe)
    original = cls.__call__

    @functools.wraps(original)  # its signature stays the pipeline's
    def spy(self: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(cls, "__call__", spy)
    rescaled = _image(pipe, guidance_rescale=0.7)
    assert calls[-1]["guidance_rescale"] == 0.7
    assert np.abs(rescaled - before).max() > 0
    _image(pipe)
    assert "guidance_rescale" not in calls[-1]  # off: diffusers' default


@pytest.mark.slow
def test_guidance_rescale_where_the_pipeline_takes_none_is_applied_by_the_hook(sd: Any) -> None:
    """StableDiffusionImg2ImgPipeline has no guidance_rescale: the UNet hook gives the same formula."""
    assert not quality.takes_argument(Im2ImPipe(pipe=sd).pipe, "guidance_rescale")
    pipe = Im2ImPipe(pipe=sd)
    image = Image.new("RGB", (64, 64), (90, 140, 200))

    def run(**extra: Any) -> np.ndarray:
        pipe.setup(image=image, steps=4, strength=0.75, guidance_scale=6.0, **extra)
        return np.asarray(pipe.gen({"prompt": "a red cube", "seed": 1})).astype(int)

    before = run()
    assert np.abs(run(guidance_rescale=0.7) - before).max() > 0
    assert np.array_equal(run(), before)  # the hook is gone


def test_the_hooks_guidance_rescale_equals_diffusers_formula() -> None:
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

    gen = torch.Generator().manual_seed(0)
    uncond, cond = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 4, 8, 8, generator=gen)
    scale, rescale = 7.0, 0.7
    want = rescale_noise_cfg(uncond + scale * (cond - uncond), cond, guidance_rescale=rescale)
    new_cond = quality.guidance_rescaled_cond(uncond, cond, scale, rescale)
    assert torch.allclose(uncond + scale * (new_cond - uncond), want, atol=1e-5)


@pytest.mark.slow
# ---- sharpness ------------------------------------------------------------------------------------------------------
def test_sharpness_changes_the_image_and_zero_does_not(sd: Any) -> None:
    pipe = Prompt2ImPipe(pipe=sd)
    before = _image(pipe)
    assert np.abs(_image(pipe, sharpness=30.0) - before).max() > 0
    assert np.array_equal(_image(pipe, sharpness=0.0), before)
    assert np.array_equal(_image(pipe), before)  # the hook is removed after the call


def test_the_anisotropic_filter_keeps_edges_of_the_guide_and_blurs_elsewhere() -> None:
    x = torch.zeros(1, 4, 16, 16)  # latents have 4 channels: their L1 distance across the edge is 8 sigmas
    x[..., :, 8:] = 1.0
    noisy = x + 0.2 * torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    out = quality.adaptive_anisotropic_filter(noisy, x)  # guided by the clean step
    assert (out[..., :, :8] < 0.15).all() and (out[..., :, 8:] > 0.85).all()  # the edge stays sharp
    assert (out - x).abs().mean() < (noisy - x).abs().mean() / 2  # the noise is smoothed away
    flat = quality.adaptive_anisotropic_filter(noisy, torch.zeros_like(x))  # no guide: a plain Gaussian blur
    assert (flat[..., :, 7] - flat[..., :, 8]).abs().max() < 0.5


@pytest.mark.slow
# ---- the refiner switch ---------------------------------------------------------------------------------------------
def test_refiner_switch_hands_over_to_the_refiner(sdxl: Any, models_dir: Path) -> None:
    pipe = Prompt2ImPipe(pipe=sdxl, refiner=models_dir / "tiny-sdxl-refiner")
    steps: list[tuple[int, int]] = []

    def run(**setup: Any) -> np.ndarray:
        pipe.setup(width=64, height=64, steps=4, guidance_scale=6.0, **setup)
        out = pipe.gen({"prompt": "a red cube", "seed": 5, "callback": lambda s, n, latents: steps.append((s, n))})
        return np.asarray(out).astype(int)

    plain = run()
    assert not pipe.refiner.loaded  # loaded only when a job asks for it
    refiner_unet = pipe.refiner.pipeline().unet
    base_calls, refiner_calls = [], []
    hooks = [sdxl.unet.register_forward_hook(lambda *a: base_calls.append(1)),
             refiner_unet.register_forward_hook(lambda *a: refiner_calls.append(1))]
    steps.clear()
    try:
        refined = run(refiner_switch=0.5)
    finally:
        for h in hooks:
            h.remove()
    # 4 Euler steps (timesteps 751, 501, 251, 1): the base runs those above the switch, the refiner the rest
    assert (len(base_calls), len(refiner_calls)) == (2, 2)
    assert steps == [(1, 4), (2, 4), (3, 4), (4, 4)]  # one progress over both parts
    assert refined.shape == plain.shape and np.abs(refined - plain).max() > 0
    assert pipe.get_config()["refiner"] == str(models_dir / "tiny-sdxl-refiner")
    assert pipe.get_config()["refiner_switch"] == 0.5
    assert np.array_equal(run(), plain)  # no switch: the base alone, as before


@pytest.mark.slow
def test_refiner_switch_without_a_refiner_is_refused_by_the_pipe(sdxl: Any) -> None:
    pipe = Prompt2ImPipe(pipe=sdxl)
    with pytest.raises(InvalidValueError) as e:
        pipe.setup(refiner_switch=0.8)
    assert e.value.param == "refiner_switch" and "refiner:" in str(e.value)
    for bad in (0.0, 1.0):
        with pytest.raises(InvalidValueError):
            Prompt2ImPipe(pipe=sdxl, refiner="models/tiny-sdxl-refiner").setup(refiner_switch=bad)


# ---- declarations and queue-time refusals ---------------------------------------------------------------------------
def test_only_the_unet_families_take_the_switches() -> None:
    names = {p.name for p in specs.QUALITY_PARAMS}
    for fam in FAMILIES:
        takes = fam.denoiser == "unet"
        assert (names <= set(fam.quality_params)) == takes, fam.name
        assert bool(names & set(fam.refused_params)) != takes, fam.name
    assert "refiner_switch" in SDXL.quality_params and "refiner_switch" not in SD.quality_params
    with pytest.raises(InvalidValueError) as e:
        FLUX.check_params({"sharpness": 2.0})
    assert e.value.param == "sharpness" and "SDXL, SD" in str(e.value)


@pytest.fixture()
def app(config_file: Path) -> Any:
    from helpers_service import api_app

    with api_app(config_file, start=False) as app:
        yield app


def _job(app: Any, model: str, pipe: str = "prompt2image", **params: Any) -> tuple[int, dict[str, Any]]:
    client = app.client()
    r = client.post("/api/v1/sessions", json={"project": "q", "pipe": pipe, "model": model})
    assert r.status_code == 201, r.get_json()
    sid = r.get_json()["session"]["id"]
    r = client.post(f"/api/v1/sessions/{sid}/jobs", json={"prompt": "x", **params})
    return r.status_code, r.get_json()


@pytest.mark.parametrize("name,value", [("freeu", True), ("freeu_b1", 1.2), ("sharpness", 2.0),
                                        ("guidance_rescale", 0.7)])
def test_a_switch_on_flux_is_a_400_naming_it(app: Any, name: str, value: Any) -> None:
    status, body = _job(app, "tiny-flux", **{name: value})
    assert status == 400 and body["error"]["field"] == name, body
    assert "FLUX" in body["error"]["message"] and "SDXL, SD" in body["error"]["message"]
    assert _job(app, "tiny-sd", **{name: value})[0] == 202


def test_refiner_switch_needs_a_configured_refiner(app: Any) -> None:
    status, body = _job(app, "tiny-sd", refiner_switch=0.8)
    assert status == 400 and body["error"]["field"] == "refiner_switch", body
    assert "refiner: <an SDXL base model>" in body["error"]["message"] and "base.tiny-sd" in body["error"]["message"]
    assert _job(app, "tiny-sdxl", refiner_switch=0.8)[0] == 202
    assert _job(app, "tiny-sdxl", refiner_switch=1.0)[0] == 400  # exclusive bounds
    assert _job(app, "tiny-sdxl", "image2image", refiner_switch=0.8)[1]["error"]["field"] == "refiner_switch"


@pytest.mark.slow
def test_the_service_gives_the_pipe_its_refiner_and_the_api_lists_the_ranges(app: Any, models_dir: Path) -> None:
    catalog = app.svc.catalog
    models = app.client().get("/api/v1/models").get_json()
    assert {m["name"]: m.get("refiner") for m in models["models"]}["tiny-sdxl"] == "tiny-sdxl-refiner"
    params = {p["name"]: p for p in next(p for p in models["pipes"] if p["classname"] == "Prompt2ImPipe")["params"]}
    assert (params["sharpness"]["min"], params["sharpness"]["max"]) == (0, 30)
    assert (params["guidance_rescale"]["min"], params["guidance_rescale"]["max"]) == (0, 1)
    assert (params["refiner_switch"]["min"], params["refiner_switch"]["max"]) == (0, 1)
    doc = app.client().get("/api/v1/openapi.json").get_json()
    props = doc["components"]["schemas"]["JobCreate_prompt2image"]["properties"]
    assert {"freeu", "freeu_b1", "freeu_b2", "freeu_s1", "freeu_s2", "sharpness", "guidance_rescale",
            "refiner_switch"} <= set(props)

    class Session:  # what pipe_kwargs reads of a SessionRecord
        pipe, model = "prompt2image", "tiny-sdxl"

    assert catalog.pipe_kwargs(Session())["refiner"] == str((models_dir / "tiny-sdxl-refiner").resolve())
    Session.model = "tiny-sd"
    assert "refiner" not in catalog.pipe_kwargs(Session())


def test_a_bad_refiner_fails_at_start_up(config_file: Path) -> None:
    from multigen.service.config import load_config

    models = config_file.parent / "models.yaml"
    text = models.read_text()
    models.write_text(text.replace("refiner: tiny-sdxl-refiner", "refiner: no-such-model"))
    with pytest.raises(ConfigError) as e:
        load_config(config_file)
    assert "base.tiny-sdxl.refiner" in str(e.value) and "no-such-model" in str(e.value)
    models.write_text(text.replace("refiner: tiny-sdxl-refiner", "refiner: tiny-sd"))
    with pytest.raises(ConfigError) as e:
        load_config(config_file)
    assert "is a SD model, not SDXL" in str(e.value)
    models.write_text(text.replace("    id: tiny-sd                           # a diffusers folder\n    type: SD\n",
                                   "    id: tiny-sd\n    type: SD\n    refiner: tiny-sdxl-refiner\n"))
    with pytest.raises(ConfigError) as e:
        load_config(config_file)
    assert "base.tiny-sd.refiner" in str(e.value) and "takes no refiner" in str(e.value)


def test_a1111_refiner_switch_at_maps_to_the_configured_refiner(api: Any) -> None:
    client = api.client()
    body = {"prompt": "x", "steps": 2, "width": 64, "height": 64,
            "override_settings": {"sd_model_checkpoint": "tiny-sdxl"}}
    r = client.post("/sdapi/v1/txt2img", json={**body, "refiner_checkpoint": "tiny-sdxl-refiner",
                                               "refiner_switch_at": 0.6})
    assert r.status_code == 200, r.get_json()
    [session] = api.svc.list_sessions(project="a1111")
    assert api.svc.list_jobs(session["id"])[0]["params"]["refiner_switch"] == 0.6
    r = client.post("/sdapi/v1/txt2img", json={**body, "refiner_checkpoint": "tiny-sd", "refiner_switch_at": 0.6})
    assert r.status_code == 422 and r.get_json()["detail"][0]["loc"] == ["body", "refiner_checkpoint"]
    assert "tiny-sdxl-refiner" in r.get_json()["detail"][0]["msg"]
    r = client.post("/sdapi/v1/txt2img", json={**body, "override_settings": {"sd_model_checkpoint": "tiny-sd"},
                                               "refiner_checkpoint": "tiny-sdxl-refiner", "refiner_switch_at": 0.6})
    assert r.status_code == 422 and r.get_json()["detail"][0]["loc"] == ["body", "refiner_checkpoint"]


def test_the_web_form_has_a_field_for_every_switch() -> None:
    """Advanced section: a field per parameter (its range comes from GET /api/v1/models, as for the others)."""
    root = Path(__file__).resolve().parent.parent / "service" / "web"
    page, script = (root / "index.html").read_text(), (root / "jobform.js").read_text()
    for param in specs.QUALITY_PARAMS + specs.CONFIGURED_PARAMS:
        assert f'data-param="{param.name}"' in page and f'id="{param.name}"' in page, param.name
        assert f'"{param.name}"' in script, param.name  # sent with the job (ADVANCED_NUMBERS / ADVANCED_FLAGS)
    assert 'id="freeu" name="freeu"' in page and "<select" in page.split('id="freeu"')[0][-200:]


@pytest.mark.slow
def test_the_service_runs_a_refined_job_and_records_the_refiner(config_file: Path, models_dir: Path) -> None:
    """The whole path: the catalog gives the pipe its refiner (models.yaml), the worker runs both parts."""
    import json

    from multigen.service import ServiceThread

    svc = ServiceThread(config_file).start()
    try:
        sid = svc.open_session("alice", "q", "prompt2image", "tiny-sdxl")["session_id"]
        job = svc.queue_gen(sid, prompt="a red cube", seeds=[4], width=64, height=64, steps=2, refiner_switch=0.5,
                            freeu=True, sharpness=10.0)
        assert svc.wait_idle(300)
        done = svc.get_job(job["job_id"])
        assert done["state"] == "succeeded", done["error"]
        sidecar = Path(svc.get_image_pathname(sid, 0)).with_suffix(".json")
        meta = json.loads(sidecar.read_text())
        text = json.dumps(meta)
        assert "tiny-sdxl-refiner" in text and '"refiner_switch": 0.5' in text and '"freeu": true' in text
    finally:
        svc.stop()
        svc.store.close()


def test_a_refiner_opens_no_session_of_its_own_and_says_what_it_is_for(client):
    """An SDXL refiner (text_encoder_2 only, aesthetic-score conditioning) is a models.yaml base entry so that a
    base can name it; a session on it is a 400 naming the model and saying how a refiner is used."""
    for pipe in ("prompt2image", "image2image"):
        r = client.post("/api/v1/sessions", json={"project": "p", "pipe": pipe, "model": "tiny-sdxl-refiner"})
        error = r.get_json()["error"]
        assert r.status_code == 400 and error["field"] == "model" and error["code"] == "unsupported_pipe", error
        assert "SDXL refiner" in error["message"] and "refiner:" in error["message"], error
    models = {m["name"]: m for m in client.get("/api/v1/models").get_json()["models"]}
    assert models["tiny-sdxl-refiner"]["pipes"] == [] and models["tiny-sdxl"]["refiner"] == "tiny-sdxl-refiner"
