"""Losses over the whole label pool without its (B, P) score matrix: label chunk by label chunk.

    loss = pool_loss(name, q, labels, positives, masked, scale=1 / tau, bias=bias, chunk=4096)

is the scalar `LOSSES[name](scale * q @ labels.T + bias, positives, masked, group)` would give, with
the same gradients for q, labels and bias, but it never holds more than one (B, chunk) block of
scores: the forward walks the label chunks collecting a few numbers per row (a streaming
log-sum-exp, sums over the positives, SoftTop-k's threshold), and the backward (a custom autograd
function) walks them again, recomputes each chunk's scores and forms their gradient from those
per-row numbers. Memory O(B x chunk + P x d): the labels and their gradient, nothing B x P.

Each loss module supplies the per-row part as `over_chunks(chunks, **options) -> (loss,
grad_scores)`, where `grad_scores(s, pos, keep)` is d loss / d s for one chunk's scores (None, None:
no row counts, the loss is 0). This module holds what every loss shares: the sparse pool seen one
chunk at a time (`LabelChunks`) and the autograd function.
"""
from __future__ import annotations

import importlib

import numpy as np
import scipy.sparse as sp
import torch

from dexml.config import LOSS_TYPES
from dexml.errors import ConfigError
from dexml.train.losses._reduce import _all_reduce


def check_loss_name(name: str) -> None:
    if name not in LOSS_TYPES:
        raise ConfigError(f"params key `loss.name`: expected one of {list(LOSS_TYPES)}, got {name!r}")


def loss_options(name: str, opts: dict) -> dict:
    """The options in `opts` that loss `name` takes (params carry k/alpha for every loss); an option
    no loss takes is a TypeError, so a misspelt one is not dropped silently."""
    known = {o for row in LOSS_TYPES.values() for o in row.options}
    unknown = sorted(set(opts) - known)
    if unknown:
        raise TypeError(f"unknown loss option(s) {unknown}; the losses take {sorted(known)}")
    return {key: value for key, value in opts.items() if key in LOSS_TYPES[name].options}


class _SparseColumns:
    """A (B, P) boolean sparse matrix as (row, col) pairs sorted by column, cut into dense (B, w)
    column blocks on demand."""

    def __init__(self, matrix: sp.csr_matrix, device):
        coo = matrix.tocsc().tocoo()  # column-major order
        self.rows = torch.from_numpy(coo.row.astype(np.int64)).to(device)
        self.cols = torch.from_numpy(coo.col.astype(np.int64)).to(device)
        self.col_np = coo.col
        self.shape = matrix.shape

    def block(self, start: int, stop: int) -> torch.Tensor:
        lo, hi = np.searchsorted(self.col_np, [start, stop])
        out = torch.zeros(self.shape[0], stop - start, dtype=torch.bool, device=self.rows.device)
        out[self.rows[lo:hi], self.cols[lo:hi] - start] = True
        return out


class _FreshRows:
    """Label rows replaced by fresh embeddings: `rows` (m,) distinct positions in [0, P), `emb` (m, d)."""

    def __init__(self, rows, emb: torch.Tensor, num_labels: int, dtype):
        rows = np.asarray(rows.cpu() if isinstance(rows, torch.Tensor) else rows, dtype=np.int64).reshape(-1)
        if emb.dim() != 2 or emb.shape[0] != len(rows):
            raise ValueError(f"pool_loss: fresh = (rows, emb) needs emb (len(rows), d), got {len(rows)} rows "
                             f"and emb {tuple(emb.shape)}")
        if len(rows) and (rows.min() < 0 or rows.max() >= num_labels or len(np.unique(rows)) != len(rows)):
            raise ValueError(f"pool_loss: fresh rows must be distinct positions in [0, {num_labels})")
        self.order = np.argsort(rows, kind="stable")
        self.sorted_rows = rows[self.order]
        self.emb = emb.detach().to(dtype)
        self.device = emb.device

    def within(self, start: int, stop: int):
        lo, hi = np.searchsorted(self.sorted_rows, [start, stop])
        if lo == hi:
            return None
        cols = torch.from_numpy(self.sorted_rows[lo:hi] - start).to(self.device)
        return cols, torch.from_numpy(self.order[lo:hi]).to(self.device)


def _as_boolean_csr(x, shape, what: str) -> sp.csr_matrix:
    """x (scipy sparse or array-like) as a (B, P) int8 CSR with one stored 1 per true entry."""
    m = sp.csr_matrix(x)
    if m.shape != shape:
        raise ValueError(f"pool_loss: {what} must be (B, P) = {shape} like q @ labels.T, got {m.shape}")
    m = (m != 0).astype(np.int8).tocsr()
    m.sum_duplicates()
    m.eliminate_zeros()
    return m


class LabelChunks:
    """The pool's scores s = scale * q @ labels.T + bias, one (B, chunk) block at a time.

    Iterating gives (s, pos, keep) per chunk: scores in the compute dtype (float64 for float64
    inputs, else float32), positives (unmasked ones only) and kept (unmasked) entries as (B, w) bool.
    `positives_per_row` / `kept_per_row` count this process's columns; `group` is the process group
    the losses reduce over (None: this process holds every label). `fresh` = (rows, emb): the
    embeddings `emb` stand in for the label rows `rows` (see `pool_loss`)."""

    def __init__(self, q, labels, bias, scale: float, positives, masked, chunk: int, group=None, fresh=None):
        self.dtype = torch.float64 if torch.float64 in (q.dtype, labels.dtype) else torch.float32
        self.q = q.detach().to(self.dtype)
        self.labels = labels.detach()
        self._fresh = None if fresh is None else _FreshRows(*fresh, labels.shape[0], self.dtype)
        self.bias = None if bias is None else bias.detach()
        self.scale, self.chunk, self.group = float(scale), int(chunk), group
        self.num_rows, self.num_labels = q.shape[0], labels.shape[0]
        shape = (self.num_rows, self.num_labels)
        pos = _as_boolean_csr(positives, shape, "positives")
        if masked is not None:
            mask = _as_boolean_csr(masked, shape, "masked")
            pos = (pos - pos.multiply(mask)).tocsr()  # a masked positive is no positive
            pos.eliminate_zeros()
            self._mask = _SparseColumns(mask, q.device)
            masked_per_row = np.diff(mask.indptr)
        else:
            self._mask, masked_per_row = None, np.zeros(self.num_rows, np.int64)
        self._pos = _SparseColumns(pos, q.device)
        self.positives_per_row = torch.from_numpy(np.diff(pos.indptr)).to(q.device, self.dtype)
        self.kept_per_row = torch.from_numpy(self.num_labels - masked_per_row).to(q.device, self.dtype)

    def label_block(self, start: int, stop: int) -> torch.Tensor:
        return self.labels[start:stop].to(self.dtype)  # a view when the labels are in the compute dtype

    def fresh_in(self, start: int, stop: int):
        """(columns within the chunk, their fresh embeddings' indices) of the fresh rows in [start, stop)."""
        return None if self._fresh is None else self._fresh.within(start, stop)

    def scores(self, start: int, stop: int, block: torch.Tensor | None = None) -> torch.Tensor:
        block = self.label_block(start, stop) if block is None else block
        if self.bias is None:
            s = (self.q @ block.T).mul_(self.scale)
        else:
            s = torch.addmm(self.bias[start:stop].to(self.dtype)[None], self.q, block.T, alpha=self.scale)
        fresh = self.fresh_in(start, stop)
        if fresh is not None:
            cols, which = fresh
            s[:, cols] = self.q @ self._fresh.emb[which].T * self.scale
            if self.bias is not None:
                s[:, cols] += self.bias[start + cols].to(self.dtype)
        return s

    def score_bound(self) -> torch.Tensor:
        """(B,) bounds on |s| per row over this process's labels: scale |q| max |l| + max |bias|."""
        top_norm = torch.zeros((), dtype=self.dtype, device=self.q.device)
        for start, stop in self.slices():  # blocks: a bf16 table is never converted whole
            top_norm = torch.maximum(top_norm, self.label_block(start, stop).norm(dim=1).amax())
        if self._fresh is not None and len(self._fresh.emb):
            top_norm = torch.maximum(top_norm, self._fresh.emb.norm(dim=1).amax())
        top_bias = 0.0 if self.bias is None or self.num_labels == 0 else self.bias.abs().amax().to(self.dtype)
        return self.scale * self.q.norm(dim=1) * top_norm + top_bias

    def slices(self):
        for start in range(0, self.num_labels, self.chunk):
            yield start, min(start + self.chunk, self.num_labels)

    def keep(self, start: int, stop: int) -> torch.Tensor:
        if self._mask is None:
            return torch.ones(self.num_rows, stop - start, dtype=torch.bool, device=self.q.device)
        return ~self._mask.block(start, stop)

    def __iter__(self):
        for start, stop in self.slices():
            yield self.scores(start, stop), self._pos.block(start, stop), self.keep(start, stop)


class _PoolLoss(torch.autograd.Function):
    """The loss of `over_chunks` on `chunks`; backward walks the chunks again (see the module doc)."""

    @staticmethod
    def forward(ctx, q, labels, bias, fresh_emb, chunks: LabelChunks, over_chunks, opts: dict):
        loss, grad_scores = over_chunks(chunks, **opts)
        ctx.chunks, ctx.grad_scores = chunks, grad_scores
        ctx.save_for_backward(q, labels, bias, fresh_emb)  # only so that autograd's in-place checks see them
        ctx.dtypes = (q.dtype, labels.dtype, None if bias is None else bias.dtype,
                      None if fresh_emb is None else fresh_emb.dtype)
        if loss is None:  # no row counts: a zero loss whose gradients are zero, as the dense losses
            return torch.zeros((), dtype=torch.float32, device=q.device)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        ctx.saved_tensors  # noqa: B018  (raises if an input was modified in place since the forward)
        c, grad_scores = ctx.chunks, ctx.grad_scores
        want_q, want_labels, want_bias, want_fresh = ctx.needs_input_grad[:4]
        q_dtype, labels_dtype, bias_dtype, fresh_dtype = ctx.dtypes
        device = c.q.device
        grad_q = torch.zeros_like(c.q) if want_q else None
        in_place = labels_dtype == c.dtype and grad_scores is not None  # mm writes every row of it below
        grad_labels = ((torch.empty if in_place else torch.zeros)(c.labels.shape, dtype=labels_dtype, device=device)
                       if want_labels else None)
        grad_bias = torch.zeros(c.num_labels, dtype=bias_dtype, device=device) if want_bias else None
        grad_fresh = torch.zeros_like(c._fresh.emb) if want_fresh else None
        if grad_scores is not None and (want_q or want_labels or want_bias or want_fresh):
            # Every rank's loss is the same global loss: as through a differentiable all_reduce,
            # each shard's gradient is the sum over the ranks of their incoming gradients.
            g = _all_reduce(grad_loss.detach().to(c.dtype).reshape(1).clone(), c.group)[0]
            for start, stop in c.slices():
                block = c.label_block(start, stop)
                s = c.scores(start, stop, block)
                ds = grad_scores(s, c._pos.block(start, stop), c.keep(start, stop)).mul_(g)  # d loss / d s
                if want_bias:
                    grad_bias[start:stop] = ds.sum(dim=0).to(bias_dtype)
                ds.mul_(c.scale)  # d loss / d (q l^T)
                fresh = c.fresh_in(start, stop)
                if fresh is not None:  # those columns' label vectors are the fresh embeddings
                    cols, which = fresh
                    ds_fresh = ds[:, cols]
                    ds[:, cols] = 0.0  # the table rows they stand in for get no gradient
                    if want_q:
                        grad_q.addmm_(ds_fresh, c._fresh.emb[which])
                    if want_fresh:
                        grad_fresh[which] = ds_fresh.T @ c.q
                if want_q:
                    grad_q.addmm_(ds, block)
                if want_labels and in_place:
                    torch.mm(ds.T, c.q, out=grad_labels[start:stop])
                elif want_labels:
                    grad_labels[start:stop] = (ds.T @ c.q).to(labels_dtype)
        if grad_q is not None:
            grad_q = grad_q.to(q_dtype)
        if grad_fresh is not None:
            grad_fresh = grad_fresh.to(fresh_dtype)
        return grad_q, grad_labels, grad_bias, grad_fresh, None, None, None


def pool_loss(name: str, q: torch.Tensor, labels: torch.Tensor, positives, masked=None, *, scale: float,
              bias: torch.Tensor | None = None, chunk: int = 4096, group=None, fresh=None, **opts) -> torch.Tensor:
    """Loss `name` of queries `q` (B, d) against the pool's `labels` (P, d), never materialising B x P.

    The scores are s = scale * q @ labels.T + bias (scale = 1 / tau; bias: optional (P,) per-label
    offsets). `positives` and `masked` are (B, P) boolean sparse matrices (scipy CSR): the pool's
    positives and the entries left out of the loss entirely (masked=None: none). Returns what
    `LOSSES[name](s, positives, masked, group)` returns, with the same gradients for q, labels and bias
    (for those that require grad), computed `chunk` labels at a time. With a process group each rank
    passes its own label shard (labels, bias, positives' and masked's columns) and every row of q.
    Options (k, alpha for soft_topk) as for `get_loss`.

    fresh = (rows, emb), optional: `emb` (m, d) stands in for the label rows `rows` (m distinct
    positions in [0, P)), as if `labels[rows] = emb` — a cached label table (`labels`, no grad) with
    the step's freshly encoded labels. `emb` gets its gradient (O(m x d)); the rows it replaces get
    none, and the table needs neither a copy nor a P x d gradient."""
    check_loss_name(name)
    opts = loss_options(name, opts)
    if q.dim() != 2 or labels.dim() != 2 or labels.shape[1] != q.shape[1]:
        raise ValueError(f"pool_loss: expected q (B, d) and labels (P, d), got {tuple(q.shape)} and "
                         f"{tuple(labels.shape)}")
    if bias is not None and tuple(bias.shape) != (labels.shape[0],):
        raise ValueError(f"pool_loss: bias must be (P,) = ({labels.shape[0]},), got {tuple(bias.shape)}")
    if chunk < 1:
        raise ValueError(f"pool_loss: chunk must be a positive number of labels, got {chunk}")
    over_chunks = importlib.import_module(LOSS_TYPES[name].module).over_chunks
    chunks = LabelChunks(q, labels, bias, scale, positives, masked, chunk, group, fresh)
    return _PoolLoss.apply(q, labels, bias, None if fresh is None else fresh[1], chunks, over_chunks, opts)
