"""Label priors: the folded bias ranks exactly as scores + bias, the bias trains (unseen labels stay
0), survives save/load and export, and the bundle serves what the PyTorch model scores."""
from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from dexml import metrics, paths
from dexml.config import IndexParams, ModelParams, parse_params
from dexml.data.dataset import read_dataset, write_dataset
from dexml.errors import BundleError, ConfigError
from dexml.pipeline.evaluate import run as run_evaluate
from dexml.pipeline.export import run as run_export
from dexml.pipeline.index import run as run_index
from dexml.serve import priors
from dexml.serve.index import build_index
from dexml.serve.predictor import Predictor
from dexml.train.loop import train
from dexml.train.model import DualEncoder, LabelBias

UNSEEN = 5  # the label removed from the training split of the end-to-end dataset


def _dyadic(rng, shape, denominator):
    """Values k / denominator (powers of two): sums of their products are exact in float32."""
    return (rng.integers(-denominator, denominator + 1, shape) / denominator).astype(np.float32)


def _check_same_ranking(scores_a, ids_a, dense_b, k):
    """Tie-aware: a's top-k scores equal b's k best values, and a's ids hold exactly those values
    in b (ties at the cut may be any of the tied labels)."""
    for row, (sa, ia) in enumerate(zip(scores_a, ids_a)):
        best = np.sort(dense_b[row])[::-1][:k]
        np.testing.assert_array_equal(sa, best)
        np.testing.assert_array_equal(dense_b[row][ia], sa)
        assert len(set(ia.tolist())) == k


@pytest.mark.parametrize("tau", [0.5, 1.0, 0.0625])
def test_folded_search_ranks_exactly_as_scores_plus_bias(tau):
    rng = np.random.default_rng(0)
    q, labels = _dyadic(rng, (30, 16), 8), _dyadic(rng, (200, 16), 8)
    bias = _dyadic(rng, 200, 4) * 3
    bias[rng.random(200) < 0.2] = 0  # labels never seen in training
    index, info = build_index(priors.fold_labels(labels, bias, tau), IndexParams(type="flat"))
    assert info["dim"] == 17
    scores, ids = index.search(priors.fold_queries(q), 20)

    logits = q @ labels.T / np.float32(tau) + bias  # the model's score: bias added after the product
    _check_same_ranking(scores / np.float32(tau), ids, logits, 20)
    assert np.unique(logits, axis=None).size < logits.size  # the data does have ties


def test_folded_search_on_real_valued_vectors_matches_within_rounding():
    rng = np.random.default_rng(1)
    q, labels = rng.standard_normal((50, 32)).astype(np.float32), rng.standard_normal((500, 32)).astype(np.float32)
    bias = rng.standard_normal(500).astype(np.float32)
    tau = 0.05
    index, _ = build_index(priors.fold_labels(labels, bias, tau), IndexParams(type="flat"))
    scores, ids = index.search(priors.fold_queries(q), 10)
    logits = q.astype(np.float64) @ labels.T / tau + bias
    np.testing.assert_allclose(scores / tau, np.take_along_axis(logits, ids, 1), rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(ids, np.argsort(-logits, axis=1, kind="stable")[:, :10])


def test_ivfpq_default_subquantizers_divide_a_folded_dimension():
    x = priors.fold_labels(np.random.default_rng(2).standard_normal((300, 32)), np.zeros(300), 0.05)
    _, info = build_index(x, IndexParams(type="ivfpq"))
    assert info["dim"] == 33 and info["build"]["pq_m"] == 3  # largest divisor of 33 up to 33 / 4


def test_label_bias_learns_at_scale_with_its_true_gradient_and_untrained_labels_stay_zero():
    bias = LabelBias(torch.tensor([True, True, False, True]), scale=100.0)
    opt = torch.optim.SGD(bias.parameters(), lr=0.01)
    b = bias(torch.tensor([3, 2, 0]))
    (b * torch.tensor([1.0, 5.0, -2.0])).sum().backward()
    np.testing.assert_array_equal(bias.raw.grad.numpy(), [-2.0, 0.0, 0.0, 1.0])  # dL/db; label 2 masked
    opt.step()
    np.testing.assert_allclose(bias.values().numpy(), [2.0, 0.0, 0.0, -1.0], rtol=1e-6)  # 100 x the step


def test_model_scores_add_the_bias_of_each_pooled_label(tiny_encoder):
    y = sp.csr_matrix(np.array([[1, 0, 1], [1, 0, 0]], np.float32))  # label 1 is never a positive
    model = DualEncoder.from_params(ModelParams(encoder=str(tiny_encoder), tau=0.5, label_bias=True), train_labels=y)
    assert model.label_bias.trained.tolist() == [1.0, 0.0, 1.0]
    with torch.no_grad():
        model.label_bias.raw.copy_(torch.tensor([0.01, 0.0, -0.02]))
    q, lab = torch.randn(2, 4), torch.randn(2, 4)
    got = model.scores(q, lab, label_ids=torch.tensor([2, 0]))
    torch.testing.assert_close(got, q @ lab.T / 0.5 + torch.tensor([-2.0, 1.0]))
    with pytest.raises(ValueError, match="pass label_ids"):
        model.scores(q, lab)
    with pytest.raises(ConfigError, match="model.label_bias"):
        DualEncoder.from_params(ModelParams(encoder=str(tiny_encoder), label_bias=True))


def test_bias_file_errors_name_the_file(tmp_path):
    path = tmp_path / priors.BIAS_FILE
    priors.write_label_bias(path, np.array([0.5, 0.0, -1.0]), np.array([True, False, True]))
    bias, trained = priors.read_label_bias(path, num_labels=3)
    assert bias.tolist() == [0.5, 0.0, -1.0] and trained.tolist() == [True, False, True]
    with pytest.raises(BundleError, match=f"{priors.BIAS_FILE}: 3 label biases, but the dataset has 4"):
        priors.read_label_bias(path, num_labels=4)
    priors.write_label_bias(path, np.array([0.5, 0.2]), np.array([True, False]))
    with pytest.raises(BundleError, match="without training positives must have bias 0"):
        priors.read_label_bias(path)
    path.write_bytes(b"not safetensors")
    with pytest.raises(BundleError, match=f"{priors.BIAS_FILE}: expected safetensors"):
        priors.read_label_bias(path)


# ---------------------------------------------------------------- trained end to end
@pytest.fixture(scope="module")
def biased_root(tmp_path_factory, tiny_encoder, tiny_dataset_dir):
    """A tiny model trained with label_bias on data where label UNSEEN has no training positive,
    exported, indexed (with the rae memory too) and evaluated. Read-only."""
    root = tmp_path_factory.mktemp("priors_root")
    ds = read_dataset(tiny_dataset_dir)
    y = ds.trn.labels.tolil()
    y[:, UNSEEN] = 0
    ds.trn.labels = sp.csr_matrix(y, dtype=np.float32)
    ds.trn.labels.eliminate_zeros()
    write_dataset(ds, root / "data")
    raw = {
        "data": {"dir": str(root / "data")},
        "model": {"encoder": str(tiny_encoder), "tau": 0.1, "query_max_len": 16, "label_max_len": 12,
                  "label_bias": True},
        "negatives": {"mode": "all", "label_chunk": 16},
        "train": {"epochs": 1, "batch_size": 32, "lr": 3e-3, "seed": 0, "warmup": 0.0, "sample_positives": 0},
        "export": {"parity_texts": 8},
        "evaluate": {"k": 10},
        "rae": {"enabled": True, "k": 8, "lambdas": [0.0, 0.5], "temperatures": [0.1]},
    }
    params = parse_params(raw)
    train(params, root)
    for stage in (run_export, run_index, run_evaluate):
        stage(params, root)
    return root, params


def test_trained_bias_follows_label_popularity_and_unseen_labels_keep_zero(biased_root):
    root, params = biased_root
    model = DualEncoder.load(root / paths.MODEL_DIR)
    assert model.meta.label_bias and model.meta.label_bias_lr_scale == 100.0
    bias = model.label_bias.values().numpy()
    freq = metrics.label_frequencies(read_dataset(params.data.dir).trn.labels)
    assert freq[UNSEEN] == 0 and bias[UNSEEN] == 0.0
    seen = freq > 0
    assert np.abs(bias[seen]).min() > 0  # every seen label moved
    rank_corr = np.corrcoef(np.argsort(np.argsort(bias[seen])), np.argsort(np.argsort(freq[seen])))[0, 1]
    assert rank_corr > 0.5, rank_corr  # head labels get the larger offsets

    exported, trained = priors.read_label_bias(root / paths.BUNDLE_ENCODER / priors.BIAS_FILE, len(bias))
    np.testing.assert_array_equal(exported, bias)
    assert trained.tolist() == seen.tolist()
    encoder_meta = json.loads((root / paths.BUNDLE_ENCODER / "encoder.json").read_text())
    assert encoder_meta["label_bias"] == priors.BIAS_FILE


def test_bundle_ranks_as_the_pytorch_model_with_its_bias(biased_root):
    root, params = biased_root
    ds = read_dataset(params.data.dir)
    info = json.loads((root / paths.BUNDLE_INDEX / "index.json").read_text())
    assert info["dim"] == 33 and info["label_bias"]["tau"] == 0.1
    assert info["label_bias"]["trained_labels"] == ds.num_labels - 1

    texts = ds.tst.titles[:20]
    model = DualEncoder.load(root / paths.MODEL_DIR)
    with torch.no_grad():
        logits = model.scores(model.embed(texts), model.embed(ds.lbl.titles, "label"),
                              label_ids=torch.arange(ds.num_labels)).numpy()
    predictor = Predictor(root / paths.BUNDLE_DIR, rae=False)
    scores, ids = predictor.search(predictor.embed(texts), 5)
    np.testing.assert_allclose(scores / 0.1, np.take_along_axis(logits, ids, 1), atol=2e-3)  # index = tau x logit
    for row in range(len(texts)):
        assert logits[row, ids[row, -1]] >= np.sort(logits[row])[-5] - 2e-3  # nothing better left out
    without = logits - model.label_bias.values().numpy()
    assert (np.argmax(without, 1) != ids[:, 0]).any()  # the bias does change some rankings


def test_evaluate_and_predictor_serve_the_folded_index_with_the_memory(biased_root):
    root, params = biased_root
    result = json.loads((root / paths.EVAL_METRICS).read_text())
    assert result["rae"]["lambda"] in (0.0, 0.5) and "P@5" in result["rae"]["without_rae"]
    preds = Predictor(root / paths.BUNDLE_DIR).predict(["tuma ribo tugo"], 3)[0]
    assert len(preds) == 3 and preds[0][2] >= preds[1][2] >= preds[2][2]
