"""`export` stage: the trained encoder(s) -> ONNX in the bundle, checked against PyTorch.

Writes artifacts/bundle/encoder/ (see dexml.onnx_encoder for the layout) atomically: a parity
failure leaves the previous export in place. A model's per-label bias is copied alongside. Exporter: TorchScript (`dynamo=False`), which
exports BERT-style towers with dynamic batch and sequence axes reliably and in seconds.
The parity check runs the ONNX graph through the same torch-free path that serves it
(`OnnxEncoder`: `tokenizers` + onnxruntime), so it also proves the tokenizer settings match.
The only stage besides train that imports torch (to load the trained model).

Which graph ships (`export.variant`): the towers are exported with attention written out
eagerly (`eager`) or through PyTorch's scaled_dot_product_attention (`sdpa`, what transformers
uses by default), each as exported (onnxruntime's own runtime optimisations at load time) or
rewritten by onnxruntime's transformer optimizer (`*_fused`: Attention, SkipLayerNormalization,
... fused ops; model_type bert). `auto` times every variant on one fixed batch of queries
(`variant_repeats` runs, median) with the bundle's session settings and ships the fastest that
passes the parity check; the report lists each variant's time, parity and fused ops. On this
project's CPU the eager graph ran about 1.3x PyTorch and the sdpa graph about 1.0x (its
attention does not fuse): docs/benchmarks.md, serving.
"""
from __future__ import annotations

import logging
import shutil
import tempfile
import time
import warnings
from itertools import islice
from pathlib import Path

import numpy as np

from dexml import fileio, paths
from dexml.config import DataParams, ExportParams, Params
from dexml.data.dataset import LABEL_FILE, SPLIT_FILES, iter_jsonl, make_text
from dexml.errors import ConfigError, DexmlError, require_optional
from dexml.serve import classifier as serve_classifier
from dexml.serve import priors
from dexml.serve.encoder import (
    ENCODER_META,
    INPUT_NAMES,
    OUTPUT_NAME,
    OnnxEncoder,
    session_options,
)

onnxruntime = require_optional("onnxruntime")  # at import: `dexml export` fails first thing without it

REPORT_FILE = "export_report.json"
# Inputs that stress the tokenizer settings: empty, case/accents, truncation, odd whitespace.
EDGE_TEXTS = ["", "UPPER case ÀÉÎ Ünïcödé", "truncate " * 300, "tabs\tand\nnewlines  中文 🙂"]


# name -> (attention implementation in transformers, onnxruntime transformer-optimizer fusion)
VARIANTS = {"sdpa": ("sdpa", False), "eager": ("eager", False),
            "sdpa_fused": ("sdpa", True), "eager_fused": ("eager", True)}
TIMING_BATCH = 32  # queries per timed batch (auto)


class ExportError(DexmlError):
    """The ONNX export does not reproduce the PyTorch model."""


def parity_texts(data_dir: str | Path, data: DataParams, n: int) -> dict[str, list[str]]:
    """Held-out texts per side: the first `n` test queries and `n` labels, plus EDGE_TEXTS."""
    data_dir = Path(data_dir)
    queries = [make_text(str(o.get("title", "")), str(o.get("content") or ""), data.query_text)
               for _, o in islice(iter_jsonl(data_dir / SPLIT_FILES["tst"]), n)]
    labels = [make_text(str(o.get("title", "")), str(o.get("content") or ""), data.label_text)
              for _, o in islice(iter_jsonl(data_dir / LABEL_FILE), n)]
    return {"query": queries + EDGE_TEXTS, "label": labels + EDGE_TEXTS}


def _export_tower(tower, example: dict, out: Path, opset: int, attention: str) -> None:
    import torch

    axes = {"batch": 0, "seq": 1}
    dynamic = {name: {i: a for a, i in axes.items()} for name in INPUT_NAMES}
    dynamic[OUTPUT_NAME] = {0: "batch"}
    transformer = tower.transformer
    before = transformer.config._attn_implementation
    transformer.set_attn_implementation(attention)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            # Deprecation and tracer warnings: the traced branches do not depend on batch or length
            # (parity on varied shapes below is the proof).
            warnings.simplefilter("ignore")
            torch.onnx.export(tower, (example["input_ids"], example["attention_mask"]), str(out),
                              input_names=list(INPUT_NAMES), output_names=[OUTPUT_NAME],
                              dynamic_axes=dynamic, opset_version=opset, dynamo=False)
    finally:
        transformer.set_attn_implementation(before)


def _fuse(src: Path, dst: Path, config) -> dict:
    """onnxruntime's transformer optimizer (model_type bert) on src -> dst; the fused op counts."""
    optimizer = require_optional("onnxruntime.transformers.optimizer")

    logging.disable(logging.WARNING)  # it logs every pattern it could not match
    try:
        model = optimizer.optimize_model(str(src), model_type="bert", num_heads=config.num_attention_heads,
                                         hidden_size=config.hidden_size, use_gpu=False)
        model.save_model_to_file(str(dst))
        return {k: int(v) for k, v in model.get_fused_operator_statistics().items() if v}
    finally:
        logging.disable(logging.NOTSET)


def _time_graphs(graphs: dict[str, Path], feeds: dict, session: dict, repeats: int) -> dict[str, float]:
    """Median seconds of one run on `feeds` per graph, after one warm-up run each. The graphs take
    turns (one run each per round), so a change in the machine's load hits them all alike."""
    sessions = {name: onnxruntime.InferenceSession(str(path), session_options(session),
                                                   providers=["CPUExecutionProvider"])
                for name, path in graphs.items()}
    times: dict[str, list[float]] = {name: [] for name in graphs}
    for sess in sessions.values():
        sess.run([OUTPUT_NAME], feeds)
    for _ in range(repeats):
        for name, sess in sessions.items():
            start = time.perf_counter()
            sess.run([OUTPUT_NAME], feeds)
            times[name].append(time.perf_counter() - start)
    return {name: float(np.median(t)) for name, t in times.items()}


def _quantize(src: Path, dst: Path) -> None:
    quantization = require_optional("onnxruntime.quantization")

    # per_channel: default per-tensor int8 cost ~0.05 cosine on MiniLM (stack notes).
    logging.disable(logging.WARNING)  # a root-logger hint about optional pre-processing
    try:
        # DefaultTensorType: shape inference leaves the outputs of fused (contrib) ops untyped
        quantization.quantize_dynamic(str(src), str(dst), per_channel=True,
                                     weight_type=quantization.QuantType.QInt8,
                                     extra_options={"DefaultTensorType": 1})  # onnx.TensorProto.FLOAT
    finally:
        logging.disable(logging.NOTSET)


def _combined_parity(model, onnx_encoder: OnnxEncoder, encoder_dir: Path, texts: dict) -> dict:
    """The ranking score as the bundle computes it (ONNX embeddings, the classifier folded into the
    label vectors, dexml/serve/classifier.py) against PyTorch's DualEncoder.serving_scores, on the
    parity queries x the parity labels (the dataset's first labels: ids 0..n-1), in inner-product
    units (tau x score, comparable with the embeddings' differences)."""
    import torch

    labels = texts["label"][:len(texts["label"]) - len(EDGE_TEXTS)]
    ids = torch.arange(len(labels))
    tau = model.meta.tau
    with torch.no_grad():
        ref = model.serving_scores(model.embed(texts["query"], "query"), model.embed(labels, "label"), ids) * tau
    weight, bias, table = serve_classifier.read_classifier(encoder_dir / serve_classifier.CLASSIFIER_FILE)
    vectors, offsets = serve_classifier.fold(onnx_encoder.embed(labels, "label"), weight, bias, table[:len(labels)], 1.0)
    if model.label_bias is not None:
        offsets = offsets + tau * model.label_bias.values().numpy()[:len(labels)]
    got = onnx_encoder.embed(texts["query"], "query") @ vectors.T + offsets
    return {"max_abs_diff": float(np.abs(got - ref.numpy()).max()) if len(labels) else 0.0,
            "texts": len(texts["query"]), "labels": len(labels)}


def export_encoder(model_dir: str | Path, out_dir: str | Path, params: ExportParams,
                   texts: dict[str, list[str]]) -> dict:
    """Export, check parity on `texts` ({"query": [...], "label": [...]}), return the report."""
    import torch

    from dexml.train.model import DualEncoder, write_classifier_file

    start = time.perf_counter()
    model = DualEncoder.load(model_dir).eval()
    tok = model.tokenizer
    if not getattr(tok, "is_fast", False) or tok.pad_token_id is None:
        raise ConfigError(f"{model_dir}: the tokenizer needs a fast (tokenizer.json) version and a pad "
                          "token, which the torch-free predictor uses")
    meta = model.meta
    towers = {"model": model.query_tower} if meta.shared else {"query": model.query_tower, "label": model.labels}
    files = ({"query": "model.onnx", "label": "model.onnx"} if meta.shared
             else {"query": "query.onnx", "label": "label.onnx"})
    # Two texts of different lengths, so the traced graph includes padding.
    example = model.tokenize(["a short text", "a somewhat longer example text to trace padding"], 16)
    session = {"intra_op_num_threads": params.ort_threads, "graph_optimization_level": params.ort_graph_optimization}
    encoder_meta = {
        "pooling": meta.pooling, "normalize": meta.normalize, "projection": meta.projection,
        "dim": meta.dim, "tau": meta.tau, "shared": meta.shared,
        "query_max_len": meta.query_max_len, "label_max_len": meta.label_max_len,
        "pad_token": tok.pad_token, "pad_id": tok.pad_token_id,
        "padding_side": tok.padding_side, "truncation_side": tok.truncation_side,
        "inputs": list(INPUT_NAMES), "output": OUTPUT_NAME,
        "files": files, "int8_files": {},
        # per-label score offsets, folded into the label vectors by the index stage
        "label_bias": priors.BIAS_FILE if model.label_bias is not None else None,
        "session": session, "variant": None,
        # the classifier head (UniDEC), folded into the label vectors by the index stage
        "classifier": serve_classifier.CLASSIFIER_FILE if model.classifier is not None else None,
    }
    names = list(VARIANTS) if params.variant == "auto" else [params.variant]
    refs = {side: model.embed(texts[side], side).numpy() for side in ("query", "label")}
    # A fixed batch: TIMING_BATCH queries padded to the query length.
    timing_ids = tok((texts["query"] * TIMING_BATCH)[:TIMING_BATCH], padding="max_length", truncation=True,
                     max_length=meta.query_max_len, return_tensors="np")
    feeds = {name: np.asarray(timing_ids[name], dtype=np.int64) for name in INPUT_NAMES}
    with fileio.atomic_dir(out_dir) as tmp, tempfile.TemporaryDirectory(prefix="dexml-export-") as work:
        work = Path(work)
        tok.save_pretrained(tmp)
        if model.label_bias is not None:
            priors.write_label_bias(tmp / priors.BIAS_FILE, model.label_bias.values().numpy(),
                                    model.label_bias.trained.numpy() > 0)
        if model.classifier is not None:
            write_classifier_file(tmp / serve_classifier.CLASSIFIER_FILE, model.classifier)
        variants, graphs = {}, {}
        for name in names:
            attention, fused = VARIANTS[name]
            plain = work / attention
            vdir = work / name if fused else plain
            if not plain.is_dir():  # each attention implementation is exported once
                plain.mkdir()
                for tower_name, tower in towers.items():
                    _export_tower(tower, example, plain / f"{tower_name}.onnx", params.opset, attention)
            fused_ops = None
            if fused:
                vdir.mkdir()
                for tower_name, tower in towers.items():
                    fused_ops = _fuse(plain / f"{tower_name}.onnx", vdir / f"{tower_name}.onnx",
                                      tower.transformer.config)
            variants[name] = {"attention": attention, "fused": fused, "fused_ops": fused_ops, "ms_per_batch": None}
            graphs[name] = vdir / files["query"]
        if len(names) > 1:
            for name, seconds in _time_graphs(graphs, feeds, session, params.variant_repeats).items():
                variants[name]["ms_per_batch"] = round(seconds * 1000, 3)
        # Fastest first; the first that reproduces PyTorch ships.
        order = sorted(names, key=lambda n: variants[n]["ms_per_batch"] or 0.0)
        chosen, onnx_encoder, parity = None, None, {}
        for name in order:
            for tower_name in towers:
                vdir = work / (name if VARIANTS[name][1] else VARIANTS[name][0])
                shutil.copyfile(vdir / f"{tower_name}.onnx", tmp / f"{tower_name}.onnx")
            fileio.write_json(tmp / ENCODER_META, {**encoder_meta, "variant": name})
            candidate = OnnxEncoder(tmp, allow_gpu=False)  # CPU: parity of the graph, not of the GPU
            parity = {}
            for side in ("query", "label"):
                got = candidate.embed(texts[side], side)
                parity[side] = {"max_abs_diff": float(np.abs(got - refs[side]).max()), "texts": len(texts[side])}
            worst = max(parity, key=lambda s: parity[s]["max_abs_diff"])
            variants[name]["parity_max_abs_diff"] = parity[worst]["max_abs_diff"]
            if parity[worst]["max_abs_diff"] <= params.parity_tol:
                chosen, onnx_encoder = name, candidate
                break
        if chosen is None:
            tried = ", ".join(f"{n} {variants[n]['parity_max_abs_diff']:.3g}" for n in order)
            raise ExportError(
                f"ONNX {files[worst]} differs from PyTorch on {worst} texts: max |diff| "
                f"{parity[worst]['max_abs_diff']:.3g} > export.parity_tol {params.parity_tol:g} "
                f"(variants tried: {tried}); the previous export (if any) is kept")
        encoder_meta["variant"] = chosen
        if model.classifier is not None:
            parity["combined"] = _combined_parity(model, onnx_encoder, tmp, texts)
            if parity["combined"]["max_abs_diff"] > params.parity_tol:
                raise ExportError(
                    f"ONNX export differs from PyTorch on the ranking scores (dual encoder + classifier): "
                    f"max |diff| {parity['combined']['max_abs_diff']:.3g} > export.parity_tol "
                    f"{params.parity_tol:g}; the previous export (if any) is kept")

        int8 = None
        if params.quantize_int8:
            int8_file = files["query"].replace(".onnx", "_int8.onnx")
            _quantize(tmp / files["query"], tmp / int8_file)
            encoder_meta["int8_files"] = {"query": int8_file}
            fileio.write_json(tmp / ENCODER_META, encoder_meta)
            fp32 = onnx_encoder.embed(texts["query"], "query")
            q8 = OnnxEncoder(tmp, int8=True, allow_gpu=False).embed(texts["query"], "query")
            cos = (fp32 * q8).sum(1) / np.maximum(
                np.linalg.norm(fp32, axis=1) * np.linalg.norm(q8, axis=1), 1e-12)
            int8 = {"file": int8_file, "side": "query", "cosine_mean": float(cos.mean()),
                    "cosine_min": float(cos.min()), "max_abs_diff": float(np.abs(q8 - fp32).max()),
                    "texts": len(texts["query"])}
            if len(names) > 1:
                int8["ms_per_batch"] = round(_time_graphs({"int8": tmp / int8_file}, feeds, session,
                                                          params.variant_repeats)["int8"] * 1000, 3)

        report = {
            "exporter": "torch.onnx.export (TorchScript, dynamo=False)", "opset": params.opset,
            "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
            "files": files, "parity": parity, "parity_tol": params.parity_tol, "int8": int8,
            "variant": chosen, "variant_setting": params.variant, "variants": variants,
            "timing": {"batch": TIMING_BATCH, "tokens": int(feeds["input_ids"].shape[1]),
                       "repeats": params.variant_repeats} if len(names) > 1 else None,
            "session": session,
            "seconds": round(time.perf_counter() - start, 2),
        }
        fileio.write_json(tmp / REPORT_FILE, report)
    return report


def run(params: Params, root: str | Path = ".") -> dict:
    """The stage: models/encoder -> artifacts/bundle/encoder (paths relative to `root`)."""
    root = Path(root)
    texts = parity_texts(root / params.data.dir, params.data, params.export.parity_texts)
    return export_encoder(root / paths.MODEL_DIR, root / paths.BUNDLE_ENCODER, params.export, texts)


def summary(report: dict) -> str:
    parity = ", ".join(f"{s} {v['max_abs_diff']:.2e}" for s, v in report["parity"].items())
    lines = [(f"exported {sorted(set(report['files'].values()))} to {paths.BUNDLE_ENCODER} "
              f"in {report['seconds']} s; parity max |diff|: {parity}")]
    timed = {n: v["ms_per_batch"] for n, v in report.get("variants", {}).items() if v.get("ms_per_batch")}
    if timed:
        lines.append(f"graph variant {report['variant']} (ms per batch of {report['timing']['batch']}: "
                     + ", ".join(f"{n} {ms:.1f}" for n, ms in sorted(timed.items(), key=lambda kv: kv[1])) + ")")
    if report["int8"]:
        lines.append(f"int8 {report['int8']['file']}: cosine to fp32 mean {report['int8']['cosine_mean']:.4f}, "
                     f"min {report['int8']['cosine_min']:.4f}")
    return "\n".join(lines)
