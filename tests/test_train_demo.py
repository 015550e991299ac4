"""scripts/train_demo_model.py end to end on a few steps: train, resume, export a loadable pipeline, grade."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import train_demo_model  # noqa: E402

pytestmark = pytest.mark.slow


def test_train_resume_export_and_grade(tmp_path, capsys):
    work, out = tmp_path / "work", tmp_path / "model"
    small = ["--work", str(work), "--batch", "2", "--vae-batch", "2", "--pool", "4", "--threads", "2"]
    assert train_demo_model.main(small + ["--vae-steps", "2", "--unet-steps", "2", "--only", "train"]) == 0
    ck = train_demo_model.torch.load(work / "checkpoint.pt", weights_only=False)
    assert ck["state"]["vae_step"] == 2 and ck["state"]["unet_step"] == 2 and ck["ema"]
    # resumed, not restarted: one more step
    assert train_demo_model.main(small + ["--vae-steps", "2", "--unet-steps", "3", "--export", str(out),
                                          "--eval", "1"]) == 0
    log = (work / "train.log").read_text()
    assert "resumed from" in log and "'unet_step': 2" in log
    scores = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(scores) == {"bg", "fg", "shape", "all"}
    meta = json.loads((out / "multigen.json").read_text())
    assert meta["native_size"] == 128 and meta["trained"]["unet_step"] == 3

    from multigen.pipes import Prompt2ImPipe

    pipe = Prompt2ImPipe(str(out), device="cpu")
    pipe.setup(steps=2)
    image = pipe.gen({"prompt": "a red circle on a blue background", "seed": 1})[0]
    assert image.size == (128, 128)  # the native size, from the exported configs
