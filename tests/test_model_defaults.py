"""A base model's `defaults:` (models.yaml) fill the parameters a job leaves out, and only those."""
from __future__ import annotations

import pytest
from helpers_service import FAKE_MODELS_YAML, FAKE_PIPES, REC, FakeIm2ImPipe, fake_service
from PIL import Image


@pytest.fixture
def svc(tmp_path, monkeypatch):
    yaml_text = FAKE_MODELS_YAML.replace(
        "m2: {id: m2, type: SD}",
        "m2: {id: m2, type: SD, defaults: {width: 96, height: 80, steps: 3, guidance_scale: 2.5}}")
    monkeypatch.setattr("helpers_service.FAKE_MODELS_YAML", yaml_text)
    with fake_service(tmp_path) as s:
        yield s


def _run(svc, model, pipe="prompt2image", **params):
    sid = svc.open_session("u", "p", pipe, model)["session_id"]
    out = svc.queue_gen(sid, prompt="a", seeds=[1], **params)
    assert svc.wait_idle(10)
    assert svc.get_job(out["job_id"])["state"] == "succeeded"
    return REC.setups[-1]


def test_model_defaults_fill_what_the_job_leaves_out(svc):
    assert svc.config.models.base["m2"].defaults["steps"] == 3
    setup = _run(svc, "m2")
    assert setup["width"] == 96 and setup["height"] == 80 and setup["steps"] == 3 and setup["guidance_scale"] == 2.5
    # the image's metadata and its A1111 text say what was used
    sid = svc.list_sessions()[-1]["id"]
    image = svc.list_images(sid)[-1]
    meta = svc.image_metadata(image["id"])
    assert meta["params"]["steps"] == 3 and meta["params"]["guidance_scale"] == 2.5 and meta["width"] == 96
    from PIL import Image as PILImage
    with PILImage.open(svc.image_file(image["id"])) as im:
        assert "Steps: 3" in im.text["parameters"] and "CFG scale: 2.5" in im.text["parameters"]
    setup = _run(svc, "m2", steps=5, width=64)
    assert setup["width"] == 64 and setup["steps"] == 5 and setup["height"] == 80  # the job's own values win


def test_other_models_keep_the_pipe_defaults(svc):
    setup = _run(svc, "m1")
    assert "steps" not in setup and "width" not in setup


def test_defaults_only_reach_pipes_that_take_them(svc, tmp_path, monkeypatch):
    # a pipe without width/height in its PARAMS would refuse them: they are left out for it
    narrow = type("NarrowPipe", (FakeIm2ImPipe,), {"PARAMS": ("image", "strength", "steps")})
    monkeypatch.setitem(FAKE_PIPES, "Im2ImPipe", narrow)
    Image.new("RGB", (8, 8)).save(tmp_path / "in.png")
    setup = _run(svc, "m2", pipe="image2image", image=str(tmp_path / "in.png"))
    assert setup["steps"] == 3 and "width" not in setup and "guidance_scale" not in setup
