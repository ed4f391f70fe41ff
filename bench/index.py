"""Benchmark 5: faiss exact vs HNSW vs IVF-PQ at 10^5 and 10^6 labels (d = 384): build time,
queries/s and recall@100 against exact search.

Indexes are built by the pipeline's own `dexml.index.build_index` with params.yaml's defaults
(HNSW M 32, efConstruction 200, efSearch 256; IVF-PQ nlist 4 sqrt(n), d/4 sub-quantizers of
8 bits, nprobe 32) unless overridden with -S index.KEY=VALUE. Vectors are synthetic but
clustered like label embeddings (unit vectors around random centres, --per-cluster each; i.i.d. random
vectors are the worst case for approximate search); queries come from the same distribution.
Search: --queries queries in one batch, top-100, all cores.

    python bench/index.py --sizes 1e5,1e6
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import common  # noqa: E402

COLUMNS = ["labels", "type", "build_s", "build_cpu_s", "queries_per_s", "recall@100", "params"]
TYPES = ("flat", "hnsw", "ivfpq")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="1e5,1e6", help="comma list of label counts")
    ap.add_argument("--types", default=",".join(TYPES))
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--per-cluster", type=int, default=1000, help="vectors per cluster centre (on average)")
    ap.add_argument("--spread", type=float, default=1.0,
                    help="noise norm relative to the centre (1.0: cosine to the centre about 0.7)")
    ap.add_argument("-S", "--set", action="append", default=[], metavar="index.KEY=VALUE")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    return ap.parse_args(argv)


def unit_centres(clusters: int, d: int, rng):
    import numpy as np

    c = rng.standard_normal((clusters, d), dtype=np.float32)
    return c / np.linalg.norm(c, axis=1, keepdims=True)


def around(centres, n: int, spread: float, rng):
    """n unit vectors: a random centre each plus Gaussian noise of norm ~spread, normalised."""
    import numpy as np

    d = centres.shape[1]
    out = np.empty((n, d), np.float32)
    for start in range(0, n, 100_000):  # bounded temporaries
        m = min(100_000, n - start)
        x = centres[rng.integers(0, len(centres), m)] + rng.standard_normal((m, d), dtype=np.float32) * (spread / d**0.5)
        out[start:start + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def index_params(args, kind: str):
    from dexml.config import parse_overrides
    from dexml.config import IndexParams

    p = IndexParams(type=kind)
    for key, value in parse_overrides(args.set).items():
        setattr(p, key.removeprefix("index."), value)
    return p


def main(argv=None) -> dict:
    args = parse_args(argv)
    import faiss
    import numpy as np

    from dexml.serve.index import build_index

    sizes = [int(float(x)) for x in args.sizes.split(",") if x.strip()]
    types = [t.strip() for t in args.types.split(",") if t.strip()]
    settings = {k: getattr(args, k) for k in ("dim", "queries", "k", "per_cluster", "spread", "seed")}
    settings |= {"faiss_threads": faiss.omp_get_max_threads(), "overrides": args.set,
                 "data": "clustered synthetic unit vectors (see bench/index.py)"}
    out = Path(args.out) if args.out else common.default_out("index", "cpu")
    results = common.Results(out, "index", "cpu", settings)
    for n in sizes:
        rng = np.random.default_rng(args.seed)
        centres = unit_centres(max(1, n // args.per_cluster), args.dim, rng)
        base = around(centres, n, args.spread, rng)
        queries = around(centres, args.queries, args.spread, rng)  # same distribution, fresh draws
        exact = None
        for kind in types:
            p = index_params(args, kind)
            with common.Clock() as build:
                index, info = build_index(base, p)
            search_k = args.k
            if "efSearch" in info["search"]:
                faiss.downcast_index(index).hnsw.efSearch = max(info["search"]["efSearch"], search_k)
            index.search(queries[:10], search_k)  # warm-up
            with common.Clock() as search:
                _, ids = index.search(queries, search_k)
            if kind == "flat":
                exact = ids
            recall = None
            if exact is not None:
                recall = float(np.mean([len(np.intersect1d(a[a >= 0], b)) / len(b) for a, b in zip(ids, exact)]))
            row = {"labels": n, "type": kind, "build_s": round(build.wall_s, 2), "build_cpu_s": round(build.cpu_s, 1),
                   "queries_per_s": round(args.queries / search.wall_s, 1), "search_cpu_s": round(search.cpu_s, 2),
                   "recall@100": recall, "params": {**info["build"], **info["search"]},
                   "index_mb": round(faiss.serialize_index(index).nbytes / 2**20, 1)
                   if n * args.dim * 4 <= 2**29 else None}
            results.add(row)
            print(row, flush=True)
            del index
    rows = [dict(r, params=" ".join(f"{k}={v}" for k, v in r["params"].items())) for r in results.doc["rows"]]
    print(common.table(rows, COLUMNS, {"recall@100": ".4f", "queries_per_s": ".0f", "build_s": ".2f"}))
    print(f"wrote {out}")
    return results.doc


if __name__ == "__main__":
    main()
