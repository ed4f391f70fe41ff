"""The dual encoder: encoder resolution, pooling/projection/normalisation, save/load formats."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dexml.config import parse_params
from dexml.errors import ConfigError
from dexml.train.model import PACKAGED_MINILM, DualEncoder, resolve_encoder

TEXTS = ["kernel module for usb devices", "a text editor", ""]


def test_packaged_minilm_resolves_offline():
    path = Path(resolve_encoder(PACKAGED_MINILM))
    assert (path / "model.safetensors").exists() and (path / "tokenizer.json").exists()
    assert resolve_encoder("/some/local/dir") == "/some/local/dir"


@pytest.mark.parametrize("model_kw", [
    {"pooling": "mean", "projection": None, "normalize": True},
    {"pooling": "cls", "projection": 8, "normalize": True},
    {"pooling": "mean", "projection": 8, "normalize": False},
])
def test_saved_model_loads_in_dexml_and_sentence_transformers(tiny_params, tmp_path, model_kw):
    from sentence_transformers import SentenceTransformer

    model = DualEncoder.from_params(parse_params(tiny_params(model=model_kw)).model)
    emb = model.embed(TEXTS, "query")
    assert emb.shape == (3, model_kw["projection"] or 32)
    if model_kw["normalize"]:
        torch.testing.assert_close(emb.norm(dim=1), torch.ones(3))
    model.save(tmp_path)
    torch.testing.assert_close(DualEncoder.load(tmp_path).embed(TEXTS, "query"), emb)
    st = SentenceTransformer(str(tmp_path), device="cpu")
    torch.testing.assert_close(torch.as_tensor(st.encode(TEXTS)), emb, atol=1e-5, rtol=1e-4)


def test_separate_towers_and_scores(tiny_params, tmp_path):
    model = DualEncoder.from_params(parse_params(tiny_params(model={"shared": False, "tau": 0.5})).model)
    assert model.label_tower is not None
    with torch.no_grad():  # towers differ once trained: make the label tower different now
        for p in model.label_tower.parameters():
            p.add_(0.01)
    q, l = model.embed(TEXTS, "query"), model.embed(TEXTS, "label")
    assert not torch.allclose(q, l)
    torch.testing.assert_close(model.scores(q, l), q @ l.T / 0.5)
    model.save(tmp_path)
    assert (tmp_path / "query" / "model.safetensors").exists() and (tmp_path / "label" / "model.safetensors").exists()
    loaded = DualEncoder.load(tmp_path)
    torch.testing.assert_close(loaded.embed(TEXTS, "label"), l)
    torch.testing.assert_close(loaded.embed(TEXTS, "query"), q)


def test_unloadable_encoder_and_non_model_dir_are_clear_errors(tiny_params, tmp_path):
    with pytest.raises(ConfigError, match="model.encoder"):
        DualEncoder.from_params(parse_params(tiny_params(model={"encoder": str(tmp_path / "missing")})).model)
    with pytest.raises(ConfigError, match="dexml_encoder.json"):
        DualEncoder.load(tmp_path)
