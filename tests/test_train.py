"""Training: gradient caching equals the naive backward; every negative mode learns; resume works."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import torch
import yaml

from dexml import paths
from dexml.config import parse_params
from dexml.data.dataset import read_dataset
from dexml.errors import ConfigError
from dexml.train.loop import train, train_step, validate
from dexml.train.losses import get_loss
from dexml.train.model import DualEncoder
from dexml.train.negatives import (
    build_pool,
    build_shortlist,
    sample_hard,
    sample_positives,
)
from dexml.train.tokens import cached_tokenize, tokenize

REPO = Path(__file__).resolve().parents[1]


def _workdir(tmp_path, dataset_dir) -> Path:
    (tmp_path / "data").mkdir(parents=True)
    shutil.copytree(dataset_dir, tmp_path / "data" / "dataset")
    return tmp_path


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("loss_name", ["decoupled_softmax", "soft_topk"])
def test_gradient_caching_equals_naive_backward_with_dropout(tiny_params, tiny_dataset_dir, loss_name):
    p = parse_params(tiny_params(loss={"name": loss_name, "k": 3}))
    model = DualEncoder.from_params(p.model)
    model.train()  # dropout on: the re-encode must reproduce the same masks
    assert model.query_tower.transformer.config.hidden_dropout_prob > 0
    ds = read_dataset(tiny_dataset_dir)
    l_tok = tokenize(ds.lbl.texts(), model.tokenizer, 12)
    q_tok = tokenize(ds.trn.texts(), model.tokenizer, 16)
    rows = np.arange(8)
    pool = build_pool("all", ds.trn.labels[rows], np.random.default_rng(0), 1)
    loss_fn = get_loss(loss_name, **({"k": 3} if loss_name == "soft_topk" else {}))
    q_ids, q_mask = q_tok.batch(rows)
    device = torch.device("cpu")

    torch.manual_seed(123)
    cached_loss = train_step(model, q_ids, q_mask, l_tok, pool, loss_name, chunk=7, device=device,
                             **({"k": 3} if loss_name == "soft_topk" else {}))
    cached = _grads(model)
    model.zero_grad()

    torch.manual_seed(123)  # naive: same encode order, everything with autograd
    q = model.encode_queries(q_ids, q_mask)
    embs = [model.encode_labels(*l_tok.batch(pool.labels[s:s + 7])) for s in range(0, len(pool.labels), 7)]
    loss = loss_fn(model.scores(q, torch.cat(embs)), torch.from_numpy(pool.positives.toarray()),
                   torch.from_numpy(pool.masked.toarray()))
    loss.backward()
    naive = _grads(model)

    assert cached_loss == pytest.approx(loss.item(), rel=1e-6)
    assert cached.keys() == naive.keys() and len(cached) > 10
    for name in naive:
        torch.testing.assert_close(cached[name], naive[name], atol=1e-6, rtol=1e-4, msg=name)


def _eval_model(p):
    model = DualEncoder.from_params(p.model)
    model.eval()  # no dropout: two computations of the same step must agree exactly
    return model


def test_one_encode_for_a_small_pool_equals_gradient_caching(tiny_params, tiny_dataset_dir):
    p = parse_params(tiny_params())
    model = _eval_model(p)
    ds = read_dataset(tiny_dataset_dir)
    l_tok, q_tok = tokenize(ds.lbl.texts(), model.tokenizer, 12), tokenize(ds.trn.texts(), model.tokenizer, 16)
    pool = build_pool("in-batch", ds.trn.labels[np.arange(8)], np.random.default_rng(0), 1)
    assert 5 < len(pool.labels) <= 64
    results = []
    for chunk in (64, 5):  # one encode with autograd | no-grad chunks, re-encoded after the loss
        model.zero_grad()
        loss = train_step(model, *q_tok.batch(np.arange(8)), l_tok, pool, "decoupled_softmax", chunk, torch.device("cpu"))
        results.append((loss, _grads(model)))
    (l1, g1), (l2, g2) = results
    assert l1 == pytest.approx(l2, rel=1e-6) and g1.keys() == g2.keys() and len(g1) > 10
    for name in g1:
        torch.testing.assert_close(g1[name], g2[name], atol=1e-6, rtol=1e-4, msg=name)


@pytest.mark.parametrize("chunk", [100, 3])
def test_cached_step_scores_every_label_and_back_propagates_through_fresh_rows_only(tiny_params, tiny_dataset_dir,
                                                                                   chunk):
    from dexml.train import negatives

    p = parse_params(tiny_params(negatives={"mode": "cached", "num_hard": 2, "num_random": 1, "label_chunk": chunk},
                                 model={"label_bias": True}, train={"sample_positives": 1}))
    ds = read_dataset(tiny_dataset_dir)
    y = ds.trn.labels.tocsr()
    model = DualEncoder.from_params(p.model, train_labels=y)
    model.eval()
    with torch.no_grad():
        model.label_bias.raw.normal_(0, 0.01)
    l_tok, q_tok = tokenize(ds.lbl.texts(), model.tokenizer, 12), tokenize(ds.trn.texts(), model.tokenizer, 16)
    rows = np.arange(6)
    setup = negatives.Setup(p.negatives, 1, ds.num_labels, l_tok, q_tok, np.arange(len(ds.trn)), y, torch.device("cpu"))
    mode = negatives.make_mode(setup)
    mode.refresh(model, 0, 0)
    table = mode.table.clone()
    with torch.no_grad():  # make the cache visibly stale, so fresh and cached rows differ
        mode.table.mul_(0.9)
    stale = mode.table.clone()
    pool = mode.pool(rows, y[rows], np.random.default_rng(0))
    assert len(pool.labels) == ds.num_labels and pool.positives.sum(axis=1).A1.tolist() == [1] * 6
    q_ids, q_mask = q_tok.batch(rows)
    with torch.no_grad():
        q = model.encode_queries(q_ids, q_mask)
    fresh = pool.fresh_positions(q)
    # per query its 2 best negatives under the cached scores (bias included) are fresh
    s = q @ stale.T / model.meta.tau + model.label_bias().detach()
    s[torch.from_numpy(y[rows].toarray() > 0)] = float("-inf")
    assert set(torch.topk(s, 2, dim=1).indices.flatten().tolist()) <= set(fresh.tolist())
    assert set(pool.positives.indices) <= set(fresh.tolist()) and len(fresh) < ds.num_labels

    model.zero_grad()
    loss = train_step(model, q_ids, q_mask, l_tok, pool, "decoupled_softmax", chunk, torch.device("cpu"))
    got = _grads(model)
    assert torch.equal(mode.table, stale)  # fresh (training) embeddings never written back
    model.zero_grad()  # reference: every label scored; fresh rows encoded with autograd, stale rows constant
    q = model.encode_queries(q_ids, q_mask)
    labels = stale.clone()
    labels = labels.index_put((torch.from_numpy(fresh),), model.encode_labels(*l_tok.batch(fresh)))
    want = get_loss("decoupled_softmax")(model.scores(q, labels, torch.arange(ds.num_labels)),
                                         torch.from_numpy(pool.positives.toarray()),
                                         torch.from_numpy(pool.masked.toarray()))
    want.backward()
    assert loss == pytest.approx(want.item(), rel=1e-5)
    ref = _grads(model)
    assert got.keys() == ref.keys() and "label_bias.raw" in got
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], atol=1e-6, rtol=1e-4, msg=name)
    assert not torch.equal(table, stale)


def test_pools_targets_masks_and_hard_negatives():
    y = sp.csr_matrix(np.array([[1, 1, 0, 0, 0, 0], [0, 0, 1, 0, 0, 0]], np.float32))
    rng = np.random.default_rng(0)
    pool = build_pool("in-batch", y, rng, 1)
    assert sp.issparse(pool.positives) and sp.issparse(pool.masked)
    # one positive drawn per row; the pool is the drawn positives (the other one is not encoded)
    assert len(pool.labels) == 2 and 2 in pool.labels and pool.positives.sum(axis=1).A1.tolist() == [1, 1]
    assert pool.masked.nnz == 0
    both = build_pool("in-batch", y, rng, 0)
    assert both.labels.tolist() == [0, 1, 2] and both.masked.nnz == 0 and both.positives.nnz == 3
    y2 = sp.csr_matrix(np.array([[1, 1, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0]], np.float32))
    for seed in range(5):  # a row's undrawn positive that is another row's drawn one: masked, not a negative
        p2 = build_pool("in-batch", y2, np.random.default_rng(seed), 1)
        pos, masked = p2.positives.toarray(), p2.masked.toarray()
        assert not (pos & masked).any() and ((pos | masked).sum(axis=1) == len(p2.labels)).all()
    every = build_pool("all", y, rng, 1)
    assert len(every.labels) == 6 and every.masked.sum() == 1  # all: the undrawn positive is masked
    shortlist = np.array([[3, 4, -1], [5, -1, -1]])
    hard = build_pool("hard", y, rng, 1, shortlist_rows=shortlist, num_hard=2)
    assert {2, 3, 4, 5} <= set(hard.labels) and len(hard.labels) == 5
    assert sorted(sample_hard(np.array([[7, -1, 8]]), 5, rng).tolist()) == [7, 8]

    q = np.eye(3, dtype=np.float32)
    lab = np.eye(3, dtype=np.float32) + 0.1
    sl = build_shortlist(q, lab, sp.csr_matrix(np.eye(3, dtype=np.float32)), size=2)
    assert sl.shape == (3, 2) and not (sl == np.arange(3)[:, None]).any()  # positives removed


def test_psl_keeps_up_to_beta_positives_uniformly_and_reproducibly():
    counts = np.array([0, 1, 3, 6, 10])
    rows = [np.random.default_rng(i).choice(50, n, replace=False) for i, n in enumerate(counts)]
    y = sp.csr_matrix((np.ones(counts.sum()), np.concatenate(rows), np.concatenate([[0], np.cumsum(counts)])),
                      shape=(5, 50))
    y.sort_indices()
    for beta in (1, 2, 4):
        keep = sample_positives(y, beta, np.random.default_rng(7))
        per_row = np.add.reduceat(np.r_[keep, False], y.indptr[:-1])[:len(counts)] * (counts > 0)
        assert per_row.tolist() == np.minimum(counts, beta).tolist()
        assert np.array_equal(keep, sample_positives(y, beta, np.random.default_rng(7)))  # reproducible
    assert sample_positives(y, 0, np.random.default_rng(0)).all()
    # uniform: every positive of the 10-positive row is picked about beta/10 of the time
    rng = np.random.default_rng(1)
    hits = np.zeros(10)
    for _ in range(2000):
        hits += sample_positives(y, 3, rng)[y.indptr[4]:]
    assert np.abs(hits / 2000 - 0.3).max() < 0.05
    pool = build_pool("all", y, np.random.default_rng(0), 2)  # in the pool: chosen in positives, others masked
    assert (pool.positives.toarray() | pool.masked.toarray()).sum() == counts.sum()
    assert pool.positives.sum(axis=1).A1.tolist() == np.minimum(counts, 2).tolist()


def test_chunked_top_k_equals_dense_top_k():
    from dexml.train.retrieval import top_k

    g = torch.Generator().manual_seed(0)
    q, lab, bias = torch.randn(37, 8, generator=g), torch.randn(1001, 8, generator=g), torch.randn(1001, generator=g)
    exclude = sp.random(37, 1001, density=0.01, random_state=0, format="csr")
    dense = q @ lab.T * 3.0 + bias
    dense[torch.from_numpy(exclude.tocoo().row).long(), torch.from_numpy(exclude.tocoo().col).long()] = float("-inf")
    want = torch.topk(dense, 9, dim=1)
    vals, ids = top_k(q, lab, 9, scale=3.0, bias=bias, exclude=exclude, query_chunk=10, label_chunk=64)
    torch.testing.assert_close(vals, want.values)
    assert torch.equal(ids, want.indices)
    vals, ids = top_k(q[:2], lab[:4], 9, exclude=sp.csr_matrix(([1.0], ([0], [1])), shape=(2, 4)))
    assert ids.shape == (2, 4) and ids[0, -1] == -1 and (ids[1] >= 0).all()  # padding where excluded


def test_token_cache_is_reused_and_keyed_by_max_len(tiny_encoder, tmp_path):
    from dexml.train.model import load_tokenizer

    tok = load_tokenizer(str(tiny_encoder))
    texts = ["alpha beta gamma delta", "x", ""]
    a = cached_tokenize(texts, tok, 8, tmp_path)
    b = cached_tokenize(texts, tok, 8, tmp_path)
    c = cached_tokenize(texts, tok, 3, tmp_path)
    assert len(list(tmp_path.glob("*.ids.npy"))) == 2
    assert np.array_equal(a.ids, b.ids) and c.lengths.max() == 3
    ids, mask = a.batch([1, 0])
    assert ids.shape == mask.shape == (2, a.lengths.max()) and mask[0].sum() == a.lengths[1]


def _untrained_val_p1(p, workdir) -> float:
    ds = read_dataset(workdir / "data" / "dataset")
    model = DualEncoder.from_params(p.model, train_labels=ds.trn.labels)
    q_tok = tokenize(ds.tst.texts(), model.tokenizer, p.model.query_max_len)
    l_tok = tokenize(ds.lbl.texts(), model.tokenizer, p.model.label_max_len)
    return validate(model, q_tok, np.arange(len(ds.tst)), l_tok, ds.tst.labels, torch.device("cpu"),
                    lambda: torch.autocast("cpu", enabled=False))["P@1"]


def _trained_test_p1(workdir, p) -> float:
    ds = read_dataset(workdir / "data" / "dataset")
    model = DualEncoder.load(workdir / paths.MODEL_DIR)
    q_tok = tokenize(ds.tst.texts(), model.tokenizer, p.model.query_max_len)
    l_tok = tokenize(ds.lbl.texts(), model.tokenizer, p.model.label_max_len)
    return validate(model, q_tok, np.arange(len(ds.tst)), l_tok, ds.tst.labels, torch.device("cpu"),
                    lambda: torch.autocast("cpu", enabled=False))["P@1"]


@pytest.mark.parametrize("mode,loss_name,extra", [
    ("all", "decoupled_softmax", {}), ("in-batch", "softmax", {}), ("hard", "decoupled_softmax", {}),
    ("all", "soft_topk", {}), ("all", "bce", {"train": {"sample_positives": 0}}),
    ("cached", "decoupled_softmax", {"negatives": {"refresh_steps": 5, "num_random": 1}}),
    ("cached", "soft_topk", {"model": {"label_bias": True}, "train": {"sample_positives": 2}})])
def test_each_negative_mode_learns(tiny_params, tiny_dataset_dir, tmp_path, mode, loss_name, extra):
    work = _workdir(tmp_path, tiny_dataset_dir)
    raw = tiny_params(negatives={"mode": mode, "num_hard": 4, "shortlist": 10},
                      loss={"name": loss_name, "k": 3}, train={"epochs": 3})
    for section, values in extra.items():
        raw[section].update(values)
    p = parse_params(raw)
    before = _untrained_val_p1(p, work)
    metrics = train(p, work)
    after = _trained_test_p1(work, p)
    assert after > before + 15, (before, after)
    assert metrics["epochs"] == 3 and metrics["best_epoch"] >= 1
    assert (work / paths.MODEL_DIR / "dexml_encoder.json").exists()
    loss_rows = (work / paths.TRAIN_PLOTS / "loss.csv").read_text().splitlines()
    assert loss_rows[0] == "step,loss,lr" and len(loss_rows) == metrics["steps"] + 1
    assert not (work / paths.CHECKPOINT_DIR).exists()  # finished runs leave no checkpoint
    if mode == "cached":  # refreshed at each epoch start (+ every refresh_steps); staleness measured
        neg = metrics["negatives"]
        assert neg["refreshes"] >= 3 and len(neg["staleness_at_refresh"]) == neg["refreshes"] - 1
        assert all(0 <= x["top_overlap"] <= 1 and 0 < x["cosine"] <= 1 + 1e-6 for x in neg["staleness_at_refresh"])


def test_bad_params_fail_at_start_naming_the_key(tiny_params, tiny_dataset_dir, tmp_path):
    work = _workdir(tmp_path, tiny_dataset_dir)
    with pytest.raises(ConfigError, match="loss.k"):
        train(parse_params(tiny_params(loss={"name": "soft_topk", "k": 40})), work)
    with pytest.raises(ConfigError, match="loss.name"):
        parse_params(tiny_params(loss={"name": "hinge"}))
    with pytest.raises(ConfigError, match="model.encoder"):
        train(parse_params(tiny_params(model={"encoder": str(tmp_path / "nope")})), work)
    assert not (work / paths.MODEL_DIR).exists()


@pytest.mark.parametrize("section,values,key,expected", [
    ("negatives", {"mode": "semi-hard"}, "negatives.mode", "one of all (every label in every step"),
    ("negatives", {"refresh_steps": 0}, "negatives.refresh_steps", "a positive integer"),
    ("negatives", {"num_random": -1}, "negatives.num_random", "an integer >= 0"),
    ("train", {"sample_positives": -1}, "train.sample_positives", "an integer >= 0"),
    ("train", {"sample_positives": 1.5}, "train.sample_positives", "an integer, got 1.5"),
])
def test_negative_mode_and_psl_params_are_checked_naming_the_key(section, values, key, expected):
    from dexml.config import NEGATIVE_MODES
    from dexml.train.negatives import MODES

    with pytest.raises(ConfigError, match=re.escape(f"`{key}`: expected ")) as e:
        parse_params({section: values})
    assert expected in str(e.value)
    assert parse_params({"train": {"sample_positives": 4}, "negatives": {"mode": "cached"}}).train.sample_positives == 4
    assert list(MODES) == list(NEGATIVE_MODES)  # one registry: config's names are the classes'


def _run_cli_train(work: Path, params_path: Path, **kw):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.Popen([sys.executable, "-m", "dexml.cli", "train", "--params", str(params_path)],
                            cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


@pytest.mark.slow
@pytest.mark.parametrize("negatives", [{"mode": "all"},
                                       # the label cache is rebuilt at each epoch start, as in a straight run
                                       {"mode": "cached", "refresh_steps": 5, "num_hard": 3, "num_random": 1}])
def test_killed_run_resumes_from_checkpoint_and_matches_uninterrupted(tiny_params, tiny_dataset_dir, tmp_path,
                                                                      negatives):
    raw = tiny_params(train={"epochs": 3, "num_threads": 1}, negatives=negatives)
    a = _workdir(tmp_path / "a", tiny_dataset_dir)
    b = _workdir(tmp_path / "b", tiny_dataset_dir)
    for w in (a, b):
        (w / "params.yaml").write_text(yaml.safe_dump(raw))

    proc = _run_cli_train(a, a / "params.yaml")
    ckpt = a / paths.CHECKPOINT_DIR / "last.pt"
    deadline = time.time() + 300
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert ckpt.exists(), proc.communicate()[1][-2000:]
    os.kill(proc.pid, signal.SIGKILL)  # a crash right after the first epoch's checkpoint
    proc.wait()
    assert not (a / paths.MODEL_DIR).exists()

    resumed = _run_cli_train(a, a / "params.yaml")
    _, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err[-2000:]
    assert b"resuming after epoch" in err

    straight = _run_cli_train(b, b / "params.yaml")
    _, err_b = straight.communicate(timeout=600)
    assert straight.returncode == 0, err_b[-2000:]
    assert b"resuming" not in err_b
    ma, mb = (json.loads((w / paths.TRAIN_METRICS).read_text()) for w in (a, b))
    assert ma["steps"] == mb["steps"]
    wa = DualEncoder.load(a / paths.MODEL_DIR).state_dict()
    wb = DualEncoder.load(b / paths.MODEL_DIR).state_dict()
    for name in wb:
        torch.testing.assert_close(wa[name], wb[name], atol=1e-5, rtol=1e-4, msg=name)
