"""Training: gradient caching equals the naive backward; every negative mode learns; resume works."""
from __future__ import annotations

import json
import os
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
from dexml.train.loop import grad_cached_step, train, validate
from dexml.train.losses import get_loss
from dexml.train.model import DualEncoder
from dexml.train.negatives import build_pool, build_shortlist, sample_hard
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
    cached_loss = grad_cached_step(model, q_ids, q_mask, l_tok, pool, loss_fn, chunk=7, device=device)
    cached = _grads(model)
    model.zero_grad()

    torch.manual_seed(123)  # naive: same encode order, everything with autograd
    q = model.encode_queries(q_ids, q_mask)
    embs = [model.encode_labels(*l_tok.batch(pool.labels[s:s + 7])) for s in range(0, len(pool.labels), 7)]
    loss = loss_fn(model.scores(q, torch.cat(embs)), torch.from_numpy(pool.targets), torch.from_numpy(pool.mask))
    loss.backward()
    naive = _grads(model)

    assert cached_loss == pytest.approx(loss.item(), rel=1e-6)
    assert cached.keys() == naive.keys() and len(cached) > 10
    for name in naive:
        torch.testing.assert_close(cached[name], naive[name], atol=1e-6, rtol=1e-4, msg=name)


def test_pools_targets_masks_and_hard_negatives():
    y = sp.csr_matrix(np.array([[1, 1, 0, 0, 0, 0], [0, 0, 1, 0, 0, 0]], np.float32))
    rng = np.random.default_rng(0)
    pool = build_pool("in-batch", y, rng, sample_positives=1)
    assert pool.labels.tolist() == [0, 1, 2]
    assert pool.targets.tolist() == [[True, True, False], [False, False, True]]
    # one positive kept per row, the other masked; negatives never masked
    assert pool.mask[0].sum() == 1 and not pool.mask[0, 2] and not pool.mask[1].any()
    assert build_pool("in-batch", y, rng, sample_positives=0).mask.sum() == 0
    assert len(build_pool("all", y, rng, 1).labels) == 6
    shortlist = np.array([[3, 4, -1], [5, -1, -1]])
    hard = build_pool("hard", y, rng, 1, shortlist_rows=shortlist, num_hard=2)
    assert set(hard.labels) == {0, 1, 2, 3, 4, 5}
    assert sorted(sample_hard(np.array([[7, -1, 8]]), 5, rng).tolist()) == [7, 8]

    q = np.eye(3, dtype=np.float32)
    lab = np.eye(3, dtype=np.float32) + 0.1
    sl = build_shortlist(q, lab, sp.csr_matrix(np.eye(3, dtype=np.float32)), size=2)
    assert sl.shape == (3, 2) and not (sl == np.arange(3)[:, None]).any()  # positives removed


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
    model = DualEncoder.from_params(p.model)
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


@pytest.mark.parametrize("mode,loss_name", [("all", "decoupled_softmax"), ("in-batch", "softmax"),
                                            ("hard", "decoupled_softmax"), ("all", "soft_topk"), ("all", "bce")])
def test_each_negative_mode_learns(tiny_params, tiny_dataset_dir, tmp_path, mode, loss_name):
    work = _workdir(tmp_path, tiny_dataset_dir)
    p = parse_params(tiny_params(negatives={"mode": mode, "num_hard": 4, "shortlist": 10},
                                 loss={"name": loss_name, "k": 3}, train={"epochs": 3}))
    before = _untrained_val_p1(p, work)
    metrics = train(p, work)
    after = _trained_test_p1(work, p)
    assert after > before + 15, (before, after)
    assert metrics["epochs"] == 3 and metrics["best_epoch"] >= 1
    assert (work / paths.MODEL_DIR / "dexml_encoder.json").exists()
    loss_rows = (work / paths.TRAIN_PLOTS / "loss.csv").read_text().splitlines()
    assert loss_rows[0] == "step,loss,lr" and len(loss_rows) == metrics["steps"] + 1
    assert not (work / paths.CHECKPOINT_DIR).exists()  # finished runs leave no checkpoint


def test_bad_params_fail_at_start_naming_the_key(tiny_params, tiny_dataset_dir, tmp_path):
    work = _workdir(tmp_path, tiny_dataset_dir)
    with pytest.raises(ConfigError, match="loss.k"):
        train(parse_params(tiny_params(loss={"name": "soft_topk", "k": 40})), work)
    with pytest.raises(ConfigError, match="loss.name"):
        parse_params(tiny_params(loss={"name": "hinge"}))
    with pytest.raises(ConfigError, match="model.encoder"):
        train(parse_params(tiny_params(model={"encoder": str(tmp_path / "nope")})), work)
    assert not (work / paths.MODEL_DIR).exists()


def _run_cli_train(work: Path, params_path: Path, **kw):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.Popen([sys.executable, "-m", "dexml.cli", "train", "--params", str(params_path)],
                            cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


@pytest.mark.slow
def test_killed_run_resumes_from_checkpoint_and_matches_uninterrupted(tiny_params, tiny_dataset_dir, tmp_path):
    raw = tiny_params(train={"epochs": 3, "num_threads": 1})
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
