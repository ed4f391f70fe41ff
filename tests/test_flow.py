"""The Prefect retrain flow, for real: a temporary git + DVC copy of the project on a tiny
config, run in Prefect's test harness (a temporary local server).

One module fixture makes three runs and records production after each: a first run
(promoted), a clearly worse one (not promoted) and one on corrupt data (fails at validate).
The tests then check what each run did and left; the last test forces a promotion and rolls
it back. All but the first test are slow.
"""
from __future__ import annotations

import gzip
import hashlib
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
PROJECT_FILES = ["dvc.yaml", "params.yaml", "stages", "dexml", "flows", "prefect.yaml", ".dvc/config",
                 ".dvc/.gitignore", ".dvcignore", ".gitignore"]
GIT_ENV = {"GIT_AUTHOR_NAME": "dexml test", "GIT_AUTHOR_EMAIL": "test@dexml.local",
           "GIT_COMMITTER_NAME": "dexml test", "GIT_COMMITTER_EMAIL": "test@dexml.local"}
TINY_SYNTHETIC = {"num_labels": 40, "num_train": 400, "num_test": 100, "words_per_label": 4,
                  "labels_per_point": 2.0, "query_words": 6, "noise_fraction": 0.2, "seed": 0}


def flows():
    sys.path.insert(0, str(REPO))  # flows/ is not an installed package; Prefect loads it by path
    try:
        from flows import retrain
    finally:
        sys.path.remove(str(REPO))
    return retrain


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    for key, value in {**GIT_ENV, "PREFECT_HOME": str(tmp_path_factory.mktemp("prefect_home")),
                       "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DVC_NO_ANALYTICS": "1",
                       "DVC_SITE_CACHE_DIR": str(tmp_path_factory.mktemp("dvc_site"))}.items():
        mp.setenv(key, value)
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=60):
        yield
    mp.undo()


@pytest.fixture(scope="module")
def project(env, tiny_encoder, tmp_path_factory) -> Path:
    """A git + DVC repository with the project's pipeline, flow and tiny params."""
    root = tmp_path_factory.mktemp("flow") / "project"
    for name in PROJECT_FILES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
        elif (REPO / name).exists():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, root / name)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["dataset"]["synthetic"] = dict(TINY_SYNTHETIC)
    params["model"].update(encoder=str(tiny_encoder), tau=0.1, query_max_len=16, label_max_len=12)
    params["negatives"].update(mode="all", label_chunk=16)
    params["train"].update(epochs=1, batch_size=32, lr=3e-3, seed=0, warmup=0.0)
    params["evaluate"]["k"] = 10
    params["flow"].update(download_retries=0)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "project"]):
        subprocess.run(["git", *args], cwd=root, check=True, capture_output=True)
    return root


def corrupt_dataset(src: Path, dst: Path) -> Path:
    """A copy of the dataset whose trn.json.gz has a label index beyond the label set."""
    shutil.copytree(src, dst)
    with gzip.open(dst / "trn.json.gz", "rt") as f:
        rows = [json.loads(line) for line in f]
    rows[3]["target_ind"] = [10_000]
    with gzip.open(dst / "trn.json.gz", "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return dst


def production(project: Path) -> dict:
    """What production holds: the link targets, the releases and current's manifest digest."""
    prod = project / paths.PRODUCTION_DIR
    link = lambda name: os.readlink(prod / name) if (prod / name).is_symlink() else None  # noqa: E731
    manifest = prod / "current" / "manifest.json"
    return {"current": link("current"), "previous": link("previous"),
            "releases": sorted(p.name for p in (prod / "releases").iterdir()) if (prod / "releases").exists() else [],
            "manifest": hashlib.sha256(manifest.read_bytes()).hexdigest() if manifest.exists() else None}


def run_info(state) -> dict:
    """The run's state, result, report artifact and task runs, read back from the server."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        FlowRunFilter,
        FlowRunFilterId,
    )

    run_id = state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run_id])))
        tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])))
    return {"state": state, "result": state.result(raise_on_failure=False),
            "artifacts": [(a.key, a.type, a.data) for a in artifacts],
            "tasks": {t.name.rsplit("-", 1)[0]: t for t in tasks}}  # task run names are <task>-<n>


@pytest.fixture(scope="module")
def runs(project, tiny_dataset_dir, tmp_path_factory) -> dict:
    retrain = flows().retrain
    out = {}
    out["first"] = run_info(retrain(repo=str(project), return_state=True))
    out["first"]["production"] = production(project)
    worse = {"train.max_steps": 1, "train.lr": 1.0e-7}
    out["worse"] = run_info(retrain(repo=str(project), overrides=worse, return_state=True))
    out["worse"]["production"] = production(project)
    bad = corrupt_dataset(tiny_dataset_dir, tmp_path_factory.mktemp("bad") / "data")
    # download retries allowed: a dataset that fails a check is a permanent failure, not retried
    invalid = {"dataset.source": "local", "dataset.path": str(bad), "flow.download_retries": 2,
               "flow.download_retry_delay": 0}
    out["invalid"] = run_info(retrain(repo=str(project), overrides=invalid, return_state=True))
    out["invalid"]["production"] = production(project)
    return out


def report(info: dict) -> str:
    (markdown,) = [data for key, kind, data in info["artifacts"] if key == "retrain-report" and kind == "markdown"]
    return markdown


def test_the_flow_has_a_task_for_every_dvc_stage_in_order():
    assert list(yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]) == list(flows().STAGES)


@pytest.mark.slow
def test_first_run_runs_every_stage_and_promotes(runs, project):
    first = runs["first"]
    assert first["state"].is_completed()
    summary = first["result"]
    assert summary["promoted"] and summary["production_release"] is None
    assert [s["stage"] for s in summary["stages"]] == ["download", "validate", "train", "export", "index", "evaluate"]
    assert {s["status"] for s in summary["stages"]} == {"ran"}
    assert first["production"]["current"] == f"releases/{summary['release']}"
    assert first["production"]["previous"] is None
    # The release serves (checksums verified) and is the bundle the workspace evaluated.
    from dexml import Predictor
    release = project / paths.PRODUCTION_DIR / first["production"]["current"]
    top = Predictor(release).predict(["some query"], k=3)[0]
    assert len(top) == 3
    # The repo itself was not edited: the run happened in the workspace.
    assert not (project / paths.BUNDLE_DIR).exists()
    assert subprocess.run(["git", "diff", "--quiet"], cwd=project).returncode == 0


@pytest.mark.slow
def test_worse_run_reruns_from_train_and_is_not_promoted(runs, project):
    worse = runs["worse"]
    assert worse["state"].is_completed()
    summary = worse["result"]
    status = {s["stage"]: s["status"] for s in summary["stages"]}
    assert status == {"download": "skipped (up to date)", "validate": "skipped (up to date)", "train": "ran",
                      "export": "ran", "index": "ran", "evaluate": "ran"}
    assert not summary["promoted"] and summary["release"] is None
    cand, prod = summary["metrics"]["candidate"], summary["metrics"]["production"]
    assert cand["P@5"] < prod["P@5"]
    assert summary["reasons"][0].startswith("gate P@5 did not improve")
    assert worse["production"] == runs["first"]["production"]
    # The overrides were for that run only: the repo's params.yaml never had them, and the
    # next run's workspace params (the commit's, plus that run's overrides) dropped them.
    assert yaml.safe_load((project / "params.yaml").read_text())["train"]["max_steps"] is None
    ws_params = yaml.safe_load((project / ".dexml/workspace/params.yaml").read_text())
    assert ws_params["train"]["max_steps"] is None and ws_params["dataset"]["source"] == "local"


@pytest.mark.slow
def test_invalid_data_fails_at_download_without_retry_and_production_is_unchanged(runs, project):
    """The download stage checks the new data before it replaces the last good dataset."""
    invalid = runs["invalid"]
    assert invalid["state"].is_failed()
    download = invalid["tasks"]["download"]
    assert download.state.is_failed() and download.run_count == 1  # permanent: not retried
    assert "validate" not in invalid["tasks"] and "train" not in invalid["tasks"]
    assert invalid["production"] == runs["first"]["production"]
    markdown = report(invalid)
    assert "# Retrain: failed at download" in markdown and "Production is unchanged." in markdown
    assert "fails a check" in markdown and 'trn.json.gz, line 4: fails "target_ind' in markdown
    assert "transient" not in markdown
    # the workspace still holds the last good dataset, as its statistics say
    from dexml.data.dataset import read_dataset

    ws = project / ".dexml/workspace"
    stats = json.loads((ws / paths.DATA_METRICS).read_text())
    assert read_dataset(ws / "data/dataset").trn.labels.shape == (stats["trn"]["points"], stats["labels"])


@pytest.mark.slow
def test_report_artifact_holds_decision_metric_and_data_statistics_tables(runs):
    first, worse = report(runs["first"]), report(runs["worse"])
    assert first.startswith("# Retrain: promoted") and "no production bundle yet" in first
    assert worse.startswith("# Retrain: not promoted") and "gate P@5 did not improve" in worse
    metrics = runs["worse"]["result"]["metrics"]
    for name in ("P@1 (guarded)", "P@3", "P@5 (gate)", "nDCG@5", "PSP@5 (guarded)", "PSnDCG@3", "R@100"):
        key = name.split()[0]
        cand, prod = metrics["candidate"][key], metrics["production"][key]
        assert f"| {name} | {prod:.2f} | {cand:.2f} | {cand - prod:+.2f} |" in worse
    # Same data in both runs: every data statistic is present with a zero delta.
    assert "| trn.points | 400 | 400 | +0 |" in worse and "| labels | 40 | 40 | +0 |" in worse
    assert "| train | ran |" in worse and "| download | skipped (up to date) |" in worse


@pytest.mark.slow
def test_an_overlapping_run_fails_fast_and_leaves_production(runs, project):
    from dexml.pipeline.promote import exclusive_lock

    before = production(project)
    with exclusive_lock(project / ".dexml/workspace.lock", "test"):
        state = flows().retrain(repo=str(project), return_state=True)
    assert state.is_failed()
    with pytest.raises(Exception, match=r"retrain workspace .* is busy: .*workspace.lock is locked by pid"):
        state.result()
    assert production(project) == before


@pytest.mark.slow
def test_download_failures_are_retried(runs, project, tmp_path):
    before = production(project)
    overrides = {"dataset.source": "local", "dataset.path": str(tmp_path / "missing"),
                 "flow.download_retries": 1, "flow.download_retry_delay": 0}
    info = run_info(flows().retrain(repo=str(project), overrides=overrides, return_state=True))
    assert info["state"].is_failed()
    download = info["tasks"]["download"]
    assert download.state.is_failed() and download.run_count == 2  # the first try and one retry
    assert "validate" not in info["tasks"] and production(project) == before
    assert "does not exist" in report(info) and "a transient failure: retrying may succeed" in report(info)


@pytest.mark.slow
def test_deployment_carries_the_cron_schedule_from_params(env, tmp_path):
    from prefect.client.orchestration import get_client

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["flow"].update(cron="15 4 * * *", timezone="Europe/Paris")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    deployment_id = flows().deployment(tmp_path / "params.yaml").apply()
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment(deployment_id)
    (schedule,) = deployment.schedules
    assert (schedule.schedule.cron, schedule.schedule.timezone) == ("15 4 * * *", "Europe/Paris")
    assert deployment.name == "scheduled" and deployment.global_concurrency_limit.limit == 1


@pytest.mark.slow
def test_prefect_yaml_deploys_to_a_process_pool_with_the_params_schedule(project):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.settings import PREFECT_API_URL

    with get_client(sync_client=True) as client:
        client.create_work_pool(WorkPoolCreate(name="dexml", type="process"))
    proc = subprocess.run([sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--all"], cwd=project,
                          env=dict(os.environ, PREFECT_API_URL=PREFECT_API_URL.value()),
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name("retrain/scheduled")
    flow_params = yaml.safe_load((REPO / "params.yaml").read_text())["flow"]
    (schedule,) = deployment.schedules
    assert (schedule.schedule.cron, schedule.schedule.timezone) == (flow_params["cron"], flow_params["timezone"])
    assert deployment.work_pool_name == "dexml" and deployment.global_concurrency_limit.limit == 1
    assert deployment.pull_steps == [{"prefect.deployments.steps.set_working_directory":
                                      {"directory": str(project.resolve())}}]


@pytest.mark.slow
def test_forced_promotion_then_rollback_restores_the_previous_bundle(runs, project):
    from dexml import Predictor
    from dexml.cli import main as cli

    prod = project / paths.PRODUCTION_DIR
    first = runs["first"]["production"]
    ws = project / ".dexml/workspace"
    args = ["--params", str(ws / "params.yaml"), "--production", str(prod)]
    assert cli(["promote", "--bundle", str(ws / paths.BUNDLE_DIR), "--force", *args]) == 0
    forced = production(project)
    assert forced["previous"] == first["current"] and forced["current"] != first["current"]
    assert cli(["rollback", "--production", str(prod)]) == 0
    restored = production(project)
    assert restored["current"] == first["current"] and restored["manifest"] == first["manifest"]
    assert restored["previous"] == forced["current"]
    assert len(Predictor(prod / "current").predict(["another query"], k=2)[0]) == 2
