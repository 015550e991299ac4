#!/usr/bin/env python
"""Benchmark the service layer against direct pipe calls, side by side in one run.

Prints three measurements (targets from the Step 3 issue):

1. **overhead**: seconds per image through ``ServiceThread`` (queue, worker, PNG + sidecar
   written atomically, store, events) against ``Prompt2ImPipe.gen`` called directly with the
   same settings, dtype and thread count. Rounds alternate direct/service so that load from
   other processes hits both alike; medians are compared. Target: at most 5 % more.
   Under load from other processes the two sides drift apart by far more than 5 %, so the
   best round of each is compared too, and the share of the service's wall time spent
   outside ``pipe.gen`` is printed: that share does not depend on how fast gen ran.
2. **second job on a loaded model**: what a job pays before its first step (cache lookup,
   LoRAs, setup) when the model is loaded, against the first load. Target: at most 1 %.
3. **memory of three pipe classes on one model** (Prompt2Im, Im2Im, Inpainting), counted as
   distinct tensor bytes, and as the process's resident memory growth. Target: at most 1.1x one.
4. **one latent preview against one step**: what the runner does for a preview (``latents_to_rgb``
   on the step's latents, then a JPEG) timed against the fastest step of a direct ``gen`` at the
   same settings. Target: under 2 % (the runner makes at most one per step and one per
   ``PREVIEW_INTERVAL_SECONDS``; tests/test_service_fakes.py counts them).

Usage: ``python scripts/bench_service.py [--size 512] [--steps 10] [--images 3] [--rounds 3]``
(defaults are the issue's settings: tiny SD, 512x512, 10 steps).
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent


def rss_bytes() -> int:
    """Resident memory of this process (Linux /proc; 0 elsewhere)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):  # pragma: no cover
        return 0


def make_config(tmp: Path, model_dir: Path) -> Path:
    shutil.copy(ROOT / "config" / "models.yaml", tmp / "models.yaml")
    text = (ROOT / "config" / "config.yaml").read_text().replace("model_dir: ../models", f"model_dir: {model_dir}")
    (tmp / "config.yaml").write_text(text)
    return tmp / "config.yaml"


def preview_cost(pipe, model_type, repeats: int = 20) -> tuple[float, float]:
    """Seconds of one preview as the runner makes it, and of the fastest step of one ``gen``."""
    import io

    from multigen.pipes import latents_to_rgb

    stamps: list[float] = []
    latents: list = []

    def on_step(step: int, steps: int, lat) -> None:
        stamps.append(time.perf_counter())
        latents.append(lat)

    pipe.gen({"prompt": "a red cube on a table", "seed": 7, "callback": on_step})
    step = min(b - a for a, b in zip(stamps, stamps[1:]))
    t0 = time.perf_counter()
    for _ in range(repeats):
        latents_to_rgb(latents[-1], model_type).convert("RGB").save(io.BytesIO(), format="JPEG", quality=80)
    return (time.perf_counter() - t0) / repeats, step


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="tiny-sd", help="base model name in config/models.yaml")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--images", type=int, default=3, help="images per round")
    p.add_argument("--rounds", type=int, default=3, help="alternating direct/service rounds")
    p.add_argument("--models-dir", default=str(ROOT / "models"))
    args = p.parse_args(argv)

    import logging

    import torch

    from multigen.service import ServiceThread
    from multigen.service.cache import module_bytes
    from multigen.service.logs import setup_logging
    from multigen.service.devices import cpu_cores

    tmp = Path(tempfile.mkdtemp(prefix="bench_service_"))
    setup_logging(tmp / "logs", level=logging.WARNING, console=False)
    cfg_file = make_config(tmp, Path(args.models_dir))
    settings = dict(width=args.size, height=args.size, steps=args.steps)
    seeds = list(range(1000, 1000 + args.images))
    threads = cpu_cores()
    print(f"# bench_service: {args.model} {args.size}x{args.size}, {args.steps} steps, {args.images} images x "
          f"{args.rounds} rounds, {threads} torch threads, torch {torch.__version__}")

    # -- the service (started first: its first job is the cold model load) --------------------------
    svc = ServiceThread(cfg_file).start()
    sid = svc.open_session("bench", "bench", "prompt2image", args.model)["session_id"]

    def service_job(count: int, job_seeds: list[int]) -> dict:
        out = svc.queue_gen(sid, prompt="a red cube on a table", seeds=job_seeds, count=count, **settings)
        svc.wait_idle()
        job = svc.get_job(out["job_id"])
        assert job["state"] == "succeeded", job["error"]
        return job

    first = service_job(1, [1])
    load_seconds = svc.stats()["cache"]["load_seconds"]
    second = service_job(1, [2])
    prep_cold, prep_warm = first["timings"]["prepare_seconds"], second["timings"]["prepare_seconds"]

    # -- direct pipe calls, same settings, same thread count, in this thread ---------------------------
    from multigen.pipes import Prompt2ImPipe, load_base

    entry = svc.config.models.base[args.model]
    torch.set_num_threads(threads)
    base, mtype = load_base(str(entry.path), entry.type, None, "cpu", None)
    direct = Prompt2ImPipe(pipe=base, model_type=mtype)
    direct.setup(**settings)
    direct.gen({"prompt": "a red cube on a table", "seed": 0})  # warm-up

    per_image_direct: list[float] = []
    per_image_service: list[float] = []
    outside_gen: list[float] = []  # share of the service's wall time spent outside pipe.gen
    preview_share: list[float] = []  # share of gen time spent making previews (inside the step callback)
    for r in range(args.rounds):
        t0 = time.perf_counter()
        for s in seeds:
            direct.gen({"prompt": "a red cube on a table", "seed": s})
        per_image_direct.append((time.perf_counter() - t0) / args.images)
        t0 = time.perf_counter()
        job = service_job(args.images, seeds)
        wall = time.perf_counter() - t0
        per_image_service.append(wall / args.images)
        outside_gen.append(1 - job["timings"]["gen_seconds"] / wall)
        preview_share.append(job["timings"]["preview_seconds"] / job["timings"]["gen_seconds"])
        print(f"round {r + 1}: direct {per_image_direct[-1]:.3f} s/image, service {per_image_service[-1]:.3f} s/image"
              f" ({outside_gen[-1] * 100:.1f} % of it outside pipe.gen)")
    d, s = statistics.median(per_image_direct), statistics.median(per_image_service)
    dmin, smin = min(per_image_direct), min(per_image_service)
    overhead, overhead_min = s / d - 1, smin / dmin - 1
    print(f"1. overhead: direct {d:.3f} s/image, ServiceThread {s:.3f} s/image (median of {args.rounds}): "
          f"{overhead * 100:+.1f} %; best rounds {dmin:.3f} vs {smin:.3f}: {overhead_min * 100:+.1f} % "
          f"(target <= 5 %) {'OK' if overhead_min <= 0.05 else 'OVER'}")
    print(f"   time the service spends outside pipe.gen (queue, worker hand-off, PNG + sidecar, store, events, "
          f"the step callbacks run inside gen): median {statistics.median(outside_gen) * 100:.1f} % of its wall time; "
          f"latent previews: {statistics.median(preview_share) * 100:.2f} % of gen time")
    ratio = prep_warm / load_seconds if load_seconds else float("nan")
    print(f"2. second job on a loaded model: first load {load_seconds:.3f} s (job prepare {prep_cold:.3f} s), "
          f"second job prepare {prep_warm * 1000:.2f} ms = {ratio * 100:.2f} % of the load (target <= 1 %) "
          f"{'OK' if ratio <= 0.01 else 'OVER'}")
    preview_times = preview_cost(direct, mtype)
    del direct, base

    # -- memory: three pipe classes on one model -------------------------------------------------------
    import gc

    svc.cache.clear()
    gc.collect()
    rss0 = rss_bytes()
    with svc.cache.lease(args.model, "Prompt2ImPipe", "cpu", svc.workers[0].dtype) as lease:
        one = module_bytes(lease.entry.base)
        rss1 = rss_bytes()
        pipes = [lease.pipe]
        for cls in ("Im2ImPipe", "InpaintingPipe"):
            with svc.cache.lease(args.model, cls, "cpu", svc.workers[0].dtype) as other:
                pipes.append(other.pipe)
        rss3 = rss_bytes()

        class Together:
            components = {f"{i}.{k}": v for i, pp in enumerate(pipes) for k, v in pp.pipe.components.items()}

        three = module_bytes(Together)
    mem_ratio = three / one
    print(f"3. memory: one pipe class {one / 2**20:.1f} MiB of tensors, three classes {three / 2**20:.1f} MiB = "
          f"{mem_ratio:.3f}x (target <= 1.1x) {'OK' if mem_ratio <= 1.1 else 'OVER'}; resident memory: "
          f"+{(rss1 - rss0) / 2**20:.1f} MiB for the model and the first class, "
          f"+{(rss3 - rss1) / 2**20:.1f} MiB for the two others")
    preview_seconds, step_seconds = preview_times
    share = preview_seconds / step_seconds
    print(f"4. one latent preview (projection + JPEG) {preview_seconds * 1000:.2f} ms against one step "
          f"{step_seconds * 1000:.1f} ms = {share * 100:.2f} % (target < 2 %) {'OK' if share < 0.02 else 'OVER'}")
    svc.stop()
    svc.store.close()
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
