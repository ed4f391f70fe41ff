"""Reductions over the label axis: the only places that talk to other ranks.

Each takes an optional torch.distributed process group (None = this process only). With a group,
each rank holds its own column shard of the (B, N) scores (same rows everywhere), and a row
reduction covers every rank's shard. The differentiable ones (`_row_sum`, `_row_logsumexp`) use
torch.distributed.nn's all_reduce, whose backward sums the incoming gradients over the ranks: every
rank gets world_size times its shard's gradient (DDP's gradient averaging divides that back).
"""
from __future__ import annotations

import torch


def _sum_over_ranks(x: torch.Tensor, group=None) -> torch.Tensor:
    """x summed over the ranks of `group` (differentiable); x itself when group is None."""
    if group is None:
        return x
    import torch.distributed.nn.functional as dist_fn

    return dist_fn.all_reduce(x, group=group)


def _row_sum(x: torch.Tensor, group=None) -> torch.Tensor:
    """Σ over the last (label) axis, across the ranks of `group` too."""
    return _sum_over_ranks(x.sum(dim=-1), group)


def _all_reduce(x: torch.Tensor, group=None, op: str = "sum") -> torch.Tensor:
    """x reduced over the ranks of `group` (sum or max; not differentiable, in place); x when None."""
    if group is not None:
        ops = {"sum": torch.distributed.ReduceOp.SUM, "max": torch.distributed.ReduceOp.MAX}
        torch.distributed.all_reduce(x, op=ops[op], group=group)
    return x


def _row_max(x: torch.Tensor, group=None) -> torch.Tensor:
    """max over the last axis, across ranks too (not differentiable: only used as a shift/bracket)."""
    if x.shape[-1] == 0:  # a rank's empty shard of a small label pool
        top = x.new_full(x.shape[:-1], float("-inf")).detach()
    else:
        top = x.detach().amax(dim=-1)
    return _all_reduce(top, group, "max")


def _row_logsumexp(x: torch.Tensor, keep: torch.Tensor, group=None) -> torch.Tensor:
    """log Σ_{keep} e^x per row; -inf for a row with nothing kept, with a zero (not NaN) gradient."""
    x = x.masked_fill(~keep, float("-inf"))
    shift = _row_max(x, group)
    shift = shift.masked_fill(~torch.isfinite(shift), 0.0)
    total = _row_sum(torch.exp(x - shift[:, None]), group)
    empty = total == 0
    return torch.where(empty, float("-inf"), total.masked_fill(empty, 1.0).log() + shift)


class StreamingLogSumExp:
    """log Σ_{keep} e^x per row, fed one (B, w) chunk at a time (no gradient): a running max and
    a running sum of e^(x - max), rescaled when the max grows, combined over ranks at the end."""

    def __init__(self, rows: int, dtype, device):
        self.top = torch.full((rows,), float("-inf"), dtype=dtype, device=device)
        self.total = torch.zeros(rows, dtype=dtype, device=device)

    def add(self, x: torch.Tensor, keep: torch.Tensor) -> None:
        if x.shape[1] == 0:
            return
        x = x.masked_fill(~keep, float("-inf"))
        top = torch.maximum(self.top, x.amax(dim=1))
        shift = top.masked_fill(~torch.isfinite(top), 0.0)  # a row with nothing kept yet
        self.total = self.total * torch.exp(self.top - shift) + torch.exp(x - shift[:, None]).sum(dim=1)
        self.top = top

    def result(self, group=None) -> torch.Tensor:
        """The per-row log-sum-exp over every chunk added (and every rank's); -inf where none kept."""
        top = _all_reduce(self.top.clone(), group, "max")
        shift = top.masked_fill(~torch.isfinite(top), 0.0)
        total = _all_reduce(self.total * torch.exp(self.top - shift), group)
        empty = total == 0
        return torch.where(empty, float("-inf"), total.masked_fill(empty, 1.0).log() + shift)


def _mean_over_positives(per_entry: torch.Tensor, num_pos: torch.Tensor, group=None) -> torch.Tensor:
    """Average over each row's positives, then over rows (every row given here has a positive)."""
    return (_row_sum(per_entry, group) / num_pos).mean()


def _prepare(scores, targets, mask):
    """Check shapes; return scores in the compute dtype, positives and kept (unmasked) entries."""
    if scores.dim() != 2 or targets.shape != scores.shape or (mask is not None and mask.shape != scores.shape):
        raise ValueError(f"losses expect (B, N) scores, targets and mask of one shape; got scores "
                         f"{tuple(scores.shape)}, targets {tuple(targets.shape)}, "
                         f"mask {None if mask is None else tuple(mask.shape)}")
    s = scores.to(torch.float64 if scores.dtype == torch.float64 else torch.float32)
    keep = torch.ones_like(s, dtype=torch.bool) if mask is None else ~mask.bool()
    return s, (targets > 0) & keep, keep


def _rows_with_positives(scores, targets, mask, group):
    """(scores, positives, kept entries, positives per row), only for the rows that have a positive."""
    s, pos, keep = _prepare(scores, targets, mask)
    num_pos = _row_sum(pos.to(s.dtype), group)
    rows = num_pos > 0
    return s[rows], pos[rows], keep[rows], num_pos[rows]


def _zero(scores: torch.Tensor) -> torch.Tensor:
    """A zero loss that still has a graph, so backward() works on a batch without positives."""
    return (scores.sum() * 0).float()
