"""Distributed training on CPU (gloo, 2 processes) computes what one process computes.

One spawn of 2 ranks runs a training step for every loss x negative mode (plus edge cases) and
its loss and averaged parameter gradients are compared with the same step in this process; a
`dexml train` run with train.nproc=2 goes through torchrun, survives a kill and resumes, and its
model evaluates like a single-process one.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import yaml
from safetensors.torch import load_file, save_file

from dexml import paths
from dexml.config import ModelParams, NegativesParams, TrainParams
from dexml.data.dataset import read_dataset
from dexml.errors import ConfigError
from dexml.train import distributed, negatives
from dexml.train.loop import train_step, validate
from dexml.train.model import DualEncoder
from dexml.train.negatives import build_pool
from dexml.train.tokens import tokenize

REPO = Path(__file__).resolve().parents[1]
WORLD = 2
LOSSES = ["softmax", "decoupled_softmax", "soft_topk", "bce"]
MODES = ["all", "in-batch", "hard", "cached"]

# (name, loss, mode, training rows, sample_positives, shared towers). Seven rows split 4 + 3 over
# the ranks; the label chunk of 5 makes several gradient-cache chunks per shard.
ROWS = [0, 3, 5, 8, 13, 21, 34]
CASES = [(f"{loss}-{mode}", loss, mode, ROWS, i % 3, True)
         for i, (loss, mode) in enumerate((loss, mode) for loss in LOSSES for mode in MODES)]
CASES += [
    ("two-towers", "decoupled_softmax", "all", ROWS, 1, False),
    # one query: rank 1 gets no query rows (a last batch smaller than the world)
    ("one-query-hard", "softmax", "hard", [2], 0, True),
    # a row with a single positive and no sampled negatives: rank 1 gets an empty label shard
    ("one-label-in-batch", "bce", "in-batch", None, 1, True),
    ("two-towers-cached", "decoupled_softmax", "cached", ROWS, 2, False),
]
CHUNK = 5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cases(ctx: distributed.Context, encoder_dir, dataset_dir) -> dict[str, torch.Tensor]:
    """Every case's step (this process's part of it, in `ctx`): {case/loss, case/<param grad>}.

    Dropout is off (model.eval()): 2 ranks draw other masks than 1 process, so only then can
    their gradients be equal; gradient caching with dropout is tested in test_train.py."""
    ds = read_dataset(dataset_dir)
    models = {shared: DualEncoder.from_params(ModelParams(encoder=str(encoder_dir), tau=0.1, shared=shared))
              .to(ctx.device).eval() for shared in (True, False)}
    q_tok = tokenize(ds.trn.texts(), models[True].tokenizer, 16)
    l_tok = tokenize(ds.lbl.texts(), models[True].tokenizer, 12)
    y = ds.trn.labels.tocsr()
    single = int(np.flatnonzero(np.diff(y.indptr) == 1)[0])
    out = {}
    for seed, (name, loss_name, mode, rows, sample_positives, shared) in enumerate(CASES):
        model = models[shared]
        model.zero_grad(set_to_none=True)
        rows = np.array(rows if rows is not None else [single])
        rng = np.random.default_rng(seed)  # the shared decisions: same stream on every rank
        if mode == "cached":  # each rank caches its label shard; hard negatives merged over ranks
            setup = negatives.Setup(NegativesParams(mode="cached", num_hard=3, num_random=1), sample_positives,
                                    ds.num_labels, l_tok, q_tok, np.arange(len(ds.trn)), y, ctx.device, ctx=ctx)
            cached = negatives.make_mode(setup)
            cached.refresh(model, 0, 0)
            pool = cached.pool(rows, y[rows], rng)
            size = ds.num_labels
        else:
            shortlist = rng.integers(-1, ds.num_labels, (len(rows), 6)) if mode == "hard" else None
            whole = build_pool(mode, y[rows], rng, sample_positives, shortlist, num_hard=4)
            pool, size = negatives.shard(whole, ctx.rank, ctx.world), len(whole.labels)
        q_ids, q_mask = q_tok.batch(ctx.share(rows), ctx.device)
        loss = train_step(model, q_ids, q_mask, l_tok, pool, loss_name, CHUNK, ctx.device, group=ctx.group,
                          **({"k": 3, "alpha": 2.0} if loss_name == "soft_topk" else {}))
        ctx.average_gradients(model)
        out[f"{name}/loss"] = torch.tensor(loss, dtype=torch.float64)
        out[f"{name}/pool_size"] = torch.tensor(size)
        for pname, param in model.named_parameters():
            out[f"{name}/{pname}"] = (param.grad if param.grad is not None else torch.zeros_like(param)).cpu()
    return out


def _worker(rank: int, port: int, encoder_dir: str, dataset_dir: str, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    with distributed.setup(torch.device("cpu")) as ctx:
        out = run_cases(ctx, encoder_dir, dataset_dir)
        # rank-0 helpers: an array computed on rank 0 only reaches everyone; disagreement is an error
        out["from_main"] = torch.from_numpy(ctx.from_main(lambda: np.arange(6).reshape(2, 3) * 7, (2, 3), np.int64))
        ctx.check_same(5, "same everywhere")
        try:
            ctx.check_same(rank, "the rank")
            out["check_same_raised"] = torch.tensor(0)
        except ConfigError as e:
            out["check_same_raised"] = torch.tensor(int("the rank: ranks disagree (per rank: [0, 1])" in str(e)))
        ctx.barrier()
    save_file(out, str(Path(out_dir) / f"rank{rank}.safetensors"))


def _spawn(args, timeout: float = 600, worker=_worker) -> None:
    """mp.spawn with a deadline, so that a collective that never completes fails the test."""
    procs = mp.start_processes(worker, args=args, nprocs=WORLD, join=False, start_method="spawn")
    deadline = time.time() + timeout
    try:
        while not procs.join(timeout=1.0):
            if time.time() > deadline:
                raise TimeoutError(f"distributed workers still running after {timeout} s")
    finally:
        for proc in procs.processes:
            if proc.is_alive():
                proc.kill()


@pytest.fixture(scope="module")
def two_ranks(tiny_encoder, tiny_dataset_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ranks")
    _spawn((free_port(), str(tiny_encoder), str(tiny_dataset_dir), str(out)))
    return [load_file(out / f"rank{r}.safetensors") for r in range(WORLD)]


@pytest.fixture(scope="module")
def one_process(tiny_encoder, tiny_dataset_dir):
    return run_cases(distributed.Context(torch.device("cpu")), tiny_encoder, tiny_dataset_dir)


@pytest.mark.parametrize("case", [c[0] for c in CASES])
def test_two_ranks_give_the_single_process_loss_and_gradients(two_ranks, one_process, case):
    rank0, rank1 = two_ranks
    expected = {k.split("/", 1)[1]: v for k, v in one_process.items() if k.startswith(case + "/")}
    assert len(expected) > 20 and int(expected["pool_size"]) >= 1
    for rank in (rank0, rank1):
        assert float(rank[f"{case}/loss"]) == pytest.approx(float(expected["loss"]), rel=1e-6, abs=1e-7)
    assert float(expected["loss"]) > 0
    grads = {name: g for name, g in expected.items() if name not in ("loss", "pool_size")}
    scale = max(float(g.abs().max()) for g in grads.values())
    assert sum(bool(g.abs().max() > 0) for g in grads.values()) > 10 and scale > 0
    for name, grad in grads.items():
        for rank in (rank0, rank1):  # averaged gradients: identical on every rank, equal to 1 process
            got = rank[f"{case}/{name}"]
            torch.testing.assert_close(got, grad, atol=1e-5, rtol=0, msg=f"{case}: {name}")
            # also relative to the case's largest gradient, so tiny gradients are compared too
            torch.testing.assert_close(got / scale, grad / scale, atol=1e-5, rtol=0, msg=f"{case}: {name} (scaled)")


def test_edge_case_has_an_empty_label_shard(one_process):
    assert int(one_process["one-label-in-batch/pool_size"]) == 1  # split over 2 ranks: one shard is empty


def test_rank0_array_reaches_every_rank_and_disagreement_is_an_error(two_ranks):
    for rank in two_ranks:
        assert rank["from_main"].tolist() == [[0, 7, 14], [21, 28, 35]]
        assert int(rank["check_same_raised"]) == 1


def test_launch_command_and_no_relaunch_inside_torchrun(monkeypatch):
    t = TrainParams(nproc=4, nnodes=2, node_rank=1, master_addr="10.0.0.5", master_port=29555)
    cmd = distributed.torchrun_command(t, "params.yaml", ["train.epochs=1"])
    assert cmd[:3] == [sys.executable, "-m", "torch.distributed.run"]
    flags = dict(zip(cmd[3:13:2], cmd[4:14:2]))
    assert flags == {"--nproc_per_node": "4", "--nnodes": "2", "--node_rank": "1",
                     "--master_addr": "10.0.0.5", "--master_port": "29555"}
    assert cmd[13:] == ["-m", "dexml.cli", "train", "--params", "params.yaml", "-S", "train.epochs=1"]
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert distributed.should_launch(t) and not distributed.should_launch(TrainParams())
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "8")
    assert not distributed.should_launch(t)  # the torchrun children train, they don't relaunch


# ---------------------------------------------------------------- torchrun end to end
def _cli_train(work: Path, *overrides: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "dexml.cli", "train", "--params", "params.yaml"]
    for item in overrides:
        cmd += ["-S", item]
    # own session: the launcher, torchrun and its workers can be signalled as one group
    return subprocess.Popen(cmd, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)


def _finish(proc: subprocess.Popen, timeout: float = 900) -> bytes:
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)
        raise
    assert proc.returncode == 0, err[-3000:].decode(errors="replace")
    return err


def _test_p1(work: Path, p) -> float:
    ds = read_dataset(work / "data" / "dataset")
    model = DualEncoder.load(work / paths.MODEL_DIR)
    q_tok = tokenize(ds.tst.texts(), model.tokenizer, p["model"]["query_max_len"])
    l_tok = tokenize(ds.lbl.texts(), model.tokenizer, p["model"]["label_max_len"])
    return validate(model, q_tok, np.arange(len(ds.tst)), l_tok, ds.tst.labels, torch.device("cpu"),
                    lambda: torch.autocast("cpu", enabled=False))["P@1"]


@pytest.mark.slow
def test_torchrun_run_resumes_after_a_kill_and_matches_single_process(tiny_params, tiny_dataset_dir, tmp_path):
    raw = tiny_params(train={"epochs": 3, "num_threads": 1})
    works = {}
    for name in ("multi", "single"):
        work = works[name] = tmp_path / name
        (work / "data").mkdir(parents=True)
        shutil.copytree(tiny_dataset_dir, work / "data" / "dataset")
        (work / "params.yaml").write_text(yaml.safe_dump(raw))

    multi = works["multi"]
    proc = _cli_train(multi, "train.nproc=2", f"train.master_port={free_port()}")
    ckpt = multi / paths.CHECKPOINT_DIR / "last.pt"
    deadline = time.time() + 600
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert ckpt.exists(), proc.communicate()[1][-3000:].decode(errors="replace")
    os.killpg(proc.pid, signal.SIGTERM)  # preempted after its first checkpoint: torchrun stops its workers
    proc.communicate(timeout=120)
    assert not (multi / paths.MODEL_DIR).exists()

    err = _finish(_cli_train(multi, "train.nproc=2", f"train.master_port={free_port()}"))
    assert b"launching 2 process(es)" in err and b"resuming after epoch" in err
    _finish(_cli_train(works["single"]))

    m_multi, m_single = (json.loads((w / paths.TRAIN_METRICS).read_text()) for w in (multi, works["single"]))
    assert m_multi["processes"] == 2 and m_single["processes"] == 1
    assert m_multi["steps"] == m_single["steps"]
    assert len((multi / paths.TRAIN_PLOTS / "val.csv").read_text().splitlines()) == 1 + 3  # all epochs kept
    assert not (multi / paths.CHECKPOINT_DIR).exists()
    # Same seed, same batches and pools; only the ranks' dropout masks differ from one process's.
    p1_multi, p1_single = _test_p1(multi, raw), _test_p1(works["single"], raw)
    assert p1_multi > 40 and p1_single > 40, (p1_multi, p1_single)
    assert abs(p1_multi - p1_single) <= 8, (p1_multi, p1_single)
