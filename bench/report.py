"""Render the benchmark tables from the JSON results into docs/benchmarks.md.

Reads bench/results/cpu/*.json and bench/results/gpu/*.json (what the bench scripts and
bench/gpu_suite.sh write) and replaces each block between `<!-- BEGIN bench:NAME -->` and
`<!-- END bench:NAME -->` in the document with freshly rendered tables; the prose around the
blocks is left alone. A device without results gets a "pending" line instead of a table.

    python bench/report.py                  # rewrite docs/benchmarks.md
    python bench/report.py --print          # print the blocks instead
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import common  # noqa: E402

DOC = common.REPO / "docs" / "benchmarks.md"
DEVICES = ("cpu", "gpu")
PENDING = {"cpu": "_CPU rows: not measured yet (run the command above)._",
           "gpu": "_GPU rows: pending lead's GPU run (`bash bench/gpu_suite.sh`, then copy its JSON files "
                  "to bench/results/gpu/ and rerun `python bench/report.py`)._"}


def load(results: Path) -> dict[str, dict[str, dict]]:
    """{device: {file stem: document}}"""
    out: dict[str, dict[str, dict]] = {}
    for device in DEVICES:
        out[device] = {p.stem: json.loads(p.read_text()) for p in sorted((results / device).glob("*.json"))}
    return out


def machine_line(doc: dict, path: str) -> str:
    m = doc["machine"]
    where = f"GPU {m['gpu']}, " if m.get("gpu") else ""
    load = f"load average {m.get('load_avg_1m_at_start')} at start, {m.get('load_avg_1m_at_end', '?')} at end"
    return (f"*{where}CPU {m['cpu']} ({m['cpu_cores']} cores, torch threads {m.get('torch_threads')}); "
            f"torch {m['torch']}; {load}; "
            f"{doc.get('started', '')}; `{path}`*")


def fmt_rows(rows: list[dict], columns: list[str], fmt: dict | None = None) -> str:
    return common.table(rows, columns, fmt)


def losses_block(res: dict) -> str:
    parts = []
    groups = (("LF-DebianTags", "losses", DEVICES), ("Synthetic default (params.yaml)", "losses_synthetic", DEVICES),
              ("Short CPU trials on LF-DebianTags (learning rate)", "losses_trials", ("cpu",)))
    for title, stem, devices in groups:
        parts.append(f"#### {title}")
        for device in devices:
            docs = res[device]
            main = docs.get(stem)
            extra = docs.get(stem + "_tfidf")
            sweep = docs.get(stem + "_sweep")
            if not main and not extra:
                parts.append(f"{device.upper()}: " + PENDING[device])
                continue
            rows = [r for d in (extra, main, sweep) if d for r in d["rows"]]
            rows = sorted(rows, key=lambda r: "budget" in r or "error" in r)  # baselines first (stable)
            for r in rows:
                r["time s"] = r.get("train_s", r.get("seconds"))  # training (losses) or whole run (baselines)
                b = r.get("budget")
                r["budget"] = (f"{b['epochs']} ep ({r.get('steps')} steps), batch {b['batch_size']}, lr {b['lr']:g}, "
                               f"{b['negatives']}, "
                               f"len {b['max_len']}" + (f", {' '.join(b['overrides'])}" if b.get("overrides") else "")
                               if b else None)
                r["best epoch"] = r.get("best_epoch")
            head = main or extra
            parts.append(machine_line(head, f"bench/results/{device}/{stem}.json"))
            columns = ["method", "P@1", "P@3", "P@5", "nDCG@5", "PSP@1", "PSP@5", "R@10", "time s", "best epoch",
                       "budget"] + (["error"] if any("error" in r for r in rows) else [])
            parts.append(fmt_rows(rows, columns, {"time s": ".1f"}))
    return "\n\n".join(parts)


def simple_block(res: dict, stem: str, columns: list[str], fmt: dict | None = None, prepare=None,
                 devices=DEVICES, split=None) -> str:
    parts = []
    for device in devices:
        # stem.json, plus variants such as stem_2threads.json (each with its own machine line)
        found = {k: d for k, d in res[device].items() if k == stem or k.startswith(stem + "_")}
        if not found:
            parts.append(f"{device.upper()}: " + PENDING[device])
        for name, doc in found.items():
            parts.append(_simple_doc(doc, f"bench/results/{device}/{name}.json", columns, fmt, prepare, split))
    return "\n\n".join(parts)


def _simple_doc(doc: dict, path: str, columns, fmt, prepare, split) -> str:
    parts = [machine_line(doc, path)]
    rows = [prepare(dict(r)) if prepare else r for r in doc["rows"]]
    if not any("error" in r for r in rows):
        columns = [c for c in columns if c != "error"]
    if split:
        for key, cols in split:
            sub = [r for r in rows if r.get("part") == key]
            if sub:
                parts.append(fmt_rows(sub, cols, fmt))
        if "predictor" in doc.get("settings", {}):
            parts.append(f"Predictor: {doc['settings']['predictor']}.")
    else:
        parts.append(fmt_rows(rows, columns, fmt))
    return "\n\n".join(parts)


def index_params(r: dict) -> dict:
    r["params"] = " ".join(f"{k}={v}" for k, v in (r.get("params") or {}).items()) or None
    return r


def load_row(r: dict) -> dict:
    r["bundles_seen"] = len(r.get("bundles_seen") or [])
    r["switch_s"] = ", ".join(f"{v:.2f}" if v is not None else "-" for v in r["switch_s"]) if r.get("switch_s") else None
    return r


def blocks(res: dict) -> dict[str, str]:
    return {
        "losses": losses_block(res),
        "throughput": simple_block(res, "throughput", ["mode", "examples_per_s", "step_ms", "refresh_s", "pool_labels",
                                                       "labels_grad", "labels_no_grad", "queries_no_grad", "peak_mb",
                                                       "step_peak_mb", "error"],
                                   {"pool_labels": ".1f", "peak_mb": ".0f", "step_peak_mb": ".0f", "refresh_s": ".1f",
                                    "labels_grad": ".0f", "labels_no_grad": ".0f"}),
        "memory": simple_block(res, "memory", ["mode", "labels", "step_s", "refresh_s", "step_amortised_s",
                                               "labels_grad", "baseline_mb", "peak_mb", "step_mb", "state_mb",
                                               "beyond_mb", "error"],
                               {"step_s": ".2f", "refresh_s": ".1f", "step_amortised_s": ".2f", "labels_grad": ".0f",
                                "baseline_mb": ".0f", "peak_mb": ".0f", "step_mb": ".0f", "state_mb": ".1f",
                                "beyond_mb": ".1f"}),
        "serving": simple_block(res, "serving", [], {"p50_ms": ".2f", "p99_ms": ".2f", "mean_ms": ".2f",
                                                     "vs_pytorch": ".2f",
                                                     "cosine_mean": ".4f", "cosine_min": ".4f"},
                                split=[("encoder", ["threads", "backend", "ms_per_batch", "sequences_per_s",
                                                    "vs_pytorch"]),
                                       ("predictor", ["backend", "p50_ms", "p99_ms", "mean_ms", "queries"]),
                                       ("int8", ["encoder", "P@1", "P@3", "P@5", "nDCG@5", "PSP@5", "R@10",
                                                 "R@100", "cosine_mean", "cosine_min"])]),
        "load": simple_block(res, "load", ["scenario", "requests", "errors", "requests_per_s", "p50_ms", "p99_ms",
                                           "mean_batch_texts", "max_batch_texts", "bundles_seen", "switch_s"],
                             {"requests_per_s": ".1f", "p50_ms": ".1f", "p99_ms": ".1f", "mean_batch_texts": ".1f"},
                             prepare=load_row, devices=("cpu",)),
        "index": simple_block(res, "index", ["labels", "type", "build_s", "build_cpu_s", "queries_per_s",
                                             "recall@100", "index_mb", "params"],
                              {"recall@100": ".4f", "queries_per_s": ".0f", "build_s": ".1f", "build_cpu_s": ".1f"},
                              prepare=index_params, devices=("cpu",)),
    }


def render(doc_text: str, rendered: dict[str, str]) -> str:
    for name, body in rendered.items():
        pattern = re.compile(rf"(<!-- BEGIN bench:{name} -->\n).*?(<!-- END bench:{name} -->)", re.S)
        if not pattern.search(doc_text):
            raise SystemExit(f"{DOC}: no block `<!-- BEGIN bench:{name} -->` ... `<!-- END bench:{name} -->`")
        doc_text = pattern.sub(lambda m: m.group(1) + body + "\n" + m.group(2), doc_text)
    return doc_text


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--results", default=str(common.RESULTS), help="directory holding cpu/ and gpu/")
    ap.add_argument("--doc", default=str(DOC))
    ap.add_argument("--print", action="store_true", help="print the rendered blocks, do not write")
    args = ap.parse_args(argv)
    rendered = blocks(load(Path(args.results)))
    if args.print:
        for name, body in rendered.items():
            print(f"## {name}\n\n{body}\n")
        return 0
    from dexml import fileio
    doc = Path(args.doc)
    fileio.write_text(doc, render(doc.read_text(), rendered))
    print(f"wrote {doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
