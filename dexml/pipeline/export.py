"""`export` stage: the trained encoder(s) -> ONNX in the bundle, checked against PyTorch.

Writes artifacts/bundle/encoder/ (see dexml.onnx_encoder for the layout) atomically: a parity
failure leaves the previous export in place. A model's per-label bias is copied alongside. Exporter: TorchScript (`dynamo=False`), which
exports BERT-style towers with dynamic batch and sequence axes reliably and in seconds.
The parity check runs the ONNX graph through the same torch-free path that serves it
(`OnnxEncoder`: `tokenizers` + onnxruntime), so it also proves the tokenizer settings match.
The only stage besides train that imports torch (to load the trained model).
"""
from __future__ import annotations

import logging
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
from dexml.serve.encoder import ENCODER_META, INPUT_NAMES, OUTPUT_NAME, OnnxEncoder

onnxruntime = require_optional("onnxruntime")  # at import: `dexml export` fails first thing without it

REPORT_FILE = "export_report.json"
# Inputs that stress the tokenizer settings: empty, case/accents, truncation, odd whitespace.
EDGE_TEXTS = ["", "UPPER case ÀÉÎ Ünïcödé", "truncate " * 300, "tabs\tand\nnewlines  中文 🙂"]


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


def _export_tower(tower, example: dict, out: Path, opset: int) -> None:
    import torch

    axes = {"batch": 0, "seq": 1}
    dynamic = {name: {i: a for a, i in axes.items()} for name in INPUT_NAMES}
    dynamic[OUTPUT_NAME] = {0: "batch"}
    with warnings.catch_warnings(), torch.no_grad():
        # Deprecation and tracer warnings: the traced branches do not depend on batch or length
        # (parity on varied shapes below is the proof).
        warnings.simplefilter("ignore")
        torch.onnx.export(tower, (example["input_ids"], example["attention_mask"]), str(out),
                          input_names=list(INPUT_NAMES), output_names=[OUTPUT_NAME],
                          dynamic_axes=dynamic, opset_version=opset, dynamo=False)


def _quantize(src: Path, dst: Path) -> None:
    quantization = require_optional("onnxruntime.quantization")

    # per_channel: default per-tensor int8 cost ~0.05 cosine on MiniLM (stack notes).
    logging.disable(logging.WARNING)  # a root-logger hint about optional pre-processing
    try:
        quantization.quantize_dynamic(str(src), str(dst), per_channel=True,
                                     weight_type=quantization.QuantType.QInt8)
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
        # the classifier head (UniDEC), folded into the label vectors by the index stage
        "classifier": serve_classifier.CLASSIFIER_FILE if model.classifier is not None else None,
    }
    with fileio.atomic_dir(out_dir) as tmp:
        for name, tower in towers.items():
            _export_tower(tower, example, tmp / f"{name}.onnx", params.opset)
        tok.save_pretrained(tmp)
        if model.label_bias is not None:
            priors.write_label_bias(tmp / priors.BIAS_FILE, model.label_bias.values().numpy(),
                                    model.label_bias.trained.numpy() > 0)
        if model.classifier is not None:
            write_classifier_file(tmp / serve_classifier.CLASSIFIER_FILE, model.classifier)
        fileio.write_json(tmp / ENCODER_META, encoder_meta)

        onnx_encoder = OnnxEncoder(tmp, allow_gpu=False)  # CPU: parity of the graph, not of the GPU
        parity = {}
        for side in ("query", "label"):
            ref = model.embed(texts[side], side).numpy()
            got = onnx_encoder.embed(texts[side], side)
            parity[side] = {"max_abs_diff": float(np.abs(got - ref).max()), "texts": len(texts[side])}
        if model.classifier is not None:
            parity["combined"] = _combined_parity(model, onnx_encoder, tmp, texts)
        worst = max(parity, key=lambda s: parity[s]["max_abs_diff"])
        if parity[worst]["max_abs_diff"] > params.parity_tol:
            raise ExportError(
                f"ONNX {files.get(worst, files['query'])} differs from PyTorch on "
                f"{worst + ' texts' if worst in files else 'the ranking scores (dual encoder + classifier)'}: "
                f"max |diff| "
                f"{parity[worst]['max_abs_diff']:.3g} > export.parity_tol {params.parity_tol:g}; "
                f"the previous export (if any) is kept")

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

        report = {
            "exporter": "torch.onnx.export (TorchScript, dynamo=False)", "opset": params.opset,
            "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
            "files": files, "parity": parity, "parity_tol": params.parity_tol, "int8": int8,
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
    lines = [f"exported {sorted(set(report['files'].values()))} to {paths.BUNDLE_ENCODER} "
             f"in {report['seconds']} s; parity max |diff|: {parity}"]
    if report["int8"]:
        lines.append(f"int8 {report['int8']['file']}: cosine to fp32 mean {report['int8']['cosine_mean']:.4f}, "
                     f"min {report['int8']['cosine_min']:.4f}")
    return "\n".join(lines)
