"""What the tiny model builders share: the seed, seeding, CLIP and T5 tokenizers made in code,
small text encoders, random LoRA tensors, and replacing an output folder.

Nothing is downloaded: every tokenizer is built from characters in code, every weight is a
seeded random draw, so the same seed writes byte-identical files.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

DEFAULT_SEED = 1234


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
    """

    name: str
    folder: str
    build: Callable[[Path, int], Path]
    extras: tuple[str, ...] = ()

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


def byte_tokenizer_parts() -> tuple[dict[str, int], list[str]]:
    """A CLIP BPE vocabulary of the 256 byte symbols (and their ``</w>`` forms), no merges."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    symbols = list(bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for s in symbols:
        vocab[s] = len(vocab)
    for s in symbols:
        vocab[s + "</w>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return vocab, []


def make_tokenizer():
    from transformers import CLIPTokenizer

    vocab, merges = byte_tokenizer_parts()
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



def make_t5_tokenizer(max_length: int = 512):
    """A T5-style (SentencePiece Unigram) tokenizer built in code: every printable ASCII character,
    with and without the word-start mark, plus ``<pad>``, ``</s>`` and ``<unk>``; no download."""
    import string

    from transformers import T5Tokenizer

    chars = [c for c in string.printable if not c.isspace()]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [("\u2581" + c, -3.0) for c in chars] + [(c, -4.0) for c in chars]
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
