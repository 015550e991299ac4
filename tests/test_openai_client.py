"""The official ``openai`` SDK against a real ``multigen serve`` (users on, tiny SD, 2 steps, 64 px): images
generated as base64 and as URLs, an inpainting edit that keeps the unmasked pixels, the SDK's exception
classes for refused calls, the jobs in the session API, and the curl example of docs/clients.md."""
from __future__ import annotations

import base64
import io
import os
import re
import subprocess
import sys
from pathlib import Path

import openai
import pytest
import requests
from PIL import Image
from test_e2e_api import Server

from multigen.service.client import MultigenClient
from multigen.service.users import add_user

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
FAST = {"steps": 2}


@pytest.fixture()
def served(config_file):
    """A server with the user alice; yields ``(server, alice's token)``."""
    token = add_user(str(config_file), "alice")
    server = Server(config_file)
    assert server.url, "".join(server.lines)
    server.url = server.url.rstrip("/")
    try:
        yield server, token
    finally:
        server.stop()


def png_bytes(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def test_the_openai_sdk_generates_and_edits_images(served):
    server, token = served
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=token, max_retries=0, timeout=300)

    result = client.images.generate(model="tiny-sd", prompt="a red house", size="64x64", n=2, extra_body=FAST)
    assert len(result.data) == 2 and result.created > 0
    for item in result.data:
        image = Image.open(io.BytesIO(base64.b64decode(item.b64_json)))
        assert image.format == "PNG" and image.size == (64, 64)

    result = client.images.generate(model="tiny-sd", prompt="a boat", size="64x64", response_format="url",
                                    extra_body=FAST)
    url = result.data[0].url
    assert url.startswith(server.url + "/api/v1/images/")
    fetched = requests.get(url, headers={"Authorization": f"Bearer {token}"}, timeout=30)
    assert fetched.status_code == 200 and Image.open(io.BytesIO(fetched.content)).size == (64, 64)
    assert requests.get(url, timeout=30).status_code == 401  # the image is the user's: a token is needed

    red = Image.new("RGB", (64, 64), (255, 0, 0))
    mask = Image.new("RGBA", (64, 64), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (16, 16, 48, 48))  # transparent: the area to edit
    result = client.images.edit(model="tiny-sd", image=("red.png", png_bytes(red), "image/png"),
                                mask=("mask.png", png_bytes(mask), "image/png"), prompt="a blue square",
                                extra_body=FAST)
    edited = Image.open(io.BytesIO(base64.b64decode(result.data[0].b64_json))).convert("RGB")
    assert edited.size == (64, 64)
    assert edited.getpixel((0, 0)) == (255, 0, 0) and edited.getpixel((63, 63)) == (255, 0, 0)  # kept
    assert edited.getpixel((32, 32)) != (255, 0, 0)  # redrawn

    listed = client.models.list()
    assert "tiny-sd" in [m.id for m in listed.data]
    assert client.models.retrieve("tiny-sd").owned_by == "multigen"

    mg = MultigenClient(server.url, token=token)
    sessions = mg.list_sessions(project="openai")
    assert {(s["user"], s["pipe"], s["model"]) for s in sessions} == {
        ("alice", "prompt2image", "tiny-sd"), ("alice", "inpainting", "tiny-sd")}
    jobs = [job for s in sessions for job in mg.list_jobs(s["id"])]
    assert sorted(j["prompt"] for j in jobs) == ["a blue square", "a boat", "a red house"]
    assert all(j["state"] == "succeeded" for j in jobs)


def test_refused_calls_raise_the_sdks_exception_classes(served):
    server, token = served
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=token, max_retries=0, timeout=120)
    for kwargs, param in (({"n": 0}, "n"), ({"model": "no-such-model"}, "model"),
                          ({"size": "8192x8192"}, "size")):
        args = {"model": "tiny-sd", "prompt": "x", "extra_body": FAST, **kwargs}
        with pytest.raises(openai.BadRequestError) as e:
            client.images.generate(**args)
        assert e.value.status_code == 400 and e.value.param == param, (kwargs, e.value.body)
        assert e.value.type == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as e:
        client.images.edit(model="tiny-sd", image=("x.png", b"not an image", "image/png"), prompt="x")
    assert e.value.param == "image"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")
    wrong = openai.OpenAI(base_url=server.url + "/v1", api_key="sk-wrong", max_retries=0, timeout=60)
    with pytest.raises(openai.AuthenticationError) as e:
        wrong.images.generate(model="tiny-sd", prompt="x")  # refused from its head, before the body is read
    assert e.value.code == "invalid_api_key" and e.value.type == "invalid_request_error"
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()


def test_the_curl_example_of_the_docs_works(served, tmp_path):
    server, token = served
    text = (ROOT / "docs" / "clients.md").read_text()
    block = re.search(r"<!-- openai-curl -->\s*```sh\n(.*?)```", text, re.S).group(1)
    command = block.replace("http://127.0.0.1:8000", server.url)
    env = dict(os.environ, MULTIGEN_TOKEN=token, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", command], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert Image.open(tmp_path / "out.png").size == (64, 64)
