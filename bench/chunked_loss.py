"""Benchmark: forward + backward of each loss over a whole label pool, chunked (`pool_loss`) vs dense.

For each label count P (10^4, 10^5, 10^6 by default), each loss and each form, a fresh process
builds B queries and P labels (random unit vectors, d = 384, float32, both requiring grad), a
per-label bias, and a sparse pool (3 positives per query, 2 further labels masked), then times
`--repeats` forward + backward passes of
- chunked: dexml.train.losses.pool_loss(name, q, labels, positives, masked, scale=1/tau, bias=bias)
- dense:   s = q @ labels.T / tau + bias; dexml.losses.<name>(s, targets, mask) (only P <= --dense-max)
- fresh:   pool_loss(..., fresh=(rows, emb)) on a label table without grad, `--fresh` rows of it
           replaced by embeddings that require grad (the label cache's step: no P x d gradient)
and reads the peak RSS above the inputs (VmHWM reset after the inputs are built and one warm-up
pass on a small pool). `beyond_grad_mb` subtracts the gradients the pass returns (labels' and
bias': P x (d + 1) x 4 bytes; for `fresh` the fresh rows' and the bias'): what is left is the
loss's own working memory, O(B x chunk) for pool_loss and O(B x P) for the dense loss. Run with MALLOC_MMAP_THRESHOLD_=65536 (set
for the workers unless already set), so that freed buffers go back to the system and RSS is honest.

    taskset -c 0 python bench/chunked_loss.py                # 1 thread, writes bench/results/cpu/chunked_loss.json
    python bench/chunked_loss.py --labels 1e3 --losses softmax --repeats 1 --out /tmp/x.json   # smoke
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import common  # noqa: E402

COLUMNS = ["labels", "loss", "form", "fwd_bwd_s", "step_mb", "grad_mb", "beyond_grad_mb", "loss_value"]
LOSS_NAMES = ["softmax", "decoupled_softmax", "soft_topk", "bce"]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--labels", default="1e4,1e5,1e6", help="comma list of label counts")
    ap.add_argument("--losses", default=",".join(LOSS_NAMES))
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--chunk", type=int, default=4096)
    ap.add_argument("--tau", type=float, default=0.05)
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--alpha", type=float, default=2.0)
    ap.add_argument("--dense-max", type=float, default=1e5, help="largest P the dense form runs at")
    ap.add_argument("--forms", default="chunked,dense,fresh")
    ap.add_argument("--fresh", type=int, default=576, help="fresh rows in the `fresh` form (64 x (1 + 8))")
    ap.add_argument("--repeats", type=int, default=3, help="timed passes per row; time = their median")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=900, help="seconds per row")
    ap.add_argument("--inline", action="store_true", help="run in this process (tests; peaks then overlap)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # "P,loss,form"
    return ap.parse_args(argv)


def make_inputs(P: int, args):
    """Unit-vector queries and labels (built in place, block by block: no P x d temporaries),
    biases, and the sparse pool."""
    import numpy as np
    import scipy.sparse as sp
    import torch

    g = torch.Generator().manual_seed(args.seed)
    B, d = args.batch_size, args.dim
    q = torch.nn.functional.normalize(torch.randn(B, d, generator=g), dim=1)
    labels = torch.empty(P, d)
    for start in range(0, P, 65536):
        block = labels[start:start + 65536]
        block.normal_(generator=g)
        block.div_(block.norm(dim=1, keepdim=True))
    bias = torch.randn(P, generator=g) * 0.1
    rng = np.random.default_rng(args.seed)
    picks = np.stack([rng.choice(P, size=5, replace=False) for _ in range(B)])  # 3 positives, 2 masked
    rows = np.repeat(np.arange(B), 3)
    positives = sp.csr_matrix((np.ones(B * 3, bool), (rows, picks[:, :3].ravel())), shape=(B, P))
    rows = np.repeat(np.arange(B), 2)
    masked = sp.csr_matrix((np.ones(B * 2, bool), (rows, picks[:, 3:].ravel())), shape=(B, P))
    return q.requires_grad_(), labels.requires_grad_(), bias.requires_grad_(), positives, masked


def run_one(P: int, name: str, form: str, args) -> dict:
    import numpy as np
    import torch

    from dexml.train.losses import LOSSES, pool_loss

    torch.set_num_threads(args.threads)
    opts = {"k": args.k, "alpha": args.alpha} if name == "soft_topk" else {}
    scale = 1.0 / args.tau

    def fresh_rows(labels):  # drawn before the measured window (a draw without replacement is O(P))
        if form == "fresh":
            labels.requires_grad_(False)
            return np.random.default_rng(args.seed).choice(len(labels), size=min(args.fresh, len(labels)), replace=False)
        return None

    def step(q, labels, bias, positives, masked, rows=None):
        if form == "chunked":
            loss = pool_loss(name, q, labels, positives, masked, scale=scale, bias=bias, chunk=args.chunk, **opts)
        elif form == "fresh":
            emb = labels[rows].clone().requires_grad_()
            loss = pool_loss(name, q, labels, positives, masked, scale=scale, bias=bias, chunk=args.chunk,
                             fresh=(rows, emb), **opts)
        else:
            targets, mask = torch.from_numpy(positives.toarray()), torch.from_numpy(masked.toarray())
            loss = LOSSES[name](q @ labels.T * scale + bias, targets, mask, **opts)
        loss.backward()
        value = float(loss.detach())
        for x in (q, labels, bias):
            x.grad = None
        return value

    # Warm-up on a small pool: thread pools, kernels and allocator state exist before the baseline.
    small = make_inputs(min(P, 2 * args.chunk), args)
    step(*small, fresh_rows(small[1]))
    del small
    inputs = make_inputs(P, args)
    rows = fresh_rows(inputs[1])
    baseline = common.rss_mb()
    honest = common.reset_peak_rss()
    times, value = [], None
    for _ in range(args.repeats):
        with common.Clock() as c:
            value = step(*inputs, rows)
        times.append(c.wall_s)
    peak = common.window_peak_rss_mb() if honest else common.peak_rss_mb()
    grad_rows = min(args.fresh, P) if form == "fresh" else P  # the fresh form returns no table gradient
    grad_mb = (grad_rows * args.dim + P) * 4 / 2**20
    return {"labels": P, "loss": name, "form": form, "fwd_bwd_s": round(statistics.median(times), 3),
            "times_s": [round(t, 3) for t in times], "baseline_mb": round(baseline, 1), "peak_mb": round(peak, 1),
            "step_mb": round(peak - baseline, 1), "grad_mb": round(grad_mb, 1),
            "beyond_grad_mb": round(peak - baseline - grad_mb, 1), "loss_value": round(value, 5),
            "scores_mb": round(args.batch_size * P * 4 / 2**20, 1),
            "memory": "VmHWM since reset (peak RSS)" if honest else "ru_maxrss (lifetime peak RSS)"}


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.worker is not None:
        P, name, form = args.worker.split(",")
        common.emit(run_one(int(P), name, form, args))
        return {}
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")  # inherited by the workers
    sizes = [int(float(x)) for x in args.labels.split(",") if x.strip()]
    names = [n for n in args.losses.split(",") if n.strip()]
    unknown = sorted(set(names) - set(LOSS_NAMES))
    if unknown:
        sys.exit(f"--losses: unknown {unknown}; expected some of {LOSS_NAMES}")
    forms = [f for f in args.forms.split(",") if f.strip()]
    if not set(forms) <= {"chunked", "dense", "fresh"}:
        sys.exit(f"--forms: expected some of chunked,dense,fresh, got {args.forms}")
    settings = {k: getattr(args, k) for k in ("batch_size", "dim", "chunk", "tau", "k", "alpha", "dense_max",
                                               "fresh", "repeats", "threads", "seed")}
    settings |= {"pool": "3 positives + 2 masked labels per query", "dtype": "float32",
                 "MALLOC_MMAP_THRESHOLD_": os.environ["MALLOC_MMAP_THRESHOLD_"],
                 "grad_mb": "the gradients returned: labels' and bias' P x (d + 1) x 4 bytes (fresh form: "
                            "fresh rows x d + P floats)",
                 "scores_mb": "B x P x 4 bytes: one dense score matrix"}
    out = Path(args.out) if args.out else common.default_out("chunked_loss", "cpu")
    results = common.Results(out, "chunked_loss", "cpu", settings)
    results.doc["machine"]["torch_threads"] = args.threads
    for P in sizes:
        for name in names:
            for form in forms:
                if form == "dense" and P > args.dense_max:
                    continue
                if args.inline:
                    row = common.guarded(run_one, P, name, form, args)
                else:
                    wargs = ["--worker", f"{P},{name},{form}"]
                    for key in ("batch_size", "dim", "chunk", "tau", "k", "alpha", "fresh", "repeats", "threads",
                                "seed"):
                        wargs += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
                    row = common.run_worker("chunked_loss.py", wargs, args.timeout)
                if "error" in row:
                    row.update(labels=P, loss=name, form=form)
                results.add(row)
                print(row, flush=True)
    rows = results.doc["rows"]
    growth = {}
    for name in names:
        for form in set(forms) - {"dense"}:
            by_p = {r["labels"]: r for r in rows if r["loss"] == name and r["form"] == form and "error" not in r}
            if len(by_p) >= 2:
                lo, hi = by_p[min(by_p)], by_p[max(by_p)]
                growth[f"{name}/{form}"] = round(hi["beyond_grad_mb"] / max(lo["beyond_grad_mb"], 1e-9), 2)
    results.doc["chunked_beyond_grad_growth"] = growth
    results.save()
    print(common.table(rows, COLUMNS, {"fwd_bwd_s": ".3f", "loss_value": ".4f"}))
    print(f"memory beyond the gradients, largest P / smallest P: {growth}")
    print(f"wrote {out}")
    return results.doc


if __name__ == "__main__":
    main()
