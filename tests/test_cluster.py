"""Processes sharing one PostgreSQL store (cluster.py), here as services in one process on the fakes: an API-only
service (``workers: 0``) and worker services, each with its own data folder, one output folder, one database.
Events, cancel, skip and previews cross between them through the database and LISTEN/NOTIFY; a lost lease
records nothing and the job resumes elsewhere. The multi-process tests (real `multigen worker` processes,
kill -9, a PostgreSQL restart) are in test_scaleout.py; the store's side of claims in test_claims.py."""
from __future__ import annotations

import contextlib
import datetime as dt
import json
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
from helpers_service import REC, FakeService, fake_config, open_fake_session, wait_for
from pg_check import fresh_schema_url, postgres_url  # noqa: F401 (a fixture)

from multigen.service.cluster import SharedLedger
from multigen.service.config import ClusterSettings
from multigen.service.writer import ImageWriter

pytestmark = pytest.mark.slow  # a PostgreSQL cluster (pg_check.py)
CLUSTER = {"lease_seconds": 1.0, "heartbeat_seconds": 0.1}


@pytest.fixture()
def start(tmp_path: Path, postgres_url: str) -> Iterator[Any]:  # noqa: F811
    """``start(name, workers=None, devices=None) -> FakeService`` on one fresh database and one output folder."""
    REC.__init__()  # type: ignore[misc]
    with contextlib.ExitStack() as stack:
        url = stack.enter_context(fresh_schema_url(postgres_url))

        def _start(name: str, devices: list[str] | None = None, **top: Any) -> FakeService:
            folder = tmp_path / name
            folder.mkdir()
            cfg = fake_config(folder, store=url, output_dir=str(tmp_path / "shared"),
                              cluster={**CLUSTER, "host": name}, **top)
            svc = FakeService(cfg)
            svc.fake_devices = devices or [f"fake:{name}"]
            stack.callback(svc.stop, timeout=10)
            return svc.start()

        yield _start


def _drain(sub: Any, out: list[dict[str, Any]]) -> bool:
    while (event := sub.get(timeout=0.01)) is not None:
        out.append(event)
    return True


def test_an_api_process_sees_the_work_of_a_worker_process(start):
    api = start("api", workers=0)
    worker = start("gpu1")
    assert isinstance(api.ledger, SharedLedger) and api.workers == []
    sid = open_fake_session(api)
    with api.subscribe(session_id=sid) as sub:
        job = api.queue_gen(sid, prompt="a fox", seeds=[5, 6], steps=3)
        assert job["job"]["state"] == "queued" and job["position"] == 0
        events: list[dict[str, Any]] = []
        assert wait_for(lambda: _drain(sub, events) and any(e["type"] == "job.succeeded" for e in events), 20)
    types = [e["type"] for e in events]
    # the worker's events reach the API process: started, progress, both images, the end
    assert types[0] == "job.queued" and "job.started" in types and types.count("image.created") == 2, types
    assert "job.progress" in types and types.index("job.succeeded") > types.index("job.started")
    view = api.get_job(job["job_id"])
    assert view["state"] == "succeeded" and view["done"] == 2 and view["device"] == "fake:gpu1"
    images = api.list_images(sid)
    assert [i["seed"] for i in images] == [5, 6]
    for img in images:
        path = Path(api.image_file(img["id"]))
        meta = ImageWriter.read_metadata(path)
        assert meta["host"] == "gpu1" and meta["worker"].startswith("gpu1:") and meta["worker"].endswith(":fake:gpu1")
        assert path.is_relative_to(api.config.output_dir)
    # the API process lists the cluster's workers by host, with their heartbeat
    workers = wait_for(lambda: (w := api.queue_info()["workers"]) and w[0]["models"] == ["m1"] and w, 5)
    assert [(w["host"], w["device"], w["state"]) for w in workers] == [("gpu1", "fake:gpu1", "idle")]
    assert workers[0]["heartbeat_age_seconds"] < 5
    assert worker.queue_info()["workers"][0]["threads"] == 1  # the worker's own process knows more of it


def test_jobs_are_shared_fairly_between_two_worker_processes(start):
    api = start("api", workers=0)
    sessions = {u: open_fake_session(api, user=u) for u in ("alice", "bob", "carol")}
    jobs = [api.queue_gen(sessions["alice"], prompt="a", seeds=[i], steps=2)["job_id"] for i in range(6)]
    jobs += [api.queue_gen(sessions[u], prompt=u, seeds=[i], steps=2)["job_id"] for u in ("bob", "carol")
             for i in range(2)]
    REC.step_delay = 0.02
    with api.subscribe() as sub:
        start("gpu1")
        start("gpu2")
        assert api.wait_idle(30)
        events: list[dict[str, Any]] = []
        _drain(sub, events)
    views = [api.get_job(j) for j in jobs]
    assert all(v["state"] == "succeeded" for v in views)
    assert {v["device"] for v in views} == {"fake:gpu1", "fake:gpu2"}  # both did work
    started = [e["data"]["job"]["id"] for e in events if e["type"] == "job.started"]
    assert sorted(started) == sorted(jobs)  # every start seen by the API process, once
    first_users = {api.store.get_job(j).user for j in started[:4]}
    assert first_users == {"alice", "bob", "carol"}, "bob and carol waited behind alice's backlog"
    seeds = sorted((g["prompt"], g["seed"]) for g in REC.gens)
    assert len(seeds) == len(set(seeds)) == 10  # every image made once


def test_cancel_and_skip_from_the_api_process_stop_the_worker_within_a_step(start):
    api = start("api", workers=0)
    start("gpu1")
    sid = open_fake_session(api)
    REC.hold = (41, 3)
    job = api.queue_gen(sid, prompt="held", seeds=[41, 42], steps=50)
    assert REC.holding.wait(20)
    # its progress reaches the API process (job.progress events, at most 4 a second)
    assert wait_for(lambda: api.get_job(job["job_id"])["progress"]["step"] >= 1, 10)
    view = api.cancel_job(job["job_id"], image_only=True)  # skip the image being made: the job goes on
    assert view["state"] == "running"
    assert wait_for(lambda: api.get_job(job["job_id"])["skipped"] == [0], 10)
    REC.hold, REC.holding = (42, 5), __import__("threading").Event()
    assert REC.holding.wait(20)
    api.cancel_job(job["job_id"])
    assert wait_for(lambda: api.get_job(job["job_id"])["state"] == "cancelled", 10)
    gens = [g for g in REC.gens if g["prompt"] == "held"]
    assert [g["seed"] for g in gens] == [41, 42] and api.list_images(sid) == []
    # a queued job is cancelled at once by the API process
    REC.hold = None
    api_only = api.queue_gen(sid, prompt="later", seeds=[1], steps=2, priority=-1)
    assert api.cancel_job(api_only["job_id"])["state"] in ("cancelled", "running")
    assert wait_for(lambda: api.get_job(api_only["job_id"])["state"] in ("cancelled", "succeeded"), 10)


def test_a_preview_made_by_a_worker_process_is_served_by_the_api_process(start):
    api = start("api", workers=0)
    start("gpu1")
    sid = open_fake_session(api)
    REC.hold = (7, 2)
    job = api.queue_gen(sid, prompt="p", seeds=[7], steps=20)
    assert REC.holding.wait(20)
    preview = wait_for(lambda: api.preview(job["job_id"]), 10)
    assert preview[:2] == b"\xff\xd8"  # a JPEG
    api.cancel_job(job["job_id"])
    assert wait_for(lambda: api.get_job(job["job_id"])["state"] == "cancelled", 10)
    assert api.preview(job["job_id"]) is None  # gone with the job


def test_a_worker_that_lost_its_lease_records_nothing_and_another_resumes_the_job(start):
    api = start("api", workers=0)
    first = start("gpu1")
    sid = open_fake_session(api)
    REC.hold = (12, 2)
    job = api.queue_gen(sid, prompt="p", seeds=[11, 12, 13], steps=4)
    assert REC.holding.wait(20)  # image 0 written, image 1 held at its step 2
    assert wait_for(lambda: len(api.list_images(sid)) == 1, 10)
    # the lease runs out (as when the host is cut off): any process puts the job back in the queue
    held = first.ledger.running(job["job_id"])
    later = dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=1)
    REC.hold = None
    assert api.store.expire_leases(later) == [job["job_id"]]
    assert wait_for(held.lease_lost.is_set, 10)  # its next renewal failed: it stops at its next step
    assert wait_for(lambda: first.ledger.running(job["job_id"]) is not held, 10)
    assert wait_for(lambda: api.get_job(job["job_id"])["state"] == "succeeded", 20)  # resumed (by gpu1 again)
    images = api.list_images(sid)
    assert [(i["index"], i["seed"]) for i in images] == [(0, 11), (1, 12), (2, 13)]
    folder = Path(api.store.get_session(sid).folder)
    assert sorted(p.name for p in folder.iterdir()) == [f"0000{i}.{x}" for i in range(3) for x in ("json", "png")]
    assert [g["seed"] for g in REC.gens] == [11, 12, 12, 13]  # image 1 made again, recorded once


def test_a_job_whose_worker_stops_goes_back_to_the_queue_and_another_worker_finishes_it(start):
    api = start("api", workers=0)
    first = start("gpu1")
    sid = open_fake_session(api)
    REC.hold = (22, 2)
    job = api.queue_gen(sid, prompt="p", seeds=[21, 22], steps=4)
    assert REC.holding.wait(20)
    first.stop(timeout=10)  # SIGTERM of `multigen worker`: the job goes back to the queue at its next step
    assert api.get_job(job["job_id"])["state"] == "queued"
    REC.hold = None
    start("gpu2")
    assert wait_for(lambda: api.get_job(job["job_id"])["state"] == "succeeded", 20)
    metas = [ImageWriter.read_metadata(Path(api.image_file(i["id"]))) for i in api.list_images(sid)]
    assert [(m["seed"], m["host"]) for m in metas] == [(21, "gpu1"), (22, "gpu2")]


def test_job_inputs_live_on_the_shared_storage(start, tmp_path):
    api = start("api", workers=0)
    assert api.config.inputs_root == tmp_path / "shared" / ".multigen"
    settings = api.config.cluster
    assert isinstance(settings, ClusterSettings) and settings.host == "api"
    assert json.loads(json.dumps(api.queue_info()))["workers"] == []


def test_two_api_processes_deliver_a_webhook_once(start):
    from test_webhooks import FAST, Receiver

    receiver = Receiver()
    try:
        first = start("api1", workers=0, webhooks=FAST)
        start("api2", workers=0, webhooks=FAST)
        start("gpu1")
        sid = open_fake_session(first)
        jobs = [first.queue_gen(sid, prompt="p", seeds=[i], steps=2, webhook_url=receiver.url)["job_id"]
                for i in range(4)]
        assert wait_for(lambda: all(first.get_job(j)["webhook"]["state"] == "delivered" for j in jobs), 20)
        time.sleep(0.5)  # a second delivery would come within the senders' poll
        posted = [json.loads(r["body"])["job"]["id"] for r in receiver.requests]
        assert sorted(posted) == sorted(jobs)  # each job's webhook once, by either API process
    finally:
        receiver.close()
