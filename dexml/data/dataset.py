"""The canonical dataset: the Extreme Classification Repository's LF layout, in memory and on disk.

On disk (one directory):
    trn.json.gz, tst.json.gz   JSON lines: uid, title, [content], target_ind, [target_rel]
    lbl.json.gz                JSON lines: uid, title, [content]
    filter_labels_train.txt    optional; lines "row label": pairs dropped from predictions
    filter_labels_test.txt
    dataset.json               written by `download`: name and propensity constants (A, B)

In memory: `XMCDataset` with a `Split` per side (texts + a CSR label matrix) and `LabelSet`.

One set of checks (the predicates and their descriptions below) decides what a dataset may
hold, wherever it is read for the first time: this reader (train, index, evaluate) stops at the
first problem, `check_dataset` (what `download` runs before it swaps a dataset in) streams the
same checks, and the `validate` stage's great-expectations suite reports every failing row of
the same predicates. So nothing the validate stage rejects reaches training.
"""
from __future__ import annotations

import gzip
import json
import math
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


# --- the checks (shared with dexml/data/validate.py) -------------------------------------

EXPECT_UID = "uid present (a non-empty string or an integer)"
EXPECT_UNIQUE = "uid unique"
EXPECT_TITLE = "title a non-empty string"
EXPECT_TEXT = "title and content (if present) strings of valid Unicode (no lone surrogates)"
EXPECT_TARGET_REL = "target_rel (if present) positive numbers, as many as target_ind"
EXPECT_LABELS = "at least one label"
EXPECT_ROWS = "at least one row"
EXPECT_FILTER_LINE = 'a line "row label" of two integers'


def expect_target_ind(num_labels: int) -> str:
    return f"target_ind a list of integers in [0, {num_labels}) without duplicates"


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")  # a lone surrogate (JSON "\\udcff") cannot be encoded or tokenized
    except UnicodeEncodeError:
        return False
    return True


def uid_ok(uid) -> bool:
    return (isinstance(uid, str) and uid != "") or _is_int(uid)


def title_ok(title) -> bool:
    return isinstance(title, str) and bool(title.strip())


def text_ok(title, content) -> bool:
    """Title (when a string; `title_ok` judges the rest) and content are encodable text."""
    return ((not isinstance(title, str) or _is_unicode(title))
            and (content is None or (isinstance(content, str) and _is_unicode(content))))


def target_ind_ok(inds, num_labels: int) -> bool:
    return (isinstance(inds, list) and all(_is_int(j) and 0 <= j < num_labels for j in inds)
            and len(set(inds)) == len(inds))


def target_rel_ok(rels, inds) -> bool:
    return rels is None or (
        isinstance(rels, list) and isinstance(inds, list) and len(rels) == len(inds)
        and all(isinstance(r, (int, float)) and not isinstance(r, bool) and math.isfinite(r) and r > 0
                for r in rels))


def row_problem(obj: dict, num_labels: int | None = None) -> tuple[str, str] | None:
    """(field, expectation) of the first check a row fails, None if it passes; num_labels None
    for a label row, else a split row."""
    title, content = obj.get("title"), obj.get("content")
    checks = [("uid", uid_ok(obj.get("uid")), EXPECT_UID),
              ("title", title_ok(title), EXPECT_TITLE),
              ("title" if isinstance(title, str) and not _is_unicode(title) else "content",
               text_ok(title, content), EXPECT_TEXT)]
    if num_labels is not None:
        checks += [("target_ind", target_ind_ok(obj.get("target_ind"), num_labels), expect_target_ind(num_labels)),
                   ("target_rel", target_rel_ok(obj.get("target_rel"), obj.get("target_ind")), EXPECT_TARGET_REL)]
    return next(((name, expected) for name, ok, expected in checks if not ok), None)


def parse_filter_line(text: str) -> tuple[int, int] | None:
    """(row, label) from a filter file's line "row label", None when it is not two integers."""
    parts = text.split()
    try:
        return (int(parts[0]), int(parts[1])) if len(parts) == 2 else None
    except ValueError:
        return None


def checked_rows(path: Path, num_labels: int | None = None) -> Iterator[tuple[int, dict]]:
    """(line number, row) of a labels file (num_labels None) or a split, each row through the
    checks; DataError naming the file, line, field and expectation at the first that fails."""
    seen: dict[str, int] = {}
    for lineno, obj in iter_jsonl(path):
        problem = row_problem(obj, num_labels)
        if problem is not None:
            name, expected = problem
            got = f"`{name}` = {_shown(obj[name])}" if name in obj else f"no `{name}`"
            raise DataError(f'{path}, line {lineno}: fails "{expected}" (got {got})')
        uid = str(obj["uid"])
        if uid in seen:
            raise DataError(f'{path}, line {lineno}: fails "{EXPECT_UNIQUE}" (uid {uid!r} is also on line {seen[uid]})')
        seen[uid] = lineno
        yield lineno, obj
    if not seen:
        raise DataError(f'{path}: fails "{EXPECT_LABELS if num_labels is None else EXPECT_ROWS}" (no rows)')


def _shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def read_labelset(path: Path) -> LabelSet:
    """Labels (uid, title, content) from an lbl.json.gz, in label-index order (checked)."""
    uids, titles, contents = [], [], []
    for _, obj in checked_rows(path):
        uids.append(str(obj["uid"]))
        titles.append(obj["title"])
        contents.append(obj.get("content") or "")
    return LabelSet(uids, titles, contents)


def _read_split(path: Path, num_labels: int) -> Split:
    uids, titles, contents = [], [], []
    indptr, indices, values = [0], [], []
    for _, obj in checked_rows(path, num_labels):
        inds = obj["target_ind"]
        rels = obj.get("target_rel")
        uids.append(str(obj["uid"]))
        titles.append(obj["title"])
        contents.append(obj.get("content") or "")
        indices.extend(inds)
        values.extend([1.0] * len(inds) if rels is None else [float(r) for r in rels])
        indptr.append(len(indices))
    labels = sp.csr_matrix(
        (np.asarray(values, np.float32), np.asarray(indices, np.int64), np.asarray(indptr, np.int64)),
        shape=(len(uids), num_labels),
    )
    labels.sum_duplicates()  # none (the checks refuse them); sorts and marks the matrix canonical
    return Split(uids, titles, contents, labels)


def read_filter(path: Path, num_rows: int | None = None, num_labels: int | None = None) -> np.ndarray:
    """(m, 2) int64 array of (row, label) pairs; empty if the file is absent."""
    path = Path(path)
    if not path.exists():
        return np.zeros((0, 2), np.int64)
    pairs = []
    try:
        text = path.read_bytes().decode("utf-8", errors="replace")
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        pair = parse_filter_line(line)
        if pair is None:
            raise DataError(f"{path}, line {lineno}: expected two integers `row label`, got {line[:80]!r}")
        row, lab = pair
        if num_rows is not None and not 0 <= row < num_rows:
            raise DataError(f"{path}, line {lineno}: row {row} out of range [0, {num_rows})")
        if num_labels is not None and not 0 <= lab < num_labels:
            raise DataError(f"{path}, line {lineno}: label {lab} out of range [0, {num_labels})")
        pairs.append((row, lab))
    return np.asarray(pairs, np.int64).reshape(-1, 2)


def check_dataset(root: str | Path) -> dict:
    """The reader's checks over every file under `root`, streamed (no rows kept but the uids);
    returns {"labels", "trn", "tst"} row counts. What `download` runs before it replaces data.dir."""
    root = Path(root)
    num_labels = sum(1 for _ in checked_rows(root / LABEL_FILE))
    counts = {"labels": num_labels}
    for side, name in SPLIT_FILES.items():
        counts[side] = sum(1 for _ in checked_rows(root / name, num_labels))
        read_filter(root / FILTER_FILES[side], counts[side], num_labels)
    read_meta(root)
    return counts


def read_meta(root: str | Path) -> dict:
    path = Path(root) / META_FILE
    return fileio.read_json(path, DataError) if path.exists() else {}


def read_dataset(root: str | Path) -> XMCDataset:
    root = Path(root)
    fileio.recover_dir(root)  # a download killed mid-swap: its last good dataset goes back
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
