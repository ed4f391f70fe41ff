"""Benchmark: model quality of training configurations through the real pipeline.

Each configuration is a name and a list of params overrides (the `-S key=value` of every stage).
For each, in a scratch directory of its own: params.yaml (the repository's, with the dataset,
the common overrides and the configuration's), then `dexml download`, `train`, `export`, `index`
and `evaluate`, exactly as `dvc repro` runs them; the test metrics come from metrics/eval.json,
the training time from metrics/train.json. With --rae the same trained model is indexed and
evaluated again with `rae.enabled=true` (retrieval augmentation, lambda tuned on the held-out
training rows), as a second row. Prints a table and writes bench/results/cpu/quality.json.

    python bench/quality.py --data /work/shared/datasets/LF-DebianTags \\
        --common train.num_threads=1 train.max_steps=300 \\
        --config in-batch negatives.mode=in-batch --config cached negatives.mode=cached --rae cached
    python bench/quality.py --data synthetic --config all negatives.mode=all --config cached negatives.mode=cached
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import common  # noqa: E402

COLUMNS = ["config", "P@1", "P@3", "P@5", "nDCG@5", "PSP@1", "PSP@5", "train_s", "steps", "rae_lambda"]
STAGES = ("download", "train", "export", "index", "evaluate")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=common.DEFAULT_DATA, help="an LF-layout dataset directory, or `synthetic`")
    ap.add_argument("--common", nargs="*", default=[], metavar="KEY=VALUE", help="overrides for every configuration")
    ap.add_argument("--config", nargs="+", action="append", required=True, metavar="NAME [KEY=VALUE ...]",
                    help="a configuration: its name, then its overrides (repeat for several)")
    ap.add_argument("--rae", nargs="*", default=[], metavar="NAME",
                    help="also evaluate these configurations' models with retrieval augmentation")
    ap.add_argument("--scratch", default=None, help="work directory (default: a temporary one, removed)")
    ap.add_argument("--keep", action="store_true", help="keep the scratch directories")
    ap.add_argument("--out", default=None)
    ap.add_argument("--append", action="store_true", help="add rows to an existing --out file")
    return ap.parse_args(argv)


def dataset_overrides(data: str) -> list[str]:
    if data == "synthetic":
        return ["dataset.source=synthetic"]
    path = Path(data).resolve()
    # Real LF datasets: title + content on both sides (their README's setting).
    return ["dataset.source=local", f"dataset.path={path}", "data.query_text=title+content",
            "data.label_text=title+content"]


def run_stage(work: Path, stage: str, overrides: list[str]) -> float:
    cmd = [sys.executable, "-m", "dexml.cli", stage, "--params", "params.yaml"]
    for item in overrides:
        cmd += ["-S", item]
    env = dict(os.environ, PYTHONPATH=str(common.REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    start = time.perf_counter()
    with open(work / f"{stage}.log", "a") as log:
        proc = subprocess.run(cmd, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = (work / f"{stage}.log").read_text()[-3000:]
        raise RuntimeError(f"`dexml {stage}` failed in {work} (exit {proc.returncode}):\n{tail}")
    return time.perf_counter() - start


def row_from(work: Path, name: str, overrides: list[str], stage_s: dict) -> dict:
    ev = json.loads((work / "metrics" / "eval.json").read_text())
    tr = json.loads((work / "metrics" / "train.json").read_text())
    row = {"config": name, **{k: ev.get(k) for k in ("P@1", "P@3", "P@5", "nDCG@5", "PSP@1", "PSP@5", "R@10")},
           "train_s": tr.get("train_time_s"), "refresh_s": tr.get("refresh_time_s"), "steps": tr.get("steps"),
           "examples_per_s": tr.get("examples_per_s"), "val_P@5": tr.get("val_P@5"),
           "stage_s": {k: round(v, 1) for k, v in stage_s.items()}, "overrides": overrides}
    if "rae" in ev:
        row["rae_lambda"] = ev["rae"].get("lambda")
        row["rae_temperature"] = ev["rae"].get("temperature")
    return row


def run_config(name: str, overrides: list[str], args, scratch: Path, rae: bool) -> list[dict]:
    work = scratch / name
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    shutil.copy(common.REPO / "params.yaml", work / "params.yaml")
    every = dataset_overrides(args.data) + list(args.common) + list(overrides)
    stage_s = {stage: run_stage(work, stage, every) for stage in STAGES}
    rows = [row_from(work, name, every, stage_s)]
    print(rows[-1], flush=True)
    if rae:
        with_rae = every + ["rae.enabled=true"]
        stage_s = {stage: run_stage(work, stage, with_rae) for stage in ("index", "evaluate")}
        rows.append(row_from(work, f"{name} + RAE", with_rae, stage_s))
        print(rows[-1], flush=True)
    return rows


def main(argv=None) -> dict:
    args = parse_args(argv)
    configs = [(c[0], c[1:]) for c in args.config]
    unknown = set(args.rae) - {n for n, _ in configs}
    if unknown:
        sys.exit(f"--rae: no configuration named {sorted(unknown)}")
    scratch = Path(args.scratch) if args.scratch else common.scratch_dir(None, "dexml_bench_quality_")
    if args.keep and not args.scratch:
        sys.exit("--keep needs --scratch")
    out = Path(args.out) if args.out else common.default_out("quality", "cpu")
    settings = {"data": args.data, "common": args.common, "stages": list(STAGES),
                "metrics": "test split through the shipped bundle (ONNX encoder + faiss index), metrics/eval.json"}
    results = common.Results(out, "quality", "cpu", settings, append=args.append)
    for name, overrides in configs:
        try:
            rows = run_config(name, overrides, args, scratch, name in args.rae)
        except RuntimeError as e:
            print(e, file=sys.stderr)
            rows = [{"config": name, "error": str(e)[-500:], "overrides": overrides}]
        for row in rows:
            results.add(row)
    print(common.table(results.doc["rows"], COLUMNS, {"train_s": ".0f"}))
    print(f"wrote {out}")
    return results.doc


if __name__ == "__main__":
    main()
