"""The canonical dataset reader/writer, the synthetic generator and params errors."""
from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from dexml.config import SyntheticParams, load_params, parse_params
from dexml.data.dataset import (
    LabelSet,
    Split,
    XMCDataset,
    read_dataset,
    read_filter,
    write_dataset,
)
from dexml.data.synthetic import generate
from dexml.errors import ConfigError, DataError


def small_dataset() -> XMCDataset:
    y_trn = sp.csr_matrix(np.array([[1, 0, 0.5], [0, 0, 0], [0, 2, 0]], np.float32))
    y_tst = sp.csr_matrix(np.array([[0, 1, 0]], np.float32))
    return XMCDataset(
        trn=Split(["a", "b", "c"], ["first", "second", "third"], ["", "body text", ""], y_trn),
        tst=Split(["x"], ["query"], [""], y_tst),
        lbl=LabelSet(["L0", "L1", "L2"], ["zero", "one", "two"], ["", "label one", ""]),
        filter_trn=np.array([[0, 1]], np.int64), filter_tst=np.zeros((0, 2), np.int64),
        name="small", propensity=(0.6, 2.6))


def test_write_then_read_round_trips_everything(tmp_path):
    ds = small_dataset()
    write_dataset(ds, tmp_path / "d")
    back = read_dataset(tmp_path / "d")
    assert back.trn.uids == ds.trn.uids and back.trn.contents == ds.trn.contents
    assert back.lbl.contents == ds.lbl.contents and back.tst.titles == ["query"]
    assert (back.trn.labels != ds.trn.labels).nnz == 0  # relevance values included
    assert back.filter_trn.tolist() == [[0, 1]] and back.filter_tst.shape == (0, 2)
    assert back.name == "small" and back.propensity == (0.6, 2.6)
    assert back.trn.texts("title+content")[1] == "second. body text"
    assert back.trn.texts("title")[1] == "second"


def test_write_is_byte_identical_on_rerun_and_atomic(tmp_path):
    write_dataset(small_dataset(), tmp_path / "a")
    write_dataset(small_dataset(), tmp_path / "b")
    for name in ("trn.json.gz", "tst.json.gz", "lbl.json.gz"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    broken = small_dataset()
    broken.tst.labels = None  # makes the writer fail half-way
    before = (tmp_path / "a" / "trn.json.gz").read_bytes()
    with pytest.raises(AttributeError):
        write_dataset(broken, tmp_path / "a")
    assert (tmp_path / "a" / "trn.json.gz").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]  # no temporary left behind


def write_lines(path, rows):
    with gzip.open(path, "wt") as f:
        f.write("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


@pytest.mark.parametrize("trn,expected", [
    ([{"uid": "a", "title": "t", "target_ind": [5]}],
     r'trn.json.gz, line 1: fails "target_ind a list of integers in \[0, 2\) without duplicates" \(got `target_ind` = \[5\]\)'),
    ([{"uid": "a", "title": "t", "target_ind": [0]}, "{oops"], r"trn.json.gz, line 2: malformed JSON"),
    ([{"uid": "a", "target_ind": [0]}], r'trn.json.gz, line 1: fails "title a non-empty string" \(got no `title`\)'),
    ([{"uid": "a", "title": "t", "target_ind": [0, 1], "target_rel": [1.0]}],
     r'trn.json.gz, line 1: fails "target_rel \(if present\) positive numbers, as many as target_ind" '
     r"\(got `target_rel` = \[1.0\]\)"),
    ([{"uid": "a", "title": "t", "target_ind": 1}], r"trn.json.gz, line 1: fails \"target_ind a list.* \(got `target_ind` = 1\)"),
])
def test_reader_names_file_and_line(tmp_path, trn, expected):
    write_lines(tmp_path / "lbl.json.gz", [{"uid": "L0", "title": "x"}, {"uid": "L1", "title": "y"}])
    write_lines(tmp_path / "trn.json.gz", trn)
    write_lines(tmp_path / "tst.json.gz", [{"uid": "q", "title": "t", "target_ind": []}])
    with pytest.raises(DataError, match=expected):
        read_dataset(tmp_path)


def test_filter_reader_checks_ranges(tmp_path):
    (tmp_path / "f.txt").write_text("0 1\n\n2 0\n")
    assert read_filter(tmp_path / "f.txt", 3, 2).tolist() == [[0, 1], [2, 0]]
    assert read_filter(tmp_path / "absent.txt").shape == (0, 2)
    with pytest.raises(DataError, match=r"f.txt, line 3: row 2 out of range \[0, 2\)"):
        read_filter(tmp_path / "f.txt", 2, 2)
    (tmp_path / "g.txt").write_text("0 one\n")
    with pytest.raises(DataError, match=r"g.txt, line 1: expected two integers"):
        read_filter(tmp_path / "g.txt")


def test_read_dataset_reports_bad_meta(tmp_path):
    write_dataset(small_dataset(), tmp_path / "d")
    (tmp_path / "d" / "dataset.json").write_text("{not json")
    with pytest.raises(DataError, match=r"dataset.json: not valid JSON"):
        read_dataset(tmp_path / "d")
    with pytest.raises(DataError, match=r"dataset directory .*missing not found"):
        read_dataset(tmp_path / "missing")


def test_synthetic_generator_is_deterministic_and_well_formed():
    p = SyntheticParams(num_labels=30, num_train=200, num_test=50, seed=3)
    a, b = generate(p), generate(p)
    assert a.trn.titles == b.trn.titles and a.lbl.contents == b.lbl.contents
    assert (a.trn.labels != b.trn.labels).nnz == 0
    c = generate(SyntheticParams(num_labels=30, num_train=200, num_test=50, seed=4))
    assert c.trn.titles != a.trn.titles
    assert a.trn.labels.shape == (200, 30) and a.tst.labels.shape == (50, 30)
    per_row = np.diff(a.trn.labels.indptr)
    assert per_row.min() >= 1 and 1.5 < per_row.mean() < 3.5  # mean near labels_per_point=2.5
    assert len(set(a.trn.uids)) == 200 and len(set(a.lbl.uids)) == 30
    freq = np.asarray(a.trn.labels.sum(0)).ravel()
    assert freq.max() > 5 * np.median(freq)  # a head and a long tail
    # A label's title is a prefix of its content (content-only words must be learned).
    assert all(ct.startswith(t) and len(ct) > len(t) for t, ct in zip(a.lbl.titles, a.lbl.contents))


@pytest.mark.parametrize("raw,expected", [
    ({"dataset": {"sorce": "x"}}, r"unknown params key\(s\) `dataset.sorce` in `dataset`"),
    ({"dataset": {"source": "local"}}, r"`dataset.path`: expected a directory or archive path"),
    ({"dataset": {"source": "url", "url": "ftp://x"}}, r"`dataset.url`: expected an http\(s\) URL"),
    ({"dataset": {"synthetic": {"num_labels": 0}}}, r"`dataset.synthetic.num_labels`: expected a positive integer"),
    ({"dataset": {"propensity_a": "high"}}, r"`dataset.propensity_a`: expected a number"),
    ({"dataset": {"sha256": "xyz"}}, r"`dataset.sha256`: expected 64 hexadecimal digits"),
    ({"data": {"query_text": "body"}}, r"`data.query_text`: expected one of \['title', 'title\+content'\]"),
    ({"data": {"dir": 3}}, r"`data.dir`: expected a string"),
])
def test_params_errors_name_the_key(raw, expected):
    with pytest.raises(ConfigError, match=expected):
        parse_params(raw)


def test_load_params_applies_dotted_overrides(tmp_path):
    (tmp_path / "p.yaml").write_text("dataset:\n  source: synthetic\ndata:\n  dir: data/x\n")
    p = load_params(tmp_path / "p.yaml", {"dataset.synthetic.seed": 7, "data.dir": "data/y"})
    assert p.dataset.synthetic.seed == 7 and p.data.dir == "data/y"
    with pytest.raises(ConfigError, match=r"p.yaml: unknown params key\(s\) `data.nope`"):
        load_params(tmp_path / "p.yaml", {"data.nope": 1})


def test_params_yaml_and_the_dataclass_defaults_agree():
    """One source of truth: every key in params.yaml holds the dataclass default, and every
    dataclass field is in params.yaml (so a default changed in one place fails here)."""
    import yaml

    from dexml.config import Params

    raw = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
    defaults = Params().to_dict()
    differences = []

    def walk(written, default, prefix=""):
        for key in sorted(set(written) | set(default)):
            where = f"{prefix}{key}"
            if key not in written or key not in default:
                differences.append(f"{where}: only in {'the dataclass' if key in default else 'params.yaml'}")
            elif isinstance(default[key], dict) and where != "flow.guarded":
                walk(written[key], default[key], where + ".")
            elif written[key] != default[key]:
                differences.append(f"{where}: params.yaml {written[key]!r}, dataclass {default[key]!r}")

    walk(raw, defaults)
    assert not differences, differences
