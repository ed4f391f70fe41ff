"""Benchmark 3: peak memory and time of `all`-negatives training steps versus label count.

For each label count (10^4, 10^5, 10^6 by default) a fresh process builds synthetic tokenized
labels and queries (random token ids, fixed lengths; a random label set per query), then runs
`--steps` training steps exactly as the training loop does (build_pool("all") ->
dexml.train.loop.train_step -> AdamW) with a fixed batch. Gradient caching keeps one chunk
of label activations at a time, so the memory above the model should grow only with the
label-embedding table (L x d floats, plus its gradient) and the (B x L) score matrix and its
loss temporaries; both are reported next to the measurement.

    python bench/memory.py --device cpu --encoder tiny --labels 1e4,1e5,1e6
    python bench/memory.py --device cuda --encoder PATH --labels 1e4,1e5,1e6 --label-len 8
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import common  # noqa: E402

COLUMNS = ["labels", "step_s", "baseline_mb", "peak_mb", "step_mb", "emb_table_mb", "scores_mb",
           "step_mb_per_1k_labels"]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--encoder", default="tiny",
                    help="`tiny` (a random 2-layer BERT, hidden --tiny-hidden) or a hub name / directory")
    ap.add_argument("--tiny-hidden", type=int, default=32)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--labels", default="1e4,1e5,1e6", help="comma list of label counts")
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


def run_one(num_labels: int, args, enc: str) -> dict:
    import numpy as np
    import scipy.sparse as sp
    import torch

    from dexml.config import ModelParams
    from dexml.train.loop import autocast_for, train_step
    from dexml.train.model import DualEncoder
    from dexml.train.negatives import build_pool

    device = common.resolve_device(args.device)
    dev = torch.device(device)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    model = DualEncoder.from_params(ModelParams(encoder=enc, query_max_len=args.query_len,
                                                label_max_len=args.label_len)).to(device)
    model.train()
    B = args.batch_size
    l_tok = synthetic_tokens(num_labels, args.label_len, model.tokenizer, rng)
    q_tok = synthetic_tokens(B * args.steps, args.query_len, model.tokenizer, rng)
    cols = rng.integers(0, num_labels, size=(B * args.steps, args.positives))
    y = sp.csr_matrix((np.ones(cols.size, np.float32), cols.ravel(),
                       np.arange(0, cols.size + 1, args.positives)), shape=(B * args.steps, num_labels))
    y.sum_duplicates()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    autocast = lambda: autocast_for(dev, "auto")  # noqa: E731

    def step(rows, mode):
        pool = build_pool(mode, y[rows], rng, 1)
        q_ids, q_mask = q_tok.batch(rows, device)
        train_step(model, q_ids, q_mask, l_tok, pool, "decoupled_softmax", args.label_chunk, dev, autocast)
        opt.step()
        opt.zero_grad(set_to_none=True)
        common.sync(device)

    # Warm-up on an in-batch pool: optimizer state, kernels and allocator pools exist before
    # the baseline is read, so the peak above it is what scales with the label count.
    if device.startswith("cuda"):
        import gc

        gc.collect()  # an earlier size's tensors (--inline) must not count
        torch.cuda.empty_cache()
    step(np.arange(B), "in-batch")
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated() / 2**20
    else:
        baseline = common.rss_mb()
    times, cpu_times = [], []
    for s in range(args.steps):
        with common.Clock() as c:
            step(np.arange(s * B, (s + 1) * B), "all")
        times.append(c.wall_s)
        cpu_times.append(c.cpu_s)
    if device.startswith("cuda"):
        peak, how = torch.cuda.max_memory_allocated() / 2**20, "torch.cuda.max_memory_allocated"
    else:
        peak, how = common.peak_rss_mb(), "peak RSS of the process"
    d = model.meta.dim
    emb, scores = num_labels * d * 4 / 2**20, B * num_labels * 4 / 2**20
    return {"labels": num_labels, "step_s": round(times[-1], 3), "first_step_s": round(times[0], 3),
            "cpu_s_per_step": round(cpu_times[-1], 3), "baseline_mb": round(baseline, 1), "peak_mb": round(peak, 1),
            "step_mb": round(peak - baseline, 1), "emb_table_mb": round(emb, 3), "scores_mb": round(scores, 3),
            "step_mb_per_1k_labels": round((peak - baseline) / num_labels * 1000, 3),
            "dim": d, "memory": how}


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = common.resolve_device(args.device)
    args.device = device
    enc = encoder_path(args)
    if args.worker is not None:
        common.emit(run_one(args.worker, args, enc))
        return {}
    sizes = [int(float(x)) for x in args.labels.split(",") if x.strip()]
    settings = {k: getattr(args, k) for k in ("encoder", "batch_size", "query_len", "label_len", "label_chunk",
                                               "positives", "steps", "seed")}
    settings |= {"tiny_hidden": args.tiny_hidden if args.encoder == "tiny" else None,
                 "loss": "decoupled_softmax, one sampled positive", "negatives": "all",
                 "amp": "bf16 autocast" if device.startswith("cuda") else "off (fp32)",
                 "emb_table_mb": "L x d x 4 bytes (fp32); the step also holds its gradient",
                 "scores_mb": "B x L x 4 bytes; the loss holds several such temporaries"}
    out = Path(args.out) if args.out else common.default_out("memory", device)
    results = common.Results(out, "memory", device, settings)
    for n in sizes:
        if args.inline:
            row = common.guarded(run_one, n, args, enc)
        else:
            wargs = ["--worker", str(n), "--encoder", enc, "--device", device]
            for key in ("batch_size", "query_len", "label_len", "label_chunk", "positives", "steps", "seed"):
                wargs += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
            row = common.run_worker("memory.py", wargs, args.timeout)
            row.setdefault("labels", n)
        results.add(row)
        print(row, flush=True)
    print(common.table(results.doc["rows"], COLUMNS, {"step_s": ".3f", "step_mb_per_1k_labels": ".3f"}))
    print(f"wrote {out}")
    return results.doc


if __name__ == "__main__":
    main()
