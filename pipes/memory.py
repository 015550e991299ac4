"""Memory options of a base model: weight quantization (torchao), CPU offload, and the bytes it really holds.

``quantize`` (``none``, ``int8``, ``fp8``) replaces the weights of the ``nn.Linear`` layers of the
denoiser (UNet or transformer) and of the large text encoders that are not CLIP (T5, Qwen...) by
torchao tensors: int8 weight-only (runs everywhere, the CPU included) or fp8 weight-only (CUDA GPUs
of compute capability 8.9 or more). CLIP encoders and the VAE keep their precision: they are small,
and the VAE is mostly convolutions, which weight-only quantization leaves alone anyway.

The weights are quantized right after loading, on the CPU, before the pipeline moves to its device,
with ``torchao.quantization.quantize_`` and the same configs (``Int8WeightOnlyConfig``,
``Float8WeightOnlyConfig``) that diffusers' ``TorchAoConfig`` applies layer by layer. Loading
through ``TorchAoConfig`` itself is not used: diffusers then marks the model ``is_quantized`` and
``from_pipe(..., dtype=)`` -- how every pipe class shares the base's weights -- refuses it
("Casting a quantized model to a new `dtype` is unsupported"). Single-file checkpoints, which
``from_single_file`` cannot quantize, get the same treatment.

``offload`` (``none``, ``model``, ``sequential``) is diffusers' ``enable_model_cpu_offload`` /
``enable_sequential_cpu_offload``: the weights stay in CPU memory and move to the GPU a component
(or a layer) at a time. It needs a GPU; on the CPU it is refused.

:func:`footprint` tells what a loaded base holds: every byte of its weights (torchao tensors counted
by their int8/fp8 data and scales) and the part that sits on its device at once, which is what the
service's model cache counts against a device's budget.
"""
from __future__ import annotations

import importlib.util
import logging
import weakref
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import torch

from .errors import InvalidValueError
from .spec import MEMORY_OPTIONS

logger = logging.getLogger(__name__)

#: ``quantize`` values: no quantization, int8 weight-only, fp8 weight-only (declared in the spec)
QUANTIZE = MEMORY_OPTIONS["quantize"]
#: ``offload`` values: none, a whole component at a time, one layer at a time
OFFLOAD = MEMORY_OPTIONS["offload"]
#: the compute capability fp8 matmuls need (Ada Lovelace, Hopper and later)
FP8_MIN_CAPABILITY = (8, 9)
#: the torchao release multigen is tested with (setup.cfg pins it)
TORCHAO_REQUIREMENT = "torchao==0.18.0"
#: text encoder classes left unquantized: CLIP encoders are small and their pooled output is sensitive
KEEP_ENCODER_PREFIXES = ("CLIP",)


@dataclass(frozen=True)
class Footprint:
    """What a loaded base pipeline holds.

    Attributes:
        quantize, offload: its memory options.
        quantized: the components whose linear weights are quantized.
        total_bytes: every weight and buffer, wherever it is (CPU memory when offloaded).
        device_bytes: what its device holds at once: everything; with ``offload: model`` the largest
            component; with ``sequential`` the largest single layer.
        device: where it computes (the GPU it offloads to).
    """

    quantize: str
    offload: str
    quantized: tuple[str, ...]
    total_bytes: int
    device_bytes: int
    device: torch.device


#: footprints of the pipelines ``apply_memory_options`` prepared (measured before offloading moves
#: weights to the meta device, where they can no longer be counted)
_FOOTPRINTS: "weakref.WeakKeyDictionary[Any, Footprint]" = weakref.WeakKeyDictionary()


# ---- checks ---------------------------------------------------------------------------------------------------
def _who(model: str | None) -> str:
    return f"model {model!r}: " if model else ""


def check_choice(value: Any, allowed: tuple[str, ...], param: str, model: str | None = None) -> str:
    """``value`` as one of ``allowed`` (None means ``"none"``; case is ignored).

    Raises:
        InvalidValueError: naming the model, the field, the bad value and the allowed ones.
    """
    if value is None:
        return "none"
    key = str(value).strip().lower() if isinstance(value, str) else None
    if key not in allowed:
        raise InvalidValueError(f"{_who(model)}{param} {value!r} is not supported; allowed: {', '.join(allowed)}",
                                param, ", ".join(allowed))
    return key


def fp8_problem(device: "str | torch.device") -> str | None:
    """Why fp8 cannot run on ``device`` (None when it can)."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return f"the model runs on {dev}"
    if not torch.cuda.is_available():
        return "CUDA is not available"
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(index)
    if (major, minor) < FP8_MIN_CAPABILITY:
        return f"{dev} ({torch.cuda.get_device_name(index)}) has compute capability {major}.{minor}"
    return None


def torchao_problem() -> str | None:
    """Why torchao cannot quantize here (None when it can)."""
    if importlib.util.find_spec("torchao") is None:
        return f"the torchao package is not installed (pip install {TORCHAO_REQUIREMENT})"
    return None


def check_memory_options(quantize: Any, offload: Any, device: "str | torch.device",
                         model: str | None = None) -> tuple[str, str]:
    """Check a model's ``quantize`` and ``offload`` against each other and the device it runs on.

    Args:
        quantize: ``none``, ``int8`` or ``fp8`` (None: none).
        offload: ``none``, ``model`` or ``sequential`` (None: none).
        device: the device the model computes on.
        model: its name, for the messages.

    Returns:
        ``(quantize, offload)`` normalised.

    Raises:
        InvalidValueError: an unknown value (listing the allowed ones), fp8 off a CUDA GPU of compute
            capability 8.9+, offload on the CPU, or quantization without torchao; each names the model
            and the field.
    """
    q = check_choice(quantize, QUANTIZE, "quantize", model)
    o = check_choice(offload, OFFLOAD, "offload", model)
    dev = torch.device(device)
    if q == "fp8":
        problem = fp8_problem(dev)
        if problem:
            raise InvalidValueError(
                f"{_who(model)}quantize 'fp8' needs a CUDA GPU of compute capability "
                f"{FP8_MIN_CAPABILITY[0]}.{FP8_MIN_CAPABILITY[1]} or more (Ada, Hopper or newer), but {problem}; "
                "allowed here: none, int8", "quantize", "none, int8")
    if o != "none" and dev.type == "cpu":
        raise InvalidValueError(
            f"{_who(model)}offload {o!r} keeps the weights in CPU memory and moves them to a GPU when used, "
            "but the model runs on the CPU; allowed on a CPU: none (or quantize: int8 to save memory)",
            "offload", "none")
    if q != "none":
        problem = torchao_problem()
        if problem:
            raise InvalidValueError(f"{_who(model)}quantize {q!r} cannot run: {problem}; allowed without it: none",
                                    "quantize", "none")
    return q, o


# ---- quantization ---------------------------------------------------------------------------------------------
def ao_config(quantize: str) -> Any:
    """The torchao config of a ``quantize`` value (what diffusers' ``TorchAoConfig`` wraps)."""
    from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig

    configs = {"int8": Int8WeightOnlyConfig, "fp8": Float8WeightOnlyConfig}
    if quantize not in configs:
        raise InvalidValueError(f"quantize {quantize!r} has no torchao config; allowed: {', '.join(configs)}",
                                "quantize", ", ".join(configs))
    return configs[quantize]()


def quantized_components(pipe: Any, denoiser: str) -> list[str]:
    """The components ``quantize`` applies to: the denoiser and the text encoders that are not CLIP."""
    out = []
    for name, module in pipe.components.items():
        if not isinstance(module, torch.nn.Module):
            continue
        is_encoder = name.startswith("text_encoder") and not type(module).__name__.startswith(KEEP_ENCODER_PREFIXES)
        if name == denoiser or is_encoder:
            out.append(name)
    return out


def is_quantized(module: torch.nn.Module) -> bool:
    """True when some weight of ``module`` is a torchao tensor (a tensor subclass of inner tensors)."""
    return any(_is_wrapper(p) for p in module.parameters())


def quantize_pipeline(pipe: Any, quantize: str, denoiser: str) -> list[str]:
    """Quantize the weights of ``pipe``'s denoiser and large text encoders in place (see the module doc).

    Returns:
        the components quantized now (those already quantized are left alone).
    """
    if quantize == "none":
        return []
    from torchao.quantization import quantize_

    done = []
    for name in quantized_components(pipe, denoiser):
        module = getattr(pipe, name)
        if not is_quantized(module):
            quantize_(module, ao_config(quantize))
            done.append(name)
    return done


# ---- offload --------------------------------------------------------------------------------------------------
def load_device(device: "str | torch.device", offload: str) -> torch.device:
    """Where the loaded pipeline is placed before offloading: the CPU when offloaded, else ``device``."""
    return torch.device("cpu") if offload != "none" else torch.device(device)


def offload_device(device: "str | torch.device") -> torch.device:
    """``device`` with its index (``cuda`` -> ``cuda:0``), as diffusers' offload hooks name it."""
    dev = torch.device(device)
    return dev if dev.index is not None or dev.type == "cpu" else torch.device(dev.type, 0)


def apply_memory_options(pipe: Any, quantize: str, offload: str, device: "str | torch.device",
                         quantized: Iterable[str] = ()) -> Footprint:
    """Offload ``pipe`` to ``device`` as ``offload`` says, and record its :class:`Footprint`.

    Called once the pipeline is on its load device (:func:`load_device`); the weights are measured
    before offloading. ``quantized`` names the components :func:`quantize_pipeline` quantized.
    """
    comps = {n: m for n, m in pipe.components.items() if isinstance(m, torch.nn.Module)}
    total = module_bytes(pipe)
    if offload == "model":
        on_device = max((module_bytes(m) for m in comps.values()), default=0)
    elif offload == "sequential":
        on_device = max((module_bytes(m, recurse=False) for c in comps.values() for m in c.modules()), default=0)
    else:
        on_device = total
    dev = offload_device(device)
    if offload == "model":
        pipe.enable_model_cpu_offload(device=dev)
    elif offload == "sequential":
        pipe.enable_sequential_cpu_offload(device=dev)
    fp = Footprint(quantize=quantize, offload=offload, quantized=tuple(quantized), total_bytes=total,
                   device_bytes=on_device, device=dev)
    _FOOTPRINTS[pipe] = fp
    logger.info("memory: %.1f MiB of weights (%s), %.1f MiB of them on %s at once (offload %s)",
                total / 2**20, f"{quantize}: {', '.join(fp.quantized)}" if fp.quantized else "not quantized",
                on_device / 2**20, dev, offload)
    return fp


def footprint(pipe: Any) -> Footprint:
    """What ``pipe`` holds: as recorded when it was loaded, else measured now (no offload)."""
    fp = _FOOTPRINTS.get(pipe)
    if fp is not None:
        return fp
    total = module_bytes(pipe)
    quantized = tuple(n for n, m in pipe.components.items() if isinstance(m, torch.nn.Module) and is_quantized(m))
    device = getattr(pipe, "device", torch.device("cpu"))
    return Footprint(quantize="unknown" if quantized else "none", offload="none", quantized=quantized,
                     total_bytes=total, device_bytes=total, device=torch.device(device))


def execution_device(pipe: Any, module: torch.nn.Module) -> torch.device:
    """Where ``pipe`` computes: its offload device when offloaded (its weights sit on the CPU or the
    meta device then), else the device of ``module`` (its denoiser)."""
    fp = _FOOTPRINTS.get(pipe)
    if fp is not None and fp.offload != "none":
        return fp.device
    return module.device


# ---- measuring ------------------------------------------------------------------------------------------------
def _is_wrapper(t: torch.Tensor) -> bool:
    """A tensor subclass made of inner tensors (torchao's Int8Tensor, Float8Tensor...)."""
    return type(t) not in (torch.Tensor, torch.nn.Parameter) and hasattr(t, "__tensor_flatten__")


def leaf_tensors(t: torch.Tensor) -> Iterator[torch.Tensor]:
    """The plain tensors that hold ``t``'s data: ``t`` itself, or a subclass's inner tensors (its int8
    or fp8 data, scales and zero points), followed to any depth."""
    if _is_wrapper(t):
        names, _ = t.__tensor_flatten__()
        for name in names:
            yield from leaf_tensors(getattr(t, name))
    else:
        yield t


def _modules_of(obj: Any) -> Iterator[torch.nn.Module]:
    if isinstance(obj, torch.nn.Module):
        yield obj
        return
    for comp in (getattr(obj, "components", None) or {}).values():
        for m in comp if isinstance(comp, (list, tuple)) else [comp]:
            if isinstance(m, torch.nn.Module):
                yield m


def module_bytes(obj: Any, recurse: bool = True) -> int:
    """Bytes of the distinct tensors held by a pipeline (its ``components``) or a module.

    Tensors shared between modules count once (by device and storage). A torchao tensor counts by
    its inner tensors: its ``untyped_storage()`` is a placeholder the size of the unquantized
    weight (or not there at all). Tensors on the meta device hold nothing and count nothing.

    Args:
        obj: a diffusers pipeline, any object with a ``components`` mapping, or an ``nn.Module``.
        recurse: with a module, False counts only its own parameters and buffers (not its children's).
    """
    seen: set[tuple[str, int]] = set()
    total = 0
    for module in _modules_of(obj):
        for t in [*module.parameters(recurse=recurse), *module.buffers(recurse=recurse)]:
            for leaf in leaf_tensors(t):
                if leaf.device.type == "meta":
                    continue
                storage = leaf.untyped_storage()
                key = (str(leaf.device), storage.data_ptr())
                if key not in seen:
                    seen.add(key)
                    total += storage.nbytes()
    return total
