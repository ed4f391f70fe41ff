"""Files in and out: atomic outputs, checked JSON reads, checksums, gzipped JSON-lines lines.

Atomic outputs: write to a temporary sibling, then rename over the target; a crash or an error
mid-way leaves the previous file or directory untouched (a directory swap killed half-way is
finished or undone by the next `atomic_dir` or `recover_dir` on the same target).
"""
from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import os
import shutil
import signal
import tempfile
from pathlib import Path
from typing import Iterator

from dexml.errors import DexmlError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(target: str | Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary file path next to `target`; rename it onto `target` on success."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix + ".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; outputs get normal permissions
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(target: str | Path, text: str) -> None:
    with atomic_path(target) as tmp:
        tmp.write_text(text)


def write_json(target: str | Path, obj) -> None:
    write_text(target, json.dumps(obj, indent=2, sort_keys=False) + "\n")


CRASH_ENV = "DEXML_CRASH_AT"


def crash_point(name: str) -> None:
    """Test hook: SIGKILL this process here when the environment variable DEXML_CRASH_AT is
    `name`. Marks the points between the renames of a switch, where tests kill a subprocess to
    prove the next command recovers (tests/test_reliability.py). Does nothing otherwise."""
    if os.environ.get(CRASH_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _leftovers(target: Path, kind: str) -> list[tuple[Path, int]]:
    """(path, pid) of the `.NAME.old-PID` (kind "old") or `.NAME.PID-*.tmp` (kind "tmp") siblings
    of `target` whose process is gone."""
    out = []
    for p in target.parent.glob(f".{target.name}.old-*" if kind == "old" else f".{target.name}.*-*.tmp"):
        tag = p.name[len(target.name) + 2:]
        pid = tag.removeprefix("old-") if kind == "old" else tag.split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            out.append((p, int(pid)))
    return out


def recover_dir(target: str | Path) -> None:
    """Finish or undo a directory swap that a killed process left half done: with `target`
    missing, the last good copy moved aside (`.NAME.old-PID`) goes back; otherwise that copy,
    and any half-written new one (`.NAME.PID-*.tmp`), of processes that are gone are deleted."""
    target = Path(target)
    if not target.parent.is_dir():
        return
    for old, _ in sorted(_leftovers(target, "old"), key=lambda x: x[0].stat().st_mtime, reverse=True):
        if not (target.exists() or target.is_symlink()):
            os.replace(old, target)  # the newest copy moved aside was the one in place
        else:
            shutil.rmtree(old, ignore_errors=True)
    for tmp, _ in _leftovers(target, "tmp"):
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(target: str | Path) -> Iterator[Path]:
    """Yield an empty temporary directory; on success it replaces `target` as a whole.

    The old directory is moved aside first and deleted only after the new one is in place; a
    process killed between the two renames leaves it aside, and the next call puts it back.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    recover_dir(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.{os.getpid()}-", suffix=".tmp", dir=target.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700
    try:
        yield tmp
        crash_point("atomic_dir:before-swap")
        old = None
        if target.exists() or target.is_symlink():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            if old.exists():
                shutil.rmtree(old)
            os.replace(target, old)
        crash_point("atomic_dir:moved-aside")
        os.replace(tmp, target)
        crash_point("atomic_dir:swapped")
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def read_json(path: str | Path, error: type[DexmlError], missing: str = "", kind: type = dict):
    """The JSON document in `path`, or `error` naming the file: absent (with the hint
    `missing`, e.g. "run the export stage"), unreadable, not JSON, or not of type `kind`."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: file not found" + (f" ({missing})" if missing else ""))
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise error(f"{path}: not valid JSON ({e})") from None
    if not isinstance(doc, kind):
        raise error(f"{path}: expected a JSON {'object' if kind is dict else kind.__name__}, got {type(doc).__name__}")
    return doc


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def iter_gz_lines(path: str | Path) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, raw bytes) of each non-blank line of a gzipped text file.
    OSError/EOFError (not gzip, truncated) propagate to the caller, which names the file."""
    with gzip.open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if raw.strip():
                yield lineno, raw
