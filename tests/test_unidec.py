"""UniDEC's classifier head: row-wise Adagrad touches only the pool's rows, the head starts as the
dual encoder, its fold into the label index ranks exactly as the model's combined score (ties
included), it trains end to end with label_bias, rae and int8, and checkpoints carry its state."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from dexml import paths
from dexml.config import ExportParams, IndexParams, ModelParams, parse_params
from dexml.data.dataset import read_dataset, write_dataset
from dexml.errors import BundleError, ConfigError
from dexml.pipeline.evaluate import run as run_evaluate
from dexml.pipeline.export import export_encoder, parity_texts
from dexml.pipeline.export import run as run_export
from dexml.pipeline.index import run as run_index
from dexml.serve import classifier as serve_classifier
from dexml.serve import priors
from dexml.serve.index import build_index
from dexml.serve.predictor import Predictor
from dexml.train import loop
from dexml.train.classifier import ClassifierHead
from dexml.train.model import DualEncoder

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/


def _dyadic(rng, shape, denominator):
    """Values k / denominator: sums of their products are exact in float32."""
    return (rng.integers(-denominator, denominator + 1, shape) / denominator).astype(np.float32)


def _check_ranking(scores, ids, reference, k, atol=0.0):
    """Tie-aware: the returned scores are the reference's k best values (in order), the returned
    ids carry exactly those values (any of tied labels), no id twice."""
    for row, (s, i) in enumerate(zip(scores, ids)):
        best = np.sort(reference[row])[::-1][:k]
        np.testing.assert_allclose(s, best, atol=atol, rtol=0)
        np.testing.assert_allclose(reference[row][i], best, atol=atol, rtol=0)
        assert len(set(i.tolist())) == k


# ---------------------------------------------------------------- the row-wise optimizer
def test_rowwise_adagrad_updates_only_the_pool_rows_by_the_formula():
    head = ClassifierHead(4, 10, lr=0.5, table=torch.arange(40, dtype=torch.float32).reshape(10, 4) / 40)
    before = head.table.clone()
    q = torch.tensor([[1.0, 0.0, 2.0, 0.0], [0.0, 1.0, 0.0, -1.0]])
    scores = head.pool_scores(q, np.array([7, 2, 7 + 0]), tau=0.5)[:, :2]  # label 7 twice: gradients add
    scores.sum().backward()
    (_, rows), = head._pending
    grad = torch.zeros(2, 4)
    grad[0] = rows.grad[0] + rows.grad[2]
    grad[1] = rows.grad[1]
    assert head.step(lr_factor=0.5) == 2
    touched = [2, 7]
    untouched = [r for r in range(10) if r not in touched]
    torch.testing.assert_close(head.table[untouched], before[untouched], rtol=0, atol=0)
    assert head.sum_sq[untouched].abs().sum() == 0
    for row, g in zip((7, 2), grad):
        acc = g.pow(2).mean()
        torch.testing.assert_close(head.sum_sq[row], acc)
        torch.testing.assert_close(head.table[row], before[row] - 0.25 * g / acc.sqrt())
    assert head.step() == 0  # nothing pending: nothing changes


def test_head_at_embedding_init_scores_as_the_dual_encoder_and_zeros_as_nothing(tiny_encoder):
    y = sp.csr_matrix(np.eye(3, dtype=np.float32))
    model = DualEncoder.from_params(ModelParams(encoder=str(tiny_encoder), tau=0.5, classifier=True), train_labels=y)
    assert model.classifier.table.shape == (3, model.meta.dim) and model.meta.classifier
    assert not any(p is model.classifier.table for p in model.parameters())  # not in AdamW's hands
    q = model.embed(["alpha beta", "gamma"])
    labels = model.embed(["one", "two", "three"], "label")
    ids = torch.arange(3)
    torch.testing.assert_close(model.serving_scores(q, labels, ids), model.scores(q, labels, ids))  # zeros
    model.classifier.init_table(labels)
    torch.testing.assert_close(model.serving_scores(q, labels, ids), 2 * model.scores(q, labels, ids))
    with pytest.raises(ConfigError, match="model.classifier"):
        DualEncoder.from_params(ModelParams(encoder=str(tiny_encoder), classifier=True))


# ---------------------------------------------------------------- the fold
@pytest.mark.parametrize("gamma", [1.0, 0.5, 2.0])
def test_folded_index_ranks_exactly_as_the_combined_score_ties_included(gamma):
    rng = np.random.default_rng(0)
    d, L, tau = 16, 120, 0.5
    q, e = _dyadic(rng, (25, d), 8), _dyadic(rng, (L, d), 8)
    weight, c, table = _dyadic(rng, (d, d), 4), _dyadic(rng, d, 4), _dyadic(rng, (L, d), 4)
    bias = _dyadic(rng, L, 4)
    for a, b in ((3, 50), (10, 11), (60, 99)):  # duplicate labels: exact ties in every query's scores
        e[b], table[b], bias[b] = e[a], table[a], bias[a]
    vectors, offsets = serve_classifier.fold(e, weight, c, table, gamma)
    index, info = build_index(priors.fold_labels(vectors, offsets + tau * bias, 1.0), IndexParams(type="flat"))
    assert info["dim"] == d + 1  # the same size as the dual encoder's index with a label bias
    scores, ids = index.search(priors.fold_queries(q), 30)

    # the model's score, head by head, in float64
    q64 = q.astype(np.float64)
    s_de = q64 @ e.T / tau + bias
    s_cls = (q64 @ weight.T.astype(np.float64) + c) @ table.T / tau
    combined = s_de + gamma * s_cls
    _check_ranking(scores / tau, ids, combined, 30)
    assert (combined[:, 3] == combined[:, 50]).all()
    assert np.unique(combined).size < combined.size


def test_classifier_file_errors_name_the_file(tmp_path):
    path = tmp_path / serve_classifier.CLASSIFIER_FILE
    serve_classifier.write_classifier(path, np.eye(3), np.zeros(3), np.ones((5, 3)))
    weight, _, table = serve_classifier.read_classifier(path, num_labels=5, dim=3)
    assert weight.shape == (3, 3) and table.shape == (5, 3)
    with pytest.raises(BundleError, match="5 label vectors, but the dataset has 6"):
        serve_classifier.read_classifier(path, num_labels=6)
    with pytest.raises(BundleError, match="vectors of size 3, but the encoder embeds to 4"):
        serve_classifier.read_classifier(path, dim=4)
    serve_classifier.write_classifier(path, np.eye(3), np.zeros(3), np.full((5, 3), np.nan))
    with pytest.raises(BundleError, match="`table` holds values that are not finite"):
        serve_classifier.read_classifier(path)
    path.write_bytes(b"nope")
    with pytest.raises(BundleError, match=f"{serve_classifier.CLASSIFIER_FILE}: expected safetensors"):
        serve_classifier.read_classifier(path)


def test_bundle_ranks_as_the_pytorch_combined_score_with_tied_labels(tiny_encoder, tiny_dataset_dir, tmp_path):
    """An untrained model with a random head and label bias; labels 0 and 1 have the same text, the
    same table row and bias, so every query scores them equally (a tie the bundle must keep)."""
    ds = read_dataset(tiny_dataset_dir)
    ds.lbl.titles[1] = ds.lbl.titles[0]
    write_dataset(ds, tmp_path / "data")
    raw = {"data": {"dir": str(tmp_path / "data")},
           "model": {"encoder": str(tiny_encoder), "tau": 0.1, "label_bias": True, "classifier": True},
           "index": {"type": "flat", "classifier_gamma": 0.5}}
    params = parse_params(raw)
    model = DualEncoder.from_params(params.model, train_labels=ds.trn.labels).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        head = model.classifier
        head.table.copy_(torch.randn(head.table.shape, generator=g) * 0.3)
        head.table[1] = head.table[0]
        head.projection.weight.add_(torch.randn(head.projection.weight.shape, generator=g) * 0.1)
        head.projection.bias.copy_(torch.randn(head.projection.bias.shape, generator=g) * 0.1)
        model.label_bias.raw.copy_(torch.randn(ds.num_labels, generator=g) * 0.01)
        model.label_bias.raw[1] = model.label_bias.raw[0]
    model.save(tmp_path / paths.MODEL_DIR)
    texts = parity_texts(tmp_path / "data", params.data, 8)
    report = export_encoder(tmp_path / paths.MODEL_DIR, tmp_path / paths.BUNDLE_ENCODER, ExportParams(), texts)
    assert report["parity"]["combined"]["max_abs_diff"] < 1e-5
    info = run_index(params, tmp_path)
    assert info["dim"] == model.meta.dim + 1 and info["classifier"]["gamma"] == 0.5

    queries = ds.tst.titles[:30]
    with torch.no_grad():
        combined = model.serving_scores(model.embed(queries), model.embed(ds.lbl.titles, "label"),
                                        torch.arange(ds.num_labels), gamma=0.5).numpy()
    assert (combined[:, 0] == combined[:, 1]).all()
    predictor = Predictor(tmp_path / paths.BUNDLE_DIR, verify=False, rae=False)
    scores, ids = predictor.search(predictor.embed(queries), ds.num_labels)
    _check_ranking(scores / 0.1, ids, combined, ds.num_labels, atol=2e-4)
    for row in range(len(queries)):  # the tied pair is returned side by side with equal scores
        pos = [list(ids[row]).index(0), list(ids[row]).index(1)]
        assert abs(pos[0] - pos[1]) == 1 and scores[row, pos[0]] == scores[row, pos[1]]


# ---------------------------------------------------------------- trained end to end
@pytest.fixture(scope="module")
def unidec_root(tmp_path_factory, tiny_encoder, tiny_dataset_dir):
    """A tiny model trained with the classifier head, label_bias, rae and int8; exported, indexed,
    evaluated. Read-only."""
    root = tmp_path_factory.mktemp("unidec_root")
    raw = {
        "data": {"dir": str(tiny_dataset_dir)},
        "model": {"encoder": str(tiny_encoder), "tau": 0.1, "query_max_len": 16, "label_max_len": 12,
                  "label_bias": True, "classifier": True},
        "negatives": {"mode": "in-batch"},
        # sample_positives 0: every positive is in its step's in-batch pool (with 1, only the sampled
        # positive is), so exactly the labels with a training positive reach a pool
        "train": {"epochs": 2, "batch_size": 32, "lr": 3e-3, "seed": 0, "warmup": 0.0, "num_threads": 1,
                  "sample_positives": 0},
        "export": {"parity_texts": 8, "quantize_int8": True},
        "evaluate": {"k": 10},
        "rae": {"enabled": True, "k": 8, "lambdas": [0.0, 0.5], "temperatures": [0.1]},
    }
    params = parse_params(raw)
    loop.train(params, root)
    for stage in (run_export, run_index, run_evaluate):
        stage(params, root)
    return root, params


def test_trained_head_moves_the_pool_rows_and_saves_beside_a_sentence_transformers_model(unidec_root, tiny_encoder):
    from sentence_transformers import SentenceTransformer

    root, params = unidec_root
    model = DualEncoder.load(root / paths.MODEL_DIR)
    fresh = DualEncoder.from_params(params.model, train_labels=read_dataset(params.data.dir).trn.labels)
    labels = read_dataset(params.data.dir).lbl.titles
    init = fresh.embed(labels, "label")
    moved = ((model.classifier.table - init).norm(dim=1) > 1e-3).numpy()
    y = read_dataset(params.data.dir).trn.labels
    held_out = json.loads((root / paths.HELDOUT_ROWS).read_text())["rows"]
    trained = np.asarray(y[np.setdiff1d(np.arange(y.shape[0]), held_out)].sum(0)).ravel() > 0
    assert 0 < (~trained).sum() and trained.sum() > 30
    # in-batch pools hold the batch's positives only (all of them with sample_positives 0): exactly
    # the labels with a training positive move
    np.testing.assert_array_equal(moved, trained)
    assert (model.classifier.projection.weight - torch.eye(model.meta.dim)).abs().max() > 1e-4
    assert (root / paths.MODEL_DIR / serve_classifier.CLASSIFIER_FILE).exists()
    st = SentenceTransformer(str(root / paths.MODEL_DIR), device="cpu")  # the DE head, as before
    np.testing.assert_allclose(st.encode(["tuma ribo"], normalize_embeddings=False),
                               model.embed(["tuma ribo"]).numpy(), atol=1e-5)


def test_evaluate_serves_the_folded_head_with_rae_and_int8_and_records_the_scoring(unidec_root):
    root, _ = unidec_root
    result = json.loads((root / paths.EVAL_METRICS).read_text())
    assert "int8" in result and "P@5" in result["rae"]["without_rae"]
    manifest = json.loads((root / paths.BUNDLE_MANIFEST).read_text())
    assert manifest["scoring"] == {"dual_encoder": True, "label_bias": True, "classifier": True,
                                   "classifier_gamma": 1.0, "index_dim": 33,
                                   "retrieval_augmented": result["rae"]["shipped"]}
    encoder_meta = json.loads((root / paths.BUNDLE_ENCODER / "encoder.json").read_text())
    assert encoder_meta["classifier"] == serve_classifier.CLASSIFIER_FILE
    preds = Predictor(root / paths.BUNDLE_DIR, int8=True).predict(["tuma ribo tugo"], 3)[0]
    assert len(preds) == 3 and preds[0][2] >= preds[1][2] >= preds[2][2]


def test_checkpoint_holds_the_table_and_its_optimizer_state_and_resume_matches(tiny_params, tiny_dataset_dir,
                                                                               tmp_path, monkeypatch):
    raw = tiny_params(data={"dir": str(tiny_dataset_dir)}, model={"classifier": True},
                      negatives={"mode": "in-batch"}, train={"epochs": 2, "num_threads": 1})
    params = parse_params(raw)
    straight = tmp_path / "straight"
    loop.train(params, straight)

    crashed = tmp_path / "crashed"
    real_validate, calls = loop.validate, []

    def validate_then_crash(*args, **kwargs):  # a crash right after epoch 1's checkpoint
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_validate(*args, **kwargs)

    monkeypatch.setattr(loop, "validate", validate_then_crash)
    with pytest.raises(KeyboardInterrupt):
        loop.train(params, crashed)
    state = torch.load(crashed / paths.CHECKPOINT_DIR / "last.pt", weights_only=True)
    assert state["model"]["classifier.table"].shape[0] == read_dataset(tiny_dataset_dir).num_labels
    assert (state["model"]["classifier.sum_sq"] > 0).any()
    monkeypatch.setattr(loop, "validate", real_validate)
    loop.train(params, crashed)
    a = DualEncoder.load(straight / paths.MODEL_DIR).state_dict()
    b = DualEncoder.load(crashed / paths.MODEL_DIR).state_dict()
    for name in ("classifier.table", "classifier.projection.weight",
                 "query_tower.transformer.embeddings.word_embeddings.weight"):
        torch.testing.assert_close(a[name], b[name], atol=1e-5, rtol=1e-4, msg=name)


def test_head_trains_with_the_cached_label_pool(tiny_params, tiny_dataset_dir, tmp_path):
    """`cached` scores every label each step (its fresh labels re-encoded, the rest from the cache):
    the classifier gets every row's gradient; PSL with two positives per query."""
    raw = tiny_params(data={"dir": str(tiny_dataset_dir)}, model={"classifier": True, "label_bias": True},
                      negatives={"mode": "cached", "refresh_steps": 4, "num_hard": 4},
                      train={"epochs": 1, "num_threads": 1, "sample_positives": 2})
    params = parse_params(raw)
    metrics = loop.train(params, tmp_path)
    model = DualEncoder.load(tmp_path / paths.MODEL_DIR)
    fresh = DualEncoder.from_params(params.model, train_labels=read_dataset(tiny_dataset_dir).trn.labels)
    moved = ((model.classifier.table - fresh.embed(read_dataset(tiny_dataset_dir).lbl.titles, "label"))
             .norm(dim=1) > 1e-4)
    assert metrics["val_P@1"] > 0 and moved.all()  # every label is in every step's pool


# ---------------------------------------------------------------- label-sharded multi-process (gloo)
WORLD = 2
DIST_ROWS = [0, 3, 5, 8, 13, 21, 34]


def _classifier_steps(ctx, encoder_dir: str, dataset_dir: str) -> dict:
    """Two training steps of a model with a classifier head and label bias (this process's part of
    each, in `ctx`): the losses, the averaged parameter gradients of the first step, the table and
    its Adagrad state after both. Dropout off (eval), as in tests/test_distributed.py."""
    from dexml.train import negatives
    from dexml.train.tokens import tokenize

    ds = read_dataset(dataset_dir)
    torch.manual_seed(0)
    p = ModelParams(encoder=encoder_dir, tau=0.1, classifier=True, label_bias=True)
    model = DualEncoder.from_params(p, train_labels=ds.trn.labels).to(ctx.device).eval()
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        model.classifier.table.copy_(torch.randn(model.classifier.table.shape, generator=g))
    q_tok, l_tok = tokenize(ds.trn.texts(), model.tokenizer, 16), tokenize(ds.lbl.texts(), model.tokenizer, 12)
    y = ds.trn.labels.tocsr()
    out = {}
    for step, mode in enumerate(("all", "in-batch")):
        model.zero_grad(set_to_none=True)
        rows = np.array(DIST_ROWS)
        whole = negatives.build_pool(mode, y[rows], np.random.default_rng(step), 1)
        q_ids, q_mask = q_tok.batch(ctx.share(rows), ctx.device)
        loss = loop.train_step(model, q_ids, q_mask, l_tok, negatives.shard(whole, ctx.rank, ctx.world), "softmax",
                               5, ctx.device, group=ctx.group)
        ctx.average_gradients(model)
        out[f"loss{step}"] = torch.tensor(loss, dtype=torch.float64)
        if step == 0:
            out["grad_projection"] = model.classifier.projection.weight.grad.clone()
        changed = model.classifier.step(0.5, ctx.group, 1.0 / ctx.world)
        out[f"changed{step}"] = torch.tensor(changed)
    out["table"], out["sum_sq"] = model.classifier.table.clone(), model.classifier.sum_sq.clone()
    return out


def _dist_worker(rank: int, port: int, encoder_dir: str, dataset_dir: str, out_dir: str) -> None:
    import os
    from pathlib import Path

    from safetensors.torch import save_file

    from dexml.train import distributed

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    with distributed.setup(torch.device("cpu")) as ctx:
        out = _classifier_steps(ctx, encoder_dir, dataset_dir)
        ctx.barrier()
    save_file(out, str(Path(out_dir) / f"rank{rank}.safetensors"))


def test_two_ranks_train_the_table_as_one_process(tiny_encoder, tiny_dataset_dir, tmp_path):
    import socket
    import time

    import torch.multiprocessing as mp
    from safetensors.torch import load_file

    from dexml.train import distributed

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = mp.start_processes(_dist_worker, args=(port, str(tiny_encoder), str(tiny_dataset_dir), str(tmp_path)),
                               nprocs=WORLD, join=False, start_method="spawn")
    deadline = time.time() + 300
    try:
        while not procs.join(timeout=1.0):
            assert time.time() < deadline, "distributed workers still running after 300 s"
    finally:
        for proc in procs.processes:
            if proc.is_alive():
                proc.kill()
    one = _classifier_steps(distributed.Context(torch.device("cpu")), str(tiny_encoder), str(tiny_dataset_dir))
    assert int(one["changed0"]) == read_dataset(tiny_dataset_dir).num_labels  # `all`: every row moves
    assert 0 < int(one["changed1"]) < int(one["changed0"])  # in-batch: the batch's positives only
    for rank in (load_file(tmp_path / f"rank{r}.safetensors") for r in range(WORLD)):
        for key in ("loss0", "loss1"):
            assert float(rank[key]) == pytest.approx(float(one[key]), rel=1e-6)
        assert int(rank["changed1"]) == int(one["changed1"])
        torch.testing.assert_close(rank["grad_projection"], one["grad_projection"], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(rank["table"], one["table"], atol=1e-5, rtol=1e-5)  # same rows, same update
        torch.testing.assert_close(rank["sum_sq"], one["sum_sq"], atol=1e-7, rtol=1e-4)


# ---------------------------------------------------------------- the benchmarks, at toy size
def test_bench_serving_fold_is_exact_and_rescoring_is_not(tmp_path):
    from bench import unidec_serving

    doc = unidec_serving.main(["--labels", "400", "--dim", "16", "--queries", "50", "--shortlist", "5",
                               "--out", str(tmp_path / "s.json")])
    rows = {(r["method"], r["index"]): r for r in doc["rows"]}
    assert rows[("fold", "flat")]["recall@10"] == 1.0 and rows[("fold_2d", "flat")]["recall@10"] == 1.0
    assert rows[("rescore top-5", "flat")]["recall@10"] <= 0.5  # a shortlist of 5 cannot hold a top-10
    assert rows[("fold_2d", "flat")]["index_mb"] > rows[("fold", "flat")]["index_mb"]


def test_bench_unidec_rows_through_the_pipeline(tiny_encoder, tiny_dataset_dir, tmp_path):
    from bench import unidec as bench_unidec

    doc = bench_unidec.main(["--data", str(tiny_dataset_dir), "--configs", "tfidf,cls,cls_rae",
                             "--work", str(tmp_path / "w"), "--out", str(tmp_path / "u.json"),
                             "-S", f"model.encoder={tiny_encoder}", "-S", "train.epochs=1", "-S", "model.tau=0.1",
                             "-S", "train.lr=3e-3", "-S", "model.query_max_len=16", "-S", "export.parity_texts=4",
                             "-S", "rae.lambdas=[0.0,0.5]", "-S", "rae.temperatures=[0.1]"])
    rows = {r["config"]: r for r in doc["rows"]}
    assert "error" not in rows["cls"] and "error" not in rows["cls_rae"], rows
    assert rows["cls"]["classifier_table_floats"] == 40 * 32
    assert rows["cls_rae"]["lambda"] in (0.0, 0.5) and rows["cls_rae"]["without_rae"]["P@1"] == rows["cls"]["P@1"]
    assert rows["cls_rae"]["bundle_mb"] > rows["cls"]["bundle_mb"]  # + the training-query memory
    assert 0 <= rows["tfidf"]["P@1"] <= 100


def test_ranking_vectors_fold_the_head_as_the_index_does(tiny_encoder):
    y = sp.csr_matrix(np.eye(5, dtype=np.float32))
    model = DualEncoder.from_params(ModelParams(encoder=str(tiny_encoder), tau=0.2, classifier=True, label_bias=True),
                                    train_labels=y)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        model.classifier.table.copy_(torch.randn(model.classifier.table.shape, generator=g))
        model.classifier.projection.bias.copy_(torch.randn(model.meta.dim, generator=g))
        model.label_bias.raw.copy_(torch.randn(5, generator=g) * 0.01)
        q, labels = model.embed(["a b", "c"]), model.embed(["l0", "l1", "l2", "l3", "l4"], "label")
        vectors, bias = model.ranking_vectors(labels, model.label_bias())
        torch.testing.assert_close(q @ vectors.T / 0.2 + bias, model.serving_scores(q, labels, torch.arange(5)),
                                   atol=1e-4, rtol=1e-5)
