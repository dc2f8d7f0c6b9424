"""Text conditioning: a small built-in encoder over a word vocabulary, or a local transformers encoder."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import torch
from torch import nn

from .errors import UsageError
from .layers import Attention, SwiGLU

PAD, BOS, UNK = 0, 1, 2  # ids below the vocabulary; BOS is always present so no caption is empty
_WORD = re.compile(r"[a-z0-9]+")


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def build_vocabulary(captions, max_words: int = 4096, min_count: int = 1) -> list[str]:
    """The most frequent words of the captions, ties broken alphabetically so the result is stable."""
    counts = Counter(w for caption in captions for w in words(caption))
    ranked = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
    return ranked[:max_words]


class WordTokenizer:
    """Lower-cased words -> ids; unknown words share one id."""

    def __init__(self, vocab: list[str], max_length: int):
        self.index = {w: i + 3 for i, w in enumerate(vocab)}
        self.vocab_size = len(vocab) + 3
        self.max_length = max_length

    def __call__(self, captions: list[str], device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """-> ids [B, L] and mask [B, L] (True = real token)."""
        ids = torch.full((len(captions), self.max_length), PAD, dtype=torch.long)
        for row, caption in enumerate(captions):
            tokens = [BOS] + [self.index.get(w, UNK) for w in words(caption)]
            tokens = tokens[: self.max_length]
            ids[row, : len(tokens)] = torch.tensor(tokens)
        return ids.to(device), (ids != PAD).to(device)


class _EncoderLayer(nn.Module):
    """Pre-norm transformer layer over caption tokens."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, qk_norm=False)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = SwiGLU(dim, 2 * dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), mask=mask)
        return x + self.mlp(self.norm2(x))


class BuiltinTextEncoder(nn.Module):
    """Word embeddings + learned positions + a few transformer layers; trained with the model."""

    def __init__(self, vocab: list[str], dim: int, num_heads: int, max_length: int, num_layers: int):
        super().__init__()
        self.tokenizer = WordTokenizer(vocab, max_length)
        self.embed = nn.Embedding(self.tokenizer.vocab_size, dim)
        self.pos = nn.Parameter(torch.zeros(1, max_length, dim))
        self.layers = nn.ModuleList(_EncoderLayer(dim, num_heads) for _ in range(num_layers))
        self.norm = nn.LayerNorm(dim)
        nn.init.normal_(self.embed.weight, std=0.02)
        nn.init.normal_(self.pos, std=0.02)

    def forward(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """-> tokens [B, L, D] and mask [B, L]."""
        ids, mask = self.tokenizer(captions, device=self.embed.weight.device)
        x = self.embed(ids) + self.pos
        for layer in self.layers:
            x = layer(x, mask)
        return self.norm(x), mask


class PretrainedTextEncoder(nn.Module):
    """A frozen `transformers` encoder from a local folder, projected to the model width."""

    def __init__(self, path: str, dim: int, max_length: int):
        super().__init__()
        try:
            from transformers import AutoModel, AutoTokenizer
        except ImportError:
            raise UsageError("model.text_encoder needs the 'transformers' package: pip install transformers") from None
        if not Path(path).is_dir():
            raise UsageError(f"model.text_encoder: {path} is not a folder with a transformers model")
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        # A list keeps the frozen encoder out of state_dict: it is loaded from its folder, not saved twice.
        self._encoder = [AutoModel.from_pretrained(path, local_files_only=True).eval().requires_grad_(False)]
        self.max_length = max_length
        self.proj = nn.Linear(self._encoder[0].config.hidden_size, dim)

    def forward(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        device = self.proj.weight.device
        encoder = self._encoder[0].to(device)
        batch = self.tokenizer(captions, padding="max_length", truncation=True, max_length=self.max_length,
                               return_tensors="pt").to(device)
        with torch.no_grad():
            hidden = encoder(**batch).last_hidden_state
        return self.proj(hidden.float()), batch["attention_mask"].bool()
