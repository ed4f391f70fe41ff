"""`evaluate` stage: score the test split with the bundle as it ships, write metrics and plots.

Test queries go through the ONNX query encoder and the faiss index (dexml.predict.Predictor),
top-K labels are kept, the dataset's filter_labels_test.txt pairs removed, then
dexml.metrics computes the XMC metrics (percent). Outputs (paths relative to the repo root):
    metrics/eval.json                   15 metric keys at the top level, "throughput", ["int8"]
    predictions/tst_scores.npz          CSR (num_test x num_labels), filtered top-K inner products
    plots/eval/precision_recall_at_k.csv  k,P@k,R@k for k = 1..100
    plots/eval/buckets.csv              bucket,share,labels (correct top-5 by label frequency)
    artifacts/bundle/manifest.json      dataset, params, git revision, metrics, checksums
If the bundle has an int8 query encoder, the test set is scored with it as well (against the
same fp32 label index, as it would be served) and its metrics and differences to fp32 go
under "int8".
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from dexml import atomic, metrics, paths
from dexml.bundle import git_revision, write_manifest
from dexml.config import Params
from dexml.data import XMCDataset, read_dataset
from dexml.errors import BundleError
from dexml.predict import Predictor

PR_PLOT = "precision_recall_at_k.csv"
BUCKET_PLOT = "buckets.csv"
PLOT_MAX_K = 100


def score_matrix(scores: np.ndarray, ids: np.ndarray, num_labels: int) -> sp.csr_matrix:
    """faiss (scores, ids), each (n, k), -> CSR (n, num_labels); -1 ids (no result) dropped."""
    valid = ids >= 0
    indptr = np.concatenate([[0], np.cumsum(valid.sum(1))]).astype(np.int64)
    # Built from arrays, not via COO: a stored score of 0 (or below) still is a prediction.
    return sp.csr_matrix((scores[valid].astype(np.float32), ids[valid].astype(np.int64), indptr),
                         shape=(ids.shape[0], num_labels))


def score_test_set(predictor: Predictor, ds: XMCDataset, params: Params) -> tuple[sp.csr_matrix, dict]:
    """Filtered top-K score matrix for ds.tst, and encode/search throughput."""
    texts = ds.tst.texts(params.data.query_text)
    predictor.embed(texts[:1], "query")  # warm-up: the first run allocates, not representative
    start = time.perf_counter()
    emb = predictor.embed(texts, "query", batch_size=params.evaluate.batch_size)
    encode_s = time.perf_counter() - start
    start = time.perf_counter()
    scores, ids = predictor.search(emb, params.evaluate.k)
    search_s = time.perf_counter() - start
    matrix = metrics.filter_predictions(score_matrix(scores, ids, ds.num_labels), ds.filter_tst)
    n = len(texts)
    throughput = {"num_queries": n, "encode_seconds": round(encode_s, 4), "search_seconds": round(search_s, 4),
                  "encode_qps": round(n / max(encode_s, 1e-9), 1), "search_qps": round(n / max(search_s, 1e-9), 1)}
    return matrix, throughput


def evaluate_bundle(params: Params, bundle_dir: str | Path, data_dir: str | Path):
    """-> (eval dict, score matrix, P@k, R@k, buckets, dataset) without writing anything."""
    ds = read_dataset(data_dir)
    gpu = params.index.use_gpu == "auto"
    predictor = Predictor(bundle_dir, verify=False, gpu=gpu)
    if predictor.index.ntotal != ds.num_labels:
        raise BundleError(f"{Path(bundle_dir) / 'index'}: the index holds {predictor.index.ntotal} labels, the "
                          f"dataset {data_dir} has {ds.num_labels} (rerun the index stage)")
    inv_prop = metrics.inverse_propensity(ds.trn.labels, *ds.propensity)
    matrix, throughput = score_test_set(predictor, ds, params)
    result = metrics.xmc_metrics(matrix, ds.tst.labels, inv_prop)
    throughput["onnx_providers"] = predictor.encoder.providers
    throughput["index_type"] = predictor.index_info["type"]
    result["throughput"] = throughput
    if predictor.encoder.meta["int8_files"]:
        q8 = Predictor(bundle_dir, verify=False, int8=True, gpu=gpu)
        matrix8, throughput8 = score_test_set(q8, ds, params)
        m8 = metrics.xmc_metrics(matrix8, ds.tst.labels, inv_prop)
        result["int8"] = {**m8, "delta": {k: round(m8[k] - result[k], 4) for k in metrics.EVAL_KEYS},
                          "encode_qps": throughput8["encode_qps"]}
    p_at_k, r_at_k = metrics.precision_recall_at_k(matrix, ds.tst.labels, max_k=PLOT_MAX_K)
    buckets = metrics.bucket_shares(matrix, ds.tst.labels, ds.trn.labels, k=5)
    return result, matrix, p_at_k, r_at_k, buckets, ds


def _save_npz(target: Path, matrix: sp.csr_matrix) -> None:
    with atomic.atomic_path(target) as tmp, open(tmp, "wb") as f:
        sp.save_npz(f, matrix, compressed=True)


def run_evaluate(params: Params, root: str | Path = ".") -> dict:
    """The stage; returns what metrics/eval.json holds."""
    root = Path(root)
    bundle_dir = root / paths.BUNDLE_DIR
    result, matrix, p_at_k, r_at_k, buckets, ds = evaluate_bundle(params, bundle_dir, root / params.data.dir)
    # Everything is computed before the first write; each file is replaced atomically.
    _save_npz(root / paths.PREDICTIONS, matrix)
    atomic.write_text(root / paths.EVAL_PLOTS / PR_PLOT, "k,P@k,R@k\n" + "".join(
        f"{k},{p:.4f},{r:.4f}\n" for k, (p, r) in enumerate(zip(p_at_k, r_at_k), 1)))
    atomic.write_text(root / paths.EVAL_PLOTS / BUCKET_PLOT, "bucket,share,labels\n" + "".join(
        f"{b['bucket']},{b['share']:.4f},{b['labels']}\n" for b in buckets))
    eval_json = {k: round(v, 4) for k, v in result.items() if k in metrics.EVAL_KEYS}
    eval_json["throughput"] = {k: v for k, v in result["throughput"].items() if not isinstance(v, (list, str))}
    if "int8" in result:
        eval_json["int8"] = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in result["int8"].items()}
    atomic.write_json(root / paths.EVAL_METRICS, eval_json)
    write_manifest(bundle_dir, dataset=ds.name, params=params.to_dict(), metrics=eval_json,
                   throughput=result["throughput"], git_rev=git_revision(root))
    return eval_json


def main(args) -> int:
    from dexml.cli import load_params_from_args

    result = run_evaluate(load_params_from_args(args))
    print("  ".join(f"{k} {result[k]:.2f}" for k in metrics.EVAL_KEYS))
    t = result["throughput"]
    print(f"{t['num_queries']} test queries: encode {t['encode_qps']} q/s, search {t['search_qps']} q/s")
    if "int8" in result:
        d = result["int8"]["delta"]
        print("int8 query encoder, change: " + "  ".join(f"{k} {d[k]:+.2f}" for k in ("P@1", "P@5", "nDCG@5", "R@100")))
    print(f"wrote {paths.EVAL_METRICS}, {paths.PREDICTIONS}, {paths.EVAL_PLOTS}/, {paths.BUNDLE_MANIFEST}")
    return 0
