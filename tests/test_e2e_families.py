"""End to end over real HTTP on the newer model families: `multigen serve` with the embedded config's
tiny Flux (a job with its LoRA) and tiny Qwen-Image-Edit (an instruction-edit job on an uploaded image).

The same server, client and sessions as tests/test_e2e_api.py; what is new is what the families bring:
the LoRA changes the Flux image, the edit reads its input image, the image metadata names the
model, its family and the LoRA, and a request a family cannot take is a 400 naming the field.
"""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from test_e2e_api import Server

from multigen.service.client import MultigenAPIError, MultigenClient

pytestmark = pytest.mark.slow

JOB = {"steps": 2, "width": 64, "height": 64}


@pytest.fixture()
def server(config_file):
    srv = Server(config_file)
    assert srv.url, "".join(srv.lines)
    yield srv
    srv.stop()


def _png(client: MultigenClient, image_id: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(client.download_image(image_id, "png"))).convert("RGB"))


def _run(client: MultigenClient, session_id: str, **job) -> list[dict]:
    created = client.create_job(session_id, **job)
    done = client.wait_job(created["id"], timeout=300)
    assert done["state"] == "succeeded", done
    return [im for im in client.list_images(session_id) if im["job_id"] == created["id"]]


def test_flux_job_with_a_lora_and_a_qwen_image_edit_job(server):
    mg = MultigenClient(server.url, timeout=60)
    models = mg.models()
    assert {f["name"] for f in models["families"]} >= {"FLUX", "QWEN_IMAGE", "Z_IMAGE"}
    family_of = {m["name"]: m["family"] for m in models["models"]}
    assert family_of["tiny-flux"] == "FLUX" and family_of["tiny-qwen-image-edit"] == "QWEN_IMAGE"

    plain = mg.create_session(project="families", pipe="prompt2image", model="tiny-flux")
    lora = mg.create_session(project="families", pipe="prompt2image", model="tiny-flux",
                             loras=[{"name": "tiny-flux-lora", "weight": 1.0}])
    base_img = _run(mg, plain["id"], prompt="a red cube", seeds=[5], **JOB)[0]
    lora_img = _run(mg, lora["id"], prompt="a red cube", seeds=[5], **JOB)[0]
    assert (lora_img["width"], lora_img["height"]) == (64, 64)
    assert not np.array_equal(_png(mg, base_img["id"]), _png(mg, lora_img["id"]))  # the LoRA acts
    meta = mg.image_metadata(lora_img["id"])["metadata"]
    assert meta["model"] == "tiny-flux" and meta["pipe_config"]["model_type"] == "FLUX"
    assert meta["pipe_config"]["loras"] == [["tiny-flux-lora", 1.0]]

    # a family's own refusals arrive as 400s that name the field
    with pytest.raises(MultigenAPIError) as e:
        mg.create_job(plain["id"], prompt="x", scheduler="euler_a", **JOB)
    assert e.value.status == 400 and e.value.field == "scheduler"
    sd = mg.create_session(project="families", pipe="prompt2image", model="tiny-sd")
    with pytest.raises(MultigenAPIError) as e:
        mg.create_job(sd["id"], prompt="x", true_cfg_scale=4.0, **JOB)
    assert e.value.status == 400 and e.value.field == "true_cfg_scale"
    with pytest.raises(MultigenAPIError) as e:  # a LoRA of another family, refused when the session opens
        mg.create_session(project="families", pipe="prompt2image", model="tiny-sd",
                          loras=[{"name": "tiny-flux-lora", "weight": 1.0}])
    assert e.value.status == 400 and e.value.field == "loras.0.name"

    # instruction editing on Qwen-Image-Edit: the uploaded image is what gets edited
    edit = mg.create_session(project="families", pipe="edit", model="tiny-qwen-image-edit")
    outs = []
    for colour in ((200, 30, 30), (30, 30, 200)):
        buf = io.BytesIO()
        Image.new("RGB", (96, 64), colour).save(buf, format="PNG")
        upload = mg.upload(buf.getvalue())
        outs.append(_run(mg, edit["id"], prompt="make it brighter", seeds=[3], images=[upload["id"]], steps=2)[0])
    assert [(o["width"], o["height"]) for o in outs] == [(96, 64), (96, 64)]  # the input's size
    assert not np.array_equal(_png(mg, outs[0]["id"]), _png(mg, outs[1]["id"]))  # the input decides
    meta = mg.image_metadata(outs[0]["id"])["metadata"]
    assert meta["pipe"] == "edit" and meta["pipe_config"]["model_type"] == "QWEN_IMAGE"
