"""Retrieval-augmented prediction: the scorer against a dense brute-force computation, leave-one-out,
the validation grid search, and the bundle path (index memory -> evaluate's choice -> Predictor)."""
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
from conftest import write_heldout_rows

from dexml import metrics, paths
from dexml.config import IndexParams, parse_params
from dexml.data.dataset import read_dataset
from dexml.errors import BundleError
from dexml.pipeline.evaluate import run as run_evaluate
from dexml.pipeline.export import run as run_export
from dexml.pipeline.index import run as run_index
from dexml.serve import rae
from dexml.serve.bundle import verify_bundle
from dexml.serve.index import (
    MEMORY_INDEX_FILE,
    MEMORY_LABELS_FILE,
    build_index,
)
from dexml.serve.predictor import Predictor
from dexml.train.model import DualEncoder

REPO = Path(__file__).resolve().parents[1]


def _unit(rng, n, d):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _dense_rae(q, lab, mem, y, k, lam, t):
    """The module docstring's definition, computed densely over all labels and training queries."""
    s_lab = (q @ lab.T).astype(np.float64)
    s_mem = (q @ mem.T).astype(np.float64)
    top_lab = np.argsort(-s_lab, axis=1, kind="stable")[:, :k]
    top_mem = np.argsort(-s_mem, axis=1, kind="stable")[:, :k]
    in_lab = np.zeros_like(s_lab, dtype=bool)
    np.put_along_axis(in_lab, top_lab, True, axis=1)
    in_mem = np.zeros_like(s_mem, dtype=bool)
    np.put_along_axis(in_mem, top_mem, True, axis=1)
    e_lab = np.where(in_lab, np.exp(s_lab / t), 0.0)
    p = e_lab / e_lab.sum(1, keepdims=True)
    e_mem = np.where(in_mem, np.exp(s_mem / t), 0.0)
    w = e_mem / e_mem.sum(1, keepdims=True)
    m = w @ y
    candidates = in_lab | ((in_mem.astype(float) @ y) > 0)
    return np.where(candidates, (1 - lam) * p + lam * m, 0.0), candidates


@pytest.mark.parametrize("lam,t", [(0.3, 0.1), (0.0, 0.05), (1.0, 0.02), (0.7, 1.0)])
def test_scorer_matches_a_dense_brute_force_computation(lam, t):
    rng = np.random.default_rng(0)
    num_labels, n_train, d, k = 15, 40, 8, 5
    lab, mem, q = _unit(rng, num_labels, d), _unit(rng, n_train, d), _unit(rng, 6, d)
    y = (rng.random((n_train, num_labels)) < 0.15).astype(np.float32)
    y[0] = 0  # a training query without labels votes for nothing
    lab_index, _ = build_index(lab, IndexParams(type="flat"))
    mem_index, _ = build_index(mem, IndexParams(type="flat"))
    ls, li = lab_index.search(q, k)
    ns, ni = mem_index.search(q, k)

    got = rae.rae_scores(ls, li, ns, ni, sp.csr_matrix(y), lam, t)
    expected, candidates = _dense_rae(q, lab, mem, y, k, lam, t)
    np.testing.assert_allclose(got.toarray(), expected, rtol=1e-5, atol=1e-7)
    # the candidates are exactly the top-k labels and the neighbours' labels
    stored = np.zeros_like(candidates)
    stored[np.repeat(np.arange(got.shape[0]), np.diff(got.indptr)), got.indices] = True
    np.testing.assert_array_equal(stored, candidates)

    vals, ids = rae.top_k_arrays(got, 8)
    for row in range(len(q)):
        order = np.lexsort((np.arange(num_labels), -expected[row]))  # ties -> lower label
        want = order[candidates[row][order]][:8]
        assert ids[row, :len(want)].tolist() == want.tolist()
        assert (ids[row, len(want):] == -1).all() and np.isneginf(vals[row, len(want):]).all()
        np.testing.assert_allclose(vals[row, :len(want)], expected[row, want], rtol=1e-5)


def test_lambda_zero_is_the_dual_encoder_and_one_is_neighbour_voting():
    label_scores = np.array([[0.9, 0.5, 0.1]], np.float32)
    label_ids = np.array([[2, 0, 1]])
    nb_scores = np.array([[0.8, 0.8]], np.float32)
    nb_ids = np.array([[1, 0]])
    y = sp.csr_matrix(np.array([[0, 0, 0, 1], [1, 0, 0, 1]], np.float32))  # training rows 0 and 1
    _, ids0 = rae.top_k_arrays(rae.rae_scores(label_scores, label_ids, nb_scores, nb_ids, y, 0.0, 0.1), 3)
    assert ids0[0].tolist() == [2, 0, 1]
    vals1, ids1 = rae.top_k_arrays(rae.rae_scores(label_scores, label_ids, nb_scores, nb_ids, y, 1.0, 0.1), 2)
    assert ids1[0].tolist() == [3, 0]  # both neighbours (equal weight) carry 3, one carries 0
    np.testing.assert_allclose(vals1[0], [1.0, 0.5])


def test_padding_from_short_search_results_is_ignored():
    label_scores = np.array([[0.5, -np.inf]], np.float32)
    label_ids = np.array([[1, -1]])
    y = sp.csr_matrix(np.array([[1, 0]], np.float32))
    f = rae.rae_scores(label_scores, label_ids, np.array([[0.2, -np.inf]], np.float32), np.array([[0, -1]]), y, 0.5, 0.1)
    np.testing.assert_allclose(f.toarray(), [[0.5, 0.5]])


def test_exclude_self_drops_the_query_itself_or_the_last_neighbour():
    scores = np.array([[0.9, 0.8, 0.7], [0.9, 0.8, 0.7], [0.9, 0.9, 0.1]], np.float32)
    ids = np.array([[4, 7, 1], [3, 5, 6], [2, 8, 2]])
    s, i = rae.exclude_self(scores, ids, np.array([7, 9, 2]))
    assert i.tolist() == [[4, 1], [3, 5], [8, 2]]  # own row gone; absent -> last gone; once only
    np.testing.assert_array_equal(s, np.float32([[0.9, 0.7], [0.9, 0.8], [0.9, 0.1]]))


def test_filter_pairs_of_validation_rows():
    rows = np.sort(np.random.default_rng(0).choice(1000, 30, replace=False))
    pairs = np.array([[rows[3], 5], [rows[3] + 1 if rows[3] + 1 not in rows else 0, 6], [rows[0], 2]])
    kept = rae.rows_filter(pairs, rows)
    assert sorted(map(tuple, kept.tolist())) == [(0, 2), (3, 5)]


def _tuning_case(informative: bool):
    """20 validation queries; their labels are in their neighbours' rows (informative) or not."""
    rng = np.random.default_rng(1)
    n, num_labels, k = 20, 10, 4
    y_true = sp.csr_matrix(np.eye(num_labels, dtype=np.float32)[rng.integers(0, num_labels, n)])
    label_ids = np.tile(np.arange(k), (n, 1))  # the label side always ranks labels 0..3 first
    label_scores = np.tile(np.linspace(1, 0.5, k), (n, 1)).astype(np.float32)
    memory = sp.csr_matrix(y_true if informative else np.roll(y_true.toarray(), 1, axis=1))
    nb_ids = np.tile(np.arange(n)[:, None], (1, k))
    nb_ids[:, 1:] = (nb_ids[:, 1:] + rng.integers(1, n, (n, k - 1))) % n
    nb_scores = np.tile(np.linspace(1, 0.2, k), (n, 1)).astype(np.float32)
    return label_scores, label_ids, nb_scores, nb_ids, memory, y_true


@pytest.mark.parametrize("informative", [True, False])
def test_tune_chooses_the_memory_only_when_it_helps(informative):
    ls, li, ns, ni, memory, y_true = _tuning_case(informative)
    best, grid = rae.tune(ls, li, ns, ni, memory, y_true, np.ones(memory.shape[1]), [0.0, 0.5, 1.0], [0.1, 1.0], "P@1")
    assert [(r["lambda"], r["temperature"]) for r in grid] == [(0.0, 0.1), (0.5, 0.1), (0.5, 1.0), (1.0, 0.1), (1.0, 1.0)]
    de_only = grid[0]["P@1"]
    if informative:
        assert best["lambda"] > 0 and best["P@1"] > de_only
    else:  # the memory points at wrong labels: the dual encoder alone is kept
        assert best["lambda"] == 0.0 and best["P@1"] == max(r["P@1"] for r in grid)


def test_settings_from_a_bad_manifest_are_refused():
    assert rae.RaeSettings.from_dict({"lambda": 0.3, "temperature": 0.05, "k": 10}, "m").to_dict() == \
        {"lambda": 0.3, "temperature": 0.05, "k": 10}
    for bad in ({"lambda": 0.3}, {"lambda": 2, "temperature": 0.05, "k": 10}, "x"):
        with pytest.raises(BundleError, match="manifest.json"):
            rae.RaeSettings.from_dict(bad, "bundle/manifest.json")


# ---------------------------------------------------------------- the bundle path
@pytest.fixture(scope="module")
def rae_root(tmp_path_factory, tiny_encoder, tiny_dataset_dir):
    """An untrained tiny model's bundle with the training-query memory, evaluated with one lambda
    (so that the augmentation ships whatever the validation numbers). Read-only."""
    root = tmp_path_factory.mktemp("rae_root")
    params = parse_params({
        "model": {"encoder": str(tiny_encoder), "query_max_len": 16, "label_max_len": 12},
        "data": {"dir": str(tiny_dataset_dir)},
        "export": {"parity_texts": 8},
        "evaluate": {"k": 10},
        "rae": {"enabled": True, "k": 8, "lambdas": [0.5], "temperatures": [0.05, 0.2]},
    })
    DualEncoder.from_params(params.model).save(root / paths.MODEL_DIR)
    write_heldout_rows(root, tiny_dataset_dir)
    for stage in (run_export, run_index, run_evaluate):
        stage(params, root)
    return root, params


def test_index_stage_stores_the_training_queries_as_a_second_index(rae_root, tiny_dataset_dir):
    root, params = rae_root
    ds = read_dataset(tiny_dataset_dir)
    info = json.loads((root / paths.BUNDLE_INDEX / "index.json").read_text())
    mem = info["memory"]
    assert mem["num_queries"] == len(ds.trn) == 400 and mem["type"] == "flat" and mem["dim"] == 32
    assert mem["bytes"] == sum((root / paths.BUNDLE_INDEX / f).stat().st_size
                               for f in (MEMORY_INDEX_FILE, MEMORY_LABELS_FILE))
    predictor = Predictor(root / paths.BUNDLE_DIR)
    index, labels = predictor.memory
    assert index.ntotal == 400 and np.array_equal(labels.toarray(), (ds.trn.labels > 0).toarray())
    # the memory's vectors are the ONNX query encoder's embeddings of the training queries
    texts = ds.trn.titles[:5]
    np.testing.assert_allclose(index.reconstruct_n(0, 5), predictor.embed(texts), atol=1e-6)


def test_evaluate_ships_the_choice_and_reports_the_dual_encoder_beside_it(rae_root, tiny_dataset_dir):
    root, params = rae_root
    result = json.loads((root / paths.EVAL_METRICS).read_text())
    choice = result["rae"]
    assert choice["lambda"] == 0.5 and choice["temperature"] in (0.05, 0.2) and choice["k"] == 8
    assert choice["shipped"] is True and choice["validation"]["points"] == 40  # train.val_fraction 0.1 of 400
    assert set(choice["without_rae"]) == set(metrics.EVAL_KEYS)
    manifest = verify_bundle(root / paths.BUNDLE_DIR)
    assert manifest["rae"] == {"lambda": 0.5, "temperature": choice["temperature"], "k": 8}
    assert {"index/queries.faiss", "index/queries_labels.npz"} <= set(manifest["files"])

    # the 15 keys and the predictions file are the shipped (augmented) ranking, which Predictor serves
    ds = read_dataset(tiny_dataset_dir)
    predictor = Predictor(root / paths.BUNDLE_DIR)
    assert predictor.rae == rae.RaeSettings(0.5, choice["temperature"], 8)
    scores, ids = predictor.rank(predictor.embed(ds.tst.titles), 10)
    shipped = metrics.xmc_metrics(sp.load_npz(root / paths.PREDICTIONS), ds.tst.labels,
                                  metrics.inverse_propensity(ds.trn.labels, *ds.propensity))
    served = metrics.xmc_metrics(metrics.scores_to_csr(scores, ids, ds.num_labels), ds.tst.labels,
                                 metrics.inverse_propensity(ds.trn.labels, *ds.propensity))
    for key in metrics.EVAL_KEYS:
        assert result[key] == pytest.approx(shipped[key], abs=1e-4) == pytest.approx(served[key], abs=1e-4)
    assert any(result[k] != choice["without_rae"][k] for k in metrics.EVAL_KEYS)


def test_predictor_scores_match_the_brute_force_definition(rae_root, tiny_dataset_dir):
    root, _ = rae_root
    ds = read_dataset(tiny_dataset_dir)
    predictor = Predictor(root / paths.BUNDLE_DIR)
    s = predictor.rae
    texts = ds.tst.titles[:10]
    q = predictor.embed(texts)
    lab = predictor.embed(ds.lbl.titles, "label")
    mem = predictor.embed(ds.trn.titles)
    expected, candidates = _dense_rae(q, lab, mem, (ds.trn.labels > 0).toarray().astype(np.float64), s.k, s.lam,
                                      s.temperature)
    for row, preds in enumerate(predictor.predict(texts, k=5)):
        got = {ds.lbl.uids.index(uid): score for uid, _, score in preds}
        assert len(got) == 5
        np.testing.assert_allclose(list(got.values()), expected[row, list(got)], rtol=1e-4, atol=1e-6)
        assert min(got.values()) >= np.sort(expected[row])[-5] - 1e-5  # nothing better left out

    plain = Predictor(root / paths.BUNDLE_DIR, rae=False).predict(texts, 5)
    assert plain != predictor.predict(texts, 5)


def test_cli_serves_with_and_without_the_memory_and_no_torch(rae_root):
    root, _ = rae_root
    bundle = root / paths.BUNDLE_DIR
    code = (
        "import sys, json\n"
        "import dexml\n"
        f"p = dexml.Predictor({str(bundle)!r})\n"
        "assert p.rae is not None\n"
        "print(json.dumps(p.predict(['tuma ribo tugo'], 3)))\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers'))\n"
        "assert not heavy, heavy[:5]\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == [[list(x) for x in Predictor(bundle).predict(["tuma ribo tugo"], 3)[0]]]
    cli = subprocess.run([sys.executable, "-m", "dexml.cli", "predict", "--bundle", str(bundle), "--no-rae", "-k", "2",
                          "tuma ribo tugo"], capture_output=True, text=True, timeout=120, env=env, cwd=REPO)
    assert cli.returncode == 0, cli.stderr
    uids = [line.split()[2] for line in cli.stdout.splitlines()[1:]]
    assert uids == [u for u, _, _ in Predictor(bundle, rae=False).predict(["tuma ribo tugo"], 2)[0]]


def test_lambda_zero_ships_the_dual_encoder_alone(rae_root, tmp_path):
    root, params = rae_root
    copy = tmp_path / "root"
    shutil.copytree(root / paths.BUNDLE_DIR, copy / paths.BUNDLE_DIR)
    shutil.copytree(root / "models", copy / "models")
    raw = params.to_dict()
    raw["rae"]["lambdas"] = [0.0]
    result = run_evaluate(parse_params(raw), copy)
    assert result["rae"]["shipped"] is False and result["rae"]["lambda"] == 0.0
    assert all(result[k] == result["rae"]["without_rae"][k] for k in metrics.EVAL_KEYS)
    assert verify_bundle(copy / paths.BUNDLE_DIR)["rae"] is None and Predictor(copy / paths.BUNDLE_DIR).rae is None


def test_enabled_without_a_memory_is_a_clear_error(rae_root, tmp_path):
    root, params = rae_root
    copy = tmp_path / "root"
    shutil.copytree(root / paths.BUNDLE_DIR, copy / paths.BUNDLE_DIR)
    (copy / paths.BUNDLE_INDEX / MEMORY_INDEX_FILE).unlink()
    with pytest.raises(BundleError, match="queries.faiss: file not found"):
        run_evaluate(params, copy)
    assert not (copy / paths.EVAL_METRICS).exists()


# ---------------------------------------------------------------- bench/head_tail.py at toy size
@pytest.mark.slow
def test_head_tail_bench_scores_every_variant_and_tunes_on_validation(tiny_encoder, tiny_dataset_dir, tmp_path):
    from bench import head_tail

    doc = head_tail.main(["--data", str(tiny_dataset_dir), "--encoder", str(tiny_encoder), "--device", "cpu",
                          "--variants", "de,bias", "--epochs", "1", "--max-steps", "2", "--batch-size", "64",
                          "--rae-k", "10", "--lambdas", "0,0.5,1", "--temperatures", "0.05,0.1",
                          "--out", str(tmp_path / "ht.json"), "--workdir", str(tmp_path / "work")])
    rows = {r["method"]: r for r in doc["rows"]}
    assert set(rows) == {"de: DE", "de: +RAE", "bias: DE", "bias: DE, bias dropped at test", "bias: +RAE",
                         "TF-IDF 50-NN"}
    assert json.loads((tmp_path / "ht.json").read_text())["rows"] == doc["rows"]
    for name in ("de: +RAE", "bias: +RAE"):
        r = rows[name]
        assert r["lambda"] in (0, 0.5, 1) and r["T"] in (0.05, 0.1) and len(r["val_grid"]) == 5
        assert r["val_best"]["P@5"] >= r["val_without_rae"]["P@5"]  # lambda 0 is in the grid
    assert rows["bias: DE"]["bias"]["max"] > 0 > rows["bias: DE"]["bias"]["min"]
    assert doc["settings"]["validation_points"] == 40


def test_head_tail_latency_mode_times_both_paths(rae_root, tiny_dataset_dir, tmp_path):
    from bench import head_tail

    root, _ = rae_root
    doc = head_tail.main(["--latency-bundle", str(root / paths.BUNDLE_DIR), "--data", str(tiny_dataset_dir),
                          "--latency-queries", "5", "--out", str(tmp_path / "lat.json")])
    (row,) = doc["rows"]
    assert row["queries"] == 5 and row["with_rae"]["p50_ms"] > 0 and row["without_rae"]["p50_ms"] > 0
    assert row["memory"]["num_queries"] == 400 and row["rae"]["k"] == 8


def test_tuning_reads_the_rows_train_held_out_and_refuses_foreign_ones(rae_root, tmp_path):
    from dexml import fileio
    from dexml.pipeline.evaluate import read_heldout_rows

    root, params = rae_root
    n = len(read_dataset(params.data.dir).trn)
    rows = read_heldout_rows(root / paths.HELDOUT_ROWS, n)
    assert len(rows) == max(1, int(n * params.train.val_fraction)) and (np.diff(rows) > 0).all()
    bad = tmp_path / "heldout.json"
    fileio.write_json(bad, {"num_train": n + 1, "rows": rows.tolist()})
    with pytest.raises(BundleError, match=rf"heldout.json: expected the held-out rows of a training split of {n} "):
        read_heldout_rows(bad, n)
    fileio.write_json(bad, {"num_train": n, "rows": [n]})
    with pytest.raises(BundleError, match="rerun train"):
        read_heldout_rows(bad, n)
