"""The promotion gate, the production bundle and rollback (`dexml promote`, `dexml rollback`).

    artifacts/production/
        releases/<id>/    a full copy of a promoted bundle (encoder/, index/, manifest.json)
                          plus data_stats.json (the validate stage's statistics for its data)
        current -> releases/<id>    what serves: Predictor("artifacts/production/current")
        previous -> releases/<id>   what `dexml rollback` restores
        .lock             held while production is read and switched

A switch writes a new symlink under a temporary name and renames it onto `current` (or
`previous`), so a reader sees either the old release or the new one, never a half state.
Only the releases that `current` and `previous` point to are kept.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import math
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

from dexml import paths
from dexml.config import FlowParams
from dexml.errors import BundleError, ConfigError, DexmlError
from dexml.fileio import read_json
from dexml.serve.bundle import MANIFEST_FILE, read_manifest, verify_bundle

RELEASES = "releases"
CURRENT = "current"
PREVIOUS = "previous"
LOCK_FILE = ".lock"
DATA_STATS_FILE = "data_stats.json"


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

def release_of(production_dir: str | Path, link: str = CURRENT) -> Path | None:
    """The release directory `current` (or `previous`) points to, None when there is none."""
    path = Path(production_dir) / link
    if not path.is_symlink():
        return None
    target = path.resolve()
    if not target.is_dir():
        raise BundleError(f"{path} points to {os.readlink(path)}, which does not exist")
    return target


@dataclass
class GateResult:
    decision: Decision
    candidate: dict  # the candidate bundle's manifest
    production: dict | None  # production's manifest when the decision was made
    production_release: Path | None  # the release `current` pointed to then
    release: Path | None  # the new release, when promoted


def gate_and_promote(bundle_dir: str | Path, production_dir: str | Path, flow: FlowParams,
                     data_stats: str | Path | None = None, force: bool = False) -> GateResult:
    """Compare the candidate bundle with production and promote it if the gate passes.

    The production lock is held from reading production's metrics to the switch, so the
    comparison is with the bundle being replaced. `data_stats` (metrics/data.json) is kept
    with the release for the next run's data-statistics comparison.
    """
    candidate = verify_bundle(bundle_dir)
    with exclusive_lock(Path(production_dir) / LOCK_FILE, f"production {production_dir}"):
        current = release_of(production_dir)
        production = None if current is None else read_manifest(current)
        prod_metrics = None if production is None else production.get("metrics") or {}
        decision = decide(candidate.get("metrics") or {}, prod_metrics, flow.gate_metric, flow.min_delta, flow.guarded)
        if force and not decision.promote:
            decision = Decision(True, ["forced (--force): the gate said no", *decision.reasons])
        release = _install_release(bundle_dir, production_dir, data_stats) if decision.promote else None
    return GateResult(decision, candidate, production, current, release)


def _install_release(bundle_dir: str | Path, production_dir: str | Path, data_stats: str | Path | None) -> Path:
    bundle, prod = Path(bundle_dir), Path(production_dir)
    releases = prod / RELEASES
    releases.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256((bundle / MANIFEST_FILE).read_bytes()).hexdigest()[:10]
    release = releases / f"{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}-{digest}"
    if release.exists():
        raise BundleError(f"release {release} already exists (the same bundle was promoted this second)")
    staging = Path(tempfile.mkdtemp(prefix=".incoming-", dir=releases))
    try:
        staging.chmod(0o755)  # mkdtemp makes it private; a server may run as another user
        for part in ("encoder", "index"):
            shutil.copytree(bundle / part, staging / part)
        shutil.copy2(bundle / MANIFEST_FILE, staging / MANIFEST_FILE)
        if data_stats is not None and Path(data_stats).is_file():
            shutil.copy2(data_stats, staging / DATA_STATS_FILE)
        verify_bundle(staging)  # the copy, not just the source, is what will serve
        os.replace(staging, release)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    old = release_of(prod, CURRENT)
    if old is not None:
        _point(prod / PREVIOUS, old)
    _point(prod / CURRENT, release)
    _prune(prod)
    return release


def rollback(production_dir: str | Path) -> Path:
    """Make `previous` current again (and the rolled-back release `previous`); returns it."""
    prod = Path(production_dir)
    with exclusive_lock(prod / LOCK_FILE, f"production {prod}"):
        current, previous = release_of(prod, CURRENT), release_of(prod, PREVIOUS)
        if previous is None or previous == current:
            raise BundleError(f"{prod}: no previous release to roll back to "
                              f"({'nothing promoted yet' if current is None else 'only one release was promoted'})")
        verify_bundle(previous)
        _point(prod / PREVIOUS, current)
        _point(prod / CURRENT, previous)
        return previous


def _point(link: Path, release: Path) -> None:
    """Switch `link` to `release` atomically (relative target, so the tree can be moved)."""
    tmp = link.with_name(f".{link.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    os.symlink(Path(RELEASES) / release.name, tmp)
    os.replace(tmp, link)


def _prune(prod: Path) -> None:
    """Delete releases neither link points to (and staging left by an interrupted promotion)."""
    keep = {p for p in (release_of(prod, CURRENT), release_of(prod, PREVIOUS)) if p is not None}
    for path in (prod / RELEASES).iterdir():
        if path.resolve() not in keep:
            shutil.rmtree(path, ignore_errors=True)


# --- the commands ------------------------------------------------------------------------

def add_promote_arguments(parser) -> None:
    parser.add_argument("--bundle", default=paths.BUNDLE_DIR, help=f"candidate bundle (default {paths.BUNDLE_DIR})")
    parser.add_argument("--production", default=paths.PRODUCTION_DIR,
                        help=f"production directory (default {paths.PRODUCTION_DIR})")
    parser.add_argument("--data-stats", default=paths.DATA_METRICS,
                        help=f"the candidate's dataset statistics, kept with the release "
                             f"(default {paths.DATA_METRICS})")
    parser.add_argument("--force", action="store_true", help="promote even if the gate says no")


def promote_main(args, params) -> int:
    flow = params.flow
    result = gate_and_promote(args.bundle, args.production, flow, args.data_stats, args.force)
    for reason in result.decision.reasons:
        print(f"  {reason}", file=sys.stderr)
    if result.release is None:
        print(f"not promoted; production unchanged ({result.production_release})")
    else:
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

