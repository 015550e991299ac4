"""Prompt tools (service/prompt_tools.py): wildcards ``__name__`` (seeded, nested, in order, cycles, unknown
names, no path traversal), ``[[a, b]]`` arrays (the product, the count, the limit), ``<lora:name:weight>`` tags
as the job's own LoRAs; through the service on fakes, the HTTP API, and real jobs on the demo model and tiny-sd."""
from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers_service import REC, fake_service, open_fake_session, open_session, queue_job, wait_job
from multigen.service import prompt_tools as pt
from multigen.service.errors import InvalidInput
from multigen.service.prompt_tools import (WildcardError, WildcardLibrary, apply_arrays, array_count, builtin_library,
                                           check_wildcards, combinations, expand_image_prompt, expand_wildcards,
                                           take_lora_tags)

BUILTIN = builtin_library()


def _lib(tmp_path: Path, files: dict[str, str]) -> WildcardLibrary:
    folder = tmp_path / "wildcards"
    for name, text in files.items():
        path = folder / f"{name}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    folder.mkdir(exist_ok=True)
    return WildcardLibrary(folder)


# ---- wildcards --------------------------------------------------------------------------------------------------
def test_the_builtin_files_are_there_and_listed_with_their_line_counts():
    listed = {w["name"]: w for w in BUILTIN.describe()}
    for name in ("color", "animal", "material", "season", "weather", "lighting", "camera_angle", "landscape"):
        assert listed[name]["source"] == "builtin" and listed[name]["lines"] >= 4, name
    assert listed["season"]["lines"] == 4  # the comment line is no choice
    assert all("#" not in line for line in BUILTIN.lines("color"))


def test_a_wildcard_is_drawn_from_the_seed_each_occurrence_on_its_own():
    draw = {seed: expand_wildcards("a __color__ __animal__ and a __color__ one", BUILTIN, seed, 0)
            for seed in range(40)}
    assert all(draw[s] == expand_wildcards("a __color__ __animal__ and a __color__ one", BUILTIN, s, 0) for s in draw)
    assert len(set(draw.values())) > 20  # different seeds draw differently
    assert all("__" not in text for text in draw.values())
    colors = set(BUILTIN.lines("color"))
    firsts = [t.split(" ")[1] for t in draw.values()]
    assert set(firsts) <= {c.split(" ")[0] for c in colors}
    # the two __color__ of one prompt draw on their own: some seeds give two different colours
    assert any(t.split(" ")[1] != t.split(" ")[-2] for t in draw.values())
    # the negative prompt draws on its own too (another stream of the same seed)
    assert any(expand_wildcards("__color__", BUILTIN, s, 0, field="negative_prompt")
               != expand_wildcards("__color__", BUILTIN, s, 0) for s in range(20))


def test_nested_wildcards_expand_fully(tmp_path):
    assert all("__" not in expand_wildcards("__landscape__", BUILTIN, s, 0) for s in range(30))
    lib = _lib(tmp_path, {"outer": "a __inner__ thing\n", "inner": "__leaf__ red\n", "leaf": "deep\n"})
    assert expand_wildcards("__outer__", lib, 1, 0) == "a deep red thing"
    check_wildcards("__outer__", lib, "prompt")


def test_in_order_mode_takes_line_i_for_image_i(tmp_path):
    lib = _lib(tmp_path, {"n": "# numbers\none\n\ntwo\nthree\n", "pair": "__n__/__n__\n"})
    got = [expand_wildcards("__n__", lib, seed=123, index=i, in_order=True) for i in range(7)]
    assert got == ["one", "two", "three", "one", "two", "three", "one"]
    assert expand_wildcards("__pair__", lib, seed=5, index=4, in_order=True) == "two/two"


def test_user_files_override_builtin_ones_and_subfolders_work(tmp_path):
    lib = _lib(tmp_path, {"color": "ultraviolet\n", "people/job": "baker\nsmith\n"})
    assert lib.lines("color") == ("ultraviolet",)
    assert expand_wildcards("__color__ __people/job__", lib, 9, 0).split(" ")[0] == "ultraviolet"
    listed = {w["name"]: w for w in lib.describe()}
    assert listed["color"] == {"name": "color", "source": "user", "lines": 1}
    assert listed["people/job"]["lines"] == 2 and listed["animal"]["source"] == "builtin"


def test_a_cycle_is_refused_naming_the_chain(tmp_path):
    lib = _lib(tmp_path, {"a": "x __b__\n", "b": "y __a__\n", "me": "__me__ again\n"})
    with pytest.raises(InvalidInput) as e:
        check_wildcards("start __a__", lib, "prompt")
    assert e.value.field == "prompt" and e.value.code == "wildcard_cycle"
    assert "__a__ -> __b__ -> __a__" in str(e.value)
    with pytest.raises(InvalidInput, match="__me__ -> __me__"):
        check_wildcards({"grammar": ["__me__"]}, lib, "negative_prompt")  # every string of a grammar is checked
    with pytest.raises(WildcardError, match="deeper than"):  # at run time the depth cap stops it
        expand_wildcards("__me__", lib, 1, 0)


def test_an_unknown_wildcard_names_itself_and_where_wildcards_are_looked_for(tmp_path):
    lib = _lib(tmp_path, {"a": "x\n"})
    with pytest.raises(InvalidInput) as e:
        check_wildcards("a __nope__ cat", lib, "negative_prompt")
    assert e.value.field == "negative_prompt" and e.value.code == "unknown_wildcard"
    assert "__nope__" in str(e.value) and "wildcards/ (config.yaml's wildcards_dir)" in str(e.value)
    assert "built-in" in str(e.value) and "GET /api/v1/wildcards" in str(e.value)
    assert str(tmp_path) not in str(e.value) and str(pt.BUILTIN_DIR) not in str(e.value)  # no server paths
    with pytest.raises(InvalidInput, match="__gone__"):  # a nested one too
        check_wildcards("__a__", _lib(tmp_path, {"a": "__gone__\n"}), "prompt")
    with pytest.raises(WildcardError, match="__nope__"):
        expand_wildcards("__nope__", lib, 1, 0)
    (tmp_path / "wildcards" / "empty.txt").write_text("# nothing\n\n")
    with pytest.raises(InvalidInput, match="no lines"):
        check_wildcards("__empty__", lib, "prompt")


def test_wildcard_names_cannot_leave_their_folder(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("the password\n")
    lib = _lib(tmp_path, {"ok": "fine\n"})
    for bad in ("__../secret__", "__/etc/passwd__", "__ok/../../secret__", "__..\\secret__", "__a.b__",
                "__./ok__"):
        with pytest.raises(InvalidInput, match="not allowed") as e:
            check_wildcards(f"x {bad} y", lib, "prompt")
        assert e.value.field == "prompt"
        with pytest.raises(WildcardError):
            expand_wildcards(bad, lib, 1, 0)
    # a symlink out of the folder is not followed
    os.symlink(secret, tmp_path / "wildcards" / "link.txt")
    with pytest.raises(InvalidInput, match="unknown wildcard __link__"):
        check_wildcards("__link__", lib, "prompt")
    assert "link" not in {w["name"] for w in lib.describe()}
    # underscores that name nothing are plain text
    assert expand_wildcards("a _____ b __ c", lib, 1, 0) == "a _____ b __ c"


def test_a_changed_file_is_read_again(tmp_path):
    lib = _lib(tmp_path, {"w": "old\n"})
    assert lib.lines("w") == ("old",)
    path = tmp_path / "wildcards" / "w.txt"
    path.write_text("new line\n")
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    assert lib.lines("w") == ("new line",)


# ---- arrays -----------------------------------------------------------------------------------------------------
def test_arrays_make_their_product_first_array_fastest():
    text = "a [[red, blue]] [[cube, ball , cone]] on [[grass]]"
    assert combinations(text) == 6 and combinations("no arrays") == 1 and combinations(["[[a, b]]"]) == 1
    got = [apply_arrays(text, i) for i in range(7)]
    assert got == ["a red cube on [[grass]]", "a blue cube on [[grass]]", "a red ball on [[grass]]",
                   "a blue ball on [[grass]]", "a red cone on [[grass]]", "a blue cone on [[grass]]",
                   "a red cube on [[grass]]"]
    # arrays first, then wildcards: an entry may be a wildcard; the negative prompt keeps its brackets
    assert expand_image_prompt("[[__season__, plain]]", BUILTIN, 3, 1) == "plain"
    assert expand_image_prompt("[[__season__, plain]]", BUILTIN, 3, 0) in BUILTIN.lines("season")
    assert expand_image_prompt("[[a, b]]", BUILTIN, 3, 1, field="negative_prompt") == "[[a, b]]"


def test_the_count_is_per_combination_and_the_limit_is_a_400_naming_prompt():
    assert array_count("x", 3, None, 10) == 3
    assert array_count("[[a, b, c]]", None, None, 10) == 3
    assert array_count("[[a, b, c]] [[d, e]]", 2, None, 12) == 12
    assert array_count("[[a, b]]", None, [1, 2, 3, 4], 10) == 4
    with pytest.raises(InvalidInput) as e:
        array_count("[[a, b, c]] [[d, e]]", 2, None, 10)
    assert e.value.field == "prompt" and e.value.code == "too_many_images"
    assert "12 images" in str(e.value) and "limits.max_count = 10" in str(e.value)
    with pytest.raises(InvalidInput, match="more than 1000000"):
        array_count("[[a, b, c, d, e, f, g, h, i, j]] " * 7, 1, None, 100)
    with pytest.raises(InvalidInput, match="multiple of 2") as e:
        array_count("[[a, b]]", None, [1, 2, 3], 10)
    assert e.value.field == "seeds"
    with pytest.raises(InvalidInput, match="one seed per image") as e:
        array_count("[[a, b]]", 2, [1, 2], 10)


# ---- LoRA tags --------------------------------------------------------------------------------------------------
class _Lora:
    def __init__(self, type_):
        self.type = type_


def test_lora_tags_leave_the_prompt_for_the_job_loras_of_the_models_family():
    loras = {"sd-a": _Lora("SD"), "xl-a": _Lora("SDXL"), "any": _Lora(None)}
    text, tags = take_lora_tags("a cat <lora:sd-a:0.5>, <lora:any>", None, loras, "SD")
    assert text == "a cat" and tags == [{"name": "sd-a", "weight": 0.5}, {"name": "any", "weight": 1.0}]
    assert take_lora_tags(["<lora:sd-a:1>"], None, loras, "SD") == (["<lora:sd-a:1>"], [])  # grammars: as written
    with pytest.raises(InvalidInput, match="unknown LoRA 'xl-a'.*known: any, sd-a") as e:
        take_lora_tags("<lora:xl-a:1>", None, loras, "SD")
    assert e.value.field == "prompt"
    with pytest.raises(InvalidInput, match="weight"):
        take_lora_tags("<lora:sd-a:99>", None, loras, "SD")
    with pytest.raises(InvalidInput, match="belong in the prompt") as e:
        take_lora_tags("x", "<lora:sd-a:1>", loras, "SD")
    assert e.value.field == "negative_prompt"


# ---- through the service (fake pipes) ---------------------------------------------------------------------------
def test_the_service_expands_per_image_and_keeps_the_template(tmp_path):
    _lib(tmp_path, {"thing": "cube\nball\ncone\n"})
    with fake_service(tmp_path) as svc:
        sid = open_fake_session(svc, loras=[{"name": "l-sd", "weight": 1.0}])
        out = svc.queue_gen(sid, prompt="[[red, blue]] __thing__ <lora:l-sd2:0.3>", count=2, seeds=None,
                            wildcards_in_order=True)
        assert out["count"] == 4 and len(out["seeds"]) == 4
        job = out["job"]
        assert job["params"]["job_loras"] == [{"name": "l-sd2", "weight": 0.3}]
        assert job["params"]["wildcards_in_order"] is True
        plain = svc.queue_gen(sid, prompt="after", seeds=[1])
        assert svc.wait_idle(20)
        assert svc.get_job(out["job_id"])["state"] == "succeeded", svc.get_job(out["job_id"])["error"]
        gens = [g for g in REC.gens if g["prompt"] != "after"]
        assert [g["prompt"] for g in gens] == ["red cube", "blue ball", "red cone", "blue cube"]
        assert [Path(p).name for p, _ in gens[0]["loras"]] == ["l-sd.safetensors", "l-sd2.safetensors"]
        after = next(g for g in REC.gens if g["prompt"] == "after")
        assert [Path(p).name for p, _ in after["loras"]] == ["l-sd.safetensors"]  # the job's LoRA did not leak
        assert svc.get_job(plain["job_id"])["state"] == "succeeded"
        meta = svc.image_metadata(svc.list_images(out["job"]["session_id"])[1]["id"])
        assert meta["prompt"] == "blue ball" and meta["prompt_template"] == "[[red, blue]] __thing__"
        # refused at queue time, nothing stored: unknown wildcard, cycle, over the limit, a bad in-order flag
        before = len(svc.list_jobs(sid))
        for kwargs, field in (({"prompt": "__nope__"}, "prompt"), ({"prompt": "x", "negative_prompt": "__nope__"},
                                                                    "negative_prompt"),
                              ({"prompt": "[[a, b]]", "count": 51}, "prompt"),
                              ({"prompt": "x", "wildcards_in_order": "yes"}, "wildcards_in_order"),
                              ({"prompt": "<lora:l-xl:1>"}, "prompt")):
            with pytest.raises(InvalidInput) as e:
                svc.queue_gen(sid, **kwargs)
            assert e.value.field == field, (kwargs, e.value)
        assert len(svc.list_jobs(sid)) == before


def test_a_wildcard_file_gone_by_run_time_fails_the_job_naming_it(tmp_path):
    _lib(tmp_path, {"soon": "gone\n"})
    with fake_service(tmp_path, start=False) as svc:
        sid = open_fake_session(svc)
        out = svc.queue_gen(sid, prompt="__soon__", seeds=[1])
        (tmp_path / "wildcards" / "soon.txt").unlink()
        svc.start()
        assert svc.wait_idle(20)
        job = svc.get_job(out["job_id"])
        assert job["state"] == "failed" and "__soon__" in job["error"]["message"]
        assert job["error"]["field"] == "prompt"


# ---- HTTP API (fake pipes) -------------------------------------------------------------------------------------
def test_the_api_lists_wildcards_documents_the_parameter_and_refuses_too_many_images(make_api):
    api = make_api(**{"max_count: 100": "max_count: 5"})
    client = api.client()
    listed = client.get("/api/v1/wildcards").get_json()["wildcards"]
    assert {"name": "color", "lines": 20, "source": "builtin"} in listed
    doc = client.get("/api/v1/openapi.json").get_json()
    assert "/api/v1/wildcards" in doc["paths"]
    in_order = doc["components"]["schemas"]["JobCreate_prompt2image"]["properties"]["wildcards_in_order"]
    assert in_order["type"] == "boolean" and in_order["default"] is False
    params = {p["name"]: p for p in client.get("/api/v1/models").get_json()["job_params"]}
    assert params["wildcards_in_order"]["default"] is False
    session = open_session(client)
    r = client.post(f"/api/v1/sessions/{session['id']}/jobs", json={"prompt": "[[a, b, c]] [[d, e]]", "count": 1})
    assert r.status_code == 400
    err = r.get_json()["error"]
    assert err["field"] == "prompt" and "6 images" in err["message"] and "limits.max_count = 5" in err["message"]
    r = client.post(f"/api/v1/sessions/{session['id']}/jobs", json={"prompt": "__no_such__"})
    assert r.status_code == 400 and r.get_json()["error"]["field"] == "prompt"
    assert "__no_such__" in r.get_json()["error"]["message"]
    job = wait_job(client, queue_job(client, session["id"], prompt="[[a, b]] __season__", count=2)["id"])
    assert job["state"] == "succeeded" and job["count"] == 4
    page = client.get("/").get_data(as_text=True)
    assert 'id="wildcards_in_order"' in page


def test_the_a1111_dialect_takes_wildcards_and_keeps_its_double_brackets_as_weighting(api, client):
    assert pt.escape_arrays("a [[red, blue]] [[x]] car") == "a [ [red, blue] ] [[x]] car"
    body = {"prompt": "a [[red, blue]] __season__ car", "seed": 3, "batch_size": 2, "steps": 2, "width": 64,
            "height": 64, "override_settings": {"sd_model_checkpoint": "tiny-sd"}}
    r = client.post("/sdapi/v1/txt2img", json=body)
    assert r.status_code == 200, r.get_json()
    assert len(r.get_json()["images"]) == 2  # A1111's count: no array multiplied it
    prompts = [g["prompt"] for g in REC.gens]
    assert [p[:len("a [ [red, blue] ] ")] for p in prompts] == ["a [ [red, blue] ] "] * 2
    assert [p.split(" ")[-2] for p in prompts] == [expand_wildcards("__season__", BUILTIN, s, 0) for s in (3, 4)]
    r = client.post("/sdapi/v1/txt2img", json={**body, "prompt": "__nope__"})
    assert r.status_code == 422 and "__nope__" in json.dumps(r.get_json())


# ---- real pipes: the demo model and tiny-sd ----------------------------------------------------------------------
@pytest.fixture()
def real(config_file):
    from helpers_service import real_api

    with real_api(config_file) as pair:
        yield pair


def _images(client, job):
    out = []
    for image in job["images"]:
        meta = client.get(f"/api/v1/images/{image['id']}/metadata").get_json()["metadata"]
        png = client.get(f"/api/v1/images/{image['id']}")
        out.append((meta, np.asarray(Image.open(io.BytesIO(png.data)).convert("RGB"))))
    return out


@pytest.mark.slow
def test_a_wildcard_repeats_with_the_same_seed_on_the_demo_model_and_arrays_make_one_image_each(real):
    client, _ = real
    prompt = "a __color__ circle"
    a = next(s for s in range(100) if expand_wildcards(prompt, BUILTIN, s, 0) != expand_wildcards(prompt, BUILTIN,
                                                                                                      s + 1, 0))
    session = open_session(client, model="demo")
    settings = {"width": 128, "height": 128, "steps": 2}
    job = wait_job(client, queue_job(client, session["id"], prompt=prompt, seeds=[a, a, a + 1], **settings)["id"],
                   timeout=300)
    assert job["state"] == "succeeded", job["error"]
    (m1, p1), (m2, p2), (m3, p3) = _images(client, job)
    assert m1["prompt"] == m2["prompt"] == expand_wildcards(prompt, BUILTIN, a, 0) and "__" not in m1["prompt"]
    assert m1["prompt_template"] == prompt and m1["pipe_config"]["seed"] == a
    assert np.array_equal(p1, p2)  # the same seed: the same line, the same pixels
    assert m3["prompt"] != m1["prompt"] and not np.array_equal(p1, p3)
    arrays = wait_job(client, queue_job(client, session["id"], prompt="a [[red circle, blue square]]",
                                        seeds=[a, a], **settings)["id"], timeout=300)
    assert arrays["state"] == "succeeded" and arrays["count"] == 2
    (n1, q1), (n2, q2) = _images(client, arrays)
    assert [n1["prompt"], n2["prompt"]] == ["a red circle", "a blue square"]
    assert n1["prompt_template"] == "a [[red circle, blue square]]" and not np.array_equal(q1, q2)


@pytest.mark.slow
def test_a_lora_tag_reaches_the_pipe_for_its_job_only(real):
    client, _ = real
    session = open_session(client)  # tiny-sd, no session LoRAs
    settings = {"width": 64, "height": 64, "steps": 2, "seeds": [7]}
    tagged = wait_job(client, queue_job(client, session["id"], prompt="a cube <lora:tiny-sd-lora:0.8>",
                                        **settings)["id"], timeout=300)
    plain = wait_job(client, queue_job(client, session["id"], prompt="a cube", **settings)["id"], timeout=300)
    assert tagged["state"] == plain["state"] == "succeeded", (tagged["error"], plain["error"])
    assert tagged["params"]["job_loras"] == [{"name": "tiny-sd-lora", "weight": 0.8}]
    (tm, tp), = _images(client, tagged)
    (pm, pp), = _images(client, plain)
    assert tm["prompt"] == "a cube" and tm["pipe_config"]["loras"] == [["tiny-sd-lora", 0.8]]
    assert pm["pipe_config"]["loras"] == [] and not np.array_equal(tp, pp)
    r = client.post(f"/api/v1/sessions/{session['id']}/jobs", json={"prompt": "<lora:tiny-sdxl-lora:1>"})
    assert r.status_code == 400 and r.get_json()["error"]["field"] == "prompt"
    assert "tiny-sd-lora" in r.get_json()["error"]["message"]  # the LoRAs of the model's family
