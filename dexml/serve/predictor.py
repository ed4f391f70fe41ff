"""Serving: `Predictor(bundle_dir).predict(texts, k)` and `dexml predict`, without torch.

onnxruntime + `tokenizers` embed the texts (dexml.onnx_encoder), faiss finds the nearest
labels. The index and evaluate stages embed and search through this same class, so what
they measure is the code path that ships. A label index with a folded per-label bias gets
the query constant appended here (dexml/serve/priors.py); a bundle whose manifest names `rae`
settings mixes in the labels of the nearest training queries (dexml/serve/rae.py).
"""
from __future__ import annotations

import json
import sys
from itertools import islice
from pathlib import Path

import numpy as np

from dexml import paths
from dexml.errors import BundleError, DexmlError
from dexml.serve import priors, rae
from dexml.serve.bundle import MANIFEST_FILE, verify_bundle
from dexml.serve.encoder import OnnxEncoder
from dexml.serve.index import (
    INDEX_FILE,
    LABELS_FILE,
    configure_search,
    load_index,
    load_memory,
    to_gpu,
    use_gpu,
)


class Predictor:
    """A bundle loaded for prediction.

    verify: check the manifest's checksums first (refuses tampered/incomplete bundles); the
    index and evaluate stages pass False, as they run before the manifest exists.
    int8: use the int8 query encoder (when the bundle has one). gpu: use onnxruntime's CUDA
    provider and faiss GPU search when installed and a GPU is present, CPU otherwise.
    The index and labels are loaded on first use (the index stage only embeds).
    rae: retrieval-augmented prediction. None = as the verified manifest says (its `rae`
    settings, written by the evaluate stage; off without them or unverified); False = off;
    a RaeSettings (or its dict) = on with those settings (the bundle needs the memory).
    """

    def __init__(self, bundle_dir: str | Path = paths.BUNDLE_DIR, verify: bool = True,
                 int8: bool = False, gpu: bool = True, rae: "rae.RaeSettings | dict | bool | None" = None):
        self.dir = Path(bundle_dir)
        self.manifest = verify_bundle(self.dir) if verify else None
        self.encoder = OnnxEncoder(self.dir / "encoder", int8=int8, allow_gpu=gpu)
        self._gpu = gpu
        self._index = None
        self.index_info: dict | None = None  # index.json, once the index is loaded
        self._labels: list[tuple[str, str]] | None = None
        self._memory = None
        self.rae = self._rae_settings(rae)

    def _rae_settings(self, setting) -> "rae.RaeSettings | None":
        if setting is None:
            setting = (self.manifest or {}).get("rae") or False
            where = self.dir / MANIFEST_FILE
        else:
            where = "Predictor(rae=...)"
        if setting is False:
            return None
        if isinstance(setting, rae.RaeSettings):
            return setting
        return rae.RaeSettings.from_dict(setting, str(where))

    def embed(self, texts: list[str], side: str = "query", batch_size: int = 256,
              progress: str | None = None) -> np.ndarray:
        """(len(texts), dim) float32 embeddings from the ONNX encoder (progress: a bar's description)."""
        return self.encoder.embed(_as_texts(texts), side, batch_size, progress)

    @property
    def labels(self) -> list[tuple[str, str]]:
        """(uid, title) per label, in index-id order."""
        if self._labels is None:
            path = self.dir / "index" / LABELS_FILE
            if not path.exists():
                raise BundleError(f"{path}: file not found (run the index stage)")
            labels = []
            with open(path, encoding="utf-8") as f:
                for lineno, line in enumerate(f, 1):
                    try:
                        obj = json.loads(line)
                        labels.append((str(obj["uid"]), str(obj["title"])))
                    except (json.JSONDecodeError, KeyError, TypeError):
                        raise BundleError(f"{path}, line {lineno}: expected a JSON object with `uid` and "
                                          "`title`") from None
            self._labels = labels
        return self._labels

    @property
    def index(self):
        if self._index is None:
            index, self.index_info = load_index(self.dir / "index")
            folded = 1 if self.index_info.get("label_bias") else 0
            if index.d != self.encoder.dim + folded:
                raise BundleError(f"{self.dir / 'index' / INDEX_FILE}: vectors of size {index.d}, but the "
                                  f"encoder embeds to {self.encoder.dim}" + (" (+1 for the folded label bias)"
                                  if folded else "") + " (rerun the index stage)")
            self._index = to_gpu(index) if self._gpu and use_gpu("auto") else index
        return self._index

    @property
    def memory(self):
        """(faiss index of the training queries, their CSR label rows), loaded on first use."""
        if self._memory is None:
            index = self.index  # loads index_info
            mem_index, mem_labels = load_memory(self.dir / "index", self.index_info)
            if mem_index.d != self.encoder.dim or mem_labels.shape[1] != index.ntotal:
                raise BundleError(f"{self.dir / 'index'}: the training-query memory does not match the "
                                  "encoder or the label index (rerun the index stage)")
            self._memory = (to_gpu(mem_index) if self._gpu and use_gpu("auto") else mem_index, mem_labels)
        return self._memory

    def search(self, embeddings: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (scores, label ids) of the dual encoder alone, each (n, k), best first; id -1
        where fewer than k exist. `embeddings` are the query encoder's (the bias column, if the
        index has one, is appended here)."""
        index = self.index
        if self.index_info.get("label_bias"):
            embeddings = priors.fold_queries(embeddings)
        return _search(index, self.index_info.get("search", {}), embeddings, k)

    def search_memory(self, embeddings: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (scores, training rows) among the training queries in the memory."""
        index, _ = self.memory
        return _search(index, self.index_info["memory"].get("search", {}), embeddings, k)

    def rank(self, embeddings: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (scores, label ids) as shipped: retrieval-augmented when self.rae is set, else
        `search`. With rae, scores are the mixed probabilities of dexml.rae."""
        if self.rae is None:
            return self.search(embeddings, k)
        label_scores, label_ids = self.search(embeddings, self.rae.k)
        nb_scores, nb_ids = self.search_memory(embeddings, self.rae.k)
        scores = rae.rae_scores(label_scores, label_ids, nb_scores, nb_ids, self.memory[1],
                                self.rae.lam, self.rae.temperature)
        return rae.top_k_arrays(scores, k)

    def predict(self, texts: list[str], k: int = 5, batch_size: int = 256) -> list[list[tuple[str, str, float]]]:
        """Per text, its top-k labels as (uid, title, score), best first."""
        texts = _as_texts(texts)
        scores, ids = self.rank(self.embed(texts, "query", batch_size), k)
        labels = self.labels
        if len(labels) != self.index.ntotal:
            raise BundleError(f"{self.dir / 'index' / LABELS_FILE}: {len(labels)} labels, but the index holds "
                              f"{self.index.ntotal} (rerun the index stage)")
        return [[(*labels[j], float(s)) for s, j in zip(row_s, row_i) if j >= 0]
                for row_s, row_i in zip(scores, ids)]


def _search(index, search_params: dict, embeddings: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    ef = search_params.get("efSearch")
    if ef is not None:  # HNSW (always on CPU) needs efSearch >= k to return k results
        configure_search(index, {"efSearch": ef}, k)
    k_eff = min(k, index.ntotal)
    scores, ids = index.search(np.ascontiguousarray(embeddings, dtype=np.float32), k_eff)
    if k_eff < k:
        pad = k - k_eff
        scores = np.pad(scores, ((0, 0), (0, pad)), constant_values=-np.inf)
        ids = np.pad(ids, ((0, 0), (0, pad)), constant_values=-1)
    return scores, ids


def _as_texts(texts) -> list[str]:
    if isinstance(texts, str):
        raise TypeError("texts must be a list of strings, not one string (wrap it: [text])")
    texts = list(texts)
    bad = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
    if bad is not None:
        raise TypeError(f"texts[{bad}] is {type(texts[bad]).__name__}, expected a string")
    return texts


def add_arguments(parser) -> None:
    parser.add_argument("texts", nargs="*", help="texts to classify (or --jsonl to read stdin)")
    parser.add_argument("--bundle", default=paths.BUNDLE_DIR, help=f"bundle directory (default: {paths.BUNDLE_DIR})")
    parser.add_argument("-k", type=int, default=5, help="labels per text (default: 5)")
    parser.add_argument("--jsonl", action="store_true",
                        help='read JSON lines from stdin (a string, or an object with "text"); '
                             'write one JSON line per input')
    parser.add_argument("--int8", action="store_true", help="use the bundle's int8 query encoder")
    parser.add_argument("--no-rae", action="store_true",
                        help="the dual encoder alone, without the bundle's retrieval augmentation")


def _read_jsonl(stream):
    """Yield (text, extra fields to echo) per non-empty stdin line."""
    for lineno, line in enumerate(stream, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DexmlError(f"stdin, line {lineno}: not valid JSON ({e.msg}); expected a JSON string "
                             'or an object with a "text" field') from None
        if isinstance(obj, str):
            yield obj, {}
        elif isinstance(obj, dict) and isinstance(obj.get("text"), str):
            yield obj["text"], {k: obj[k] for k in ("id", "uid") if k in obj}
        else:
            raise DexmlError(f'stdin, line {lineno}: expected a JSON string or an object with a "text" '
                             f"string field, got {line.strip()[:80]!r}")


def main(args, params=None) -> int:
    if args.k < 1:
        raise DexmlError(f"-k: expected a positive integer, got {args.k}")
    if args.jsonl == bool(args.texts):
        raise DexmlError("give texts as arguments, or --jsonl to read them from stdin (one of the two)")
    predictor = Predictor(args.bundle, int8=args.int8, rae=False if args.no_rae else None)
    out = sys.stdout
    if not args.jsonl:
        for text, preds in zip(args.texts, predictor.predict(args.texts, args.k)):
            print(text, file=out)
            for rank, (uid, title, score) in enumerate(preds, 1):
                print(f"{rank:>4}. {score:8.4f}  {uid}  {title}", file=out)
        return 0
    rows = _read_jsonl(sys.stdin)
    while chunk := list(islice(rows, 256)):
        preds = predictor.predict([t for t, _ in chunk], args.k)
        for (text, extra), labels in zip(chunk, preds):
            record = {**extra, "text": text,
                      "labels": [{"uid": u, "title": t, "score": round(s, 6)} for u, t, s in labels]}
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
        out.flush()
    return 0
