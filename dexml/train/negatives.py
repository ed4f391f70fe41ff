"""Negative modes: which labels a training step scores its queries against (its pool) and which
of them it re-encodes with gradients. One class per `negatives.mode` (the names and help are
`dexml.config.NEGATIVE_MODES`); the training loop only calls

    mode.refresh(model, epoch, step_in_epoch)   # shortlist / label-cache lifecycle
    pool = mode.pool(rows, y_rows, rng)          # this process's shard of the step's pool

Pools are sparse: positives and masked entries are (B, P) CSR matrices, built from the batch's
CSR label rows (no dense B x L array anywhere, in any mode). `train.sample_positives` = b keeps
up to b uniformly drawn positives per query in the loss and masks the others out (b = 0 keeps
them all); the draw comes from the shared numpy RNG, so it is reproducible and the same on
every rank. Under several processes every rank takes a contiguous column shard of the pool.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch

from dexml.config import NEGATIVE_MODES, NegativesParams
from dexml.train import distributed
from dexml.train.retrieval import embed_tokens, top_k


@dataclass
class LabelPool:
    labels: np.ndarray  # (P,) int64 label ids (this rank's shard of the step's pool)
    positives: sp.csr_matrix  # (B, P) bool: positives in the loss
    masked: sp.csr_matrix  # (B, P) bool: left out of the loss (a query's unsampled positives)
    fresh: np.ndarray | None = None  # pool positions encoded with gradients; None = all of them
    table: torch.Tensor | None = None  # (P, d) cached embeddings of every pool label (`cached`)
    # `cached`: the step's (detached, all-rank) query embeddings -> more positions to encode
    # fresh (each query's hardest negatives under the cached scores)
    pick: Callable[[torch.Tensor], np.ndarray] | None = None
    encoded: int = 0  # set by the training step: labels it encoded with gradients

    def fresh_positions(self, queries: torch.Tensor) -> np.ndarray:
        if self.fresh is None:
            return np.arange(len(self.labels))
        if self.pick is None:
            return self.fresh
        return np.union1d(self.fresh, self.pick(queries)).astype(np.int64)


# ---------------------------------------------------------------- positives (PSL)
def sample_positives(y: sp.csr_matrix, beta: int, rng: np.random.Generator) -> np.ndarray:
    """(nnz,) bool over `y`'s stored entries: which positives enter this step's loss. beta = 0:
    all; beta >= 1: up to beta per row, uniformly without replacement (one random key per entry)."""
    if beta == 0 or y.nnz == 0:
        return np.ones(y.nnz, dtype=bool)
    rows = np.repeat(np.arange(y.shape[0]), np.diff(y.indptr))
    keys = rng.random(y.nnz)
    order = np.lexsort((keys, rows))  # by row, then by key
    rank = np.empty(y.nnz, dtype=np.int64)
    rank[order] = np.arange(y.nnz) - y.indptr[rows[order]]
    return rank < beta


def _entries(y: sp.csr_matrix, columns: np.ndarray, keep: np.ndarray, width: int) -> sp.csr_matrix:
    """(B, width) bool CSR with the entries `keep` of y, at pool positions `columns`."""
    rows = np.repeat(np.arange(y.shape[0]), np.diff(y.indptr))[keep]
    indptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=y.shape[0]))])
    return sp.csr_matrix((np.ones(len(rows), dtype=bool), columns[keep], indptr), shape=(y.shape[0], width))


def _clean(y: sp.csr_matrix) -> sp.csr_matrix:
    y = y.tocsr()
    if not y.has_canonical_format or (y.data == 0).any():
        y = y.copy()
        y.eliminate_zeros()
        y.sum_duplicates()
    return y


def build_pool(mode: str, y_batch: sp.csr_matrix, rng: np.random.Generator, sample_positives_per_row: int,
               shortlist_rows: np.ndarray | None = None, num_hard: int = 0) -> LabelPool:
    """The whole (unsharded) pool of one batch whose label rows are `y_batch` (B x L), for the
    modes whose pool is a set of labels encoded entirely with gradients (all, in-batch, hard)."""
    y = _clean(y_batch)
    num_labels = y.shape[1]
    keep = sample_positives(y, sample_positives_per_row, rng)
    if mode == "all":
        labels = np.arange(num_labels, dtype=np.int64)
    elif mode == "in-batch":  # the positives in this step's loss (as CachedMNRL: each query's are the others' negatives)
        labels = np.unique(y.indices[keep]).astype(np.int64)
    elif mode == "hard":
        hard = sample_hard(shortlist_rows, num_hard, rng) if shortlist_rows is not None else np.zeros(0, np.int64)
        labels = np.unique(np.concatenate([y.indices[keep], hard])).astype(np.int64)
    else:
        raise ValueError(f"build_pool: mode {mode!r} is not one of all, in-batch, hard")
    columns = np.minimum(np.searchsorted(labels, y.indices), max(len(labels) - 1, 0))
    in_pool = (labels[columns] == y.indices) if len(labels) else np.zeros(y.nnz, bool)
    # A query's positives not drawn this step are masked where they are in the pool (another
    # query's positive or a hard negative): never a negative for their own query.
    return LabelPool(labels, _entries(y, columns, keep, len(labels)), _entries(y, columns, ~keep & in_pool, len(labels)))


def shard(pool: LabelPool, rank: int, world: int) -> LabelPool:
    """Rank `rank`'s contiguous column shard of a pool (every row), of `world` shards."""
    if world == 1:
        return pool
    lo, hi = shard_bounds(len(pool.labels), rank, world)
    fresh = None if pool.fresh is None else pool.fresh[(pool.fresh >= lo) & (pool.fresh < hi)] - lo
    return LabelPool(pool.labels[lo:hi], pool.positives[:, lo:hi], pool.masked[:, lo:hi], fresh,
                     None if pool.table is None else pool.table[lo:hi], pool.pick)


def shard_bounds(n: int, rank: int, world: int) -> tuple[int, int]:
    """[lo, hi) of shard `rank` when n columns are split into `world` contiguous parts
    (np.array_split's sizes: they differ by at most one)."""
    base, extra = divmod(n, world)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (rank < extra)


def sample_hard(shortlist_rows: np.ndarray, num_hard: int, rng: np.random.Generator) -> np.ndarray:
    """Per row, up to `num_hard` distinct entries of its shortlist (-1 = empty slot), uniformly."""
    keys = rng.random(shortlist_rows.shape)
    keys[shortlist_rows < 0] = np.inf  # empty slots sort last
    order = np.argsort(keys, axis=1)[:, :num_hard]
    picked = np.take_along_axis(shortlist_rows, order, axis=1)
    return picked[picked >= 0]


def build_shortlist(query_emb, label_emb, y: sp.csr_matrix, size: int) -> np.ndarray:
    """(n, size) int64: each query's top labels by inner product, its positives removed (-1 pads)."""
    q, lab = torch.as_tensor(np.asarray(query_emb, dtype=np.float32)), torch.as_tensor(np.asarray(label_emb, dtype=np.float32))
    _, ids = top_k(q, lab, size, exclude=y)
    out = np.full((len(q), size), -1, dtype=np.int64)
    out[:, :ids.shape[1]] = ids.cpu().numpy()
    return out


# ---------------------------------------------------------------- the modes
@dataclass
class Setup:
    """What a mode needs from the run: settings, texts, the training rows and where to compute."""

    negatives: NegativesParams
    sample_positives: int
    num_labels: int
    label_tok: object  # TokenizedTexts of every label
    query_tok: object  # TokenizedTexts of the training split
    train_rows: np.ndarray  # the training rows a shortlist covers
    y: sp.csr_matrix  # the training split's label matrix
    device: torch.device
    autocast: Callable = contextlib.nullcontext
    ctx: distributed.Context | None = None

    def __post_init__(self):
        if self.ctx is None:
            self.ctx = distributed.Context(self.device)


class NegativeMode:
    """A pool of labels per step; `refresh` is called before every step."""

    name = ""

    def __init__(self, setup: Setup):
        self.s = setup

    def refresh(self, model, epoch: int, step_in_epoch: int) -> None:
        pass

    def diagnostics(self) -> dict:
        """What the mode measured about itself (train.json's "negatives")."""
        return {}

    def pool(self, rows: np.ndarray, y_rows: sp.csr_matrix, rng: np.random.Generator) -> LabelPool:
        whole = build_pool(self.name, y_rows, rng, self.s.sample_positives, self._shortlist(rows),
                           self.s.negatives.num_hard)
        return shard(whole, self.s.ctx.rank, self.s.ctx.world)

    def _shortlist(self, rows):
        return None


class AllLabels(NegativeMode):
    name = "all"


class InBatch(NegativeMode):
    name = "in-batch"


class Hard(NegativeMode):
    """Positives + num_hard negatives per query from its shortlist (top labels of the model of
    the last refresh, computed on rank 0 and broadcast), rebuilt every refresh_every epochs."""

    name = "hard"

    def __init__(self, setup: Setup):
        super().__init__(setup)
        self.shortlist = None
        self.position = {int(r): i for i, r in enumerate(setup.train_rows)}

    def refresh(self, model, epoch: int, step_in_epoch: int) -> None:
        if step_in_epoch != 0 or (self.shortlist is not None and epoch % self.s.negatives.refresh_every):
            return
        s = self.s
        self.shortlist = s.ctx.from_main(lambda: self._compute(model), (len(s.train_rows), s.negatives.shortlist),
                                         np.int64)

    def _compute(self, model) -> np.ndarray:
        s = self.s
        was_training = model.training
        model.eval()
        qe = embed_tokens(model.encode_queries, s.query_tok, s.train_rows, s.device, autocast=s.autocast)
        le = embed_tokens(model.encode_labels, s.label_tok, np.arange(len(s.label_tok)), s.device, autocast=s.autocast)
        model.train(was_training)
        return build_shortlist(qe, le, s.y[s.train_rows], s.negatives.shortlist)

    def _shortlist(self, rows):
        return self.shortlist[[self.position[int(r)] for r in rows]]


class Cached(NegativeMode):
    """Every label in every step's loss, through a table of all label embeddings (this rank's
    label shard) that is refreshed by a no-grad, eval-mode encode at each epoch start and every
    refresh_steps steps. Each step re-encodes with gradients only the queries' sampled positives,
    per query its num_hard best-scoring negatives under the cached table (+ num_random uniform
    ones); the step puts their fresh embeddings in place of their cached rows for that step only
    (never written back), so the other columns are stale and give gradients to the query side."""

    name = "cached"

    def __init__(self, setup: Setup):
        super().__init__(setup)
        self.lo, self.hi = shard_bounds(setup.num_labels, setup.ctx.rank, setup.ctx.world)
        self.table: torch.Tensor | None = None
        self.model = None
        self.refreshes = 0
        self.steps_since = 0  # steps since the last refresh
        self.last_queries: torch.Tensor | None = None  # the last step's queries (staleness diagnostic)
        self.staleness: list[dict] = []

    @torch.no_grad()
    def refresh(self, model, epoch: int, step_in_epoch: int) -> None:
        self.model = model
        if self.table is not None and step_in_epoch % self.s.negatives.refresh_steps:
            return
        s, m = self.s, self.s.negatives.num_hard
        dtype = torch.bfloat16 if s.device.type == "cuda" else torch.float32
        measure = self.table is not None and self.last_queries is not None and len(self.table) > 0
        if self.table is None:
            self.table = torch.empty(self.hi - self.lo, model.meta.dim, dtype=dtype, device=s.device)
        if measure:  # staleness: what the old table found for the last batch, before it is overwritten
            _, before = top_k(self.last_queries, self.table, m, label_chunk=4096)
            cosine = 0.0
        was_training = model.training
        model.eval()  # no dropout noise in the table
        batch = max(256, s.negatives.label_chunk)
        for start in range(self.lo, self.hi, batch):  # in place, a batch at a time: no second table
            ids, mask = s.label_tok.batch(np.arange(start, min(start + batch, self.hi)), s.device)
            with s.autocast():
                emb = model.encode_labels(ids, mask).to(dtype)
            rows = slice(start - self.lo, start - self.lo + len(emb))
            if measure:
                cosine += float(torch.nn.functional.cosine_similarity(self.table[rows].float(), emb.float(), dim=1).sum())
            self.table[rows] = emb
        model.train(was_training)
        if measure:
            _, after = top_k(self.last_queries, self.table, m, label_chunk=4096)
            overlap = np.mean([len(np.intersect1d(x, y)) / max(1, len(y))
                               for x, y in zip(before.cpu().numpy(), after.cpu().numpy())])
            self.staleness.append({"after_steps": self.steps_since, "cosine": round(cosine / len(self.table), 5),
                                   "top_overlap": round(float(overlap), 4)})
        self.steps_since = 0
        self.refreshes += 1

    def diagnostics(self) -> dict:
        if not self.staleness:
            return {"refreshes": self.refreshes}
        return {"refreshes": self.refreshes, "staleness_at_refresh": self.staleness,
                "mean_top_overlap": round(float(np.mean([x["top_overlap"] for x in self.staleness])), 4),
                "mean_cosine": round(float(np.mean([x["cosine"] for x in self.staleness])), 5)}

    def pool(self, rows: np.ndarray, y_rows: sp.csr_matrix, rng: np.random.Generator) -> LabelPool:
        s = self.s
        y = _clean(y_rows)
        keep = sample_positives(y, s.sample_positives, rng)
        if s.negatives.num_random:  # drawn over all labels (same on every rank), kept where they fall here
            extra = rng.integers(0, s.num_labels, size=len(rows) * s.negatives.num_random)
        else:
            extra = np.zeros(0, np.int64)
        in_shard = (y.indices >= self.lo) & (y.indices < self.hi)
        width = self.hi - self.lo
        sub = _entries(y, y.indices - self.lo, in_shard, width)  # every positive in this shard
        keep_mine = keep[in_shard]
        positives = _entries(sub, sub.indices, keep_mine, width)
        masked = _entries(sub, sub.indices, ~keep_mine, width)
        extra = extra[(extra >= self.lo) & (extra < self.hi)] - self.lo
        fresh = np.union1d(positives.indices, extra).astype(np.int64)
        self.steps_since += 1
        return LabelPool(np.arange(self.lo, self.hi, dtype=np.int64), positives, masked, fresh, self.table,
                         lambda q: self._hardest(q, sub))

    def _hardest(self, queries: torch.Tensor, positives: sp.csr_matrix) -> np.ndarray:
        """This shard's positions of each query's num_hard best negatives over all labels (all
        ranks) under the cached table and the current bias."""
        m = self.s.negatives.num_hard
        model, group = self.model, self.s.ctx.group
        self.last_queries = queries.detach()
        bias = None
        if model.label_bias is not None:
            bias = model.label_bias(torch.arange(self.lo, self.hi, device=self.table.device)).detach()
        values, ids = top_k(queries.detach(), self.table, m, scale=1.0 / model.meta.tau, bias=bias, exclude=positives,
                            label_chunk=4096)  # B x 4096 scores at a time
        ids = torch.where(ids >= 0, ids + self.lo, ids)
        if group is not None:  # the global top m: merge every rank's candidates
            pad = m - values.shape[1]
            if pad:
                values = torch.cat([values, values.new_full((len(values), pad), float("-inf"))], 1)
                ids = torch.cat([ids, ids.new_full((len(ids), pad), -1)], 1)
            all_v = [torch.empty_like(values) for _ in range(self.s.ctx.world)]
            all_i = [torch.empty_like(ids) for _ in range(self.s.ctx.world)]
            torch.distributed.all_gather(all_v, values.contiguous(), group=group)
            torch.distributed.all_gather(all_i, ids.contiguous(), group=group)
            values, ids = torch.cat(all_v, 1), torch.cat(all_i, 1)
            best = torch.topk(values, min(m, values.shape[1]), dim=1)
            ids = torch.gather(ids, 1, best.indices).masked_fill(torch.isinf(best.values), -1)
        ids = ids.cpu().numpy().ravel()
        ids = ids[(ids >= self.lo) & (ids < self.hi)]
        return np.unique(ids - self.lo)


MODES = {cls.name: cls for cls in (AllLabels, InBatch, Hard, Cached)}
assert MODES.keys() == NEGATIVE_MODES.keys(), "dexml.config.NEGATIVE_MODES and the mode classes disagree"


def make_mode(setup: Setup) -> NegativeMode:
    return MODES[setup.negatives.mode](setup)
