"""The validate stage: the great-expectations suite on real files, its report and statistics."""
from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dexml.cli import main as cli_main
from dexml.data.validate import validate_dataset
from dexml.errors import DataError

REPO = Path(__file__).resolve().parents[1]

LABELS = [{"uid": f"L{j}", "title": f"label {j}"} for j in range(4)]
TRN = [
    {"uid": "a", "title": "first", "target_ind": [0, 1], "target_rel": [1.0, 0.5]},
    {"uid": "b", "title": "second", "target_ind": [2]},
    {"uid": "c", "title": "third", "content": "more text", "target_ind": [0]},
    {"uid": "d", "title": "fourth", "target_ind": []},  # no label: kept and counted
    {"uid": 5, "title": "fifth", "target_ind": [0, 3]},
]
TST = [{"uid": "x", "title": "one", "target_ind": [1]},
       {"uid": "y", "title": "two", "target_ind": [0, 2]},
       {"uid": "z", "title": "three", "target_ind": [3]}]


def write_lines(path: Path, rows) -> None:
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")


def make_dataset(root: Path, lbl=None, trn=None, tst=None, filter_trn="0 1\n", filter_tst="") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    write_lines(root / "lbl.json.gz", LABELS if lbl is None else lbl)
    write_lines(root / "trn.json.gz", TRN if trn is None else trn)
    write_lines(root / "tst.json.gz", TST if tst is None else tst)
    (root / "filter_labels_train.txt").write_text(filter_trn)
    (root / "filter_labels_test.txt").write_text(filter_tst)
    return root


def replace(rows, i, **fields):
    """A copy of `rows` with row i (0-based; file line i + 1) updated (None deletes a field)."""
    rows = [dict(r) for r in rows]
    rows[i].update(fields)
    rows[i] = {k: v for k, v in rows[i].items() if v is not None}
    return rows


def test_valid_dataset_passes_and_writes_statistics(tmp_path):
    root = make_dataset(tmp_path / "ds")
    stats = validate_dataset(root, tmp_path / "report.json", tmp_path / "metrics.json")
    assert json.loads((tmp_path / "metrics.json").read_text()) == stats
    assert stats["labels"] == 4
    assert stats["trn"] == {"points": 5, "pairs": 6, "labels_per_point": 1.2, "points_per_label": 1.5,
                            "empty_rows": 1, "labels_without_points": 0, "filter_pairs": 1}
    assert stats["tst"]["points"] == 3 and stats["tst"]["empty_rows"] == 0
    assert stats["label_freq"] == {"q50": 1.0, "q90": 2.4, "q99": 2.94, "max": 3}
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["success"] and report["failures"] == []
    assert all(c["success"] for f in report["files"].values() for c in f["checks"])


BAD = [  # (id, dataset overrides, file, expected fragment of the message)
    ("duplicate uid", dict(trn=replace(TRN, 3, uid="b")), "trn.json.gz", '2 rows fail "uid unique" (lines 2, 4)'),
    ("missing uid", dict(tst=replace(TST, 1, uid=None)), "tst.json.gz",
     '1 row fails "uid present (a non-empty string or an integer)" (line 2)'),
    ("empty title", dict(trn=replace(TRN, 2, title="  ")), "trn.json.gz", '1 row fails "title a non-empty string" (line 3)'),
    ("title not a string", dict(trn=replace(TRN, 0, title=None)), "trn.json.gz", '1 row fails "title a non-empty string" (line 1)'),
    ("label out of range", dict(trn=replace(TRN, 1, target_ind=[4])), "trn.json.gz",
     '1 row fails "target_ind a list of integers in [0, 4) without duplicates" (line 2)'),
    ("negative label", dict(tst=replace(TST, 2, target_ind=[-1])), "tst.json.gz", '1 row fails "target_ind a list of integers in [0, 4) without duplicates" (line 3)'),
    ("duplicate in row", dict(trn=replace(TRN, 4, target_ind=[3, 3])), "trn.json.gz",
     '1 row fails "target_ind a list of integers in [0, 4) without duplicates" (line 5)'),
    ("non-integer label", dict(trn=replace(TRN, 1, target_ind=["2"])), "trn.json.gz", '1 row fails "target_ind a list of integers in [0, 4) without duplicates" (line 2)'),
    ("target_ind missing", dict(trn=replace(TRN, 1, target_ind=None)), "trn.json.gz", '1 row fails "target_ind a list of integers in [0, 4) without duplicates" (line 2)'),
    ("negative relevance", dict(trn=replace(TRN, 0, target_rel=[1.0, -0.5])), "trn.json.gz",
     '1 row fails "target_rel (if present) positive numbers, as many as target_ind" (line 1)'),
    ("relevance length", dict(trn=replace(TRN, 0, target_rel=[1.0])), "trn.json.gz",
     '1 row fails "target_rel (if present) positive numbers, as many as target_ind" (line 1)'),
    ("label uid duplicate", dict(lbl=replace(LABELS, 3, uid="L0")), "lbl.json.gz", '2 rows fail "uid unique" (lines 1, 4)'),
    ("label title empty", dict(lbl=replace(LABELS, 1, title="")), "lbl.json.gz", '1 row fails "title a non-empty string" (line 2)'),
    ("malformed JSON", dict(tst=[TST[0], '{"uid": "y", "title": ', TST[2]]), "tst.json.gz",
     '1 row fails "a JSON object per line" (line 2)'),
    ("JSON not an object", dict(trn=TRN[:2] + ["[1, 2]"] + TRN[3:]), "trn.json.gz", '1 row fails "a JSON object per line" (line 3)'),
    ("filter row out of range", dict(filter_tst="0 1\n3 0\n"), "filter_labels_test.txt",
     '1 row fails "filter row in [0, 3)" (line 2)'),
    ("filter label out of range", dict(filter_trn="0 1\n\n1 7\n"), "filter_labels_train.txt",
     '1 row fails "filter label in [0, 4)" (line 3)'),
    ("filter line unparseable", dict(filter_trn="0 x\n"), "filter_labels_train.txt",
     '1 row fails "a line "row label" of two integers" (line 1)'),
    ("empty split", dict(tst=[]), "tst.json.gz", 'fails "at least one row"'),
]


@pytest.mark.parametrize("overrides,file,expected", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_is_rejected_with_file_lines_and_expectation(tmp_path, overrides, file, expected):
    root = make_dataset(tmp_path / "ds", **overrides)
    metrics = tmp_path / "metrics.json"
    metrics.write_text('{"previous": true}\n')
    with pytest.raises(DataError) as e:
        validate_dataset(root, tmp_path / "report.json", metrics)
    msg = str(e.value)
    assert f"{root / file}: {expected}" in msg, msg
    assert "1 problem;" in msg  # this one problem only: no knock-on failures
    assert metrics.read_text() == '{"previous": true}\n'  # statistics untouched
    report = json.loads((tmp_path / "report.json").read_text())
    assert not report["success"] and report["stats"] is None
    assert any(expected in f for f in report["failures"])


def test_many_failures_show_the_first_lines_and_a_count(tmp_path):
    trn = [{"uid": f"p{i}", "title": "t", "target_ind": [9]} for i in range(12)]
    root = make_dataset(tmp_path / "ds", trn=trn, tst=[TST[0], "not json", TST[2]],
                        lbl=replace(LABELS, 0, uid=None))
    with pytest.raises(DataError) as e:
        validate_dataset(root, tmp_path / "report.json", tmp_path / "metrics.json")
    msg = str(e.value)
    assert msg.startswith(f"dataset {root} failed validation (3 problems; full report in {tmp_path / 'report.json'}):")
    assert '12 rows fail "target_ind a list of integers in [0, 4) without duplicates" (lines 1, 2, 3, 4, 5, ...)' in msg
    assert "lbl.json.gz: 1 row fails" in msg and "tst.json.gz: 1 row fails" in msg
    assert not (tmp_path / "metrics.json").exists()
    checks = json.loads((tmp_path / "report.json").read_text())["files"]["trn.json.gz"]["checks"]
    failed = [c for c in checks if not c["success"]]
    assert failed[0]["unexpected_count"] == 12 and failed[0]["unexpected_lines"] == list(range(1, 13))


def test_unreadable_and_missing_files(tmp_path):
    root = make_dataset(tmp_path / "ds")
    (root / "trn.json.gz").write_text("not gzip at all\n")
    (root / "tst.json.gz").unlink()
    with pytest.raises(DataError) as e:
        validate_dataset(root, tmp_path / "r.json", tmp_path / "m.json")
    assert f'{root / "trn.json.gz"}: fails "a readable file (cannot read as gzipped JSON lines' in str(e.value)
    assert f'{root / "tst.json.gz"}: fails "a readable file (file not found)"' in str(e.value)
    with pytest.raises(DataError, match="dataset directory .*nowhere not found"):
        validate_dataset(tmp_path / "nowhere", tmp_path / "r.json", tmp_path / "m.json")


def test_cli_validate_uses_the_stage_paths(tmp_path, monkeypatch, capsys, tiny_dataset_dir):
    monkeypatch.chdir(tmp_path)
    Path("params.yaml").write_text(f"data:\n  dir: {tiny_dataset_dir}\n")
    assert cli_main(["validate"]) == 0
    stats = json.loads(Path("metrics/data.json").read_text())
    assert stats["trn"]["points"] == 400 and stats["labels"] == 40
    assert json.loads(Path("reports/validation.json").read_text())["success"]
    bad = make_dataset(tmp_path / "bad", trn=replace(TRN, 1, target_ind=[4]))
    assert cli_main(["validate", "-S", f"data.dir={bad}"]) == 1
    err = capsys.readouterr().err
    assert "dexml validate: error: dataset" in err and "trn.json.gz: 1 row fails" in err
    assert json.loads(Path("metrics/data.json").read_text()) == stats  # the last good statistics


@pytest.mark.slow
def test_dvc_repro_validate_in_a_temporary_clone(tmp_path):
    """download -> validate through DVC in a fresh repository; then bad data stops the pipeline."""
    clone = tmp_path / "repo"
    clone.mkdir()
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(REPO / name, clone / name)
    for name in ("stages", "dexml"):
        shutil.copytree(REPO / name, clone / name, ignore=shutil.ignore_patterns("__pycache__"))
    params = (clone / "params.yaml").read_text()
    for key, value in (("num_labels", 30), ("num_train", 200), ("num_test", 50)):
        params = re.sub(rf"(?m)^(\s+{key}:) \d+", rf"\g<1> {value}", params)
    (clone / "params.yaml").write_text(params)
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "DVC_SITE_CACHE_DIR": str(tmp_path / "dvc-site"),
           "GX_ANALYTICS_ENABLED": "False", "PYTHONPATH": str(clone),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com"}

    def run(*cmd):
        return subprocess.run(list(cmd), cwd=clone, env=env, capture_output=True, text=True, timeout=300)

    assert run("git", "init", "-q").returncode == 0
    assert run(sys.executable, "-m", "dvc", "init", "-q").returncode == 0
    r = run(sys.executable, "-m", "dvc", "repro", "validate")
    assert r.returncode == 0, r.stdout + r.stderr
    stats = json.loads((clone / "metrics" / "data.json").read_text())
    assert stats["trn"]["points"] == 200 and stats["labels"] == 30
    assert json.loads((clone / "data" / "dataset" / "dataset.json").read_text())["name"] == "synthetic"
    shown = run(sys.executable, "-m", "dvc", "metrics", "show", "--json")
    assert shown.returncode == 0 and '"trn"' in shown.stdout and '"points": 200' in shown.stdout

    def use_local(path):
        (clone / "params.yaml").write_text(params.replace("source: synthetic", "source: local")
                                           .replace("path: null", f"path: {path}"))

    before = (clone / "data" / "dataset" / "trn.json.gz").read_bytes()
    incomplete = make_dataset(tmp_path / "incomplete")
    (incomplete / "lbl.json.gz").unlink()
    use_local(incomplete)  # a failed download keeps the last good dataset (persist + atomic swap)
    r = run(sys.executable, "-m", "dvc", "repro", "validate")
    assert r.returncode != 0 and "missing lbl.json.gz" in r.stdout + r.stderr
    assert (clone / "data" / "dataset" / "trn.json.gz").read_bytes() == before

    # A dataset that fails a check stops at download (it checks before it swaps the new data
    # in): the last good dataset and the statistics describing it stay.
    use_local(make_dataset(tmp_path / "bad", trn=replace(TRN, 1, target_ind=[4])))
    r = run(sys.executable, "-m", "dvc", "repro", "validate")
    assert r.returncode != 0
    assert 'trn.json.gz, line 2: fails "target_ind a list of integers in [0, 4) without duplicates"' \
        in r.stdout + r.stderr
    assert (clone / "data" / "dataset" / "trn.json.gz").read_bytes() == before
    assert json.loads((clone / "metrics" / "data.json").read_text()) == stats
    assert json.loads((clone / "reports" / "validation.json").read_text())["success"] is True
