"""Texts tokenized once per dataset and cached as memory-mapped token ids.

The cache key hashes the texts, the tokenizer's vocabulary and the max length, so a change in
any of them retokenizes and a rerun with the same inputs reads the cached arrays back.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from dexml import fileio

_CHUNK = 8192  # texts per tokenizer call


class TokenizedTexts:
    """Token ids (n, max_len) int32, right-padded, with per-row lengths; rows gathered into batches."""

    def __init__(self, ids: np.ndarray, lengths: np.ndarray, pad_id: int):
        self.ids, self.lengths, self.pad_id = ids, lengths, pad_id

    def __len__(self) -> int:
        return len(self.lengths)

    def batch(self, rows, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask) for `rows`, trimmed to the longest row in the batch."""
        rows = np.asarray(rows)
        width = max(int(self.lengths[rows].max()), 1) if len(rows) else 1
        ids = torch.from_numpy(np.ascontiguousarray(self.ids[rows, :width]).astype(np.int64))
        mask = (torch.arange(width)[None, :] < torch.from_numpy(self.lengths[rows].astype(np.int64))[:, None]).long()
        if device is not None:
            ids, mask = ids.to(device, non_blocking=True), mask.to(device, non_blocking=True)
        return ids, mask


def _fingerprint(texts: list[str], tokenizer, max_len: int) -> str:
    h = hashlib.sha256()
    vocab = tokenizer.get_vocab()
    h.update(json.dumps([type(tokenizer).__name__, len(vocab), max_len,
                         getattr(tokenizer, "do_lower_case", None)]).encode())
    h.update(hashlib.sha256(json.dumps(sorted(vocab.items())).encode()).digest())
    for t in texts:
        h.update(t.encode("utf-8", "surrogatepass"))
        h.update(b"\0")
    return h.hexdigest()[:24]


def tokenize(texts: list[str], tokenizer, max_len: int) -> TokenizedTexts:
    ids = np.full((len(texts), max_len), tokenizer.pad_token_id or 0, dtype=np.int32)
    lengths = np.zeros(len(texts), dtype=np.int32)
    for start in range(0, len(texts), _CHUNK):
        enc = tokenizer(texts[start:start + _CHUNK], truncation=True, max_length=max_len,
                        padding=False, return_attention_mask=False)["input_ids"]
        for i, row in enumerate(enc, start):
            ids[i, :len(row)] = row
            lengths[i] = len(row)
    return TokenizedTexts(ids, lengths, tokenizer.pad_token_id or 0)


def cached_tokenize(texts: list[str], tokenizer, max_len: int, cache_dir: str | Path | None) -> TokenizedTexts:
    """`tokenize`, memoised on disk under `cache_dir` (None = no cache)."""
    if cache_dir is None:
        return tokenize(texts, tokenizer, max_len)
    cache_dir = Path(cache_dir)
    key = _fingerprint(texts, tokenizer, max_len)
    ids_path, len_path = cache_dir / f"{key}.ids.npy", cache_dir / f"{key}.len.npy"
    if not (ids_path.exists() and len_path.exists()):
        tok = tokenize(texts, tokenizer, max_len)
        for path, arr in ((ids_path, tok.ids), (len_path, tok.lengths)):
            with fileio.atomic_path(path, suffix=".npy") as tmp:
                with open(tmp, "wb") as f:
                    np.save(f, arr, allow_pickle=False)
    return TokenizedTexts(np.load(ids_path, mmap_mode="r", allow_pickle=False),
                          np.load(len_path, allow_pickle=False), tokenizer.pad_token_id or 0)
