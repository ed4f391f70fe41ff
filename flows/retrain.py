"""Scheduled retraining: the DVC pipeline as Prefect tasks, then the promotion gate.

    python flows/retrain.py serve            the deployment's cron schedule, run by this process
    python flows/retrain.py now [-S k=v]     one run now (overrides apply to this run only)
    prefect --no-prompt deploy --all         the same deployment on a process work pool (prefect.yaml)

What runs where (docs/retraining.md has the whole story):
- The pipeline runs in a workspace, <repo>/.dexml/workspace: a git checkout of the repo's
  committed HEAD, reused between runs so DVC only reruns what changed. Each run writes
  the committed params.yaml plus the run's overrides into the workspace, never into the repo.
  The workspace's DVC cache is the repo's (`dvc cache dir --local`), so nothing is stored twice.
- Production is <repo>/artifacts/production (dexml/pipeline/promote.py): releases, `current`, `previous`.
- One run at a time per workspace: an exclusive lock on <workspace>.lock for the whole run
  (a second run fails at once), and the deployment has concurrency_limit=1 (Prefect queues).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any

import yaml
from prefect import flow, get_run_logger, serve, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.schedules import Cron
from prefect.tasks import exponential_backoff

from dexml import fileio, paths
from dexml.config import load_params, set_dotted
from dexml.errors import EXIT_TRANSIENT, DexmlError
from dexml.pipeline.promote import exclusive_lock, gate_and_promote, read_data_stats

REPO = Path(__file__).resolve().parents[1]
WORKSPACE = ".dexml/workspace"
STAGES = ("download", "validate", "train", "export", "index", "evaluate")
DEPLOYMENT_NAME = "scheduled"
REPORT_KEY = "retrain-report"
DVC = [sys.executable, "-m", "dvc"]


class StageFailed(DexmlError):
    """A pipeline stage exited with an error; `transient` when its command exited with
    EXIT_TRANSIENT (a source that could not be reached: retrying may succeed)."""

    def __init__(self, message: str, transient: bool = False):
        super().__init__(message)
        self.transient = transient


def retry_if_transient(task, task_run, state) -> bool:
    """The download task's retry condition: retry a source that could not be reached, never a
    permanent failure (a checksum mismatch, a refused archive, a row that fails a check)."""
    try:
        error = state.result(raise_on_failure=False)
    except Exception:  # the result could not be read back: do not guess
        return False
    return isinstance(error, StageFailed) and error.transient


def _run(args: list[str], cwd: Path) -> str:
    proc = subprocess.run(args, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise DexmlError(f"`{' '.join(args)}` in {cwd} failed: {(proc.stderr or proc.stdout).strip()}")
    return proc.stdout.strip()


def _git(cwd: Path, *args: str) -> str:
    return _run(["git", *args], cwd)


def _stage_env(workspace: Path) -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1", DVC_NO_ANALYTICS="1")
    # dvc.yaml's `python stages/...` must be this interpreter, importing the workspace's dexml
    # (the code DVC hashed and the manifest's git revision names).
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(workspace), env.get("PYTHONPATH")]))
    return env


def sync_workspace(repo: Path, workspace: Path, overrides: dict[str, Any]) -> str:
    """Check the repo's committed HEAD out into the workspace and write its params.yaml with
    `overrides` (dotted keys) applied; returns the commit. Validates the params."""
    if not (workspace / ".git").exists():
        if workspace.exists() and any(workspace.iterdir()):
            raise DexmlError(f"workspace {workspace} exists but is not a git checkout; remove it")
        workspace.mkdir(parents=True, exist_ok=True)
        _git(workspace, "init", "-q")
    _git(workspace, "fetch", "-q", str(repo), "HEAD")
    revision = _git(workspace, "rev-parse", "FETCH_HEAD")
    head = subprocess.run(["git", "rev-parse", "--verify", "-q", "HEAD"], cwd=workspace,
                          capture_output=True, text=True).stdout.strip()
    if head != revision:
        # dvc.lock describes the outputs in this workspace, not the commit's: keep it.
        lock = workspace / "dvc.lock"
        kept = lock.read_bytes() if lock.exists() else None
        _git(workspace, "checkout", "-q", "--force", "--detach", revision)
        if kept is not None:
            lock.write_bytes(kept)
    if not (workspace / ".dvc" / "config.local").exists():  # first run: share the repo's DVC cache
        _run([*DVC, "cache", "dir", "--local", _run([*DVC, "cache", "dir"], repo)], workspace)
    raw = yaml.safe_load(_git(workspace, "show", f"{revision}:params.yaml")) or {}
    for key, value in overrides.items():
        set_dotted(raw, key, value)
    fileio.write_text(workspace / "params.yaml", yaml.safe_dump(raw, sort_keys=False))
    load_params(workspace / "params.yaml")  # a bad override fails here, before any stage
    stages = list((yaml.safe_load((workspace / "dvc.yaml").read_text()) or {}).get("stages", {}))
    if stages != list(STAGES):
        raise DexmlError(f"{workspace / 'dvc.yaml'} has the stages {stages}, but the flow runs {list(STAGES)}; "
                         "update STAGES in flows/retrain.py")
    return revision


@task(name="prepare-workspace", cache_policy=NO_CACHE)
def prepare_workspace(repo: str, workspace: str, overrides: dict[str, Any]) -> str:
    logger = get_run_logger()
    if subprocess.run(["git", "diff", "--quiet", "HEAD"], cwd=repo).returncode != 0:
        logger.warning(f"{repo} has uncommitted changes; the flow trains its committed HEAD")
    revision = sync_workspace(Path(repo), Path(workspace), overrides)
    logger.info(f"workspace {workspace} at {revision[:12]}, overrides {overrides or 'none'}")
    return revision


@task(cache_policy=NO_CACHE)
def run_stage(workspace: str, stage: str) -> dict:
    """`dvc repro --single-item <stage>`, its output streamed into the run's logs; returns
    whether the stage ran or was skipped as up to date (from `dvc status` beforehand)."""
    logger = get_run_logger()
    env, start = _stage_env(Path(workspace)), time.monotonic()
    # A subprocess, like repro: DVC's Python API expects the process's cwd inside the repo.
    status = subprocess.run([*DVC, "status", "--json", stage], cwd=workspace, env=env, capture_output=True, text=True)
    if status.returncode == 0 and status.stdout.strip() == "{}":
        logger.info(f"stage {stage}: up to date, skipped")
        return {"stage": stage, "status": "skipped (up to date)", "seconds": round(time.monotonic() - start, 1)}
    tail: deque[str] = deque(maxlen=30)
    with subprocess.Popen([*DVC, "repro", "--single-item", stage], cwd=workspace, env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, bufsize=1) as proc:
        for line in proc.stdout:
            line = line.rstrip()
            if line:
                logger.info(line)
                tail.append(line)
    if proc.returncode != 0:
        # dvc repro exits 255 whatever the command did; its last words name the command's status.
        transient = any(line.rstrip().endswith(f"exited with {EXIT_TRANSIENT}") for line in tail)
        raise StageFailed(f"stage {stage} failed (dvc repro exit code {proc.returncode}"
                          + (", a transient failure: retrying may succeed" if transient else "") + "):\n"
                          + "\n".join(tail), transient=transient)
    return {"stage": stage, "status": "ran", "seconds": round(time.monotonic() - start, 1)}


@task(name="gate", cache_policy=NO_CACHE)
def gate(workspace: str, production: str) -> dict:
    """Compare the candidate bundle with production; promote it if the gate passes."""
    ws = Path(workspace)
    flow_params = load_params(ws / "params.yaml").flow
    result = gate_and_promote(ws / paths.BUNDLE_DIR, production, flow_params, ws / paths.DATA_METRICS, project=ws)
    for reason in result.decision.reasons:
        get_run_logger().info(reason)
    data_stats = ws / paths.DATA_METRICS
    return {
        "promoted": result.decision.promote,
        "reasons": result.decision.reasons,
        "release": result.release.name if result.release else None,
        "production_release": result.production_release.name if result.production_release else None,
        "gate_metric": flow_params.gate_metric,
        "guarded": dict(flow_params.guarded),
        "metrics": {"candidate": result.candidate.get("metrics") or {},
                    "production": result.production["metrics"] if result.production else None},
        "datasets": {"candidate": result.candidate.get("dataset"),
                     "production": result.production.get("dataset") if result.production else None},
        "data_stats": {"candidate": json.loads(data_stats.read_text()) if data_stats.is_file() else None,
                       "production": read_data_stats(result.production_release)},
    }


@flow(name="retrain", log_prints=True)
def retrain(overrides: dict[str, Any] | None = None, repo: str | None = None, workspace: str | None = None) -> dict:
    """Run the pipeline (one task per DVC stage) and promote the new bundle if it is better.

    overrides: params.yaml entries for this run only, as dotted keys, e.g.
        {"dataset.source": "local", "dataset.path": "/data/new"} or {"train.epochs": 3}.
    repo: the project checkout (default: the one holding this file); production lives in
        <repo>/artifacts/production. workspace: default <repo>/.dexml/workspace.
    """
    repo_dir = Path(repo or REPO).resolve()
    ws = Path(workspace).resolve() if workspace else repo_dir / WORKSPACE
    summary: dict[str, Any] = {"repo": str(repo_dir), "workspace": str(ws), "overrides": overrides or {},
                               "revision": None, "stages": [], "failed": None, "error": None}
    step = "lock"  # the step under way, named in the report when it fails
    try:
        with exclusive_lock(ws.parent / f"{ws.name}.lock", f"retrain workspace {ws}"):
            step = "prepare-workspace"
            summary["revision"] = prepare_workspace(str(repo_dir), str(ws), overrides or {})
            flow_params = load_params(ws / "params.yaml").flow
            for step in STAGES:
                options: dict[str, Any] = {"name": step, "retries": 0}
                if step == "download" and flow_params.download_retries > 0:
                    options.update(retries=flow_params.download_retries, retry_condition_fn=retry_if_transient,
                                   retry_delay_seconds=exponential_backoff(flow_params.download_retry_delay))
                summary["stages"].append(run_stage.with_options(**options)(str(ws), step))
            step = "gate"
            summary.update(gate(str(ws), str(repo_dir / paths.PRODUCTION_DIR)))
    except Exception as e:
        summary.update(failed=step, error=str(e))
        raise
    finally:
        create_markdown_artifact(render_report(summary), key=REPORT_KEY,
                                 description=f"retrain: {outcome(summary)}")
    return summary


def outcome(summary: dict) -> str:
    if summary["failed"]:
        return f"failed at {summary['failed']}"
    return "promoted" if summary.get("promoted") else "not promoted"


def render_report(summary: dict) -> str:
    """The run's markdown report: stages, decision and why, metric and data-statistics deltas."""
    rev = (summary["revision"] or "?")[:12]
    out = [f"# Retrain: {outcome(summary)}", "",
           f"Commit `{rev}` of `{summary['repo']}`; overrides: `{json.dumps(summary['overrides'])}`.", "",
           "## Stages", "", "| stage | result | seconds |", "|---|---|---|"]
    out += [f"| {s['stage']} | {s['status']} | {s['seconds']} |" for s in summary["stages"]]
    if summary["failed"]:
        out += [f"| {summary['failed']} | **failed** | |", "", "## Error", "", "```", summary["error"], "```", "",
                "Production is unchanged."]
        return "\n".join(out) + "\n"
    decision = (f"**promoted** as release `{summary['release']}`" if summary["promoted"] else
                f"**not promoted**; production stays at `{summary['production_release']}`")
    out += ["", "## Decision", "", decision, ""] + [f"- {r}" for r in summary["reasons"]]
    datasets = summary["datasets"]
    if datasets["production"] is not None and datasets["candidate"] != datasets["production"]:
        out.append(f"- note: different datasets ({datasets['production']} -> {datasets['candidate']}); "
                   "the metrics are not directly comparable")
    roles = {**{m: "guarded" for m in summary["guarded"]}, summary["gate_metric"]: "gate"}
    out += ["", "## Metrics (test set, percent)", ""]
    out += _table(summary["metrics"]["candidate"], summary["metrics"]["production"], "metric", roles)
    out += ["", "## Data statistics (validate stage)", ""]
    if summary["data_stats"]["candidate"] is None:
        out.append("No statistics (metrics/data.json missing).")
    else:
        out += _table(_flatten(summary["data_stats"]["candidate"]),
                      _flatten(summary["data_stats"]["production"]) if summary["data_stats"]["production"] else None,
                      "statistic", {})
    return "\n".join(out) + "\n"


def _table(candidate: dict, production: dict | None, what: str, roles: dict[str, str]) -> list[str]:
    rows = [f"| {what} | production | candidate | delta |", "|---|---|---|---|"]
    for key, value in candidate.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue  # nested sections (throughput, int8) are not compared
        name = f"{key} ({roles[key]})" if key in roles else key
        old = (production or {}).get(key)
        if isinstance(old, (int, float)) and not isinstance(old, bool):
            rows.append(f"| {name} | {_num(old)} | {_num(value)} | {_num(value - old, sign=True)} |")
        else:
            rows.append(f"| {name} | – | {_num(value)} | – |")
    return rows


def _num(x: float, sign: bool = False) -> str:
    if isinstance(x, int):
        return f"{x:+d}" if sign else str(x)
    return f"{x:+.2f}" if sign else f"{x:.2f}"


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def deployment(params_file: str | Path = REPO / "params.yaml"):
    """The scheduled deployment (cron from params flow.cron / flow.timezone), one run at a time."""
    flow_params = load_params(params_file).flow
    return retrain.to_deployment(
        name=DEPLOYMENT_NAME, schedules=[Cron(flow_params.cron, timezone=flow_params.timezone)],
        concurrency_limit=1, description="Retrain on the DVC pipeline and promote if the gate passes.")


def main(argv: list[str] | None = None) -> int:
    from dexml.config import parse_overrides

    parser = argparse.ArgumentParser(prog="python flows/retrain.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("serve", help="serve the scheduled deployment from this process (Ctrl-C stops)")
    now = sub.add_parser("now", help="one retrain run now, in this process")
    now.add_argument("-S", "--set", action="append", metavar="KEY=VALUE",
                     help="override a params.yaml entry for this run only, e.g. -S train.epochs=3")
    args = parser.parse_args(argv)
    if args.command == "serve":
        serve(deployment())
        return 0
    try:
        summary = retrain(overrides=parse_overrides(args.set))
    except DexmlError as e:
        print(f"retrain: error: {e}", file=sys.stderr)
        return 1
    print(f"retrain: {outcome(summary)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
