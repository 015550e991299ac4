#!/usr/bin/env python
"""GPU benchmark: multigen's pipes against plain diffusers on SD 1.5-, SDXL- and Flux.1-dev-shaped weights.

The models are built in this process at their real shapes with random weights (``pipes/model_builder.py``,
``pipes/tiny/flux.py``: the compute is the real one, the images are noise), directly on the device. Per
family, at its native size, it prints:

1. **it/s, ours against plain diffusers** (denoiser calls per second, timed at the denoiser, both sides on the
   same shared modules, same scheduler, size, steps, guidance and seed; alternating runs, medians) and seconds
   per image, at the best settings: fp16 (SD, SDXL) or bf16 (Flux), SDPA attention (diffusers' default), then
   with ``channels_last`` (UNet and VAE), then with ``torch.compile`` of the denoiser (``--compile``, per family);
2. **images/s for ``--count`` images**, one batched ``gen`` against a loop of single images (ours);
3. **previews' share of a step**: a latent preview as the service makes it (``latents_to_rgb`` + JPEG)
   against the fastest step;
4. **two worker threads on two devices** (when there are two): images/s of one device alone, then of both at
   once, one thread each, as the service's workers run.

``--dry-run`` runs every part on the CPU with the tiny models, 2 steps and 64x64 (``torch.compile`` with the
``eager`` backend, the two devices both the CPU): the test suite runs it, so the script keeps working where
no GPU is.

Usage (one lent GPU; about 6-8 minutes on an H100 with the defaults)::

    .venv/bin/python scripts/bench_gpu.py --out gpu-table.md
    .venv/bin/python scripts/bench_gpu.py --families SDXL --compile SDXL --repeats 5
    .venv/bin/python scripts/bench_gpu.py --dry-run
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_pipes import _cases  # noqa: E402
from bench_service import preview_cost  # noqa: E402

PROMPT = "a red house by a lake, watercolour"


@dataclass(frozen=True)
class Plan:
    """What one family runs at: size, steps and dtype on the GPU (its native size, its usual precision)."""

    size: int
    steps: int
    dtype: torch.dtype


#: per family: native size, steps (Flux fewer: it/s does not depend on the count, its steps are slow) and dtype
PLANS = {"SD": Plan(512, 20, torch.float16), "SDXL": Plan(1024, 20, torch.float16),
         "FLUX": Plan(1024, 10, torch.bfloat16)}
DRY_PLAN = Plan(64, 2, torch.float32)


def build_base(family: str, full: bool, device: str, dtype: torch.dtype) -> Any:
    """A diffusers pipeline of ``family`` with random weights, full-size or tiny, built on ``device``."""
    from multigen.pipes.model_builder import build_sd, build_sdxl
    from multigen.pipes.tiny.flux import FULL_FLUX, TINY_FLUX, build_flux

    builders: dict[str, Callable[[], Any]] = {"SD": lambda: build_sd(full_size=full),
                                              "SDXL": lambda: build_sdxl(full_size=full),
                                              "FLUX": lambda: build_flux(s=FULL_FLUX if full else TINY_FLUX)}
    with torch.device(device):  # random init where the weights will live: seconds on a GPU, not minutes
        base = builders[family]()
    base.to(device, dtype)
    base.set_progress_bar_config(disable=True)
    # a scheduler built in code has no _class_name in its config yet (saving adds it): the pipes read it
    base.scheduler.register_to_config(_class_name=type(base.scheduler).__name__)
    return base


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


class StepClock:
    """Timestamps of the denoiser's calls (a forward pre-hook on the shared module: both sides alike)."""

    def __init__(self, module: torch.nn.Module, device: str):
        self.stamps: list[float] = []
        self.device = device
        self.handle = module.register_forward_pre_hook(self._tick)

    def _tick(self, *_: Any) -> None:
        sync(self.device)
        self.stamps.append(time.perf_counter())

    def rate(self) -> float:
        """Denoiser calls per second over the last run (first call to last)."""
        s = self.stamps
        return (len(s) - 1) / (s[-1] - s[0]) if len(s) > 1 and s[-1] > s[0] else float("nan")


def timed(fn: Callable[[], Any], device: str) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def ours_vs_plain(name: str, family: str, ours: Any, plain_run: Callable[[], Any], clock: StepClock,
                  args: argparse.Namespace) -> dict[str, Any]:
    """Alternating runs of both sides: medians of it/s and of seconds per image."""
    def our_run() -> Any:
        return ours.gen({"prompt": PROMPT, "negative_prompt": "blurry", "seed": 1})

    for fn in (our_run, plain_run):  # warm-up (and compilation) of both
        fn()
    rates: dict[str, list[float]] = {"ours": [], "plain": []}
    seconds: dict[str, list[float]] = {"ours": [], "plain": []}
    for i in range(args.repeats):
        order = (("ours", our_run), ("plain", plain_run)) if i % 2 == 0 else (("plain", plain_run), ("ours", our_run))
        for side, fn in order:
            clock.stamps.clear()
            seconds[side].append(timed(fn, args.device))
            rates[side].append(clock.rate())
    row = {"family": family, "variant": name, "dtype": str(ours.dtype).replace("torch.", "")}
    for side in ("ours", "plain"):
        row[f"{side}_its"] = statistics.median(rates[side])
        row[f"{side}_s"] = statistics.median(seconds[side])
    row["ratio"] = row["ours_s"] / row["plain_s"]
    return row


def count_rates(ours: Any, args: argparse.Namespace) -> tuple[float, float]:
    """Images/s of ``--count`` images: one batched gen, then a loop of single ones (median of the repeats)."""
    seeds = list(range(100, 100 + args.count))
    batched, looped = [], []
    ours.gen({"prompt": PROMPT, "seed": seeds[:2]})  # warm-up of the batch shapes
    for _ in range(max(1, args.repeats // 2)):
        batched.append(args.count / timed(lambda: ours.gen({"prompt": PROMPT, "seed": seeds}), args.device))
        looped.append(args.count / timed(lambda: [ours.gen({"prompt": PROMPT, "seed": s}) for s in seeds],
                                         args.device))
    return statistics.median(batched), statistics.median(looped)


def two_devices(family: str, devices: list[str], full: bool, plan: Plan, args: argparse.Namespace) -> str:
    """Images/s of one device alone, then of ``devices`` at once (one thread each, as the service's workers)."""
    from multigen.pipes import Prompt2ImPipe

    pipes = []
    for device in devices:
        p = Prompt2ImPipe(pipe=build_base(family, full, device, plan.dtype))
        p.setup(width=plan.size, height=plan.size, steps=plan.steps)
        p.gen({"prompt": PROMPT, "seed": 0})  # warm-up
        pipes.append(p)
    n = args.count

    def run(pipe: Any, out: list[float]) -> None:
        t0 = time.perf_counter()
        for s in range(n):
            pipe.gen({"prompt": PROMPT, "seed": s})
        sync(str(pipe.device))
        out.append(time.perf_counter() - t0)

    alone: list[float] = []
    run(pipes[0], alone)
    together: list[float] = []
    threads = [threading.Thread(target=run, args=(p, together)) for p in pipes]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    one, both = n / alone[0], len(pipes) * n / wall
    return (f"| {family} | {', '.join(devices)} | {one:.3f} | {both:.3f} | {both / one:.2f}x |")


def bench_family(family: str, plan: Plan, full: bool, compile_it: bool, backend: str,
                 args: argparse.Namespace) -> tuple[list[str], str, str]:
    """Parts 1-3 for one family: its it/s rows (each variant), its count row and its preview row."""
    from multigen.pipes.families import family as family_of

    fam = family_of(family)
    base = build_base(family, full, args.device, plan.dtype)
    denoiser = getattr(base, fam.denoiser)
    _, ours, plain_run = _cases(fam, base, None, plan.size, plan.steps, lpw=False)[0]  # Prompt2ImPipe
    clock = StepClock(denoiser, args.device)
    convs = [m for m in (getattr(base, "unet", None), base.vae) if m is not None]
    variants: list[tuple[str, Callable[[], Any]]] = [
        ("eager, SDPA", lambda: None),
        ("+ channels_last", lambda: [m.to(memory_format=torch.channels_last) for m in convs])]
    if compile_it:
        # forward only: the module's call (and the step clock's hook) stays eager around it
        variants.append((f"+ torch.compile ({backend})",
                         lambda: setattr(denoiser, "forward", torch.compile(denoiser.forward, backend=backend))))
    rows = []
    for name, apply in variants:
        apply()
        try:
            row = ours_vs_plain(name, family, ours, plain_run, clock, args)
        except torch.OutOfMemoryError:  # pragma: no cover - GPU only
            rows.append(f"| {family} | {name} | out of memory | | | | | |")
            print(rows[-1], flush=True)
            continue
        rows.append(f"| {family} {plan.size}x{plan.size} {plan.steps} steps | {name} | {row['dtype']} | "
                    f"{row['ours_its']:.2f} | {row['plain_its']:.2f} | {row['ours_s']:.3f} | {row['plain_s']:.3f} | "
                    f"{row['ratio']:.3f} |")
        print(rows[-1], flush=True)
    clock.handle.remove()
    try:
        batched, looped = count_rates(ours, args)
        count_row = f"| {family} | {batched:.3f} | {looped:.3f} | {batched / looped:.2f}x |"
    except torch.OutOfMemoryError:  # pragma: no cover - GPU only
        count_row = f"| {family} | out of memory | | |"
    preview, step = preview_cost(ours, ours.model_type, repeats=5)
    return rows, count_row, f"| {family} | {preview * 1000:.2f} | {step * 1000:.1f} | {preview / step * 100:.2f} % |"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny models, 2 steps, 64x64: every code path, fast")
    p.add_argument("--families", default="SD,SDXL,FLUX", help="comma-separated: SD, SDXL, FLUX")
    p.add_argument("--compile", default="", help="families whose denoiser also runs under torch.compile, e.g. SD,SDXL")
    p.add_argument("--compile-backend", default=None, help="torch.compile backend (default inductor; dry run: eager)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per side and variant (after a warm-up)")
    p.add_argument("--count", type=int, default=8, help="images of the batched/looped and two-device parts")
    p.add_argument("--size", type=int, default=None, help="override every family's native size")
    p.add_argument("--steps", type=int, default=None, help="override every family's steps")
    p.add_argument("--out", type=Path, default=None, help="also write the tables (markdown) to this file")
    args = p.parse_args(argv)
    from diffusers.utils import logging as dlog

    dlog.set_verbosity_error()
    full = not args.dry_run
    args.device = "cpu" if args.dry_run else "cuda"
    if full and not torch.cuda.is_available():
        p.error("no CUDA device: run it on a GPU machine, or give --dry-run")
    backend = args.compile_backend or ("eager" if args.dry_run else "inductor")
    compiled = {f.strip().upper() for f in args.compile.split(",") if f.strip()}
    if args.dry_run:
        compiled = compiled or {"SD"}  # the compile path runs in the dry run too
        args.count = min(args.count, 2)
        args.repeats = min(args.repeats, 1)
    if args.dry_run:
        machine = f"CPU dry run ({torch.get_num_threads()} threads), tiny models"
        devices = ["cpu", "cpu"]
    else:
        machine = f"{torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}, full-size random weights"
        devices = [f"cuda:{i}" for i in range(min(2, torch.cuda.device_count()))]
    import diffusers

    lines = [f"# bench_gpu: {machine}; torch {torch.__version__}, diffusers {diffusers.__version__}; "
             f"{args.repeats} repeats, count {args.count}", "",
             "| family | variant | dtype | ours it/s | plain it/s | ours s/image | plain s/image | ours/plain |",
             "|---|---|---|---|---|---|---|---|"]
    count_lines = ["", f"| family | batched images/s ({args.count}) | looped images/s | batched/looped |",
                   "|---|---|---|---|"]
    preview_lines = ["", "| family | preview ms | step ms | preview share of a step |", "|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    started = time.perf_counter()
    for family in [f.strip().upper() for f in args.families.split(",") if f.strip()]:
        plan = DRY_PLAN if args.dry_run else PLANS[family]
        rows, count_row, preview_row = bench_family(family, Plan(args.size or plan.size, args.steps or plan.steps,
                                                                 plan.dtype), full, family in compiled, backend, args)
        lines += rows
        count_lines.append(count_row)
        preview_lines.append(preview_row)
        with contextlib.suppress(Exception):
            torch.cuda.empty_cache()
        print(f"({family} done after {time.perf_counter() - started:.0f} s)", flush=True)
    device_lines = ["", "| family | devices | images/s one device | images/s both | scaling |", "|---|---|---|---|---|"]
    if len(devices) >= 2:
        two_family = "SDXL" if "SDXL" in args.families.upper() else args.families.split(",")[0].strip().upper()
        plan = DRY_PLAN if args.dry_run else PLANS[two_family]
        device_lines.append(two_devices(two_family, devices, full, plan, args))
    else:
        device_lines.append("| (one device: the two-worker part needs two) | | | | |")
    tables = lines + count_lines + preview_lines + device_lines
    print("\n".join(count_lines + preview_lines + device_lines))
    print(f"\n(all done after {time.perf_counter() - started:.0f} s)")
    if args.out:
        args.out.write_text("\n".join(tables) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
