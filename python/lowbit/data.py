"""Calibration and evaluation data: the bundled prose (lowbit/corpus), tokenized into fixed-seed calibration
sequences [n, L] or one evaluation stream."""
from __future__ import annotations

import pathlib
from typing import Any

import torch

CORPUS = pathlib.Path(__file__).with_name("corpus")
SPLITS = ("calib", "eval")


def bundled_text(split: str = "eval") -> str:
    """The bundled Python-documentation prose: ``"eval"`` (the tutorial) or ``"calib"`` (HOWTOs + FAQ)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return (CORPUS / f"python_docs_{split}.txt").read_text(encoding="utf-8")


def tokenize(tokenizer: Any, text: str) -> torch.Tensor:
    """The whole text as one LongTensor of token ids (no special tokens)."""
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def calibration_sequences(tokens: torch.Tensor, n: int = 128, length: int = 512, seed: int = 0) -> torch.Tensor:
    """n windows of `length` tokens at random (fixed-seed) offsets of the token stream, as [n, length]."""
    if tokens.dim() != 1:
        raise ValueError(f"tokens must be 1-D, got shape {list(tokens.shape)}")
    if n < 1 or length < 2:
        raise ValueError(f"n must be >= 1 and length >= 2, got n={n}, length={length}")
    if tokens.numel() <= length:
        raise ValueError(f"the text has {tokens.numel()} tokens, fewer than one sequence of {length}")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, tokens.numel() - length, (n,), generator=g)
    return torch.stack([tokens[s:s + length] for s in starts.tolist()])


__all__ = ["bundled_text", "tokenize", "calibration_sequences", "SPLITS"]
