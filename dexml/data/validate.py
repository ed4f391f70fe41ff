"""The `validate` stage: a great-expectations suite over the canonical dataset, and its statistics.

Each JSON-lines file is parsed line by line (malformed lines are collected with their line
numbers), then turned into a pandas frame with one row per line and a `line` column. The row
checks are dexml/data/dataset.py's predicates (the same the strict reader applies, so the
reader never accepts what this suite rejects), precomputed as boolean columns that the suite
expects to be true; uniqueness and row counts are great-expectations' own. Every
problem is collected, not just the first: the full report goes to reports/validation.json and
a failure raises one DataError naming file, lines, field and expectation. Only a dataset that
passes gets its statistics written to metrics/data.json (DVC metrics), so a failed run leaves
the previous statistics in place. Rows without labels are legal (the repository's own
evaluation keeps them) and counted.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dexml import fileio
from dexml.data import dataset as checks
from dexml.data.dataset import FILTER_FILES, LABEL_FILE, SPLIT_FILES
from dexml.errors import DataError
from dexml.paths import DATA_METRICS, VALIDATION_REPORT

SHOW_LINES = 5  # line numbers quoted in the error message (the report keeps up to REPORT_LINES)
REPORT_LINES = 1000
QUANTILES = (0.5, 0.9, 0.99)


@dataclass
class Check:
    """One failed check: `count` rows/lines of `file` break `expected`."""

    file: str
    expected: str
    count: int
    lines: list[int]

    def message(self) -> str:
        if not self.lines:  # a file-level check (readable, not empty)
            return f'{self.file}: fails "{self.expected}"'
        shown = ", ".join(map(str, self.lines[:SHOW_LINES])) + (", ..." if self.count > SHOW_LINES else "")
        rows = "row fails" if self.count == 1 else "rows fail"
        return f'{self.file}: {self.count} {rows} "{self.expected}" (line{"s" if self.count > 1 else ""} {shown})'


@dataclass
class FileResult:
    path: str
    lines: int = 0  # non-blank lines: the row count downstream readers see
    malformed: list[int] = field(default_factory=list)
    read_error: str | None = None
    checks: list[dict] = field(default_factory=list)  # every expectation, passed or not


# --- parsing -----------------------------------------------------------------------------

def _objects(path: Path, res: FileResult):
    """Yield (line number, object) of a gzipped JSON-lines file; record what cannot be read."""
    if not path.is_file():
        res.read_error = "file not found"
        return
    try:
        for lineno, raw in fileio.iter_gz_lines(path):
            res.lines += 1
            try:
                obj = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                obj = None
            if isinstance(obj, dict):
                yield lineno, obj
            else:
                res.malformed.append(lineno)
    except (OSError, EOFError) as e:
        res.read_error = f"cannot read as gzipped JSON lines ({e})"


def _scan(path: Path, res: FileResult, num_labels: int | None = None):
    """The frame of a labels file (num_labels None) or a split, built while streaming: row
    objects are not kept (files can be GBs). For a split, also the training count per label."""
    import pandas as pd

    cols = {"line": [], "uid": [], "title_ok": [], "text_ok": []}
    if num_labels is not None:
        cols.update(target_ind_ok=[], target_rel_ok=[], num_targets=[])
    counts = np.zeros(num_labels or 0, np.int64)
    pending: list[int] = []  # valid label ids, folded into `counts` in blocks
    for lineno, obj in _objects(path, res):
        uid, title = obj.get("uid"), obj.get("title")
        cols["line"].append(lineno)
        cols["uid"].append(str(uid) if checks.uid_ok(uid) else None)
        cols["title_ok"].append(checks.title_ok(title))
        cols["text_ok"].append(checks.text_ok(title, obj.get("content")))
        if num_labels is not None:
            inds = obj.get("target_ind")
            good = checks.target_ind_ok(inds, num_labels)
            cols["target_ind_ok"].append(good)
            cols["target_rel_ok"].append(checks.target_rel_ok(obj.get("target_rel"), inds))
            cols["num_targets"].append(len(inds) if good else 0)
            if good:
                pending.extend(inds)
                if len(pending) > 1 << 20:
                    counts += np.bincount(pending, minlength=num_labels)
                    pending.clear()
    if pending:
        counts += np.bincount(pending, minlength=num_labels)
    return pd.DataFrame(cols), counts


def _filter_frame(path: Path, res: FileResult, num_rows: int, num_labels: int):
    import pandas as pd

    lines, parsed, row_ok, label_ok = [], [], [], []
    if path.is_file():
        for lineno, text in enumerate(path.read_bytes().decode("utf-8", errors="replace").splitlines(), 1):
            if not text.strip():
                continue
            res.lines += 1
            row, label = checks.parse_filter_line(text) or (None, None)
            lines.append(lineno)
            parsed.append(row is not None)
            # An unparsed line fails only the parse check.
            row_ok.append(row is None or 0 <= row < num_rows)
            label_ok.append(label is None or 0 <= label < num_labels)
    return pd.DataFrame({"line": lines, "parsed": parsed, "row_ok": row_ok, "label_ok": label_ok})


# --- the suite ---------------------------------------------------------------------------

def _expectations(kind: str, num_labels: int, num_rows: int):
    """(human description, expectation) pairs for one file kind."""
    import great_expectations.expectations as gxe

    def true(column: str):
        return gxe.ExpectColumnValuesToBeInSet(column=column, value_set=[True])

    text = [
        (checks.EXPECT_UID, gxe.ExpectColumnValuesToNotBeNull(column="uid")),
        (checks.EXPECT_UNIQUE, gxe.ExpectColumnValuesToBeUnique(column="uid")),
        (checks.EXPECT_TITLE, true("title_ok")),
        (checks.EXPECT_TEXT, true("text_ok")),
    ]
    if kind == "lbl":
        return [(checks.EXPECT_LABELS, gxe.ExpectTableRowCountToBeBetween(min_value=1))] + text
    if kind == "split":
        return [(checks.EXPECT_ROWS, gxe.ExpectTableRowCountToBeBetween(min_value=1))] + text + [
            (checks.expect_target_ind(num_labels), true("target_ind_ok")),
            (checks.EXPECT_TARGET_REL, true("target_rel_ok")),
        ]
    return [  # filter file
        (checks.EXPECT_FILTER_LINE, true("parsed")),
        (f"filter row in [0, {num_rows})", gxe.ExpectColumnValuesToBeInSet(column="row_ok", value_set=[True])),
        (f"filter label in [0, {num_labels})",
         gxe.ExpectColumnValuesToBeInSet(column="label_ok", value_set=[True])),
    ]


class _Suite:
    """An ephemeral great-expectations context; one suite and validation per file."""

    def __init__(self):
        os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
        import great_expectations as gx

        self.gx = gx
        self.ctx = gx.get_context(mode="ephemeral")
        self.ctx.variables.progress_bars = {"globally": False}
        self.source = self.ctx.data_sources.add_pandas("dexml")

    def run(self, name: str, frame, expectations, res: FileResult, failures: list[Check]) -> None:
        gx = self.gx
        batch = self.source.add_dataframe_asset(name).add_batch_definition_whole_dataframe("all")
        suite = self.ctx.suites.add(gx.ExpectationSuite(name=name))
        for desc, exp in expectations:
            exp.meta = {"expected": desc}
            suite.add_expectation(exp)
        vd = self.ctx.validation_definitions.add(gx.ValidationDefinition(name=name, data=batch, suite=suite))
        result = vd.run(batch_parameters={"dataframe": frame}, result_format={
            "result_format": "COMPLETE", "unexpected_index_column_names": ["line"],
            "return_unexpected_index_query": False})
        for r in result.results:
            desc = r.expectation_config.meta["expected"]
            out = r.result or {}
            lines = sorted(int(x["line"]) for x in out.get("unexpected_index_list") or [])
            count = int(out.get("unexpected_count") or 0)
            if not r.success and count == 0:  # a table-level expectation (row count)
                count = 1
            res.checks.append({"expected": desc, "expectation": r.expectation_config.type,
                               "success": bool(r.success), "unexpected_count": count,
                               "unexpected_lines": lines[:REPORT_LINES]})
            if not r.success:
                failures.append(Check(res.path, desc, count, lines))


# --- the stage ---------------------------------------------------------------------------

def validate_dataset(root: str | Path, report_path: str | Path = VALIDATION_REPORT,
                     metrics_path: str | Path = DATA_METRICS) -> dict:
    """Check the dataset under `root`; write the report, and on success the statistics.

    Returns the statistics; raises DataError (after writing the report) on any failure.
    """
    root = Path(root)
    fileio.recover_dir(root)  # a download killed mid-swap: its last good dataset goes back
    if not root.is_dir():
        raise DataError(f"dataset directory {root} not found (run the download stage first)")
    suite = _Suite()
    failures: list[Check] = []
    files: dict[str, FileResult] = {}

    def scanned(name: str, num_labels: int | None = None):
        res = files[name] = FileResult(str(root / name))
        frame, counts = _scan(root / name, res, num_labels)
        if res.read_error:
            failures.append(Check(res.path, f"a readable file ({res.read_error})", 1, []))
        if res.malformed:
            failures.append(Check(res.path, "a JSON object per line", len(res.malformed), res.malformed))
        return res, frame, counts

    lbl_res, lbl_frame, _ = scanned(LABEL_FILE)
    num_labels = lbl_res.lines  # a label's index is its position among non-blank lines
    suite.run("lbl", lbl_frame, _expectations("lbl", num_labels, 0), lbl_res, failures)

    split_stats, label_counts = {}, {}
    for side, name in SPLIT_FILES.items():
        res, frame, label_counts[side] = scanned(name, num_labels)
        suite.run(side, frame, _expectations("split", num_labels, 0), res, failures)
        fres = files[FILTER_FILES[side]] = FileResult(str(root / FILTER_FILES[side]))
        filt = _filter_frame(root / FILTER_FILES[side], fres, res.lines, num_labels)
        suite.run(f"filter_{side}", filt, _expectations("filter", num_labels, res.lines), fres, failures)
        split_stats[side] = _split_stats(frame["num_targets"].to_numpy(), label_counts[side], res.lines,
                                         fres.lines)

    stats = {"labels": num_labels, **split_stats, "label_freq": _label_freq(label_counts["trn"])}
    report = {
        "dataset": str(root),
        "success": not failures,
        "num_labels": num_labels,
        "files": {name: {"path": r.path, "lines": r.lines, "read_error": r.read_error,
                         "malformed_lines": {"count": len(r.malformed), "lines": r.malformed[:REPORT_LINES]},
                         "checks": r.checks}
                  for name, r in files.items()},
        "failures": [f.message() for f in failures],
        "stats": stats if not failures else None,
    }
    fileio.write_json(report_path, report)
    if failures:
        raise DataError(f"dataset {root} failed validation ({len(failures)} problem"
                        f"{'s' if len(failures) > 1 else ''}; full report in {report_path}):\n  "
                        + "\n  ".join(f.message() for f in failures))
    fileio.write_json(metrics_path, stats)
    return stats


def _split_stats(sizes: np.ndarray, counts: np.ndarray, num_rows: int, filter_pairs: int) -> dict:
    num_labels = len(counts)
    return {
        "points": int(num_rows),
        "pairs": int(sizes.sum()),
        "labels_per_point": round(float(sizes.mean()), 4) if len(sizes) else 0.0,
        "points_per_label": round(float(sizes.sum() / num_labels), 4) if num_labels else 0.0,
        "empty_rows": int((sizes == 0).sum()),
        "labels_without_points": int((counts == 0).sum()),
        "filter_pairs": int(filter_pairs),
    }


def _label_freq(counts: np.ndarray) -> dict:
    """Quantiles of the number of training points per label (the head/tail shape)."""
    if not len(counts):
        return {}
    out = {f"q{round(q * 100)}": round(float(np.quantile(counts, q)), 2) for q in QUANTILES}
    out["max"] = int(counts.max())
    return out
