"""Benchmark 2: training throughput (examples/s) and peak memory of each negatives mode, next
to sentence-transformers' CachedMultipleNegativesRankingLoss on the same pairs; the label texts
each encodes per step with and without autograd, and the refresh (hard shortlist, cached table)
timed apart.

Every configuration runs in its own process (so peak memory is its own) over the same
batches of training queries: the dexml modes through `dexml.train.loop.train_step` exactly as
the training loop runs it (pool, gradient-cached step, clipping, AdamW), sentence-transformers
with one sampled positive label text per query, mini_batch_size = --label-chunk, the same max
length, scale = 1 / tau, bf16 autocast on CUDA as ours. Warm-up steps are not timed.

    python bench/throughput.py --device cuda --batch-size 256 --steps 20
    python bench/throughput.py --device cpu --batch-size 32 --steps 3 --modes all,in-batch,hard,st-cmnrl
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import common  # noqa: E402

MODES = ("all", "in-batch", "hard", "cached", "st-cmnrl")
COLUMNS = ["mode", "examples_per_s", "step_ms", "refresh_s", "pool_labels", "labels_grad", "labels_no_grad",
           "queries_no_grad", "peak_mb", "step_peak_mb"]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=common.DEFAULT_DATA, help="LF-layout dataset directory, or `synthetic`")
    ap.add_argument("--encoder", default=common.MINILM)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--modes", default=",".join(MODES), help=f"comma list of {','.join(MODES)}")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--label-chunk", type=int, default=128, help="gradient-cache mini-batch (both libraries)")
    ap.add_argument("--max-len", type=int, default=32)
    ap.add_argument("--num-hard", type=int, default=8)
    ap.add_argument("--shortlist", type=int, default=50)
    ap.add_argument("--refresh-steps", type=int, default=50, help="cached: steps per table refresh (amortisation)")
    ap.add_argument("--sample-positives", type=int, default=1, help="positives per query in the loss (0 = all)")
    ap.add_argument("--steps", type=int, default=10, help="timed steps")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    ap.add_argument("--text", default=None, choices=["title", "title+content"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--inline", action="store_true", help="run the modes in this process (tests)")
    ap.add_argument("--timeout", type=float, default=None, help="seconds per mode")
    ap.add_argument("--out", default=None)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def worker_args(args, mode: str) -> list[str]:
    out = ["--worker", mode]
    for key in ("data", "encoder", "device", "batch_size", "label_chunk", "max_len", "num_hard",
                "shortlist", "refresh_steps", "sample_positives", "steps", "warmup", "seed"):
        out += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    return out + (["--text", args.text] if args.text else [])


def batches(ds, args):
    """The same `warmup + steps` batches of training rows (with a positive) for every mode."""
    import numpy as np

    rng = np.random.default_rng(args.seed)
    y = ds.trn.labels.tocsr()
    rows = np.flatnonzero(np.diff(y.indptr) > 0)
    need = (args.warmup + args.steps) * args.batch_size
    order = rng.permutation(rows)
    order = np.resize(order, need) if need > len(order) else order[:need]
    return [order[i:i + args.batch_size] for i in range(0, need, args.batch_size)], rng


def run_dexml(mode: str, args, ds, text: str, device: str, mem) -> dict:
    """A dexml negatives mode through the library's own objects: the mode's refresh (timed
    separately: the hard shortlist, or the cached label table) then `train_step` per batch."""
    import numpy as np
    import torch

    from dexml.config import ModelParams, NegativesParams
    from dexml.train import negatives
    from dexml.train.loop import autocast_for, train_step
    from dexml.train.model import DualEncoder
    from dexml.train.tokens import tokenize

    torch.manual_seed(args.seed)
    model = DualEncoder.from_params(ModelParams(encoder=args.encoder, query_max_len=args.max_len,
                                                label_max_len=args.max_len)).to(device)
    model.train()
    q_tok = tokenize(ds.trn.texts(text), model.tokenizer, args.max_len)
    l_tok = tokenize(ds.lbl.texts(text), model.tokenizer, args.max_len)
    y = ds.trn.labels.tocsr()
    steps, rng = batches(ds, args)
    autocast = lambda: autocast_for(torch.device(device), "auto")  # noqa: E731
    params = NegativesParams(mode=mode, label_chunk=args.label_chunk, num_hard=args.num_hard,
                             shortlist=args.shortlist, refresh_steps=args.refresh_steps)
    setup = negatives.Setup(params, args.sample_positives, ds.num_labels, l_tok, q_tok,
                            np.unique(np.concatenate(steps)), y, torch.device(device), autocast)
    neg = negatives.make_mode(setup)
    with common.Clock() as c:
        neg.refresh(model, 0, 0)  # hard: the shortlist; cached: the label table; others: nothing
        common.sync(device)
    refresh_s = c.wall_s if mode in ("hard", "cached") else 0.0
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
    encoded = []

    def step(i):
        rows = steps[i]
        pool = neg.pool(rows, y[rows], rng)  # no refresh inside the timed steps: its cost is reported apart
        q_ids, q_mask = q_tok.batch(rows, device)
        train_step(model, q_ids, q_mask, l_tok, pool, "decoupled_softmax", args.label_chunk, torch.device(device),
                   autocast)
        encoded.append(pool.encoded)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    row = timed(step, args, device, mem)
    fresh = float(np.mean(encoded))
    chunked = fresh > args.label_chunk  # beyond one chunk: a no-grad pass, then the re-encode
    row |= {"pool_labels": ds.num_labels if mode == "cached" else fresh, "labels_grad": round(fresh, 1),
            "labels_no_grad": round(fresh if chunked else 0.0, 1), "queries_grad": args.batch_size,
            "queries_no_grad": 0, "refresh_s": round(refresh_s, 3)}
    if mode == "cached":
        row["refresh_amortised_ms"] = round(refresh_s / args.refresh_steps * 1000, 1)
        row["labels_no_grad_refresh"] = f"{ds.num_labels} per {args.refresh_steps} steps"
    if mode == "hard":
        row["refresh_amortised_ms"] = round(refresh_s / max(1, len(y.indptr) // args.batch_size) * 1000, 1)
    return row


def run_st(args, ds, text: str, device: str, mem) -> dict:
    """sentence-transformers' CachedMNRL on (query, one sampled positive label) pairs."""
    import numpy as np
    import torch
    from sentence_transformers import SentenceTransformer

    try:
        from sentence_transformers.sentence_transformer.losses import (
            CachedMultipleNegativesRankingLoss,
        )
    except ImportError:  # sentence-transformers < 6
        from sentence_transformers.losses import CachedMultipleNegativesRankingLoss
    from dexml.train.model import resolve_encoder

    torch.manual_seed(args.seed)
    model = SentenceTransformer(resolve_encoder(args.encoder), device=device)
    model.max_seq_length = args.max_len
    model.train()
    loss = CachedMultipleNegativesRankingLoss(model, scale=20.0, mini_batch_size=args.label_chunk)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
    steps, rng = batches(ds, args)
    y = ds.trn.labels.tocsr()
    queries, labels = ds.trn.texts(text), ds.lbl.texts(text)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda") else None

    def to_device(features):
        return {k: v.to(device) if hasattr(v, "to") else v for k, v in features.items()}

    def step(i):
        rows = steps[i]
        positives = [int(rng.choice(y.indices[y.indptr[r]:y.indptr[r + 1]])) for r in rows]
        features = [to_device(model.tokenize([queries[r] for r in rows])),
                    to_device(model.tokenize([labels[j] for j in positives]))]
        if amp is not None:
            with amp:  # backward inside: CachedMNRL re-runs the forward passes in its backward hook
                loss(features, None).backward()
        else:
            loss(features, None).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    b = args.batch_size  # CachedMNRL: a no-grad pass over queries and labels, then both re-encoded with grad
    return timed(step, args, device, mem) | {"pool_labels": float(np.mean([len(s) for s in steps])),
                                             "labels_grad": b, "labels_no_grad": b, "queries_grad": b,
                                             "queries_no_grad": b}


def timed(step, args, device: str, mem) -> dict:
    mem.clear()
    for i in range(args.warmup):
        step(i)
    common.sync(device)
    mem.start()
    with common.Clock() as c:
        for i in range(args.warmup, args.warmup + args.steps):
            step(i)
        common.sync(device)
    n = args.steps * args.batch_size
    return {"examples_per_s": round(n / c.wall_s, 2), "step_ms": round(c.wall_s / args.steps * 1000, 1),
            "cpu_s_per_step": round(c.cpu_s / args.steps, 3), **mem.stop()}


class Memory:
    """Peak memory of the timed steps: CUDA allocator peak, or process peak RSS on CPU."""

    def __init__(self, device: str):
        self.device = device

    def clear(self):
        """Before the warm-up: free an earlier mode's tensors and cached blocks (--inline), so the
        timed steps run on an allocator warmed up by this mode alone."""
        import gc

        import torch

        gc.collect()
        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()

    def start(self):
        import torch

        if self.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
            self.before = torch.cuda.memory_allocated() / 2**20
        else:
            self.before = common.rss_mb()

    def stop(self) -> dict:
        import torch

        if self.device.startswith("cuda"):
            peak = torch.cuda.max_memory_allocated() / 2**20
            return {"peak_mb": round(peak, 1), "step_peak_mb": round(peak - self.before, 1),
                    "memory": "torch.cuda.max_memory_allocated"}
        peak = common.peak_rss_mb()
        return {"peak_mb": round(peak, 1), "step_peak_mb": round(max(peak - self.before, 0.0), 1),
                "memory": "peak RSS of the process (step_peak_mb: above the RSS before the timed steps)"}


def run_mode(mode: str, args) -> dict:
    import tempfile

    device = common.resolve_device(args.device)
    with tempfile.TemporaryDirectory(prefix="dexml_bench_tp_") as tmp:  # a generated synthetic set
        _, ds = common.load_dataset(args.data, Path(tmp))
    text = common.text_mode(args.data, args.text)
    mem = Memory(device)
    if mode == "st-cmnrl":
        return {"mode": "sentence-transformers CachedMNRL", **run_st(args, ds, text, device, mem)}
    return {"mode": mode, **run_dexml(mode, args, ds, text, device, mem)}


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.worker:
        common.emit(run_mode(args.worker, args))
        return {}
    device = common.resolve_device(args.device)
    args.device = device
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if any(m not in MODES for m in modes):
        sys.exit(f"--modes: expected some of {MODES}, got {modes}")
    settings = {k: getattr(args, k) for k in ("data", "encoder", "batch_size", "label_chunk", "max_len",
                                               "num_hard", "shortlist", "refresh_steps", "sample_positives",
                                               "steps", "warmup", "seed")}
    settings |= {"loss": "decoupled_softmax (dexml modes), --sample-positives per query",
                 "labels_grad / labels_no_grad": "label texts encoded per step with / without autograd "
                                                 "(queries likewise); refresh not included",
                 "amp": "bf16 autocast" if device.startswith("cuda") else "off (fp32)"}
    out = Path(args.out) if args.out else common.default_out("throughput", device)
    results = common.Results(out, "throughput", device, settings)
    for mode in modes:
        row = common.guarded(run_mode, mode, args) if args.inline else \
            common.run_worker("throughput.py", worker_args(args, mode), args.timeout)
        row.setdefault("mode", mode)
        results.add(row)
        print(row, flush=True)
    print(common.table(results.doc["rows"], COLUMNS, {"pool_labels": ".1f", "peak_mb": ".0f", "step_peak_mb": ".0f",
                                                       "refresh_s": ".1f"}))
    print(f"wrote {out}")
    return results.doc


if __name__ == "__main__":
    main()
