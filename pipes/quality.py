"""Quality switches that act on a UNet's noise prediction: FreeU, sharpness and guidance rescale.

Each applies for the length of one diffusers call (:func:`applied`) and leaves the shared UNet exactly as
it found it: the model cache shares one UNet between every pipe class and job of a model, so a job
without a switch runs exactly as if no job had ever used one.

- **FreeU** (``freeu``, ``freeu_b1``, ``freeu_b2``, ``freeu_s1``, ``freeu_s2``): diffusers'
  ``UNet2DConditionModel.enable_freeu`` (Si et al., "FreeU: Free Lunch in Diffusion U-Net"): the decoder's
  backbone features are scaled by b1/b2 and the low frequencies of its skip features by s1/s2; factors
  left out take the family's recommended ones (``Family.quality_params``). ``disable_freeu`` after the call.
- **Sharpness** (``sharpness``, 0-30): Fooocus' (modules/patch.py): the prompt's (conditional) noise
  prediction ``eps`` is mixed with an edge-preserving blur of itself, ``eps' = (1 - a) eps + a blur(eps)``
  with ``a = 0.001 x sharpness x progress`` and ``progress = 1 - t / 999`` (0 at pure noise, 1 at the
  end); the blur is a 13x13 joint bilateral filter (space and colour sigma 3, L1 colour distance) whose
  weights come from the normalised predicted clean latents ``x0`` (Fooocus' adaptive anisotropic filter).
  Less high-frequency detail predicted as noise leaves more of it in the image. Written from the
  description, not Fooocus' code; differences: Fooocus filters ``x - x0`` in k-diffusion's sigma space,
  which is ``sigma x eps``: the filter is linear in what it filters, so the result is the same; here it
  runs in a forward hook on the UNet, so any diffusers scheduler works, and the negative prediction and
  the classifier-free guidance formula are diffusers' own (Fooocus adds its "adaptive CFG" on top, not here).
- **Guidance rescale** (``guidance_rescale``, 0-1): "Common Diffusion Noise Schedules and Sample Steps
  are Flawed" (Lin et al., section 3.4), as diffusers' ``rescale_noise_cfg``: passed to the diffusers call
  where its ``__call__`` takes it (SD and SDXL text to image, SDXL image to image and inpaint); elsewhere
  (SD image to image and inpaint, the ControlNet pipelines) the same formula is applied in the hook: the
  conditional half of the UNet's output is replaced so that the pipeline's own guidance step
  ``uncond + g (cond - uncond)`` yields the rescaled prediction.
"""
from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass
from typing import Any, Iterator, Mapping

import torch
import torch.nn.functional as F

#: Fooocus' filter: kernel side, spatial and colour (guide distance) sigmas
FILTER_SIZE = 13
FILTER_SIGMA_SPACE = 3.0
FILTER_SIGMA_COLOR = 3.0
#: Fooocus' mixing factor per unit of sharpness at the last step
SHARPNESS_UNIT = 0.001
FREEU_FACTORS = ("freeu_b1", "freeu_b2", "freeu_s1", "freeu_s2")


@dataclass(frozen=True)
class QualitySettings:
    """What the quality switches of one job ask for.

    Attributes:
        freeu: ``(b1, b2, s1, s2)`` with FreeU on, else None.
        sharpness: Fooocus' sharpness (0: off).
        guidance_rescale: diffusers' guidance rescale (0: off).
    """

    freeu: tuple[float, float, float, float] | None = None
    sharpness: float = 0.0
    guidance_rescale: float = 0.0

    @classmethod
    def of(cls, params: Mapping[str, Any], recommended: Mapping[str, Any]) -> QualitySettings:
        """The settings of a pipe's setup ``params``; FreeU factors left out take ``recommended`` ones (the
        family's ``quality_params``)."""
        freeu = None
        if params.get("freeu"):
            freeu = tuple(float(params[k] if params.get(k) is not None else recommended[k]) for k in FREEU_FACTORS)
        return cls(freeu=freeu, sharpness=float(params.get("sharpness") or 0.0),
                   guidance_rescale=float(params.get("guidance_rescale") or 0.0))

    @property
    def active(self) -> bool:
        return self.freeu is not None or self.sharpness > 0 or self.guidance_rescale > 0


def takes_argument(pipeline: Any, name: str) -> bool:
    """Whether the diffusers pipeline's ``__call__`` has an argument ``name``."""
    return name in inspect.signature(type(pipeline).__call__).parameters


@contextlib.contextmanager
def applied(pipeline: Any, settings: QualitySettings, kwargs: dict[str, Any], *, freeu: bool = True
            ) -> Iterator[dict[str, Any]]:
    """The switches on ``pipeline``'s UNet for one call; yields the call's kwargs (``guidance_rescale`` added
    where the pipeline takes it). Everything is undone on exit, also when the call raises.

    Args:
        pipeline: a diffusers SD/SDXL pipeline (its ``unet``, ``scheduler``, guidance properties).
        settings: what to apply.
        kwargs: the diffusers call's arguments.
        freeu: False leaves FreeU off (a refiner: the factors are the base model's).
    """
    call = dict(kwargs)
    if not settings.active:
        yield call
        return
    unet = pipeline.unet
    rescale_in_hook = 0.0
    if settings.guidance_rescale > 0:
        if takes_argument(pipeline, "guidance_rescale"):
            call["guidance_rescale"] = settings.guidance_rescale
        else:
            rescale_in_hook = settings.guidance_rescale
    handle = None
    use_freeu = freeu and settings.freeu is not None
    try:
        if use_freeu:
            b1, b2, s1, s2 = settings.freeu
            unet.enable_freeu(s1=s1, s2=s2, b1=b1, b2=b2)
        if settings.sharpness > 0 or rescale_in_hook > 0:
            hook = NoisePredictionHook(pipeline, settings.sharpness, rescale_in_hook)
            handle = unet.register_forward_hook(hook, with_kwargs=True)
        yield call
    finally:
        if handle is not None:
            handle.remove()
        if use_freeu:
            unet.disable_freeu()


class NoisePredictionHook:
    """A forward hook of the UNet that changes its prediction: sharpness and guidance rescale.

    The UNet's batch is ``[uncond, cond]`` halves while the pipeline runs classifier-free guidance
    (its ``do_classifier_free_guidance``), else ``cond`` alone; only the ``cond`` part is changed.
    """

    def __init__(self, pipeline: Any, sharpness: float, guidance_rescale: float) -> None:
        self.pipeline = pipeline
        self.sharpness = sharpness
        self.guidance_rescale = guidance_rescale

    def __call__(self, module: Any, args: tuple, kwargs: dict[str, Any], output: Any) -> Any:
        sample = args[0] if args else kwargs["sample"]
        timestep = args[1] if len(args) > 1 else kwargs["timestep"]
        pred = output[0] if isinstance(output, tuple) else output.sample
        changed = self.adjust(sample[:, :pred.shape[1]], timestep, pred)
        if isinstance(output, tuple):
            return (changed, *output[1:])
        return type(output)(sample=changed)

    def adjust(self, sample: torch.Tensor, timestep: Any, pred: torch.Tensor) -> torch.Tensor:
        """``pred`` with the cond half sharpened and/or rescaled (float32 inside, ``pred``'s dtype out)."""
        cfg = bool(getattr(self.pipeline, "do_classifier_free_guidance", False)) and pred.shape[0] % 2 == 0
        x, out = sample.float(), pred.float()
        if cfg:
            uncond, cond = out.chunk(2)
            x = x.chunk(2)[1]
        else:
            uncond, cond = None, out
        t = float(torch.as_tensor(timestep).flatten()[0])
        if self.sharpness > 0:
            cond = self.sharpened(cond, x, t)
        if self.guidance_rescale > 0 and uncond is not None:
            cond = guidance_rescaled_cond(uncond, cond, float(self.pipeline.guidance_scale), self.guidance_rescale)
        out = torch.cat([uncond, cond]) if uncond is not None else cond
        return out.to(pred.dtype)

    def sharpened(self, cond: torch.Tensor, x: torch.Tensor, t: float) -> torch.Tensor:
        scheduler = self.pipeline.scheduler
        alphas = scheduler.alphas_cumprod
        last = len(alphas) - 1
        alpha_bar = float(alphas[min(max(int(round(t)), 0), last)])
        a, s = alpha_bar ** 0.5, (1.0 - alpha_bar) ** 0.5
        kind = getattr(scheduler.config, "prediction_type", "epsilon")
        eps, x0 = to_eps_x0(cond, x, a, s, kind)
        mix = SHARPNESS_UNIT * self.sharpness * min(max(1.0 - t / last, 0.0), 1.0)
        eps = (1.0 - mix) * eps + mix * adaptive_anisotropic_filter(eps, x0)
        return from_eps(eps, x, a, s, kind)


def to_eps_x0(pred: torch.Tensor, x: torch.Tensor, a: float, s: float, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The noise and the clean latents a prediction of ``kind`` stands for, at ``x = a x0 + s eps``."""
    if kind == "v_prediction":
        return s * x + a * pred, a * x - s * pred
    if kind == "sample":
        return (x - a * pred) / s, pred
    return pred, (x - s * pred) / a


def from_eps(eps: torch.Tensor, x: torch.Tensor, a: float, s: float, kind: str) -> torch.Tensor:
    """The prediction of ``kind`` that stands for the noise ``eps`` at ``x``."""
    if kind == "epsilon":
        return eps
    x0 = (x - s * eps) / a
    return a * eps - s * x0 if kind == "v_prediction" else x0


def guidance_rescaled_cond(uncond: torch.Tensor, cond: torch.Tensor, scale: float, rescale: float) -> torch.Tensor:
    """The cond prediction that makes the pipeline's ``uncond + scale (cond - uncond)`` equal diffusers'
    ``rescale_noise_cfg`` of it (std over every axis but the batch). Guidance runs with ``scale`` > 1 only."""
    guided = uncond + scale * (cond - uncond)
    dims = list(range(1, cond.ndim))
    rescaled = guided * (cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
    final = rescale * rescaled + (1.0 - rescale) * guided
    return uncond + (final - uncond) / scale


def adaptive_anisotropic_filter(x: torch.Tensor, guide: torch.Tensor) -> torch.Tensor:
    """``x`` blurred by a joint bilateral filter whose colour weights come from ``guide`` normalised per image
    (mean 0, std 1): neighbours across an edge of the guide count little, so edges are kept."""
    std, mean = torch.std_mean(guide, dim=(1, 2, 3), keepdim=True)
    return joint_bilateral_blur(x, (guide - mean) / (std + 1e-5))


def joint_bilateral_blur(x: torch.Tensor, guide: torch.Tensor, size: int = FILTER_SIZE,
                         sigma_space: float = FILTER_SIGMA_SPACE, sigma_color: float = FILTER_SIGMA_COLOR
                         ) -> torch.Tensor:
    """Each pixel of ``x`` [b, c, h, w]: the mean of its ``size`` x ``size`` neighbourhood weighted by a
    Gaussian of the distance and a Gaussian of the L1 distance of ``guide`` [b, cg, h, w] to the centre's."""
    b, c, h, w = x.shape
    pad = size // 2
    mode = "reflect" if min(h, w) > pad else "replicate"
    xs = F.unfold(F.pad(x, (pad,) * 4, mode=mode), size).view(b, c, size * size, h, w)
    gs = F.unfold(F.pad(guide, (pad,) * 4, mode=mode), size).view(b, guide.shape[1], size * size, h, w)
    distance = (gs - guide.unsqueeze(2)).abs().sum(dim=1, keepdim=True)
    offsets = torch.arange(size, device=x.device, dtype=x.dtype) - pad
    space = torch.exp(-(offsets[:, None] ** 2 + offsets[None, :] ** 2) / (2 * sigma_space ** 2)).flatten()
    weights = torch.exp(-0.5 * (distance / sigma_color) ** 2) * space.view(1, 1, -1, 1, 1)
    return (xs * weights).sum(dim=2) / weights.sum(dim=2)
