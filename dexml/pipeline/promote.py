"""The promotion gate, the production bundle and rollback (`dexml promote`, `dexml rollback`).

    artifacts/production/
        releases/<id>/    a full copy of a promoted bundle (encoder/, index/, manifest.json)
                          plus data_stats.json (the validate stage's statistics for its data)
        current -> releases/<id>    what serves: Predictor("artifacts/production/current")
        previous -> releases/<id>   what `dexml rollback` restores
        .lock             held while production is read and switched
        .switch.json      only during a switch: the targets it is giving the two links

A switch writes each new symlink under a temporary name and renames it onto `current` (or
`previous`), so a reader sees either the old release or the new one, never a half state. The
two links are switched one after the other, so the switch is written down first
(.switch.json): a promote or rollback that finds it (the switching process was killed) finishes
that switch before anything else. Only the releases that `current` and `previous` point to
are kept.

The gate decides on metrics it can trust, never on numbers a candidate merely carries: the
candidate's manifest must be byte for byte the one the evaluate stage of its DVC project wrote
(the md5 DVC recorded in that project's dvc.lock), and its metrics those of the project's
metrics/eval.json (also recorded there). Edit either after evaluation and the gate refuses
the candidate, --force included (docs/retraining.md, "Which metrics the gate trusts").
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

import yaml

from dexml import fileio, paths
from dexml.config import FlowParams
from dexml.errors import EXIT_NOT_PROMOTED, BundleError, ConfigError, DexmlError
from dexml.fileio import crash_point, read_json
from dexml.serve.bundle import MANIFEST_FILE, read_manifest, verify_bundle

RELEASES = "releases"
CURRENT = "current"
PREVIOUS = "previous"
LOCK_FILE = ".lock"
JOURNAL = ".switch.json"
DATA_STATS_FILE = "data_stats.json"
DVC_LOCK = "dvc.lock"
EVALUATE_STAGE = "evaluate"


# --- the gate ---------------------------------------------------------------------------

@dataclass
class Decision:
    promote: bool
    reasons: list[str]


def decide(candidate: dict, production: dict | None, gate_metric: str, min_delta: float,
           guarded: dict[str, float]) -> Decision:
    """Promote when `gate_metric` rises by more than 0 and at least `min_delta`, and no guarded
    metric falls by more than its tolerance (metrics and tolerances in percentage points).

    A tie is not an improvement: retraining to the same numbers keeps the running bundle.
    `production` None (nothing deployed yet) promotes.
    """
    if min_delta < 0:
        raise ConfigError(f"params key `flow.min_delta`: expected a number >= 0, got {min_delta!r}")
    for name, tol in guarded.items():
        if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not tol >= 0:
            raise ConfigError(f"params key `flow.guarded.{name}`: expected a tolerance >= 0 "
                              f"(percentage points), got {tol!r}")
    needed = {gate_metric: "flow.gate_metric", **{m: f"flow.guarded.{m}" for m in guarded if m != gate_metric}}
    cand = _metric_values(candidate, needed, "candidate")
    if production is None:
        return Decision(True, [f"no production bundle yet: promoting the first candidate "
                               f"({gate_metric} {cand[gate_metric]:.2f})"])
    prod = _metric_values(production, needed, "production")

    reasons = []
    gain = round(cand[gate_metric] - prod[gate_metric], 6)  # metrics are rounded to 4 decimals
    gate_ok = gain > 0 and gain >= min_delta
    verb = "improved" if gate_ok else "did not improve enough" if gain > 0 else "did not improve"
    reasons.append(f"gate {gate_metric} {verb}: {prod[gate_metric]:.2f} -> {cand[gate_metric]:.2f} "
                   f"({gain:+.2f}; needs > 0 and >= {min_delta:g})")
    guards_ok = True
    for name, tol in guarded.items():
        change = round(cand[name] - prod[name], 6)
        ok = -change <= tol
        guards_ok &= ok
        reasons.append(f"guard {name} {'ok' if ok else 'violated'}: {prod[name]:.2f} -> {cand[name]:.2f} "
                       f"({change:+.2f}; may drop at most {tol:g})")
    return Decision(gate_ok and guards_ok, reasons)


def _metric_values(metrics: dict, needed: dict[str, str], which: str) -> dict[str, float]:
    out = {}
    for name, key in needed.items():
        if name not in metrics:
            known = ", ".join(k for k, v in metrics.items() if not isinstance(v, dict))
            raise BundleError(f"{which} metrics have no `{name}` (named by params key `{key}`); "
                              f"they have: {known or 'nothing'}")
        value = metrics[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise BundleError(f"{which} metric `{name}`: expected a finite number, got {value!r}")
        out[name] = float(value)
    return out


# --- the metrics the gate trusts ---------------------------------------------------------

def project_of(bundle_dir: str | Path) -> Path:
    """The DVC project a bundle sits in (<project>/artifacts/bundle), else the working directory."""
    bundle = Path(bundle_dir).resolve()
    depth = len(Path(paths.BUNDLE_DIR).parts)
    if bundle.parts[-depth:] == Path(paths.BUNDLE_DIR).parts:
        return bundle.parents[depth - 1]
    return Path.cwd()


def trusted_metrics(bundle_dir: str | Path, project: str | Path) -> dict:
    """The candidate's metrics, once its manifest is proven to be what the evaluate stage of
    `project` wrote: manifest.json and metrics/eval.json match the md5s in project/dvc.lock, and
    the manifest's metrics are eval.json's. BundleError naming the file otherwise."""
    manifest_path, project = Path(bundle_dir) / MANIFEST_FILE, Path(project)
    lock = project / DVC_LOCK
    fix = (f"the gate trusts only metrics that the evaluate stage recorded in DVC: rerun it "
           f"(`dvc repro {EVALUATE_STAGE}` in {project}), or name the bundle's project with --project")
    try:
        stage = (yaml.safe_load(lock.read_text()) or {}).get("stages", {}).get(EVALUATE_STAGE)
    except FileNotFoundError:
        raise BundleError(f"{lock}: not found; {fix}") from None
    except (OSError, yaml.YAMLError, AttributeError) as e:
        raise BundleError(f"{lock}: not a readable dvc.lock ({e}); {fix}") from None
    recorded = {o.get("path"): o.get("md5") for o in (stage or {}).get("outs", []) if isinstance(o, dict)}
    for rel, path in ((paths.BUNDLE_MANIFEST, manifest_path), (paths.EVAL_METRICS, project / paths.EVAL_METRICS)):
        if not recorded.get(rel):
            raise BundleError(f"{lock}: no record of the {EVALUATE_STAGE} stage's {rel}; {fix}")
        if not path.is_file():
            raise BundleError(f"{path}: not found; {fix}")
        got = hashlib.md5(path.read_bytes()).hexdigest()
        if got != recorded[rel]:
            raise BundleError(f"{path}: not the file the {EVALUATE_STAGE} stage wrote (md5 {got}, {lock} "
                              f"records {recorded[rel]} for {rel}): it was changed after evaluation, so its "
                              f"metrics cannot be trusted; {fix}")
    manifest = read_manifest(manifest_path.parent)
    evaluated = read_json(project / paths.EVAL_METRICS, BundleError)
    if manifest.get("metrics") != evaluated:
        raise BundleError(f"{manifest_path}: its metrics differ from {project / paths.EVAL_METRICS}, which the "
                          f"{EVALUATE_STAGE} stage wrote with it; {fix}")
    return evaluated


# --- locking -----------------------------------------------------------------------------

@contextlib.contextmanager
def exclusive_lock(path: str | Path, what: str) -> Iterator[None]:
    """Hold an exclusive flock on `path`, or fail at once naming the holder (no waiting:
    a second retraining run or switch must not queue up behind a long one unnoticed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "unknown holder"
            raise DexmlError(f"{what} is busy: {path} is locked by {holder}; wait for that run to "
                             f"finish (the lock is released when its process ends)") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} since {datetime.now(timezone.utc):%Y-%m-%d %H:%M:%S} UTC\n")
        f.flush()
        try:
            yield
        finally:
            f.truncate(0)
            fcntl.flock(f, fcntl.LOCK_UN)


# --- production --------------------------------------------------------------------------

def _link(production_dir: str | Path, name: str) -> tuple[Path | None, str | None]:
    """(release directory, None) of link `name`; (None, its target) when the release it names
    is gone; (None, None) when there is no link. BundleError if `name` is not a symlink."""
    path = Path(production_dir) / name
    if not path.is_symlink():
        if path.exists():
            raise BundleError(f"{path} is a {'directory' if path.is_dir() else 'file'}, not a link to a release "
                              f"({RELEASES}/<id>): move it out of {production_dir} (or, for a bundle you want "
                              f"to serve, promote it with `dexml promote --force --bundle ...`); nothing was changed")
        return None, None
    target = path.resolve()
    return (target, None) if target.is_dir() else (None, os.readlink(path))


def release_of(production_dir: str | Path, link: str = CURRENT) -> Path | None:
    """The release directory `current` (or `previous`) points to, None when there is none."""
    release, missing = _link(production_dir, link)
    if missing is not None:
        raise BundleError(f"{Path(production_dir) / link} points to {missing}, which does not exist")
    return release


def recover(production_dir: str | Path) -> None:
    """Finish a switch that a killed process left half done (.switch.json), then delete what no
    link points to (an interrupted copy, an orphaned release). Call with the lock held."""
    prod = Path(production_dir)
    journal = prod / JOURNAL
    if journal.exists():
        try:
            doc = json.loads(journal.read_text())
            targets = {name: (prod / RELEASES / doc[name] if doc[name] else None) for name in (CURRENT, PREVIOUS)}
        except (OSError, ValueError, KeyError, TypeError):
            targets = None  # written atomically: unreadable means not ours; the links stand as they are
        if targets and targets[CURRENT] is not None and targets[CURRENT].is_dir():
            _apply_switch(prod, targets[CURRENT], targets[PREVIOUS])
        journal.unlink(missing_ok=True)
    for stale in prod.glob(".*.tmp"):  # a link (or the journal) written but not renamed into place
        if stale.is_symlink() or stale.is_file():
            stale.unlink()
    if (prod / RELEASES).is_dir():
        _prune(prod)


@dataclass
class GateResult:
    decision: Decision
    candidate: dict  # the candidate bundle's manifest
    production: dict | None  # production's manifest when the decision was made
    production_release: Path | None  # the release `current` pointed to then
    release: Path | None  # the new release, when promoted


def gate_and_promote(bundle_dir: str | Path, production_dir: str | Path, flow: FlowParams,
                     data_stats: str | Path | None = None, force: bool = False,
                     project: str | Path | None = None) -> GateResult:
    """Compare the candidate bundle with production and promote it if the gate passes.

    The candidate's metrics are those its DVC `project` recorded (`trusted_metrics`; default:
    the project the bundle sits in); `force` overrides the decision, never that check. The
    production lock is held from reading production's metrics to the switch, so the comparison
    is with the bundle being replaced. `data_stats` (metrics/data.json) is kept with the release
    for the next run's data-statistics comparison.
    """
    candidate = verify_bundle(bundle_dir)
    cand_metrics = trusted_metrics(bundle_dir, project_of(bundle_dir) if project is None else project)
    prod_dir = Path(production_dir)
    with exclusive_lock(prod_dir / LOCK_FILE, f"production {production_dir}"):
        recover(prod_dir)
        current, missing = _link(prod_dir, CURRENT)
        previous, _ = _link(prod_dir, PREVIOUS)
        if missing is not None and not force:
            raise BundleError(
                f"{prod_dir / CURRENT} points to {missing}, which does not exist: there is no production "
                f"bundle to compare with. `dexml rollback` restores the previous release"
                + (f" ({previous.name})" if previous else " (there is none)")
                + "; `dexml promote --force` installs this candidate. Nothing was changed")
        production = None if current is None else read_manifest(current)
        prod_metrics = None if production is None else production.get("metrics") or {}
        decision = decide(cand_metrics, prod_metrics, flow.gate_metric, flow.min_delta, flow.guarded)
        if force and not decision.promote:
            decision = Decision(True, ["forced (--force): the gate said no", *decision.reasons])
        release = None
        if decision.promote:  # `previous` becomes what served until now (or stays, if nothing did)
            release = _install_release(bundle_dir, prod_dir, data_stats, current or previous)
    return GateResult(decision, candidate, production, current, release)


def _install_release(bundle_dir: str | Path, production_dir: str | Path, data_stats: str | Path | None,
                     previous: Path | None) -> Path:
    bundle, prod = Path(bundle_dir), Path(production_dir)
    releases = prod / RELEASES
    digest = hashlib.sha256((bundle / MANIFEST_FILE).read_bytes()).hexdigest()[:10]
    release = releases / f"{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}-{digest}"
    if release.exists():
        raise BundleError(f"release {release} already exists (the same bundle was promoted this second)")
    staging = None
    try:
        releases.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".incoming-", dir=releases))
        staging.chmod(0o755)  # mkdtemp makes it private; a server may run as another user
        for part in ("encoder", "index"):
            shutil.copytree(bundle / part, staging / part)
        shutil.copy2(bundle / MANIFEST_FILE, staging / MANIFEST_FILE)
        if data_stats is not None and Path(data_stats).is_file():
            shutil.copy2(data_stats, staging / DATA_STATS_FILE)
        verify_bundle(staging)  # the copy, not just the source, is what will serve
        os.replace(staging, release)
    except OSError as e:  # ENOSPC, EDQUOT, EFBIG, EACCES...
        raise BundleError(f"cannot install the release in {releases}: {e.strerror or e}"
                          + (f" ({e.filename})" if e.filename else "") + "; production is unchanged") from None
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
    crash_point("promote:release-installed")
    _switch(prod, release, previous)
    _prune(prod)
    return release


def _switch(prod: Path, current: Path, previous: Path | None) -> None:
    """Point `current` at `current` and `previous` at `previous` (None: no previous link),
    written down first in .switch.json so that a kill between the two renames is finished later."""
    try:
        fileio.write_json(prod / JOURNAL, {CURRENT: current.name, PREVIOUS: previous.name if previous else None})
        crash_point("promote:journal-written")
        _apply_switch(prod, current, previous)
        (prod / JOURNAL).unlink()
    except OSError as e:
        raise BundleError(f"cannot switch {prod / CURRENT} to {current.name}: {e.strerror or e}; the switch is "
                          f"recorded in {prod / JOURNAL} and the next promote or rollback finishes it") from None


def _apply_switch(prod: Path, current: Path, previous: Path | None) -> None:
    if previous is None:
        (prod / PREVIOUS).unlink(missing_ok=True)
    else:
        _point(prod / PREVIOUS, previous)
    crash_point("promote:previous-switched")
    _point(prod / CURRENT, current)
    crash_point("promote:current-switched")


def rollback(production_dir: str | Path) -> Path:
    """Make `previous` current again (and the rolled-back release `previous`); returns it.
    Works when the release `current` points to is gone (then there is no `previous` after)."""
    prod = Path(production_dir)
    with exclusive_lock(prod / LOCK_FILE, f"production {prod}"):
        recover(prod)
        current, missing = _link(prod, CURRENT)
        previous, previous_missing = _link(prod, PREVIOUS)
        if previous_missing is not None:
            raise BundleError(f"{prod / PREVIOUS} points to {previous_missing}, which does not exist: "
                              "nothing to roll back to")
        if previous is None or previous == current:
            raise BundleError(f"{prod}: no previous release to roll back to "
                              f"({'nothing promoted yet' if current is None and missing is None else 'only one release was promoted'})")
        verify_bundle(previous)
        _switch(prod, previous, current)
        return previous


def _point(link: Path, release: Path) -> None:
    """Switch `link` to `release` atomically (relative target, so the tree can be moved)."""
    tmp = link.with_name(f".{link.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    os.symlink(Path(RELEASES) / release.name, tmp)
    os.replace(tmp, link)


def _prune(prod: Path) -> None:
    """Delete releases neither link points to (and staging left by an interrupted promotion)."""
    keep = {p for p in (_link(prod, CURRENT)[0], _link(prod, PREVIOUS)[0]) if p is not None}
    for path in (prod / RELEASES).iterdir():
        if path.resolve() not in keep:
            shutil.rmtree(path, ignore_errors=True)


# --- the commands ------------------------------------------------------------------------

PROMOTE_EPILOG = f"""\
exit status: 0 promoted; {EXIT_NOT_PROMOTED} not promoted (the gate said no; production unchanged);
1 an error (the message names it; production unchanged, or a half-done switch that the next
promote or rollback finishes); 2 bad arguments.
"""


def add_promote_arguments(parser) -> None:
    import argparse

    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = PROMOTE_EPILOG
    parser.add_argument("--bundle", default=paths.BUNDLE_DIR, help=f"candidate bundle (default {paths.BUNDLE_DIR})")
    parser.add_argument("--project", default=None,
                        help="the DVC project whose evaluate stage made the bundle: its dvc.lock and "
                             f"{paths.EVAL_METRICS} vouch for the metrics (default: the project the bundle "
                             f"sits in, <project>/{paths.BUNDLE_DIR}, else the working directory)")
    parser.add_argument("--production", default=paths.PRODUCTION_DIR,
                        help=f"production directory (default {paths.PRODUCTION_DIR})")
    parser.add_argument("--data-stats", default=paths.DATA_METRICS,
                        help=f"the candidate's dataset statistics, kept with the release "
                             f"(default {paths.DATA_METRICS})")
    parser.add_argument("--force", action="store_true", help="promote even if the gate says no")


def promote_main(args, params) -> int:
    flow = params.flow
    result = gate_and_promote(args.bundle, args.production, flow, args.data_stats, args.force, args.project)
    for reason in result.decision.reasons:
        print(f"  {reason}", file=sys.stderr)
    if result.release is None:
        print(f"not promoted; production unchanged ({result.production_release})")
        return EXIT_NOT_PROMOTED
    print(f"promoted {args.bundle} as {result.release} (now {Path(args.production) / CURRENT})")
    return 0


def add_rollback_arguments(parser) -> None:
    parser.add_argument("--production", default=paths.PRODUCTION_DIR,
                        help=f"production directory (default {paths.PRODUCTION_DIR})")


def rollback_main(args, params=None) -> int:
    restored = rollback(args.production)
    print(f"rolled back: {Path(args.production) / CURRENT} -> {restored}")
    return 0


def read_data_stats(release: Path | None) -> dict | None:
    """The dataset statistics stored with a release (None if absent or unreadable)."""
    path = None if release is None else release / DATA_STATS_FILE
    if path is None or not path.is_file():
        return None
    try:
        return read_json(path, BundleError)
    except BundleError:
        return None

