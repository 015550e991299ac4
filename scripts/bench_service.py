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

5. **peer comparison**: metafusion's README example (its ServiceThread: 5 images of SDXL with a 4-step
   LoRA, 1024x1024, 4 steps, guidance 0, Euler a with trailing timesteps), here on the tiny SDXL and its
   LoRA, each side in a fresh process, rounds alternating: our ServiceThread; plain diffusers doing what
   metafusion's worker does (``StableDiffusionXLPipeline``, the LoRA loaded unfused, a PNG + JSON per image);
   and metafusion itself when a checkout of it is given (``--metafusion DIR`` or ``$METAFUSION_PATH``: the
   folder holding its ``multigen`` package, which has our import name, so it runs in its own process with
   that folder first on ``sys.path``); otherwise that side says it skipped. Both servers run at ``--dtype``
   (metafusion's worker loads bfloat16 whatever it is told; for another dtype its loader's ``torch_dtype``
   is replaced, nothing else). Per side: seconds per image once running (first image to last), the job
   (queue to last image: model load included), the process (start to last image: imports included) and
   the CPU seconds per image once running (all threads; other load on the machine sways it less than wall
   time); ratios ours/peer (target: at most 1.0x metafusion).

Usage: ``python scripts/bench_service.py [--size 512] [--steps 10] [--images 3] [--rounds 3]``
(defaults are the issue's settings: tiny SD, 512x512, 10 steps); ``--parts peer`` for the peer comparison
alone, e.g. ``METAFUSION_PATH=~/metafusion python scripts/bench_service.py --parts peer --dtype float32``.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

STARTED = time.perf_counter()  # the peer sides count their imports from here
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


# ---- 5. peer comparison: metafusion's README example ----------------------------------------------

PEER_SIDES = ("ours", "plain", "metafusion")
#: metafusion's README example (its ServiceThread section), as queued there
PEER_JOB = {"lpw": True, "width": 1024, "height": 1024, "steps": 4, "timestep_spacing": "trailing",
            "guidance_scale": 0, "scheduler": "EulerAncestralDiscreteScheduler"}
PEER_PROMPT = "bio-tech lab with computers and exotic flowers, artwork"
PEER_SEED = 42
#: the negative prompt metafusion's worker gives every job (unused at guidance 0, encoded all the same)
METAFUSION_NPROMPT = ("jpeg artifacts, blur, distortion, watermark, signature, extra fingers, fewer fingers, lowres, "
                      "nude, bad hands, duplicate heads, bad anatomy, bad crop")
#: metafusion keeps LoRAs under <model_dir>/Lora, we under the models.yaml id
PEER_LORA = {"ours": "Lora/sdxl-lora.safetensors", "metafusion": "sdxl-lora.safetensors"}


def write_peer_folder(folder: Path, models_dir: Path, side: str, dtype: str) -> Path:
    """config.yaml and models.yaml in metafusion's format (its three keys, ours adds ``dtype``), naming the
    tiny SDXL as ``sdxl1`` and its LoRA as ``hypersd4steps``, as the README's do."""
    models = folder / "models"
    (models / "Lora").mkdir(parents=True)
    (models / "sdxl").symlink_to(models_dir / "tiny-sdxl")
    (models / "Lora" / "sdxl-lora.safetensors").symlink_to(models_dir / "loras" / "tiny-sdxl-lora.safetensors")
    extra = f"dtype: {dtype}\n" if side == "ours" else ""
    (folder / "config.yaml").write_text(
        f"model_list: models.yaml\nmodel_dir: ./models/\nlogging_folder: ./logs/\n{extra}")
    (folder / "models.yaml").write_text(
        "base:\n  sdxl1: {id: sdxl, type: SDXL}\n"
        f"lora:\n  hypersd4steps: {{id: {PEER_LORA.get(side, '')}, type: SDXL}}\n"
        "pipes:\n  prompt2image: {name: Prompt to Image, classname: Prompt2ImPipe, need_imgs: false, "
        "needs_cnet: false}\n")
    return folder


def _force_metafusion_dtype(dtype: str) -> None:
    """metafusion's worker loads every pipeline as bfloat16: give its loader ``dtype`` instead."""
    import torch
    from multigen.loader import Loader  # metafusion's

    load = Loader.load_pipeline

    def load_pipeline(self, cls, path, torch_dtype=None, *args, **kwargs):
        return load(self, cls, path, getattr(torch, dtype), *args, **kwargs)

    Loader.load_pipeline = load_pipeline


def run_peer_side(side: str, folder: Path, images: int, dtype: str) -> dict[str, float]:
    """Run the README example on one side (in this fresh process); times of each written image."""
    seeds = [PEER_SEED + i for i in range(images)]
    written: list[float] = []
    cpu: list[float] = []  # this process's CPU seconds (all threads) at each image: less swayed by other load
    finished = threading.Event()

    def on_image(*_args, **_kwargs) -> None:
        written.append(time.perf_counter())
        cpu.append(time.process_time())
        if len(written) == images:
            finished.set()

    if side == "plain":
        import torch
        from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionXLPipeline

        torch.set_num_threads(_cores())
        out = folder / "outputs"
        out.mkdir(exist_ok=True)
        queued = time.perf_counter()
        pipe = StableDiffusionXLPipeline.from_pretrained(str(folder / "models" / "sdxl"), dtype=getattr(torch, dtype))
        pipe.set_progress_bar_config(disable=True)
        pipe.load_lora_weights(str(folder / "models" / "Lora" / "sdxl-lora.safetensors"))  # unfused, as metafusion
        pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config,
                                                                     timestep_spacing=PEER_JOB["timestep_spacing"])
        for i, seed in enumerate(seeds):
            with torch.inference_mode():
                image = pipe(prompt=PEER_PROMPT, num_inference_steps=PEER_JOB["steps"],
                             guidance_scale=PEER_JOB["guidance_scale"], width=PEER_JOB["width"],
                             height=PEER_JOB["height"], generator=torch.Generator("cpu").manual_seed(seed)).images[0]
            image.save(out / f"{i:05d}.png")
            (out / f"{i:05d}.json").write_text(json.dumps({"prompt": PEER_PROMPT, "seed": seed, **PEER_JOB}))
            on_image()
    else:
        os.chdir(folder)  # metafusion writes its _projects folder here
        from multigen.worker import ServiceThread  # ours, or metafusion's (its folder first on sys.path)

        if side == "metafusion" and dtype != "bfloat16":
            _force_metafusion_dtype(dtype)
        worker = ServiceThread(str(folder / "config.yaml"))
        worker.start()
        result = worker.open_session(user="bench", project="peer", model="sdxl1", pipe="prompt2image",
                                     loras=["hypersd4steps"])
        assert "error" not in result, result
        queued = time.perf_counter()
        worker.queue_gen(session_id=result["session_id"], images=None, prompt=PEER_PROMPT, image_callback=on_image,
                         count=images, seeds=seeds, **PEER_JOB)
        ok = finished.wait(1800)
        worker.stop()
        assert ok, f"{side}: {len(written)} of {images} images after 1800 s"
    return {"per_image": (written[-1] - written[0]) / max(1, images - 1), "job": written[-1] - queued,
            "process": written[-1] - STARTED, "cpu_per_image": (cpu[-1] - cpu[0]) / max(1, images - 1)}


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def metafusion_path(given: str | None) -> tuple[Path | None, str]:
    """The metafusion checkout to run, or None and why not."""
    if not given:
        return None, "no metafusion checkout given (--metafusion DIR or $METAFUSION_PATH)"
    path = Path(given).expanduser().resolve()
    if not (path / "multigen" / "worker_base.py").is_file():
        return None, f"{path} holds no metafusion multigen/ package (multigen/worker_base.py)"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(path), os.environ.get("PYTHONPATH", "")]))
    probe = subprocess.run([sys.executable, "-c", "import multigen.worker, multigen.worker_base"], env=env,
                           capture_output=True, text=True, cwd=tempfile.gettempdir())
    if probe.returncode:
        return None, f"metafusion at {path} does not import: {probe.stderr.strip().splitlines()[-1]}"
    return path, ""


def peer_comparison(args: argparse.Namespace) -> None:
    """Part 5: each side of the README example in a fresh process, rounds alternating, medians."""
    mf, why = metafusion_path(args.metafusion)
    sides = ["ours", "plain"] + (["metafusion"] if mf else [])
    runs: dict[str, list[dict[str, float]]] = {side: [] for side in sides}
    tmp = Path(tempfile.mkdtemp(prefix="bench_peer_"))
    print(f"5b. peer comparison: metafusion's README example, {args.peer_images} images of the tiny SDXL + LoRA, "
          f"1024x1024, 4 steps, {args.dtype}, {_cores()} cores, {args.peer_rounds} fresh-process rounds per side",
          flush=True)
    try:
        for r in range(args.peer_rounds):
            for side in sides[r % len(sides):] + sides[:r % len(sides)]:  # each side leads in turn
                folder = write_peer_folder(tmp / f"{side}-{r}", Path(args.models_dir).resolve(), side, args.dtype)
                env = dict(os.environ)
                if side == "metafusion":
                    env["PYTHONPATH"] = os.pathsep.join([str(mf), os.environ.get("PYTHONPATH", "")])
                done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--peer-side", side,
                                       "--peer-folder", str(folder), "--peer-images", str(args.peer_images),
                                       "--dtype", args.dtype], env=env, capture_output=True, text=True,
                                      cwd=str(folder))
                if done.returncode:
                    raise RuntimeError(f"the {side} side failed:\n{done.stderr[-3000:]}")
                runs[side].append(json.loads(done.stdout.strip().splitlines()[-1]))
                print(f"   round {r + 1} {side:10s} " + ", ".join(f"{k} {v:.2f} s" for k, v in runs[side][-1].items()),
                      flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    med = {side: {k: statistics.median(run[k] for run in runs[side]) for k in runs[side][0]} for side in sides}
    for side in sides:
        print(f"   {side:10s} median: " + ", ".join(f"{k} {v:.2f} s" for k, v in med[side].items()))
    for peer in sides[1:]:
        ratios = {k: med["ours"][k] / med[peer][k] for k in med["ours"]}
        over = [k for k in ("per_image", "process", "cpu_per_image") if ratios[k] > 1.0]
        target = (f" (target <= 1.0x) {'OVER: ' + ', '.join(over) if over else 'OK'}"
                  if peer == "metafusion" else "")
        print(f"   ours / {peer}: " + ", ".join(f"{k} {v:.3f}x" for k, v in ratios.items()) + target)
    if not mf:
        print(f"   metafusion: skipped ({why})")


def import_metafusion(given: str | None) -> tuple[Any, str]:
    """metafusion's package: ``import metafusion`` where it is installed under that name, else the
    ``multigen/`` package of the checkout ``given`` loaded under the name ``metafusion`` (it imports
    itself relatively, so the name it has does not matter); or None and why not."""
    import importlib
    import importlib.util

    try:
        return importlib.import_module("metafusion"), ""
    except ImportError:
        pass
    path, why = metafusion_path(given)
    if path is None:
        return None, why
    spec = importlib.util.spec_from_file_location("metafusion", path / "multigen" / "__init__.py",
                                                  submodule_search_locations=[str(path / "multigen")])
    module = importlib.util.module_from_spec(spec)
    sys.modules["metafusion"] = module
    spec.loader.exec_module(module)
    return module, ""


class StageClock:
    """Seconds a diffusers pipeline spends in its denoiser, VAE decode and text encoders (wrapped in place)."""

    STAGES = {"unet": "forward", "vae": "decode", "text_encoder": "forward", "text_encoder_2": "forward"}

    def __init__(self, pipe: Any):
        self.seconds = {name: 0.0 for name in self.STAGES}
        for name, method in self.STAGES.items():
            module = getattr(pipe, name)
            setattr(module, method, self._timed(name, getattr(module, method)))

    def _timed(self, name: str, fn: Any) -> Any:
        def run(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[name] += time.perf_counter() - t0
        return run


def peer_sides_in_process(args: argparse.Namespace, folder: Path) -> dict[str, tuple[Any, Any]]:
    """Each side of the example as its pipe path makes one image: ``name -> (make_image(seed), pipeline)``.

    ours: the pipe as our model cache builds it (``load_base``, the LoRA, ``setup`` with the README's job),
    through our ``GenSession`` (PNG + JSON per image); ours-nchw: the same with the VAE in NCHW memory, as
    before the channels_last change; plain: ``StableDiffusionXLPipeline`` with the LoRA loaded unfused, a PNG
    and a JSON per image; metafusion: its loader, ``Prompt2ImPipe`` and ``GenSession``, as its worker runs them.
    """
    import torch
    from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionXLPipeline

    from multigen.pipes import Cfgen, GenSession, Prompt2ImPipe, load_base

    models = Path(args.models_dir).resolve()
    sdxl, lora = models / "tiny-sdxl", models / "loras" / "tiny-sdxl-lora.safetensors"
    dtype = getattr(torch, args.dtype)
    sides: dict[str, tuple[Any, Any]] = {}
    for name in ("ours", "ours-nchw"):
        base, _ = load_base(sdxl, device="cpu", dtype=args.dtype)
        if name == "ours-nchw":
            base.vae.to(memory_format=torch.contiguous_format)
        pipe = Prompt2ImPipe(pipe=base)
        pipe.set_loras([(str(lora), 1.0)])
        pipe.setup(**PEER_JOB)
        sides[name] = (lambda seed, pipe=pipe, name=name: GenSession(
            str(folder / name), pipe, Cfgen(PEER_PROMPT, METAFUSION_NPROMPT, seeds=[seed])).gen_sess(add_count=1),
                       pipe.pipe)
    plain = StableDiffusionXLPipeline.from_pretrained(str(sdxl), dtype=dtype)
    plain.set_progress_bar_config(disable=True)
    plain.load_lora_weights(str(lora))
    plain.scheduler = EulerAncestralDiscreteScheduler.from_config(plain.scheduler.config,
                                                                  timestep_spacing=PEER_JOB["timestep_spacing"])
    (folder / "plain").mkdir()

    def plain_image(seed: int) -> None:
        with torch.inference_mode():
            image = plain(prompt=PEER_PROMPT, negative_prompt=METAFUSION_NPROMPT, num_inference_steps=PEER_JOB["steps"],
                          guidance_scale=PEER_JOB["guidance_scale"], width=PEER_JOB["width"],
                          height=PEER_JOB["height"], generator=torch.Generator("cpu").manual_seed(seed)).images[0]
        image.save(folder / "plain" / f"{seed}.png")
        (folder / "plain" / f"{seed}.json").write_text(json.dumps({"prompt": PEER_PROMPT, "seed": seed, **PEER_JOB}))

    sides["plain"] = (plain_image, plain)
    mf, why = import_metafusion(args.metafusion)
    if mf is None:
        print(f"   metafusion: skipped ({why})")
        return sides
    from metafusion.loader import Loader
    from metafusion.pipes import Prompt2ImPipe as MetafusionPrompt2ImPipe
    from metafusion.prompting import Cfgen as MetafusionCfgen
    from metafusion.sessions import GenSession as MetafusionGenSession

    pipeline = Loader().load_pipeline(StableDiffusionXLPipeline, str(sdxl), torch_dtype=dtype,
                                      device=torch.device("cpu"))
    theirs = MetafusionPrompt2ImPipe(str(sdxl), pipe=pipeline, device=torch.device("cpu"))
    theirs.setup(**PEER_JOB, loras=[str(lora)])
    sides["metafusion"] = (lambda seed: MetafusionGenSession(
        str(folder / "metafusion"), theirs, MetafusionCfgen(PEER_PROMPT, METAFUSION_NPROMPT, seeds=[seed])
    ).gen_sess(add_count=1), theirs.pipe)
    return sides


def peer_in_process(args: argparse.Namespace) -> None:
    """Part 5a: one image at a time from each side, sides rotating, ``--peer-images`` rounds; medians."""
    import torch

    torch.set_num_threads(_cores())
    tmp = Path(tempfile.mkdtemp(prefix="bench_peer_"))
    print(f"5a. peer comparison per image, in this process: the README example's settings on the tiny SDXL + LoRA "
          f"(1024x1024, 4 steps, {args.dtype}, {torch.get_num_threads()} threads), one image per side in turn, "
          f"{args.peer_images * 3} rounds", flush=True)
    try:
        sides = peer_sides_in_process(args, tmp)
        clocks = {name: StageClock(pipeline) for name, (_, pipeline) in sides.items()}
        names = list(sides)
        for name in names:  # warm-up
            sides[name][0](1)
        seconds: dict[str, list[float]] = {name: [] for name in names}
        stages: dict[str, list[dict[str, float]]] = {name: [] for name in names}
        for r in range(args.peer_images * 3):
            for name in names[r % len(names):] + names[:r % len(names)]:
                for key in clocks[name].seconds:
                    clocks[name].seconds[key] = 0.0
                t0 = time.perf_counter()
                sides[name][0](PEER_SEED + r)
                seconds[name].append(time.perf_counter() - t0)
                stages[name].append(dict(clocks[name].seconds))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    med = {name: statistics.median(seconds[name]) for name in names}
    print(f"   {'side':11s} {'s/image':>8s} {'UNet':>7s} {'VAE dec':>8s} {'text enc':>9s} {'rest':>7s}  (medians)")
    for name in names:
        st = {k: statistics.median(x[k] for x in stages[name]) for k in StageClock.STAGES}
        text = st["text_encoder"] + st["text_encoder_2"]
        print(f"   {name:11s} {med[name]:8.3f} {st['unet']:7.3f} {st['vae']:8.3f} {text:9.3f} "
              f"{med[name] - st['unet'] - st['vae'] - text:7.3f}")
    for peer in names[1:]:
        verdict = f" (target <= 1.0x) {'OK' if med['ours'] <= med[peer] else 'OVER'}" if peer == "metafusion" else ""
        print(f"   ours / {peer}: {med['ours'] / med[peer]:.3f}x{verdict}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="tiny-sd", help="base model name in config/models.yaml")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--images", type=int, default=3, help="images per round")
    p.add_argument("--rounds", type=int, default=3, help="alternating direct/service rounds")
    p.add_argument("--models-dir", default=str(ROOT / "models"))
    p.add_argument("--parts", default="service,peer,peer-processes",
                   help="comma-separated: service (1-4), peer (5a: per image, this process), peer-processes (5b)")
    p.add_argument("--peer-images", type=int, default=5, help="images of the peer example")
    p.add_argument("--peer-rounds", type=int, default=3, help="fresh-process runs per peer side, alternating")
    p.add_argument("--dtype", default="bfloat16", help="dtype of every peer side (metafusion's own: bfloat16)")
    p.add_argument("--metafusion", default=os.environ.get("METAFUSION_PATH"),
                   help="a metafusion checkout (the folder with its multigen/ package); default $METAFUSION_PATH")
    p.add_argument("--peer-side", choices=PEER_SIDES, help=argparse.SUPPRESS)  # one side, in its own process
    p.add_argument("--peer-folder", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.peer_side:
        print(json.dumps(run_peer_side(args.peer_side, args.peer_folder, args.peer_images, args.dtype)))
        return 0
    parts = {x.strip() for x in args.parts.split(",")}
    if "service" in parts:
        service_parts(args)
    if "peer" in parts:
        peer_in_process(args)
    if "peer-processes" in parts:
        peer_comparison(args)
    return 0


def service_parts(args: argparse.Namespace) -> None:
    """Parts 1-4: the service against direct pipe calls, memory, previews."""
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


if __name__ == "__main__":
    sys.exit(main())
