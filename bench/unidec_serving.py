"""Benchmark: serving the dual encoder + classifier score with one search. Folded index (what the
index stage builds) against the alternatives, on the library's own fold and index code.

    fold        one inner-product index over [e_l + W^T w_l, c.w_l] (d + 1), query [q, 1]: exact
    fold_2d     [e_l, w_l] against [q, W q + c] (2d): exact too, what a second ONNX output
                (q_cls) would need; the same ranking at twice the vector size
    rescore     the dual encoder's own top-K' (d-dim index), then the classifier added on those K'
                and re-ranked: approximate (a label the DE ranks below K' is lost)
Each as flat (exact search) and HNSW (index.type hnsw). Vectors: random unit label embeddings e_l;
classifier vectors w_l = a e_l + (1 - a) noise (a = --agreement: how much the trained classifier
still agrees with the label embedding it was initialised from); queries = a noisy positive label's
e_l. Reported: queries/s (1 thread), recall@k of the exact combined top-k, bytes of the index.

    python bench/unidec_serving.py --labels 50000 --dim 384 --queries 1000
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import common  # noqa: E402

COLUMNS = ["method", "index", "qps", "recall@10", "index_mb"]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--labels", type=int, default=50_000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--agreement", type=float, default=0.5)
    ap.add_argument("--shortlist", type=int, default=100, help="K' of rescore")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--out", default=None)
    return ap.parse_args(argv)


def main(argv=None):
    import faiss
    import numpy as np

    from dexml.config import IndexParams
    from dexml.serve import classifier, priors
    from dexml.serve.index import build_index

    args = parse_args(argv)
    faiss.omp_set_num_threads(1)
    rng = np.random.default_rng(0)
    L, d, n, k = args.labels, args.dim, args.queries, args.k

    def unit(x):
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)

    e = unit(rng.standard_normal((L, d)))
    table = (args.agreement * e + (1 - args.agreement) * unit(rng.standard_normal((L, d)))).astype(np.float32)
    weight = (np.eye(d) + 0.05 * rng.standard_normal((d, d))).astype(np.float32)
    c = (0.05 * rng.standard_normal(d)).astype(np.float32)
    q = unit(e[rng.integers(0, L, n)] + 0.8 * unit(rng.standard_normal((n, d))) )
    vectors, offsets = classifier.fold(e, weight, c, table, 1.0)
    exact = q.astype(np.float64) @ vectors.T.astype(np.float64) + offsets  # tau x the combined score
    truth = np.argsort(-exact, axis=1)[:, :k]

    def recall(ids):
        return float(np.mean([len(set(a) & set(b)) / k for a, b in zip(ids, truth)]))

    def timed(fn):
        fn(q[:10])
        start = time.perf_counter()
        ids = fn(q)
        return n / (time.perf_counter() - start), ids

    results = common.Results(args.out or common.default_out("unidec_serving", "cpu"), "unidec_serving", "cpu",
                             vars(args))
    rows = []
    for kind in ("flat", "hnsw"):
        p = IndexParams(type=kind, hnsw_ef_construction=64)  # a quicker build; search efSearch 256
        folded, _ = build_index(priors.fold_labels(vectors, offsets, 1.0), p)
        two = np.hstack([e, table]).astype(np.float32)
        folded_2d, _ = build_index(two, p)
        de, _ = build_index(e, p)

        def q2(x):
            return np.ascontiguousarray(np.hstack([x, x @ weight.T + c]), dtype=np.float32)

        def rescore(x):
            _, cand = de.search(x, args.shortlist)
            s = np.einsum("nd,nkd->nk", x, vectors[cand]) + offsets[cand]
            return np.take_along_axis(cand, np.argsort(-s, axis=1)[:, :k], 1)

        for method, index, fn in (
                ("fold", folded, lambda x: folded.search(priors.fold_queries(x), k)[1]),
                ("fold_2d", folded_2d, lambda x: folded_2d.search(q2(x), k)[1]),
                (f"rescore top-{args.shortlist}", de, rescore)):
            qps, ids = timed(fn)
            extra = L * d * 4 if method.startswith("rescore") else 0  # the folded vectors beside the index
            row = {"method": method, "index": kind, "qps": qps, "recall@10": recall(ids),
                   "index_mb": (faiss.serialize_index(index).nbytes + extra) / 2**20}
            rows.append(row)
            results.add(row)
            print(row, file=sys.stderr, flush=True)
    print(common.table(rows, COLUMNS, {"qps": ".0f", "recall@10": ".4f", "index_mb": ".0f"}))
    print(f"wrote {results.path}")
    return results.doc


if __name__ == "__main__":
    main()
