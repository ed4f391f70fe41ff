"""Label pools per training step (all / in-batch / hard) and the hard-negative shortlist.

A pool is the set of labels a step scores its queries against, with the (B, P) positive
targets and the mask of entries left out of the loss (the row's other positives when one
positive is sampled per row, as in the paper).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp


@dataclass
class LabelPool:
    labels: np.ndarray  # (P,) int64 label indices
    targets: np.ndarray  # (B, P) bool: positives
    mask: np.ndarray  # (B, P) bool: left out of the loss entirely


def sample_hard(shortlist_rows: np.ndarray, num_hard: int, rng: np.random.Generator) -> np.ndarray:
    """Per row, up to `num_hard` distinct entries of its shortlist (-1 = empty slot), uniformly."""
    keys = rng.random(shortlist_rows.shape)
    keys[shortlist_rows < 0] = np.inf  # empty slots sort last
    order = np.argsort(keys, axis=1)[:, :num_hard]
    picked = np.take_along_axis(shortlist_rows, order, axis=1)
    return picked[picked >= 0]


def build_pool(mode: str, y_batch: sp.csr_matrix, rng: np.random.Generator, sample_positives: int,
               shortlist_rows: np.ndarray | None = None, num_hard: int = 0) -> LabelPool:
    """The label pool for one batch whose label rows are `y_batch` (B x L)."""
    num_labels = y_batch.shape[1]
    if mode == "all":
        labels = np.arange(num_labels)
    elif mode == "in-batch":
        labels = np.unique(y_batch.indices)
    elif mode == "hard":
        hard = sample_hard(shortlist_rows, num_hard, rng) if shortlist_rows is not None else np.zeros(0, np.int64)
        labels = np.unique(np.concatenate([y_batch.indices, hard]))
    else:
        raise ValueError(f"unknown negatives mode {mode!r}")
    labels = labels.astype(np.int64)
    targets = y_batch[:, labels].toarray() > 0
    mask = np.zeros_like(targets)
    if sample_positives == 1:
        # Keep one random positive per row; the row's other positives leave this step's loss.
        keys = np.where(targets, rng.random(targets.shape), -1.0)
        chosen = keys.argmax(axis=1)
        mask = targets.copy()
        mask[np.arange(len(targets)), chosen] = False
    return LabelPool(labels, targets, mask)


def build_shortlist(query_emb: np.ndarray, label_emb: np.ndarray, y: sp.csr_matrix, size: int) -> np.ndarray:
    """(n, size) int64: each query's top labels by inner product, its positives removed (-1 pads)."""
    import faiss

    index = faiss.IndexFlatIP(label_emb.shape[1])
    index.add(np.ascontiguousarray(label_emb, dtype=np.float32))
    max_pos = int(np.diff(y.indptr).max()) if y.nnz else 0
    depth = min(size + max_pos, label_emb.shape[0])
    _, found = index.search(np.ascontiguousarray(query_emb, dtype=np.float32), depth)
    out = np.full((len(found), size), -1, dtype=np.int64)
    for i, row in enumerate(found):
        positives = y.indices[y.indptr[i]:y.indptr[i + 1]]
        negatives = row[(row >= 0) & ~np.isin(row, positives)][:size]
        out[i, :len(negatives)] = negatives
    return out
