"""Bundle manifest: checksums of encoder/ and index/, refusal of tampered or incomplete bundles."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess

import pytest

from dexml.errors import BundleError
from dexml.serve.bundle import (
    MANIFEST_FILE,
    git_revision,
    read_manifest,
    verify_bundle,
    write_manifest,
)


@pytest.fixture
def bundle(tmp_path):
    """A bundle-shaped directory with small files (the manifest logic is file-agnostic)."""
    root = tmp_path / "bundle"
    (root / "encoder").mkdir(parents=True)
    (root / "index").mkdir()
    (root / "encoder" / "model.onnx").write_bytes(b"\x08\x01onnx-bytes")
    (root / "encoder" / "tokenizer.json").write_text('{"model": {}}')
    (root / "index" / "labels.jsonl").write_text('{"uid": "a", "title": "A"}\n')
    write_manifest(root, dataset="tiny", params={"index": {"type": "flat"}}, metrics={"P@1": 50.0},
                   throughput={"encode_qps": 10.0}, git_rev=None)
    return root


def test_manifest_lists_every_file_with_its_sha256(bundle):
    manifest = json.loads((bundle / MANIFEST_FILE).read_text())
    assert manifest["files"] == {
        rel: hashlib.sha256((bundle / rel).read_bytes()).hexdigest()
        for rel in ("encoder/model.onnx", "encoder/tokenizer.json", "index/labels.jsonl")}
    assert manifest["dataset"] == "tiny" and manifest["metrics"] == {"P@1": 50.0}
    assert manifest["params"] == {"index": {"type": "flat"}} and manifest["git_revision"] is None
    assert verify_bundle(bundle) == manifest


def test_modified_file_is_refused_with_both_checksums(bundle):
    path = bundle / "index" / "labels.jsonl"
    expected = hashlib.sha256(path.read_bytes()).hexdigest()
    path.write_text('{"uid": "a", "title": "Evil"}\n')
    with pytest.raises(BundleError) as e:
        verify_bundle(bundle)
    msg = str(e.value)
    assert "index/labels.jsonl" in msg and expected in msg
    assert hashlib.sha256(path.read_bytes()).hexdigest() in msg


def test_missing_file_is_refused(bundle):
    (bundle / "encoder" / "tokenizer.json").unlink()
    with pytest.raises(BundleError, match="encoder/tokenizer.json is missing"):
        verify_bundle(bundle)


def test_unlisted_file_is_refused(bundle):
    (bundle / "encoder" / "model_int8.onnx").write_bytes(b"sneaked in")
    with pytest.raises(BundleError, match="encoder/model_int8.onnx is not listed"):
        verify_bundle(bundle)


def test_missing_or_broken_manifest_is_refused(bundle):
    (bundle / MANIFEST_FILE).write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        read_manifest(bundle)
    (bundle / MANIFEST_FILE).unlink()
    with pytest.raises(BundleError, match=r"manifest.json: file not found"):
        verify_bundle(bundle)


def test_manifest_entries_outside_the_bundle_are_refused(bundle, tmp_path):
    (tmp_path / "secret").write_text("x")
    manifest = json.loads((bundle / MANIFEST_FILE).read_text())
    manifest["files"]["encoder/../../secret"] = hashlib.sha256(b"x").hexdigest()
    (bundle / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="outside"):
        verify_bundle(bundle)


def test_write_manifest_needs_encoder_and_index(tmp_path):
    (tmp_path / "encoder").mkdir()
    with pytest.raises(BundleError, match="index"):
        write_manifest(tmp_path, dataset="x", params={}, metrics={}, throughput={}, git_rev=None)
    assert not (tmp_path / MANIFEST_FILE).exists()


def test_git_revision(tmp_path):
    assert git_revision(tmp_path) is None  # not a repository
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com"}
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True, env=env)
    subprocess.run(["git", "commit", "-q", "--allow-empty", "-m", "x"], cwd=tmp_path, check=True, env=env)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tmp_path, check=True, env=env,
                          capture_output=True, text=True).stdout.strip()
    assert git_revision(tmp_path) == head and len(head) == 40
