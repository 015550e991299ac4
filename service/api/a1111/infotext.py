"""A1111's generation text (``infotext``) and the ``info`` JSON string of a txt2img/img2img answer.

A1111's infotext is the prompt, a ``Negative prompt:`` line, then ``Key: value`` pairs
(``Steps: 20, Sampler: Euler a, Schedule type: Karras, CFG scale: 7, Seed: 1, Size: 512x512, Model
hash: ..., Model: ...``). The PNG files multigen writes carry its own variant of that text
(service/writer.py, multigen's scheduler names); the ``infotexts`` of an answer use A1111's names,
as its clients parse them. :func:`parse_infotext` reads either back (``png-info``).
"""
from __future__ import annotations

import json
import re
from typing import Any

from .names import from_scheduler

#: a ``Key: value`` pair of the settings line; values may be quoted (``"a, b"``)
_PAIR_RE = re.compile(r'\s*([\w ][\w \-/]*?):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def infotext(prompt: str, negative_prompt: str, settings: dict[str, Any]) -> str:
    """The text A1111 writes for one image: prompt, negative prompt, settings (Nones left out)."""
    lines = [prompt]
    if negative_prompt:
        lines.append(f"Negative prompt: {negative_prompt}")
    pairs = []
    for key, value in settings.items():
        if value is None or value == "":
            continue
        text = str(value)
        if "," in text or ":" in text:
            text = json.dumps(text)
        pairs.append(f"{key}: {text}")
    lines.append(", ".join(pairs))
    return "\n".join(lines)


def settings_of(params: dict[str, Any], seed: int, width: int, height: int, model: str, model_hash: str,
                loras: list[dict[str, Any]], img2img: bool) -> dict[str, Any]:
    """An image's settings in A1111's names and order."""
    sampler, schedule = from_scheduler(params.get("scheduler"))
    clip_skip = params.get("clip_skip")
    return {
        "Steps": params.get("steps"), "Sampler": sampler, "Schedule type": schedule,
        "CFG scale": params.get("guidance_scale"), "Seed": seed, "Size": f"{width}x{height}",
        "Model hash": model_hash, "Model": model,
        "Denoising strength": params.get("strength") if img2img else None,
        "Clip skip": clip_skip + 1 if clip_skip else None,
        "Lora hashes": ", ".join(f"{x['name']}: {x['weight']:g}" for x in loras) or None,
        "Version": "multigen",
    }


def parse_infotext(text: str) -> dict[str, Any]:
    """A1111's ``parse_generation_parameters``: ``{"Prompt", "Negative prompt", key: value...}``."""
    lines = text.strip().split("\n")
    settings_line = lines[-1] if len(lines) > 1 and _PAIR_RE.match(lines[-1]) and ":" in lines[-1] else ""
    body = lines[:-1] if settings_line else lines
    prompt, negative, in_negative = [], [], False
    for line in body:
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[len("Negative prompt:"):].strip()
        (negative if in_negative else prompt).append(line)
    out: dict[str, Any] = {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative)}
    for match in _PAIR_RE.finditer(settings_line):
        key, value = match.group(1).strip(), match.group(2).strip()
        if value.startswith('"') and value.endswith('"'):
            try:
                value = json.loads(value)
            except ValueError:
                pass
        if key:
            out[key] = value
    size = out.get("Size")
    if isinstance(size, str) and "x" in size:
        out["Size-1"], _, out["Size-2"] = size.partition("x")
    return out


def info_json(request_body: dict[str, Any], *, prompt: str, negative_prompt: str, seeds: list[int],
              infotexts: list[str], sampler_name: str, scheduler: str, model: str, model_hash: str,
              job_timestamp: str, clip_skip: int, denoising_strength: float | None,
              all_prompts: list[str] | None = None, all_negative_prompts: list[str] | None = None) -> str:
    """The ``info`` of a generation answer: a JSON **string**, as A1111 sends it (``all_prompts``: each
    image's own, after its styles; default: ``prompt`` for every image)."""
    n = len(seeds)
    info = {
        "prompt": prompt, "all_prompts": all_prompts or [prompt] * n, "negative_prompt": negative_prompt,
        "all_negative_prompts": all_negative_prompts or [negative_prompt] * n,
        "seed": seeds[0] if seeds else -1, "all_seeds": seeds,
        "subseed": request_body.get("subseed", -1), "all_subseeds": [request_body.get("subseed", -1)] * n,
        "subseed_strength": request_body.get("subseed_strength", 0), "width": request_body["width"],
        "height": request_body["height"], "sampler_name": sampler_name, "scheduler": scheduler,
        "cfg_scale": request_body["cfg_scale"], "steps": request_body["steps"],
        "batch_size": request_body["batch_size"], "n_iter": request_body["n_iter"], "restore_faces": False,
        "face_restoration_model": None, "sd_model_name": model, "sd_model_hash": model_hash,
        "sd_vae_name": None, "sd_vae_hash": None, "seed_resize_from_w": -1, "seed_resize_from_h": -1,
        "denoising_strength": denoising_strength, "extra_generation_params": {}, "index_of_first_image": 0,
        "infotexts": infotexts, "styles": request_body.get("styles") or [], "job_timestamp": job_timestamp,
        "clip_skip": clip_skip, "is_using_inpainting_conditioning": False, "version": "multigen",
    }
    return json.dumps(info)
