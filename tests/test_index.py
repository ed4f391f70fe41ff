"""faiss index: HNSW recall against exact search, IVF-PQ on small label counts, the index stage."""
from __future__ import annotations

import hashlib
import json

import faiss
import numpy as np
import pytest

from dexml import paths
from dexml.config import IndexParams, parse_params
from dexml.data.dataset import read_dataset
from dexml.errors import BundleError, ConfigError
from dexml.pipeline.export import run as run_export
from dexml.pipeline.index import run as run_index
from dexml.serve.encoder import OnnxEncoder
from dexml.serve.index import (
    INDEX_FILE,
    INDEX_META,
    LABELS_FILE,
    build_index,
    choose_type,
    load_index,
    write_index_dir,
)
from dexml.train.model import DualEncoder


def _unit(rng, n, d=32):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _exact_top(x, q, k):
    return np.argsort(-(q @ x.T), axis=1, kind="stable")[:, :k]


def test_hnsw_recall_at_10_against_exact_on_random_data():
    rng = np.random.default_rng(0)
    x, q = _unit(rng, 2000), _unit(rng, 200)
    index, info = build_index(x, IndexParams(type="hnsw"))
    assert info["type"] == "hnsw" and info["search"] == {"efSearch": 256}
    assert info["build"] == {"M": 32, "efConstruction": 200}
    _, ids = index.search(q, 10)
    exact = _exact_top(x, q, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, exact)])
    assert recall >= 0.99


@pytest.mark.parametrize("n", [5, 40, 400])
def test_ivfpq_handles_small_label_counts(n):
    rng = np.random.default_rng(1)
    x = _unit(rng, n)
    index, info = build_index(x, IndexParams(type="ivfpq"))
    b = info["build"]
    assert 1 <= b["nlist"] <= max(1, n // 39) and 2 ** b["nbits"] <= n and 32 % b["pq_m"] == 0
    assert info["search"]["nprobe"] <= b["nlist"]
    k = min(10, n)
    _, ids = index.search(x, k)
    assert ((ids >= 0) & (ids < n)).all()
    # compressed, but each label must still find itself among its own top-k
    assert np.mean([i in row for i, row in enumerate(ids)]) >= 0.95


def test_auto_is_exact_up_to_auto_flat_max():
    p = IndexParams(auto_flat_max=100)
    assert choose_type(100, p) == "flat" and choose_type(101, p) == "hnsw"
    assert choose_type(10, IndexParams(type="ivfpq")) == "ivfpq"
    rng = np.random.default_rng(2)
    x, q = _unit(rng, 100), _unit(rng, 20)
    index, info = build_index(x, p)
    scores, ids = index.search(q, 5)
    assert info["type"] == "flat"
    np.testing.assert_array_equal(ids, _exact_top(x, q, 5))
    np.testing.assert_allclose(scores, np.take_along_axis(q @ x.T, ids, 1), atol=1e-5)


def test_pq_m_must_divide_the_embedding_size():
    x = _unit(np.random.default_rng(3), 100)
    with pytest.raises(ConfigError, match=r"index.pq_m.*divisor of the embedding size 32, got 5"):
        build_index(x, IndexParams(type="ivfpq", pq_m=5))


def test_saved_index_round_trip_keeps_search_params(tmp_path):
    from dexml.data.dataset import LabelSet

    x = _unit(np.random.default_rng(4), 300)
    index, info = build_index(x, IndexParams(type="hnsw", hnsw_ef_search=77, hnsw_m=8))
    labels = LabelSet([f"L{i}" for i in range(300)], [f"title {i}" for i in range(300)], [""] * 300)
    write_index_dir(tmp_path / "index", index, info, labels.uids, labels.titles)
    loaded, loaded_info = load_index(tmp_path / "index")
    assert loaded_info == info and loaded.ntotal == 300
    assert faiss.downcast_index(loaded).hnsw.efSearch == 77
    lines = (tmp_path / "index" / LABELS_FILE).read_text().splitlines()
    assert json.loads(lines[7]) == {"uid": "L7", "title": "title 7"}

    (tmp_path / "index" / INDEX_FILE).write_bytes(b"garbage")
    with pytest.raises(BundleError, match="labels.faiss: faiss cannot read it"):
        load_index(tmp_path / "index")


def test_index_stage_uses_the_exported_onnx_label_encoder(tmp_path, tiny_params, tiny_dataset_dir):
    raw = tiny_params(data={"dir": str(tiny_dataset_dir), "label_text": "title+content"},
                      export={"parity_texts": 8})
    params = parse_params(raw)
    DualEncoder.from_params(params.model).save(tmp_path / paths.MODEL_DIR)
    run_export(params, tmp_path)
    info = run_index(params, tmp_path)

    ds = read_dataset(tiny_dataset_dir)
    out = tmp_path / paths.BUNDLE_INDEX
    assert json.loads((out / INDEX_META).read_text()) == info
    assert info["type"] == "flat" and info["num_labels"] == ds.num_labels and info["label_text"] == "title+content"
    labels = [json.loads(line) for line in (out / LABELS_FILE).read_text().splitlines()]
    assert labels == [{"uid": u, "title": t} for u, t in zip(ds.lbl.uids, ds.lbl.titles)]

    index, _ = load_index(out)
    stored = index.reconstruct_n(0, index.ntotal)
    texts = ds.lbl.texts("title+content")
    onnx_emb = OnnxEncoder(tmp_path / paths.BUNDLE_ENCODER, allow_gpu=False).embed(texts, "label")
    np.testing.assert_allclose(stored, onnx_emb, atol=1e-6, rtol=0)
    torch_emb = DualEncoder.load(tmp_path / paths.MODEL_DIR).embed(texts, "label").numpy()
    np.testing.assert_allclose(stored, torch_emb, atol=1e-4, rtol=0)

    # A failing rebuild (bad params) leaves the last good index in place.
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in out.iterdir()}
    bad = parse_params({**raw, "index": {"type": "ivfpq", "pq_m": 7}})
    with pytest.raises(ConfigError, match="index.pq_m"):
        run_index(bad, tmp_path)
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in out.iterdir()} == before


def test_index_stage_needs_the_export(tmp_path, tiny_params, tiny_dataset_dir):
    params = parse_params(tiny_params(data={"dir": str(tiny_dataset_dir)}))
    with pytest.raises(BundleError, match="encoder.json: file not found .run the export stage"):
        run_index(params, tmp_path)


def test_a_faiss_factory_string_builds_that_index_with_its_search_params():
    """index.type takes faiss's own convention: here the re-ranked IVF-PQ, which the named ivfpq
    type lacks; refinement with the exact vectors brings recall back to (near) exact."""
    rng = np.random.default_rng(5)
    x, q = _unit(rng, 3000), _unit(rng, 100)
    p = IndexParams(type="IVF32,PQ8x4fs,RFlat", ivf_nprobe=32, refine_k_factor=32)  # all lists probed: PQ is the loss
    index, info = build_index(x, p)
    assert info["factory"] == "IVF32,PQ8x4fs,RFlat" and info["search"] == {"nprobe": 32, "k_factor": 32.0}
    assert isinstance(index, faiss.IndexRefine) or "Refine" in type(faiss.downcast_index(index)).__name__
    _, ids = index.search(q, 10)
    exact = _exact_top(x, q, 10)
    refined = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, exact)])
    plain, _ = build_index(x, IndexParams(type="IVF32,PQ8x4fs", ivf_nprobe=32))
    _, ids_plain = plain.search(q, 10)
    unrefined = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids_plain, exact)])
    assert refined >= 0.95 and unrefined < 0.5  # random vectors: the worst case for PQ alone


def test_named_types_are_factory_strings_and_bad_strings_name_the_key(tmp_path):
    x = _unit(np.random.default_rng(6), 400)
    assert build_index(x, IndexParams(type="flat"))[1]["factory"] == "Flat"
    assert build_index(x, IndexParams(type="hnsw", hnsw_m=8))[1]["factory"] == "HNSW8,Flat"
    with pytest.raises(ConfigError, match=r"index.type.*faiss index factory string"):
        parse_params({"index": {"type": "HNSW32,Bogus"}})
    with pytest.raises(ConfigError, match=r"index.type.*more than the 400 vectors"):
        build_index(x, IndexParams(type="IVF1024,Flat"))
    with pytest.raises(ConfigError, match=r"index.type.*cannot build 'IVF4,PQ5'.*size 32"):
        build_index(x, IndexParams(type="IVF4,PQ5"))


def test_a_saved_factory_index_reloads_with_its_search_params(tmp_path):
    x = _unit(np.random.default_rng(7), 2000)
    index, info = build_index(x, IndexParams(type="IVF16,PQ8x4fs,RFlat", ivf_nprobe=4, refine_k_factor=3))
    write_index_dir(tmp_path / "index", index, info, [str(i) for i in range(2000)], ["t"] * 2000)
    loaded, loaded_info = load_index(tmp_path / "index")
    assert faiss.extract_index_ivf(loaded).nprobe == 4
    assert faiss.downcast_index(loaded).k_factor == 3.0
