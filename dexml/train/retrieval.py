"""Exact retrieval inside training, in torch: embed token ids without gradients, and the top-k
labels of many queries over label chunks, so no queries x labels matrix larger than one
(query chunk x label chunk) block is ever formed (validation and shortlists at 10^6 labels).
"""
from __future__ import annotations

import contextlib

import scipy.sparse as sp
import torch

QUERY_CHUNK = 1024
LABEL_CHUNK = 65536  # 1024 x 65536 float32 scores = 256 MB per block


@torch.no_grad()
def embed_tokens(encode, tok, rows, device, batch_size: int = 256, autocast=contextlib.nullcontext) -> torch.Tensor:
    """float32 embeddings of `tok`'s `rows` (on `device`), `batch_size` texts per encoder call."""
    out = None  # filled in place (no list of batches plus a concatenated copy)
    for start in range(0, len(rows), batch_size):
        ids, mask = tok.batch(rows[start:start + batch_size], device)
        with autocast():
            emb = encode(ids, mask).float()
        if out is None:
            out = torch.empty(len(rows), emb.shape[1], device=emb.device)
        out[start:start + len(emb)] = emb
    return out if out is not None else torch.zeros(0, 0, device=device)


@torch.no_grad()
def top_k(queries: torch.Tensor, labels: torch.Tensor, k: int, *, scale: float = 1.0,
          bias: torch.Tensor | None = None, exclude: sp.csr_matrix | None = None,
          query_chunk: int = QUERY_CHUNK, label_chunk: int = LABEL_CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """The `k` best labels per query by scale * q.l (+ bias[l]), exactly, walking label chunks.

    queries (n, d), labels (L, d) (any float dtype; scored in float32), bias (L,) optional,
    exclude (n, L) CSR: entries never returned (e.g. a query's positives). Returns (values, ids),
    both (n, min(k, L)) on the queries' device, best first; a query with fewer than k eligible
    labels gets -inf values and id -1 in its last slots."""
    n, num_labels = queries.shape[0], labels.shape[0]
    k = min(k, num_labels)
    device = queries.device
    values = torch.full((n, k), float("-inf"), device=device)
    ids = torch.full((n, k), -1, dtype=torch.int64, device=device)
    if k == 0 or n == 0:
        return values, ids
    exclude = exclude.tocsr() if exclude is not None else None
    for qs in range(0, n, query_chunk):
        q = queries[qs:qs + query_chunk].float()
        best_v, best_i = values[qs:qs + query_chunk], ids[qs:qs + query_chunk]
        rows_ex = exclude[qs:qs + query_chunk] if exclude is not None else None
        for ls in range(0, num_labels, label_chunk):
            block = labels[ls:ls + label_chunk]
            s = (q @ block.float().T) * scale
            if bias is not None:
                s += bias[ls:ls + label_chunk].float()
            if rows_ex is not None:
                sub = rows_ex[:, ls:ls + block.shape[0]].tocoo()
                if sub.nnz:
                    s[torch.from_numpy(sub.row).long().to(device), torch.from_numpy(sub.col).long().to(device)] = float("-inf")
            top = torch.topk(s, min(k, s.shape[1]), dim=1)
            cand_v = torch.cat([best_v, top.values], dim=1)
            cand_i = torch.cat([best_i, top.indices + ls], dim=1)
            merged = torch.topk(cand_v, k, dim=1)
            best_v = merged.values
            best_i = torch.gather(cand_i, 1, merged.indices)
        best_i = best_i.masked_fill(torch.isinf(best_v) & (best_v < 0), -1)
        values[qs:qs + query_chunk], ids[qs:qs + query_chunk] = best_v, best_i
    return values, ids

