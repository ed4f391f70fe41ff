"""The whole DVC pipeline on a tiny config in a temporary git clone: repro, change, diff, push/pull."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dexml import paths

REPO = Path(__file__).resolve().parents[1]
PROJECT_FILES = ["dvc.yaml", "params.yaml", "stages", "dexml", ".dvc/config", ".dvcignore", ".gitignore"]
GIT_ENV = {"GIT_AUTHOR_NAME": "dexml test", "GIT_AUTHOR_EMAIL": "test@dexml.local",
           "GIT_COMMITTER_NAME": "dexml test", "GIT_COMMITTER_EMAIL": "test@dexml.local"}


def _env(tmp: Path) -> dict:
    return dict(os.environ, **GIT_ENV, DVC_NO_ANALYTICS="1", DVC_SITE_CACHE_DIR=str(tmp / "dvc-site"),
                PYTHONPATH=str(REPO))


def sh(args: list[str], cwd: Path, env: dict) -> str:
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, f"{args} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout + proc.stderr


def dvc(*args: str, cwd: Path, env: dict) -> str:
    return sh([sys.executable, "-m", "dvc", *args], cwd, env)


def make_project(root: Path, params: dict, env: dict) -> Path:
    """A git + DVC repository holding the project's pipeline files and `params`."""
    root.mkdir(parents=True)
    for name in PROJECT_FILES:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, root / name, ignore=shutil.ignore_patterns("__pycache__"))
        elif src.exists():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, root / name)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sh(["git", "init", "-q", "-b", "main"], root, env)
    sh(["git", "add", "-A"], root, env)
    sh(["git", "commit", "-qm", "project"], root, env)
    return root


def full_params(tiny_params, **sections) -> dict:
    """The repo's params.yaml with the tiny settings laid over it (so every key DVC tracks exists)."""
    base = yaml.safe_load((REPO / "params.yaml").read_text())
    for section, values in tiny_params(train={"epochs": 1}, **sections).items():
        for key, value in values.items():
            if isinstance(value, dict) and isinstance(base[section].get(key), dict):
                base[section][key].update(value)
            else:
                base[section][key] = value
    return base


@pytest.mark.slow
def test_repro_change_param_metrics_diff_and_push_pull(tiny_params, tmp_path):
    env = _env(tmp_path)
    project = make_project(tmp_path / "project", full_params(tiny_params), env)

    out = dvc("repro", cwd=project, env=env)
    for stage in ("download", "validate", "train", "export", "index", "evaluate"):
        assert f"Running stage '{stage}'" in out
    metrics = json.loads((project / paths.EVAL_METRICS).read_text())
    assert {"P@1", "P@5", "nDCG@5", "PSP@3", "R@100"} <= metrics.keys()
    for name in ("manifest.json", "encoder", "index"):
        assert (project / paths.BUNDLE_DIR / name).exists()
    sh(["git", "add", "-A"], project, env)
    sh(["git", "commit", "-qm", "first run"], project, env)

    # Nothing changed: nothing reruns.
    assert "Running stage" not in dvc("repro", cwd=project, env=env)

    # A training param changes: data stages are skipped, train and everything after rerun.
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["train"]["epochs"] = 2
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = dvc("repro", cwd=project, env=env)
    assert "Running stage 'download'" not in out and "Running stage 'validate'" not in out
    assert "Running stage 'train'" in out and "Running stage 'evaluate'" in out
    assert "train.epochs" in dvc("params", "diff", cwd=project, env=env)
    diff = json.loads(dvc("metrics", "diff", "--json", cwd=project, env=env))
    assert diff["metrics/train.json"]["epochs"] == {"old": 1, "new": 2, "diff": 1}
    assert "P@1" in diff.get("metrics/eval.json", {}) or "R@100" in diff.get("metrics/eval.json", {})
    sh(["git", "add", "-A"], project, env)
    sh(["git", "commit", "-qm", "two epochs"], project, env)

    # A teammate restores every artifact from a (local-directory) remote without retraining.
    remote = tmp_path / "remote"
    dvc("remote", "add", "-d", "team", str(remote), cwd=project, env=env)
    dvc("push", cwd=project, env=env)
    sh(["git", "commit", "-qam", "remote"], project, env)
    clone = tmp_path / "clone"
    sh(["git", "clone", "-q", str(project), str(clone)], tmp_path, env)
    assert not (clone / paths.MODEL_DIR).exists()
    dvc("pull", cwd=clone, env=env)
    for rel in ("data/dataset/trn.json.gz", paths.MODEL_DIR + "/dexml_encoder.json", paths.BUNDLE_MANIFEST,
                paths.PREDICTIONS, paths.BUNDLE_INDEX + "/labels.faiss"):
        assert (clone / rel).exists(), rel
    assert "Running stage" not in dvc("repro", cwd=clone, env=env)  # up to date as pulled

    from dexml.serve.predictor import Predictor

    top = Predictor(clone / paths.BUNDLE_DIR).predict(["some query text"], k=3)[0]
    assert len(top) == 3 and all(isinstance(uid, str) for uid, _, _ in top)
