"""One owner per data folder: a second service on the same folder refuses to start."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers_service import FakeService, fake_config
from multigen.service.folderlock import LOCK_FILE, DataFolderLock, FolderInUse

HERE = Path(__file__).resolve().parent


def test_a_second_service_in_the_same_process_is_refused_until_the_first_stops(tmp_path):
    first = FakeService(fake_config(tmp_path)).start()
    try:
        with pytest.raises(FolderInUse) as e:
            FakeService(fake_config(tmp_path))
        message = str(e.value)
        assert str(first.config.data_dir) in message and f"pid {os.getpid()}" in message
        assert socket.gethostname() in message and "data_dir" in message
    finally:
        first.stop(timeout=10)
    again = FakeService(fake_config(tmp_path))  # stopped: the folder is free
    again.stop()


def test_a_service_never_started_gives_the_folder_up_on_stop(tmp_path):
    svc = FakeService(fake_config(tmp_path))
    svc.stop()
    other = FakeService(fake_config(tmp_path))
    other.stop()


def test_the_lock_names_its_holder_and_is_reentrant_for_its_owner(tmp_path):
    lock = DataFolderLock(tmp_path / "data").acquire()
    assert lock.acquire() is lock and lock.held
    info = json.loads((tmp_path / "data" / LOCK_FILE).read_text())
    assert info == {"pid": os.getpid(), "host": socket.gethostname()}
    with pytest.raises(FolderInUse):
        DataFolderLock(tmp_path / "data").acquire()
    lock.release()
    assert not lock.held
    DataFolderLock(tmp_path / "data").acquire().release()


def _wait_for(log: Path, proc: subprocess.Popen, text: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while text not in log.read_text():
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, f"{text!r} not printed in time"
        time.sleep(0.05)


@pytest.mark.slow
def test_a_second_process_on_the_folder_is_refused_and_a_killed_holder_frees_it(tmp_path, config_file):
    from multigen.service.serviceThread import ServiceThread

    log = tmp_path / "holder.log"
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    with open(log, "w") as out:
        holder = subprocess.Popen([sys.executable, str(HERE / "helpers_service.py"), str(config_file)],
                                  stdout=out, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        _wait_for(log, holder, "READY")
        with pytest.raises(FolderInUse) as e:
            ServiceThread(config_file)
        assert f"pid {holder.pid}" in str(e.value) and socket.gethostname() in str(e.value)
        # the command-line server says the same and exits non-zero, instead of stealing the holder's jobs
        run = subprocess.run([sys.executable, "-m", "multigen.service.cli", "serve", "--config", str(config_file),
                              "--port", "0"], capture_output=True, text=True, timeout=120, env=env)
        assert run.returncode != 0 and f"pid {holder.pid}" in run.stdout + run.stderr
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(30)
    svc = ServiceThread(config_file)  # the kernel dropped the dead holder's lock
    svc.stop()
