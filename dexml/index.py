"""`index` stage: every label embedded by the shipped ONNX encoder, then a faiss index.

Writes artifacts/bundle/index/ atomically:
    labels.faiss   inner-product index; faiss id = label index (row of lbl.json.gz)
    labels.jsonl   {"uid", "title"} per line, in label-index order (the id map)
    index.json     type, build params, search params, num_labels, dim, timings;
                   `label_bias` when the label vectors carry the model's per-label bias
                   (folded: [l, tau * b_l], queries get a 1 appended; dexml/priors.py);
                   `memory` when the training queries are indexed too (rae.enabled)
    queries.faiss, queries_labels.npz   with rae.enabled: the training queries' embeddings
                   (faiss id = training row) and their label rows (CSR), the memory of
                   retrieval-augmented prediction (dexml/rae.py)
Types: exact (IndexFlatIP), HNSW (IndexHNSWFlat) or IVF-PQ (IndexIVFPQ); `auto` is exact up to
index.auto_flat_max vectors and HNSW beyond. No torch here: the predictor loads indexes too.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp

try:
    import faiss
except ImportError:  # the CPU and GPU builds are separate extras (pip extras cannot swap packages)
    raise ImportError("faiss is not installed: pip install 'dexml[cpu]' (faiss-cpu, onnxruntime) "
                      "or, on a GPU machine, 'dexml[gpu]' (faiss-gpu, onnxruntime-gpu)") from None

from dexml import atomic, paths, priors
from dexml.config import IndexParams, Params
from dexml.data import LABEL_FILE, LabelSet, read_dataset, read_labelset
from dexml.errors import BundleError, ConfigError, DataError

INDEX_FILE = "labels.faiss"
LABELS_FILE = "labels.jsonl"
INDEX_META = "index.json"
MEMORY_INDEX_FILE = "queries.faiss"
MEMORY_LABELS_FILE = "queries_labels.npz"


def use_gpu(setting: str) -> bool:
    return setting == "auto" and faiss.get_num_gpus() > 0


def choose_type(num_labels: int, p: IndexParams) -> str:
    if p.type != "auto":
        return p.type
    return "flat" if num_labels <= p.auto_flat_max else "hnsw"


def _ivfpq_shape(n: int, d: int, p: IndexParams) -> tuple[int, int, int]:
    """(nlist, pq_m, nbits), clamped to what `n` training vectors can support."""
    # k-means wants >= 39 points per centroid (faiss warns below that); PQ needs 2^nbits points.
    nlist = p.ivf_nlist or round(4 * math.sqrt(n))
    nlist = max(1, min(nlist, n // 39))
    # default: the largest divisor of d up to d / 4 (d / 4 itself for the usual sizes; a folded
    # label bias adds one dimension)
    pq_m = p.pq_m or max(m for m in range(1, max(1, d // 4) + 1) if d % m == 0)
    if d % pq_m:
        raise ConfigError(f"params key `index.pq_m`: expected a divisor of the embedding size {d}, got {pq_m}")
    nbits = max(1, min(8, int(math.log2(n))))
    return nlist, pq_m, nbits


def build_index(emb: np.ndarray, p: IndexParams, gpu: bool = False):
    """-> (faiss index on CPU, info dict). `emb` (n, d) float32; id i = row i."""
    emb = np.ascontiguousarray(emb, dtype=np.float32)
    n, d = emb.shape
    if n == 0:
        raise DataError("index: no label embeddings to index (the label file is empty)")
    kind = choose_type(n, p)
    search: dict = {}
    built_on = "cpu"
    if kind == "flat":
        index = faiss.IndexFlatIP(d)
        build = {}
    elif kind == "hnsw":  # faiss has no GPU HNSW: always built on CPU
        index = faiss.IndexHNSWFlat(d, p.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = p.hnsw_ef_construction
        index.hnsw.efSearch = p.hnsw_ef_search
        build = {"M": p.hnsw_m, "efConstruction": p.hnsw_ef_construction}
        search = {"efSearch": p.hnsw_ef_search}
    else:
        nlist, pq_m, nbits = _ivfpq_shape(n, d, p)
        index = faiss.IndexIVFPQ(faiss.IndexFlatIP(d), d, nlist, pq_m, nbits, faiss.METRIC_INNER_PRODUCT)
        # The codebooks only have to encode these very vectors: few points per centroid is fine
        # (this threshold only controls faiss's "please provide more points" warning).
        index.cp.min_points_per_centroid = index.pq.cp.min_points_per_centroid = 1
        build = {"nlist": nlist, "pq_m": pq_m, "nbits": nbits}
        search = {"nprobe": min(p.ivf_nprobe, nlist)}
        if gpu:
            try:
                gpu_index = faiss.index_cpu_to_all_gpus(index)
                gpu_index.train(emb)
                gpu_index.add(emb)
                index, built_on = faiss.index_gpu_to_cpu(gpu_index), "gpu"
            except RuntimeError:  # e.g. a pq_m/nbits the GPU kernels lack: build on CPU
                pass
        if built_on == "cpu":
            index.train(emb)
    if built_on == "cpu":
        index.add(emb)
    configure_search(index, search)
    info = {"type": kind, "build": build, "search": search, "num_labels": n, "dim": d,
            "metric": "inner_product", "built_on": built_on}
    return index, info


def configure_search(index, search: dict, k: int = 0) -> None:
    """Apply the saved search params (efSearch at least k, so HNSW can return k results)."""
    if "efSearch" in search:
        faiss.downcast_index(index).hnsw.efSearch = max(int(search["efSearch"]), k)
    if "nprobe" in search:
        faiss.extract_index_ivf(index).nprobe = int(search["nprobe"])


def to_gpu(index):
    """A GPU copy for searching when faiss-gpu and a GPU are present (HNSW stays on CPU)."""
    if isinstance(faiss.downcast_index(index), faiss.IndexHNSW):
        return index
    try:
        return faiss.index_cpu_to_all_gpus(index)
    except (RuntimeError, AttributeError):
        return index


def read_labels(data_dir: str | Path) -> LabelSet:
    """lbl.json.gz of the dataset (uid, title, content), in label-index order."""
    return read_labelset(Path(data_dir) / LABEL_FILE)


def write_index_dir(out_dir: str | Path, index, info: dict, labels: LabelSet, memory=None) -> None:
    """memory: None, or (faiss index of the training queries, their CSR label rows)."""
    with atomic.atomic_dir(out_dir) as tmp:
        faiss.write_index(index, str(tmp / INDEX_FILE))
        with open(tmp / LABELS_FILE, "w", encoding="utf-8") as f:
            for uid, title in zip(labels.uids, labels.titles):
                f.write(json.dumps({"uid": uid, "title": title}, ensure_ascii=False) + "\n")
        if memory is not None:
            faiss.write_index(memory[0], str(tmp / MEMORY_INDEX_FILE))
            with open(tmp / MEMORY_LABELS_FILE, "wb") as f:
                sp.save_npz(f, sp.csr_matrix(memory[1], dtype=np.float32), compressed=True)
            info["memory"]["bytes"] = sum((tmp / n).stat().st_size for n in (MEMORY_INDEX_FILE, MEMORY_LABELS_FILE))
        atomic.write_json(tmp / INDEX_META, info)


def load_index(index_dir: str | Path):
    """-> (faiss index, info) with the saved search params applied."""
    index_dir = Path(index_dir)
    for name in (INDEX_FILE, INDEX_META):
        if not (index_dir / name).exists():
            raise BundleError(f"{index_dir / name}: file not found (run the index stage)")
    try:
        info = json.loads((index_dir / INDEX_META).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{index_dir / INDEX_META}: not valid JSON ({e})") from None
    try:
        index = faiss.read_index(str(index_dir / INDEX_FILE))
    except RuntimeError as e:
        raise BundleError(f"{index_dir / INDEX_FILE}: faiss cannot read it ({str(e).strip()[:200]})") from None
    if not isinstance(info, dict) or index.ntotal != info.get("num_labels") or index.d != info.get("dim"):
        raise BundleError(f"{index_dir / INDEX_FILE}: holds {index.ntotal} vectors of size {index.d}, but "
                          f"{INDEX_META} expects num_labels/dim {info.get('num_labels')}/{info.get('dim')}")
    configure_search(index, info.get("search", {}))
    return index, info


def load_memory(index_dir: str | Path, info: dict):
    """-> (faiss index of the training queries, their CSR label rows) described by info["memory"]."""
    index_dir = Path(index_dir)
    mem = info.get("memory")
    if not isinstance(mem, dict):
        raise BundleError(f"{index_dir / INDEX_META}: no training-query memory in this bundle "
                          "(index it with rae.enabled: true)")
    for name in (MEMORY_INDEX_FILE, MEMORY_LABELS_FILE):
        if not (index_dir / name).exists():
            raise BundleError(f"{index_dir / name}: file not found (named by `memory` in {INDEX_META}; "
                              "rerun the index stage)")
    try:
        index = faiss.read_index(str(index_dir / MEMORY_INDEX_FILE))
    except RuntimeError as e:
        raise BundleError(f"{index_dir / MEMORY_INDEX_FILE}: faiss cannot read it ({str(e).strip()[:200]})") from None
    try:
        labels = sp.load_npz(index_dir / MEMORY_LABELS_FILE).tocsr()  # numpy arrays only: no pickle
    except Exception as e:  # scipy raises ValueError/KeyError/OSError for foreign files
        raise BundleError(f"{index_dir / MEMORY_LABELS_FILE}: expected a scipy sparse .npz ({e})") from None
    n, num_labels = mem.get("num_queries"), info.get("num_labels")
    if index.ntotal != n or labels.shape != (n, num_labels) or index.d != mem.get("dim"):
        raise BundleError(f"{index_dir}: the memory holds {index.ntotal} vectors of size {index.d} and label "
                          f"rows {labels.shape}; {INDEX_META} expects {n} x {mem.get('dim')} and ({n}, {num_labels})")
    configure_search(index, mem.get("search", {}))
    return index, labels


def run_index(params: Params, root: str | Path = ".") -> dict:
    """The stage: data.dir's labels (+ training queries with rae.enabled) + artifacts/bundle/encoder
    -> artifacts/bundle/index."""
    from dexml.onnx_encoder import read_encoder_meta
    from dexml.predict import Predictor

    root = Path(root)
    labels = read_labels(root / params.data.dir)
    predictor = Predictor(root / paths.BUNDLE_DIR, verify=False)
    start = time.perf_counter()
    emb = predictor.embed(labels.texts(params.data.label_text), "label", batch_size=params.index.batch_size)
    encode_s = time.perf_counter() - start
    encoder_dir = root / paths.BUNDLE_ENCODER
    meta = read_encoder_meta(encoder_dir)
    folded = None
    if meta.get("label_bias"):
        bias, trained = priors.read_label_bias(encoder_dir / meta["label_bias"], num_labels=len(labels))
        emb = priors.fold_labels(emb, bias, meta["tau"])
        folded = {"file": f"encoder/{meta['label_bias']}", "tau": meta["tau"],
                  "query_constant": priors.QUERY_CONSTANT, "trained_labels": int(trained.sum())}
    start = time.perf_counter()
    gpu = use_gpu(params.index.use_gpu)
    index, info = build_index(emb, params.index, gpu=gpu)
    info.update({
        "label_text": params.data.label_text,
        "encode_seconds": round(encode_s, 3),
        "encode_labels_per_s": round(len(labels) / max(encode_s, 1e-9), 1),
        "build_seconds": round(time.perf_counter() - start, 3),
        "onnx_providers": predictor.encoder.providers,
        "label_bias": folded,
    })
    memory = None
    if params.rae.enabled:
        trn = read_dataset(root / params.data.dir).trn
        start = time.perf_counter()
        q_emb = predictor.embed(trn.texts(params.data.query_text), "query", batch_size=params.index.batch_size)
        mem_encode_s = time.perf_counter() - start
        mem_index, mem_info = build_index(q_emb, params.index, gpu=gpu)
        y = sp.csr_matrix(trn.labels, dtype=np.float32)
        y.data[:] = 1.0  # the memory votes with binary label rows
        memory = (mem_index, y)
        info["memory"] = {**{k: mem_info[k] for k in ("type", "build", "search", "dim", "built_on")},
                          "num_queries": len(trn), "query_text": params.data.query_text,
                          "encode_seconds": round(mem_encode_s, 3)}
    write_index_dir(root / paths.BUNDLE_INDEX, index, info, labels, memory)
    return info


def main(args) -> int:
    from dexml.cli import load_params_from_args

    info = run_index(load_params_from_args(args))
    print(f"indexed {info['num_labels']} labels (dim {info['dim']}) as {info['type']} in "
          f"{paths.BUNDLE_INDEX}: encode {info['encode_seconds']} s "
          f"({info['encode_labels_per_s']} labels/s), build {info['build_seconds']} s on {info['built_on']}")
    if info["label_bias"]:
        print(f"label bias folded into the label vectors ({info['label_bias']['trained_labels']} labels learned one)")
    if "memory" in info:
        m = info["memory"]
        print(f"memory: {m['num_queries']} training queries as {m['type']}, encode {m['encode_seconds']} s, "
              f"{m['bytes'] / 2**20:.1f} MiB")
    return 0
