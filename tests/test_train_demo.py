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
    torch = train_demo_model.torch
    assert train_demo_model.main(small + ["--vae-steps", "2", "--unet-steps", "2", "--decoder-steps", "1",
                                          "--only", "train"]) == 0
    ck = torch.load(work / "checkpoint.pt", weights_only=False)
    assert ck["state"]["vae_step"] == 2 and ck["state"]["unet_step"] == 2 and ck["ema"]
    assert torch.load(work / "decoder.pt", weights_only=False)["step"] == 1
    # resumed, not restarted: one more step of each
    assert train_demo_model.main(small + ["--vae-steps", "2", "--unet-steps", "3", "--decoder-steps", "2",
                                          "--export", str(out), "--eval", "1", "--eval-vae", "1"]) == 0
    log = (work / "train.log").read_text()
    assert "resumed from" in log and "'unet_step': 2" in log and "decoder from" in log
    printed = capsys.readouterr().out.strip().splitlines()
    scores, vae_scores = json.loads(printed[-1]), json.loads(printed[-2])["vae"]
    assert set(scores) == {"bg", "fg", "shape", "all"} == set(vae_scores)
    meta = json.loads((out / "multigen.json").read_text())
    assert meta["native_size"] == 128 and meta["trained"]["unet_step"] == 3 and meta["trained"]["decoder_step"] == 2
    # the decoder phase leaves the encoder (so the UNet's latents) alone; the export has the tuned decoder
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(out / "vae")
    trained = torch.load(work / "checkpoint.pt", weights_only=False)["vae"]
    decoder = torch.load(work / "decoder.pt", weights_only=False)["decoder"]
    for name, value in vae.encoder.state_dict().items():
        assert torch.equal(value, trained["encoder." + name]), name
    assert all(torch.equal(value, decoder[name]) for name, value in vae.decoder.state_dict().items())
    assert not all(torch.equal(value, trained["decoder." + name]) for name, value in vae.decoder.state_dict().items())

    from multigen.pipes import Prompt2ImPipe

    pipe = Prompt2ImPipe(str(out), device="cpu")
    pipe.setup(steps=2)
    image = pipe.gen({"prompt": "a red circle on a blue background", "seed": 1})[0]
    assert image.size == (128, 128)  # the native size, from the exported configs
