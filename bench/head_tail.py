"""Benchmark: head and tail at once. A per-label bias and retrieval-augmented prediction (RAE)
next to the plain dual encoder and TF-IDF kNN voting, on LF-DebianTags by default.

Each variant trains through `dexml.train.train` (the pipeline's loop, best epoch by validation
P@5), then the test split is scored by exact search in torch (what the bundle's flat faiss index
returns; faiss need not be installed):
    DE     the dual encoder alone: top-100 labels by q.l (+ tau * b_l for the bias variant,
           the folded index's score)
    +RAE   dexml.rae's scorer (the bundle's code) over the top-K labels and the top-K training
           queries, with lambda and T chosen on the training queries the train stage held out
           (leave-one-out against the memory), as the evaluate stage does; never on test
Variants: de (decoupled softmax, all-label negatives, tau 0.05, L2-normalised), bias (the same
with model.label_bias), tau1 (tau 1 and unnormalised embeddings, the paper's setting for its
largest datasets: label norms can carry popularity). For tau1 the temperature grid is scaled by
tau / 0.05. Reference: TF-IDF 50-NN label voting (dexml.baselines) on the same split.

    python bench/head_tail.py --device cuda --out bench/results/gpu/head_tail.json
    python bench/head_tail.py --data synthetic --encoder DIR --epochs 1 --max-steps 5   # smoke
    python bench/head_tail.py --latency-bundle artifacts/bundle    # CPU: Predictor latency, +/- RAE

Rows are written to --out (JSON) after each one and printed as a table at the end.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import common  # noqa: E402

VARIANTS = {
    "de": {},
    "bias": {"model.label_bias": True},
    "tau1": {"model.tau": 1.0, "model.normalize": False},
}
COLUMNS = ["method", "P@1", "P@3", "P@5", "nDCG@5", "PSP@1", "PSP@3", "PSP@5", "R@10", "lambda", "T"]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=common.DEFAULT_DATA, help="LF-layout dataset directory, or `synthetic`")
    ap.add_argument("--encoder", default=common.MINILM, help="encoder (hub name or local directory)")
    ap.add_argument("--device", default="auto", help="cpu | cuda | auto")
    ap.add_argument("--variants", default="de,bias,tau1", help=f"comma list of {','.join(VARIANTS)}")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--max-len", type=int, default=32, help="max tokens of queries and labels")
    ap.add_argument("--label-chunk", type=int, default=1024, help="labels encoded per gradient-cache chunk")
    ap.add_argument("--sample-positives", type=int, default=0, choices=[0, 1])
    ap.add_argument("--bias-lr-scale", type=float, default=100.0, help="model.label_bias_lr_scale")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-steps", type=int, default=None, help="stop training early (smoke runs)")
    ap.add_argument("--test-max", type=int, default=None, help="score only the first N test points (smoke runs)")
    ap.add_argument("--text", default=None, choices=["title", "title+content"],
                    help="query and label text (default: title+content, title for synthetic)")
    ap.add_argument("--rae-k", type=int, default=100, help="labels and training queries retrieved (rae.k)")
    ap.add_argument("--lambdas", default="0,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1")
    ap.add_argument("--temperatures", default="0.01,0.02,0.03,0.05,0.1,0.2", help="for tau 0.05 (scaled for tau1)")
    ap.add_argument("--metric", default="P@5", help="what the validation grid search maximises")
    ap.add_argument("--no-tfidf", action="store_true", help="skip the TF-IDF reference")
    ap.add_argument("-S", "--set", action="append", default=[], metavar="KEY=VALUE",
                    help="any other params key for every run, e.g. train.warmup=0.05")
    ap.add_argument("--out", default=None, help="results JSON (default bench/results/<cpu|gpu>/head_tail.json)")
    ap.add_argument("--workdir", default=None, help="scratch directory (default: a new temporary one)")
    ap.add_argument("--latency-bundle", default=None, metavar="DIR",
                    help="instead of training: time single-query Predictor calls of this bundle, with and "
                         "without its retrieval augmentation (needs faiss; texts from --data's test split)")
    ap.add_argument("--latency-queries", type=int, default=300)
    return ap.parse_args(argv)


def floats(arg: str) -> list[float]:
    return [float(x) for x in arg.split(",") if x.strip()]


def base_params(args, data_dir: Path, text: str, variant: str) -> dict:
    from dexml.config import parse_overrides
    from dexml.config import set_dotted

    raw = {
        "data": {"dir": str(data_dir), "query_text": text, "label_text": text},
        "model": {"encoder": args.encoder, "pooling": "mean", "normalize": True, "tau": 0.05,
                  "query_max_len": args.max_len, "label_max_len": args.max_len,
                  "label_bias_lr_scale": args.bias_lr_scale},
        "loss": {"name": "decoupled_softmax"},
        "negatives": {"mode": "all", "label_chunk": args.label_chunk},
        "train": {"epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr, "warmup": 0.1,
                  "sample_positives": args.sample_positives, "seed": args.seed, "device": args.device,
                  "amp": "auto", "max_steps": args.max_steps, "val_fraction": 0.1, "val_max_points": 2000},
    }
    for key, value in {**VARIANTS[variant], **parse_overrides(args.set)}.items():
        set_dotted(raw, key, value)
    return raw


# ---------------------------------------------------------------- exact search and scoring
def exact_search(queries, keys, k: int, offset=None, chunk: int = 4096):
    """Top-k (scores, ids) numpy (n, k) by q.key (+ offset per key), in torch on the tensors' device:
    what a flat faiss index over the (folded) vectors returns."""
    import torch

    k = min(k, keys.shape[0])
    vals, inds = [], []
    for start in range(0, queries.shape[0], chunk):
        s = queries[start:start + chunk].float() @ keys.float().T
        if offset is not None:
            s = s + offset
        top = torch.topk(s, k, dim=1)
        vals.append(top.values.cpu())
        inds.append(top.indices.cpu())
    return torch.cat(vals).numpy(), torch.cat(inds).numpy().astype("int64")


def embed(model, texts: list[str], side: str, device: str):
    import numpy as np

    from dexml.train.loop import embed_tokens
    from dexml.train.tokens import tokenize

    max_len = model.meta.query_max_len if side == "query" else model.meta.label_max_len
    tok = tokenize(texts, model.tokenizer, max_len)
    encode = model.encode_queries if side == "query" else model.encode_labels
    return embed_tokens(encode, tok, np.arange(len(tok)), device, batch_size=512)


def score_variant(model, ds, text: str, device: str, args, val_rows, temperatures) -> list[dict]:
    """DE-only and +RAE rows (and DE with the bias dropped, for the bias variant)."""
    import numpy as np
    import torch

    from dexml import metrics
    from dexml.serve import rae
    from dexml.metrics import label_frequencies, scores_to_csr

    model.to(device).eval()
    L = ds.num_labels
    with torch.no_grad():
        labels = embed(model, ds.lbl.texts(text), "label", device)
        q_test = embed(model, ds.tst.texts(text), "query", device)
        q_train = embed(model, ds.trn.texts(text), "query", device)
    tau = model.meta.tau
    # the folded index's score: q.l + tau * b_l (= tau * the model's logit)
    offset = None if model.label_bias is None else tau * model.label_bias.values().to(device)
    rows = []

    def add(method, scores_csr, **extra):
        rows.append({"method": method, **common.xmc_eval(scores_csr, ds), **extra})

    add("DE", scores_to_csr(*exact_search(q_test, labels, 100, offset), L))
    if offset is not None:
        add("DE, bias dropped at test", scores_to_csr(*exact_search(q_test, labels, 100), L))
        bias = model.label_bias.values().numpy()
        freq = label_frequencies(ds.trn.labels)
        seen = freq > 0
        rows[0]["bias"] = {"min": float(bias.min()), "max": float(bias.max()), "mean_seen": float(bias[seen].mean()),
                           "corr_log_freq": float(np.corrcoef(bias[seen], np.log(freq[seen]))[0, 1])}

    inv_prop = metrics.inverse_propensity(ds.trn.labels, *ds.propensity)
    k = args.rae_k
    q_val = q_train[torch.from_numpy(val_rows).to(q_train.device)]
    ls, li = exact_search(q_val, labels, k, offset)
    ns, ni = rae.exclude_self(*exact_search(q_val, q_train, k + 1), val_rows)
    memory = ds.trn.labels.tocsr().astype(np.float32)
    memory.data[:] = 1.0
    best, grid = rae.tune(ls, li, ns, ni, memory, ds.trn.labels[val_rows], inv_prop, floats(args.lambdas),
                          temperatures, args.metric, rae.rows_filter(ds.filter_trn, val_rows))
    start = time.perf_counter()
    ls, li = exact_search(q_test, labels, k, offset)
    ns, ni = exact_search(q_test, q_train, k)
    f = rae.rae_scores(ls, li, ns, ni, memory, best["lambda"], best["temperature"])
    mix_s = time.perf_counter() - start
    pick = ("P@1", "P@5", "PSP@5")
    de_val = next((r for r in grid if r["lambda"] == 0), None)
    add("+RAE", metrics.keep_top_k(f, 100), **{"lambda": best["lambda"], "T": best["temperature"], "k": k,
        "val_best": {m: round(best[m], 2) for m in pick},
        "val_without_rae": {m: round(de_val[m], 2) for m in pick} if de_val else None,
        "val_grid": [{"lambda": r["lambda"], "T": r["temperature"], **{m: round(r[m], 2) for m in pick}} for r in grid],
        "test_search_and_mix_s": round(mix_s, 2),
        "memory_mb_float32": round(q_train.shape[0] * q_train.shape[1] * 4 / 2**20, 1)})
    return rows


# ---------------------------------------------------------------- serving latency (CPU, faiss)
def latency(args) -> dict:
    from dexml.data.dataset import read_dataset
    from dexml.serve import rae
    from dexml.serve.predictor import Predictor

    bundle = Path(args.latency_bundle)
    ds = read_dataset(args.data if args.data != "synthetic" else sys.exit("--latency-bundle needs --data DIR"))
    text = common.text_mode(args.data, args.text)
    texts = ds.tst.texts(text)[:args.latency_queries]
    info = json.loads((bundle / "index" / "index.json").read_text())
    result = {"bundle": str(bundle), "queries": len(texts), "k": 5, "threads": os.environ.get("OMP_NUM_THREADS")}
    # One Predictor (one onnxruntime session and thread pool), its augmentation switched per call:
    # two sessions alternating on 2 cores would mostly measure their thread pools competing.
    predictor = Predictor(bundle)
    settings = predictor.rae
    if settings is None:
        sys.exit(f"{bundle}: its manifest ships no retrieval augmentation (evaluate with rae.enabled)")
    modes = (("without_rae", None), ("with_rae", settings))
    predictor.predict(texts[:3], 5)  # loads the indexes, warms onnxruntime
    wall = {"without_rae": [], "with_rae": []}
    cpu = {"without_rae": [], "with_rae": []}
    for text_ in texts:  # interleaved, so load on the shared machine hits both alike
        for name, mode in modes:
            predictor.rae = mode
            with common.Clock() as c:
                predictor.predict([text_], 5)
            wall[name].append(c.wall_s)
            cpu[name].append(c.cpu_s)
    predictor.rae = settings
    with_rae = predictor
    for name in wall:
        result[name] = common.quantiles_ms(wall[name]) | {"median_cpu_ms": statistics.median(cpu[name]) * 1000}
    result["added_median_ms"] = result["with_rae"]["p50_ms"] - result["without_rae"]["p50_ms"]
    result["added_median_cpu_ms"] = result["with_rae"]["median_cpu_ms"] - result["without_rae"]["median_cpu_ms"]
    # the parts RAE adds, each timed alone on one embedded query
    q = with_rae.embed(texts[:1])
    label_side = with_rae.search(q, with_rae.rae.k)
    parts = {"memory_search": lambda: with_rae.search_memory(q, with_rae.rae.k),
             "score_and_top_k": lambda: rae.top_k_arrays(rae.rae_scores(
                 *label_side, *with_rae.search_memory(q, with_rae.rae.k), with_rae.memory[1],
                 with_rae.rae.lam, with_rae.rae.temperature), 5)}
    for name, fn in parts.items():
        ts = []
        for _ in range(100):
            with common.Clock() as c:
                fn()
            ts.append(c.wall_s)
        result[f"{name}_median_ms"] = statistics.median(ts) * 1000
    result["score_and_top_k_median_ms"] -= result["memory_search_median_ms"]
    result["load_avg_1m_at_end"] = round(os.getloadavg()[0], 2)
    mem = info["memory"]
    result["memory"] = {"num_queries": mem["num_queries"], "dim": mem["dim"], "type": mem["type"],
                        "bytes": mem["bytes"], "mib": round(mem["bytes"] / 2**20, 2)}
    result["label_index_mib"] = round((bundle / "index" / "labels.faiss").stat().st_size / 2**20, 2)
    result["rae"] = with_rae.rae.to_dict()
    return result


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.latency_bundle:
        row = latency(args)
        out = Path(args.out) if args.out else common.default_out("head_tail_latency", "cpu")
        results = common.Results(out, "head_tail_latency", "cpu", {"bundle": args.latency_bundle, "data": args.data})
        results.add(row)
        print(json.dumps(row, indent=2))
        print(f"wrote {out}")
        return results.doc
    device = common.resolve_device(args.device)
    args.device = device
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        sys.exit(f"unknown variant(s) {bad}; expected some of {list(VARIANTS)}")
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="dexml_bench_head_tail_"))
    data_dir, ds = common.load_dataset(args.data, workdir)
    text = common.text_mode(args.data, args.text)
    if args.test_max:
        ds.tst = ds.tst.subset(list(range(min(args.test_max, len(ds.tst)))))
        ds.filter_tst = ds.filter_tst[ds.filter_tst[:, 0] < len(ds.tst)]
    settings = {"dataset": ds.name, "data": str(args.data), "train_points": len(ds.trn), "test_points": len(ds.tst),
                "labels": ds.num_labels, "text": text, "encoder": args.encoder, "variants": variants,
                "args": vars(args),
                "search": "exact inner product (torch), top-100; RAE over the top rae-k labels and training queries"}
    out = Path(args.out) if args.out else common.default_out("head_tail", device)
    results = common.Results(out, "head_tail", device, settings)
    rows = []

    for variant in variants:
        from dexml import paths
        from dexml.config import parse_params
        from dexml.pipeline.evaluate import read_heldout_rows
        from dexml.train.loop import train
        from dexml.train.model import DualEncoder

        raw = base_params(args, data_dir, text, variant)
        root = workdir / variant
        root.mkdir(parents=True, exist_ok=True)
        (workdir / "cache").mkdir(exist_ok=True)
        if not (root / "cache").exists():
            (root / "cache").symlink_to(workdir / "cache")  # one token cache for all variants
        start = time.perf_counter()
        t = train(parse_params(copy.deepcopy(raw)), root)
        wall = time.perf_counter() - start
        model = DualEncoder.load(root / paths.MODEL_DIR)
        val_rows = read_heldout_rows(root / paths.HELDOUT_ROWS, len(ds.trn))  # tune RAE on train's held-out rows
        results.doc["settings"]["validation_points"] = len(val_rows)
        scale = model.meta.tau / 0.05
        temperatures = [round(x * scale, 6) for x in floats(args.temperatures)]
        for row in score_variant(model, ds, text, device, args, val_rows, temperatures):
            row = {**row, "method": f"{variant}: {row['method']}", "variant": variant, "train_s": t["train_time_s"],
                   "train_wall_s": round(wall, 1), "best_epoch": t["best_epoch"], "steps": t["steps"]}
            rows.append(row)
            results.add(row)
            print(f"{row['method']}: P@1 {row['P@1']:.2f} P@5 {row['P@5']:.2f} PSP@5 {row['PSP@5']:.2f}"
                  + (f" (lambda {row['lambda']}, T {row['T']})" if "lambda" in row else ""), flush=True)
        del model

    if not args.no_tfidf:  # CPU; last, so that a time limit cuts it rather than a variant
        from dexml.pipeline.baselines import tfidf_knn_scores

        start = time.perf_counter()
        m = common.xmc_eval(tfidf_knn_scores(ds.trn.texts(text), ds.trn.labels, ds.tst.texts(text),
                                             k_neighbors=50, top=100), ds)
        row = {"method": "TF-IDF 50-NN", **m, "seconds": round(time.perf_counter() - start, 1)}
        rows.append(row)
        results.add(row)
        print(f"{row['method']}: P@1 {row['P@1']:.2f} P@5 {row['P@5']:.2f} PSP@5 {row['PSP@5']:.2f}", flush=True)

    print(common.table(rows, COLUMNS))
    tfidf = next((r for r in rows if r["method"].startswith("TF-IDF")), None)
    de = next((r for r in rows if r["method"] == "de: DE"), None)
    if tfidf and de:
        wins = [r["method"] for r in rows if r["P@1"] > tfidf["P@1"] and r["P@5"] > tfidf["P@5"]
                and r["PSP@5"] >= de["PSP@5"]]
        print("beat TF-IDF on P@1 and P@5 with PSP@5 >= the DE's:", ", ".join(wins) or "none")
        results.doc["done_criterion"] = wins
        results.save()
    print(f"wrote {out}")
    return results.doc


if __name__ == "__main__":
    main()
