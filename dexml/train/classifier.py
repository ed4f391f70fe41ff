"""UniDEC's classifier head (Kharbanda et al., arXiv 2405.03714), trained with the dual encoder.

    q_cls = W q + c                 the query projection (W initialised to the identity, c to 0),
                                    applied to the dual encoder's query embedding q, unnormalised
    s_cls(q, l) = q_cls.w_l / tau   w_l: row l of an L x dim table, one free vector per label

The table is initialised from the untrained encoder's label embeddings (`model.classifier_init:
embedding`, so that at step 0 the classifier scores as the dual encoder does) or zeros. Each step
adds `model.classifier_weight` times the same loss over the same label pool, computed from the
classifier's scores, to the dual encoder's loss.

The table is not a torch parameter: a step copies the rows of its pool's labels out of it
(`pool_rows`, leaves that collect the gradient), and `step` applies row-wise Adagrad to exactly
those rows (FBGEMM's "rowwise adagrad": one accumulator per row, the mean of the row's squared
gradients). So the main optimizer (AdamW) never sees the table, there is no dense L x dim
gradient or Adam state (AdamW would add 2 L x dim floats of state, and a dense L x dim gradient,
to the L x dim table), and a step costs O(pool x dim). Its state (`table`, `sum_sq`) is in the
module's buffers, so checkpoints (torch.save of the state dict, `weights_only` loadable) and the
best-model safetensors carry it.

Multi-process: every rank holds the whole table (L x dim floats; the pool's shard of each rank
differs per step, so a fixed label shard per rank would not save the exchange); each rank's
gradient rows are gathered from all ranks and every rank applies the same update, so the tables
stay identical.

Serving: the head folds into the label index (dexml/serve/classifier.py).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

EPS = 1e-8


class ClassifierHead(nn.Module):
    def __init__(self, dim: int, num_labels: int, lr: float = 0.01, table: torch.Tensor | None = None,
                 loss_weight: float = 1.0):
        super().__init__()
        self.loss_weight = float(loss_weight)  # model.classifier_weight
        self.projection = nn.Linear(dim, dim)
        with torch.no_grad():
            self.projection.weight.copy_(torch.eye(dim))
            self.projection.bias.zero_()
        self.register_buffer("table", torch.zeros(num_labels, dim) if table is None else table.float().clone())
        self.register_buffer("sum_sq", torch.zeros(num_labels))  # row-wise Adagrad accumulators
        self.lr = float(lr)
        self._pending: list[tuple[torch.Tensor, torch.Tensor]] = []

    @property
    def num_labels(self) -> int:
        return self.table.shape[0]

    def query(self, q: torch.Tensor) -> torch.Tensor:
        """(B, dim) classifier queries from the dual encoder's query embeddings."""
        return self.projection(q)

    def pool_rows(self, labels) -> torch.Tensor:
        """(P, dim) copies of the table rows of `labels` (label indices) that collect this step's
        gradient; `step` applies it to the table."""
        labels = torch.as_tensor(np.asarray(labels), dtype=torch.long, device=self.table.device)
        rows = self.table[labels].detach().requires_grad_()
        self._pending.append((labels, rows))
        return rows

    def scores(self, q_cls: torch.Tensor, rows: torch.Tensor, tau: float) -> torch.Tensor:
        return q_cls @ rows.T.to(q_cls.dtype) / tau

    def pool_scores(self, q: torch.Tensor, labels, tau: float) -> torch.Tensor:
        """(B, P) classifier scores of the dual encoder's queries `q` against the pool's labels;
        the table rows' gradient is kept for `step`."""
        return self.scores(self.query(q), self.pool_rows(labels), tau)

    @torch.no_grad()
    def init_table(self, label_emb: torch.Tensor) -> None:
        """model.classifier_init: embedding: row l = label l's embedding (the untrained encoder's)."""
        if label_emb.shape != self.table.shape:
            raise ValueError(f"init_table: {tuple(label_emb.shape)} embeddings for a table of "
                             f"{tuple(self.table.shape)}")
        self.table.copy_(label_emb.to(self.table))

    def zero_grad(self) -> None:
        self._pending = []

    @torch.no_grad()
    def step(self, lr_factor: float = 1.0, group=None, grad_scale: float = 1.0) -> int:
        """Row-wise Adagrad on the rows `pool_rows` handed out since the last step; returns how
        many distinct rows changed. lr = self.lr * lr_factor (the training schedule's factor).
        With a process group, every rank's rows are gathered first and all ranks apply the same
        update; `grad_scale` multiplies the gradients (1 / world when each rank's backward gives
        world times its rows' gradient, as dexml's sum-collective losses do)."""
        pending = [(labels, rows.grad) for labels, rows in self._pending if rows.grad is not None]
        self._pending = []
        d = self.table.shape[1]
        labels = torch.cat([lab for lab, _ in pending]) if pending else self.table.new_zeros(0, dtype=torch.long)
        grads = torch.cat([g.float() for _, g in pending]) if pending else self.table.new_zeros(0, d)
        if group is not None:
            labels, grads = _gather(labels, group), _gather(grads, group)
        if not len(labels):
            return 0
        rows, inverse = torch.unique(labels, return_inverse=True)
        grad = torch.zeros(len(rows), d, device=grads.device).index_add_(0, inverse, grads) * grad_scale
        acc = self.sum_sq[rows] + grad.pow(2).mean(dim=1)
        self.sum_sq[rows] = acc
        self.table[rows] -= (self.lr * lr_factor) * grad / (acc.sqrt() + EPS).unsqueeze(1)
        return len(rows)


def _gather(x: torch.Tensor, group) -> torch.Tensor:
    """Every rank's rows of `x` (numbers of rows may differ), concatenated in rank order."""
    world = torch.distributed.get_world_size(group)
    mine = torch.tensor([x.shape[0]], dtype=torch.int64, device=x.device)
    sizes = [torch.empty_like(mine) for _ in range(world)]
    torch.distributed.all_gather(sizes, mine, group=group)
    sizes = [int(s) for s in sizes]
    padded = torch.cat([x, x.new_zeros(max(sizes) - x.shape[0], *x.shape[1:])])
    parts = [torch.empty_like(padded) for _ in range(world)]
    torch.distributed.all_gather(parts, padded.contiguous(), group=group)
    return torch.cat([part[:n] for part, n in zip(parts, sizes)])
