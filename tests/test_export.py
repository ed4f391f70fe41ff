"""ONNX export: parity with PyTorch through the torch-free path, layout, int8, atomic failure."""
from __future__ import annotations

import hashlib
import json

import numpy as np
import onnx
import pytest
import torch

from dexml import paths
from dexml.config import parse_params
from dexml.errors import ConfigError
from dexml.pipeline.export import REPORT_FILE, ExportError
from dexml.pipeline.export import run as run_export
from dexml.serve.encoder import OnnxEncoder
from dexml.train.model import DualEncoder

TEXTS = ["one", "Two words", "A MUCH longer text with Ünïcödé, punctuation; and numbers 12345 " * 3,
         "", "short", "tabs\tand\nnewlines"]


def _root_with_model(tmp_path, tiny_params, tiny_dataset_dir, model=None, export=None):
    raw = tiny_params(model=model or {}, export=export or {}, data={"dir": str(tiny_dataset_dir)})
    params = parse_params(raw)
    model = DualEncoder.from_params(params.model)
    model.save(tmp_path / paths.MODEL_DIR)
    return params, DualEncoder.load(tmp_path / paths.MODEL_DIR)


def test_shared_export_matches_pytorch_through_the_shipping_path(tmp_path, tiny_params, tiny_dataset_dir):
    params, model = _root_with_model(tmp_path, tiny_params, tiny_dataset_dir, export={"quantize_int8": True, "parity_texts": 20})
    report = run_export(params, tmp_path)
    out = tmp_path / paths.BUNDLE_ENCODER
    assert {p.name for p in out.iterdir()} >= {"model.onnx", "model_int8.onnx", "tokenizer.json",
                                                 "encoder.json", REPORT_FILE}
    assert not (out / "query.onnx").exists()  # one file when the towers are shared
    assert json.loads((out / REPORT_FILE).read_text()) == report
    for side in ("query", "label"):
        assert report["parity"][side]["max_abs_diff"] < 1e-4
        assert report["parity"][side]["texts"] == 20 + 4  # held-out texts + edge cases

    # Tokenizer + graph parity on new texts, batch sizes 1 and mixed lengths (dynamic axes), with
    # the per-side max lengths (query 16, label 12 tokens: the long text is truncated).
    enc = OnnxEncoder(out, allow_gpu=False)
    for side in ("query", "label"):
        for bs in (1, 4):
            got = enc.embed(TEXTS, side, batch_size=bs)
            ref = model.embed(TEXTS, side).numpy()
            assert got.shape == (len(TEXTS), model.meta.dim)
            np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)
    ids, _ = enc.tokenize(TEXTS, "label")
    assert ids.shape[1] == params.model.label_max_len
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)  # L2 norm inside the graph

    graph = onnx.load(str(out / "model.onnx")).graph
    assert [o.name for o in graph.output] == ["sentence_embedding"]
    for inp in graph.input:  # symbolic batch and sequence axes
        assert [d.dim_param for d in inp.type.tensor_type.shape.dim] == ["batch", "seq"]

    int8 = report["int8"]
    assert int8["file"] == "model_int8.onnx" and int8["cosine_min"] > 0.99
    q8 = OnnxEncoder(out, int8=True, allow_gpu=False).embed(TEXTS, "query")
    assert not np.array_equal(q8, enc.embed(TEXTS, "query"))  # really another graph
    assert ((q8 * enc.embed(TEXTS, "query")).sum(1) > 0.99).all()


def test_separate_towers_with_projection(tmp_path, tiny_params, tiny_dataset_dir):
    params, model = _root_with_model(tmp_path, tiny_params, tiny_dataset_dir,
                                     model={"shared": False, "projection": 8})
    # Different label tower weights, so a mixed-up file assignment would show.
    with torch.no_grad():
        model.label_tower.projection.weight.mul_(-1.5)
    model.save(tmp_path / paths.MODEL_DIR)
    report = run_export(params, tmp_path)
    out = tmp_path / paths.BUNDLE_ENCODER
    assert report["files"] == {"query": "query.onnx", "label": "label.onnx"} and report["int8"] is None
    assert not (out / "model.onnx").exists() and not list(out.glob("*_int8.onnx"))
    meta = json.loads((out / "encoder.json").read_text())
    assert meta["dim"] == 8 and meta["shared"] is False
    enc = OnnxEncoder(out, allow_gpu=False)
    q, lab = enc.embed(TEXTS, "query"), enc.embed(TEXTS, "label")
    np.testing.assert_allclose(q, model.embed(TEXTS, "query").numpy(), atol=1e-4, rtol=0)
    np.testing.assert_allclose(lab, model.embed(TEXTS, "label").numpy(), atol=1e-4, rtol=0)
    assert np.abs(q - lab).max() > 0.1


def _tree_digest(d):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir())}


def test_parity_failure_keeps_the_previous_export(tmp_path, tiny_params, tiny_dataset_dir):
    params, _ = _root_with_model(tmp_path, tiny_params, tiny_dataset_dir)
    run_export(params, tmp_path)
    before = _tree_digest(tmp_path / paths.BUNDLE_ENCODER)
    strict = parse_params(tiny_params(data={"dir": str(tiny_dataset_dir)}, export={"parity_tol": 1e-12}))
    with pytest.raises(ExportError, match=r"export.parity_tol 1e-12.*previous export"):
        run_export(strict, tmp_path)
    assert _tree_digest(tmp_path / paths.BUNDLE_ENCODER) == before
    assert not [p for p in (tmp_path / paths.BUNDLE_DIR).iterdir() if p.name.startswith(".")]  # no temp dirs


def test_missing_model_is_a_clear_error(tmp_path, tiny_params, tiny_dataset_dir):
    params = parse_params(tiny_params(data={"dir": str(tiny_dataset_dir)}))
    with pytest.raises(ConfigError, match="dexml_encoder.json missing"):
        run_export(params, tmp_path)
    assert not (tmp_path / paths.BUNDLE_ENCODER).exists()


def test_auto_measures_every_graph_variant_and_ships_the_fastest_that_passes_parity(tmp_path, tiny_params,
                                                                                   tiny_dataset_dir):
    params, model = _root_with_model(tmp_path, tiny_params, tiny_dataset_dir,
                                     export={"parity_texts": 8, "variant_repeats": 2})
    report = run_export(params, tmp_path)
    out = tmp_path / paths.BUNDLE_ENCODER
    variants = report["variants"]
    assert set(variants) == {"sdpa", "eager", "sdpa_fused", "eager_fused"}
    assert all(v["ms_per_batch"] > 0 for v in variants.values())
    assert report["timing"] == {"batch": 32, "tokens": params.model.query_max_len, "repeats": 2}
    chosen = report["variant"]
    assert variants[chosen]["parity_max_abs_diff"] <= params.export.parity_tol
    # every variant measured faster than the chosen one was checked and failed parity
    faster = [n for n, v in variants.items() if v["ms_per_batch"] < variants[chosen]["ms_per_batch"]]
    assert all(variants[n]["parity_max_abs_diff"] > params.export.parity_tol for n in faster)
    # onnxruntime's optimizer fuses attention only in the eagerly exported graph
    assert variants["eager_fused"]["fused_ops"]["Attention"] == 2  # the tiny BERT's 2 layers
    assert "Attention" not in variants["sdpa_fused"]["fused_ops"]
    meta = json.loads((out / "encoder.json").read_text())
    assert meta["variant"] == chosen
    assert meta["session"] == {"intra_op_num_threads": 0, "graph_optimization_level": "all"}
    got = OnnxEncoder(out, allow_gpu=False).embed(TEXTS, "query")
    np.testing.assert_allclose(got, model.embed(TEXTS, "query").numpy(), atol=1e-4, rtol=0)


def test_the_fused_graph_reproduces_pytorch_and_quantizes(tmp_path, tiny_params, tiny_dataset_dir):
    params, model = _root_with_model(tmp_path, tiny_params, tiny_dataset_dir, export={
        "variant": "eager_fused", "quantize_int8": True, "parity_texts": 8, "ort_threads": 1,
        "ort_graph_optimization": "basic"})
    report = run_export(params, tmp_path)
    out = tmp_path / paths.BUNDLE_ENCODER
    assert report["variant"] == "eager_fused" and report["timing"] is None  # named: nothing to time
    ops = {(n.domain, n.op_type) for n in onnx.load(str(out / "model.onnx")).graph.node}
    assert ("com.microsoft", "Attention") in ops and ("com.microsoft", "SkipLayerNormalization") in ops
    enc = OnnxEncoder(out, allow_gpu=False)
    options = enc._sessions["query"].get_session_options()
    assert options.intra_op_num_threads == 1
    assert str(options.graph_optimization_level).endswith("ORT_ENABLE_BASIC")
    for side in ("query", "label"):
        for bs in (1, 4):  # dynamic batch and sequence axes survive the fusion
            np.testing.assert_allclose(enc.embed(TEXTS, side, batch_size=bs), model.embed(TEXTS, side).numpy(),
                                       atol=1e-4, rtol=0)
    assert report["int8"]["cosine_min"] > 0.99
    q8 = OnnxEncoder(out, int8=True, allow_gpu=False).embed(TEXTS, "query")
    assert ((q8 * enc.embed(TEXTS, "query")).sum(1) > 0.99).all()
