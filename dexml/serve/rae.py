"""Retrieval-augmented prediction (as in RAE-XMC, Wang et al. 2025): the dual encoder's label
scores mixed with the labels of the nearest training queries. No trainable parameters.

The bundle's memory: the training queries' embeddings x_i (a second faiss index, built by the
index stage with the same ONNX query encoder) and their label rows Y (n_train x L, binary).
For a query q, with K = rae.k, temperature T and weight lambda:

    labels      the top-K labels by s_l (the label index's inner product: q.l, or with a
                per-label bias q.l + tau * b_l = tau * the model's logit), and
                p_l = exp(s_l / T) / sum_{j in top K} exp(s_j / T);  p_l = 0 outside the top K
    neighbours  the top-K training queries by s_i = q.x_i, w_i = exp(s_i / T) / sum_j exp(s_j / T)
                over those K, and m_l = sum_i w_i * Y_il  (the neighbours' weighted label vote)
    score       f_l = (1 - lambda) * p_l + lambda * m_l

for every candidate: the top-K labels and each label of the K neighbours (other labels score
nothing). Both sides are probabilities, so one temperature serves both; T = tau reproduces the
model's own softmax on the label side. lambda = 0 ranks as the dual encoder (within its top K),
lambda = 1 is kNN label voting. lambda and T are chosen on held-out training queries by the
evaluate stage (`tune`); those queries are in the memory, so each is removed from its own
neighbours first (`exclude_self`, leave-one-out).

Everything here takes search results as numpy arrays (from faiss or an exact search in torch):
importing this module needs neither faiss nor torch.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from dexml import metrics
from dexml.config import MAX_K
from dexml.errors import BundleError
from dexml.progress import bar


@dataclass(frozen=True)
class RaeSettings:
    lam: float  # weight of the neighbours' labels
    temperature: float
    k: int  # labels and training queries retrieved per query

    def to_dict(self) -> dict:
        return {"lambda": self.lam, "temperature": self.temperature, "k": self.k}

    @classmethod
    def from_dict(cls, d, where: str) -> "RaeSettings":
        """From {"lambda", "temperature", "k"} (the manifest's `rae`); `where` names the source."""
        try:
            lam, temperature, k = float(d["lambda"]), float(d["temperature"]), int(d["k"])
        except (TypeError, KeyError, ValueError):
            raise BundleError(f"{where}: expected `rae` as {{\"lambda\": 0..1, \"temperature\": > 0, "
                              f"\"k\": 1..{MAX_K}}}, got {d!r}") from None
        if not (0 <= lam <= 1 and temperature > 0 and 1 <= k <= MAX_K):
            raise BundleError(f"{where}: rae settings out of range: lambda {lam} (0..1), temperature "
                              f"{temperature} (> 0), k {k} (1..{MAX_K})")
        return cls(lam, temperature, k)


def softmax_rows(scores: np.ndarray, ids: np.ndarray, temperature: float) -> np.ndarray:
    """Row softmax of scores / T (float64) over the valid entries (id >= 0); others get 0."""
    s = np.where(ids >= 0, np.asarray(scores, dtype=np.float64) / temperature, -np.inf)
    top = s.max(axis=1, keepdims=True)
    e = np.exp(s - np.where(np.isfinite(top), top, 0.0))
    total = e.sum(axis=1, keepdims=True)
    return np.divide(e, total, out=np.zeros_like(e), where=total > 0)


def _csr(values: np.ndarray, ids: np.ndarray, num_cols: int) -> sp.csr_matrix:
    """(n, K) values at (n, K) column ids -> CSR (n, num_cols), float64; ids < 0 dropped, zeros
    kept, repeated ids summed."""
    out = metrics.scores_to_csr(values, ids, num_cols, dtype=np.float64)
    out.sum_duplicates()
    return out


def label_probabilities(label_scores, label_ids, temperature: float, num_labels: int) -> sp.csr_matrix:
    """p (n x L): softmax of the retrieved labels' scores / T."""
    return _csr(softmax_rows(label_scores, label_ids, temperature), label_ids, num_labels)


def memory_scores(nb_scores, nb_ids, memory_labels: sp.csr_matrix, temperature: float) -> sp.csr_matrix:
    """m (n x L): the neighbours' label rows weighted by softmax(s_i / T)."""
    w = _csr(softmax_rows(nb_scores, nb_ids, temperature), nb_ids, memory_labels.shape[0])
    return (w @ memory_labels).tocsr()


def mix(p: sp.csr_matrix, m: sp.csr_matrix, lam: float) -> sp.csr_matrix:
    """(1 - lam) p + lam m over the union of both patterns (a candidate scoring 0 stays one)."""
    p, m = p.tocoo(), m.tocoo()
    data = np.concatenate([(1.0 - lam) * p.data, lam * m.data])
    rows, cols = np.concatenate([p.row, m.row]), np.concatenate([p.col, m.col])
    return sp.csr_matrix((data, (rows, cols)), shape=p.shape)  # duplicates summed


def rae_scores(label_scores, label_ids, nb_scores, nb_ids, memory_labels: sp.csr_matrix,
               lam: float, temperature: float) -> sp.csr_matrix:
    """f (n x L, float64) over the candidates; see the module docstring."""
    num_labels = memory_labels.shape[1]
    p = label_probabilities(label_scores, label_ids, temperature, num_labels)
    return mix(p, memory_scores(nb_scores, nb_ids, memory_labels, temperature), lam)


def top_k_arrays(scores: sp.csr_matrix, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row's top k as (scores float32, ids int64), each (n, min(k, labels)), best first,
    ties -> lower label; short rows padded with -inf / -1 (as Predictor.search)."""
    x = sp.csr_matrix(scores)
    x.sum_duplicates()  # sorts the column indices, which the lookup below needs
    ids = metrics.top_k(x, min(k, x.shape[1]))  # no k allocates beyond the label count
    n, num_labels = x.shape
    keys = np.repeat(np.arange(n, dtype=np.int64), np.diff(x.indptr)) * num_labels + x.indices
    wanted = np.arange(n, dtype=np.int64)[:, None] * num_labels + ids
    pos = np.minimum(np.searchsorted(keys, wanted), max(len(keys) - 1, 0))
    vals = np.where(ids >= 0, x.data[pos] if len(keys) else 0.0, -np.inf).astype(np.float32)
    return vals, ids


def exclude_self(nb_scores: np.ndarray, nb_ids: np.ndarray, own_rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Leave-one-out: from K+1 neighbours per query (training row `own_rows[i]`), drop the query
    itself, or the last neighbour where it was not retrieved -> K neighbours."""
    drop = nb_ids == np.asarray(own_rows)[:, None]
    first = drop & (np.cumsum(drop, axis=1) == 1)
    missing = ~first.any(axis=1)
    first[missing, -1] = True
    n, width = nb_ids.shape
    keep = ~first
    return nb_scores[keep].reshape(n, width - 1), nb_ids[keep].reshape(n, width - 1)


def rows_filter(pairs: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """The (row, label) filter pairs of the given rows, renumbered to positions in `rows`."""
    pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    pos = np.full(int(max(pairs[:, 0].max(initial=-1), rows.max(initial=-1))) + 1, -1, dtype=np.int64)
    pos[rows] = np.arange(len(rows))
    keep = pos[pairs[:, 0]] >= 0
    return np.stack([pos[pairs[keep, 0]], pairs[keep, 1]], axis=1)


def tune(label_scores, label_ids, nb_scores, nb_ids, memory_labels: sp.csr_matrix, y_true: sp.csr_matrix,
         inv_prop: np.ndarray | None, lambdas, temperatures, metric: str = "P@5",
         filter_pairs: np.ndarray | None = None, progress: str | None = None) -> tuple[dict, list[dict]]:
    """Grid search of (lambda, T) on validation queries (their search results and true labels,
    neighbours already without themselves). Returns (best row, all rows); each row holds
    lambda, temperature and the metrics. Ties go to the smaller lambda, then the smaller T.
    lambda = 0 ranks as the dual encoder alone whatever T, so it is scored once."""
    num_labels = memory_labels.shape[1]
    pairs = np.zeros((0, 2), np.int64) if filter_pairs is None else filter_pairs
    parts = {t: (label_probabilities(label_scores, label_ids, t, num_labels),
                 memory_scores(nb_scores, nb_ids, memory_labels, t)) for t in sorted(temperatures)}
    grid = [(lam, t) for lam in sorted(set(lambdas)) for t in (sorted(temperatures)[:1] if lam == 0
                                                                 else sorted(temperatures))]
    rows = []
    with bar(len(grid), progress, unit="setting") as shown:
        for lam, t in grid:
            p, m = parts[t]
            scores = metrics.filter_predictions(mix(p, m, lam), pairs)
            rows.append({"lambda": lam, "temperature": t, **metrics.xmc_metrics(scores, y_true, inv_prop)})
            shown.update()
    best = max(rows, key=lambda r: r[metric])  # max keeps the first of equal rows
    return best, rows
