"""Serving: `Predictor(bundle_dir).predict(texts, k)` and `dexml predict`, without torch.

onnxruntime + `tokenizers` embed the texts (dexml.onnx_encoder), faiss finds the nearest
labels. The index and evaluate stages embed and search through this same class, so what
they measure is the code path that ships. A label index with a folded per-label bias or
classifier head gets the query constant appended here (dexml/serve/priors.py,
dexml/serve/classifier.py); a bundle whose manifest names `rae`
settings mixes in the labels of the nearest training queries (dexml/serve/rae.py).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from dexml import paths
from dexml.config import MAX_K
from dexml.errors import EXIT_ERROR, BundleError, DexmlError, InputError
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
    max_k: the most labels one query may ask for (`check_k`); every k is also capped at the
    label count before anything is allocated, so no k can claim more memory than that.
    threads: onnxruntime intra-op threads (None: as the bundle's encoder.json records).
    """

    def __init__(self, bundle_dir: str | Path = paths.BUNDLE_DIR, verify: bool = True,
                 int8: bool = False, gpu: bool = True, rae: "rae.RaeSettings | dict | bool | None" = None,
                 max_k: int = MAX_K, threads: int | None = None):
        if isinstance(max_k, bool) or not isinstance(max_k, int) or max_k < 1:
            raise InputError(f"max_k: expected a positive integer, got {max_k!r}")
        self.max_k = max_k
        self.dir = Path(bundle_dir)
        self.manifest = verify_bundle(self.dir) if verify else None
        self.encoder = OnnxEncoder(self.dir / "encoder", int8=int8, allow_gpu=gpu, intra_op_threads=threads)
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
            folded = 1 if priors.has_query_constant(self.index_info) else 0
            if index.d != self.encoder.dim + folded:
                raise BundleError(f"{self.dir / 'index' / INDEX_FILE}: vectors of size {index.d}, but the "
                                  f"encoder embeds to {self.encoder.dim}" + (" (+1 for the folded column)"
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

    def check_k(self, k, ntotal: int | None = None) -> int:
        """The k to search with: `k` checked (an integer >= 1) and capped at the label count
        (`ntotal`: another index's size); InputError when that is still above max_k. Call it
        before allocating anything for k: every search here does."""
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise InputError(f"k: expected a positive integer, got {k!r}")
        ntotal = self.index.ntotal if ntotal is None else ntotal
        capped = min(int(k), ntotal)
        if capped > self.max_k:
            raise InputError(f"k: at most {self.max_k} labels per query (max_k), got {k} "
                             f"(the bundle has {ntotal} labels)")
        return capped

    def search(self, embeddings: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (scores, label ids) of the label index alone (the dual encoder, with its folded
        label bias and classifier head if the bundle has them; no retrieval augmentation), each
        (n, min(k, labels)), best first; id -1 where the index finds fewer. `embeddings` are the
        query encoder's (the folded column's constant, if the index has one, is appended here)."""
        index = self.index
        k = self.check_k(k)
        if priors.has_query_constant(self.index_info):
            embeddings = priors.fold_queries(embeddings)
        return _search(index, self.index_info.get("search", {}), embeddings, k)

    def search_memory(self, embeddings: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (scores, training rows) among the training queries in the memory."""
        index, _ = self.memory
        return _search(index, self.index_info["memory"].get("search", {}), embeddings, self.check_k(k, index.ntotal))

    def rank(self, embeddings: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (scores, label ids) as shipped: retrieval-augmented when self.rae is set, else
        `search`. With rae, scores are the mixed probabilities of dexml.rae."""
        k = self.check_k(k)
        if self.rae is None:
            return self.search(embeddings, k)
        # rae.k is the bundle's setting (at most MAX_K, checked when read), not the caller's k.
        label_scores, label_ids = _search(self.index, self.index_info.get("search", {}),
                                          self._fold(embeddings), min(self.rae.k, self.index.ntotal))
        mem_index, mem_labels = self.memory
        nb_scores, nb_ids = _search(mem_index, self.index_info["memory"].get("search", {}), embeddings,
                                    min(self.rae.k, mem_index.ntotal))
        scores = rae.rae_scores(label_scores, label_ids, nb_scores, nb_ids, mem_labels,
                                self.rae.lam, self.rae.temperature)
        return rae.top_k_arrays(scores, k)

    def _fold(self, embeddings: np.ndarray) -> np.ndarray:
        return priors.fold_queries(embeddings) if priors.has_query_constant(self.index_info) else embeddings

    def predict(self, texts: list[str], k: int = 5, batch_size: int = 256) -> list[list[tuple[str, str, float]]]:
        """Per text, its top-k labels as (uid, title, score), best first (k is capped at the
        label count; InputError above max_k or for a text that is not valid Unicode)."""
        texts = _as_texts(texts)
        k = self.check_k(k)  # before the texts are embedded
        scores, ids = self.rank(self.embed(texts, "query", batch_size), k)
        labels = self.labels
        if len(labels) != self.index.ntotal:
            raise BundleError(f"{self.dir / 'index' / LABELS_FILE}: {len(labels)} labels, but the index holds "
                              f"{self.index.ntotal} (rerun the index stage)")
        return [[(*labels[j], float(s)) for s, j in zip(row_s, row_i) if j >= 0]
                for row_s, row_i in zip(scores, ids)]


def _search(index, search_params: dict, embeddings: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """faiss search for a k already capped at index.ntotal (faiss allocates (n, k) results)."""
    if not 1 <= k <= index.ntotal:
        raise ValueError(f"k must be in [1, {index.ntotal}], got {k}")
    ef = search_params.get("efSearch")
    if ef is not None:  # HNSW (always on CPU) needs efSearch >= k to return k results
        configure_search(index, {"efSearch": ef}, k)
    return index.search(np.ascontiguousarray(embeddings, dtype=np.float32), k)


def text_problem(text: str) -> str | None:
    """Why `text` cannot be encoded (None when it can): a lone surrogate, as JSON escapes like
    "\\udcff" and undecodable command-line bytes produce, is not valid Unicode text."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return (f"not valid Unicode text: a lone surrogate {text[e.start]!r} at character {e.start} "
                "(expected UTF-8 text)")
    return None


def _as_texts(texts) -> list[str]:
    if isinstance(texts, str):
        raise TypeError("texts must be a list of strings, not one string (wrap it: [text])")
    texts = list(texts)
    bad = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
    if bad is not None:
        raise TypeError(f"texts[{bad}] is {type(texts[bad]).__name__}, expected a string")
    for i, t in enumerate(texts):
        problem = text_problem(t)
        if problem:
            raise InputError(f"texts[{i}]: {problem}")
    return texts


MAX_LINE_BYTES = 1 << 20  # one --jsonl input line; a longer one is refused, not read into memory
CHUNK = 256  # --jsonl lines predicted together
EMPTY_TEXT = "empty or whitespace-only text: no labels (nothing to classify)"
EPILOG = """\
exit status: 0 every text answered (warnings allowed); 1 an error: the message names it (with
--jsonl, the valid lines are still answered and each bad one gets {"line": N, "error": ...});
2 bad arguments.
"""


def add_arguments(parser) -> None:
    import argparse

    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
    parser.add_argument("texts", nargs="*", help="texts to classify (or --jsonl to read stdin)")
    parser.add_argument("--bundle", default=paths.BUNDLE_DIR, help=f"bundle directory (default: {paths.BUNDLE_DIR})")
    parser.add_argument("-k", type=int, default=5,
                        help="labels per text (default: 5; capped at the bundle's label count)")
    parser.add_argument("--max-k", type=int, default=MAX_K,
                        help=f"refuse a -k above this many labels (default: {MAX_K}); bounds memory")
    parser.add_argument("--jsonl", action="store_true",
                        help='read JSON lines from stdin (a string, or an object with "text"); '
                             'write one JSON line per input')
    parser.add_argument("--empty", choices=("warn", "error"), default="warn",
                        help="an empty or whitespace-only text: answer with no labels and a warning "
                             "(default), or treat it as an error")
    parser.add_argument("--int8", action="store_true", help="use the bundle's int8 query encoder")
    parser.add_argument("--no-rae", action="store_true",
                        help="the dual encoder alone, without the bundle's retrieval augmentation")


def _stdin_lines(stream, limit: int = MAX_LINE_BYTES):
    """(line number, raw bytes or None when longer than `limit`) per line, never holding more
    than `limit` bytes of one line."""
    lineno = 0
    while raw := stream.readline(limit + 1):
        lineno += 1
        if len(raw) > limit and not raw.endswith(b"\n"):
            while (rest := stream.readline(limit + 1)) and not rest.endswith(b"\n"):
                pass  # skip to the end of the line
            yield lineno, None
        else:
            yield lineno, raw


def _read_jsonl(stream):
    """Yield (line number, text or None, extra fields to echo, problem or None) per non-blank line."""
    expected = 'expected a JSON string or an object with a "text" string field'
    for lineno, raw in _stdin_lines(stream):
        if raw is None:
            yield lineno, None, {}, f"longer than {MAX_LINE_BYTES} bytes; {expected}"
            continue
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            yield lineno, None, {}, f"not valid UTF-8 ({e.reason} at byte {e.start}); {expected}"
            continue
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            yield lineno, None, {}, f"not valid JSON ({e.msg}); {expected}"
            continue
        if isinstance(obj, dict) and isinstance(obj.get("text"), str):
            text, extra = obj["text"], {k: obj[k] for k in ("id", "uid") if k in obj}
        elif isinstance(obj, str):
            text, extra = obj, {}
        else:
            yield lineno, None, {}, f"{expected}, got {line.strip()[:80]!r}"
            continue
        yield lineno, text, extra, text_problem(text)


class _Answers:
    """Predicts the answerable texts of a batch together and reports the others, in order."""

    def __init__(self, predictor: Predictor, k: int, empty: str):
        self.predictor, self.k, self.empty = predictor, k, empty
        self.failed = False

    def batch(self, items: list[tuple[str, str | None, str | None]]):
        """items: (where, text, problem) -> (where, text, labels or None, problem, warning) each."""
        out = []
        for where, text, problem in items:
            warning = None
            if problem is None and not text.strip():
                if self.empty == "error":
                    problem = EMPTY_TEXT.replace(": no labels", "") + " (--empty error)"
                else:
                    warning = EMPTY_TEXT
            out.append([where, text, None, problem, warning])
        todo = [row for row in out if row[3] is None and row[4] is None]
        for row, labels in zip(todo, self.predictor.predict([row[1] for row in todo], self.k) if todo else []):
            row[2] = labels
        for row in out:
            if row[3] is not None:
                self.failed = True
                print(f"dexml predict: error: {row[0]}: {row[3]}", file=sys.stderr)
            elif row[4] is not None:
                print(f"dexml predict: warning: {row[0]}: {row[4]}", file=sys.stderr)
        return out


def main(args, params=None) -> int:
    if args.jsonl == bool(args.texts):
        raise DexmlError("give texts as arguments, or --jsonl to read them from stdin (one of the two)")
    if args.k < 1:
        raise DexmlError(f"-k: expected a positive integer, got {args.k}")
    if args.max_k < 1:
        raise DexmlError(f"--max-k: expected a positive integer, got {args.max_k}")
    predictor = Predictor(args.bundle, int8=args.int8, rae=False if args.no_rae else None, max_k=args.max_k)
    try:
        k = predictor.check_k(args.k)  # before any input is read or embedded
    except InputError as e:
        raise DexmlError(f"-k {args.k}: {str(e).removeprefix('k: ')} (--max-k raises the limit)") from None
    answers = _Answers(predictor, k, args.empty)
    out = sys.stdout
    if not args.jsonl:
        items = [(f"text {i}", t, text_problem(t)) for i, t in enumerate(args.texts, 1)]
        for _, text, labels, problem, _ in answers.batch(items):
            if problem is not None:
                continue
            print(text, file=out)
            for rank, (uid, title, score) in enumerate(labels or [], 1):
                print(f"{rank:>4}. {score:8.4f}  {uid}  {title}", file=out)
        return EXIT_ERROR if answers.failed else 0
    rows = _read_jsonl(sys.stdin.buffer)
    while True:
        chunk = [row for _, row in zip(range(CHUNK), rows)]
        if not chunk:
            break
        extras = {f"stdin, line {n}": (n, extra) for n, _, extra, _ in chunk}
        items = [(f"stdin, line {n}", text, problem) for n, text, _, problem in chunk]
        for where, text, labels, problem, warning in answers.batch(items):
            lineno, extra = extras[where]
            if problem is not None:
                record = {"line": lineno, **extra, "error": problem}
            else:
                record = {**extra, "text": text,
                          "labels": [{"uid": u, "title": t, "score": round(s, 6)} for u, t, s in labels or []]}
                if warning:
                    record["warning"] = warning
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
        out.flush()
    return EXIT_ERROR if answers.failed else 0
