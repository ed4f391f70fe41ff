"""Upstream dataset layouts -> the canonical LF layout (see dexml/data/dataset.py), plus safe extraction.

Every converter has the signature `convert(src, out)`: `src` is a directory holding the
upstream files (at its top level or in its single subdirectory, as archives unpack), `out`
an existing empty directory that receives trn/tst/lbl.json.gz and both filter files.
Converters stream, so multi-GB inputs (LF-Wikipedia-500K) never sit in memory as a whole.

Layouts:
  LF (Extreme Classification Repository, e.g. LF-AmazonTitles-131K/1.3M): already canonical;
    files are copied byte for byte, so `validate` reports line numbers of the original files.
  EURLex-4K (the X-Transformer tarball): train_raw_texts.txt / test_raw_texts.txt (one document
    per line), label_map.txt (one label name per line) and labels either as BoW files
    train.txt / test.txt (header "points features labels", then "l1,l2 f:v f:v ...") or as
    scipy matrices Y.trn.npz / Y.tst.npz (what the published tarball holds). uid = row index.
  LF-Wikipedia-500K (raw): trn.raw.json.gz / tst.raw.json.gz (JSON lines with title, content,
    target_ind) and Yf.txt (one label per line; the name is what follows the last "->",
    underscores read as spaces). Label uid = row index; a point keeps its `uid` if it has one.
"""
from __future__ import annotations

import shutil
import stat
import tarfile
import zipfile
from pathlib import Path, PurePosixPath
from typing import Iterator

import numpy as np
import scipy.sparse as sp

from dexml.data.dataset import (
    FILTER_FILES,
    LABEL_FILE,
    SPLIT_FILES,
    _write_jsonl_gz,
    iter_jsonl,
)
from dexml.errors import DataError

LF_FILES = (SPLIT_FILES["trn"], SPLIT_FILES["tst"], LABEL_FILE)
EURLEX_TEXTS = ("train_raw_texts.txt", "test_raw_texts.txt", "label_map.txt")
EURLEX_BOW = ("train.txt", "test.txt")
EURLEX_NPZ = ("Y.trn.npz", "Y.tst.npz")
WIKIPEDIA_FILES = ("trn.raw.json.gz", "tst.raw.json.gz", "Yf.txt")


# --- locating and extracting ------------------------------------------------------------

def find_root(src: Path, required: tuple[str, ...]) -> Path:
    """The directory holding all `required` files: `src` itself or its single subdirectory."""
    src = Path(src)
    if not src.is_dir():
        raise DataError(f"{src}: expected a directory holding {', '.join(required)}")
    if all((src / f).is_file() for f in required):
        return src
    subdirs = sorted(p for p in src.iterdir() if p.is_dir() and not p.name.startswith((".", "__MACOSX")))
    complete = [d for d in subdirs if all((d / f).is_file() for f in required)]
    if len(complete) == 1:
        return complete[0]
    if complete:  # never guess which one was meant
        raise DataError(f"{src}: {len(complete)} subdirectories hold a dataset ({', '.join(d.name for d in complete)}); "
                        f"expected one: point dataset.path at the one you mean")
    candidates = [src] + subdirs
    best = max(candidates, key=lambda d: sum((d / f).is_file() for f in required))
    missing = [f for f in required if not (best / f).is_file()]
    raise DataError(f"{best}: missing {', '.join(missing)} (expected {', '.join(required)} at the "
                    f"top level or in a single subdirectory)")


def is_archive(path: Path) -> bool:
    return zipfile.is_zipfile(path) or tarfile.is_tarfile(path)


# Leading bytes of the archive formats (and the compressions tarfile opens), to tell a truncated
# or corrupt archive from a file that is no archive at all.
_MAGIC = ((b"PK\x03\x04", "zip"), (b"PK\x05\x06", "zip"), (b"\x1f\x8b", "gzip"), (b"BZh", "bzip2"),
          (b"\xfd7zXZ\x00", "xz"))


def check_archive(path: Path) -> None:
    """DataError unless `path` is a complete zip or tar archive, naming which problem it has."""
    if is_archive(path):
        return
    with open(path, "rb") as f:
        head = f.read(512)
    kind = next((name for magic, name in _MAGIC if head.startswith(magic)), None)
    if kind is None and head[257:262] == b"ustar":
        kind = "tar"
    if kind is not None:
        raise DataError(f"{path}: a truncated or corrupt {kind} archive ({path.stat().st_size} bytes)")
    raise DataError(f"{path}: not a zip or tar archive (expected .zip, .tar.gz or .tar)")


def safe_extract(archive: Path, target: Path) -> None:
    """Unpack a zip or tar(.gz) into `target`, refusing any member that could write outside it.

    Refused: absolute paths, `..` components, symbolic and hard links, device files and FIFOs.
    Every member is checked before anything is written.
    """
    archive, target = Path(archive), Path(target)
    target.mkdir(parents=True, exist_ok=True)
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            infos = zf.infolist()
            for info in infos:
                _check_member_name(archive, info.filename)
                kind = stat.S_IFMT(info.external_attr >> 16)  # 0 when the zip records no Unix type
                if kind == stat.S_IFLNK:
                    _refuse(archive, info.filename, "is a symbolic link")
                if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
                    _refuse(archive, info.filename, "is not a regular file or directory")
            try:
                zf.extractall(target, members=infos)
            except (zipfile.BadZipFile, OSError, EOFError) as e:
                raise DataError(f"{archive}: cannot extract ({e})") from None
    elif tarfile.is_tarfile(archive):
        try:
            with tarfile.open(archive) as tf:
                members = tf.getmembers()
                for m in members:
                    _check_member_name(archive, m.name)
                    if m.issym() or m.islnk():
                        _refuse(archive, m.name, f"is a {'symbolic' if m.issym() else 'hard'} link")
                    if not (m.isfile() or m.isdir()):
                        _refuse(archive, m.name, "is a device file or FIFO")
                # The "data" filter re-checks the same (and drops permission bits) where available.
                kwargs = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
                tf.extractall(target, members=members, **kwargs)
        except (tarfile.TarError, OSError, EOFError) as e:
            raise DataError(f"{archive}: cannot extract ({e})") from None
    else:
        raise DataError(f"{archive}: not a zip or tar archive (expected .zip, .tar.gz or .tar)")


def _check_member_name(archive: Path, name: str) -> None:
    p = PurePosixPath(name.replace("\\", "/"))
    if p.is_absolute() or (p.parts and p.parts[0].endswith(":")):
        _refuse(archive, name, "has an absolute path")
    if ".." in p.parts:
        _refuse(archive, name, "escapes the target directory (`..`)")


def _refuse(archive: Path, member: str, why: str) -> None:
    raise DataError(f"{archive}: archive member {member!r} {why}; refusing to extract the archive")


# --- LF layout (copy) -------------------------------------------------------------------

def copy_lf(src: Path, out: Path) -> None:
    """Copy an LF-layout dataset; absent filter files become empty ones."""
    root = find_root(src, LF_FILES)
    for name in LF_FILES:
        shutil.copyfile(root / name, Path(out) / name)
    _copy_filters(root, out)


def _copy_filters(root: Path, out: Path) -> None:
    for name in FILTER_FILES.values():
        if (root / name).is_file():
            shutil.copyfile(root / name, Path(out) / name)
        else:
            (Path(out) / name).write_text("")


# --- EURLex-4K --------------------------------------------------------------------------

def convert_eurlex(src: Path, out: Path) -> None:
    root = find_root(Path(src), EURLEX_TEXTS)
    if all((root / f).is_file() for f in EURLEX_BOW):
        label_files = EURLEX_BOW
    elif all((root / f).is_file() for f in EURLEX_NPZ):
        label_files = EURLEX_NPZ
    else:
        raise DataError(f"{root}: no label files; expected {' and '.join(EURLEX_BOW)} (BoW) "
                        f"or {' and '.join(EURLEX_NPZ)}")
    label_names = list(_text_lines(root / "label_map.txt"))
    num_labels = len(label_names)
    _write_jsonl_gz(Path(out) / LABEL_FILE, (
        {"uid": str(i), "title": name} for i, name in enumerate(label_names)))
    for side, texts_name, labels_name in (("trn", EURLEX_TEXTS[0], label_files[0]),
                                          ("tst", EURLEX_TEXTS[1], label_files[1])):
        texts = list(_text_lines(root / texts_name))
        if label_files is EURLEX_BOW:
            targets = _read_bow_labels(root / labels_name, num_labels)
        else:
            targets = _read_npz_labels(root / labels_name, num_labels)
        if len(targets) != len(texts):
            raise DataError(f"{root / texts_name} has {len(texts)} lines but {root / labels_name} "
                            f"has {len(targets)} rows; expected one label row per text")
        _write_jsonl_gz(Path(out) / SPLIT_FILES[side], (
            {"uid": str(i), "title": text, "target_ind": inds, "target_rel": rels}
            for i, (text, (inds, rels)) in enumerate(zip(texts, targets))))
    _copy_filters(root, out)


def _text_lines(path: Path) -> Iterator[str]:
    # Binary read split on b"\n" only: a stray "\r" inside a document must not shift the rows.
    with open(path, "rb") as f:
        for raw in f:
            yield raw.decode("utf-8", errors="replace").rstrip("\r\n").strip()


def _read_bow_labels(path: Path, num_labels: int) -> list[tuple[list[int], list[float]]]:
    """Label columns of a BoW file: header "points features labels", then "l1,l2 f:v ..." rows."""
    with open(path, "rb") as f:
        header = f.readline().decode("utf-8", errors="replace").split()
        if len(header) != 3 or not all(h.isdigit() for h in header):
            raise DataError(f"{path}, line 1: expected a header `points features labels`, "
                            f"got {' '.join(header)!r}")
        declared_points, declared_labels = int(header[0]), int(header[2])
        if declared_labels != num_labels:
            raise DataError(f"{path}, line 1: header declares {declared_labels} labels but "
                            f"label_map.txt has {num_labels}")
        rows = []
        for lineno, raw in enumerate(f, 2):
            line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
            first = line.split(" ", 1)[0]
            if not first or ":" in first:  # a row without labels starts with a feature (or a space)
                rows.append(([], []))
                continue
            try:
                inds = [int(x) for x in first.split(",")]
            except ValueError:
                raise DataError(f"{path}, line {lineno}: expected comma-separated label ids before "
                                f"the features, got {first!r}") from None
            rows.append((inds, [1.0] * len(inds)))
    if len(rows) != declared_points:
        raise DataError(f"{path}: header declares {declared_points} points but the file has {len(rows)} rows")
    return rows


def _read_npz_labels(path: Path, num_labels: int) -> list[tuple[list[int], list[float]]]:
    try:
        y = sp.load_npz(path).tocsr()  # scipy loads these with allow_pickle=False
    except (OSError, ValueError, KeyError) as e:
        raise DataError(f"{path}: cannot read as a scipy sparse .npz matrix ({e})") from None
    if y.shape[1] != num_labels:
        raise DataError(f"{path}: {y.shape[1]} label columns but label_map.txt has {num_labels} labels")
    y.sort_indices()
    return [(y.indices[y.indptr[i]:y.indptr[i + 1]].tolist(),
             y.data[y.indptr[i]:y.indptr[i + 1]].astype(np.float64).tolist())
            for i in range(y.shape[0])]


# --- LF-Wikipedia-500K (raw) ------------------------------------------------------------

def convert_wikipedia(src: Path, out: Path) -> None:
    root = find_root(Path(src), WIKIPEDIA_FILES)
    _write_jsonl_gz(Path(out) / LABEL_FILE, (
        {"uid": str(i), "title": name}
        for i, name in enumerate(wikipedia_label_name(line) for line in _text_lines(root / "Yf.txt"))))
    for side, name in (("trn", WIKIPEDIA_FILES[0]), ("tst", WIKIPEDIA_FILES[1])):
        _write_jsonl_gz(Path(out) / SPLIT_FILES[side], _raw_points(root / name))
    _copy_filters(root, out)


def wikipedia_label_name(line: str) -> str:
    """`Category->Living_people` -> `Living people` (the text after the last "->")."""
    return line.rsplit("->", 1)[-1].replace("_", " ").strip()


def _raw_points(path: Path) -> Iterator[dict]:
    """Canonical rows from raw JSON lines; checked just enough to convert (validate does the rest)."""
    row = 0
    for lineno, obj in iter_jsonl(path):
        if "title" not in obj or "target_ind" not in obj:
            raise DataError(f"{path}, line {lineno}: expected a JSON object with `title` and `target_ind`")
        out = {"uid": str(obj.get("uid", row)), "title": obj["title"]}
        if obj.get("content"):
            out["content"] = obj["content"]
        out["target_ind"] = obj["target_ind"]
        if "target_rel" in obj:
            out["target_rel"] = obj["target_rel"]
        row += 1
        yield out
