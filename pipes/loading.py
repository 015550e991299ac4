"""Loading base pipelines: model type detection, precision choice, single-file checkpoints.

``load_base`` returns one diffusers text-to-image pipeline per model; the pipe classes derive
their own pipelines from it with ``from_pipe`` so weights are shared.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

from . import memory
from .errors import InvalidValueError, ModelTypeMismatchError, PipeError
from .families import (Family, ModelType, Role, family, family_of_checkpoint, family_of_folder,
                       family_of_pipeline)

logger = logging.getLogger(__name__)

#: dtype names accepted by ``dtype=`` arguments and the ``MULTIGEN_DTYPE`` variable
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")


def cpu_has_native_bf16() -> bool:
    """True when the CPU computes bf16 natively (AVX512-BF16 or AMX), as oneDNN reports it."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # pragma: no cover - older or unusual builds
        pass
    try:  # pragma: no cover - fallback on Linux
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def parse_dtype(value: "str | torch.dtype", param: str = "dtype") -> torch.dtype:
    """A ``torch.dtype`` from a name such as ``"bf16"`` or ``"float32"`` (or a dtype).

    Raises:
        InvalidValueError: the name is not one of ``DTYPES``.
    """
    if isinstance(value, torch.dtype):
        if value not in DTYPES.values():
            raise InvalidValueError(f"{param} {value} is not supported; allowed: float32, bfloat16, float16",
                                    param, "float32, bfloat16, float16")
        return value
    key = str(value).lower().replace("torch.", "")
    if key not in DTYPES:
        raise InvalidValueError(f"{param} {value!r} is not supported; allowed: {', '.join(DTYPES)}",
                                param, ", ".join(DTYPES))
    return DTYPES[key]


def default_dtype(device: "str | torch.device" = "cpu", dtype: "str | torch.dtype | None" = None) -> torch.dtype:
    """The precision to run on ``device``.

    Order: the ``dtype`` argument, the ``MULTIGEN_DTYPE`` environment variable, then per
    device: fp16 on CUDA, bf16 on CPUs with native bf16, fp32 otherwise.
    """
    if dtype is not None:
        return parse_dtype(dtype)
    env = os.environ.get("MULTIGEN_DTYPE")
    if env:
        return parse_dtype(env, "MULTIGEN_DTYPE")
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.float16
    if dev.type == "cpu" and cpu_has_native_bf16():
        return torch.bfloat16
    return torch.float32


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``."""
    return str(dtype).replace("torch.", "")


def detect_folder_type(folder: Path) -> ModelType:
    """Model type of a diffusers folder (see ``families.family_of_folder``)."""
    return family_of_folder(folder).model_type


def detect_checkpoint_type(path: Path) -> ModelType:
    """Model type of a single-file checkpoint, from its tensor names (see ``families.family_of_checkpoint``)."""
    return family_of_checkpoint(path).model_type


def pipeline_type(pipe: Any) -> ModelType:
    """Model type of a loaded diffusers pipeline (from its components, not its class name)."""
    return family_of_pipeline(pipe).model_type


def check_declared_type(found: ModelType, declared: "ModelType | str | None", where: str) -> ModelType:
    """Return ``found``; raise ``ModelTypeMismatchError`` if ``declared`` disagrees."""
    want = ModelType.parse(declared)
    if want is not None and want != found:
        raise ModelTypeMismatchError(f"model_type {want.value} was declared for {where}, but its weights are "
                                     f"{found.value}; allowed: {found.value} (or leave model_type out)",
                                     "model_type", found.value)
    return found


def _check_no_meta(pipe: Any, path: Path) -> None:
    missing = []
    for name in ("unet", "transformer", "vae", "text_encoder", "text_encoder_2"):
        module = getattr(pipe, name, None)
        if module is None:
            continue
        missing += [f"{name}.{n}" for n, p in module.named_parameters() if p.device.type == "meta"]
    if missing:
        shown = ", ".join(missing[:8]) + (" …" if len(missing) > 8 else "")
        raise PipeError(f"checkpoint {path} lacks {len(missing)} weights: {shown}", "model_id")


def check_config_dir(config_dir: "str | os.PathLike[str] | None", fam: Family, path: Path) -> Path:
    """The config folder of a single-file checkpoint: a local diffusers folder of the checkpoint's family.

    Raises:
        PipeError: ``config_dir`` is missing, not a diffusers folder, or one of another family.
    """
    allowed = f"a local diffusers folder of a {fam.name} model"
    if config_dir is None or not Path(config_dir).expanduser().is_dir():
        raise PipeError(f"config_dir is needed to load the single-file checkpoint {path} offline: a local "
                        f"diffusers folder with the JSON configs and tokenizers (got {config_dir!r})",
                        "config_dir", allowed)
    folder = Path(config_dir).expanduser()
    try:
        other = family_of_folder(folder)
    except PipeError as exc:
        raise InvalidValueError(f"config_dir {str(folder)!r} is not a diffusers folder of a {fam.name} model "
                                f"({exc}); allowed: {allowed}", "config_dir", allowed) from exc
    if other is not fam:
        raise InvalidValueError(f"config_dir {str(folder)!r} holds a {other.name} model's configs, but {path} is a "
                                f"{fam.name} checkpoint; allowed: {allowed}", "config_dir", allowed)
    return folder


def check_denoiser_tensors(weights: dict[str, Any], denoiser_class: type, folder: Path, subfolder: str,
                           path: Path) -> None:
    """Refuse converted weights whose tensor names differ from the config folder's denoiser (a schnell
    file with a dev config): ``from_single_file`` would otherwise run diffusers' own conversion on them.

    Raises:
        PipeError: naming the tensors that are missing or left over.
    """
    config = denoiser_class.load_config(str(folder), subfolder=subfolder, local_files_only=True)
    with torch.device("meta"):  # the names only: no memory for weights
        expected = set(denoiser_class.from_config(config).state_dict())
    missing, extra = sorted(expected - set(weights)), sorted(set(weights) - expected)
    if missing or extra:
        shown = ", ".join((missing or extra)[:6]) + (" ..." if len(missing or extra) > 6 else "")
        raise PipeError(f"the checkpoint {path} does not fit the {subfolder} config of config_dir {str(folder)!r}: "
                        f"{len(missing)} tensors missing, {len(extra)} left over ({shown}); allowed: the config "
                        "folder of the same model (dev and schnell differ)", "config_dir")


def load_single_file(path: Path, fam: Family, config_dir: "str | os.PathLike[str] | None",
                     torch_dtype: torch.dtype) -> Any:
    """The text-to-image pipeline of a single-file checkpoint and its config folder.

    SD and SDXL files hold the whole pipeline (LDM layout): it loads with the pipeline class's
    ``from_single_file``. Families with a ``single_file_class`` (Flux.1) are shared as the denoiser
    alone: it loads with that class's ``from_single_file`` (through the family's
    ``single_file_layout`` when diffusers cannot convert the file itself), and everything else (text
    encoders, VAE, tokenizers, scheduler) comes from the config folder, which then holds their weights.

    Raises:
        PipeError: ``config_dir`` is missing, of another family or incomplete; the file lacks weights.
    """
    folder = check_config_dir(config_dir, fam, path)
    pipeline_class = fam.pipeline_class(Role.TEXT2IMAGE)
    if fam.single_file_class is None:
        pipe = pipeline_class.from_single_file(str(path), config=str(folder), dtype=torch_dtype,
                                               local_files_only=True)
        _check_no_meta(pipe, path)
        return pipe
    import diffusers
    from diffusers.loaders.single_file_utils import load_single_file_checkpoint

    denoiser_class = getattr(diffusers, fam.single_file_class)
    weights: Any = str(path)
    if fam.single_file_layout is not None:
        weights = fam.single_file_layout(load_single_file_checkpoint(str(path), local_files_only=True))
        check_denoiser_tensors(weights, denoiser_class, folder, fam.denoiser, path)
    try:
        denoiser = denoiser_class.from_single_file(
            weights, config=str(folder), subfolder=fam.denoiser, torch_dtype=torch_dtype, local_files_only=True)
        pipe = pipeline_class.from_pretrained(str(folder), dtype=torch_dtype, local_files_only=True,
                                              **{fam.denoiser: denoiser}, **fam.folder_load_kwargs)
    except PipeError:
        raise
    except (OSError, KeyError, ValueError, RuntimeError) as exc:  # configs that do not fit, weights missing
        raise PipeError(f"the {fam.name} checkpoint {path} does not load with config_dir {str(folder)!r}: "
                        f"{type(exc).__name__}: {exc}; allowed: the {fam.denoiser} config of the same model, and "
                        f"the weights of every other component, in config_dir", "config_dir") from exc
    _check_no_meta(pipe, path)
    return pipe


def load_base(path: "str | os.PathLike[str]", model_type: "ModelType | str | None" = None,
              config_dir: "str | os.PathLike[str] | None" = None, device: "str | torch.device" = "cpu",
              dtype: "str | torch.dtype | None" = None, quantize: str | None = None,
              offload: str | None = None) -> tuple[Any, ModelType]:
    """Load a base text-to-image pipeline from a diffusers folder or a single-file checkpoint.

    Args:
        path: a diffusers folder, or a ``.safetensors``/``.ckpt`` file (SD/SDXL in LDM layout, a Flux.1
            transformer in BFL's layout).
        model_type: the declared type; when given and the weights disagree, an error says so.
        config_dir: for single files, a local diffusers folder of the same family with the JSON
            configs and tokenizers (SD/SDXL: no weights needed; Flux: the weights of everything but
            the transformer); nothing is fetched from a hub.
        device: where to put the weights.
        dtype: precision (see ``default_dtype``).
        quantize: ``none``, ``int8`` or ``fp8`` weight-only quantization (``memory.quantize_pipeline``).
        offload: ``none``, ``model`` or ``sequential`` CPU offload to a GPU ``device`` (``memory``).

    Returns:
        ``(pipeline, model_type)``: the family's text-to-image pipeline (``StableDiffusionPipeline``,
        ``StableDiffusionXLPipeline``, ``FluxPipeline``).

    Raises:
        ModelTypeMismatchError: ``model_type`` disagrees with the weights.
        PipeError: the path is missing, not a model, or the checkpoint lacks weights.
    """
    p = Path(path).expanduser()
    torch_dtype = default_dtype(device, dtype)
    quantize, offload = memory.check_memory_options(quantize, offload, device, p.name)  # before the slow load
    if not p.exists():
        raise PipeError(f"model_id {str(p)!r} does not exist", "model_id")
    if p.is_dir():
        found = check_declared_type(detect_folder_type(p), model_type, str(p))
        fam = family(found)
        pipe = fam.pipeline_class(Role.TEXT2IMAGE).from_pretrained(
            str(p), dtype=torch_dtype, local_files_only=True, **fam.folder_load_kwargs)
    else:
        if p.suffix.lower() not in SINGLE_FILE_SUFFIXES:
            raise PipeError(f"model_id {str(p)!r} is neither a diffusers folder nor a checkpoint file; "
                            f"allowed suffixes: {', '.join(SINGLE_FILE_SUFFIXES)}", "model_id",
                            ", ".join(SINGLE_FILE_SUFFIXES))
        found = check_declared_type(detect_checkpoint_type(p), model_type, str(p))
        pipe = load_single_file(p, family(found), config_dir, torch_dtype)
    quantized = memory.quantize_pipeline(pipe, quantize, family(found).denoiser)  # on the CPU, before moving
    prepare_pipeline(pipe, memory.load_device(device, offload))
    memory.apply_memory_options(pipe, quantize, offload, device, quantized)
    logger.info("loaded %s model %s (%s on %s, quantize %s, offload %s)", found.value, p, dtype_name(torch_dtype),
                torch.device(device), quantize, offload)
    return pipe, found


def prepare_pipeline(pipe: Any, device: "str | torch.device") -> None:
    """Move ``pipe`` to ``device``, use PyTorch SDPA attention, hide the progress bars.

    A Flux transformer keeps its own attention processors (already SDPA); its VAE is an
    ``AutoencoderKL`` like SD's and gets the same processor.
    """
    from diffusers.models.attention_processor import AttnProcessor2_0

    pipe.to(torch.device(device))
    for name in ("unet", "vae"):
        module = getattr(pipe, name, None)
        if module is not None and hasattr(module, "set_attn_processor"):
            module.set_attn_processor(AttnProcessor2_0())
    vae_channels_last(pipe, device)
    pipe.set_progress_bar_config(disable=True)


def vae_channels_last(pipe: Any, device: "str | torch.device") -> None:
    """On the CPU, keep an ``AutoencoderKL``'s weights in channels_last (NHWC) memory: oneDNN's NHWC
    convolutions decode a 1024x1024 image about 1.3x (float32) to 1.6x (bfloat16) faster than NCHW ones, with
    the same arithmetic (docs/performance.md). The UNet stays as it is (NHWC measured slower there), as do
    GPUs (bench_gpu.py measures channels_last there) and the 3-D VAEs of the video-shaped families."""
    vae = getattr(pipe, "vae", None)
    if torch.device(device).type != "cpu" or type(vae).__name__ != "AutoencoderKL":
        return
    if all(p.dim() != 5 for p in vae.parameters()):
        vae.to(memory_format=torch.channels_last)
