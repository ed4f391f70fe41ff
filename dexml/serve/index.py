"""faiss indexes of the bundle: build, write, load, configure search. No torch.

An index directory (artifacts/bundle/index/, written by the index stage, dexml.pipeline.index):
    labels.faiss   inner-product index; faiss id = label index (row of lbl.json.gz)
    labels.jsonl   {"uid", "title"} per line, in label-index order (the id map)
    index.json     type, build params, search params, num_labels, dim, timings;
                   `label_bias` when the label vectors carry the model's per-label bias
                   (folded: [l, tau * b_l], queries get a 1 appended; dexml.serve.priors);
                   `memory` when the training queries are indexed too (rae.enabled)
    queries.faiss, queries_labels.npz   with rae.enabled: the training queries' embeddings
                   (faiss id = training row) and their label rows (CSR), the memory of
                   retrieval-augmented prediction (dexml.serve.rae)
index.type is a faiss index factory string ("HNSW32,Flat", "IVF4096,PQ48x4fs,RFlat", ...: every index
faiss has) or one of the named types of dexml.config.INDEX_TYPES, each a factory string filled in from
the other index.* params; `auto` is exact up to index.auto_flat_max vectors and HNSW beyond.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from dexml import fileio
from dexml.config import INDEX_TYPES, IndexParams
from dexml.errors import BundleError, ConfigError, DataError, require_optional

faiss = require_optional("faiss")

INDEX_FILE = "labels.faiss"
LABELS_FILE = "labels.jsonl"
INDEX_META = "index.json"
MEMORY_INDEX_FILE = "queries.faiss"
MEMORY_LABELS_FILE = "queries_labels.npz"


def use_gpu(setting: str) -> bool:
    return setting == "auto" and faiss.get_num_gpus() > 0


def choose_type(num_labels: int, p: IndexParams) -> str:
    """index.type with `auto` resolved: flat up to index.auto_flat_max vectors, hnsw beyond."""
    if p.type != "auto":
        return p.type
    return "flat" if num_labels <= p.auto_flat_max else "hnsw"


def _ivfpq_shape(n: int, d: int, p: IndexParams) -> dict:
    """nlist, pq_m, nbits of the named `ivfpq` type, clamped to what `n` vectors can support."""
    # k-means wants >= 39 points per centroid (faiss warns below that); PQ needs 2^nbits points.
    nlist = p.ivf_nlist or round(4 * math.sqrt(n))
    nlist = max(1, min(nlist, n // 39))
    # default: the largest divisor of d up to d / 4 (d / 4 itself for the usual sizes; a folded
    # label bias adds one dimension)
    pq_m = p.pq_m or max(m for m in range(1, max(1, d // 4) + 1) if d % m == 0)
    if d % pq_m:
        raise ConfigError(f"params key `index.pq_m`: expected a divisor of the embedding size {d}, got {pq_m}")
    return {"nlist": nlist, "pq_m": pq_m, "nbits": max(1, min(8, int(math.log2(n))))}


def factory_string(kind: str, n: int, d: int, p: IndexParams) -> str:
    """The faiss index factory string for index.type `kind` (a named type or already a factory string)."""
    if kind not in INDEX_TYPES:
        return kind
    return INDEX_TYPES[kind].factory.format(hnsw_m=p.hnsw_m, **(_ivfpq_shape(n, d, p) if kind == "ivfpq" else {}))


def build_index(emb: np.ndarray, p: IndexParams, gpu: bool = False):
    """-> (faiss index on CPU, info dict). `emb` (n, d) float32; id i = row i.

    Every type is a faiss index factory string (the named ones are filled in from the index.*
    params); search params (efSearch, nprobe, refine k_factor) apply to whatever the string built."""
    emb = np.ascontiguousarray(emb, dtype=np.float32)
    n, d = emb.shape
    if n == 0:
        raise DataError("index: no label embeddings to index (the label file is empty)")
    kind = choose_type(n, p)
    factory = factory_string(kind, n, d, p)
    try:
        index = faiss.index_factory(d, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        raise ConfigError(f"params key `index.type`: faiss cannot build {factory!r} for {n} vectors of size {d} "
                          f"({_faiss_reason(e)})") from None
    hnsw = _find(index, faiss.IndexHNSW)
    if hnsw is not None:  # must be set before vectors are added
        hnsw.hnsw.efConstruction = p.hnsw_ef_construction
    ivf = _find(index, faiss.IndexIVF)
    if ivf is not None:
        if ivf.nlist > n:
            raise ConfigError(f"params key `index.type`: {factory!r} has {ivf.nlist} inverted lists, more than "
                              f"the {n} vectors to index")
        # The codebooks only have to encode these very vectors: few points per centroid is fine
        # (this threshold only controls faiss's "please provide more points" warning).
        ivf.cp.min_points_per_centroid = 1
        pq = getattr(faiss.downcast_index(ivf), "pq", None)
        if pq is not None:
            pq.cp.min_points_per_centroid = 1
    built_on = "cpu"
    if gpu and ivf is not None and hnsw is None:
        try:
            gpu_index = faiss.index_cpu_to_all_gpus(index)
            gpu_index.train(emb)
            gpu_index.add(emb)
            index, built_on = faiss.index_gpu_to_cpu(gpu_index), "gpu"
        except RuntimeError:  # e.g. a pq_m/nbits the GPU kernels lack: build on CPU
            pass
    if built_on == "cpu":
        try:
            if not index.is_trained:
                index.train(emb)
        except RuntimeError as e:
            raise ConfigError(f"params key `index.type`: faiss cannot train {factory!r} on {n} vectors of size "
                              f"{d} ({_faiss_reason(e)})") from None
        index.add(emb)
    search = {}
    if hnsw is not None:
        search["efSearch"] = p.hnsw_ef_search
    if ivf is not None:
        search["nprobe"] = min(p.ivf_nprobe, ivf.nlist)
    if _find(index, faiss.IndexRefine) is not None:
        search["k_factor"] = float(p.refine_k_factor)
    configure_search(index, search)
    build = {"M": hnsw.hnsw.nb_neighbors(1), "efConstruction": p.hnsw_ef_construction} if hnsw is not None else {}
    if kind == "ivfpq":
        build.update(_ivfpq_shape(n, d, p))
    info = {"type": kind, "factory": factory, "build": build, "search": search, "num_labels": n, "dim": d,
            "metric": "inner_product", "built_on": built_on}
    return index, info


def _faiss_reason(e: RuntimeError) -> str:
    """The last line of a faiss error, without its C++ location."""
    last = str(e).strip().splitlines()[-1] if str(e).strip() else repr(e)
    return last.split("failed: ")[-1].split(": Error: ")[-1][:200]


def _find(index, cls):
    """The first index of type `cls` in the chain index -> base_index / index (pre-transform) ..."""
    node = faiss.downcast_index(index)
    while node is not None:
        if isinstance(node, cls):
            return node
        inner = getattr(node, "base_index", None) or getattr(node, "index", None)
        node = faiss.downcast_index(inner) if inner is not None else None
    return None


def configure_search(index, search: dict, k: int = 0) -> None:
    """Apply the saved search params (efSearch at least k, so HNSW can return k results)."""
    if "efSearch" in search:
        _find(index, faiss.IndexHNSW).hnsw.efSearch = max(int(search["efSearch"]), k)
    if "nprobe" in search:
        faiss.extract_index_ivf(index).nprobe = int(search["nprobe"])
    if "k_factor" in search:
        _find(index, faiss.IndexRefine).k_factor = float(search["k_factor"])


def to_gpu(index):
    """A GPU copy for searching when faiss-gpu and a GPU are present (HNSW stays on CPU)."""
    if isinstance(faiss.downcast_index(index), faiss.IndexHNSW):
        return index
    try:
        return faiss.index_cpu_to_all_gpus(index)
    except (RuntimeError, AttributeError):
        return index


def write_index_dir(out_dir: str | Path, index, info: dict, uids: list[str], titles: list[str],
                    memory=None) -> None:
    """Write the directory atomically. uids/titles: one per label, in index-id order; memory: None,
    or (faiss index of the training queries, their CSR label rows)."""
    with fileio.atomic_dir(out_dir) as tmp:
        faiss.write_index(index, str(tmp / INDEX_FILE))
        with open(tmp / LABELS_FILE, "w", encoding="utf-8") as f:
            for uid, title in zip(uids, titles, strict=True):
                f.write(json.dumps({"uid": uid, "title": title}, ensure_ascii=False) + "\n")
        if memory is not None:
            faiss.write_index(memory[0], str(tmp / MEMORY_INDEX_FILE))
            with open(tmp / MEMORY_LABELS_FILE, "wb") as f:
                sp.save_npz(f, sp.csr_matrix(memory[1], dtype=np.float32), compressed=True)
            info["memory"]["bytes"] = sum((tmp / n).stat().st_size for n in (MEMORY_INDEX_FILE, MEMORY_LABELS_FILE))
        fileio.write_json(tmp / INDEX_META, info)


def load_index(index_dir: str | Path):
    """-> (faiss index, info) with the saved search params applied."""
    index_dir = Path(index_dir)
    info = fileio.read_json(index_dir / INDEX_META, BundleError, "run the index stage")
    if not (index_dir / INDEX_FILE).exists():
        raise BundleError(f"{index_dir / INDEX_FILE}: file not found (run the index stage)")
    try:
        index = faiss.read_index(str(index_dir / INDEX_FILE))
    except RuntimeError as e:
        raise BundleError(f"{index_dir / INDEX_FILE}: faiss cannot read it ({str(e).strip()[:200]})") from None
    if index.ntotal != info.get("num_labels") or index.d != info.get("dim"):
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
