"""Benchmark 4: serving. Encoder throughput (batch 64 x 32 tokens) in PyTorch vs ONNX Runtime
fp32 (every export graph variant, the shipped one marked) vs int8, at each --threads count side by
side; end-to-end `Predictor` latency (p50/p99) for single queries; the metric change from the int8
query encoder on the test split.

The model is --model (a dexml encoder directory, e.g. one trained by bench/losses.py
--save-model) or, by default, the untrained --encoder. It is exported with the pipeline's own
`dexml.export.export_encoder` (parity-checked, int8 = dynamic per-channel quantization of the
query side). The int8 metric change scores the test queries with each query encoder against
the same fp32 label embeddings by exact search (no faiss needed). The Predictor rows need faiss
(a flat index built by dexml.index.build_index) and are skipped where it is absent.

    python bench/serving.py --device cpu
    taskset -c 0,1 python bench/serving.py --parts encoder --threads 1,2 --out bench/results/cpu/serving_variants.json
    python bench/serving.py --device cuda --model /tmp/decoupled   # adds PyTorch bf16 on the GPU
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import common  # noqa: E402

ENC_COLUMNS = ["threads", "backend", "ms_per_batch", "sequences_per_s", "vs_pytorch"]
LAT_COLUMNS = ["backend", "p50_ms", "p99_ms", "mean_ms", "queries"]
Q_COLUMNS = ["encoder", "P@1", "P@3", "P@5", "nDCG@5", "PSP@5", "R@10", "R@100"]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=common.DEFAULT_DATA, help="LF-layout dataset directory, or `synthetic`")
    ap.add_argument("--encoder", default=common.MINILM, help="untrained encoder used when --model is not given")
    ap.add_argument("--model", default=None, help="a dexml encoder directory (models/encoder layout)")
    ap.add_argument("--device", default="auto", help="where the PyTorch rows run")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=20, help="timed encoder batches per backend")
    ap.add_argument("--queries", type=int, default=200, help="single-query Predictor calls timed")
    ap.add_argument("--test-max", type=int, default=None, help="score only the first N test points")
    ap.add_argument("--parts", default="encoder,predictor,int8", help="comma list of encoder,predictor,int8")
    ap.add_argument("--threads", default=None, help="comma list of thread counts for the encoder rows, measured "
                    "one after the other in this run (default: OMP_NUM_THREADS, else all cores)")
    ap.add_argument("--no-variants", action="store_true", help="only the shipped graph (export.variant auto), "
                    "not every variant exported separately")
    ap.add_argument("--text", default=None, choices=["title", "title+content"])
    ap.add_argument("--out", default=None)
    ap.add_argument("--workdir", default=None)
    return ap.parse_args(argv)


def median_time(fn, repeats: int, device: str = "cpu", warmup: int = 3) -> float:
    import numpy as np

    for _ in range(warmup):
        fn()
    common.sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        common.sync(device)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def encoder_rows(model, graphs: dict[str, Path], texts: list[str], args, device: str, threads: int) -> list[dict]:
    """ms per (batch x tokens) batch with `threads` threads: PyTorch (fp32, + bf16 autocast on
    CUDA), then ONNX Runtime on each graph of `graphs` (label -> .onnx file)."""
    import numpy as np
    import onnxruntime as ort
    import torch

    from dexml.serve.encoder import OUTPUT_NAME

    batch = (texts * (args.batch // max(len(texts), 1) + 1))[:args.batch]
    enc = model.tokenizer(batch, padding="max_length", truncation=True, max_length=args.tokens, return_tensors="pt")
    rows = []
    if threads:
        torch.set_num_threads(threads)
    tower = model.query_tower.to(device).eval()
    ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
    variants = [("fp32", None)] + ([("bf16 autocast", torch.bfloat16)] if device.startswith("cuda") else [])
    for name, dtype in variants:
        def run(dtype=dtype):
            with torch.no_grad(), (torch.autocast("cuda", dtype=dtype) if dtype else contextlib.nullcontext()):
                tower(ids, mask)
        t = median_time(run, args.repeats, device)
        rows.append({"part": "encoder", "threads": threads or "all", "backend": f"PyTorch {name} eager ({device})",
                     "ms_per_batch": t * 1000, "sequences_per_s": args.batch / t})
    torch_ms = rows[0]["ms_per_batch"]
    feeds = {"input_ids": enc["input_ids"].numpy().astype(np.int64),
             "attention_mask": enc["attention_mask"].numpy().astype(np.int64)}
    for label, file in graphs.items():
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads  # 0 = all cores
        session = ort.InferenceSession(str(file), options, providers=["CPUExecutionProvider"])
        t = median_time(lambda session=session: session.run([OUTPUT_NAME], feeds), args.repeats)
        rows.append({"part": "encoder", "threads": threads or "all", "backend": f"ONNX Runtime {label} (cpu)",
                     "ms_per_batch": t * 1000, "sequences_per_s": args.batch / t})
    for row in rows:
        row["vs_pytorch"] = torch_ms / row["ms_per_batch"]
    return rows


def predictor_rows(bundle: Path, labels, queries: list[str], args) -> list[dict]:
    """Single-query Predictor.predict latency over a flat faiss index of the labels."""
    from dexml.config import IndexParams
    from dexml.serve.encoder import OnnxEncoder
    from dexml.serve.index import build_index, write_index_dir
    from dexml.serve.predictor import Predictor

    emb = OnnxEncoder(bundle / "encoder", allow_gpu=False).embed(labels.texts(args.label_text), "label")
    index, info = build_index(emb, IndexParams(type="flat"))
    write_index_dir(bundle / "index", index, info, labels.uids, labels.titles)
    rows = []
    for int8 in (False, True):
        predictor = Predictor(bundle, verify=False, int8=int8, gpu=False)
        for q in queries[:10]:
            predictor.predict([q], k=5)
        times = []
        for q in queries[:args.queries]:
            start = time.perf_counter()
            predictor.predict([q], k=5)
            times.append(time.perf_counter() - start)
        rows.append({"part": "predictor", "backend": f"Predictor, {'int8' if int8 else 'fp32'} query encoder, "
                     f"flat index, k=5", **common.quantiles_ms(times), "queries": len(times)})
    return rows


def int8_rows(enc_dir: Path, ds, texts: dict) -> list[dict]:
    """Test metrics with the fp32 and the int8 query encoder against the same fp32 labels."""
    import numpy as np
    import torch

    from dexml.serve.encoder import OnnxEncoder

    fp32 = OnnxEncoder(enc_dir, allow_gpu=False)
    labels = torch.from_numpy(fp32.embed(texts["label"], "label"))
    q32 = fp32.embed(texts["query"], "query")
    q8 = OnnxEncoder(enc_dir, int8=True, allow_gpu=False).embed(texts["query"], "query")
    cos = (q32 * q8).sum(1) / np.maximum(np.linalg.norm(q32, axis=1) * np.linalg.norm(q8, axis=1), 1e-12)
    m32 = common.xmc_eval(common.exact_top_k(torch.from_numpy(q32), labels, 100), ds)
    m8 = common.xmc_eval(common.exact_top_k(torch.from_numpy(q8), labels, 100), ds)
    delta = {k: m8[k] - m32[k] for k in m32}
    return [{"part": "int8", "encoder": "ONNX fp32", **m32},
            {"part": "int8", "encoder": "ONNX int8 (query side)", **m8,
             "cosine_mean": float(cos.mean()), "cosine_min": float(cos.min())},
            {"part": "int8", "encoder": "change (int8 - fp32)", **delta}]


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = common.resolve_device(args.device)
    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    workdir = common.scratch_dir(args.workdir, "dexml_bench_serving_")
    _, ds = common.load_dataset(args.data, workdir)
    text = common.text_mode(args.data, args.text)
    args.label_text = text
    if args.test_max:
        ds.tst = ds.tst.subset(list(range(min(args.test_max, len(ds.tst)))))
        ds.filter_tst = ds.filter_tst[ds.filter_tst[:, 0] < len(ds.tst)]
    texts = {"query": ds.tst.texts(text), "label": ds.lbl.texts(text)}

    from dexml.config import ExportParams, ModelParams
    from dexml.pipeline.export import EDGE_TEXTS, VARIANTS, export_encoder
    from dexml.train.model import DualEncoder

    if args.model:
        model_dir = Path(args.model)
    else:
        model_dir = workdir / "model"
        DualEncoder.from_params(ModelParams(encoder=args.encoder, query_max_len=args.tokens,
                                            label_max_len=args.tokens)).save(model_dir)
    model = DualEncoder.load(model_dir)
    bundle = workdir / "bundle"
    parity = {"query": texts["query"][:64] + EDGE_TEXTS, "label": texts["label"][:64] + EDGE_TEXTS}
    with common.Clock() as c:  # what the pipeline ships: export.variant auto, + int8 of the chosen graph
        report = export_encoder(model_dir, bundle / "encoder", ExportParams(quantize_int8=True), parity)
    from dexml.serve.encoder import read_encoder_meta

    meta = read_encoder_meta(bundle / "encoder")
    chosen = report["variant"]
    graphs = {}
    if "encoder" in parts and not args.no_variants:
        for name in VARIANTS:  # each variant on its own, through the same export code
            report_v = export_encoder(model_dir, workdir / f"variant_{name}", ExportParams(variant=name), parity)
            note = " [old default]" if name == "sdpa" else ""
            note += " [shipped]" if name == chosen else ""
            graphs[f"fp32 {name}{note}"] = workdir / f"variant_{name}" / report_v["files"]["query"]
    else:
        graphs[f"fp32 {chosen} [shipped]"] = bundle / "encoder" / meta["files"]["query"]
    graphs[f"int8 of {chosen}"] = bundle / "encoder" / meta["int8_files"]["query"]
    settings = {"data": str(args.data), "model": str(args.model or f"untrained {args.encoder}"),
                "batch": args.batch, "tokens": args.tokens, "repeats": args.repeats, "text": text,
                "export_s": round(c.wall_s, 1), "export_parity": report["parity"], "int8_export": report["int8"],
                "export_variant": chosen, "export_variants": report["variants"], "export_timing": report["timing"],
                "onnxruntime_providers": "CPUExecutionProvider", "test_points": len(ds.tst),
                "onnxruntime_threads": args.threads or os.environ.get("OMP_NUM_THREADS", "default (all cores)")}
    out = Path(args.out) if args.out else common.default_out("serving", device)
    results = common.Results(out, "serving", device, settings)

    if "encoder" in parts:
        default = int(os.environ.get("OMP_NUM_THREADS", "0"))
        for threads in [int(t) for t in args.threads.split(",")] if args.threads else [default]:
            for row in encoder_rows(model, graphs, texts["query"], args, device, threads):
                results.add(row)
    if "predictor" in parts:
        try:
            import faiss  # noqa: F401
        except ImportError:
            results.doc["settings"]["predictor"] = "skipped: faiss is not installed here"
        else:
            for row in predictor_rows(bundle, ds.lbl, texts["query"], args):
                results.add(row)
    if "int8" in parts:
        for row in int8_rows(bundle / "encoder", ds, texts):
            results.add(row)

    rows = results.doc["rows"]
    for part, cols in (("encoder", ENC_COLUMNS), ("predictor", LAT_COLUMNS), ("int8", Q_COLUMNS)):
        if any(r["part"] == part for r in rows):
            print(common.table([r for r in rows if r["part"] == part], cols))
    print(f"wrote {out}")
    return results.doc


if __name__ == "__main__":
    main()
