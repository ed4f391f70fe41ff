"""Benchmark 3: peak memory and time per training step versus label count, per negatives mode.

For each mode (`all`, `cached`, `in-batch`, `hard`) and label count (10^4, 10^5, 10^6 by default)
a fresh process builds synthetic tokenized labels and queries (random token ids, fixed lengths; a
random label set per query), then runs training steps exactly as the training loop does (the
mode object's refresh and pool -> dexml.train.loop.train_step -> AdamW) with a fixed batch. The
mode's refresh (the cached label table, the hard shortlist) is timed apart and amortised over
--refresh-steps. Memory: `step_mb` = peak - baseline (after a warm-up step on a small pool);
`state_mb` = what scales with L by design: `all`: the L x d label embeddings and their
gradient; `cached`: the L x d table (no gradient of that size: pool_loss returns the fresh rows'
only); both float32 here, plus the L int64 label ids; `beyond_mb` = step_mb - state_mb, what
the loss, pools and activations cost (meant to stay flat in L). Run with
MALLOC_MMAP_THRESHOLD_=65536 so that freed blocks return to the OS and RSS peaks are honest.

    MALLOC_MMAP_THRESHOLD_=65536 python bench/memory.py --device cpu --encoder tiny --labels 1e4,1e5,1e6
    python bench/memory.py --device cuda --encoder PATH --labels 1e4,1e5,1e6 --label-len 8
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import common  # noqa: E402

MODES = ("all", "cached", "in-batch", "hard")
COLUMNS = ["mode", "labels", "step_s", "refresh_s", "step_amortised_s", "labels_grad", "baseline_mb", "step_mb",
           "state_mb", "beyond_mb"]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--encoder", default="tiny",
                    help="`tiny` (a random 2-layer BERT, hidden --tiny-hidden) or a hub name / directory")
    ap.add_argument("--tiny-hidden", type=int, default=32)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--labels", default="1e4,1e5,1e6", help="comma list of label counts")
    ap.add_argument("--modes", default="all,cached", help=f"comma list of {','.join(MODES)}")
    ap.add_argument("--num-hard", type=int, default=8, help="hard / cached: negatives per query")
    ap.add_argument("--refresh-steps", type=int, default=50, help="cached: steps per refresh (amortisation)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--query-len", type=int, default=16)
    ap.add_argument("--label-len", type=int, default=8)
    ap.add_argument("--label-chunk", type=int, default=4096)
    ap.add_argument("--positives", type=int, default=3, help="labels per query")
    ap.add_argument("--steps", type=int, default=2, help="steps per label count; time = the last one")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--inline", action="store_true", help="run in this process (tests; peaks then overlap)")
    ap.add_argument("--timeout", type=float, default=None, help="seconds per label count")
    ap.add_argument("--out", default=None)
    ap.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--worker-mode", default=None, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def encoder_path(args) -> str:
    if args.encoder != "tiny":
        return args.encoder
    from dexml.train.model import make_tiny_encoder

    return str(make_tiny_encoder(common.scratch_dir(None, "dexml_bench_tiny_") / "enc",
                                 hidden=args.tiny_hidden, layers=2, heads=2))


def synthetic_tokens(n: int, length: int, tokenizer, rng):
    """`n` random token sequences of `length` ids: [CLS] w ... w [SEP] (no padding)."""
    import numpy as np

    from dexml.train.tokens import TokenizedTexts

    ids = rng.integers(1000, tokenizer.vocab_size, size=(n, length), dtype=np.int32)
    ids[:, 0], ids[:, -1] = tokenizer.cls_token_id, tokenizer.sep_token_id
    return TokenizedTexts(ids, np.full(n, length, np.int32), tokenizer.pad_token_id)


def run_one(num_labels: int, mode: str, args, enc: str) -> dict:
    import numpy as np
    import scipy.sparse as sp
    import torch

    from dexml.config import ModelParams, NegativesParams
    from dexml.train import negatives
    from dexml.train.loop import autocast_for, train_step
    from dexml.train.model import DualEncoder

    device = common.resolve_device(args.device)
    dev = torch.device(device)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    model = DualEncoder.from_params(ModelParams(encoder=enc, query_max_len=args.query_len,
                                                label_max_len=args.label_len)).to(device)
    model.train()
    B = args.batch_size
    n_queries = B * (args.steps + 1)
    l_tok = synthetic_tokens(num_labels, args.label_len, model.tokenizer, rng)
    q_tok = synthetic_tokens(n_queries, args.query_len, model.tokenizer, rng)
    cols = rng.integers(0, num_labels, size=(n_queries, args.positives))
    y = sp.csr_matrix((np.ones(cols.size, np.float32), cols.ravel(),
                       np.arange(0, cols.size + 1, args.positives)), shape=(n_queries, num_labels))
    y.sum_duplicates()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    autocast = lambda: autocast_for(dev, "auto")  # noqa: E731

    def make(name):
        params = NegativesParams(mode=name, label_chunk=args.label_chunk, num_hard=args.num_hard,
                                 shortlist=max(50, args.num_hard), refresh_steps=args.refresh_steps)
        return negatives.make_mode(negatives.Setup(params, 1, num_labels, l_tok, q_tok, np.arange(n_queries), y,
                                                   dev, autocast))

    def step(neg, rows):
        pool = neg.pool(rows, y[rows], rng)
        q_ids, q_mask = q_tok.batch(rows, device)
        train_step(model, q_ids, q_mask, l_tok, pool, "decoupled_softmax", args.label_chunk, dev, autocast)
        opt.step()
        opt.zero_grad(set_to_none=True)
        common.sync(device)
        return pool.encoded

    # Warm-up on an in-batch pool: optimizer state, kernels and allocator pools exist before
    # the baseline is read, so the peak above it is what the mode and the label count cost.
    if device.startswith("cuda"):
        import gc

        gc.collect()  # an earlier size's tensors (--inline) must not count
        torch.cuda.empty_cache()
    step(make("in-batch"), np.arange(B))
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated() / 2**20
    else:
        baseline = common.rss_mb()
        common.reset_peak_rss()  # the peak of loading and warm-up must not count
    neg = make(mode)
    with common.Clock() as c:
        neg.refresh(model, 0, 0)  # cached: the table; hard: the shortlist; others: nothing
        common.sync(device)
    refresh_s = c.wall_s if mode in ("cached", "hard") else 0.0
    times, cpu_times, encoded = [], [], []
    for s in range(1, args.steps + 1):
        with common.Clock() as c:
            encoded.append(step(neg, np.arange(s * B, (s + 1) * B)))
        times.append(c.wall_s)
        cpu_times.append(c.cpu_s)
    if device.startswith("cuda"):
        peak, how = torch.cuda.max_memory_allocated() / 2**20, "torch.cuda.max_memory_allocated"
    else:
        peak, how = common.window_peak_rss_mb(), "peak RSS of the process since the baseline (VmHWM reset)"
    d = model.meta.dim
    table = num_labels * d * 4 / 2**20
    state = {"all": 2 * table, "cached": table}.get(mode, 0.0) + (num_labels * 8 / 2**20 if mode in ("all", "cached") else 0)
    per_refresh = {"cached": args.refresh_steps, "hard": max(1, round(n_queries / B))}.get(mode)
    step_s = times[-1]
    return {"mode": mode, "labels": num_labels, "step_s": round(step_s, 3), "first_step_s": round(times[0], 3),
            "cpu_s_per_step": round(cpu_times[-1], 3), "refresh_s": round(refresh_s, 3),
            "step_amortised_s": round(step_s + (refresh_s / per_refresh if per_refresh else 0.0), 3),
            "labels_grad": float(np.mean(encoded)), "baseline_mb": round(baseline, 1), "peak_mb": round(peak, 1),
            "step_mb": round(peak - baseline, 1), "emb_table_mb": round(table, 3), "state_mb": round(state, 1),
            "beyond_mb": round(peak - baseline - state, 1), "scores_mb": round(B * num_labels * 4 / 2**20, 3),
            "dim": d, "memory": how}


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = common.resolve_device(args.device)
    args.device = device
    enc = encoder_path(args)
    if args.worker is not None:
        common.emit(run_one(args.worker, args.worker_mode, args, enc))
        return {}
    sizes = [int(float(x)) for x in args.labels.split(",") if x.strip()]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if any(m not in MODES for m in modes):
        sys.exit(f"--modes: expected some of {MODES}, got {modes}")
    keys = ("batch_size", "query_len", "label_len", "label_chunk", "positives", "steps", "seed", "num_hard",
            "refresh_steps")
    settings = {k: getattr(args, k) for k in ("encoder", *keys)}
    settings |= {"tiny_hidden": args.tiny_hidden if args.encoder == "tiny" else None,
                 "loss": "decoupled_softmax (chunked pool_loss), one sampled positive", "modes": modes,
                 "MALLOC_MMAP_THRESHOLD_": __import__("os").environ.get("MALLOC_MMAP_THRESHOLD_"),
                 "amp": "bf16 autocast" if device.startswith("cuda") else "off (fp32)",
                 "state_mb": "all: 2 L x d x 4 bytes (embeddings + gradient); cached: L x d x 4 (table); + L int64 ids",
                 "beyond_mb": "step_mb - state_mb",
                 "scores_mb": "B x L x 4 bytes: never formed (the loss walks label chunks)"}
    out = Path(args.out) if args.out else common.default_out("memory", device)
    results = common.Results(out, "memory", device, settings)
    for mode in modes:
        for n in sizes:
            if args.inline:
                row = common.guarded(run_one, n, mode, args, enc)
            else:
                wargs = ["--worker", str(n), "--worker-mode", mode, "--encoder", enc, "--device", device]
                for key in keys:
                    wargs += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
                row = common.run_worker("memory.py", wargs, args.timeout)
                row.setdefault("labels", n)
                row.setdefault("mode", mode)
            results.add(row)
            print(row, flush=True)
    print(common.table(results.doc["rows"], COLUMNS, {"step_s": ".3f", "refresh_s": ".2f", "step_amortised_s": ".3f",
                                                       "labels_grad": ".0f", "step_mb": ".1f", "beyond_mb": ".1f"}))
    print(f"wrote {out}")
    return results.doc


if __name__ == "__main__":
    main()
