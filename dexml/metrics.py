"""Extreme-classification metrics, defined as in pyxclib (xclib/evaluation/xc_metrics.py).

All values are in percent. Predictions are a sparse score matrix (rows = points, columns =
labels); only stored entries count as predictions (a stored 0 or negative score still is one),
ranked by descending score with ties going to the lower label index. Relevance is binary
(true > 0). Every mean is over ALL rows, rows without true labels included:

    P@k      = #correct in top k / k
    nDCG@k   = DCG@k / IDCG@k,  DCG@k = sum_{j<=k} hit_j / log2(j+1),
               IDCG@k = sum_{i=1}^{min(k,|y|)} 1/log2(i+1);  0 for rows without labels
    R@k      = #correct in top k / |y|;  0 for rows without labels
    PSP@k    = mean_rows(sum_{j<=k} hit_j * ip(l_j) / k) / mean_rows(same for the ideal ranking)
    PSnDCG@k = mean_rows(PSDCG@k / IDCG@k) / mean_rows(ideal PSDCG@k / IDCG@k)

ip = inverse propensity; the ideal ranking puts a row's true labels first, highest ip first.
Like pyxclib, the PS metrics are a ratio of means (not a mean of per-row ratios), and PSnDCG
keeps the count-based IDCG@k in both numerator and denominator.
"""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from dexml.errors import DataError

EVAL_KEYS = ("P@1", "P@3", "P@5", "nDCG@1", "nDCG@3", "nDCG@5", "PSP@1", "PSP@3", "PSP@5",
             "PSnDCG@1", "PSnDCG@3", "PSnDCG@5", "R@10", "R@50", "R@100")


def label_frequencies(train_labels: sp.spmatrix) -> np.ndarray:
    """Training points carrying each label (int64, one per column)."""
    y = sp.csr_matrix(train_labels)
    return np.bincount(y.indices[y.data > 0], minlength=y.shape[1]).astype(np.int64)


def scores_to_csr(scores: np.ndarray, ids: np.ndarray, num_labels: int, dtype=np.float32) -> sp.csr_matrix:
    """Search results (scores, ids), each (n, k), -> CSR (n, num_labels); ids < 0 (no result) dropped.
    Built from arrays, not via COO: a stored score of 0 (or below) still is a prediction."""
    valid = ids >= 0
    indptr = np.concatenate([[0], np.cumsum(valid.sum(axis=1))]).astype(np.int64)
    return sp.csr_matrix((np.asarray(scores)[valid].astype(dtype), ids[valid].astype(np.int64), indptr),
                         shape=(ids.shape[0], num_labels))


def inverse_propensity(train_labels: sp.csr_matrix, a: float = 0.55, b: float = 1.5) -> np.ndarray:
    """Inverse propensities (Jain et al. 2016): 1 + C * (freq + B)^-A, C = (log N - 1)(B + 1)^A.

    N = training points, freq = training points carrying each label. float64, one per label.
    """
    y = sp.csr_matrix(train_labels)
    num_rows = y.shape[0]
    if num_rows == 0:
        raise DataError("inverse_propensity: the training label matrix has no rows")
    freq = label_frequencies(y).astype(np.float64)
    c = (np.log(num_rows) - 1.0) * (b + 1.0) ** a
    return 1.0 + c * (freq + b) ** -a


def _canonical(scores, name: str = "scores") -> sp.csr_matrix:
    """A CSR copy with sorted, unique column indices (duplicates summed) and no NaN."""
    x = sp.csr_matrix(scores, copy=True)
    x.sum_duplicates()  # also sorts indices
    if not np.issubdtype(x.dtype, np.floating):
        x = x.astype(np.float64)
    if x.nnz and np.isnan(x.data).any():
        row = int(np.searchsorted(x.indptr, np.flatnonzero(np.isnan(x.data))[0], side="right") - 1)
        raise DataError(f"{name}: NaN score in row {row}; expected finite scores")
    return x


def _ranked(scores: sp.csr_matrix) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For canonical CSR `scores`: (order, rows, rank) over stored entries, rows grouped in order.

    order sorts entries by (row, -score, label); rank is each sorted entry's 0-based position
    within its row. Indices are sorted within rows and both sorts are stable, so ties keep the
    lower label first.
    """
    counts = np.diff(scores.indptr)
    rows = np.repeat(np.arange(scores.shape[0], dtype=np.int64), counts)
    rank = np.arange(scores.nnz, dtype=np.int64) - scores.indptr[rows]  # position in its row
    width = int(counts.max()) if scores.nnz else 0
    if scores.shape[0] * width > 4 * scores.nnz + scores.shape[0]:
        # rows of very different lengths: one global sort (slower, but no padding blow-up)
        return np.lexsort((-scores.data, rows)), rows, rank
    # rows of similar length (the usual top-K matrices): sort a padded (rows, width) block
    # row-wise, ~6x faster. Padding sorts last: +inf, placed after real entries by stability.
    neg = np.full((scores.shape[0], width), np.inf, dtype=np.float64)
    neg[rows, rank] = -scores.data
    perm = np.argsort(neg, axis=1, kind="stable")
    real = perm < counts[:, None]
    return (scores.indptr[:-1, None] + perm)[real], rows, rank


def top_k(scores: sp.csr_matrix, k: int) -> np.ndarray:
    """(n, k) int64 label indices by descending score (ties -> lower label); -1 pads short rows."""
    if k < 1:
        raise ValueError(f"top_k: k must be >= 1, got {k}")
    x = _canonical(scores)
    order, rows, rank = _ranked(x)
    keep = rank < k
    out = np.full((x.shape[0], k), -1, dtype=np.int64)
    out[rows[keep], rank[keep]] = x.indices[order[keep]]
    return out


def keep_top_k(scores: sp.csr_matrix, k: int) -> sp.csr_matrix:
    """The same scores with only each row's top-k stored entries (ties -> lower label)."""
    x = _canonical(scores)
    order, rows, rank = _ranked(x)
    sel = order[rank < k]
    sel.sort()  # back to CSR order: rows grouped, labels ascending
    return sp.csr_matrix((x.data[sel], x.indices[sel], np.concatenate(
        [[0], np.cumsum(np.minimum(np.diff(x.indptr), k))])), shape=x.shape)


def filter_predictions(scores: sp.csr_matrix, pairs: np.ndarray) -> sp.csr_matrix:
    """Remove the (row, label) pairs (int (m, 2)) from `scores`; absent pairs are ignored."""
    x = _canonical(scores)
    pairs = np.asarray(pairs)
    if pairs.size == 0:
        return x
    if pairs.ndim != 2 or pairs.shape[1] != 2 or not np.issubdtype(pairs.dtype, np.integer):
        raise DataError(f"filter pairs: expected an integer array of shape (m, 2), got {pairs.dtype} {pairs.shape}")
    n, num_labels = x.shape
    bad = (pairs[:, 0] < 0) | (pairs[:, 0] >= n) | (pairs[:, 1] < 0) | (pairs[:, 1] >= num_labels)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise DataError(f"filter pairs: pair {i} (row {pairs[i, 0]}, label {pairs[i, 1]}) is outside "
                        f"the score matrix of shape {x.shape}")
    rows = np.repeat(np.arange(n, dtype=np.int64), np.diff(x.indptr))
    keys = rows * num_labels + x.indices
    keep = ~np.isin(keys, pairs[:, 0].astype(np.int64) * num_labels + pairs[:, 1])
    indptr = np.concatenate([[0], np.cumsum(np.bincount(rows[keep], minlength=n))])
    # rebuilt from a mask, not by zeroing: a stored score of 0 still is a prediction
    return sp.csr_matrix((x.data[keep], x.indices[keep], indptr), shape=x.shape)


def _check_pair(scores, true) -> tuple[sp.csr_matrix, sp.csr_matrix]:
    x = _canonical(scores)
    y = sp.csr_matrix(true, copy=True)
    if x.shape != y.shape:
        raise DataError(f"metrics: score matrix has shape {x.shape}, true label matrix {y.shape}; expected equal shapes")
    y.data = (y.data > 0).astype(np.float64)
    y.eliminate_zeros()
    y.sum_duplicates()
    y.data[:] = 1.0
    return x, y


def _hits(top: np.ndarray, y: sp.csr_matrix) -> np.ndarray:
    """(n, K) bool: is top[i, j] a true label of row i (padding -1 never is)."""
    num_labels = y.shape[1]
    true_keys = np.repeat(np.arange(y.shape[0], dtype=np.int64), np.diff(y.indptr)) * num_labels + y.indices
    pred_keys = np.arange(top.shape[0], dtype=np.int64)[:, None] * num_labels + top
    if len(true_keys) == 0:
        return np.zeros(top.shape, dtype=bool)
    pos = np.minimum(np.searchsorted(true_keys, pred_keys), len(true_keys) - 1)
    return (top >= 0) & (true_keys[pos] == pred_keys)


def _discounts(k: int) -> np.ndarray:
    return 1.0 / np.log2(np.arange(2, k + 2))


def _idcg(num_true: np.ndarray, k: int) -> np.ndarray:
    """(n, k): IDCG@j for j = 1..k per row (0 where a row has no labels)."""
    cum = np.concatenate([[0.0], np.cumsum(_discounts(k))])
    return cum[np.minimum(num_true[:, None], np.arange(1, k + 1)[None, :])]


def _safe_div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.divide(a, b, out=np.zeros(np.broadcast(a, b).shape), where=b > 0)


def precision_recall_at_k(scores, true, max_k: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """P@k and R@k (percent) for k = 1..max_k."""
    x, y = _check_pair(scores, true)
    correct = np.cumsum(_hits(top_k(x, max_k), y), axis=1)
    num_true = np.diff(y.indptr)
    p = (correct / np.arange(1, max_k + 1)).mean(axis=0) * 100
    r = _safe_div(correct, num_true[:, None].astype(np.float64)).mean(axis=0) * 100
    return p, r


def xmc_metrics(scores: sp.csr_matrix, true: sp.csr_matrix, inv_prop: np.ndarray | None,
                ks=(1, 3, 5), recall_ks=(10, 50, 100)) -> dict[str, float]:
    """P@k, nDCG@k, [PSP@k, PSnDCG@k,] R@k in percent, in that order (see module docstring)."""
    x, y = _check_pair(scores, true)
    n, num_labels = y.shape
    kmax = max(max(ks), max(recall_ks))
    top = top_k(x, kmax)
    hits = _hits(top, y)
    num_true = np.diff(y.indptr)
    correct = np.cumsum(hits, axis=1)
    idcg = _idcg(num_true, kmax)
    dcg = np.cumsum(hits * _discounts(kmax), axis=1)
    ndcg = _safe_div(dcg, idcg)
    out: dict[str, float] = {}
    for k in ks:
        out[f"P@{k}"] = correct[:, k - 1].mean() / k * 100
    for k in ks:
        out[f"nDCG@{k}"] = ndcg[:, k - 1].mean() * 100
    if inv_prop is not None:
        ip = np.asarray(inv_prop, dtype=np.float64).ravel()
        if ip.shape != (num_labels,):
            raise DataError(f"metrics: inv_prop has {ip.size} entries, expected one per label ({num_labels})")
        kps = max(ks)
        gain = np.where(hits[:, :kps], ip[top[:, :kps]], 0.0)
        # the best achievable ranking: the row's true labels, highest inverse propensity first
        ideal_top = top_k(sp.csr_matrix((ip[y.indices], y.indices, y.indptr), shape=y.shape), kps)
        ideal_gain = np.where(ideal_top >= 0, ip[ideal_top], 0.0)
        ps, ideal_ps = np.cumsum(gain, axis=1), np.cumsum(ideal_gain, axis=1)
        disc = _discounts(kps)
        psdcg = _safe_div(np.cumsum(gain * disc, axis=1), idcg[:, :kps])
        ideal_psdcg = _safe_div(np.cumsum(ideal_gain * disc, axis=1), idcg[:, :kps])
        for k in ks:  # ratio of means, as pyxclib (the 1/k factors cancel)
            out[f"PSP@{k}"] = _ratio(ps[:, k - 1].mean(), ideal_ps[:, k - 1].mean())
        for k in ks:
            out[f"PSnDCG@{k}"] = _ratio(psdcg[:, k - 1].mean(), ideal_psdcg[:, k - 1].mean())
    recall = _safe_div(correct, num_true[:, None].astype(np.float64))
    for k in recall_ks:
        out[f"R@{k}"] = recall[:, k - 1].mean() * 100
    return {key: float(v) for key, v in out.items()}


def _ratio(a: float, b: float) -> float:
    return a / b * 100 if b > 0 else 0.0


def bucket_shares(scores, true, train_labels, k: int = 5,
                  buckets=("head", "torso", "tail")) -> list[dict]:
    """Share (percent) of the correct top-k predictions whose label is in each frequency bucket.

    Labels are sorted by training frequency (most frequent first, ties -> lower label index)
    and cut into len(buckets) groups holding equal shares of all training label occurrences:
    a label goes to the bucket in which its first occurrence falls on that cumulative scale
    (bucket = floor(len(buckets) * occurrences before it / total)), so a very frequent label
    never straddles two buckets, and labels never seen in training land in the last bucket.
    Returns [{"bucket": name, "share": percent, "labels": labels in the bucket}, ...].
    """
    x, y = _check_pair(scores, true)
    t = sp.csr_matrix(train_labels)
    if t.shape[1] != y.shape[1]:
        raise DataError(f"bucket_shares: training labels have {t.shape[1]} columns, true labels {y.shape[1]}")
    nb = len(buckets)
    freq = label_frequencies(t)
    by_freq = np.lexsort((np.arange(len(freq)), -freq))
    before = np.cumsum(freq[by_freq]) - freq[by_freq]
    total = freq.sum()
    bucket_of = np.empty(len(freq), dtype=np.int64)
    bucket_of[by_freq] = np.minimum(nb * before // max(total, 1), nb - 1) if total else nb - 1
    top = top_k(x, k)
    hit_labels = top[_hits(top, y)]
    correct = np.bincount(bucket_of[hit_labels], minlength=nb)
    labels = np.bincount(bucket_of, minlength=nb)
    return [{"bucket": name, "share": float(_ratio(correct[i], correct.sum())), "labels": int(labels[i])}
            for i, name in enumerate(buckets)]
