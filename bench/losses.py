"""Benchmark 1: the four losses on real data, next to TF-IDF kNN and the zero-shot encoder.

Each loss trains the same encoder with the same budget and seed through `dexml.train.train`
(the pipeline's own loop: gradient caching, AMP on CUDA, best epoch by validation P@5); the
test split is then scored by exact search over all labels in torch (what a flat index gives;
faiss is not needed, so this also runs on the GPU machine). Baselines on the same split:
TF-IDF 50-NN label voting (dexml.baselines) and the untrained encoder.

    python bench/losses.py --device cuda                      # LF-DebianTags, all four losses
    python bench/losses.py --data synthetic --epochs 1 ...    # the project's synthetic default
    python bench/losses.py --losses none --baselines tfidf    # one baseline only

Budget flags (--epochs, --batch-size, --lr, ...) apply to every loss; `-S key=value` sets any
other params.yaml key for all runs (e.g. -S model.tau=0.1). Rows are written to --out (JSON)
after each run and printed as a table at the end.
"""
from __future__ import annotations

import argparse
import copy
import csv
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import common  # noqa: E402

LOSSES = ("decoupled_softmax", "softmax", "soft_topk", "bce")  # the goal first: a run cut short keeps it
BASELINES = ("tfidf", "zeroshot")
COLUMNS = ["method", "P@1", "P@3", "P@5", "nDCG@5", "PSP@1", "PSP@5", "R@10", "train_s", "best_epoch"]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=common.DEFAULT_DATA, help="LF-layout dataset directory, or `synthetic`")
    ap.add_argument("--encoder", default=common.MINILM, help="encoder (hub name or local directory)")
    ap.add_argument("--device", default="auto", help="cpu | cuda | auto")
    ap.add_argument("--losses", default=",".join(LOSSES), help="comma list, or `none`")
    ap.add_argument("--baselines", default=",".join(BASELINES), help="comma list of tfidf,zeroshot, or `none`")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--max-len", type=int, default=32, help="max tokens of queries and labels")
    ap.add_argument("--negatives", default="all", choices=["all", "in-batch"])
    ap.add_argument("--label-chunk", type=int, default=1024, help="labels encoded per gradient-cache chunk")
    ap.add_argument("--sample-positives", type=int, default=0, choices=[0, 1],
                    help="0 = every positive in the loss (default; with 1 the row's other positives "
                         "are masked for every loss, which makes softmax and decoupled_softmax identical)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-steps", type=int, default=None, help="stop training early (smoke runs)")
    ap.add_argument("--test-max", type=int, default=None, help="score only the first N test points (smoke runs)")
    ap.add_argument("--text", default=None, choices=["title", "title+content"],
                    help="query and label text (default: title+content, title for synthetic)")
    ap.add_argument("-S", "--set", action="append", default=[], metavar="KEY=VALUE",
                    help="any other params key for every run, e.g. model.tau=0.1")
    ap.add_argument("--tag", default="", help="suffix for the method names (sweeps)")
    ap.add_argument("--out", default=None, help="results JSON (default bench/results/<cpu|gpu>/losses[_synthetic].json)")
    ap.add_argument("--append", action="store_true", help="add rows to an existing --out file")
    ap.add_argument("--save-model", default=None, metavar="DIR", help="copy the trained encoder of --save-loss here")
    ap.add_argument("--save-loss", default="decoupled_softmax")
    ap.add_argument("--workdir", default=None, help="scratch directory (default: a new temporary one)")
    return ap.parse_args(argv)


def names(arg: str, allowed) -> list[str]:
    if arg in ("", "none"):
        return []
    out = [a.strip() for a in arg.split(",") if a.strip()]
    bad = [a for a in out if a not in allowed]
    if bad:
        sys.exit(f"unknown name(s) {bad}; expected some of {list(allowed)}")
    return out


def base_params(args, data_dir: Path, text: str) -> dict:
    from dexml.config import parse_overrides
    from dexml.config import set_dotted

    raw = {
        "data": {"dir": str(data_dir), "query_text": text, "label_text": text},
        "model": {"encoder": args.encoder, "pooling": "mean", "normalize": True, "tau": 0.05,
                  "query_max_len": args.max_len, "label_max_len": args.max_len},
        "negatives": {"mode": args.negatives, "label_chunk": args.label_chunk},
        "train": {"epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr, "warmup": 0.1,
                  "sample_positives": args.sample_positives, "seed": args.seed, "device": args.device,
                  "amp": "auto", "max_steps": args.max_steps, "val_fraction": 0.1, "val_max_points": 2000},
    }
    for key, value in parse_overrides(args.set).items():
        set_dotted(raw, key, value)
    return raw


def score_model(model, ds, texts, device: str) -> dict:
    """Exact top-100 over all labels for the test split, fp32 embeddings -> metrics."""
    import numpy as np
    import torch

    from dexml.train.loop import embed_tokens
    from dexml.train.tokens import tokenize

    model.to(device).eval()
    q_tok = tokenize(texts["query"], model.tokenizer, model.meta.query_max_len)
    l_tok = tokenize(texts["label"], model.tokenizer, model.meta.label_max_len)
    with torch.no_grad():
        q = embed_tokens(model.encode_queries, q_tok, np.arange(len(q_tok)), device)
        lab = embed_tokens(model.encode_labels, l_tok, np.arange(len(l_tok)), device)
        ids = torch.arange(len(lab), device=lab.device)
        scores = common.exact_top_k(q, lab, 100, lambda qc, lc: model.scores(qc, lc, label_ids=ids))
    return common.xmc_eval(scores, ds)


def val_curve(root: Path) -> list:
    path = root / "plots" / "train" / "val.csv"
    if not path.exists():
        return []
    with open(path) as f:
        return [[int(r["epoch"]), float(r["P@1"]), float(r["P@5"])] for r in csv.DictReader(f)]


def main(argv=None) -> dict:
    args = parse_args(argv)
    baselines, loss_names = names(args.baselines, BASELINES), names(args.losses, LOSSES)
    device = common.resolve_device(args.device)
    args.device = device
    workdir = common.scratch_dir(args.workdir, "dexml_bench_losses_")
    data_dir, ds = common.load_dataset(args.data, workdir)
    text = common.text_mode(args.data, args.text)
    if args.test_max:
        ds.tst = ds.tst.subset(list(range(min(args.test_max, len(ds.tst)))))
        ds.filter_tst = ds.filter_tst[ds.filter_tst[:, 0] < len(ds.tst)]
    texts = {"query": ds.tst.texts(text), "label": ds.lbl.texts(text)}
    raw = base_params(args, data_dir, text)
    settings = {"dataset": ds.name, "data": str(args.data), "train_points": len(ds.trn), "test_points": len(ds.tst),
                "labels": ds.num_labels, "text": text, "encoder": args.encoder, "params": copy.deepcopy(raw),
                "search": "exact inner product over all labels (torch), top-100",
                "tfidf": "word 1-2 grams, sublinear tf, min_df 2, 50-NN label voting (dexml.baselines)"}
    out = Path(args.out) if args.out else common.default_out(
        "losses" if args.data != "synthetic" else "losses_synthetic", device)
    results = common.Results(out, "losses", device, settings, append=args.append)
    rows = []

    for name in baselines:
        start = time.perf_counter()
        if name == "tfidf":
            from dexml.pipeline.baselines import tfidf_knn_scores

            m = common.xmc_eval(tfidf_knn_scores(ds.trn.texts(text), ds.trn.labels, texts["query"],
                                                 k_neighbors=50, top=100), ds)
            row = {"method": "TF-IDF 50-NN", **m}
        else:
            from dexml.config import parse_params
            from dexml.train.model import DualEncoder

            model = DualEncoder.from_params(parse_params(copy.deepcopy(raw)).model, train_labels=ds.trn.labels)
            row = {"method": "zero-shot encoder", **score_model(model, ds, texts, device)}
            del model
        row["seconds"] = round(time.perf_counter() - start, 1)
        rows.append(row)
        results.add(row)
        print(f"{row['method']}: P@1 {row['P@1']:.2f} P@5 {row['P@5']:.2f} ({row['seconds']} s)", flush=True)

    for loss in loss_names:
        from dexml.config import parse_params
        from dexml.train.loop import train
        from dexml.train.model import DualEncoder

        params = copy.deepcopy(raw)
        params["loss"] = {"name": loss, "k": 5, "alpha": 2.0}
        root = workdir / "train"
        shutil.rmtree(root / "models", ignore_errors=True)
        start = time.perf_counter()
        try:
            t = train(parse_params(params), root)
            model = DualEncoder.load(root / "models" / "encoder")
            m = score_model(model, ds, texts, device)
        except Exception as e:  # one failing loss must not cost the others their rows
            row = {"method": loss + args.tag, "error": f"{type(e).__name__}: {e}"}
            rows.append(row)
            results.add(row)
            print(f"{row['method']}: failed: {row['error']}", file=sys.stderr, flush=True)
            continue
        wall = time.perf_counter() - start
        row = {"method": loss + args.tag, **m, "train_s": t["train_time_s"], "train_wall_s": round(wall, 1),
               "examples_per_s": t["examples_per_s"], "steps": t["steps"], "best_epoch": t["best_epoch"],
               "val_curve": val_curve(root), "peak_memory_mb": t["peak_memory_mb"],
               "budget": {k: params["train"][k] for k in ("epochs", "batch_size", "lr", "sample_positives")}
               | {"max_len": args.max_len, "negatives": args.negatives, "overrides": args.set}}
        rows.append(row)
        results.add(row)
        print(f"{row['method']}: P@1 {row['P@1']:.2f} P@5 {row['P@5']:.2f} train {row['train_s']} s "
              f"(best epoch {row['best_epoch']})", flush=True)
        if args.save_model and loss == args.save_loss:
            shutil.rmtree(args.save_model, ignore_errors=True)
            shutil.copytree(root / "models" / "encoder", args.save_model)
        del model

    print(common.table(rows, COLUMNS))
    print(f"wrote {out}")
    return results.doc


if __name__ == "__main__":
    main()
