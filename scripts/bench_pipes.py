"""Time per image through the multigen pipe classes against plain diffusers pipelines.

Both sides use the same base weights, dtype, device, scheduler class, size, steps, guidance,
seed and inputs; runs alternate (ours, plain, ours, plain, ...) so machine load hits both
alike. Prints one row per pipe: median and minimum seconds per image on both sides, the
overhead in percent, and "layer": the time our code spends around the diffusers call as a
percentage of the call itself (measured inside our runs, so machine load does not skew it),
and whether both sides gave the same pixels (the masked pipes differ by design: ours
composites the result onto the original).

Example (small and quick)::

    .venv/bin/python scripts/bench_pipes.py --size 256 --steps 4 --repeats 3

    .venv/bin/python scripts/bench_pipes.py --kinds FLUX,QWEN_IMAGE --size 256 --steps 4 --repeats 5

The lead's run on an idle machine: the defaults (512², 20 steps, 5 repeats, SD and SDXL).
"""
from __future__ import annotations

import argparse
import inspect
import logging
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
logger = logging.getLogger("bench_pipes")


def _image(size: int) -> Image.Image:
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(60, 200, (size, size, 3), dtype=np.uint8))
    d = ImageDraw.Draw(img)
    d.rectangle((size // 8, size // 8, size // 2, size // 2), fill=(220, 40, 40))
    d.ellipse((size // 2, size // 2, size - size // 8, size - size // 8), fill=(30, 30, 200))
    return img


def _mask(size: int) -> Image.Image:
    m = Image.new("L", (size, size), 0)
    m.paste(255, (size // 4, size // 4, 3 * size // 4, 3 * size // 4))
    return m


def _takes(cls: type, name: str) -> bool:
    return name in inspect.signature(cls.__call__).parameters


def _cases(fam: Any, base: Any, controlnet: Any, size: int, steps: int, lpw: bool) -> list[tuple[str, Any, Callable]]:
    """(name, our pipe object, plain call) per pipe class the family runs, with identical settings.

    The plain side is the family's own diffusers class (``Family.pipelines``) called as its
    documentation shows, with the settings our pipe object resolved (steps, guidance, the family's
    own parameters such as ``true_cfg_scale``)."""
    from multigen.pipes import CIm2ImPipe, Cond2ImPipe, Im2ImPipe, InpaintingPipe, MaskedIm2ImPipe, Prompt2ImPipe
    from multigen.pipes.conditions import make_condition
    from multigen.pipes.families import Role

    img, mask = _image(size), _mask(size)
    prompt, negative = "a red house by a lake, watercolour", "blurry"
    dtype = getattr(base, fam.denoiser).dtype

    def plain(role: Role, **extra: Any) -> Any:
        cls = fam.pipeline_class(role)
        sched = type(base.scheduler).from_config(base.scheduler.config)
        p = cls.from_pipe(base, scheduler=sched, dtype=dtype, **extra)
        p.set_progress_bar_config(disable=True)
        return p

    def call(p: Any, ours: Any, **kw: Any) -> Callable[[], Any]:
        settings = {name: ours.params[name] for name in fam.params if ours.params.get(name) is not None}
        if _takes(type(p), "width"):
            settings.update(width=ours.padded(size), height=ours.padded(size))

        if _takes(type(p), "negative_prompt"):  # Flux's ControlNet img2img class takes none (ours drops it)
            settings["negative_prompt"] = negative

        def run() -> Any:
            with torch.inference_mode():
                return p(prompt=prompt, num_inference_steps=steps,
                         guidance_scale=ours.params["guidance_scale"], generator=torch.Generator("cpu").manual_seed(1),
                         **settings, **kw).images
        return run

    def ours(cls: type, **setup: Any) -> Any:
        pipe = cls(pipe=base, **({"controlnets": setup.pop("controlnets")} if "controlnets" in setup else {}),
                   **({"ctypes": setup.pop("ctypes")} if "ctypes" in setup else {}))
        pipe.setup(steps=steps, lpw=lpw, **setup)
        return pipe

    cases = []
    p2i = ours(Prompt2ImPipe, width=size, height=size)
    cases.append(("Prompt2ImPipe", p2i, call(plain(Role.TEXT2IMAGE), p2i)))
    if fam.runs(Role.IMAGE2IMAGE):
        i2i = ours(Im2ImPipe, image=img, strength=0.75)
        cases.append(("Im2ImPipe", i2i, call(plain(Role.IMAGE2IMAGE), i2i, image=img, strength=0.75)))
    if fam.runs(Role.INPAINT):
        inpaint_plain = plain(Role.INPAINT)
        masked = ours(MaskedIm2ImPipe, image=img, mask=mask, strength=0.75, blur=4, blur_compose=4)
        cases.append(("MaskedIm2ImPipe", masked, call(inpaint_plain, masked, image=img, mask_image=masked.denoise_mask,
                                                      strength=0.75)))
        inp = ours(InpaintingPipe, image=img, mask=mask, blur=4)
        cases.append(("InpaintingPipe", inp, call(inpaint_plain, inp, image=img, mask_image=inp.denoise_mask,
                                                  strength=1.0)))
    if controlnet is not None and fam.runs(Role.CONTROLNET):
        c2i = ours(Cond2ImPipe, controlnets=controlnet, image=img)
        cn_plain = plain(Role.CONTROLNET, controlnet=controlnet)
        key = "control_image" if _takes(type(cn_plain), "control_image") else "image"
        cases.append(("Cond2ImPipe", c2i, call(cn_plain, c2i, **{key: img}, controlnet_conditioning_scale=1.0)))
    if controlnet is not None and fam.runs(Role.CONTROLNET_IMAGE2IMAGE):
        ci2i = ours(CIm2ImPipe, controlnets=[controlnet], ctypes=["canny"], image=img, strength=0.75, cscales=0.75)
        cimg_plain = plain(Role.CONTROLNET_IMAGE2IMAGE, controlnet=controlnet)
        # both sides compute the condition once, outside the timed runs (ours does it in setup)
        cases.append(("CIm2ImPipe", ci2i, call(cimg_plain, ci2i, image=img,
                                               control_image=make_condition("canny", img), strength=0.75,
                                               controlnet_conditioning_scale=0.75)))
    return cases


class _TimedPipeline:
    """Forwards to a diffusers pipeline and adds up the time spent inside its ``__call__``,
    so the time our layer adds around it can be told apart from machine noise."""

    def __init__(self, inner: Any) -> None:
        object.__setattr__(self, "_inner", inner)
        object.__setattr__(self, "inside", 0.0)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "inside":
            object.__setattr__(self, name, value)
        else:
            setattr(self._inner, name, value)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return self._inner(*args, **kwargs)
        finally:
            object.__setattr__(self, "inside", self.inside + time.perf_counter() - start)


def _time(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models-dir", default=str(ROOT / "models"))
    parser.add_argument("--kinds", default="SD,SDXL", help="comma-separated families: SD, SDXL, FLUX, QWEN_IMAGE, Z_IMAGE "
                        "(their tiny models: tiny-sd, tiny-flux, tiny-qwen-image, ...)")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per side (after one warm-up each)")
    parser.add_argument("--dtype", default=None, help="float32, bfloat16, float16 (default: per device)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--lpw", action="store_true", help="our side uses prompt weighting (off: same encoder)")
    parser.add_argument("--pipes", default="", help="comma-separated pipe names to run (default: all)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    from diffusers.utils import logging as dlog

    dlog.set_verbosity_error()
    from multigen.pipes import load_base
    from multigen.pipes.loading import dtype_name

    models = Path(args.models_dir)
    wanted = {p.strip() for p in args.pipes.split(",") if p.strip()}
    print(f"device={args.device} threads={args.threads} size={args.size} steps={args.steps} "
          f"repeats={args.repeats} lpw={args.lpw}")
    print(f"{'model':10} {'pipe':16} {'dtype':9} {'ours med s':>11} {'plain med s':>12} {'overhead':>9} "
          f"{'ours min':>9} {'plain min':>9} {'min ovh':>9} {'layer':>9} {'same':>5}")
    worst = worst_layer = 0.0
    from multigen.pipes.families import family

    for kind in [k.strip().upper() for k in args.kinds.split(",") if k.strip()]:
        fam = family(kind)
        slug = fam.name.lower().replace("_", "-")
        base, _ = load_base(models / f"tiny-{slug}", device=args.device, dtype=args.dtype)
        dtype = getattr(base, fam.denoiser).dtype
        controlnet = None
        if (models / f"tiny-controlnet-{slug}").is_dir():
            import diffusers

            controlnet = getattr(diffusers, fam.controlnet_class).from_pretrained(
                str(models / f"tiny-controlnet-{slug}"), dtype=dtype).to(args.device)
        elif fam.name == "SDXL":
            from multigen.pipes.model_builder import build_controlnet

            controlnet = build_controlnet(base.unet).to(args.device, dtype)
        for name, ours, plain_run in _cases(fam, base, controlnet, args.size, args.steps, args.lpw):
            if wanted and name not in wanted:
                continue
            timed = _TimedPipeline(ours.pipe)
            ours.pipe = timed
            our_run = lambda: ours.gen({"prompt": "a red house by a lake, watercolour",  # noqa: E731
                                        "negative_prompt": "blurry", "seed": 1})
            ours_img, plain_img = our_run()[0], plain_run()[0]  # warm-up; same settings give the same pixels
            same = "yes" if np.array_equal(np.asarray(ours_img), np.asarray(plain_img)) else "no"
            t_ours, t_plain = [], []
            timed.inside = 0.0
            for i in range(args.repeats):  # alternate which side goes first
                if i % 2 == 0:
                    t_ours.append(_time(our_run))
                    t_plain.append(_time(plain_run))
                else:
                    t_plain.append(_time(plain_run))
                    t_ours.append(_time(our_run))
            mo, mp = statistics.median(t_ours), statistics.median(t_plain)
            overhead = (mo / mp - 1.0) * 100.0
            min_overhead = (min(t_ours) / min(t_plain) - 1.0) * 100.0
            layer = (sum(t_ours) - timed.inside) / timed.inside * 100.0
            worst = max(worst, overhead)
            worst_layer = max(worst_layer, layer)
            print(f"{kind:10} {name:16} {dtype_name(dtype):9} {mo:11.4f} {mp:12.4f} {overhead:8.1f}% "
                  f"{min(t_ours):9.4f} {min(t_plain):9.4f} {min_overhead:8.1f}% {layer:8.2f}% {same:>5}", flush=True)
    print(f"worst median overhead vs plain diffusers: {worst:.1f}% (target: at most 3%)")
    print(f"worst layer time (our code around the diffusers call, same run): {worst_layer:.2f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
