"""XMC metrics against hand-computed toy cases and a per-row reference written from pyxclib's definitions."""
from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse as sp

from dexml.errors import DataError
from dexml.metrics import (
    EVAL_KEYS,
    bucket_shares,
    filter_predictions,
    inverse_propensity,
    keep_top_k,
    precision_recall_at_k,
    top_k,
    xmc_metrics,
)


def csr(rows: list[dict[int, float]], num_labels: int) -> sp.csr_matrix:
    """A CSR matrix from one {label: value} dict per row (values stored as given, zeros too)."""
    r = [i for i, row in enumerate(rows) for _ in row]
    c = [j for row in rows for j in row]
    v = [x for row in rows for x in row.values()]
    return sp.csr_matrix((np.asarray(v, float), (np.asarray(r, int), np.asarray(c, int))), shape=(len(rows), num_labels))


# Three points, six labels. Row 1 has a tie (labels 1 and 5) and only 3 predictions;
# row 2 has no true labels and a single prediction.
SCORES = csr([{0: .9, 1: .8, 2: .7, 3: .1, 4: .05}, {5: .5, 1: .5, 3: .2}, {0: 1.0}], 6)
TRUE = csr([{0: 1, 2: 1}, {1: 1, 4: 1}, {}], 6)
IDCG2 = 1 + 1 / math.log2(3)  # two true labels


def test_inverse_propensity_matches_formula_by_hand():
    # 4 training points; label frequencies 4, 1, 0 (a relevance of 2 counts once, an explicit 0 not at all)
    y = csr([{0: 1, 1: 2}, {0: 1}, {0: 1, 2: 0}, {0: 1}], 3)
    ip = inverse_propensity(y, a=0.55, b=1.5)
    c = (math.log(4) - 1) * 2.5 ** 0.55
    assert ip.dtype == np.float64
    np.testing.assert_allclose(ip, [1 + c * 5.5 ** -0.55, 1 + c * 2.5 ** -0.55, 1 + c * 1.5 ** -0.55])
    np.testing.assert_allclose(ip[0], 1.2503721, rtol=1e-6)  # evaluated separately
    assert ip[2] > ip[1] > ip[0]  # rarer labels weigh more
    with pytest.raises(DataError, match="no rows"):
        inverse_propensity(sp.csr_matrix((0, 3)))


def test_top_k_ties_padding_and_stored_zeros():
    s = csr([{4: .5, 2: .5, 7: .9, 1: .5}, {3: 0.0, 6: -1.0}, {}], 8)
    np.testing.assert_array_equal(top_k(s, 3), [[7, 1, 2], [3, 6, -1], [-1, -1, -1]])
    assert top_k(s, 5).dtype == np.int64
    # rows of very different lengths take the other sorting path; same answer
    wide = sp.vstack([s, csr([{j: 1.0 for j in range(8)}] * 1, 8)] + [csr([{}], 8)] * 20).tocsr()
    np.testing.assert_array_equal(top_k(wide, 3)[:3], top_k(s, 3))
    np.testing.assert_array_equal(top_k(wide, 3)[3], [0, 1, 2])
    kept = keep_top_k(s, 2)
    assert kept[0].indices.tolist() == [1, 7] and kept[0, 7] == .9 and kept[1].indices.tolist() == [3, 6]
    assert kept[2].nnz == 0
    np.testing.assert_array_equal(top_k(kept, 2), top_k(s, 2))


def test_top_k_rejects_nan_naming_the_row():
    with pytest.raises(DataError, match="row 1"):
        top_k(csr([{0: 1.0}, {2: float("nan")}], 3), 2)


def test_filter_predictions_removes_pairs_explicitly():
    s = csr([{0: .9, 1: 0.0}, {0: .3, 2: .1}], 3)
    out = filter_predictions(s, np.array([[0, 0], [1, 2], [1, 1]]))  # (1, 1) is not predicted: ignored
    np.testing.assert_array_equal(top_k(out, 2), [[1, -1], [0, -1]])  # stored 0 at (0, 1) survives
    assert out.nnz == 2
    assert filter_predictions(s, np.zeros((0, 2), np.int64)).nnz == 4
    with pytest.raises(DataError, match=r"row 2, label 0"):
        filter_predictions(s, np.array([[2, 0]]))
    with pytest.raises(DataError, match=r"shape \(m, 2\)"):
        filter_predictions(s, np.array([1, 2, 3]))


def test_precision_ndcg_recall_by_hand():
    m = xmc_metrics(SCORES, TRUE, None, ks=(1, 3, 5), recall_ks=(3, 5))
    assert list(m) == ["P@1", "P@3", "P@5", "nDCG@1", "nDCG@3", "nDCG@5", "R@3", "R@5"]
    # tops: row0 [0,1,2,3,4] hits 0,2; row1 [1,5,3] (tie -> label 1) hit 1; row2 [0] no labels
    assert m["P@1"] == pytest.approx(200 / 3)  # a tie broken toward label 5 would give 100/3
    assert m["P@3"] == pytest.approx((2 / 3 + 1 / 3 + 0) / 3 * 100)
    assert m["P@5"] == pytest.approx((2 / 5 + 1 / 5 + 0) / 3 * 100)  # short rows still divide by k
    assert m["nDCG@1"] == pytest.approx(200 / 3)
    assert m["nDCG@3"] == pytest.approx(((1 + 1 / 2) / IDCG2 + 1 / IDCG2 + 0) / 3 * 100)
    assert m["nDCG@5"] == pytest.approx(m["nDCG@3"])
    assert m["R@3"] == pytest.approx((1 + 1 / 2 + 0) / 3 * 100)  # the row without labels counts as 0


def test_ndcg_idcg_uses_min_k_and_label_count():
    # one row with 4 true labels, hits at ranks 2 and 3
    m = xmc_metrics(csr([{9: 3, 1: 2, 2: 1}], 10), csr([{1: 1, 2: 1, 3: 1, 4: 1}], 10), None,
                    ks=(1, 3), recall_ks=(1,))
    assert m["nDCG@1"] == 0
    assert m["nDCG@3"] == pytest.approx((1 / math.log2(3) + 1 / 2) / (1 + 1 / math.log2(3) + 1 / 2) * 100)


def test_propensity_scored_metrics_by_hand():
    ip = np.array([1.0, 2, 3, 4, 5, 6])
    m = xmc_metrics(SCORES, TRUE, ip, ks=(1, 3), recall_ks=(5,))
    assert list(m) == ["P@1", "P@3", "nDCG@1", "nDCG@3", "PSP@1", "PSP@3", "PSnDCG@1", "PSnDCG@3", "R@5"]
    # gains: row0 hits label 0 (ip 1) at rank 1 and label 2 (ip 3) at rank 3; row1 hits label 1 (ip 2) at rank 1.
    # ideal: row0 ranks label 2 (3) then 0 (1); row1 label 4 (5) then 1 (2). Ratio of means, as pyxclib.
    assert m["PSP@1"] == pytest.approx((1 + 2 + 0) / (3 + 5 + 0) * 100)  # mean of per-row ratios would be 24.4
    assert m["PSP@3"] == pytest.approx((1 + 3 + 2) / (3 + 1 + 5 + 2) * 100)
    num = (1 + 3 / 2) / IDCG2 + 2 / IDCG2
    ideal = (3 + 1 / math.log2(3)) / IDCG2 + (5 + 2 / math.log2(3)) / IDCG2
    assert m["PSnDCG@3"] == pytest.approx(num / ideal * 100)
    assert m["PSnDCG@1"] == pytest.approx(m["PSP@1"])


def test_filtered_pairs_change_the_metrics():
    filtered = filter_predictions(SCORES, np.array([[0, 0]]))  # row0's top label removed
    m = xmc_metrics(filtered, TRUE, None, ks=(1,), recall_ks=(2,))
    assert m["P@1"] == pytest.approx(100 / 3)  # row0 now starts with label 1 (wrong)
    assert m["R@2"] == pytest.approx((1 / 2 + 1 / 2) / 3 * 100)  # row0 [1, 2]; row1 [1, 5]


def test_default_keys_are_the_eval_json_contract():
    ip = inverse_propensity(TRUE)
    assert tuple(xmc_metrics(SCORES, TRUE, ip)) == EVAL_KEYS
    assert all(isinstance(v, float) for v in xmc_metrics(SCORES, TRUE, ip).values())
    assert not any(k.startswith("PS") for k in xmc_metrics(SCORES, TRUE, None))


def test_no_true_labels_anywhere_gives_zeros():
    m = xmc_metrics(SCORES, sp.csr_matrix((3, 6)), np.ones(6))
    assert set(m.values()) == {0.0}


def test_bad_shapes_are_clear_errors():
    with pytest.raises(DataError, match=r"shape \(3, 6\).*\(3, 7\)"):
        xmc_metrics(SCORES, sp.csr_matrix((3, 7)), None)
    with pytest.raises(DataError, match="inv_prop has 5 entries"):
        xmc_metrics(SCORES, TRUE, np.ones(5))


def reference(scores: sp.csr_matrix, true: sp.csr_matrix, ip: np.ndarray, k: int):
    """pyxclib's definitions, one row at a time (slow, obvious)."""
    p, nd, ps, psnd, ideal_ps, ideal_psnd, r = [], [], [], [], [], [], []
    for i in range(scores.shape[0]):
        row = scores.getrow(i)
        preds = sorted(zip(row.indices, row.data), key=lambda t: (-t[1], t[0]))[:k]
        y = set(true.getrow(i).indices[true.getrow(i).data > 0])
        hits = [j in y for j, _ in preds]
        idcg = sum(1 / math.log2(t + 2) for t in range(min(k, len(y))))
        ideal = sorted(ip[list(y)], reverse=True)[:k]
        p.append(sum(hits) / k)
        r.append(sum(hits) / len(y) if y else 0)
        dcg = sum(h / math.log2(t + 2) for t, h in enumerate(hits))
        nd.append(dcg / idcg if y else 0)
        gain = [ip[j] * h for (j, _), h in zip(preds, hits)]
        ps.append(sum(gain) / k)
        ideal_ps.append(sum(ideal) / k)
        psnd.append(sum(g / math.log2(t + 2) for t, g in enumerate(gain)) / idcg if y else 0)
        ideal_psnd.append(sum(g / math.log2(t + 2) for t, g in enumerate(ideal)) / idcg if y else 0)
    return {f"P@{k}": 100 * np.mean(p), f"nDCG@{k}": 100 * np.mean(nd), f"PSP@{k}": 100 * np.mean(ps) / np.mean(ideal_ps),
            f"PSnDCG@{k}": 100 * np.mean(psnd) / np.mean(ideal_psnd), f"R@{k}": 100 * np.mean(r)}


@pytest.mark.parametrize("seed", range(4))
def test_matches_per_row_reference_on_random_data(seed):
    rng = np.random.default_rng(seed)
    n, num_labels = 40, 25
    scores = sp.random(n, num_labels, density=0.3, random_state=seed, format="csr")
    scores.data = np.round(scores.data * 4) - 1  # many ties, zeros and negatives stored
    true = sp.random(n, num_labels, density=0.15, random_state=seed + 100, format="csr")
    true.data[:] = 1
    emptied = np.ones(n)
    emptied[rng.choice(n, 5, replace=False)] = 0  # some rows without labels
    true = (sp.diags(emptied) @ true).tocsr()
    true.eliminate_zeros()
    ip = inverse_propensity(sp.random(60, num_labels, density=0.2, random_state=seed + 7, format="csr"))
    for k in (1, 3, 5, 10):
        got = xmc_metrics(scores, true, ip, ks=(k,), recall_ks=(k,))
        want = reference(scores, true, ip, k)
        for key, value in want.items():
            assert got[key] == pytest.approx(value), key
    p, r = precision_recall_at_k(scores, true, max_k=10)
    assert p.shape == r.shape == (10,)
    assert p[2] == pytest.approx(reference(scores, true, ip, 3)["P@3"])
    assert r[9] == pytest.approx(reference(scores, true, ip, 10)["R@10"])


def test_precision_recall_curve_by_hand():
    p, r = precision_recall_at_k(SCORES, TRUE, max_k=4)
    np.testing.assert_allclose(p, np.array([2 / 3, 2 / 6, 3 / 9, 3 / 12]) * 100)
    np.testing.assert_allclose(r, np.array([1 / 2 + 1 / 2, 1 / 2 + 1 / 2, 1 + 1 / 2, 1 + 1 / 2]) / 3 * 100)


def test_bucket_shares_by_hand():
    # training frequencies 6, 3, 2, 1, 0 (12 occurrences): label 0 -> head (starts at 0/12),
    # label 1 -> torso (starts at 6/12), labels 2, 3 and the unseen 4 -> tail
    freq = [6, 3, 2, 1, 0]
    train = sp.csr_matrix(np.array([[1 if i < f else 0 for f in freq] for i in range(6)]))
    scores = csr([{0: .9, 1: .8, 4: .7}, {2: .9, 3: .1}, {1: .5}], 5)
    true = csr([{0: 1, 1: 1, 4: 1}, {2: 1}, {0: 1}], 5)  # correct in top 3: labels 0, 1, 4 (row 0) and 2 (row 1)
    out = bucket_shares(scores, true, train, k=3)
    assert [b["bucket"] for b in out] == ["head", "torso", "tail"]
    assert [b["labels"] for b in out] == [1, 1, 3]
    np.testing.assert_allclose([b["share"] for b in out], [25, 25, 50])
    assert sum(b["share"] for b in bucket_shares(scores, true, train, k=1)) == pytest.approx(100)
