"""bce: binary cross-entropy with logits, the mean over every unmasked entry.

Each unmasked (row, label) entry is one binary decision, positive or negative; rows without a
positive count too (their labels are all negatives).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from dexml.train.losses._reduce import _all_reduce, _prepare, _row_sum, _zero


def bce(scores, targets, mask=None, group=None):
    """Binary cross-entropy with logits, the mean over all unmasked entries (every row counts)."""
    s, pos, keep = _prepare(scores, targets, mask)
    per_entry = F.binary_cross_entropy_with_logits(s, pos.to(s.dtype), reduction="none")
    count = _row_sum(keep.to(s.dtype), group).sum()
    if count == 0:
        return _zero(scores)
    return _row_sum(torch.where(keep, per_entry, 0.0), group).sum() / count


loss = bce


def over_chunks(chunks):
    """One walk summing the entries' terms; d/ds = keep (σ(s) - pos) / (unmasked entries)."""
    count = float(_all_reduce(chunks.kept_per_row.sum().reshape(1), chunks.group)[0])
    if count == 0:
        return None, None
    total = torch.zeros((), dtype=chunks.dtype, device=chunks.q.device)
    for s, pos, keep in chunks:
        per_entry = F.binary_cross_entropy_with_logits(s, pos.to(s.dtype), reduction="none")
        total += torch.where(keep, per_entry, 0.0).sum()
    loss = _all_reduce(total.reshape(1), chunks.group)[0] / count

    def grad_scores(s, pos, keep):
        return torch.where(keep, torch.sigmoid(s) - pos.to(s.dtype), 0.0).div_(count)

    return loss, grad_scores
