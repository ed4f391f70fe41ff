"""Predictor and `dexml predict`: rankings equal the PyTorch model's, CLI, tampering, no torch."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dexml import paths
from dexml.config import parse_params
from dexml.data.dataset import read_dataset
from dexml.errors import BundleError
from dexml.pipeline.evaluate import run as run_evaluate
from dexml.pipeline.export import run as run_export
from dexml.pipeline.index import run as run_index
from dexml.serve.predictor import Predictor
from dexml.train.model import DualEncoder

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def stage_root(tmp_path_factory, tiny_encoder, tiny_dataset_dir) -> Path:
    """model -> export (with int8) -> index -> evaluate, on the tiny dataset. Read-only."""
    root = tmp_path_factory.mktemp("predict_root")
    params = parse_params({
        "model": {"encoder": str(tiny_encoder), "query_max_len": 16, "label_max_len": 12},
        "data": {"dir": str(tiny_dataset_dir)},
        "export": {"quantize_int8": True, "parity_texts": 8},
        "evaluate": {"k": 10},
    })
    DualEncoder.from_params(params.model).save(root / paths.MODEL_DIR)
    for stage in (run_export, run_index, run_evaluate):
        stage(params, root)
    return root


@pytest.fixture(scope="module")
def bundle(stage_root) -> Path:
    return stage_root / paths.BUNDLE_DIR


def _cli(*args, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "dexml.cli", "predict", *args], input=stdin,
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=120)


def test_predictions_equal_the_pytorch_model_ranking(stage_root, bundle, tiny_dataset_dir):
    ds = read_dataset(tiny_dataset_dir)
    texts = ds.tst.titles[:12] + ["", "something else entirely"]
    preds = Predictor(bundle).predict(texts, k=5)

    model = DualEncoder.load(stage_root / paths.MODEL_DIR)
    sims = model.embed(texts, "query").numpy() @ model.embed(ds.lbl.titles, "label").numpy().T
    for row, sim in zip(preds, sims):
        assert len(row) == 5
        scores = [s for _, _, s in row]
        assert scores == sorted(scores, reverse=True)
        ids = [ds.lbl.uids.index(uid) for uid, _, _ in row]
        assert [title for _, title, _ in row] == [ds.lbl.titles[i] for i in ids]
        np.testing.assert_allclose(scores, sim[ids], atol=1e-4)
        # best first, and nothing better was left out (tolerance for near-ties)
        assert scores[-1] >= np.sort(sim)[-5] - 1e-4


def test_k_larger_than_the_label_count_returns_every_label(bundle):
    (row,) = Predictor(bundle).predict(["x"], k=1000)
    assert len(row) == 40 and len({uid for uid, _, _ in row}) == 40


def test_int8_predictor_agrees_with_fp32(bundle, tiny_dataset_dir):
    texts = read_dataset(tiny_dataset_dir).tst.titles[:30]
    fp32 = Predictor(bundle).predict(texts, 1)
    q8 = Predictor(bundle, int8=True).predict(texts, 1)
    assert [r[0][2] for r in q8] != [r[0][2] for r in fp32]  # really the int8 graph
    assert np.mean([a[0][0] == b[0][0] for a, b in zip(fp32, q8)]) >= 0.8


def test_cli_prints_top_labels(bundle):
    expected = Predictor(bundle).predict(["tuma ribo tugo", "kata sigi"], 3)
    out = _cli("--bundle", str(bundle), "-k", "3", "tuma ribo tugo", "kata sigi")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) == 2 * (1 + 3) and lines[0] == "tuma ribo tugo" and lines[4] == "kata sigi"
    for line, (uid, title, score) in zip(lines[1:4] + lines[5:8], expected[0] + expected[1]):
        assert line.split(None, 3)[1:] == [f"{score:.4f}", uid, title]


def test_cli_jsonl_reads_stdin_and_writes_one_line_per_input(bundle):
    out = _cli("--bundle", str(bundle), "-k", "2", "--jsonl",
               stdin='"tuma ribo tugo"\n\n{"id": 7, "text": "kata sigi"}\n')
    assert out.returncode == 0, out.stderr
    records = [json.loads(line) for line in out.stdout.splitlines()]
    expected = Predictor(bundle).predict(["tuma ribo tugo", "kata sigi"], 2)
    assert [r["text"] for r in records] == ["tuma ribo tugo", "kata sigi"] and records[1]["id"] == 7
    for rec, exp in zip(records, expected):
        assert [(lab["uid"], lab["title"]) for lab in rec["labels"]] == [(u, t) for u, t, _ in exp]

    bad = _cli("--bundle", str(bundle), "--jsonl", stdin='"fine"\n{"txt": 1}\n')
    assert bad.returncode == 1 and "stdin, line 2" in bad.stderr and "Traceback" not in bad.stderr


def test_cli_argument_errors(bundle):
    for args, message in ((["--bundle", str(bundle)], "give texts as arguments"),
                          (["--bundle", str(bundle), "-k", "0", "x"], "-k: expected a positive integer")):
        out = _cli(*args)
        assert out.returncode == 1 and message in out.stderr and "Traceback" not in out.stderr
    with pytest.raises(TypeError, match="not one string"):
        Predictor(bundle).predict("a text", 3)


def test_tampered_or_incomplete_bundle_is_refused(bundle, tmp_path):
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    meta = copy / "encoder" / "encoder.json"
    meta.write_text(meta.read_text().replace('"query_max_len": 16', '"query_max_len": 8'))
    out = _cli("--bundle", str(copy), "some text")
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert "encoder/encoder.json has been modified" in out.stderr

    shutil.rmtree(copy)
    shutil.copytree(bundle, copy)
    (copy / "index" / "labels.faiss").unlink()
    with pytest.raises(BundleError, match="index/labels.faiss is missing"):
        Predictor(copy)


def test_bundle_without_manifest_is_refused_unless_unverified(bundle, tmp_path):
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    (copy / "manifest.json").unlink()
    with pytest.raises(BundleError, match=r"manifest.json: file not found"):
        Predictor(copy)
    assert len(Predictor(copy, verify=False).predict(["x"], 2)[0]) == 2  # what the stages use


def test_prediction_path_imports_no_torch(bundle):
    code = (
        "import sys\n"
        "import dexml\n"
        f"preds = dexml.Predictor({str(bundle)!r}).predict(['tuma ribo tugo'], 3)\n"
        "assert len(preds[0]) == 3, preds\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers'))\n"
        "assert not heavy, heavy[:5]\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=REPO)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
