"""`index` stage: every label embedded by the shipped ONNX encoder, then a faiss index.

data.dir's labels (+ its training queries with rae.enabled) + artifacts/bundle/encoder
-> artifacts/bundle/index (layout in dexml.serve.index). A per-label bias in the encoder
directory is folded into the label vectors (dexml.serve.priors), and so is a classifier head
(dexml.serve.classifier: one exact inner-product index ranks by the combined score). The embedding goes through
the same `OnnxEncoder` that serves, so the index holds what the predictor will compare with.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from dexml import paths
from dexml.config import Params
from dexml.data.dataset import LABEL_FILE, read_dataset, read_labelset
from dexml.serve import classifier, priors
from dexml.serve.encoder import OnnxEncoder
from dexml.serve.index import build_index, use_gpu, write_index_dir


def run(params: Params, root: str | Path = ".") -> dict:
    """Build artifacts/bundle/index under `root`; returns what index.json holds."""
    root = Path(root)
    data_dir = root / params.data.dir
    labels = read_labelset(data_dir / LABEL_FILE)
    gpu = use_gpu(params.index.use_gpu)
    encoder = OnnxEncoder(root / paths.BUNDLE_ENCODER, allow_gpu=params.index.use_gpu == "auto")
    start = time.perf_counter()
    emb = encoder.embed(labels.texts(params.data.label_text), "label", batch_size=params.index.batch_size,
                        progress="index: embedding labels")
    encode_s = time.perf_counter() - start
    meta = encoder.meta
    folded, head = None, None
    offsets = np.zeros(len(labels), np.float32)  # the appended column, in inner-product units
    if meta.get("classifier"):
        gamma = params.index.classifier_gamma
        weight, b, table = classifier.read_classifier(encoder.dir / meta["classifier"], num_labels=len(labels),
                                                      dim=encoder.dim)
        emb, offsets = classifier.fold(emb, weight, b, table, gamma)
        head = {"file": f"encoder/{meta['classifier']}", "gamma": gamma, "tau": meta["tau"],
                "query_constant": priors.QUERY_CONSTANT,
                "score": "dual encoder + gamma * classifier: [q, 1].[e_l + gamma W^T w_l, "
                         "tau b_l + gamma c.w_l] / tau"}
    if meta.get("label_bias"):
        bias, trained = priors.read_label_bias(encoder.dir / meta["label_bias"], num_labels=len(labels))
        offsets = offsets + np.float32(meta["tau"]) * bias
        folded = {"file": f"encoder/{meta['label_bias']}", "tau": meta["tau"],
                  "query_constant": priors.QUERY_CONSTANT, "trained_labels": int(trained.sum())}
    if folded or head:
        emb = priors.fold_labels(emb, offsets, 1.0)
    start = time.perf_counter()
    index, info = build_index(emb, params.index, gpu=gpu)
    info.update({
        "label_text": params.data.label_text,
        "encode_seconds": round(encode_s, 3),
        "encode_labels_per_s": round(len(labels) / max(encode_s, 1e-9), 1),
        "build_seconds": round(time.perf_counter() - start, 3),
        "onnx_providers": encoder.providers,
        "label_bias": folded,
        "classifier": head,
    })
    memory = None
    if params.rae.enabled:
        trn = read_dataset(data_dir).trn
        start = time.perf_counter()
        q_emb = encoder.embed(trn.texts(params.data.query_text), "query", batch_size=params.index.batch_size,
                              progress="index: embedding training queries (rae memory)")
        mem_encode_s = time.perf_counter() - start
        mem_index, mem_info = build_index(q_emb, params.index, gpu=gpu)
        y = sp.csr_matrix(trn.labels, dtype=np.float32)
        y.data[:] = 1.0  # the memory votes with binary label rows
        memory = (mem_index, y)
        info["memory"] = {**{k: mem_info[k] for k in ("type", "build", "search", "dim", "built_on")},
                          "num_queries": len(trn), "query_text": params.data.query_text,
                          "encode_seconds": round(mem_encode_s, 3)}
    write_index_dir(root / paths.BUNDLE_INDEX, index, info, labels.uids, labels.titles, memory)
    return info


def summary(info: dict) -> str:
    lines = [f"indexed {info['num_labels']} labels (dim {info['dim']}) as {info['type']} in "
             f"{paths.BUNDLE_INDEX}: encode {info['encode_seconds']} s "
             f"({info['encode_labels_per_s']} labels/s), build {info['build_seconds']} s on {info['built_on']}"]
    if info["label_bias"]:
        lines.append(f"label bias folded into the label vectors ({info['label_bias']['trained_labels']} "
                     "labels learned one)")
    if info.get("classifier"):
        lines.append(f"classifier head folded into the label vectors (gamma {info['classifier']['gamma']})")
    if "memory" in info:
        m = info["memory"]
        lines.append(f"memory: {m['num_queries']} training queries as {m['type']}, encode {m['encode_seconds']} s, "
                     f"{m['bytes'] / 2**20:.1f} MiB")
    return "\n".join(lines)
