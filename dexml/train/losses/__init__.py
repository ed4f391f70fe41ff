"""The paper's losses (Gupta et al., "Dual-Encoders for Extreme Multi-Label Classification", ICLR 2024).

One loss, one module (its formula in the module's docstring), registered in `dexml.config.LOSS_TYPES`
(the table the config checks, the error messages and the docs come from). Each module defines
- `loss(scores, targets, mask=None, group=None, **options)`, the dense form:
  `scores` (B, N) float, already divided by the temperature tau; `targets` (B, N), entries > 0 mark
  positives; `mask` optional (B, N) bool, True = leave the entry out entirely (neither positive nor
  negative); and
- `over_chunks(chunks, **options)`, the same loss over label chunks, for `pool_loss` (chunked.py),
  which never materialises the (B, N) scores.
Except `bce`, a loss averages over each row's positives, then over the rows that have at least one
positive (rows without one contribute nothing). Work is done in float32 (float64 for float64 input),
so bfloat16 scores give float32-accurate losses and bfloat16 gradients.

Sharding the label axis: every reduction over labels goes through `_reduce`, which takes an optional
torch.distributed process group (None = this process only). With a group, each rank passes its own
column shard (same rows everywhere) and every rank gets the same, global loss; as with any
differentiable all_reduce, backward on every rank gives each shard world_size times its gradient
(DDP's gradient averaging divides that back).
"""
from __future__ import annotations

import functools

from dexml.config import LOSS_TYPES
from dexml.train.losses import bce as _bce
from dexml.train.losses import decoupled_softmax as _decoupled_softmax
from dexml.train.losses import soft_topk as _soft_topk
from dexml.train.losses import softmax as _softmax
from dexml.train.losses.chunked import check_loss_name, loss_options, pool_loss

_MODULES = {m.__name__: m for m in (_softmax, _decoupled_softmax, _soft_topk, _bce)}
# name -> the dense loss, resolved through the table
LOSSES = {name: _MODULES[row.module].loss for name, row in LOSS_TYPES.items()}

softmax, decoupled_softmax, soft_topk, bce = (LOSSES[n] for n in ("softmax", "decoupled_softmax", "soft_topk", "bce"))
BISECTION_STEPS = _soft_topk.BISECTION_STEPS

__all__ = ["LOSSES", "bce", "decoupled_softmax", "get_loss", "pool_loss", "soft_topk", "softmax"]


def get_loss(name: str, **opts):
    """The loss `name` as `f(scores, targets, mask=None, group=None)`, with the options it takes from
    `opts` (params carry `k`/`alpha` for every loss; only soft_topk uses them, the others ignore them)."""
    check_loss_name(name)
    return functools.partial(LOSSES[name], **loss_options(name, opts))
