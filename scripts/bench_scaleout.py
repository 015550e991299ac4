#!/usr/bin/env python
"""Benchmark a lab on one PostgreSQL: an API process (``workers: 0``) and N ``multigen worker`` processes.

Three measurements, side by side in one run (each the median of ``--rounds`` rounds, each round on a
fresh schema with fresh processes):

* **throughput**: images per second with 1 and with 2 worker processes on the demo model (``--jobs``
  jobs of ``--count`` images of ``--steps`` steps, queued at once by ``--users`` users; the clock runs
  from the first queued job to the last finished one). On a machine of two cores this measures what
  coordination costs (claims, leases, events through the database), not GPU scaling.
* **claim latency** p50/p99 of ``store.claim_job`` on the same PostgreSQL, one and two claimer
  processes (scripts/bench_claims.py, imported).
* **model reloads** with two models (``demo`` and ``demo-b``, the same weights under two names: two
  cache entries, so switching is a reload) and two workers, with model affinity (the default
  ``max_affinity_skips``) against without (``max_affinity_skips: 0``, the FIFO-like baseline): counted
  from the jobs' ``timings.model_loaded``.

PostgreSQL: ``$MULTIGEN_TEST_PG`` (a server of your own; each round uses a new schema, dropped after),
else a throw-away cluster started and removed through scripts/_postgres.sh.

The process harness (:class:`Lab`: configs, ``multigen serve``/``multigen worker`` subprocesses, their
ready lines, SIGTERM/SIGKILL) is also what tests/test_scaleout.py runs its processes with.

Usage: .venv/bin/python scripts/bench_scaleout.py [--rounds 3] [--jobs 24] [--count 2] [--steps 4] [--users 4]
       [--affinity-jobs 24] [--claim-jobs 400]
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
from bench_claims import pg_schema, postgres  # noqa: E402
from bench_claims import run as run_claims  # noqa: E402

#: the demo model (128x128, fast on a CPU) under two names: two cache entries of the same weights
MODELS = {name: {"id": "builtin:demo", "type": "SD",
                 "defaults": {"width": 128, "height": 128, "steps": 20, "guidance_scale": 6.0}}
          for name in ("demo", "demo-b")}
#: the demo model's world (docs/demo.md)
PROMPT = "a red circle on a blue background"
#: a cache budget (GiB) that holds one demo model (about 9 MiB in bfloat16; a load first makes room for its
#: 19 MB on disk), not two: a worker switching models reloads
ONE_MODEL_GB = 0.02
#: how long a process may take to import torch and diffusers, open the store and say it is ready
START_SECONDS = 180
TERMINAL = ("succeeded", "failed", "cancelled")


class ServiceProcess:
    """A ``multigen serve`` or ``multigen worker`` subprocess; its output is kept in ``lines``.

    Started at once; :meth:`wait_ready` waits for its ready line (``multigen serving on URL`` or
    ``multigen worker ready: host=H workers=ID,...``), so that several can start side by side.
    """

    def __init__(self, role: str, name: str, config_file: Path, env: dict[str, str]) -> None:
        self.role, self.name, self.config_file = role, name, config_file
        args = ["--port", "0"] if role == "serve" else []
        self.proc = subprocess.Popen([sys.executable, "-m", "multigen.service.cli", role, "--config",
                                      str(config_file), *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        self.lines: list[str] = []
        self.url: str | None = None
        self.host: str | None = None
        self.worker_ids: list[str] = []
        self._ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _read(self) -> None:
        # keep reading the output so the pipe never fills up
        for line in self.proc.stdout:
            self.lines.append(line)
            if line.startswith("multigen serving on "):
                self.url = line.split()[-1]
                self._ready.set()
            elif line.startswith("multigen worker ready: "):
                fields = dict(word.split("=", 1) for word in line.split()[3:] if "=" in word)
                self.host, self.worker_ids = fields.get("host"), fields.get("workers", "").split(",")
                self._ready.set()
        self._ready.set()  # it ended: wait_ready says so

    def wait_ready(self, timeout: float = START_SECONDS) -> ServiceProcess:
        """Raises RuntimeError (with its output) when it ended or did not get ready in ``timeout``."""
        self._ready.wait(timeout)
        if self.url is None and not self.worker_ids:
            raise RuntimeError(f"{self.role} {self.name} not ready (exit {self.proc.poll()}):\n{self.output()}")
        return self

    def output(self, last: int = 6000) -> str:
        return "".join(self.lines)[-last:]

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL, as a host that dies: nothing runs after it."""
        if self.alive():
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM and the exit code; SIGKILL (and RuntimeError) past ``timeout``."""
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=30)
            raise RuntimeError(f"{self.role} {self.name} ignored SIGTERM for {timeout} s:\n{self.output()}") from None


class Lab:
    """Processes of one lab in a folder: one store URL, one shared ``outputs/`` folder, and for each
    process its own config, data folder and log folder (the data folder is locked per process).

    ``cluster`` is the config's ``cluster:`` section for every process (each worker gets its own
    ``host``: its process name, so the processes look like hosts), ``users`` name -> token, ``extra``
    more top-level keys of every config (e.g. ``cache``); ``close()`` stops them all.
    """

    def __init__(self, root: Path, store_url: str | None, cluster: dict[str, Any] | None = None,
                 users: dict[str, str] | None = None, extra: dict[str, Any] | None = None) -> None:
        self.root, self.store_url, self.cluster = Path(root), store_url, dict(cluster or {})
        self.extra = dict(extra or {})
        self.output_dir = self.root / "outputs"
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.users = dict(users or {})  # name -> token
        self.processes: list[ServiceProcess] = []
        self.env = {k: v for k, v in os.environ.items() if k not in ("MULTIGEN_STORE", "MULTIGEN_CONFIG")}
        self.env.update(PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                        MULTIGEN_HEARTBEAT_SECONDS="1")
        self.models_file = self.root / "models.yaml"
        pipes = yaml.safe_load((ROOT / "config" / "models.yaml").read_text())["pipes"]
        self.models_file.write_text(yaml.safe_dump({"base": MODELS, "pipes": pipes}, sort_keys=False))
        (self.root / "model_dir").mkdir(exist_ok=True)

    def write_config(self, name: str, api: bool, **cluster: Any) -> Path:
        """``<root>/<name>/config.yaml``: an API process (``workers: 0``) or a worker process."""
        from multigen.service.users import hash_token

        folder = self.root / name
        folder.mkdir(parents=True, exist_ok=True)
        config: dict[str, Any] = {
            "model_list": str(self.models_file), "model_dir": str(self.root / "model_dir"),
            "logging_folder": str(folder / "logs"), "data_dir": str(folder / "data"),
            "output_dir": str(self.output_dir),
            "devices": ["cpu"], "threads": 1,
            "server": {"host": "127.0.0.1", "port": 0, "threads": 8, "max_event_streams": 6},
            "users": {user: {"token_sha256": hash_token(token)} for user, token in self.users.items()},
            **self.extra,
        }
        if self.store_url:  # None: the embedded SQLite store
            config["store"] = self.store_url
        if api:
            config["workers"] = 0
        settings = {**self.cluster, **cluster}
        if not api:
            settings.setdefault("host", name)
        if settings:
            config["cluster"] = settings
        file = folder / "config.yaml"
        file.write_text(yaml.safe_dump(config, sort_keys=False))
        return file

    def start(self, role: str, name: str, **cluster: Any) -> ServiceProcess:
        """Starts ``multigen serve`` (role ``serve``, no local workers) or ``multigen worker`` (``worker``);
        call ``wait_ready()`` on what it returns."""
        config_file = self.write_config(name, role == "serve", **cluster)
        process = ServiceProcess(role, name, config_file, self.env)
        self.processes.append(process)
        return process

    def close(self) -> None:
        """Stops every process still running: SIGTERM, then SIGKILL for one that does not exit."""
        for process in self.processes:
            if process.alive():
                process.proc.send_signal(signal.SIGTERM)
        for process in self.processes:
            try:
                process.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()


@contextlib.contextmanager
def lab(store_url: str, cluster: dict[str, Any] | None = None, **kwargs: Any) -> Iterator[Lab]:
    """A :class:`Lab` in a temporary folder (``kwargs``: Lab's), every process stopped at exit."""
    with tempfile.TemporaryDirectory(prefix="multigen-lab-") as tmp:
        found = Lab(Path(tmp), store_url, cluster, **kwargs)
        try:
            yield found
        finally:
            found.close()


# ---- the benchmark ------------------------------------------------------------------------------------------
def _stamp(iso: str) -> float:
    return datetime.datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def run_jobs(store_url: str, workers: int, plan: list[tuple[str, str, int, int]], cluster: dict[str, Any],
             cache_gb: float | None = None, warm: bool = False) -> list[dict[str, Any]]:
    """Queue ``plan`` ((user, model, count, steps) per job, in order) on an API process with ``workers`` worker
    processes, all started and ready first; returns the finished job views.

    ``warm``: each worker first runs a small job of the plan's first model (not counted), so that throughput
    does not count the first load. Without it the first claims load their models (seconds) while the rest of
    the plan is queued (a fraction of a second), so the later claims choose from a full queue.
    """
    from multigen.service.client import MultigenClient

    extra = {} if cache_gb is None else {"cache": {"memory_budget_gb": cache_gb}}
    with lab(store_url, cluster, extra=extra) as the_lab:
        api = the_lab.start("serve", "api")
        procs = [the_lab.start("worker", f"host-{k}") for k in range(workers)]
        for process in (api, *procs):
            process.wait_ready()
        mg = MultigenClient(api.url, timeout=60)
        sessions: dict[tuple[str, str], str] = {}

        def queue(user: str, model: str, count: int, steps: int) -> str:
            if (user, model) not in sessions:
                sessions[user, model] = mg.create_session(project="bench", pipe="prompt2image", model=model,
                                                          user=user)["id"]
            return mg.create_job(sessions[user, model], prompt=PROMPT, count=count, steps=steps)["id"]

        if warm:
            _wait(mg, [queue("warm-up", plan[0][1], 1, 2) for _ in procs])
        return _wait(mg, [queue(*job) for job in plan])


def _wait(mg: Any, job_ids: list[str], timeout: float = 600) -> list[dict[str, Any]]:
    """The jobs' views once they have finished, with their timings (a view of a job run by another process
    can show it finished a moment before its timings: waited for too)."""
    deadline = time.monotonic() + timeout
    views = {}
    for jid in job_ids:
        while ((view := mg.get_job(jid))["state"] not in TERMINAL
               or (view["state"] == "succeeded" and "model_loaded" not in (view.get("timings") or {}))):
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {jid}: {view['state']}, timings {view.get('timings')} after {timeout} s")
            time.sleep(0.1)
        if view["state"] != "succeeded":
            raise RuntimeError(f"job {jid} {view['state']}: {view['error']}")
        views[jid] = view
    return [views[j] for j in job_ids]


def throughput(store_url: str, workers: int, args: argparse.Namespace) -> float:
    """Images per second from the first job queued to the last one finished (server clock)."""
    plan = [(f"u{i % args.users}", "demo", args.count, args.steps) for i in range(args.jobs)]
    views = run_jobs(store_url, workers, plan, {"lease_seconds": 60, "heartbeat_seconds": 15}, warm=True)
    images = sum(len(v["images"]) for v in views)
    return images / (max(_stamp(v["finished_at"]) for v in views) - min(_stamp(v["created_at"]) for v in views))


def reloads(store_url: str, skips: int | None, args: argparse.Namespace) -> int:
    """Model loads (``timings.model_loaded``) for jobs of two models on two workers that hold one model each
    (``cache.memory_budget_gb`` fits one demo model): each user queues jobs alternating between the models."""
    plan = [(f"u{u}", ("demo", "demo-b")[(u + i) % 2], 1, args.steps)
            for i in range(args.affinity_jobs // args.users) for u in range(args.users)]
    cluster = {"lease_seconds": 60, "heartbeat_seconds": 15}
    if skips is not None:
        cluster["max_affinity_skips"] = skips
    views = run_jobs(store_url, 2, plan, cluster, cache_gb=ONE_MODEL_GB)
    return sum(bool((v.get("timings") or {}).get("model_loaded")) for v in views)


def claim_latency(store_url: str, claimers: int, args: argparse.Namespace) -> dict[str, float]:
    """scripts/bench_claims.py's fair claim on this PostgreSQL: p50, p99 (ms), claims per second."""
    with pg_schema(store_url) as where:
        return run_claims("postgresql", where, "fair", claimers,
                          argparse.Namespace(jobs=args.claim_jobs, users=8, lease=60.0))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3, help="rounds; the table shows medians")
    ap.add_argument("--jobs", type=int, default=24, help="jobs of the throughput runs")
    ap.add_argument("--count", type=int, default=2, help="images per job of the throughput runs")
    ap.add_argument("--steps", type=int, default=4, help="steps per image (demo model, 128x128)")
    ap.add_argument("--users", type=int, default=4, help="users queueing the jobs")
    ap.add_argument("--affinity-jobs", type=int, default=24, help="one-image jobs of the reload runs")
    ap.add_argument("--claim-jobs", type=int, default=400, help="jobs of the claim latency runs")
    args = ap.parse_args()
    runs: dict[str, list[float]] = {}

    def keep(name: str, value: float) -> None:
        runs.setdefault(name, []).append(value)
        print(f"  {name}: {value:.3f}", file=sys.stderr, flush=True)

    with postgres() as url:
        if url is None:
            sys.exit("bench_scaleout needs PostgreSQL: set MULTIGEN_TEST_PG or install it (scripts/_postgres.sh)")
        for r in range(args.rounds):
            print(f"round {r + 1} of {args.rounds}", file=sys.stderr, flush=True)
            for n in (1, 2):
                with pg_schema(url) as where:
                    keep(f"ips{n}", throughput(where, n, args))
                claims = claim_latency(url, n, args)
                keep(f"p50_{n}", claims["p50"])
                keep(f"p99_{n}", claims["p99"])
            for name, skips in (("affinity", None), ("fifo", 0)):
                with pg_schema(url) as where:
                    keep(name, reloads(where, skips, args))
    med = {name: statistics.median(values) for name, values in runs.items()}
    print(f"\nmultigen lab on one PostgreSQL: an API process (workers: 0) + N `multigen worker` processes, demo "
          f"model 128x128, {args.steps} steps, threads 1; medians of {args.rounds} rounds; load average "
          f"{os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    print(f"{'':<58} {'1 worker':>10} {'2 workers':>10}")
    print(f"{f'images per second ({args.jobs} jobs x {args.count} images, {args.users} users)':<58} "
          f"{med['ips1']:>10.2f} {med['ips2']:>10.2f}")
    print(f"{f'claim latency p50 ms (fair claim_job, {args.claim_jobs} jobs; claimers)':<58} "
          f"{med['p50_1']:>10.2f} {med['p50_2']:>10.2f}")
    print(f"{'claim latency p99 ms':<58} {med['p99_1']:>10.2f} {med['p99_2']:>10.2f}")
    print(f"\nmodel loads, {args.affinity_jobs} one-image jobs of 2 models ({args.users} users, alternating) on 2 "
          f"workers that hold one model each:")
    print(f"  with affinity (default max_affinity_skips): {med['affinity']:.0f}   "
          f"without (max_affinity_skips: 0, FIFO-like): {med['fifo']:.0f}   "
          f"(per round: {runs['affinity']} vs {runs['fifo']})")


if __name__ == "__main__":
    main()
