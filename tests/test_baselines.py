"""The TF-IDF kNN baseline on toy texts, and its metrics end to end on the tiny synthetic dataset."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from dexml.errors import DataError
from dexml.metrics import inverse_propensity, top_k, xmc_metrics
from dexml.pipeline.baselines import _top_k_mask, tfidf_knn_scores

TRAIN = ["apple pie", "apple pie recipe", "car engine", "car engine oil", "banana bread"]
# labels: 0 fruit, 1 recipe, 2 vehicle, 3 pie
LABELS = sp.csr_matrix(np.array([[1, 0, 0, 1], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 0], [1, 0, 0, 0]]))


def test_votes_are_similarity_sums_over_the_nearest_neighbours():
    scores = tfidf_knn_scores(TRAIN, LABELS, ["apple pie", "car oil", "zebra"], k_neighbors=2, top=3, min_df=1)
    assert scores.shape == (3, 4)
    # "apple pie": neighbours row 0 (identical, cosine 1) and row 1 (cosine s, 0 < s < 1)
    assert scores[0, 3] == pytest.approx(1.0, abs=1e-6)  # pie: row 0 only
    assert 0 < scores[0, 1] < 1  # recipe: row 1 only, = s
    assert scores[0, 0] == pytest.approx(scores[0, 3] + scores[0, 1])  # fruit: both vote
    assert scores[0, 2] == 0 and scores[0].nnz == 3  # vehicle: no neighbour has it
    np.testing.assert_array_equal(top_k(scores, 3)[:2], [[0, 3, 1], [2, -1, -1]])
    assert scores[2].nnz == 0  # no shared term: nobody votes


def test_top_keeps_at_most_top_labels_and_bad_input_is_an_error():
    assert np.diff(tfidf_knn_scores(TRAIN, LABELS, ["apple car"], k_neighbors=5, top=2, min_df=1).indptr)[0] == 2
    with pytest.raises(DataError, match="5 training texts but 4 label rows"):
        tfidf_knn_scores(TRAIN, LABELS[:4], ["x"])
    assert tfidf_knn_scores(TRAIN, LABELS, [], min_df=1).shape == (0, 4)


def test_neighbour_ties_go_to_the_lower_row():
    s = np.array([[0.2, 0.5, 0.2, 0.2, 0.1], [0.0, 0.0, 0.0, 0.0, 0.0]])
    np.testing.assert_array_equal(_top_k_mask(s, 3), [[1, 1, 1, 0, 0], [1, 1, 1, 0, 0]])


def test_baseline_learns_the_tiny_synthetic_dataset(tiny_dataset_dir):
    from dexml.data.dataset import read_dataset

    ds = read_dataset(tiny_dataset_dir)
    scores = tfidf_knn_scores(ds.trn.texts("title"), ds.trn.labels, ds.tst.texts("title"), k_neighbors=10, top=20)
    m = xmc_metrics(scores, ds.tst.labels, inverse_propensity(ds.trn.labels, *ds.propensity))
    chance = 100 * ds.tst.labels.nnz / ds.tst.labels.shape[0] / ds.num_labels
    assert m["P@1"] > max(80, 5 * chance)  # synthetic queries reuse their labels' words: easy for TF-IDF
    assert 0 < m["PSP@5"] <= 100 and m["R@10"] <= m["R@100"] <= 100
