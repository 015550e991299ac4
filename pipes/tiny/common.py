"""What the tiny model builders share: the seed, seeding, CLIP and T5 tokenizers made in code,
small text encoders, random LoRA tensors, replacing an output folder, and the writer of the
full-size models (``write_meta_pipeline``: a pipeline built on the meta device, written a weights
shard at a time).

Nothing is downloaded: every tokenizer is built from characters in code, every weight is a
seeded random draw, so the same seed writes byte-identical files.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch

DEFAULT_SEED = 1234
#: called with a short label as a build goes on (``build_default_models``' ``progress``)
Progress = Callable[[str], None]
#: ``(models folder, seed, progress) -> path`` writes a model's full-size form (``TinyModel.full_build``)
FullBuild = Callable[[Path, int, Progress | None], Path]
#: the most a full-size weights file holds (huggingface_hub's size notation): the writer holds one
#: such shard in memory at a time
FULL_SHARD_SIZE = "5GB"


@dataclass(frozen=True)
class TinyModel:
    """One model ``models init`` builds beside the SD/SDXL defaults.

    Attributes:
        name: its key in the paths ``build_default_models`` returns.
        folder: where it goes, relative to the models folder (a diffusers folder).
        build: ``(models folder, seed) -> path`` writes it (and its ControlNet, LoRA, ... beside it).
        extras: the files, relative to the models folder, that ``build`` writes beside the folder
            (a LoRA file, a ControlNet's config and weights): a models folder missing any of them
            (built before they were added) gets the model built again.
        full_build: ``(models folder, seed, progress) -> path`` writes the model in its real
            architecture's sizes with random weights into the same folder (``models init
            --full-size``, for GPU benchmarks); None: the model has no full-size form.
    """

    name: str
    folder: str
    build: Callable[[Path, int], Path]
    extras: tuple[str, ...] = ()
    full_build: FullBuild | None = None

    def written(self) -> tuple[str, ...]:
        """Every file a complete build leaves, relative to the models folder: the folder's
        ``model_index.json`` and the extras."""
        return (f"{self.folder}/model_index.json", *self.extras)

    def missing(self, models_dir: Path) -> bool:
        """Whether ``models_dir`` lacks any file this model's build writes."""
        return any(not (Path(models_dir) / rel).is_file() for rel in self.written())


def seeded(seed: int, offset: int) -> None:
    """Seed torch for one part of a model: the same (seed, offset) draws the same weights."""
    torch.manual_seed(seed * 1000 + offset)


def replace_path(path: Path) -> None:
    """Remove ``path`` (a folder or a file) so that a builder writes it anew."""
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def filler_tokens(have: int, vocab_size: int | None, what: str) -> list[str]:
    """Names of the tokens that pad a vocabulary of ``have`` tokens to ``vocab_size`` (none for None).

    A full-size text encoder keeps its real embedding size, so its tokenizer made in code is padded
    to as many tokens; the fillers (``<|unused0|>``, ...) mix letters, digits and punctuation, which
    every pre-tokenizer here splits apart, and no merge makes them: text never encodes to them.
    """
    if vocab_size is None:
        return []
    if vocab_size < have:
        raise ValueError(f"a {what} vocabulary of {vocab_size} tokens is smaller than the {have} tokens "
                         "the tokenizer made in code needs")
    return [f"<|unused{i}|>" for i in range(vocab_size - have)]


def byte_tokenizer_parts(vocab_size: int | None = None) -> tuple[dict[str, int], list[str]]:
    """A CLIP BPE vocabulary of the 256 byte symbols (and their ``</w>`` forms), no merges; padded to
    ``vocab_size`` with unused tokens before the two special tokens (which stay the last two ids, as
    in CLIP's own 49408-token vocabulary)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    symbols = list(bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for s in symbols:
        vocab[s] = len(vocab)
    for s in symbols:
        vocab[s + "</w>"] = len(vocab)
    for filler in filler_tokens(len(vocab) + 2, vocab_size, "CLIP"):
        vocab[filler] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return vocab, []


def make_tokenizer(vocab_size: int | None = None):
    """A CLIP tokenizer made in code (``byte_tokenizer_parts``), ``vocab_size`` tokens long when given."""
    from transformers import CLIPTokenizer

    vocab, merges = byte_tokenizer_parts(vocab_size)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def clip_text_encoder(hidden: int, layers: int, heads: int, inter: int, vocab_size: int,
                  projection: bool, projection_dim: int):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=inter,
                         num_hidden_layers=layers, num_attention_heads=heads,
                         max_position_embeddings=77, projection_dim=projection_dim,
                         bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1,
                         hidden_act="quick_gelu")
    model = (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg)
    return model.eval()



def make_t5_tokenizer(max_length: int = 512, vocab_size: int | None = None):
    """A T5-style (SentencePiece Unigram) tokenizer built in code: every printable ASCII character,
    with and without the word-start mark, plus ``<pad>``, ``</s>`` and ``<unk>``; no download.

    ``vocab_size`` pads it with unused pieces scored so low that spelling them out character by
    character always wins (text never encodes to them).
    """
    import string

    from transformers import T5Tokenizer

    chars = [c for c in string.printable if not c.isspace()]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [("\u2581" + c, -3.0) for c in chars] + [(c, -4.0) for c in chars]
    vocab += [(filler, -1e4) for filler in filler_tokens(len(vocab), vocab_size, "T5")]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=max_length)




def linear_lora_tensors(name: str, lin: torch.nn.Linear, rank: int, alpha: float, gen: torch.Generator,
                        scale: float) -> dict[str, torch.Tensor]:
    """kohya-style ``lora_down``/``lora_up``/``alpha`` tensors for one linear layer, drawn from ``gen``."""
    down = torch.randn(rank, lin.in_features, generator=gen) * scale
    up = torch.randn(lin.out_features, rank, generator=gen) * scale
    return {f"{name}.lora_down.weight": down.contiguous(), f"{name}.lora_up.weight": up.contiguous(),
            f"{name}.alpha": torch.tensor(float(alpha))}


def linears(module: torch.nn.Module, kinds: tuple[str, ...]) -> Iterator[tuple[str, torch.nn.Linear]]:
    """``(dotted name, layer)`` of the linear layers of ``module`` whose name ends in one of ``kinds``."""
    for name, sub in module.named_modules():
        if isinstance(sub, torch.nn.Linear) and any(name == k or name.endswith("." + k) for k in kinds):
            yield name, sub


def is_norm(module: torch.nn.Module) -> bool:
    """Whether ``module`` is a normalisation layer (its weight a gain, 1 at initialisation): torch's,
    or any class named for one (``T5LayerNorm``, ``Qwen2_5_VLRMSNorm``, ``QwenImageRMS_norm``, ...)."""
    return (isinstance(module, (torch.nn.LayerNorm, torch.nn.GroupNorm, torch.nn.RMSNorm))
            or "norm" in type(module).__name__.lower())


def tensor_seed(seed: int, offset: int, name: str) -> int:
    """The generator seed of one weight: from the model's seed, its part's offset and the weight's name
    (so each weight is drawn alike whatever shard it falls in)."""
    digest = hashlib.sha256(f"{seed}/{offset}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def draw_tensor(shape: torch.Size, dtype: torch.dtype, kind: str, seed: int) -> torch.Tensor:
    """One weight: ``"ones"`` (a norm's gain), ``"zeros"`` (a bias) or ``"random"``: normal with the
    standard deviation of torch's default Linear/Conv initialisation, 1/sqrt(3 fan_in) (0.02 for other
    vectors), drawn in ``dtype`` from its own generator."""
    if kind == "ones":
        return torch.ones(shape, dtype=dtype)
    if kind == "zeros":
        return torch.zeros(shape, dtype=dtype)
    fan_in = shape.numel() // shape[0] if len(shape) > 1 else 0
    std = (3 * fan_in) ** -0.5 if fan_in else 0.02
    return torch.empty(shape, dtype=dtype).normal_(0.0, std, generator=torch.Generator().manual_seed(seed))


def _is_transformers(model: torch.nn.Module) -> bool:
    from transformers import PreTrainedModel

    return isinstance(model, PreTrainedModel)


def saved_weights(model: torch.nn.Module) -> dict[str, tuple[torch.Tensor, str]]:
    """The weights ``model.save_pretrained`` would write, by the names it writes them under, each with
    how it is drawn (``draw_tensor``'s kind); the tensors are ``model``'s own (meta) parameters.

    transformers models drop tied copies (T5's ``encoder.embed_tokens``) and revert their load-time
    renaming (Qwen2.5-VL's ``model.language_model.`` is written ``model.``), as their ``save_pretrained``.
    """
    state = model.state_dict(keep_vars=True)
    kinds: dict[int, str] = {}
    for module in model.modules():
        norm = is_norm(module)
        for name, param in module.named_parameters(recurse=False):
            kinds[id(param)] = "zeros" if name.endswith(("bias", "beta")) else "ones" if norm else "random"
    if _is_transformers(model):
        from transformers.core_model_loading import revert_weight_conversion
        from transformers.modeling_utils import remove_tied_weights_from_state_dict

        state = revert_weight_conversion(model, remove_tied_weights_from_state_dict(state, model))
    out: dict[str, tuple[torch.Tensor, str]] = {}
    for name, tensor in state.items():
        if id(tensor) not in kinds:
            raise ValueError(f"{type(model).__name__}.{name} is a buffer or a converted weight, not one of its "
                             "parameters: the full-size writer cannot draw it")
        out[name] = (tensor, kinds[id(tensor)])
    return out


def write_meta_model(model: torch.nn.Module, folder: Path, seed: int, offset: int, dtype: torch.dtype = torch.bfloat16,
                     max_shard_size: int | str = FULL_SHARD_SIZE, progress: Progress | None = None,
                     label: str = "") -> None:
    """Write ``model``, built on the meta device, as ``save_pretrained`` would in ``dtype``: its config
    and its weights, drawn (``draw_tensor``, ``tensor_seed``) and written one shard at a time, so that
    no more than one shard (``max_shard_size``) is ever in memory.

    Raises:
        ValueError: ``model`` holds real (not meta) tensors, or weights that are not parameters.
    """
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    if any(not t.is_meta for t in [*model.parameters(), *model.buffers()]):
        raise ValueError(f"{type(model).__name__} must be built on the meta device (torch.device('meta'))")
    # nothing to convert on the meta device: it sets the sizes the shards are cut by (torch.nn.Module.to:
    # diffusers' own warns about casting without from_pretrained)
    torch.nn.Module.to(model, dtype=dtype)
    folder.mkdir(parents=True, exist_ok=True)
    weights = saved_weights(model)
    stem = "model" if _is_transformers(model) else "diffusion_pytorch_model"
    split = split_torch_state_dict_into_shards({name: t for name, (t, _) in weights.items()},
                                               filename_pattern=stem + "{suffix}.safetensors",
                                               max_shard_size=max_shard_size)
    shards = split.filename_to_tensors
    for number, (filename, names) in enumerate(shards.items(), 1):
        if progress is not None:
            progress(f"{label} {number}/{len(shards)}".strip())
        shard = {name: draw_tensor(weights[name][0].shape, dtype, weights[name][1], tensor_seed(seed, offset, name))
                 for name in names}
        save_file(shard, str(folder / filename), metadata={"format": "pt"})
        del shard
    if split.is_sharded:
        metadata: dict[str, Any] = dict(split.metadata)
        if _is_transformers(model):
            metadata["total_parameters"] = sum(t.numel() for t, _ in weights.values())
        index = {"metadata": metadata, "weight_map": split.tensor_to_filename}
        (folder / f"{stem}.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    _write_model_config(model, folder, dtype)


def _write_model_config(model: Any, folder: Path, dtype: torch.dtype) -> None:
    """The JSON files ``save_pretrained`` writes beside the weights."""
    if _is_transformers(model):
        model.config.dtype = str(dtype).split(".")[1]
        model.config.architectures = [type(model).__name__]
        model.config.save_pretrained(folder)
        if model.can_generate():
            model.generation_config.save_pretrained(folder)
    else:
        model.save_config(folder)


def write_meta_pipeline(pipe: Any, folder: Path, seed: int, offsets: Mapping[str, int],
                        dtype: torch.dtype = torch.bfloat16, max_shard_size: int | str = FULL_SHARD_SIZE,
                        progress: Progress | None = None) -> Path:
    """Write ``pipe`` (a diffusers pipeline whose models are on the meta device) to ``folder`` as its
    ``save_pretrained`` would, its models' weights drawn in ``dtype`` a shard at a time (``write_meta_model``,
    model ``name`` seeded with ``offsets[name]``).

    The folder is written beside ``folder`` and renamed into place last (replacing it), so that a cut
    build leaves no half folder. Returns ``folder``.

    Raises:
        KeyError: a model of ``pipe`` has no seed offset.
    """
    folder = Path(folder)
    partial = folder.with_name(folder.name + ".partial")
    replace_path(partial)
    partial.mkdir(parents=True)
    for name, component in pipe.components.items():
        if component is None:
            continue
        if isinstance(component, torch.nn.Module):
            if name not in offsets:
                raise KeyError(f"no seed offset for {type(pipe).__name__}.{name}")
            write_meta_model(component, partial / name, seed, offsets[name], dtype, max_shard_size, progress, name)
        else:  # tokenizer, scheduler, processor
            component.save_pretrained(partial / name)
    pipe.save_config(partial)  # model_index.json
    replace_path(folder)
    partial.rename(folder)
    return folder
