"""soft_topk (SoftTop-k): -log σ(α(s_p + t)) per positive p, t making Σ_{j unmasked} σ(α(s_j + t)) = k.

The soft top-k indicators σ(α(s_j + t)) of a row sum to k; the loss pushes each positive's
indicator towards 1. t is found per row (bisection on the dense matrix; safeguarded Newton over
label chunks) and differentiated implicitly: dt/ds_j = -v_j / Σv with v = α σ'(α(s + t)).
Averaged over each row's positives, then over the rows that have a positive. Options: k (0 < k <
the unmasked entries of every row with a positive) and alpha (> 0, the sharpness).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from dexml.train.losses._reduce import (
    _all_reduce,
    _mean_over_positives,
    _row_max,
    _row_sum,
    _rows_with_positives,
    _sum_over_ranks,
    _zero,
)

BISECTION_STEPS = 60  # halves the bracket below float64 resolution for any realistic score range
HISTOGRAM_BINS = 512  # the chunked form's first bracket of t: about 2 R / 512 wide for |s| <= R


def _check_options(k, alpha):
    if not (k > 0 and alpha > 0):
        raise ValueError(f"soft_topk: k and alpha must be > 0, got k={k}, alpha={alpha}")


def _check_count(count, k):
    bad = count <= k
    if bad.any():
        row = int(bad.nonzero()[0])
        raise ValueError(f"soft_topk: k must satisfy 0 < k < the number of unmasked entries in each "
                         f"row; k={k}, but a row with positives has {int(count[row])} unmasked entries")


def _bracket_margin(count, k, alpha):
    """c with: at t = -max(s) - c every σ < k/n, at t = -min(s) + c every σ > k/n (n kept per row)."""
    return ((count - k) / k).log().abs().add(1.0) / alpha


class _SoftTopkThreshold(torch.autograd.Function):
    """t per row with Σ_{kept j} σ(α(s_j + t)) = k, found by bisection; gradient by implicit
    differentiation: dt/ds_j = -v_j / Σv with v = α σ'(α(s + t))."""

    @staticmethod
    def forward(ctx, s, keep, k, alpha, group):
        count = _row_sum(keep.to(s.dtype), group)
        c = _bracket_margin(count, k, alpha)
        lo = -_row_max(s.masked_fill(~keep, float("-inf")), group) - c
        hi = _row_max(-s.masked_fill(~keep, float("inf")), group) + c
        for _ in range(BISECTION_STEPS):
            t = (lo + hi) / 2
            too_many = _row_sum(torch.where(keep, torch.sigmoid(alpha * (s + t[:, None])), 0.0), group) > k
            hi = torch.where(too_many, t, hi)
            lo = torch.where(too_many, lo, t)
        t = (lo + hi) / 2
        ctx.save_for_backward(s, keep, t)
        ctx.alpha, ctx.group = alpha, group
        return t

    @staticmethod
    def backward(ctx, grad_t):
        s, keep, t = ctx.saved_tensors
        x = ctx.alpha * (s + t[:, None])
        v = torch.where(keep, ctx.alpha * torch.sigmoid(x) * torch.sigmoid(-x), 0.0)
        grad_t = _sum_over_ranks(grad_t, ctx.group)  # every shard's loss terms depend on the shared t
        # Saturated rows (all σ exactly 0 or 1) have Σv = 0: t then does not move, gradient 0.
        sum_v = _row_sum(v, ctx.group).clamp_min(torch.finfo(v.dtype).tiny)
        return -grad_t[:, None] * v / sum_v[:, None], None, None, None, None


def soft_topk(scores, targets, mask=None, k=5, alpha=2.0, group=None):
    """SoftTop-k: -log σ(α(s_p + t)), t making the soft top-k indicators sum to k in every row."""
    _check_options(k, alpha)
    s, pos, keep, num_pos = _rows_with_positives(scores, targets, mask, group)
    if s.shape[0] == 0:
        return _zero(scores)
    _check_count(_row_sum(keep.to(s.dtype), group), k)
    t = _SoftTopkThreshold.apply(s, keep, float(k), float(alpha), group)
    per_entry = torch.where(pos, -F.logsigmoid(alpha * (s + t[:, None])), 0.0)
    return _mean_over_positives(per_entry, num_pos, group)


loss = soft_topk


def _indicator_sums(chunks, t, alpha):
    """Per row, over every kept label (all ranks): F = Σ σ(α(s + t)) and its slope F' = Σ v."""
    sums = torch.zeros(2, chunks.num_rows, dtype=chunks.dtype, device=chunks.q.device)
    for s, _, keep in chunks:
        p = s.add_(t[:, None]).mul_(alpha).sigmoid_().masked_fill_(~keep, 0.0)  # s is this walk's own block
        sums[0] += p.sum(dim=1)
        # p (1 - p) = σ(x) σ(-x) up to p's rounding (<= eps for the few p near 1)
        sums[1] += (p * (1 - p)).sum(dim=1)
    sums[1] *= alpha
    return _all_reduce(sums, chunks.group)


class _ScoreHistogram:
    """Per row, the kept scores counted in HISTOGRAM_BINS equal bins over [-R, R], R a bound on |s|
    (the same on every rank, so the counts add up over ranks). It brackets t to about one bin: with
    every score moved to its bin's top F can only grow, to its bottom only shrink."""

    def __init__(self, chunks):
        self.chunks = chunks
        bound = _all_reduce(chunks.score_bound(), chunks.group, "max").clamp_min(1e-6)
        self.bound, self.width = bound, 2 * bound / HISTOGRAM_BINS
        self.counts = torch.zeros(chunks.num_rows * HISTOGRAM_BINS, dtype=chunks.dtype, device=bound.device)
        self.offset = torch.arange(chunks.num_rows, device=bound.device)[:, None] * HISTOGRAM_BINS

    def add(self, s, keep) -> None:
        bins = ((s + self.bound[:, None]) / self.width[:, None]).floor_().clamp_(0, HISTOGRAM_BINS - 1)
        self.counts.index_add_(0, (bins.long() + self.offset).view(-1), keep.view(-1).to(self.counts.dtype))

    def bracket(self, k, alpha, margin):
        """(lo, hi, t0): a bracket of every row's t and a start inside it."""
        counts = _all_reduce(self.counts, self.chunks.group).view(self.chunks.num_rows, HISTOGRAM_BINS)
        bottoms = -self.bound[:, None] + self.width[:, None] * torch.arange(HISTOGRAM_BINS, device=counts.device)
        outer_lo, outer_hi = -self.bound - margin, self.bound + margin  # every σ below / above k/n

        def root(edges):  # t with Σ counts σ(α(edges + t)) = k, by bisection
            lo, hi = outer_lo.clone(), outer_hi.clone()
            for _ in range(BISECTION_STEPS):
                t = (lo + hi) / 2
                too_many = (counts * torch.sigmoid(alpha * (edges + t[:, None]))).sum(dim=1) > k
                hi, lo = torch.where(too_many, t, hi), torch.where(too_many, lo, t)
            return (lo + hi) / 2

        slack = self.width  # a score on a bin edge may have been counted in the neighbouring bin
        lo = torch.maximum(outer_lo, root(bottoms + self.width[:, None]) - slack)
        hi = torch.minimum(outer_hi, root(bottoms) + slack)
        return lo, hi, root(bottoms + self.width[:, None] / 2).clamp(lo, hi)


def _threshold_over_chunks(chunks, lo, hi, t, k, alpha, counted):
    """Safeguarded Newton on F(t) = k from t, one chunk walk per step: the Newton step where it lands
    inside the bracket [lo, hi] that the signs of F - k keep shrinking, else bisection. Stops when
    every counted row's step is below sqrt(eps) (quadratic convergence: the next would be below
    eps), after BISECTION_STEPS steps at most (the dense bisection's count). Returns t and F'(t) = Σv."""
    tol = torch.finfo(chunks.dtype).eps ** 0.5 / max(1.0, alpha)
    for _ in range(BISECTION_STEPS):
        value, slope = _indicator_sums(chunks, t, alpha)
        too_many = value > k
        hi = torch.where(too_many, t, hi)
        lo = torch.where(too_many, lo, t)
        newton = t - (value - k) / slope
        inside = (newton >= lo) & (newton <= hi)  # False for NaN/inf (a flat F)
        new_t = torch.where(inside, newton, (lo + hi) / 2)
        converged = bool(((new_t - t).abs() <= tol * (1 + t.abs()))[counted].all())
        t = new_t
        if converged:
            break
    # The walk for the gradient's Σv at t also gives one last Newton step (Σv moves by O(step)).
    value, slope = _indicator_sums(chunks, t, alpha)
    newton = t - (value - k) / slope
    return torch.where((newton >= lo) & (newton <= hi), newton, t), slope


def over_chunks(chunks, k=5, alpha=2.0):
    """A walk for a histogram of the scores (bracketing t to about a bin) and the positives' scores,
    then Newton's walks for t (typically 3 to 5). With x = α(s + t), v = α σ(x) σ(-x) and
    a = Σ_p α σ(-x_p) / (n rows): d/ds_j = -pos_j α σ(-x_j) / (n rows) + a v_j / Σv."""
    _check_options(k, alpha)
    k, alpha = float(k), float(alpha)
    group, dtype, device = chunks.group, chunks.dtype, chunks.q.device
    num_pos = _all_reduce(chunks.positives_per_row.clone(), group)
    counted = num_pos > 0
    num_rows = int(counted.sum())
    if num_rows == 0:
        return None, None
    count = _all_reduce(chunks.kept_per_row.clone(), group)
    _check_count(count[counted], k)
    histogram = _ScoreHistogram(chunks)
    pos_rows, pos_scores = [], []
    for s, pos, keep in chunks:
        histogram.add(s, keep)
        rows, cols = pos.nonzero(as_tuple=True)
        pos_rows.append(rows)
        pos_scores.append(s[rows, cols])
    # Rows without a positive (maybe with too few labels) get some bracket too; their t is unused.
    margin = torch.where(counted, _bracket_margin(count.clamp_min(k + 1), k, alpha), 1.0)
    lo, hi, t0 = histogram.bracket(k, alpha, margin)
    t, slope = _threshold_over_chunks(chunks, lo, hi, t0, k, alpha, counted)

    rows, s_pos = torch.cat(pos_rows), torch.cat(pos_scores)
    x_pos = alpha * (s_pos + t[rows])
    sums = torch.zeros(2, chunks.num_rows, dtype=dtype, device=device)
    sums[0].index_add_(0, rows, -F.logsigmoid(x_pos))
    sums[1].index_add_(0, rows, alpha * torch.sigmoid(-x_pos))
    term_sum, pull_sum = _all_reduce(sums, group)
    inv_pos = 1 / num_pos.clamp_min(1)
    loss = (term_sum * inv_pos).sum() / num_rows
    weight = counted.to(dtype) * inv_pos / num_rows
    through_t = pull_sum * weight / slope.clamp_min(torch.finfo(dtype).tiny)  # a / Σv

    def grad_scores(s, pos, keep):
        x = alpha * (s + t[:, None])
        g = torch.where(keep, alpha * torch.sigmoid(x) * torch.sigmoid(-x) * through_t[:, None], 0.0)
        g -= torch.where(pos, alpha * torch.sigmoid(-x) * weight[:, None], 0.0)
        return g

    return loss, grad_scores
