"""Benchmark: the classifier's label table (L x dim) under dense AdamW, torch's SparseAdam and the
head's row-wise Adagrad (dexml.train.classifier.ClassifierHead): time per step and memory.

One step as the training loop does it for the table alone (no encoder: fixed random queries):
the pool's P rows are scored against B queries, softmax loss (one positive per query), backward,
optimizer step. Each (L, optimizer) runs in a fresh process so that its peak memory is its own.
Memory above the baseline (the table itself already allocated; the peak is reset after setup, so
building the table does not count) = gradient + optimizer state + the step's temporaries.

    python bench/table_optim.py --labels 1e5,1e6 --dim 384 --pool 2048
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import common  # noqa: E402

OPTIMIZERS = ("adamw_dense", "sparse_adam", "rowwise_adagrad")
COLUMNS = ["labels", "optimizer", "step_ms", "table_mb", "above_table_mb", "state_mb"]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--labels", default="1e5,1e6", help="comma list of label counts")
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--pool", type=int, default=2048, help="labels scored per step (rows touched)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=6, help="steps per run; the median of all but the first")
    ap.add_argument("--optimizers", default=",".join(OPTIMIZERS))
    ap.add_argument("--out", default=None)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def peak_since_now() -> float:
    """The peak resident memory (MiB) since the last call: Linux's VmHWM, reset by clear_refs 5."""
    status = Path("/proc/self/status").read_text()
    peak = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:")) / 1024
    Path("/proc/self/clear_refs").write_text("5")
    return peak


def worker(args) -> dict:
    import time

    import numpy as np
    import torch

    from dexml.train.classifier import ClassifierHead
    from dexml.train.losses import softmax

    torch.manual_seed(0)
    L, name = (int(float(v)) if i == 0 else v for i, v in enumerate(args.worker.split(":")))
    d, P, B = args.dim, min(args.pool, L), args.batch_size
    rng = np.random.default_rng(0)
    q = torch.randn(B, d)
    targets = torch.zeros(B, P, dtype=torch.bool)
    targets[torch.arange(B), torch.randint(0, P, (B,))] = True
    head = table = opt = None
    if name == "rowwise_adagrad":
        head = ClassifierHead(d, L, lr=0.01, table=torch.randn(L, d) * 0.05)
    elif name == "adamw_dense":
        table = torch.nn.Parameter(torch.randn(L, d) * 0.05)
        opt = torch.optim.AdamW([table], lr=1e-3, weight_decay=0.0)
    else:
        emb = torch.nn.Embedding(L, d, sparse=True)
        with torch.no_grad():
            emb.weight.copy_(torch.randn(L, d) * 0.05)
        table = emb
        opt = torch.optim.SparseAdam(emb.parameters(), lr=1e-3)
    peak_since_now()
    base = common.rss_mb()
    times = []
    for _ in range(args.steps):
        labels = np.sort(rng.choice(L, P, replace=False))
        start = time.perf_counter()
        if head is not None:
            loss = softmax(head.scores(q, head.pool_rows(labels), 0.05), targets)
            loss.backward()
            head.step()
        else:
            ids = torch.from_numpy(labels)
            rows = table(ids) if name == "sparse_adam" else table[ids]
            loss = softmax(q @ rows.T / 0.05, targets)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    if head is not None:
        state = head.sum_sq.numel() * 4
    else:
        state = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
                    if torch.is_tensor(t) and t.dim() > 0)
    return {"labels": L, "optimizer": name, "dim": d, "pool": P, "batch": B,
            "step_ms": float(np.median(times[1:]) * 1000), "table_mb": L * d * 4 / 2**20,
            "above_table_mb": peak_since_now() - base, "state_mb": state / 2**20,
            "threads": torch.get_num_threads()}


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return 0
    settings = {k: getattr(args, k) for k in ("labels", "dim", "pool", "batch_size", "steps", "optimizers")}
    results = common.Results(args.out or common.default_out("table_optim", "cpu"), "table_optim", "cpu", settings)
    rows = []
    for L in args.labels.split(","):
        for name in args.optimizers.split(","):
            row = common.run_worker("table_optim.py", [f"--worker={L}:{name}", "--dim", str(args.dim), "--pool",
                                                       str(args.pool), "--batch-size", str(args.batch_size),
                                                       "--steps", str(args.steps)])
            row.setdefault("labels", int(float(L)))
            row.setdefault("optimizer", name)
            rows.append(row)
            results.add(row)
    print(common.table(rows, COLUMNS, {"step_ms": ".1f", "table_mb": ".0f", "above_table_mb": ".0f",
                                       "state_mb": ".1f"}))
    print(f"wrote {results.path}")
    return results.doc


if __name__ == "__main__":
    main()
