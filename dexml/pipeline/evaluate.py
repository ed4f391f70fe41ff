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

With rae.enabled (dexml/serve/rae.py), lambda and the temperature are chosen on the training
queries the train stage held out (leave-one-out against the memory), never on test; if the
best lambda is above 0 the bundle ships retrieval-augmented: the 15 metric keys, predictions,
plots and int8 numbers are then those of the augmented ranking, eval.json's "rae" holds the
choice, its validation numbers and the dual encoder's own test metrics ("without_rae"), and
the manifest's "rae" tells Predictor to use it.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from dexml import fileio, metrics, paths, progress
from dexml.config import Params
from dexml.data.dataset import XMCDataset, read_dataset
from dexml.errors import BundleError
from dexml.fileio import read_json
from dexml.serve import rae
from dexml.serve.bundle import git_revision, write_manifest
from dexml.serve.predictor import Predictor

PR_PLOT = "precision_recall_at_k.csv"
BUCKET_PLOT = "buckets.csv"
PLOT_MAX_K = 100


def score_test_set(predictor: Predictor, ds: XMCDataset,
                   params: Params) -> tuple[sp.csr_matrix, dict, sp.csr_matrix]:
    """Filtered top-K score matrices for ds.tst: as `predictor` ranks (with its `rae` settings,
    if any) and by the dual encoder alone (the same matrix without rae); encode/search throughput."""
    texts = ds.tst.texts(params.data.query_text)
    predictor.embed(texts[:1], "query")  # warm-up: the first run allocates, not representative
    name = "int8" if predictor.encoder.int8 else "fp32"
    start = time.perf_counter()
    emb = predictor.embed(texts, "query", batch_size=params.evaluate.batch_size,
                          progress=f"evaluate: embedding test queries ({name})")
    encode_s = time.perf_counter() - start
    start = time.perf_counter()
    scores, ids = _in_chunks(predictor.search, emb, params.evaluate.k, f"evaluate: searching ({name})")
    search_s = time.perf_counter() - start
    n = len(texts)
    throughput = {"num_queries": n, "encode_seconds": round(encode_s, 4), "search_seconds": round(search_s, 4),
                  "encode_qps": round(n / max(encode_s, 1e-9), 1), "search_qps": round(n / max(search_s, 1e-9), 1)}
    de_matrix = metrics.filter_predictions(metrics.scores_to_csr(scores, ids, ds.num_labels), ds.filter_tst)
    if predictor.rae is None:
        return de_matrix, throughput, de_matrix
    start = time.perf_counter()
    # label search again + memory search + mix
    scores, ids = _in_chunks(predictor.rank, emb, params.evaluate.k, f"evaluate: retrieval-augmented ranking ({name})")
    rae_s = time.perf_counter() - start
    throughput.update({"rae_seconds": round(rae_s, 4), "rae_qps": round(n / max(rae_s, 1e-9), 1)})
    return metrics.filter_predictions(metrics.scores_to_csr(scores, ids, ds.num_labels), ds.filter_tst), throughput, de_matrix


def _in_chunks(search, emb: np.ndarray, k: int, desc: str, chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """search(emb, k) over row chunks, with a progress bar; the results concatenated."""
    scores, ids = [], []
    with progress.bar(len(emb), desc, unit="query") as shown:
        for start in range(0, max(len(emb), 1), chunk):
            s, i = search(emb[start:start + chunk], k)
            scores.append(s)
            ids.append(i)
            shown.update(len(s))
    return np.concatenate(scores), np.concatenate(ids)


def read_heldout_rows(path: Path, num_train: int) -> np.ndarray:
    """The training rows the train stage held out for validation (its output models/heldout_rows.json)."""
    doc = read_json(path, BundleError, "written by the train stage; rerun it")
    rows = doc.get("rows")
    if (doc.get("num_train") != num_train or not isinstance(rows, list) or not rows
            or not all(isinstance(r, int) and 0 <= r < num_train for r in rows)):
        raise BundleError(f"{path}: expected the held-out rows of a training split of {num_train} points "
                          f"(num_train {doc.get('num_train')!r}); the model was trained on other data: rerun train")
    return np.asarray(sorted(rows), dtype=np.int64)


def tune_rae(predictor: Predictor, ds: XMCDataset, params: Params, inv_prop: np.ndarray, heldout_file: Path) -> dict:
    """Choose lambda and T on the training queries the train stage held out (never the test
    split); each is removed from its own neighbours (it is in the memory)."""
    p = params.rae
    rows = read_heldout_rows(heldout_file, len(ds.trn))
    texts = ds.trn.texts(params.data.query_text)
    emb = predictor.embed([texts[i] for i in rows], "query", batch_size=params.evaluate.batch_size,
                          progress="evaluate: embedding held-out training queries (rae tuning)")
    label_scores, label_ids = predictor.search(emb, p.k)
    nb_scores, nb_ids = rae.exclude_self(*predictor.search_memory(emb, p.k + 1), rows)
    best, grid = rae.tune(label_scores, label_ids, nb_scores, nb_ids, predictor.memory[1], ds.trn.labels[rows],
                          inv_prop, p.lambdas, p.temperatures, p.metric, rae.rows_filter(ds.filter_trn, rows),
                          progress="evaluate: rae grid (lambda x temperature)")
    pick = ("P@1", "P@5", "PSP@5", p.metric)
    de_only = next((r for r in grid if r["lambda"] == 0), None)
    return {"lambda": best["lambda"], "temperature": best["temperature"], "k": p.k,
            "validation": {"points": len(rows), "metric": p.metric,
                           "best": {k: round(best[k], 4) for k in pick},
                           "without_rae": {k: round(de_only[k], 4) for k in pick} if de_only else None}}


def scoring(index_info: dict) -> dict:
    """What the label index ranks by: the dual encoder, + its label bias, + gamma x the classifier
    head (both folded into the label vectors by the index stage)."""
    head = index_info.get("classifier")
    return {"dual_encoder": True, "label_bias": bool(index_info.get("label_bias")),
            "classifier": bool(head), "classifier_gamma": head["gamma"] if head else None,
            "index_dim": index_info.get("dim")}


def evaluate_bundle(params: Params, bundle_dir: str | Path, data_dir: str | Path, heldout_file: str | Path):
    """-> (eval dict, score matrix, P@k, R@k, buckets, dataset) without writing anything."""
    ds = read_dataset(data_dir)
    gpu = params.index.use_gpu == "auto"
    # The params' k's are checked against MAX_K when they load; rae tuning asks rae.k + 1 neighbours.
    max_k = max(params.evaluate.k, params.rae.k + 1)
    predictor = Predictor(bundle_dir, verify=False, gpu=gpu, rae=False, max_k=max_k)
    if predictor.index.ntotal != ds.num_labels:
        raise BundleError(f"{Path(bundle_dir) / 'index'}: the index holds {predictor.index.ntotal} labels, the "
                          f"dataset {data_dir} has {ds.num_labels} (rerun the index stage)")
    inv_prop = metrics.inverse_propensity(ds.trn.labels, *ds.propensity)
    choice = None
    if params.rae.enabled:
        if predictor.memory[1].shape[0] != len(ds.trn):
            raise BundleError(f"{Path(bundle_dir) / 'index'}: the memory holds {predictor.memory[1].shape[0]} "
                              f"training queries, the dataset {data_dir} has {len(ds.trn)} (rerun the index stage)")
        choice = tune_rae(predictor, ds, params, inv_prop, heldout_file)
        if choice["lambda"] > 0:  # lambda 0 ranks as the dual encoder: ship without the memory
            predictor.rae = rae.RaeSettings(choice["lambda"], choice["temperature"], choice["k"])
    matrix, throughput, de_matrix = score_test_set(predictor, ds, params)
    result = metrics.xmc_metrics(matrix, ds.tst.labels, inv_prop)
    if choice is not None:
        choice["shipped"] = predictor.rae is not None
        choice["without_rae"] = metrics.xmc_metrics(de_matrix, ds.tst.labels, inv_prop)
        mem = predictor.index_info["memory"]
        choice["memory_bytes"] = mem.get("bytes")
        result["rae"] = choice
    throughput["onnx_providers"] = predictor.encoder.providers
    throughput["index_type"] = predictor.index_info["type"]
    result["throughput"] = throughput
    result["scoring"] = scoring(predictor.index_info)
    if predictor.encoder.meta["int8_files"]:
        q8 = Predictor(bundle_dir, verify=False, int8=True, gpu=gpu, rae=predictor.rae or False, max_k=max_k)
        matrix8, throughput8, _ = score_test_set(q8, ds, params)
        m8 = metrics.xmc_metrics(matrix8, ds.tst.labels, inv_prop)
        result["int8"] = {**m8, "delta": {k: round(m8[k] - result[k], 4) for k in metrics.EVAL_KEYS},
                          "encode_qps": throughput8["encode_qps"]}
    p_at_k, r_at_k = metrics.precision_recall_at_k(matrix, ds.tst.labels, max_k=PLOT_MAX_K)
    buckets = metrics.bucket_shares(matrix, ds.tst.labels, ds.trn.labels, k=5)
    return result, matrix, p_at_k, r_at_k, buckets, ds


def _save_npz(target: Path, matrix: sp.csr_matrix) -> None:
    with fileio.atomic_path(target) as tmp, open(tmp, "wb") as f:
        sp.save_npz(f, matrix, compressed=True)


def run(params: Params, root: str | Path = ".") -> dict:
    """The stage; returns what metrics/eval.json holds."""
    root = Path(root)
    bundle_dir = root / paths.BUNDLE_DIR
    result, matrix, p_at_k, r_at_k, buckets, ds = evaluate_bundle(params, bundle_dir, root / params.data.dir,
                                                                   root / paths.HELDOUT_ROWS)
    # Everything is computed before the first write; each file is replaced atomically.
    _save_npz(root / paths.PREDICTIONS, matrix)
    fileio.write_text(root / paths.EVAL_PLOTS / PR_PLOT, "k,P@k,R@k\n" + "".join(
        f"{k},{p:.4f},{r:.4f}\n" for k, (p, r) in enumerate(zip(p_at_k, r_at_k), 1)))
    fileio.write_text(root / paths.EVAL_PLOTS / BUCKET_PLOT, "bucket,share,labels\n" + "".join(
        f"{b['bucket']},{b['share']:.4f},{b['labels']}\n" for b in buckets))
    eval_json = {k: round(v, 4) for k, v in result.items() if k in metrics.EVAL_KEYS}
    eval_json["throughput"] = {k: v for k, v in result["throughput"].items() if not isinstance(v, (list, str))}
    if "int8" in result:
        eval_json["int8"] = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in result["int8"].items()}
    shipped = None
    if "rae" in result:
        choice = result["rae"]
        eval_json["rae"] = {**choice, "without_rae": {k: round(v, 4) for k, v in choice["without_rae"].items()}}
        if choice["shipped"]:
            shipped = {k: choice[k] for k in ("lambda", "temperature", "k")}
    fileio.write_json(root / paths.EVAL_METRICS, eval_json)
    write_manifest(bundle_dir, dataset=ds.name, params=params.to_dict(), metrics=eval_json,
                   throughput=result["throughput"], git_rev=git_revision(root), rae=shipped,
                   scoring={**result["scoring"], "retrieval_augmented": shipped is not None})
    return eval_json


def summary(result: dict) -> str:
    lines = ["  ".join(f"{k} {result[k]:.2f}" for k in metrics.EVAL_KEYS)]
    t = result["throughput"]
    lines.append(f"{t['num_queries']} test queries: encode {t['encode_qps']} q/s, search {t['search_qps']} q/s")
    if "rae" in result:
        r = result["rae"]
        v = r["validation"]
        state = "shipped" if r["shipped"] else "not shipped (lambda 0: the dual encoder alone is best)"
        lines.append(f"retrieval augmentation {state}: lambda {r['lambda']}, temperature {r['temperature']}, "
                     f"k {r['k']} (chosen on {v['points']} held-out training queries by {v['metric']}: {v['best'][v['metric']]:.2f})")
        lines.append("  without it on test: " + "  ".join(f"{k} {r['without_rae'][k]:.2f}" for k in ("P@1", "P@5", "PSP@5")))
    if "int8" in result:
        d = result["int8"]["delta"]
        lines.append("int8 query encoder, change: " + "  ".join(f"{k} {d[k]:+.2f}" for k in ("P@1", "P@5", "nDCG@5", "R@100")))
    lines.append(f"wrote {paths.EVAL_METRICS}, {paths.PREDICTIONS}, {paths.EVAL_PLOTS}/, {paths.BUNDLE_MANIFEST}")
    return "\n".join(lines)
