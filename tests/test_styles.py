"""Prompt styles (service/styles.py): the built-in library, the users' files, how styles wrap a prompt,
``random``, the job parameter ``styles`` through the service and the session API, ``GET /api/v1/styles``.
The A1111 dialect's use of them: test_a1111.py."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from helpers_service import REC, fake_config, fake_service, open_fake_session, open_session, queue_job, wait_job
from multigen.pipes import spec as specs
from multigen.pipes.cfgen import expand_prompt
from multigen.service.errors import ConfigError, InvalidInput
from multigen.service.styles import (BUILTIN_FILE, PLACEHOLDER, RANDOM, Style, StyleLibrary, UnknownStyleError,
                                     load_styles, merge)

BUILTIN = load_styles(None)


# ---- the library -------------------------------------------------------------------------------------------
def test_the_builtin_library_has_about_a_hundred_valid_styles():
    styles = list(BUILTIN)
    assert 90 <= len(styles) <= 130
    names = [s.name.casefold() for s in styles]
    assert len(set(names)) == len(names) and RANDOM not in names
    for s in styles:
        assert s.source == "builtin" and s.name.strip() == s.name and s.negative_prompt
        assert s.prompt.count(PLACEHOLDER) == 1, s.name  # every built-in style wraps the prompt
        assert not [m for m in re.findall(r"\{[^{}]*\}", s.prompt + s.negative_prompt) if m != PLACEHOLDER], s.name
    for wanted in ("photographic", "cinematic", "anime", "watercolour", "line art", "isometric", "pixel art",
                   "film noir"):
        assert wanted in BUILTIN, wanted
    assert json.loads(BUILTIN_FILE.read_text())[0].keys() == {"name", "prompt", "negative_prompt"}


def _write(folder: Path, name: str, data: object) -> Path:
    folder.mkdir(exist_ok=True)
    path = folder / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def test_user_files_beside_the_config_add_and_override_styles(tmp_path):
    assert fake_config(tmp_path).styles_dir == tmp_path / "styles"  # the default: beside config.yaml; missing: none
    assert len(fake_config(tmp_path).styles) == len(BUILTIN)
    _write(tmp_path / "styles", "mine.json", [{"name": "CINEMATIC", "prompt": "my film of {prompt}"},
                                              {"name": "Sepia", "prompt": "sepia", "negative_prompt": "colour"}])
    _write(tmp_path / "styles", "a1111.csv", 'name,prompt,negative_prompt\nComic Ink,"{prompt}, inked",ugly\n,,\n')
    lib = fake_config(tmp_path).styles
    assert len(lib) == len(BUILTIN) + 2
    cinematic = lib.get("cinematic")
    assert (cinematic.name, cinematic.prompt, cinematic.negative_prompt, cinematic.source) == (
        "CINEMATIC", "my film of {prompt}", "", "user")
    assert [s.name for s in lib].index("CINEMATIC") == [s.name for s in BUILTIN].index("Cinematic")  # kept its place
    assert lib.get("sepia").source == "user" and lib.get("comic ink").prompt == "{prompt}, inked"
    assert lib.get("Photographic").source == "builtin"
    # styles_dir names another folder (relative to config.yaml)
    _write(tmp_path / "elsewhere", "x.json", [{"name": "Elsewhere", "prompt": "{prompt} there"}])
    cfg = fake_config(tmp_path, styles_dir="elsewhere")
    assert cfg.styles_dir == tmp_path / "elsewhere" and "Elsewhere" in cfg.styles and "Sepia" not in cfg.styles


@pytest.mark.parametrize("name,data,key", [
    ("a.json", "[{", None),
    ("a.json", {"name": "x"}, None),
    ("a.json", [{"name": "ok", "prompt": "{prompt}"}, "just text"], "[1]"),
    ("a.json", [{"name": "ok", "prompt": "{prompt}"}, {"prompt": "{prompt}"}], "[1].name"),
    ("a.json", [{"name": "x", "prompt": "{prompt}", "weight": 2}], "[0]"),
    ("a.json", [{"name": "x", "prompt": "{Prompt} styled"}], "[0].prompt"),
    ("a.json", [{"name": "x", "prompt": "{prompt} and {prompt}"}], "[0].prompt"),
    ("a.json", [{"name": "x", "prompt": "{prompt}", "negative_prompt": 3}], "[0].negative_prompt"),
    ("a.json", [{"name": "Random", "prompt": "{prompt}"}], "[0].name"),
    ("a.json", [{"name": "x", "prompt": "{prompt}"}, {"name": "X", "prompt": "{prompt}"}], "X"),
    ("a.csv", "title,prompt\nx,{prompt}\n", "row 1"),
    ("a.csv", "name,prompt\nok,{prompt}\nbad,{style}\n", "row 3.prompt"),
])
def test_a_bad_style_file_is_a_config_error_naming_the_file_and_entry(tmp_path, name, data, key):
    path = _write(tmp_path / "styles", name, data)
    with pytest.raises(ConfigError) as e:
        fake_config(tmp_path)
    assert e.value.file == str(path) and e.value.key == key, e.value.message
    assert "Fix:" in e.value.message


def test_two_user_files_with_one_name_are_a_config_error(tmp_path):
    _write(tmp_path / "styles", "a.json", [{"name": "Mine", "prompt": "{prompt}"}])
    _write(tmp_path / "styles", "b.json", [{"name": "mine", "prompt": "{prompt}!"}])
    with pytest.raises(ConfigError) as e:
        fake_config(tmp_path)
    assert e.value.file.endswith("b.json") and "a.json" in e.value.message


# ---- applying styles ---------------------------------------------------------------------------------------
LIB = StyleLibrary([Style("Square", "[{prompt}]", "n1"), Style("Round", "({prompt})", "{prompt} / n2"),
                    Style("Suffix", "suffix words", ""), Style("Lead", "{prompt}, photo", "")])


def test_styles_apply_in_order_each_wrapping_the_result_so_far():
    assert LIB.apply(["Square", "Round"], "x", "neg", 1).prompt == "([x])"
    assert LIB.apply(["Round", "Square"], "x", "neg", 1).prompt == "[(x)]"
    both = LIB.apply(["square", "ROUND"], "x", "neg", 1)
    assert both.negative_prompt == "neg, n1 / n2" and both.styles == ("Square", "Round")
    # a template without {prompt} comes after the prompt, joined by ", " (A1111's rule)
    assert LIB.apply(["Square", "Suffix"], "x", "", 1).prompt == "[x], suffix words"
    assert merge("suffix words", "") == "suffix words" and merge("{prompt}, photo", "") == "photo"
    assert LIB.apply([], "x", "neg", 1).prompt == "x" and LIB.apply(["Lead"], "", "", 1).prompt == "photo"
    # negatives without styles of their own are left as they are
    assert LIB.apply(["Suffix"], "x", "", 1).negative_prompt == ""


def test_random_draws_one_real_style_from_the_seed():
    draws = {seed: BUILTIN.apply([RANDOM], "x", "", seed).styles for seed in range(60)}
    assert all(len(d) == 1 and d[0] in BUILTIN for d in draws.values())
    assert draws == {seed: BUILTIN.apply(["Random"], "x", "", seed).styles for seed in range(60)}  # deterministic
    assert len(set(draws.values())) > 20  # and spread over the library
    # a drawn style is never one the list names, nor one drawn already in the same list
    for seed in range(30):
        names = LIB.apply(["Square", RANDOM, RANDOM], "x", "", seed).styles
        assert names[0] == "Square" and len(set(names)) == 3
    assert LIB.apply([RANDOM] * 5, "x", "", 7).styles.__len__() == 4  # the library ran out: no more draws


def test_check_spells_names_as_the_library_and_names_the_bad_item():
    assert BUILTIN.check(["cinematic", "RANDOM", "pixel art"]) == ["Cinematic", RANDOM, "Pixel Art"]
    assert BUILTIN.check(None) == [] and BUILTIN.check([]) == []
    with pytest.raises(InvalidInput) as e:
        BUILTIN.check(["Cinematic", "Cinematik"])
    assert e.value.field == "styles.1" and "GET /api/v1/styles" in e.value.message
    with pytest.raises(InvalidInput) as e:
        BUILTIN.check(["Anime"] * (specs.MAX_STYLES + 1))
    assert e.value.field == "styles"
    with pytest.raises(UnknownStyleError) as e:  # a job whose style vanished (a user file changed) fails at run time
        LIB.apply(["Square", "Gone"], "x", "", 1)
    assert e.value.param == "styles.1"


# ---- jobs ------------------------------------------------------------------------------------------------
def test_the_service_checks_styles_at_queue_time_and_stores_nothing_refused(tmp_path):
    with fake_service(tmp_path, start=False) as svc:
        sid = open_fake_session(svc)
        with pytest.raises(InvalidInput) as e:
            svc.queue_gen(sid, prompt="x", styles=["Anime", "no such style"])
        assert e.value.field == "styles.1"
        assert svc.list_jobs(sid) == []
        job = svc.queue_gen(sid, prompt="x", styles=["anime"])["job"]
        assert job["params"]["styles"] == ["Anime"]


def test_a_style_gone_by_run_time_fails_its_job_naming_the_item(tmp_path):
    with fake_service(tmp_path, start=False) as svc:
        sid = open_fake_session(svc)
        job_id = svc.queue_gen(sid, prompt="x", styles=["Anime"])["job_id"]
        svc.runner.styles = LIB  # the library the service restarts with no longer has it
        svc.start()
        svc.wait_idle()
        job = svc.get_job(job_id)
        assert job["state"] == "failed" and job["error"]["field"] == "styles.0", job
        assert "no longer" in job["error"]["message"] and REC.gens == []


def test_a_job_applies_styles_per_image_after_the_grammar_and_records_both(api, client):
    grammar = ["a cat", ["in snow", "in rain", "at night"]]  # a nested list: one item drawn by the seed
    session = open_session(client)
    job = queue_job(client, session["id"], prompt=grammar, negative_prompt="dog", seeds=[11, 12],
                    styles=["cinematic", "random"])
    assert job["params"]["styles"] == ["Cinematic", RANDOM]
    job = wait_job(client, job["id"])
    assert job["state"] == "succeeded", job["error"]
    assert all("styles" not in setup for setup in REC.setups)  # styles are no setup parameter
    lib = api.svc.config.styles
    for image, seed in zip(job["images"], (11, 12)):
        before = expand_prompt(grammar, seed)
        styled = lib.apply(["Cinematic", RANDOM], before, "dog", seed)
        assert styled.styles[0] == "Cinematic" and styled.styles[1] != RANDOM
        assert next(g for g in REC.gens if g["seed"] == seed)["prompt"] == styled.prompt  # what the pipe got
        meta = client.get(f"/api/v1/images/{image['id']}/metadata").get_json()["metadata"]
        assert meta["prompt"] == styled.prompt and meta["negative_prompt"] == styled.negative_prompt
        assert meta["prompt_before_styles"] == before and meta["negative_prompt_before_styles"] == "dog"
        assert meta["styles"] == list(styled.styles)
    # a job without styles keeps its metadata as it was
    plain = wait_job(client, queue_job(client, session["id"], prompt="plain")["id"])
    meta = client.get(f"/api/v1/images/{plain['images'][0]['id']}/metadata").get_json()["metadata"]
    assert meta["prompt"] == "plain" and "styles" not in meta and "prompt_before_styles" not in meta


def test_the_api_refuses_unknown_styles_with_a_400_naming_the_item(api, client):
    session = open_session(client)
    r = client.post(f"/api/v1/sessions/{session['id']}/jobs", json={"prompt": "x", "styles": ["Anime", "Nope"]})
    assert r.status_code == 400 and r.get_json()["error"]["field"] == "styles.1"
    assert "/api/v1/styles" in r.get_json()["error"]["message"]
    r = client.post(f"/api/v1/sessions/{session['id']}/jobs", json={"prompt": "x", "styles": ["Anime"] * 17})
    assert r.status_code == 400 and r.get_json()["error"]["field"] == "styles"
    r = client.post(f"/api/v1/sessions/{session['id']}/jobs", json={"prompt": "x", "styles": "Anime"})
    assert r.status_code == 400 and r.get_json()["error"]["field"] == "styles"
    assert api.svc.list_jobs(session["id"]) == []


def test_get_styles_lists_builtin_and_user_styles_and_is_in_the_openapi_document(config_file, make_api):
    _write(config_file.parent / "styles", "team.json", [{"name": "Team Look", "prompt": "{prompt}, team look",
                                                         "negative_prompt": "off-brand"},
                                                        {"name": "anime", "prompt": "our anime {prompt}"}])
    client = make_api().client()
    styles = client.get("/api/v1/styles").get_json()["styles"]
    by_name = {s["name"]: s for s in styles}
    assert len(styles) == len(BUILTIN) + 1
    assert by_name["Team Look"] == {"name": "Team Look", "prompt": "{prompt}, team look",
                                    "negative_prompt": "off-brand", "source": "user"}
    assert by_name["anime"]["source"] == "user" and "Anime" not in by_name
    assert by_name["Cinematic"]["source"] == "builtin"
    doc = client.get("/api/v1/openapi.json").get_json()
    assert doc["paths"]["/api/v1/styles"]["get"]["responses"]["200"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/StyleList"}
    assert "StyleList" in doc["components"]["schemas"] and "Style" in doc["components"]["schemas"]
    job_props = doc["components"]["schemas"]["JobCreate_prompt2image"]["properties"]
    assert job_props["styles"]["anyOf"][0]["maxItems"] == specs.MAX_STYLES
    models = client.get("/api/v1/models").get_json()
    assert "styles" in {p["name"] for p in models["job_params"]}
