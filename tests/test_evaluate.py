"""The evaluate stage: metrics, filtered predictions in test order, plots, manifest, int8 deltas."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import yaml

from dexml import metrics, paths
from dexml.config import SyntheticParams, parse_params
from dexml.data.dataset import FILTER_FILES, read_dataset, write_dataset
from dexml.data.synthetic import generate
from dexml.errors import BundleError
from dexml.pipeline.evaluate import BUCKET_PLOT, PR_PLOT
from dexml.pipeline.evaluate import run as run_evaluate
from dexml.pipeline.export import run as run_export
from dexml.pipeline.index import run as run_index
from dexml.serve.bundle import verify_bundle
from dexml.serve.predictor import Predictor
from dexml.train.model import DualEncoder

REPO = Path(__file__).resolve().parents[1]
K = 10
FILTERED_ROWS = range(0, 20, 2)


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, tiny_encoder, tiny_dataset_dir):
    """(root, params, filter pairs, unfiltered top-K per test row): a bundle evaluated once.

    The dataset is a copy of the tiny one whose filter file removes the best prediction of
    every other test row among the first 20, so filtering has something to remove.
    """
    root = tmp_path_factory.mktemp("evaluate_root")
    data = root / "data"
    shutil.copytree(tiny_dataset_dir, data)
    params = parse_params({
        "model": {"encoder": str(tiny_encoder), "query_max_len": 16, "label_max_len": 12},
        "data": {"dir": str(data)},
        "export": {"quantize_int8": True, "parity_texts": 8},
        "evaluate": {"k": K},
    })
    DualEncoder.from_params(params.model).save(root / paths.MODEL_DIR)
    run_export(params, root)
    run_index(params, root)
    ds = read_dataset(data)
    unfiltered = Predictor(root / paths.BUNDLE_DIR, verify=False).predict(ds.tst.titles, K)
    label_of = {uid: i for i, uid in enumerate(ds.lbl.uids)}
    pairs = [(r, label_of[unfiltered[r][0][0]]) for r in FILTERED_ROWS]
    (data / FILTER_FILES["tst"]).write_text("".join(f"{r} {j}\n" for r, j in pairs))
    run_evaluate(params, root)
    return root, params, pairs, unfiltered


def test_eval_json_has_the_metric_keys_in_percent(evaluated):
    root, *_ = evaluated
    result = json.loads((root / paths.EVAL_METRICS).read_text())
    assert set(result) == set(metrics.EVAL_KEYS) | {"throughput", "int8"}
    assert all(0 <= result[k] <= 100 for k in metrics.EVAL_KEYS)
    assert result["P@1"] > 0  # the tiny dataset shares words between queries and labels
    t = result["throughput"]
    assert t["num_queries"] == 100 and t["encode_qps"] > 0 and t["search_qps"] > 0


def test_predictions_are_the_filtered_top_k_in_test_order(evaluated):
    root, params, pairs, unfiltered = evaluated
    ds = read_dataset(params.data.dir)
    scores = sp.load_npz(root / paths.PREDICTIONS)
    assert isinstance(scores, sp.csr_matrix) and scores.shape == (100, ds.num_labels)
    removed = dict(pairs)
    for r in range(scores.shape[0]):
        row = scores[r]
        got = {ds.lbl.uids[j]: s for j, s in zip(row.indices, row.data)}
        expected = {uid: s for uid, _, s in unfiltered[r] if (r, ds.lbl.uids.index(uid)) not in pairs}
        assert got.keys() == expected.keys()
        np.testing.assert_allclose([got[u] for u in expected], list(expected.values()), atol=1e-6)
        assert len(got) == (K - 1 if r in removed else K)
    # the metrics are those of the saved matrix
    result = json.loads((root / paths.EVAL_METRICS).read_text())
    recomputed = metrics.xmc_metrics(scores, ds.tst.labels, metrics.inverse_propensity(ds.trn.labels, *ds.propensity))
    assert {k: round(v, 4) for k, v in recomputed.items()} == {k: result[k] for k in metrics.EVAL_KEYS}


def test_plots(evaluated):
    root, *_ = evaluated
    result = json.loads((root / paths.EVAL_METRICS).read_text())
    lines = (root / paths.EVAL_PLOTS / PR_PLOT).read_text().splitlines()
    assert lines[0] == "k,P@k,R@k" and len(lines) == 101
    rows = [tuple(float(x) for x in line.split(",")) for line in lines[1:]]
    assert [int(k) for k, _, _ in rows] == list(range(1, 101))
    assert rows[0][1] == pytest.approx(result["P@1"], abs=1e-3)
    assert rows[4][1] == pytest.approx(result["P@5"], abs=1e-3)
    assert rows[9][2] == pytest.approx(result["R@10"], abs=1e-3)
    recall = [r for _, _, r in rows]
    assert recall == sorted(recall)

    buckets = (root / paths.EVAL_PLOTS / BUCKET_PLOT).read_text().splitlines()
    assert buckets[0] == "bucket,share,labels"
    parsed = [line.split(",") for line in buckets[1:]]
    assert [b for b, _, _ in parsed] == ["head", "torso", "tail"]
    assert sum(float(s) for _, s, _ in parsed) == pytest.approx(100, abs=0.01)
    assert sum(int(n) for _, _, n in parsed) == 40


def test_manifest_describes_the_verified_bundle(evaluated):
    root, params, *_ = evaluated
    manifest = verify_bundle(root / paths.BUNDLE_DIR)
    assert manifest["metrics"] == json.loads((root / paths.EVAL_METRICS).read_text())
    assert manifest["params"] == params.to_dict() and manifest["dataset"] == read_dataset(params.data.dir).name
    assert {"encoder/model.onnx", "encoder/model_int8.onnx", "encoder/tokenizer.json",
            "index/labels.faiss", "index/labels.jsonl"} <= set(manifest["files"])
    assert manifest["throughput"]["encode_qps"] > 0 and manifest["throughput"]["index_type"] == "flat"


def test_int8_metrics_and_deltas(evaluated):
    root, *_ = evaluated
    result = json.loads((root / paths.EVAL_METRICS).read_text())
    int8 = result["int8"]
    assert set(metrics.EVAL_KEYS) <= set(int8) and int8["encode_qps"] > 0
    for k in metrics.EVAL_KEYS:
        assert int8["delta"][k] == pytest.approx(int8[k] - result[k], abs=2e-4)
    assert abs(int8["delta"]["P@5"]) < 10  # a per-channel int8 tiny model stays close


def test_score_matrix_keeps_non_positive_scores_and_drops_missing_ids():
    scores = np.array([[0.5, 0.0, -0.2], [0.9, -np.inf, -np.inf]], np.float32)
    ids = np.array([[2, 0, 1], [3, -1, -1]])
    m = metrics.scores_to_csr(scores, ids, 4)
    assert m.shape == (2, 4) and m.nnz == 4
    assert m[0, 0] == 0.0 and 0 in m[0].indices  # a stored zero still is a prediction
    assert metrics.top_k(m, 3).tolist() == [[2, 0, 1], [3, -1, -1]]


def test_index_from_another_dataset_is_refused_and_outputs_kept(evaluated, tmp_path):
    root, params, *_ = evaluated
    copy = tmp_path / "root"
    for rel in (paths.BUNDLE_DIR, "metrics"):
        shutil.copytree(root / rel, copy / rel)
    other = tmp_path / "other_data"
    write_dataset(generate(SyntheticParams(num_labels=30, num_train=100, num_test=20)), other)
    before = (copy / paths.EVAL_METRICS).read_bytes()
    bad = parse_params({**params.to_dict(), "data": {**params.to_dict()["data"], "dir": str(other)}})
    with pytest.raises(BundleError, match="index holds 40 labels.*has 30"):
        run_evaluate(bad, copy)
    assert (copy / paths.EVAL_METRICS).read_bytes() == before


@pytest.mark.slow
def test_stages_run_through_the_cli(tmp_path, tiny_encoder, tiny_dataset_dir):
    """export -> index -> evaluate as DVC runs them: `python stages/<stage>.py` with params.yaml."""
    raw = {"model": {"encoder": str(tiny_encoder), "shared": False, "query_max_len": 16, "label_max_len": 12},
           "data": {"dir": str(tiny_dataset_dir)}, "export": {"parity_texts": 8}, "evaluate": {"k": 10}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    DualEncoder.from_params(parse_params(raw).model).save(tmp_path / paths.MODEL_DIR)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    logs = {}
    for stage in ("export", "index", "evaluate"):
        out = subprocess.run([sys.executable, str(REPO / "stages" / f"{stage}.py"), "-S", "index.type=hnsw"],
                             cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        logs[stage] = out.stderr
    assert "P@1" in out.stdout and "q/s" in out.stdout
    # long work shows progress with rates (tqdm on stderr): embedding labels, test queries, searching
    assert "index: embedding labels" in logs["index"] and "text/s" in logs["index"]
    assert "evaluate: embedding test queries (fp32)" in logs["evaluate"] and "evaluate: searching" in logs["evaluate"]
    manifest = verify_bundle(tmp_path / paths.BUNDLE_DIR)
    assert {"encoder/query.onnx", "encoder/label.onnx"} <= set(manifest["files"])
    assert manifest["params"]["index"]["type"] == "hnsw" and manifest["throughput"]["index_type"] == "hnsw"
    assert set(metrics.EVAL_KEYS) <= set(json.loads((tmp_path / paths.EVAL_METRICS).read_text()))
