"""The paper's losses (Gupta et al., "Dual-Encoders for Extreme Multi-Label Classification", ICLR 2024).

Every loss is `f(scores, targets, mask=None, **opts) -> scalar tensor`:
- `scores`  (B, N) float, already divided by the temperature tau;
- `targets` (B, N), entries > 0 mark positives;
- `mask`    optional (B, N) bool, True = leave the entry out entirely (neither positive nor negative).
Except `bce`, a loss averages over each row's positives, then over the rows that have at least one
positive (rows without one contribute nothing). Work is done in float32 (float64 for float64 input),
so bfloat16 scores give float32-accurate losses and bfloat16 gradients.

Sharding the label axis: every reduction over labels goes through `_row_sum` / `_row_logsumexp`,
which take an optional torch.distributed process group (None = this process only). With a group,
each rank passes its own column shard (same rows everywhere) and every rank gets the same, global
loss; as with any differentiable all_reduce, backward on every rank gives each shard world_size times
its gradient (DDP's gradient averaging divides that back).
"""
from __future__ import annotations

import functools
import inspect

import torch
import torch.nn.functional as F

from dexml.errors import ConfigError

BISECTION_STEPS = 60  # halves the bracket below float64 resolution for any realistic score range


# --- reductions over the label axis (the only places that would talk to other ranks) -----------------

def _sum_over_ranks(x: torch.Tensor, group=None) -> torch.Tensor:
    """x summed over the ranks of `group` (differentiable); x itself when group is None."""
    if group is None:
        return x
    import torch.distributed.nn.functional as dist_fn

    return dist_fn.all_reduce(x, group=group)


def _row_sum(x: torch.Tensor, group=None) -> torch.Tensor:
    """Σ over the last (label) axis, across the ranks of `group` too."""
    return _sum_over_ranks(x.sum(dim=-1), group)


def _row_max(x: torch.Tensor, group=None) -> torch.Tensor:
    """max over the last axis, across ranks too (not differentiable: only used as a shift/bracket)."""
    if x.shape[-1] == 0:  # a rank's empty shard of a small label pool
        top = x.new_full(x.shape[:-1], float("-inf")).detach()
    else:
        top = x.detach().amax(dim=-1)
    if group is not None:
        torch.distributed.all_reduce(top, op=torch.distributed.ReduceOp.MAX, group=group)
    return top


def _row_logsumexp(x: torch.Tensor, keep: torch.Tensor, group=None) -> torch.Tensor:
    """log Σ_{keep} e^x per row; -inf for a row with nothing kept, with a zero (not NaN) gradient."""
    x = x.masked_fill(~keep, float("-inf"))
    shift = _row_max(x, group)
    shift = shift.masked_fill(~torch.isfinite(shift), 0.0)
    total = _row_sum(torch.exp(x - shift[:, None]), group)
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


# --- the losses -----------------------------------------------------------------------------------

def softmax(scores, targets, mask=None, group=None):
    """InfoNCE: -log(e^{s_p} / Σ_{all unmasked j} e^{s_j}) per positive p."""
    s, pos, keep, num_pos = _rows_with_positives(scores, targets, mask, group)
    if s.shape[0] == 0:
        return _zero(scores)
    log_denominator = _row_logsumexp(s, keep, group)
    per_entry = torch.where(pos, log_denominator[:, None] - s, 0.0)
    return _mean_over_positives(per_entry, num_pos, group)


def decoupled_softmax(scores, targets, mask=None, group=None):
    """-log(e^{s_p} / (e^{s_p} + Σ_{j negative} e^{s_j})): other positives are not competitors."""
    s, pos, keep, num_pos = _rows_with_positives(scores, targets, mask, group)
    if s.shape[0] == 0:
        return _zero(scores)
    log_negatives = _row_logsumexp(s, keep & ~pos, group)
    per_entry = torch.where(pos, torch.logaddexp(s, log_negatives[:, None]) - s, 0.0)
    return _mean_over_positives(per_entry, num_pos, group)


class _SoftTopkThreshold(torch.autograd.Function):
    """t per row with Σ_{kept j} σ(α(s_j + t)) = k, found by bisection; gradient by implicit
    differentiation: dt/ds_j = -v_j / Σv with v = α σ'(α(s + t))."""

    @staticmethod
    def forward(ctx, s, keep, k, alpha, group):
        count = _row_sum(keep.to(s.dtype), group)
        # At t = -max(s) - c every σ < k/n, at t = -min(s) + c every σ > k/n (n kept entries per row).
        c = ((count - k) / k).log().abs().add(1.0) / alpha
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
    if not (k > 0 and alpha > 0):
        raise ValueError(f"soft_topk: k and alpha must be > 0, got k={k}, alpha={alpha}")
    s, pos, keep, num_pos = _rows_with_positives(scores, targets, mask, group)
    if s.shape[0] == 0:
        return _zero(scores)
    count = _row_sum(keep.to(s.dtype), group)
    bad = count <= k
    if bad.any():
        row = int(bad.nonzero()[0])
        raise ValueError(f"soft_topk: k must satisfy 0 < k < the number of unmasked entries in each "
                         f"row; k={k}, but a row with positives has {int(count[row])} unmasked entries")
    t = _SoftTopkThreshold.apply(s, keep, float(k), float(alpha), group)
    per_entry = torch.where(pos, -F.logsigmoid(alpha * (s + t[:, None])), 0.0)
    return _mean_over_positives(per_entry, num_pos, group)


def bce(scores, targets, mask=None, group=None):
    """Binary cross-entropy with logits, the mean over all unmasked entries (every row counts)."""
    s, pos, keep = _prepare(scores, targets, mask)
    per_entry = F.binary_cross_entropy_with_logits(s, pos.to(s.dtype), reduction="none")
    count = _row_sum(keep.to(s.dtype), group).sum()
    if count == 0:
        return _zero(scores)
    return _row_sum(torch.where(keep, per_entry, 0.0), group).sum() / count


LOSSES = {"softmax": softmax, "decoupled_softmax": decoupled_softmax, "soft_topk": soft_topk, "bce": bce}


def get_loss(name: str, **opts):
    """The loss `name` as `f(scores, targets, mask=None)`, with the options it takes from `opts`
    (params carry `k`/`alpha` for every loss; only soft_topk uses them, the others ignore them)."""
    if name not in LOSSES:
        raise ConfigError(f"params key `loss.name`: expected one of {sorted(LOSSES)}, got {name!r}")
    loss = LOSSES[name]
    accepted = inspect.signature(loss).parameters
    return functools.partial(loss, **{key: value for key, value in opts.items() if key in accepted})
