"""decoupled_softmax, the paper's loss: -log(e^{s_p} / (e^{s_p} + Σ_{j negative} e^{s_j})).

Like softmax, but a positive's competitors are the row's unmasked negatives only: the other
positives are left out of its denominator. Averaged over each row's positives, then over the rows
that have a positive.
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


def decoupled_softmax(scores, targets, mask=None, group=None):
    """-log(e^{s_p} / (e^{s_p} + Σ_{j negative} e^{s_j})): other positives are not competitors."""
    s, pos, keep, num_pos = _rows_with_positives(scores, targets, mask, group)
    if s.shape[0] == 0:
        return _zero(scores)
    log_negatives = _row_logsumexp(s, keep & ~pos, group)
    per_entry = torch.where(pos, torch.logaddexp(s, log_negatives[:, None]) - s, 0.0)
    return _mean_over_positives(per_entry, num_pos, group)


loss = decoupled_softmax


def over_chunks(chunks):
    """One walk: the streaming log-sum-exp over negatives (N) and the positives' scores. A positive's
    term is softplus(N - s_p); d/ds_p = -σ(N - s_p) / (n rows), and for a negative j
    d/ds_j = e^{s_j - N} Σ_p σ(N - s_p) / (n rows)."""
    num_pos = _all_reduce(chunks.positives_per_row.clone(), chunks.group)
    counted = num_pos > 0
    num_rows = int(counted.sum())
    if num_rows == 0:
        return None, None
    negatives = StreamingLogSumExp(chunks.num_rows, chunks.dtype, chunks.q.device)
    pos_rows, pos_scores = [], []
    for s, pos, keep in chunks:
        negatives.add(s, keep & ~pos)
        rows, cols = pos.nonzero(as_tuple=True)
        pos_rows.append(rows)
        pos_scores.append(s[rows, cols])
    log_negatives = negatives.result(chunks.group)
    rows, s_pos = torch.cat(pos_rows), torch.cat(pos_scores)
    n_row = log_negatives[rows]
    term = torch.logaddexp(s_pos, n_row) - s_pos
    competing = torch.sigmoid(n_row - s_pos)  # = 1 - the positive's softmax against the negatives
    sums = torch.zeros(2, chunks.num_rows, dtype=chunks.dtype, device=chunks.q.device)
    sums[0].index_add_(0, rows, term)
    sums[1].index_add_(0, rows, competing)
    term_sum, competing_sum = _all_reduce(sums, chunks.group)
    inv_pos = 1 / num_pos.clamp_min(1)
    loss = (term_sum * inv_pos).sum() / num_rows
    weight = counted.to(chunks.dtype) * inv_pos / num_rows
    safe_n = torch.where(torch.isfinite(log_negatives), log_negatives, 0.0)

    def grad_scores(s, pos, keep):
        negative = keep & ~pos
        g = torch.where(negative, torch.exp(s - safe_n[:, None]) * competing_sum[:, None], 0.0)
        g -= torch.where(pos, torch.sigmoid(log_negatives[:, None] - s), 0.0)
        return g.mul_(weight[:, None])

    return loss, grad_scores
