"""The canonical dataset: the Extreme Classification Repository's LF layout, in memory and on disk.

On disk (one directory):
    trn.json.gz, tst.json.gz   JSON lines: uid, title, [content], target_ind, [target_rel]
    lbl.json.gz                JSON lines: uid, title, [content]
    filter_labels_train.txt    optional; lines "row label": pairs dropped from predictions
    filter_labels_test.txt
    dataset.json               written by `download`: name and propensity constants (A, B)

In memory: `XMCDataset` with a `Split` per side (texts + a CSR label matrix) and `LabelSet`.
This reader is strict and stops at the first problem; the `validate` stage reports all of them.
"""
from __future__ import annotations

import gzip
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import scipy.sparse as sp

from dexml import fileio
from dexml.errors import DataError

SPLIT_FILES = {"trn": "trn.json.gz", "tst": "tst.json.gz"}
LABEL_FILE = "lbl.json.gz"
FILTER_FILES = {"trn": "filter_labels_train.txt", "tst": "filter_labels_test.txt"}
META_FILE = "dataset.json"
DEFAULT_PROPENSITY = (0.55, 1.5)


def make_text(title: str, content: str, mode: str) -> str:
    """The string fed to the encoder: title, or title + '. ' + content."""
    if mode == "title" or not content:
        return title
    return f"{title}. {content}"


@dataclass
class LabelSet:
    uids: list[str]
    titles: list[str]
    contents: list[str]

    def __len__(self) -> int:
        return len(self.uids)

    def texts(self, mode: str = "title") -> list[str]:
        return [make_text(t, c, mode) for t, c in zip(self.titles, self.contents)]


@dataclass
class Split(LabelSet):
    labels: sp.csr_matrix = field(default=None)  # (points, labels) float32; value = relevance

    def subset(self, rows: np.ndarray) -> "Split":
        return Split(
            [self.uids[i] for i in rows],
            [self.titles[i] for i in rows],
            [self.contents[i] for i in rows],
            self.labels[rows],
        )


@dataclass
class XMCDataset:
    trn: Split
    tst: Split
    lbl: LabelSet
    filter_trn: np.ndarray  # (m, 2) int64: (row, label) pairs
    filter_tst: np.ndarray
    name: str = "dataset"
    propensity: tuple[float, float] = DEFAULT_PROPENSITY

    @property
    def num_labels(self) -> int:
        return len(self.lbl)


def split_validation(rng: np.random.Generator, num_rows: int, fraction: float,
                     max_points: int) -> tuple[np.ndarray, np.ndarray]:
    """The training rows held out for validation (sorted) and the rest (shuffled).

    The train stage draws this from its seeded generator first; evaluate's RAE tuning redraws it
    from a fresh generator with the same seed, so both see the same held-out rows.
    """
    perm = rng.permutation(num_rows)
    n_val = min(max(1, int(num_rows * fraction)), max_points)
    return np.sort(perm[:n_val]), perm[n_val:]


def iter_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    """Yield (1-based line number, object) from a gzipped JSON-lines file."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found")
    try:
        for lineno, raw in fileio.iter_gz_lines(path):
            try:
                obj = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                raise DataError(f"{path}, line {lineno}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
            except json.JSONDecodeError as e:
                raise DataError(f"{path}, line {lineno}: malformed JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path}, line {lineno}: expected a JSON object, got {type(obj).__name__}")
            yield lineno, obj
    except (OSError, EOFError) as e:
        raise DataError(f"{path}: cannot read as gzipped JSON lines ({e})") from None


def read_labelset(path: Path) -> LabelSet:
    """Labels (uid, title, content) from an lbl.json.gz, in label-index order."""
    uids, titles, contents = [], [], []
    for lineno, obj in iter_jsonl(path):
        if "uid" not in obj or "title" not in obj:
            raise DataError(f"{path}, line {lineno}: expected fields `uid` and `title`")
        uids.append(str(obj["uid"]))
        titles.append(str(obj["title"]))
        contents.append(str(obj.get("content") or ""))
    return LabelSet(uids, titles, contents)


def _read_split(path: Path, num_labels: int) -> Split:
    uids, titles, contents = [], [], []
    indptr, indices, values = [0], [], []
    for lineno, obj in iter_jsonl(path):
        try:
            inds = obj["target_ind"]
            if not isinstance(inds, list):
                raise DataError(f"{path}, line {lineno}: `target_ind` must be a list of label ids, got {inds!r}")
            rels = obj.get("target_rel") or [1.0] * len(inds)
            uids.append(str(obj["uid"]))
            titles.append(str(obj["title"]))
        except KeyError as e:
            raise DataError(f"{path}, line {lineno}: missing field {e}") from None
        if len(rels) != len(inds):
            raise DataError(f"{path}, line {lineno}: `target_rel` has {len(rels)} entries, `target_ind` {len(inds)}")
        for j in inds:
            if not isinstance(j, int) or isinstance(j, bool) or not 0 <= j < num_labels:
                raise DataError(f"{path}, line {lineno}: `target_ind` entry {j!r} is not an integer in [0, {num_labels})")
        contents.append(str(obj.get("content") or ""))
        indices.extend(inds)
        values.extend(float(r) for r in rels)
        indptr.append(len(indices))
    labels = sp.csr_matrix(
        (np.asarray(values, np.float32), np.asarray(indices, np.int64), np.asarray(indptr, np.int64)),
        shape=(len(uids), num_labels),
    )
    labels.sum_duplicates()
    return Split(uids, titles, contents, labels)


def read_filter(path: Path, num_rows: int | None = None, num_labels: int | None = None) -> np.ndarray:
    """(m, 2) int64 array of (row, label) pairs; empty if the file is absent."""
    path = Path(path)
    if not path.exists():
        return np.zeros((0, 2), np.int64)
    pairs = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        try:
            row, lab = (int(x) for x in parts)
        except ValueError:
            raise DataError(f"{path}, line {lineno}: expected two integers `row label`, got {line!r}") from None
        if num_rows is not None and not 0 <= row < num_rows:
            raise DataError(f"{path}, line {lineno}: row {row} out of range [0, {num_rows})")
        if num_labels is not None and not 0 <= lab < num_labels:
            raise DataError(f"{path}, line {lineno}: label {lab} out of range [0, {num_labels})")
        pairs.append((row, lab))
    return np.asarray(pairs, np.int64).reshape(-1, 2)


def read_meta(root: str | Path) -> dict:
    path = Path(root) / META_FILE
    return fileio.read_json(path, DataError) if path.exists() else {}


def read_dataset(root: str | Path) -> XMCDataset:
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"dataset directory {root} not found (run the download stage first)")
    lbl = read_labelset(root / LABEL_FILE)
    trn = _read_split(root / SPLIT_FILES["trn"], len(lbl))
    tst = _read_split(root / SPLIT_FILES["tst"], len(lbl))
    meta = read_meta(root)
    return XMCDataset(
        trn, tst, lbl,
        read_filter(root / FILTER_FILES["trn"], len(trn), len(lbl)),
        read_filter(root / FILTER_FILES["tst"], len(tst), len(lbl)),
        name=meta.get("name", root.name),
        propensity=tuple(meta.get("propensity", DEFAULT_PROPENSITY)),
    )


def _write_jsonl_gz(path: Path, rows: Iterator[dict]) -> None:
    # mtime=0: identical content gives identical bytes, so DVC sees no change on a rerun.
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz:
        for row in rows:
            gz.write((json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8"))


def _split_rows(split: Split) -> Iterator[dict]:
    y = split.labels.tocsr()
    for i, uid in enumerate(split.uids):
        lo, hi = y.indptr[i], y.indptr[i + 1]
        row = {"uid": uid, "title": split.titles[i]}
        if split.contents[i]:
            row["content"] = split.contents[i]
        row["target_ind"] = y.indices[lo:hi].tolist()
        row["target_rel"] = y.data[lo:hi].tolist()
        yield row


def write_dataset_files(ds: XMCDataset, out: Path) -> None:
    """Write the LF layout into an existing directory `out` (no atomicity)."""
    out = Path(out)
    _write_jsonl_gz(out / LABEL_FILE, (
        {"uid": u, "title": t, **({"content": c} if c else {})}
        for u, t, c in zip(ds.lbl.uids, ds.lbl.titles, ds.lbl.contents)))
    for side, fname in SPLIT_FILES.items():
        _write_jsonl_gz(out / fname, _split_rows(getattr(ds, side)))
        pairs = getattr(ds, f"filter_{side}")
        (out / FILTER_FILES[side]).write_text("".join(f"{r} {l}\n" for r, l in pairs))
    (out / META_FILE).write_text(json.dumps(
        {"name": ds.name, "propensity": list(ds.propensity)}, indent=2) + "\n")


def write_dataset(ds: XMCDataset, root: str | Path) -> None:
    """Write the dataset atomically: `root` is replaced as a whole or not at all."""
    with fileio.atomic_dir(root) as tmp:
        write_dataset_files(ds, tmp)
