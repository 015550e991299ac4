#!/usr/bin/env python
"""Train the demo model: a small SD-style pipeline that draws coloured shapes from prompts.

Phases (each resumable from its checkpoint in ``--work``):
  1. ``vae``: an AutoencoderKL (factor 8) on rendered scenes.
  2. ``unet``: a UNet and a whole-word CLIP text encoder, jointly, on VAE latents
     (epsilon prediction, linear betas 1e-4..0.02, min-SNR-5 weighting, 10% empty captions).
  3. ``decoder``: the VAE decoder alone, longer, with the encoder frozen: the latent space (and so the
     UNet) stays valid while colours and edges sharpen. Kept in its own ``decoder.pt``, so it can run
     beside a UNet run (``--only decoder``).
Then ``export`` writes a standard diffusers StableDiffusionPipeline folder and ``eval`` grades it.

Examples:
  python scripts/train_demo_model.py --work work/demo --vae-steps 3000 --unet-steps 20000
  nice -n 19 python scripts/train_demo_model.py --work work/demo --unet-steps 40000   # resume, go on
  python scripts/train_demo_model.py --work work/demo --export pipes/demo/weights --eval 200
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from multigen.pipes.demo import COLOURS, SHAPES, caption, draw_scene, grade_image, random_scene

log = logging.getLogger("train_demo")
SIZE = 128
MAX_TOKENS = 16
PHRASE_WORDS = ("a", "on", "background", "in", "with")


def make_tokenizer():
    """A CLIP tokenizer whose vocabulary holds each caption word whole (plus the 256 byte symbols)."""
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    symbols = list(bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for s in symbols + [s + "</w>" for s in symbols]:
        vocab.setdefault(s, len(vocab))
    merges: list[tuple[str, str]] = []
    words = sorted(set(COLOURS) | set(SHAPES) | set(PHRASE_WORDS) | {","})
    for word in words:
        # BPE merges that build the word left to right: r e -> re, re d</w> -> red</w>
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            merges.append((parts[0], parts[1]))
            parts = [parts[0] + parts[1]] + parts[2:]
            vocab.setdefault(parts[0], len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    merges = list(dict.fromkeys(merges))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=MAX_TOKENS)


def make_models(vocab_size: int):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        block_out_channels=(16, 32, 64, 64), layers_per_block=1, norm_num_groups=8,
                        sample_size=SIZE)
    te = CLIPTextModel(CLIPTextConfig(vocab_size=vocab_size, hidden_size=128, intermediate_size=256,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      max_position_embeddings=MAX_TOKENS, projection_dim=128,
                                      bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1,
                                      pad_token_id=vocab_size - 1))
    unet = UNet2DConditionModel(sample_size=SIZE // 8, in_channels=4, out_channels=4,
                                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                                block_out_channels=(48, 96, 96), layers_per_block=1, cross_attention_dim=128,
                                attention_head_dim=8, norm_num_groups=16)
    return vae, te, unet


def pixels(scenes) -> torch.Tensor:
    """Drawn scenes as a batch in [-1, 1], channels first."""
    arr = np.stack([np.asarray(draw_scene(s, SIZE), dtype=np.float32) for s in scenes])
    return torch.from_numpy(arr).permute(0, 3, 1, 2) / 127.5 - 1.0


def batch_images(rng: random.Random, n: int, reword: float = 0.2, empty: float = 0.1):
    scenes = [random_scene(rng) for _ in range(n)]
    caps = ["" if rng.random() < empty else caption(s, rng, reword) for s in scenes]
    return pixels(scenes), caps


def lr_factor(step: int, steps: int, warmup: int = 0, floor: float = 0.0) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay from 1 down to ``floor``."""
    warm = min(1.0, (step + 1) / warmup) if warmup else 1.0
    return warm * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, step / steps))))


def optimise(opt, params, loss: torch.Tensor, lr: float) -> None:
    """One optimiser step: gradients clipped to norm 1, then the step at ``lr``."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    for g in opt.param_groups:
        g["lr"] = lr
    opt.step()


class Progress:
    """A phase's progress: a bar, a train.log line every 50 steps, ``save()`` every 250 and at the end."""

    def __init__(self, phase: str, steps: int, start: int, save):
        self.phase, self.steps, self.save = phase, steps, save
        self.bar = tqdm(total=steps, initial=start, desc=phase, unit="step")
        self.t0 = time.time()

    def done(self, step: int, loss: torch.Tensor) -> None:
        """After step ``step`` (0-based) with this loss."""
        self.bar.update(1)
        if (step + 1) % 50 == 0:
            self.bar.set_postfix(loss=f"{loss.item():.4f}")
            log.info("%s step %d/%d loss %.4f (%.2f s/step)", self.phase, step + 1, self.steps, loss.item(),
                     (time.time() - self.t0) / 50)
            self.t0 = time.time()
        if (step + 1) % 250 == 0 or step + 1 == self.steps:
            self.save()

    def close(self) -> None:
        self.bar.close()


class Trainer:
    def __init__(self, work: Path, seed: int, batch: int, lr: float, vae_batch: int = 16, device: str = "cpu",
                 pool: int = 16384):
        self.work, self.seed, self.batch, self.lr, self.vae_batch = work, seed, batch, lr, vae_batch
        self.pool = pool
        self.device = torch.device(device)
        work.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(seed)
        self.tok = make_tokenizer()
        self.vae, self.te, self.unet = make_models(len(self.tok))
        self.state = {"vae_step": 0, "unet_step": 0, "scaling_factor": None}
        self._load()
        for m in (self.vae, self.te, self.unet):
            m.to(self.device)
        self.ema = {k: v.to(self.device) for k, v in self.ema.items()}

    # checkpoints -------------------------------------------------------------------------
    def _ckpt(self) -> Path:
        return self.work / "checkpoint.pt"

    def _load(self) -> None:
        if self._ckpt().exists():
            ck = torch.load(self._ckpt(), map_location="cpu", weights_only=False)
            self.vae.load_state_dict(ck["vae"])
            self.te.load_state_dict(ck["te"])
            self.unet.load_state_dict(ck["unet"])
            self.state = ck["state"]
            self.opt_state = ck.get("opt")
            self.ema = ck.get("ema") or {}
            log.info("resumed from %s: %s", self._ckpt(), self.state)
        else:
            self.opt_state = None
            self.ema = {}
        self.decoder_opt_state = None
        if self._decoder_ckpt().exists():
            d = torch.load(self._decoder_ckpt(), map_location="cpu", weights_only=False)
            self.vae.decoder.load_state_dict(d["decoder"])
            self.vae.post_quant_conv.load_state_dict(d["post_quant_conv"])
            self.state["decoder_step"] = d["step"]
            self.decoder_opt_state = d["opt"]
            log.info("decoder from %s: step %d", self._decoder_ckpt(), d["step"])

    def _decoder_ckpt(self) -> Path:
        return self.work / "decoder.pt"

    def save_decoder(self, opt) -> None:
        tmp = self._decoder_ckpt().with_suffix(".tmp")
        torch.save({"decoder": self.vae.decoder.state_dict(), "post_quant_conv": self.vae.post_quant_conv.state_dict(),
                    "step": self.state["decoder_step"], "opt": opt.state_dict()}, tmp)
        tmp.replace(self._decoder_ckpt())

    def save(self, opt=None) -> None:
        tmp = self._ckpt().with_suffix(".tmp")
        torch.save({"vae": self.vae.state_dict(), "te": self.te.state_dict(), "unet": self.unet.state_dict(),
                    "state": self.state, "opt": opt.state_dict() if opt else None, "ema": self.ema}, tmp)
        tmp.replace(self._ckpt())

    # phase 1 -----------------------------------------------------------------------------
    def train_vae(self, steps: int) -> None:
        if self.state["vae_step"] >= steps:
            return
        params = list(self.vae.parameters())
        opt = torch.optim.AdamW(params, lr=self.lr)
        if self.opt_state and self.state.get("phase") == "vae":
            opt.load_state_dict(self.opt_state)
        self.state["phase"] = "vae"
        self.vae.train()
        progress = Progress("vae", steps, self.state["vae_step"], lambda: self.save(opt))
        while self.state["vae_step"] < steps:
            step = self.state["vae_step"]
            rng = random.Random(self.seed * 1_000_003 + step)
            x, _ = batch_images(rng, self.vae_batch)
            x = x.to(self.device)
            post = self.vae.encode(x).latent_dist
            z = post.sample()
            rec = self.vae.decode(z).sample
            loss_rec = F.mse_loss(rec, x) + 0.5 * F.l1_loss(rec, x)
            kl = post.kl().mean() / (x.shape[1] * x.shape[2] * x.shape[3])
            loss = loss_rec + 1e-4 * kl
            optimise(opt, params, loss, self.lr * lr_factor(step, steps))
            self.state["vae_step"] = step + 1
            progress.done(step, loss_rec)
        progress.close()
        self.state["scaling_factor"] = None
        self.save()

    # phase 3 -----------------------------------------------------------------------------
    def train_decoder(self, steps: int) -> None:
        """Fine-tune the decoder on posterior samples of the frozen encoder (pixel MSE + L1).

        The scenes and their posteriors come from the UNet phase's latent pool: no encoder pass per step.
        """
        if self.state.get("decoder_step", 0) >= steps:
            return
        scenes, zmean, zstd = self.latent_pool(self.pool)
        params = list(self.vae.decoder.parameters()) + list(self.vae.post_quant_conv.parameters())
        opt = torch.optim.AdamW(params, lr=self.lr * 0.5)  # 1e-3 diverged here (a fine-tune of a trained VAE)
        if self.decoder_opt_state:
            opt.load_state_dict(self.decoder_opt_state)
        self.vae.eval()
        self.vae.decoder.train()
        self.state.setdefault("decoder_step", 0)
        progress = Progress("decoder", steps, self.state["decoder_step"], lambda: self.save_decoder(opt))
        while self.state["decoder_step"] < steps:
            step = self.state["decoder_step"]
            rng = random.Random(self.seed * 5_000_011 + step)
            idx = [rng.randrange(len(scenes)) for _ in range(self.vae_batch)]
            x = pixels([scenes[i] for i in idx]).to(self.device)
            gen = torch.Generator().manual_seed(self.seed * 17 + step)
            z = zmean[idx] + zstd[idx] * torch.randn(zmean[idx].shape, generator=gen).to(self.device)
            rec = self.vae.decode(z).sample
            loss = F.mse_loss(rec, x) + 0.5 * F.l1_loss(rec, x)
            optimise(opt, params, loss, self.lr * 0.5 * lr_factor(step, steps, warmup=50, floor=0.02))
            self.state["decoder_step"] = step + 1
            progress.done(step, loss)
        progress.close()
        self.vae.eval()

    @torch.no_grad()
    def scaling_factor(self) -> float:
        if self.state.get("scaling_factor") is None:
            self.vae.eval()
            x, _ = batch_images(random.Random(self.seed + 7), 64)
            z = self.vae.encode(x.to(self.device)).latent_dist.mean
            self.state["scaling_factor"] = float(1.0 / z.std())
            log.info("latent scaling factor %.4f", self.state["scaling_factor"])
        return self.state["scaling_factor"]

    # phase 2 -----------------------------------------------------------------------------
    @torch.no_grad()
    def latent_pool(self, n: int) -> tuple[list, torch.Tensor, torch.Tensor]:
        """Scenes with their VAE posteriors (mean, std), encoded once and cached in ``--work``.

        The VAE is frozen in phase 2, so encoding each batch again would only cost time (a third of a step).
        """
        path = self.work / f"latents-{n}.pt"
        if path.exists():
            d = torch.load(path, weights_only=False)
            if d["vae_step"] == self.state["vae_step"]:
                return d["scenes"], d["mean"].to(self.device), d["std"].to(self.device)
        rng = random.Random(self.seed * 31 + 5)
        scenes = [random_scene(rng) for _ in range(n)]
        means, stds = [], []
        self.vae.eval()
        for i in tqdm(range(0, n, 64), desc="encoding scenes", unit="batch"):
            dist = self.vae.encode(pixels(scenes[i:i + 64]).to(self.device)).latent_dist
            means.append(dist.mean)
            stds.append(dist.std)
        mean, std = torch.cat(means), torch.cat(stds)
        torch.save({"vae_step": self.state["vae_step"], "scenes": scenes, "mean": mean.cpu(), "std": std.cpu()}, path)
        return scenes, mean, std

    def encode_text(self, caps: list[str]) -> torch.Tensor:
        ids = self.tok(caps, padding="max_length", max_length=MAX_TOKENS, truncation=True,
                       return_tensors="pt").input_ids
        return self.te(ids.to(self.device))[0]

    def train_unet(self, steps: int, ema_decay: float = 0.999) -> None:
        if self.state["unet_step"] >= steps:
            return
        from diffusers import DDPMScheduler

        sf = self.scaling_factor()
        scenes, zmean, zstd = self.latent_pool(self.pool)
        sched = DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear")
        alphas = sched.alphas_cumprod
        snr = alphas / (1 - alphas)
        params = list(self.unet.parameters()) + list(self.te.parameters())
        opt = torch.optim.AdamW(params, lr=self.lr, weight_decay=1e-2)
        if self.opt_state and self.state.get("phase") == "unet":
            opt.load_state_dict(self.opt_state)
        self.state["phase"] = "unet"
        self.vae.eval()
        self.unet.train()
        self.te.train()
        progress = Progress("unet", steps, self.state["unet_step"], lambda: self.save(opt))
        while self.state["unet_step"] < steps:
            step = self.state["unet_step"]
            rng = random.Random(self.seed * 7_000_003 + step)
            idx = [rng.randrange(len(scenes)) for _ in range(self.batch)]
            caps = ["" if rng.random() < 0.1 else caption(scenes[i], rng, 0.2) for i in idx]
            gen = torch.Generator().manual_seed(self.seed * 13 + step)
            dev = self.device
            z = (zmean[idx] + zstd[idx] * torch.randn(zmean[idx].shape, generator=gen).to(dev)) * sf
            noise = torch.randn(z.shape, generator=gen).to(dev)
            t = torch.randint(0, 1000, (z.shape[0],), generator=gen)
            zt = sched.add_noise(z, noise, t.to(dev))
            pred = self.unet(zt, t.to(dev), encoder_hidden_states=self.encode_text(caps)).sample
            w = (torch.clamp(snr[t], max=5.0) / snr[t]).to(dev)  # min-SNR-5 for epsilon prediction
            loss = (w * ((pred - noise) ** 2).mean(dim=(1, 2, 3))).mean()
            optimise(opt, params, loss, self.lr * lr_factor(step, steps, warmup=200, floor=0.05))
            self.ema_update(ema_decay)
            self.state["unet_step"] = step + 1
            progress.done(step, loss)
        progress.close()

    def ema_update(self, decay: float) -> None:
        """Exponential moving average of the UNet and text-encoder weights; the export uses it."""
        with torch.no_grad():
            for name, p in self.live_params():
                e = self.ema.get(name)
                if e is None:
                    self.ema[name] = p.detach().clone()
                else:
                    e.lerp_(p.detach(), 1.0 - decay)

    def live_params(self):
        yield from (("unet." + k, p) for k, p in self.unet.named_parameters())
        yield from (("te." + k, p) for k, p in self.te.named_parameters())

    def use_ema(self) -> None:
        with torch.no_grad():
            for name, p in self.live_params():
                if name in self.ema:
                    p.copy_(self.ema[name])

    # export / eval -----------------------------------------------------------------------
    def pipeline(self):
        from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

        self.vae.config.scaling_factor = self.scaling_factor()
        self.vae.register_to_config(scaling_factor=self.scaling_factor())
        sched = EulerDiscreteScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02,
                                       beta_schedule="linear", timestep_spacing="trailing", steps_offset=1)
        pipe = StableDiffusionPipeline(vae=self.vae.eval(), text_encoder=self.te.eval(), tokenizer=self.tok,
                                       unet=self.unet.eval(), scheduler=sched, safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def export(self, folder: Path, steps: int = 20, guidance: float = 6.0) -> None:
        pipe = self.pipeline()
        pipe.save_pretrained(folder, safe_serialization=True)
        meta = {"native_size": SIZE, "steps": steps, "guidance_scale": guidance, "scheduler": "EulerDiscreteScheduler",
                "timestep_spacing": "trailing", "trained": {k: v for k, v in self.state.items() if k != "phase"}}
        (folder / "multigen.json").write_text(json.dumps(meta, indent=2) + "\n")
        log.info("exported to %s", folder)


def grade_many(n: int, seed: int, make_image) -> dict[str, float]:
    """The grader's hit rates on ``make_image(scene, i)`` for ``n`` fresh scenes drawn from ``seed``."""
    rng = random.Random(seed)
    hits = {"bg": 0, "fg": 0, "shape": 0, "all": 0}
    for i in range(n):
        s = random_scene(rng)
        m = grade_image(make_image(s, i)).matches(s.fg, s.bg, s.shape)
        for k in hits:
            hits[k] += m[k]
    return {k: v / n for k, v in hits.items()}


@torch.no_grad()
def evaluate(pipe, n: int, seed: int = 99, steps: int = 20, guidance: float = 6.0) -> dict[str, float]:
    return grade_many(n, seed, lambda s, i: pipe(
        caption(s), num_inference_steps=steps, guidance_scale=guidance, width=SIZE, height=SIZE,
        generator=torch.Generator().manual_seed(seed + i)).images[0])


@torch.no_grad()
def evaluate_vae(vae, n: int, seed: int = 99) -> dict[str, float]:
    """Grade the VAE alone: encode and decode ``n`` drawn scenes (a ceiling for the whole model)."""
    from PIL import Image

    device = next(vae.parameters()).device

    def round_trip(scene, _):
        y = vae.decode(vae.encode(pixels([scene]).to(device)).latent_dist.mean).sample[0]
        return Image.fromarray(((y.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy())

    return grade_many(n, seed, round_trip)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="work/demo", help="checkpoint folder (resumes from it)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=48)
    p.add_argument("--vae-batch", type=int, default=16, help="the VAE works at full resolution: smaller batches")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--vae-steps", type=int, default=3000)
    p.add_argument("--unet-steps", type=int, default=20000)
    p.add_argument("--decoder-steps", type=int, default=4000,
                   help="fine-tune the VAE decoder alone (encoder frozen) after the UNet")
    p.add_argument("--pool", type=int, default=16384, help="scenes encoded once for the UNet phase")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="torch device to train on (default: cuda when there is one)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    p.add_argument("--export", help="write the diffusers pipeline folder here")
    p.add_argument("--eval", type=int, default=0, help="grade N generated prompts")
    p.add_argument("--eval-vae", type=int, default=0, help="grade N encoded-and-decoded scenes (the VAE alone)")
    p.add_argument("--weights", choices=["ema", "live"], default="ema",
                   help="export/grade the moving average of the weights (default) or the last step's")
    p.add_argument("--guidance", type=float, default=6.0, help="guidance scale for --eval and the export")
    p.add_argument("--eval-steps", type=int, default=20, help="sampling steps for --eval and the export")
    p.add_argument("--only", choices=["train", "decoder", "export"],
                   help="train only (no export/eval), only the decoder phase, or only export/eval")
    args = p.parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    for h in list(log.handlers):  # main() may run twice in one process (tests)
        log.removeHandler(h)
        h.close()
    fmt = logging.Formatter("%(asctime)s %(message)s")
    for h in (logging.StreamHandler(), logging.FileHandler(work / "train.log")):
        h.setFormatter(fmt)
        log.addHandler(h)
    log.setLevel(logging.INFO)
    log.propagate = False
    if args.threads:
        torch.set_num_threads(args.threads)
    tr = Trainer(work, args.seed, args.batch, args.lr, args.vae_batch, args.device, args.pool)
    if args.only in (None, "train"):
        tr.train_vae(args.vae_steps)
        tr.train_unet(args.unet_steps)
    if args.only in (None, "train", "decoder"):
        tr.train_decoder(args.decoder_steps)
    if args.only in (None, "export"):
        if args.weights == "ema" and tr.ema:
            tr.use_ema()
        if args.export:
            tr.export(Path(args.export), steps=args.eval_steps, guidance=args.guidance)
        if args.eval_vae:
            scores = evaluate_vae(tr.vae.eval(), args.eval_vae)
            log.info("VAE alone on %d scenes: %s", args.eval_vae, scores)
            print(json.dumps({"vae": scores}))
        if args.eval:
            scores = evaluate(tr.pipeline(), args.eval, steps=args.eval_steps, guidance=args.guidance)
            log.info("eval on %d prompts: %s", args.eval, scores)
            print(json.dumps(scores))
    return 0


if __name__ == "__main__":
    sys.exit(main())
