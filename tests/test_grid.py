"""A job's grid (``grid: true``): its images side by side, as Fooocus' image wall, on the demo model."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers_service import fake_service, open_fake_session
from multigen.service.api import create_app
from multigen.service.config import load_config
from multigen.service.grid import grid_file, grid_shape, make_grid
from multigen.service.serviceThread import ServiceThread


@pytest.fixture()
def demo_service(config_file: Path):
    svc = ServiceThread(load_config(config_file)).start()
    yield svc
    svc.stop(timeout=30)


@pytest.mark.slow
def test_a_four_image_job_writes_a_grid_whose_quadrants_are_its_images(demo_service, config_file):
    svc = demo_service
    sid = svc.open_session("alice", "grid", "prompt2image", "demo")["session_id"]
    job = svc.queue_gen(sid, prompt="a red circle on a blue background", count=4, seeds=[1, 2, 3, 4], width=128,
                        height=128, steps=2, grid=True)["job"]
    assert job["grid_url"] is None  # not before the job succeeded
    assert svc.wait_idle(120)
    view = svc.get_job(job["id"])
    assert view["state"] == "succeeded", view["error"]
    assert view["grid_url"] == f"/api/v1/jobs/{job['id']}/grid" and view["params"]["grid"] is True
    images = [np.asarray(Image.open(svc.image_file(i["id"])).convert("RGB")) for i in view["images"]]
    assert len({im.tobytes() for im in images}) == 4  # four different images
    folder = Path(svc.get_image_pathname(sid, 0)).parent
    grid = Image.open(grid_file(folder, job["id"]))
    assert grid.size == (256, 256)
    pixels = np.asarray(grid.convert("RGB"))
    quadrants = [pixels[:128, :128], pixels[:128, 128:], pixels[128:, :128], pixels[128:, 128:]]
    for quadrant, image in zip(quadrants, images):  # row by row, in job order
        assert np.array_equal(quadrant, image)
    meta = json.loads(grid_file(folder, job["id"], "json").read_text())
    assert [m["image_id"] for m in meta["images"]] == [i["id"] for i in view["images"]]
    assert (meta["columns"], meta["rows"]) == (2, 2) and json.loads(grid.text["multigen"]) == meta
    assert svc.get_image_count(sid)["image_number"] == 4  # the grid is not one of the session's images

    # over the API, authorised like the images
    app = create_app(svc.config, svc)
    client = app.test_client()
    r = client.get(f"/api/v1/jobs/{job['id']}/grid")
    assert r.status_code == 200 and r.mimetype == "image/png"
    assert Image.open(io.BytesIO(r.data)).size == (256, 256)
    assert client.get(f"/api/v1/jobs/{job['id']}/grid").headers["Vary"] == "Authorization"
    assert client.get("/api/v1/jobs/nope/grid").status_code == 404


def test_grid_shapes_are_near_square():
    assert [grid_shape(n) for n in (1, 2, 3, 4, 5, 9, 10)] == [(1, 1), (2, 1), (2, 2), (2, 2), (3, 2), (3, 3),
                                                                (4, 3)]
    cells = [Image.new("RGB", (8, 4), (i * 40, 0, 0)) for i in range(5)]
    grid = make_grid(cells)
    assert grid.size == (24, 8)
    assert grid.getpixel((0, 0)) == (0, 0, 0) and grid.getpixel((12, 5)) == (160, 0, 0)
    assert grid.getpixel((23, 7)) == (0, 0, 0)  # the empty cell stays black


def test_one_image_gets_no_grid_and_a_resumed_job_gets_its_grid(tmp_path):
    with fake_service(tmp_path, start=False) as svc:
        sid = open_fake_session(svc)
        single = svc.queue_gen(sid, prompt="a", grid=True)["job"]
        job = svc.queue_gen(sid, prompt="b", count=3, grid=True)["job"]
    # a restart after the job's first image: the resumed job writes the grid from all its images
    from helpers_service import REC, wait_for

    with fake_service(tmp_path, start=False) as svc:
        REC.hold = (job["seeds"][1], 1)
        svc.start()
        wait_for(REC.holding.is_set, 10)
    with fake_service(tmp_path) as svc:
        assert svc.wait_idle(20)
        one, three = svc.get_job(single["id"]), svc.get_job(job["id"])
        folder = Path(svc.get_image_pathname(sid, 0)).parent
    assert one["state"] == "succeeded" and one["grid_url"] is None
    assert not grid_file(folder, single["id"]).exists()
    assert three["state"] == "succeeded" and three["grid_url"]
    grid = Image.open(grid_file(folder, job["id"]))
    assert grid.size == (2 * 64, 2 * 64)  # 3 images of 64x64: a 2x2 grid, one cell empty
    assert np.array_equal(np.asarray(grid.convert("RGB"))[:64, 64:],
                          np.asarray(Image.open(svc.image_file(three["images"][1]["id"])).convert("RGB")))
