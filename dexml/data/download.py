"""The `download` stage: materialise the dataset selected by params `dataset` under `data.dir`.

Sources (params `dataset.source`):
  synthetic          the seeded generator (dexml/data/synthetic.py)
  a registered name  one of REGISTRY below: fetched from its published location (Google Drive,
                     through gdown) into cache/downloads/<name>/ and converted (dexml/data/formats.py);
                     with `dataset.path` set, that local copy (archive or directory) is used instead
  local              `dataset.path`: a directory in the LF layout, or a .zip/.tar.gz holding one
  url                `dataset.url`: an http(s) archive of the LF layout

Raw downloads are kept in cache/downloads/ (outside data.dir, which is the DVC output), so a
rerun does not fetch again. Transfers retry with exponential backoff, resume a partial file
(HTTP Range), check sha256 when known and appear under their final name only when complete.

The dataset is materialised into a temporary directory next to data.dir, checked there with
the reader's checks (dexml.data.dataset.check_dataset: the same predicates as the validate
stage), and only then swapped in: a failed download, or a dataset that fails a check, leaves
the last good dataset (and the metrics/data.json that describes it) in place.

Errors that retrying can fix (the network after the retries, a source path not there yet)
are `TransientError`s (`dexml download` exits 75); the rest (a checksum mismatch, a refused
archive, a row that fails a check) are permanent: the retrain flow retries only the former.
"""
from __future__ import annotations

import contextlib
import hashlib
import http.client
import os
import re
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from dexml import fileio
from dexml.config import DatasetParams
from dexml.data import formats
from dexml.data.dataset import (
    DEFAULT_PROPENSITY,
    META_FILE,
    check_dataset,
    write_dataset_files,
)
from dexml.errors import ConfigError, DataError, TransientError
from dexml.fileio import sha256_file

CACHE_DIR = Path("cache/downloads")
RETRIES = 5  # extra attempts after the first
BACKOFF_S = 2.0  # wait before retry n: BACKOFF_S * 2**n, at most MAX_BACKOFF_S
MAX_BACKOFF_S = 60.0
TIMEOUT_S = 60.0  # per socket operation
CHUNK = 1 << 20


@dataclass(frozen=True)
class RemoteFile:
    name: str  # file name in the download cache
    gdrive_id: Optional[str] = None
    url: Optional[str] = None
    sha256: Optional[str] = None


@dataclass(frozen=True)
class Registered:
    files: tuple[RemoteFile, ...]
    convert: Callable[[Path, Path], None]  # (dir with the upstream files, output dir)
    propensity: tuple[float, float]  # (A, B) for PSP metrics


# The paper's benchmarks at their published locations (the DEXML repository's notebook).
REGISTRY: dict[str, Registered] = {
    "EURLex-4K": Registered(
        (RemoteFile("Eurlex-4K.tar.gz", gdrive_id="1A_sL_mzpkmnr6g0DSZ0_xJTr4GN-rIfi"),),
        formats.convert_eurlex, (0.55, 1.5)),
    "LF-AmazonTitles-131K": Registered(
        (RemoteFile("LF-Amazon-131K.raw.zip", gdrive_id="1WuquxCAg8D4lKr-eZXPv4nNw2S2lm7_E"),),
        formats.copy_lf, (0.6, 2.6)),
    "LF-AmazonTitles-1.3M": Registered(
        (RemoteFile("LF-Amazon-1.3M.raw.zip", gdrive_id="12zH4mL2RX8iSvH0VCNnd3QxO4DzuHWnK"),),
        formats.copy_lf, (0.6, 2.6)),
    "LF-Wikipedia-500K": Registered(
        (RemoteFile("trn.raw.json.gz", gdrive_id="10RBSf6nC9C38wUMwqWur2Yd8mCwtup5K"),
         RemoteFile("tst.raw.json.gz", gdrive_id="1pEyKXtkwHhinuRxmARhtwEQ39VIughDf"),
         RemoteFile("Yf.txt", gdrive_id="1ZYTZPlnkPBCMcNqRRO-gNx8EPgtV-GL3")),
        formats.convert_wikipedia, (0.5, 0.4)),
}
BUILTIN_SOURCES = ("synthetic", "local", "url")


def log(msg: str) -> None:
    print(f"[download] {msg}", file=sys.stderr, flush=True)


# --- the stage ---------------------------------------------------------------------------

def materialise(ds: DatasetParams, out_dir: str | Path, cache_dir: str | Path = CACHE_DIR,
                registry: dict[str, Registered] | None = None) -> Path:
    """Write the dataset selected by `ds` to `out_dir` (canonical LF layout + dataset.json)."""
    registry = REGISTRY if registry is None else registry
    out_dir, cache_dir = Path(out_dir), Path(cache_dir)
    source = ds.source
    if source == "synthetic":
        from dexml.data.synthetic import generate

        data = generate(ds.synthetic)
        data.propensity = _propensity(ds, DEFAULT_PROPENSITY)
        with fileio.atomic_dir(out_dir) as tmp:
            write_dataset_files(data, tmp)
            _check_before_swap(tmp, out_dir, "the synthetic dataset")
        return out_dir
    if source in registry:
        entry = registry[source]
        if ds.path:
            src = _local_path(ds)
        else:
            if ds.sha256 and len(entry.files) > 1:
                raise ConfigError(f"params key `dataset.sha256`: {source} has {len(entry.files)} "
                                  f"files; a single checksum applies only to a one-file dataset")
            fetched = [_fetch_remote(f, cache_dir / source, ds.sha256) for f in entry.files]
            src = fetched[0] if len(fetched) == 1 else cache_dir / source
        _convert_into(src, out_dir, entry.convert, source, _propensity(ds, entry.propensity),
                      cache_dir, ds.sha256 if ds.path else None)
        return out_dir
    if source == "local":
        src = _local_path(ds)
        _convert_into(src, out_dir, formats.copy_lf, _archive_stem(src.name),
                      _propensity(ds, DEFAULT_PROPENSITY), cache_dir, ds.sha256)
        return out_dir
    if source == "url":
        name = _url_file_name(ds.url)
        key = hashlib.sha256(ds.url.encode()).hexdigest()[:16]
        archive = fetch_url(ds.url, cache_dir / f"url-{key}" / name, ds.sha256)
        _convert_into(archive, out_dir, formats.copy_lf, _archive_stem(name),
                      _propensity(ds, DEFAULT_PROPENSITY), cache_dir)
        return out_dir
    raise ConfigError(f"params key `dataset.source`: expected one of "
                      f"{', '.join(BUILTIN_SOURCES + tuple(registry))}, got {source!r}")


def _convert_into(src: Path, out_dir: Path, convert, name: str, propensity: tuple[float, float],
                  cache_dir: Path, sha256: str | None = None) -> None:
    """Convert `src` (a directory, or an archive unpacked first) into `out_dir`, atomically."""
    with contextlib.ExitStack() as stack:
        if src.is_file():
            if sha256:
                verify_sha256(src, sha256)
            try:
                formats.check_archive(src)
            except DataError as e:
                if cache_dir.resolve() in src.resolve().parents:  # a cached download: fetched again once gone
                    raise DataError(f"{e}; delete {src} and rerun to download it again") from None
                raise
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="unpack-", dir=_mkdir(cache_dir))))
            log(f"extracting {src}")
            formats.safe_extract(src, work)
            origin, src = src, work
        else:
            origin = src
        with fileio.atomic_dir(out_dir) as tmp:
            convert(src, tmp)
            fileio.write_json(tmp / META_FILE, {"name": name, "propensity": list(propensity)})
            _check_before_swap(tmp, out_dir, str(origin))
    log(f"wrote {name} to {out_dir}")


def _check_before_swap(tmp: Path, out_dir: Path, origin: str) -> None:
    """The reader's checks on the materialised copy; DataError (the swap does not happen) naming
    the file (as it is called in the dataset), line, field and expectation."""
    try:
        counts = check_dataset(tmp)
    except DataError as e:
        detail = str(e).replace(f"{tmp}{os.sep}", "")
        kept = f"{out_dir} is left as it was" if out_dir.exists() else f"nothing was written to {out_dir}"
        raise DataError(f"dataset from {origin} fails a check, so {kept}: {detail}") from None
    log(f"checked {counts['trn']} train / {counts['tst']} test rows, {counts['labels']} labels")


def _local_path(ds: DatasetParams) -> Path:
    src = Path(ds.path)
    if not src.exists():  # transient: a scheduled run may come before the new data does
        raise TransientError(f"params key `dataset.path`: {src} does not exist")
    if src.is_dir() and ds.sha256:
        raise ConfigError("params key `dataset.sha256`: a checksum applies to an archive, "
                          f"but {src} is a directory")
    return src


def _propensity(ds: DatasetParams, default: tuple[float, float]) -> tuple[float, float]:
    a = default[0] if ds.propensity_a is None else ds.propensity_a
    b = default[1] if ds.propensity_b is None else ds.propensity_b
    return (float(a), float(b))


def _archive_stem(name: str) -> str:
    return re.sub(r"(\.raw)?(\.zip|\.tar\.gz|\.tgz|\.tar)$", "", name) or "dataset"


def _url_file_name(url: str) -> str:
    name = urllib.parse.unquote(urllib.parse.urlsplit(url).path.rstrip("/").rsplit("/", 1)[-1])
    return re.sub(r"[^A-Za-z0-9._-]", "_", name).lstrip(".") or "archive"


def _mkdir(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p


# --- fetching ----------------------------------------------------------------------------

def verify_sha256(path: Path, expected: str) -> None:
    got = sha256_file(path)
    if got != expected.strip().lower():
        raise DataError(f"{path}: sha256 mismatch: expected {expected.strip().lower()}, got {got}")


def _fetch_remote(f: RemoteFile, cache: Path, sha256: str | None) -> Path:
    sha256 = sha256 or f.sha256
    dest = cache / f.name
    if f.url:
        return fetch_url(f.url, dest, sha256)
    return fetch_gdrive(f.gdrive_id, dest, sha256)


def fetch_gdrive(file_id: str, dest: Path, sha256: str | None = None, retries: int = RETRIES) -> Path:
    """A Google Drive file via gdown (it handles the confirmation page, Range resume, .part files)."""
    dest = Path(dest)
    if _cached(dest, sha256):
        return dest
    import gdown
    import requests

    _mkdir(dest.parent)
    log(f"fetching Google Drive file {file_id} -> {dest}")
    try:
        gdown.download(id=file_id, output=str(dest), quiet=False, resume=True, retries=retries,
                       timeout=TIMEOUT_S)
    except (gdown.exceptions.FileURLRetrievalError, gdown.exceptions.DownloadError,
            requests.RequestException, OSError) as e:
        raise TransientError(f"Google Drive file {file_id}: download failed ({e}); any partial file "
                             f"is kept next to {dest} so a rerun resumes") from None
    if sha256:
        try:
            verify_sha256(dest, sha256)
        except DataError:
            dest.unlink()
            raise
    return dest


def _cached(dest: Path, sha256: str | None) -> bool:
    """A complete earlier download (files appear under their final name only when complete)."""
    if not dest.is_file():
        return False
    if sha256 and sha256_file(dest) != sha256.strip().lower():
        log(f"{dest}: cached copy does not match the sha256; fetching again")
        dest.unlink()
        return False
    log(f"using cached {dest}")
    return True


class _Permanent(Exception):
    """An HTTP answer that retrying cannot change (404, 403, ...)."""


class _Incomplete(Exception):
    pass


def fetch_url(url: str, dest: str | Path, sha256: str | None = None, retries: int = RETRIES,
              backoff_s: float = BACKOFF_S, timeout_s: float = TIMEOUT_S) -> Path:
    """Download `url` to `dest` with retries, Range resume of `dest`.part and sha256 check."""
    dest = Path(dest)
    if _cached(dest, sha256):
        return dest
    _mkdir(dest.parent)
    part = dest.with_name(dest.name + ".part")
    for attempt in range(retries + 1):
        try:
            _transfer(url, part, timeout_s)
            break
        except _Permanent as e:
            raise DataError(f"{url}: {e}") from None
        except (OSError, http.client.HTTPException, _Incomplete) as e:
            if attempt == retries:
                raise TransientError(f"{url}: download failed after {retries + 1} attempts ({e}); "
                                     f"the partial file {part} is kept so a rerun resumes") from None
            delay = min(backoff_s * 2 ** attempt, MAX_BACKOFF_S)
            log(f"{url}: {e}; retrying in {delay:.1f} s")
            time.sleep(delay)
    if sha256:
        got = sha256_file(part)
        if got != sha256.strip().lower():
            part.unlink()
            raise DataError(f"{url}: sha256 mismatch: expected {sha256.strip().lower()}, got {got}; "
                            f"the download was discarded")
    part.replace(dest)
    return dest


def _transfer(url: str, part: Path, timeout_s: float) -> None:
    """One attempt: continue `part` from its current size when the server honours Range."""
    have = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": "dexml-download", "Accept-Encoding": "identity"}
    if have:
        headers["Range"] = f"bytes={have}-"
    try:
        resp = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout_s)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:
            total = (e.headers.get("Content-Range") or "").rpartition("/")[2]
            if total == str(have):
                return  # the partial file was already complete
            part.unlink()
            raise _Incomplete("the server refused to resume; starting over") from None
        if 400 <= e.code < 500 and e.code not in (408, 429):
            raise _Permanent(f"HTTP {e.code} {e.reason}") from None
        raise
    with resp:
        resumed = bool(have) and resp.status == 206
        if resumed:
            start = (resp.headers.get("Content-Range") or "").removeprefix("bytes ").split("-")[0]
            if start != str(have):
                raise _Incomplete(f"server resumed at byte {start}, expected {have}")
        elif have:
            log(f"{url}: server does not resume; starting over")
        length = resp.headers.get("Content-Length")
        expected = (have if resumed else 0) + int(length) if length and length.isdigit() else None
        with open(part, "ab" if resumed else "wb") as f:
            while chunk := resp.read(CHUNK):
                f.write(chunk)
            size = f.tell()
    if expected is not None and size < expected:
        raise _Incomplete(f"connection closed after {size} of {expected} bytes")

