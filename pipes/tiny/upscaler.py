"""A tiny ESRGAN (RRDBNet) upscaler, x4, in Real-ESRGAN's key layout, for ``uov`` upscale tests.

Real-ESRGAN's names (``conv_first``, ``body.N.rdbK.convJ``, ``conv_body``, ``conv_up1``/``2``, ``conv_hr``,
``conv_last``), so spandrel recognises it as it does ``RealESRGAN_x4plus``. 8 features, one RRDB block
(spandrel fixes the growth channels at 32), about 230k weights. The weights are an identity path
(nearest-neighbour x4: the first convolution copies the RGB channels, the RRDB body adds nothing, each
up-convolution and the last ones pass them on) plus small seeded noise: its output looks like its
input, and differs from a Lanczos resize.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from .common import TinyModel, seeded

FILE = "upscalers/tiny-esrgan.safetensors"
#: features, RRDB blocks and growth channels (spandrel's RRDB always has 32)
FEATURES, BLOCKS, GROWTH = 8, 1, 32
#: the noise on every weight around the identity path
NOISE = 0.01


def _conv(out_ch: int, in_ch: int, identity: bool = False) -> dict[str, torch.Tensor]:
    weight = torch.randn(out_ch, in_ch, 3, 3) * NOISE
    if identity:
        for c in range(min(out_ch, in_ch)):
            weight[c, c, 1, 1] += 1.0
    return {"weight": weight, "bias": torch.randn(out_ch) * NOISE}


def esrgan_state_dict(seed: int) -> dict[str, torch.Tensor]:
    """The tiny x4 RRDBNet's weights in Real-ESRGAN's names."""
    seeded(seed, 900)
    parts: dict[str, dict[str, torch.Tensor]] = {"conv_first": _conv(FEATURES, 3, identity=True)}
    for block in range(BLOCKS):
        for rdb in (1, 2, 3):
            for j in range(1, 6):
                out_ch = FEATURES if j == 5 else GROWTH
                parts[f"body.{block}.rdb{rdb}.conv{j}"] = _conv(out_ch, FEATURES + (j - 1) * GROWTH)
    parts["conv_body"] = _conv(FEATURES, FEATURES)
    for name in ("conv_up1", "conv_up2", "conv_hr"):
        parts[name] = _conv(FEATURES, FEATURES, identity=True)
    parts["conv_last"] = _conv(3, FEATURES, identity=True)
    return {f"{name}.{kind}": t.contiguous() for name, p in parts.items() for kind, t in p.items()}


def build(out: Path, seed: int) -> Path:
    path = Path(out) / FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(esrgan_state_dict(seed), str(path))
    return path


@dataclass(frozen=True)
class TinyFile(TinyModel):
    """A tiny model that is one file (no diffusers folder): complete when its ``extras`` exist."""

    def written(self) -> tuple[str, ...]:
        return self.extras


MODEL = TinyFile(name="tiny_esrgan", folder="upscalers", build=build, extras=(FILE,))
