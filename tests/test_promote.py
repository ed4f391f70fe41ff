"""The promotion gate (a pure function), production releases, rollback and the lock."""
from __future__ import annotations

import hashlib
import json
import os

import pytest
import yaml

from dexml import fileio, paths
from dexml.cli import main as cli
from dexml.config import FlowParams
from dexml.errors import EXIT_NOT_PROMOTED, BundleError, ConfigError, DexmlError
from dexml.pipeline.promote import (
    decide,
    exclusive_lock,
    gate_and_promote,
    release_of,
    rollback,
)
from dexml.serve.bundle import write_manifest

GUARDED = {"P@1": 1.0, "PSP@5": 1.0}
PROD = {"P@1": 80.0, "P@5": 40.0, "PSP@5": 30.0, "R@100": 90.0}


def metrics(**changes) -> dict:
    return {**PROD, **{k.replace("_", "@"): v for k, v in changes.items()}}


# --- decide ------------------------------------------------------------------------------

def test_first_candidate_is_promoted_when_there_is_no_production():
    d = decide(metrics(), None, "P@5", 0.0, GUARDED)
    assert d.promote and "no production bundle" in d.reasons[0]


def test_improvement_promotes_and_every_check_is_explained():
    d = decide(metrics(P_5=41.0, P_1=79.5), PROD, "P@5", 0.5, GUARDED)
    assert d.promote
    assert d.reasons[0].startswith("gate P@5 improved: 40.00 -> 41.00 (+1.00")
    assert any(r.startswith("guard P@1 ok: 80.00 -> 79.50") for r in d.reasons)
    assert any(r.startswith("guard PSP@5 ok") for r in d.reasons)


def test_a_tie_is_not_promoted():
    d = decide(metrics(), PROD, "P@5", 0.0, GUARDED)
    assert not d.promote and "did not improve" in d.reasons[0]


def test_gain_must_reach_min_delta_inclusive():
    assert not decide(metrics(P_5=40.4), PROD, "P@5", 0.5, GUARDED).promote
    # 40.5 - 40.0 is 0.5 up to float error: exactly min_delta counts ("at least").
    assert decide(metrics(P_5=40.5), PROD, "P@5", 0.5, GUARDED).promote
    assert decide(metrics(P_5=40.3 + 0.2), {**PROD, "P@5": 40.3}, "P@5", 0.2, GUARDED).promote


def test_a_guarded_metric_dropping_beyond_its_tolerance_blocks_promotion():
    d = decide(metrics(P_5=45.0, PSP_5=28.5), PROD, "P@5", 0.0, GUARDED)
    assert not d.promote
    assert any(r.startswith("guard PSP@5 violated: 30.00 -> 28.50 (-1.50; may drop at most 1")
               for r in d.reasons)
    # Within tolerance (a drop of exactly 1.0 is allowed).
    assert decide(metrics(P_5=45.0, PSP_5=29.0), PROD, "P@5", 0.0, GUARDED).promote


def test_missing_metric_keys_are_a_clear_error():
    with pytest.raises(BundleError, match=r"candidate metrics have no `P@7` \(named by params key `flow.gate_metric"):
        decide(metrics(), PROD, "P@7", 0.0, {})
    with pytest.raises(BundleError, match=r"production metrics have no `PSP@5` .*`flow.guarded.PSP@5`"):
        decide(metrics(), {"P@1": 80.0, "P@5": 40.0}, "P@5", 0.0, GUARDED)
    with pytest.raises(BundleError, match=r"candidate metric `P@5`: expected a finite number"):
        decide(metrics(P_5=float("nan")), PROD, "P@5", 0.0, {})


def test_bad_gate_params_are_config_errors():
    with pytest.raises(ConfigError, match="flow.guarded.P@1"):
        decide(metrics(), PROD, "P@5", 0.0, {"P@1": -1})
    with pytest.raises(ConfigError, match="flow.min_delta"):
        decide(metrics(), PROD, "P@5", -0.1, {})


# --- production, promotion and rollback -------------------------------------------------

def make_bundle(project, p5: float, tag: str):
    """<project>/artifacts/bundle, a bundle-shaped directory with a real manifest (checksums are
    file-agnostic), plus what the evaluate stage leaves beside it: metrics/eval.json and the
    dvc.lock entries DVC records for both (md5 of the bytes; tests/test_reliability.py makes the
    record with real `dvc repro`). Returns the bundle directory."""
    root = project / paths.BUNDLE_DIR
    (root / "encoder").mkdir(parents=True)
    (root / "index").mkdir()
    (root / "encoder" / "model.onnx").write_bytes(f"onnx {tag}".encode())
    (root / "index" / "labels.jsonl").write_text(json.dumps({"uid": tag, "title": tag}) + "\n")
    write_manifest(root, dataset="tiny", params={}, metrics=metrics(P_5=p5), throughput={}, git_rev=None)
    fileio.write_json(project / paths.EVAL_METRICS, metrics(P_5=p5))
    outs = [{"path": rel, "hash": "md5", "md5": hashlib.md5((project / rel).read_bytes()).hexdigest()}
            for rel in (paths.BUNDLE_MANIFEST, paths.EVAL_METRICS)]
    (project / "dvc.lock").write_text(yaml.safe_dump({"schema": "2.0", "stages": {"evaluate": {"outs": outs}}}))
    return root


def test_promote_keeps_previous_and_rollback_swaps(tmp_path):
    prod = tmp_path / "production"
    first = gate_and_promote(make_bundle(tmp_path / "a", 40.0, "a"), prod, FlowParams())
    assert first.decision.promote and first.production is None
    assert release_of(prod) == first.release and release_of(prod, "previous") is None
    assert (prod / "current" / "encoder" / "model.onnx").read_bytes() == b"onnx a"

    worse = gate_and_promote(make_bundle(tmp_path / "b", 39.0, "b"), prod, FlowParams())
    assert not worse.decision.promote and worse.release is None
    assert release_of(prod) == first.release and worse.production_release == first.release

    better = gate_and_promote(make_bundle(tmp_path / "c", 42.0, "c"), prod, FlowParams(),
                              data_stats=_stats(tmp_path))
    assert better.decision.promote
    assert release_of(prod) == better.release and release_of(prod, "previous") == first.release
    assert json.loads((better.release / "data_stats.json").read_text()) == {"labels": 7}
    assert os.readlink(prod / "current") == f"releases/{better.release.name}"  # relative link

    assert rollback(prod) == first.release
    assert (prod / "current" / "encoder" / "model.onnx").read_bytes() == b"onnx a"
    assert release_of(prod, "previous") == better.release
    assert rollback(prod) == better.release  # rolling back twice undoes the rollback

    # Only the releases the two links point to are kept.
    gate_and_promote(make_bundle(tmp_path / "d", 50.0, "d"), prod, FlowParams())
    assert len(list((prod / "releases").iterdir())) == 2


def _stats(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps({"labels": 7}))
    return path


def test_rollback_without_a_previous_release_is_an_error(tmp_path):
    prod = tmp_path / "production"
    with pytest.raises(BundleError, match="no previous release to roll back to .nothing promoted yet"):
        rollback(prod)
    gate_and_promote(make_bundle(tmp_path / "a", 40.0, "a"), prod, FlowParams())
    with pytest.raises(BundleError, match="only one release"):
        rollback(prod)


def test_tampered_candidate_is_refused_and_production_is_untouched(tmp_path):
    prod = tmp_path / "production"
    first = gate_and_promote(make_bundle(tmp_path / "a", 40.0, "a"), prod, FlowParams()).release
    bad = make_bundle(tmp_path / "b", 45.0, "b")
    (bad / "encoder" / "model.onnx").write_bytes(b"swapped")
    with pytest.raises(BundleError, match="encoder/model.onnx has been modified"):
        gate_and_promote(bad, prod, FlowParams())
    assert release_of(prod) == first and sorted(p.name for p in (prod / "releases").iterdir()) == [first.name]


def test_a_held_lock_fails_fast_naming_the_holder(tmp_path):
    lock = tmp_path / "production" / ".lock"
    with exclusive_lock(lock, "production"):
        with pytest.raises(DexmlError, match=rf"production is busy: {lock} is locked by pid {os.getpid()}"):
            rollback(tmp_path / "production")
    with exclusive_lock(lock, "production"):  # released on exit
        pass


def test_promote_and_rollback_commands(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("flow:\n  gate_metric: P@5\n  min_delta: 1.0\n  guarded: {}\n")
    a = str(make_bundle(tmp_path / "a", 40.0, "a"))
    b = str(make_bundle(tmp_path / "b", 40.5, "b"))  # better, but by less than min_delta
    prod = ["--production", "prod"]
    assert cli(["promote", "--bundle", a, *prod]) == 0
    assert cli(["promote", "--bundle", b, *prod]) == EXIT_NOT_PROMOTED == 3
    out = capsys.readouterr()
    assert "not promoted; production unchanged" in out.out and "did not improve enough" in out.err
    assert (tmp_path / "prod/current/encoder/model.onnx").read_bytes() == b"onnx a"
    assert cli(["promote", "--bundle", b, "-S", "flow.min_delta=0.5", *prod]) == 0
    assert (tmp_path / "prod/current/encoder/model.onnx").read_bytes() == b"onnx b"
    assert cli(["rollback", *prod]) == 0
    assert (tmp_path / "prod/current/encoder/model.onnx").read_bytes() == b"onnx a"
    assert cli(["rollback", "--production", "nowhere"]) == 1
    assert "no previous release" in capsys.readouterr().err
