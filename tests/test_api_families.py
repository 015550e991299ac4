"""Model families above the pipes: ``GET /api/v1/models`` says each model's family and what the family
runs, takes and refuses; the OpenAPI document says which families take the family-only parameters; and
what a family cannot run or take is a 400 naming the field when a session opens or a job is queued, over
HTTP and through ``queue_gen`` alike, before anything is queued.

The service runs on fake pipes (``helpers_service.api_app``, not started: jobs stay queued) over the
embedded config plus one model of every family (declared types; the fakes load nothing), the tiny Flux
folder declared and detected, and a model whose family cannot be told from its files. Every expectation
is computed from the families' declarations, so a family added or changed is tested as it is declared.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from multigen.pipes import spec as specs
from multigen.pipes.families import FAMILIES, FLUX, SD, Family, family
from multigen.pipes.registry import pipe_role
from multigen.pipes.schedulers import FLOW_SCHEDULERS, family_schedulers, list_schedulers
from multigen.service.config import KNOWN_PIPE_CLASSES
from multigen.service.errors import InvalidInput

ROOT = Path(__file__).resolve().parent.parent
#: a value other than the default of each parameter a family may refuse (a default is never refused)
NOT_DEFAULT = {"clip_skip": 1, "timestep_spacing": "trailing", "true_cfg_scale": 2.0, "max_sequence_length": 64,
               "freeu": True, "freeu_b1": 1.2, "freeu_b2": 1.3, "freeu_s1": 0.8, "freeu_s2": 0.3, "sharpness": 2.0,
               "guidance_rescale": 0.7, "image_prompt_weights": 0.5, "image_prompt_stop_at": 0.5,
               # a 1x1 PNG; the message counts images rather than quoting them (IMAGE_VALUES)
               "image_prompts": ["data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGNgYGAA"
                                 "AAAEAAH2FzhVAAAAAElFTkSuQmCC"]}
#: refused parameters whose message shows how many images they hold, not their value
IMAGE_VALUES = {"image_prompts": "(1 image)"}
CONTROLNET_ROLES = ("controlnet", "controlnet_image2image")


def runs_plain(fam: Family, classname: str) -> bool:
    """Whether a plain model of ``fam`` (no variant) runs the pipe class."""
    role = pipe_role(classname)
    return fam.runs(role) and role not in fam.variant_roles


def model_of(fam: Family) -> str:
    """The models.yaml name of this test's model of ``fam`` (declared type, any folder: nothing loads)."""
    return f"any-{fam.name.lower()}"


def _config(root: Path, models_dir: Path) -> Path:
    """The embedded config in ``root/config`` (its ``../data`` and other folders then in ``root``), plus this
    test's models and a pipe of every pipe class."""
    folder = root / "config"
    folder.mkdir()
    models = yaml.safe_load((ROOT / "config" / "models.yaml").read_text())
    for fam in FAMILIES:
        models["base"][model_of(fam)] = {"id": "tiny-sd", "type": fam.name}
        models.setdefault("controlnet", {})[f"cn-{fam.name.lower()}"] = {"id": "tiny-controlnet-sd", "type": fam.name}
    models["base"]["fam-flux"] = {"id": "tiny-flux", "type": "FLUX"}
    models["base"]["fam-flux-detected"] = {"id": "tiny-flux"}  # told from its files
    models["base"]["fam-unknown"] = {"id": "loras"}  # a folder of no family: unknown until loaded
    have = {p["classname"] for p in models["pipes"].values()}
    for classname in KNOWN_PIPE_CLASSES:  # one pipe of every class, to try each against each family
        if classname not in have:
            role = pipe_role(classname).value
            models["pipes"][classname.lower()] = {"name": classname, "classname": classname, "need_imgs": True,
                                                  "needs_cnet": role in CONTROLNET_ROLES}
    (folder / "models.yaml").write_text(yaml.safe_dump(models, sort_keys=False))
    text = (ROOT / "config" / "config.yaml").read_text().replace("model_dir: ../models", f"model_dir: {models_dir}")
    (folder / "config.yaml").write_text(text)
    return folder / "config.yaml"


@pytest.fixture(scope="module")
def app(models_dir, tmp_path_factory):
    from helpers_service import api_app

    with api_app(_config(tmp_path_factory.mktemp("families"), models_dir), start=False) as app:
        yield app


@pytest.fixture(scope="module")
def body(app) -> dict[str, Any]:
    return app.client().get("/api/v1/models").get_json()


def _session(app: Any, model: str, pipe: str = "prompt2image") -> str:
    r = app.client().post("/api/v1/sessions", json={"project": "fam", "pipe": pipe, "model": model})
    assert r.status_code == 201, r.get_json()
    return r.get_json()["session"]["id"]


def _job(app: Any, sid: str, **params: Any) -> tuple[int, dict[str, Any]]:
    r = app.client().post(f"/api/v1/sessions/{sid}/jobs", json={"prompt": "x", **params})
    return r.status_code, r.get_json()


def _queue_gen(app: Any, sid: str, **params: Any) -> InvalidInput | None:
    try:
        app.svc.queue_gen(sid, prompt="x", **params)
    except InvalidInput as e:
        return e
    return None


# ---- GET /api/v1/models --------------------------------------------------------------------------------------
def test_families_are_listed_once_with_what_each_runs_and_takes(body):
    by_name = {f["name"]: f for f in body["families"]}
    assert list(by_name) == [f.name for f in FAMILIES[::-1]]
    for fam in FAMILIES:
        item = by_name[fam.name]
        assert {k: item[k] for k in ("title", "roles", "params", "refused_params", "loras", "negative_prompt",
                                     "prompt_weighting")} == {
            "title": fam.title, "roles": [r.value for r in fam.roles], "params": sorted(fam.params),
            "refused_params": list(fam.refused_params), "loras": fam.supports_loras,
            "negative_prompt": fam.negative_prompts, "prompt_weighting": fam.weighted_prompts}
        assert item["schedulers"] == family_schedulers(fam.schedulers)
        assert item["aspect_sizes"] == [list(s) for s in fam.aspect_sizes]
        assert item["param_defaults"] == dict(fam.param_defaults)
        assert item["pipelines"] == {r.value: fam.pipelines[r] for r in fam.roles}
        for role, classes in item["pipe_classes"].items():  # every pipe class that runs the role, no other
            assert classes and all(pipe_role(c).value == role for c in classes)
    flux = by_name["FLUX"]
    assert flux["schedulers"] == list(FLOW_SCHEDULERS) and "flow_euler" in flux["schedulers"]
    assert {"clip_skip", "timestep_spacing"} <= set(flux["refused_params"])
    assert flux["pipelines"]["text2image"] == "FluxPipeline" and flux["pipe_classes"]["text2image"] == ["Prompt2ImPipe"]
    assert by_name["SD"]["schedulers"] == list_schedulers() == body["schedulers"]  # the top level: SD-style
    assert {"true_cfg_scale", "max_sequence_length"} <= set(by_name["SD"]["refused_params"])


def test_each_model_names_its_family_and_the_pipes_it_runs(app, body):
    models = {m["name"]: m for m in body["models"]}
    pipes = app.svc.config.models.pipes
    for fam in FAMILIES:
        item = models[model_of(fam)]
        assert item["family"] == item["type"] == fam.name
        # a plain model (these are tiny-sd's folder under each family's name) runs its family's tasks but
        # those only a variant runs (editing: a Kontext or Qwen-Image-Edit model)
        assert item["pipes"] == [n for n, e in pipes.items() if runs_plain(fam, e.classname)]
    assert models["fam-flux"]["family"] == models["fam-flux-detected"]["family"] == "FLUX"
    assert models["fam-flux-detected"]["type"] is None  # what models.yaml says stays as it was
    assert models["fam-flux"]["native_size"] == [1024, 1024]
    assert models["tiny-sd"]["family"] == "SD" and models["tiny-sdxl"]["family"] == "SDXL"
    unknown = models["fam-unknown"]
    assert unknown["family"] is None and unknown["pipes"] == list(pipes)  # the pipe checks it when it loads
    assert {p["name"]: p["role"] for p in body["pipes"]} == {n: pipe_role(e.classname).value for n, e in pipes.items()}


def test_pipe_params_say_which_families_take_or_refuse_them(body):
    for pipe in body["pipes"]:
        params = {p["name"]: p for p in pipe["params"]}
        for param in specs.FAMILY_PARAMS:
            assert params[param.name]["families"] == [f.name for f in FAMILIES[::-1] if param.name in f.params]
            assert params[param.name]["description"] == param.description  # the spec's, unchanged
        refused = params["clip_skip"].get("refused_by", [])
        assert refused == [f.name for f in FAMILIES[::-1] if "clip_skip" in f.refused_params] and "FLUX" in refused
        assert "families" not in params["steps"] and "refused_by" not in params["steps"]


def test_openapi_descriptions_name_the_families_from_their_declarations(app):
    doc = app.client().get("/api/v1/openapi.json").get_json()
    props = doc["components"]["schemas"]["JobCreate_prompt2image"]["properties"]
    for param in specs.FAMILY_PARAMS:
        takes = [f.name for f in FAMILIES[::-1] if param.name in f.params]
        text = props[param.name]["description"]
        kind = "model type" if len(takes) == 1 else "model types"
        assert takes and text.endswith(f"; only {kind} {', '.join(takes)} take{'s' * (len(takes) == 1)} it"), text
    assert "FLUX" in props["clip_skip"]["description"] and "FLUX" in props["timestep_spacing"]["description"]
    assert "flow_euler" in props["scheduler"]["description"]
    assert "refuse" not in props["steps"]["description"]


# ---- session open: the pipe's task ------------------------------------------------------------------------------
def test_a_pipe_whose_task_the_family_does_not_run_is_refused_when_the_session_opens(app):
    client = app.client()
    pipes = app.svc.config.models.pipes
    refused = 0
    for fam in FAMILIES:
        for name, entry in pipes.items():
            body = {"project": "fam", "pipe": name, "model": model_of(fam)}
            r = client.post("/api/v1/sessions", json=body)
            if runs_plain(fam, entry.classname):
                assert r.status_code == 201, (fam.name, name, r.get_json())
                continue
            refused += 1
            err = r.get_json()["error"]
            assert r.status_code == 400 and err["field"] == "pipe" and err["code"] == "unsupported_pipe", err
            assert name in err["message"] and pipe_role(entry.classname).value in err["message"]
            usable = [n for n, e in pipes.items() if runs_plain(fam, e.classname)]
            assert f"pipes usable with model {model_of(fam)!r}: {', '.join(usable) or 'none'}" in err["message"]
            with pytest.raises(InvalidInput) as e:  # the service says the same from Python
                app.svc.create_session("local", "fam", name, model_of(fam))
            assert e.value.field == "pipe" and e.value.message == err["message"]
    assert refused, "no family refuses any configured pipe: the refusal is not exercised"


# ---- job queue time: parameters and schedulers ----------------------------------------------------------------
def test_what_a_family_refuses_is_a_400_naming_the_field_and_nothing_is_queued(app):
    checked = 0
    for fam in FAMILIES:
        sid = _session(app, model_of(fam))
        for name in fam.refused_params:
            status, err = _job(app, sid, **{name: NOT_DEFAULT[name]})
            assert status == 400 and err["error"]["field"] == name, (fam.name, name, err)
            message = err["error"]["message"]
            shown = IMAGE_VALUES.get(name, repr(NOT_DEFAULT[name]))
            assert fam.name in message and shown in message and "allowed" in message, message
            if name in {p.name for p in specs.FAMILY_PARAMS}:  # names the model types that take it
                assert all(f.name in message for f in FAMILIES if name in f.params), message
            e = _queue_gen(app, sid, **{name: NOT_DEFAULT[name]})
            assert e is not None and e.field == name and e.message == message
            checked += 1
        for name in fam.params:  # its own are taken
            assert _job(app, sid, **{name: NOT_DEFAULT[name]})[0] == 202 and _queue_gen(app, sid, **{name: NOT_DEFAULT[name]}) is None
        if "clip_skip" in fam.refused_params:  # 0 is clip_skip's "normal output": not refused
            assert _job(app, sid, clip_skip=0)[0] == 202
        queued = app.client().get(f"/api/v1/sessions/{sid}/jobs").get_json()["jobs"]
        assert len(queued) == 2 * len(fam.params) + ("clip_skip" in fam.refused_params)  # only the accepted ones
    assert checked >= 4  # clip_skip and timestep_spacing on Flux, the family-only ones on SD at least


def test_schedulers_are_checked_against_the_models_family(app):
    for fam in FAMILIES:
        sid = _session(app, model_of(fam))
        allowed = family_schedulers(fam.schedulers)
        for name in allowed[:1] + [n.upper() for n in allowed[:1]]:  # case-insensitive, as the pipes
            assert _job(app, sid, scheduler=name)[0] == 202, (fam.name, name)
        other = [n for n in ("euler_a", "flow_euler") if n not in allowed and n.upper() not in allowed]
        for name in other + ["no-such-sampler"]:
            status, err = _job(app, sid, scheduler=name)
            assert status == 400 and err["error"]["field"] == "scheduler", (fam.name, name, err)
            message = err["error"]["message"]
            assert fam.name in message and (allowed[0] if allowed else "leave it out") in message, message
            e = _queue_gen(app, sid, scheduler=name)
            assert e is not None and e.field == "scheduler"
    flux = _session(app, "fam-flux-detected")  # a detected family is checked as a declared one
    status, err = _job(app, flux, scheduler="DPM++ 2M Karras")
    assert status == 400 and "SD-style" in err["error"]["message"] and "flow_lcm" in err["error"]["message"]
    assert _job(app, flux, scheduler="Flow Euler Karras")[0] == 202
    sd = _session(app, "tiny-sd")
    status, err = _job(app, sd, scheduler="flow_euler")
    assert status == 400 and "flow-matching" in err["error"]["message"] and "dpmpp_2m" in err["error"]["message"]


def test_family_only_parameters_at_their_edges_on_a_family_that_takes_them(app):
    for param in specs.FAMILY_PARAMS:
        takers = [f for f in FAMILIES if param.name in f.params]
        assert takers, f"no family takes {param.name}"
        sid = _session(app, model_of(takers[0]))
        step = 1 if param.type is specs.ParamType.INT else 0.01
        for value, ok in ((param.minimum, True), (param.minimum - step, False), (param.maximum, True),
                          (param.maximum + step, False)):
            status, err = _job(app, sid, **{param.name: value})
            assert (status == 202) == ok and (ok or err["error"]["field"] == param.name), (param.name, value, err)
            e = _queue_gen(app, sid, **{param.name: value})
            assert (e is None) == ok and (ok or e.field == param.name), (param.name, value, e)


def test_a_model_of_unknown_family_is_checked_by_the_pipe_when_it_loads(app):
    sid = _session(app, "fam-unknown")
    assert _job(app, sid, scheduler="flow_euler")[0] == 202 and _job(app, sid, scheduler="euler_a")[0] == 202
    assert _job(app, sid, true_cfg_scale=2.0)[0] == 202
    status, err = _job(app, sid, scheduler="no-such-sampler")  # a name of no kind is refused all the same
    assert status == 400 and err["error"]["field"] == "scheduler"


def test_family_checks_come_from_the_declarations_the_pipes_use():
    """The service asks the same ``Family.check_params`` the pipes' setup asks: one rule, two callers."""
    assert FLUX.refused_params[:2] == ("clip_skip", "timestep_spacing") and SD.refused_params == tuple(
        p.name for p in specs.FAMILY_PARAMS)
    FLUX.check_params({"scheduler": "flow_lcm", "true_cfg_scale": 2.0, "clip_skip": 0})
    for params, field in (({"scheduler": "ddim"}, "scheduler"), ({"timestep_spacing": "leading"}, "timestep_spacing"),
                          ({"clip_skip": 2}, "clip_skip")):
        with pytest.raises(Exception) as e:
            FLUX.check_params(params)
        assert e.value.param == field and "FLUX" in str(e.value)
    assert family("flux") is FLUX


def test_what_a_model_runs_is_read_from_its_folder(app, body):
    """A Flux.1 Fill folder inpaints only, a plain Flux.1 or Qwen-Image folder does not edit, a Kontext or
    Qwen-Image-Edit folder does: told from the configs when the session opens, before anything loads."""
    models = {m["name"]: m for m in body["models"]}
    assert models["tiny-flux-fill"]["pipes"] == ["masked_image2image", "inpainting"]
    assert "edit" in models["tiny-flux-kontext"]["pipes"] and "edit" in models["tiny-qwen-image-edit"]["pipes"]
    assert "edit" not in models["tiny-flux"]["pipes"] and "edit" not in models["tiny-qwen-image"]["pipes"]
    client = app.client()
    for model, pipe in (("tiny-flux-fill", "prompt2image"), ("tiny-flux", "edit"), ("tiny-qwen-image", "edit")):
        r = client.post("/api/v1/sessions", json={"project": "fam", "pipe": pipe, "model": model})
        err = r.get_json()["error"]
        assert r.status_code == 400 and err["field"] == "pipe" and err["code"] == "unsupported_pipe", err
    for model in ("tiny-flux-kontext", "tiny-qwen-image-edit"):
        r = client.post("/api/v1/sessions", json={"project": "fam", "pipe": "edit", "model": model})
        assert r.status_code == 201, r.get_json()


def test_cost_estimates_use_the_familys_and_variants_defaults(config_file):
    """A job that sets no steps is estimated (budgets, per-job ceiling) at what its pipe will run: the
    family's defaults (Flux.1 28 steps, Z-Image-Turbo 8), a variant's over them (Fill 50), models.yaml's
    `defaults:` over both."""
    from multigen.service.catalog import ModelCatalog
    from multigen.service.config import load_config

    cfg = load_config(config_file)
    catalog = ModelCatalog(cfg.models, cfg.model_dir)
    assert catalog.expected_defaults("tiny-flux")["steps"] == 28
    assert catalog.expected_defaults("tiny-flux-fill")["steps"] == 50
    assert catalog.expected_defaults("tiny-z-image")["steps"] == 8
    assert catalog.expected_defaults("demo")["steps"] == 20  # models.yaml's defaults win
    assert "steps" not in catalog.expected_defaults("tiny-sd")  # the spec's default then
