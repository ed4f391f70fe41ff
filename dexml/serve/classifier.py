"""The classifier head in the bundle (UniDEC), folded into the label index. Torch-free.

With `model.classifier: true` the model scores a query against label l with two heads,

    dual encoder   s_de(q, l)  = q.e_l / tau (+ b_l with model.label_bias)
    classifier     s_cls(q, l) = (W q + c).w_l / tau

where q is the (normalised) query embedding, e_l the label's embedding, W, c the classifier's
query projection and w_l the label's free vector (a row of the L x dim table). The classifier's
query is a linear map of the dual encoder's, so the ranking score

    s(q, l) = s_de(q, l) + gamma * s_cls(q, l)          (gamma: index.classifier_gamma)
            = [q, 1].[e_l + gamma W^T w_l,  tau b_l + gamma c.w_l] / tau

is one exact inner product in dim + 1 dimensions, the same index the dual encoder alone (with a
label bias) has: no second ONNX output, no second search, no re-scoring. The index stage folds the
table into the label vectors (`fold`); the predictor appends the constant 1 to each query, as for
the label bias (dexml/serve/priors.py).

`classifier.safetensors` (tensors `weight` (dim, dim), `bias` (dim,), `table` (L, dim), float32)
sits next to the trained model and is copied into the bundle's encoder directory by the export stage.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from dexml.errors import BundleError

CLASSIFIER_FILE = "classifier.safetensors"


def write_classifier(path: str | Path, weight: np.ndarray, bias: np.ndarray, table: np.ndarray) -> None:
    from safetensors.numpy import save_file

    save_file({name: np.ascontiguousarray(value, dtype=np.float32)
               for name, value in (("weight", weight), ("bias", bias), ("table", table))}, str(path))


def read_classifier(path: str | Path, num_labels: int | None = None,
                    dim: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """-> (weight (dim, dim), bias (dim,), table (L, dim)), float32, checked: shapes agree, finite."""
    from safetensors.numpy import load_file

    path = Path(path)
    if not path.exists():
        raise BundleError(f"{path}: file not found (the model was trained with model.classifier: true)")
    try:
        tensors = load_file(str(path))
        weight, bias, table = (tensors[k].astype(np.float32) for k in ("weight", "bias", "table"))
    except Exception as e:  # safetensors raises its own errors for foreign or truncated files
        raise BundleError(f"{path}: expected safetensors with `weight`, `bias` and `table` ({e})") from None
    d = table.shape[1] if table.ndim == 2 else -1
    if table.ndim != 2 or weight.shape != (d, d) or bias.shape != (d,):
        raise BundleError(f"{path}: expected weight (d, d), bias (d,) and table (labels, d); got "
                          f"{weight.shape}, {bias.shape} and {table.shape}")
    if dim is not None and d != dim:
        raise BundleError(f"{path}: classifier vectors of size {d}, but the encoder embeds to {dim} "
                          "(the files come from different models)")
    if num_labels is not None and len(table) != num_labels:
        raise BundleError(f"{path}: {len(table)} label vectors, but the dataset has {num_labels} labels "
                          "(the model was trained on another label set)")
    for name, value in (("weight", weight), ("bias", bias), ("table", table)):
        if not np.isfinite(value).all():
            raise BundleError(f"{path}: `{name}` holds values that are not finite")
    return weight, bias, table


def fold(label_emb: np.ndarray, weight: np.ndarray, bias: np.ndarray, table: np.ndarray,
         gamma: float) -> tuple[np.ndarray, np.ndarray]:
    """-> ((L, dim) label vectors e_l + gamma W^T w_l, (L,) offsets gamma c.w_l), in the index's
    inner-product units (tau times the score); float32, computed in float64."""
    label_emb = np.asarray(label_emb, dtype=np.float64)
    if label_emb.shape != table.shape:
        raise ValueError(f"fold: label embeddings {label_emb.shape}, classifier table {table.shape}")
    table = np.asarray(table, dtype=np.float64)
    vectors = label_emb + gamma * (table @ np.asarray(weight, dtype=np.float64))
    offsets = gamma * (table @ np.asarray(bias, dtype=np.float64))
    return vectors.astype(np.float32), offsets.astype(np.float32)
