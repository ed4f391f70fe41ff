"""softmax (InfoNCE): -log(e^{s_p} / Σ_{j unmasked} e^{s_j}) per positive p.

Averaged over each row's positives, then over the rows that have a positive. Every unmasked label,
the row's other positives included, is in the denominator.
"""
from __future__ import annotations

import torch

from dexml.train.losses._reduce import (
    StreamingLogSumExp,
    _all_reduce,
    _mean_over_positives,
    _row_logsumexp,
    _rows_with_positives,
    _zero,
)


def softmax(scores, targets, mask=None, group=None):
    """InfoNCE: -log(e^{s_p} / Σ_{all unmasked j} e^{s_j}) per positive p."""
    s, pos, keep, num_pos = _rows_with_positives(scores, targets, mask, group)
    if s.shape[0] == 0:
        return _zero(scores)
    log_denominator = _row_logsumexp(s, keep, group)
    per_entry = torch.where(pos, log_denominator[:, None] - s, 0.0)
    return _mean_over_positives(per_entry, num_pos, group)


loss = softmax


def over_chunks(chunks):
    """One walk: the streaming log-denominator and Σ_p s_p per row. Loss per row
    (n lse - Σ_p s_p) / n; d/ds_j = (keep_j e^{s_j - lse} - pos_j / n) / rows."""
    num_pos = _all_reduce(chunks.positives_per_row.clone(), chunks.group)
    counted = num_pos > 0
    num_rows = int(counted.sum())
    if num_rows == 0:
        return None, None
    lse = StreamingLogSumExp(chunks.num_rows, chunks.dtype, chunks.q.device)
    pos_sum = torch.zeros(chunks.num_rows, dtype=chunks.dtype, device=chunks.q.device)
    for s, pos, keep in chunks:
        lse.add(s, keep)
        pos_sum += torch.where(pos, s, 0.0).sum(dim=1)
    log_denominator = lse.result(chunks.group)
    pos_sum = _all_reduce(pos_sum, chunks.group)
    per_row = torch.where(counted, log_denominator - pos_sum / num_pos.clamp_min(1), 0.0)
    loss = per_row.sum() / num_rows
    weight = counted.to(chunks.dtype) / num_rows  # rows without a positive get no gradient
    inv_pos = 1 / num_pos.clamp_min(1)
    safe_lse = torch.where(counted, log_denominator, float("inf"))  # e^(s - inf) = 0: rows not counted

    def grad_scores(s, pos, keep):
        g = torch.where(keep, torch.exp(s - safe_lse[:, None]), 0.0)
        g -= pos * inv_pos[:, None]
        return g.mul_(weight[:, None])

    return loss, grad_scores
