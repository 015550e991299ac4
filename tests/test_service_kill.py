"""Crash safety: a serving process killed with SIGKILL mid-job loses and duplicates no image."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from multigen.service.devices import cpu_cores

pytestmark = pytest.mark.slow
HERE = Path(__file__).resolve().parent
SEEDS = [101, 202, 303, 404, 505]


def _runner(config_file: Path, log: Path, *args: str) -> subprocess.Popen:
    """The runner script, its output in a file (a pipe nobody reads could fill up and block it)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, str(HERE / "helpers_service.py"), str(config_file), *args],
                                stdout=out, stderr=subprocess.STDOUT, text=True, env=env)


def _first_json_line(log: Path, proc: subprocess.Popen, deadline: float) -> dict:
    while True:
        for line in log.read_text().splitlines():
            if line.startswith("{"):
                return json.loads(line)
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, "runner did not queue the job in time"
        time.sleep(0.05)


def test_sigkill_mid_job_then_restart_writes_every_image_once(tmp_path, config_file, models_dir):
    spec = {"user": "kim", "project": "crash", "pipe": "prompt2image", "model": "tiny-sd",
            "job": {"prompt": "a lighthouse", "seeds": SEEDS, "width": 64, "height": 64, "steps": 3}}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    first = _runner(config_file, tmp_path / "first.log", "--queue", str(tmp_path / "spec.json"),
                    "--step-delay", "0.4")
    try:
        deadline = time.monotonic() + 180
        ids = _first_json_line(tmp_path / "first.log", first, deadline)
        folder = config_file.parent.parent / "outputs" / "kim" / "crash" / ids["session_id"]
        while not (folder / "00000.png").exists():
            assert first.poll() is None, "runner ended early"
            assert time.monotonic() < deadline, "no image written in time"
            time.sleep(0.02)
        time.sleep(0.5)  # well inside the second image (>= 1.2 s of steps)
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(30)
    written_before = sorted(p.name for p in folder.glob("*.png"))
    assert 1 <= len(written_before) < len(SEEDS), written_before
    before = {name: (folder / name).read_bytes() for name in written_before}
    # the kill found the job running, part-way: so the store left it (no one could end it)
    from multigen.service.store import SQLiteStore

    store = SQLiteStore(config_file.parent.parent / "data" / "multigen.sqlite3")
    try:
        killed = store.get_job(ids["job_id"])
        assert killed.state == "running", killed.state
        done_rows = [r for r in store.list_images(job_id=ids["job_id"], state=None) if r.state == "done"]
        assert 1 <= len(done_rows) < len(SEEDS)
    finally:
        store.close()

    second = _runner(config_file, tmp_path / "second.log", "--exit-when-idle")
    second.wait(300)
    out = (tmp_path / "second.log").read_text()
    assert second.returncode == 0, out[-3000:]
    assert "IDLE" in out and "resumed after a restart" in out
    log_file = (config_file.parent.parent / "logs" / "multigen.log").read_text()  # the daily file of both runs
    for change in ("queued -> running", "running -> queued (resumed after a restart)", "running -> succeeded"):
        assert f"job={ids['job_id']} {change}" in log_file

    pngs = sorted(p.name for p in folder.glob("*.png"))
    assert pngs == [f"{i:05d}.png" for i in range(len(SEEDS))]  # each index exactly once, no gaps
    assert not [p.name for p in folder.iterdir() if p.name.startswith(".")]  # no temp files left
    metas = [json.loads((folder / f"{i:05d}.json").read_text()) for i in range(len(SEEDS))]
    assert [m["seed"] for m in metas] == SEEDS == ids["seeds"]
    assert [m["job_image"] for m in metas] == list(range(len(SEEDS)))
    assert len({m["image_id"] for m in metas}) == len(SEEDS)
    for name, data in before.items():  # images written before the kill were not rewritten differently
        assert (folder / name).read_bytes() == data

    # the store agrees: the job succeeded with one image row per index
    store = SQLiteStore(config_file.parent.parent / "data" / "multigen.sqlite3")
    job = store.get_job(ids["job_id"])
    assert job.state == "succeeded" and job.seeds == SEEDS
    rows = store.list_images(job_id=ids["job_id"], state=None)
    assert sorted(r.idx for r in rows) == list(range(len(SEEDS))) and {r.state for r in rows} == {"done"}
    store.close()

    # a resumed image has the pixels its seed gives (same thread count as the workers)
    from multigen.pipes import Prompt2ImPipe

    old = torch.get_num_threads()
    torch.set_num_threads(cpu_cores())
    try:
        pipe = Prompt2ImPipe(str(models_dir / "tiny-sd"), device="cpu")
        pipe.setup(width=64, height=64, steps=3)
        want = pipe.gen({"prompt": "a lighthouse", "negative_prompt": "", "seed": SEEDS[-1]})[0]
    finally:
        torch.set_num_threads(old)
    got = Image.open(folder / f"{len(SEEDS) - 1:05d}.png").convert("RGB")
    assert np.array_equal(np.asarray(got), np.asarray(want))
