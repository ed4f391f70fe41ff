"""Label priors: one learned score offset per label, folded into the label vectors.

With `model.label_bias: true` the dual encoder scores a query against label l as
    s(q, l) = q.l / tau + b_l
where b (one float per label: the whole cost in parameters) is learned with the encoder
(dexml.model.LabelBias) and labels without a training positive keep b_l = 0. The bundle
serves it with no change to search: the index holds label vectors [l, tau * b_l] and queries
get a constant 1 appended, so the index's inner product is
    [q, 1].[l, tau * b_l] = q.l + tau * b_l = tau * s(q, l),
an exact maximum inner product search of the trained score (scaled by tau, same ranking).

The bias file (`label_bias.safetensors`, tensors `bias` and `trained`) sits next to the model
and is copied into the bundle's encoder directory by the export stage. Torch-free.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from dexml.errors import BundleError

BIAS_FILE = "label_bias.safetensors"
QUERY_CONSTANT = 1.0  # appended to every query embedding of a folded index


def write_label_bias(path: str | Path, bias: np.ndarray, trained: np.ndarray) -> None:
    """Save the bias (float32) and which labels learned one (bool) as safetensors."""
    from safetensors.numpy import save_file

    save_file({"bias": np.ascontiguousarray(bias, dtype=np.float32),
               "trained": np.ascontiguousarray(trained, dtype=np.uint8)}, str(path))


def read_label_bias(path: str | Path, num_labels: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """-> (bias float32, trained bool), checked: same length, finite, 0 where not trained."""
    from safetensors.numpy import load_file

    path = Path(path)
    if not path.exists():
        raise BundleError(f"{path}: file not found (the model was trained with model.label_bias: true)")
    try:
        tensors = load_file(str(path))
        bias, trained = tensors["bias"].astype(np.float32), tensors["trained"].astype(bool)
    except Exception as e:  # safetensors raises its own errors for foreign or truncated files
        raise BundleError(f"{path}: expected safetensors with `bias` and `trained` ({e})") from None
    if bias.ndim != 1 or trained.shape != bias.shape:
        raise BundleError(f"{path}: expected two vectors of equal length, got shapes {bias.shape} and {trained.shape}")
    if num_labels is not None and len(bias) != num_labels:
        raise BundleError(f"{path}: {len(bias)} label biases, but the dataset has {num_labels} labels "
                          "(the model was trained on another label set)")
    if not np.isfinite(bias).all():
        raise BundleError(f"{path}: bias of label {int(np.flatnonzero(~np.isfinite(bias))[0])} is not finite")
    if np.any(bias[~trained] != 0):
        raise BundleError(f"{path}: labels without training positives must have bias 0")
    return bias, trained


def fold_labels(label_emb: np.ndarray, bias: np.ndarray, tau: float) -> np.ndarray:
    """(L, d) label embeddings -> (L, d + 1) [l, tau * b_l], float32."""
    label_emb = np.asarray(label_emb, dtype=np.float32)
    if len(bias) != len(label_emb):
        raise ValueError(f"fold_labels: {len(bias)} biases for {len(label_emb)} labels")
    column = (np.float32(tau) * np.asarray(bias, dtype=np.float32))[:, None]
    return np.ascontiguousarray(np.hstack([label_emb, column]))


def has_query_constant(index_info: dict) -> bool:
    """Whether the label index has the folded column (a label bias or a classifier head,
    dexml/serve/classifier.py) that queries need a constant 1 appended for."""
    return bool(index_info.get("label_bias") or index_info.get("classifier"))


def fold_queries(query_emb: np.ndarray) -> np.ndarray:
    """(n, d) query embeddings -> (n, d + 1) [q, 1], float32."""
    query_emb = np.asarray(query_emb, dtype=np.float32)
    column = np.full((len(query_emb), 1), QUERY_CONSTANT, dtype=np.float32)
    return np.ascontiguousarray(np.hstack([query_emb, column]))
