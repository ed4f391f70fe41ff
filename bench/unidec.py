"""Benchmark: UniDEC's classifier head against the dual encoder alone, its label bias and retrieval
augmentation, through the pipeline as it ships (train -> export -> index -> evaluate), next to
TF-IDF voting. Same params.yaml, encoder, budget and seed for every configuration; only the
configuration's own keys differ.

Configurations (comma list, --configs):
    de        the dual encoder alone
    bias      + model.label_bias
    cls       + model.classifier (the classifier head, folded into the index)
    cls_rae   the `cls` model (not retrained: its trained root is copied) + rae.enabled, lambda
              chosen by the evaluate stage on the held-out training queries
    de_rae    the `de` model + rae.enabled (same)
    cls_g0, cls_g2   the `cls` model (not retrained) ranked with index.classifier_gamma 0 (its dual
              encoder head alone) or 2
    tfidf     TF-IDF 50-NN label voting (dexml.pipeline.baselines)
Each row: the test metrics of eval.json, training time, parameters (encoder + bias + classifier
projection and table), bundle size (encoder/ + index/ of the bundle), the lambda evaluate chose.

    python bench/unidec.py --data synthetic --configs tfidf,de,bias,cls,cls_rae -S train.epochs=1
    python bench/unidec.py --data synthetic --tag zipf1.5 -S dataset.synthetic.zipf_exponent=1.5 ...
    python bench/unidec.py --data ../shared/datasets/LF-DebianTags --configs cls,cls_rae -S ...
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import common  # noqa: E402

CONFIGS = {
    "de": {},
    "bias": {"model.label_bias": "true"},
    "cls": {"model.classifier": "true"},
    "cls_rae": {"model.classifier": "true", "rae.enabled": "true"},
    "de_rae": {"rae.enabled": "true"},
    "cls_g0": {"model.classifier": "true", "index.classifier_gamma": "0"},
    "cls_g2": {"model.classifier": "true", "index.classifier_gamma": "2"},
}
REUSES = {"cls_rae": "cls", "de_rae": "de", "cls_g0": "cls", "cls_g2": "cls"}  # evaluation-only: the other configuration's trained model
METRICS = ["P@1", "P@3", "P@5", "nDCG@5", "PSP@1", "PSP@5"]
COLUMNS = ["config", *METRICS, "train_s", "params_m", "bundle_mb", "lambda"]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="synthetic", help="`synthetic` (params.yaml's generator) or an LF directory")
    ap.add_argument("--configs", default="tfidf,de,bias,cls,cls_rae")
    ap.add_argument("-S", "--set", action="append", default=[], metavar="KEY=VALUE",
                    help="params override for every configuration (the shared budget)")
    ap.add_argument("--work", default=None, help="scratch directory (kept; default: a temporary one)")
    ap.add_argument("--tag", default="", help="suffix of the results file name")
    ap.add_argument("--out", default=None)
    return ap.parse_args(argv)


def params_for(args, overrides: dict, data_dir: Path):
    from dexml.config import load_params, parse_overrides

    items = [*args.set, *(f"{k}={v}" for k, v in overrides.items()), f"data.dir={data_dir}"]
    return load_params(common.REPO / "params.yaml", parse_overrides(items))


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def run_config(name: str, args, data_dir: Path, work: Path) -> dict:
    from dexml import paths
    from dexml.pipeline import evaluate, export, index
    from dexml.pipeline import train as train_stage
    from dexml.train.model import DualEncoder

    params = params_for(args, CONFIGS[name], data_dir)
    root = work / name
    shutil.rmtree(root, ignore_errors=True)
    times = {}
    if name in REUSES:
        shutil.copytree(work / REUSES[name], root)
    else:
        root.mkdir(parents=True)
        start = time.perf_counter()
        train_stage.run(params, root)
        times["train_wall_s"] = time.perf_counter() - start
        start = time.perf_counter()
        export.run(params, root)
        times["export_s"] = time.perf_counter() - start
    start = time.perf_counter()
    index.run(params, root)
    times["index_s"] = time.perf_counter() - start
    start = time.perf_counter()
    result = evaluate.run(params, root)
    times["evaluate_s"] = time.perf_counter() - start
    trained = json.loads((root / paths.TRAIN_METRICS).read_text())
    model = DualEncoder.load(root / paths.MODEL_DIR)
    n_params = sum(p.numel() for p in model.parameters())
    table = model.classifier.table.numel() if model.classifier is not None else 0
    rae = result.get("rae") or {}
    return {"config": name, **{k: result[k] for k in METRICS}, "train_s": trained["train_time_s"],
            "steps": trained["steps"], "best_epoch": trained["best_epoch"],
            "params_m": (n_params + table) / 1e6, "classifier_table_floats": table,
            "bundle_mb": dir_bytes(root / paths.BUNDLE_DIR) / 2**20,
            "lambda": rae.get("lambda"), "temperature": rae.get("temperature"),
            "without_rae": {k: rae["without_rae"][k] for k in METRICS} if rae else None,
            "overrides": CONFIGS[name], **{k: round(v, 1) for k, v in times.items()}}


def tfidf_row(ds, params) -> dict:
    from dexml.pipeline.baselines import tfidf_knn_scores

    start = time.perf_counter()
    scores = tfidf_knn_scores(ds.trn.texts(params.data.query_text), ds.trn.labels, ds.tst.texts(params.data.query_text))
    m = common.xmc_eval(scores, ds)
    return {"config": "tfidf", **{k: m[k] for k in METRICS}, "train_s": round(time.perf_counter() - start, 1)}


def main(argv=None):
    import torch

    args = parse_args(argv)
    work = common.scratch_dir(args.work, "dexml_bench_unidec_")
    base = params_for(args, {}, Path("."))
    if args.data == "synthetic":
        from dexml.data.dataset import read_dataset, write_dataset
        from dexml.data.synthetic import generate

        data_dir = work / "data"
        write_dataset(generate(base.dataset.synthetic), data_dir)  # with the -S dataset.* overrides
        ds = read_dataset(data_dir)
    else:
        data_dir, ds = common.load_dataset(args.data, work)
    if base.train.num_threads:
        torch.set_num_threads(base.train.num_threads)
    settings = {"data": args.data, "overrides": args.set, "configs": args.configs,
                "num_labels": ds.num_labels, "num_train": len(ds.trn), "num_test": len(ds.tst)}
    name = "unidec" + (f"_{args.tag}" if args.tag else "")
    results = common.Results(args.out or common.default_out(name, "cpu"), name, "cpu", settings)
    rows = []
    for config in args.configs.split(","):
        print(f"bench/unidec: {config} ...", file=sys.stderr, flush=True)
        row = common.guarded(tfidf_row, ds, base) if config == "tfidf" else common.guarded(
            run_config, config, args, data_dir, work)
        row.setdefault("config", config)
        rows.append(row)
        results.add(row)
    print(common.table(rows, COLUMNS, {"params_m": ".2f", "bundle_mb": ".1f", "train_s": ".0f"}))
    print(f"wrote {results.path}")
    return results.doc


if __name__ == "__main__":
    main()
