"""Converters on small files written in each upstream layout, and safe archive extraction."""
from __future__ import annotations

import gzip
import io
import json
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from dexml.data import formats
from dexml.data.dataset import read_dataset
from dexml.errors import DataError


def write_jsonl_gz(path: Path, rows) -> None:
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")


def write_eurlex(root: Path, labels: str = "bow") -> Path:
    root.mkdir(parents=True)
    (root / "label_map.txt").write_text("agriculture\nfisheries\ncustoms\n")
    (root / "train_raw_texts.txt").write_text("fish quotas in the baltic\ncustoms union\nno label here\n")
    (root / "test_raw_texts.txt").write_text("farm subsidies\n")
    if labels == "bow":
        # header "points features labels"; a row with no labels starts with its features
        (root / "train.txt").write_text("3 10 3\n1,2 0:1.0 4:0.5\n2 3:1\n 1:0.2\n")
        (root / "test.txt").write_text("1 10 3\n0 2:1.0\n")
    else:
        sp.save_npz(root / "Y.trn.npz", sp.csr_matrix(np.array([[0, 1, 1], [0, 0, 2], [0, 0, 0]], np.float32)))
        sp.save_npz(root / "Y.tst.npz", sp.csr_matrix(np.array([[1, 0, 0]], np.float32)))
    return root


@pytest.mark.parametrize("labels", ["bow", "npz"])
def test_eurlex_converts_raw_texts_and_label_rows(tmp_path, labels):
    src = write_eurlex(tmp_path / "src" / "Eurlex-4K", labels)  # in a subdirectory, as the tarball
    out = tmp_path / "out"
    out.mkdir()
    formats.convert_eurlex(tmp_path / "src", out)
    ds = read_dataset(out)
    assert ds.lbl.uids == ["0", "1", "2"] and ds.lbl.titles == ["agriculture", "fisheries", "customs"]
    assert ds.trn.uids == ["0", "1", "2"] and ds.trn.titles[0] == "fish quotas in the baltic"
    assert ds.trn.labels.toarray().astype(bool).tolist() == [[False, True, True], [False, False, True],
                                                             [False, False, False]]
    assert ds.tst.labels.toarray().astype(bool).tolist() == [[True, False, False]]
    assert (out / "filter_labels_test.txt").read_text() == ""
    if labels == "npz":  # relevance values survive
        assert ds.trn.labels[1, 2] == 2.0
    assert src.exists()


def test_eurlex_row_count_mismatch_is_rejected(tmp_path):
    src = write_eurlex(tmp_path / "src")
    (src / "test_raw_texts.txt").write_text("farm subsidies\nextra document\n")
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(DataError, match=r"test_raw_texts.txt has 2 lines but .*test.txt has 1 rows"):
        formats.convert_eurlex(src, out)


def test_eurlex_bad_label_token_names_file_and_line(tmp_path):
    src = write_eurlex(tmp_path / "src")
    (src / "train.txt").write_text("3 10 3\n1,2 0:1.0\n2,x 3:1\n 1:0.2\n")
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(DataError, match=r"train.txt, line 3: expected comma-separated label ids.*'2,x'"):
        formats.convert_eurlex(src, out)


def test_eurlex_without_label_files_says_what_is_expected(tmp_path):
    src = write_eurlex(tmp_path / "src")
    (src / "train.txt").unlink()
    with pytest.raises(DataError, match=r"train.txt and test.txt \(BoW\) or Y.trn.npz and Y.tst.npz"):
        formats.convert_eurlex(src, tmp_path)


def write_wikipedia(root: Path) -> Path:
    root.mkdir(parents=True)
    write_jsonl_gz(root / "trn.raw.json.gz", [
        {"uid": 12, "title": "Anarchism", "content": "Anarchism is a political philosophy.", "target_ind": [0, 2]},
        {"title": "Autism", "content": "", "target_ind": [1]},
    ])
    write_jsonl_gz(root / "tst.raw.json.gz", [{"uid": "a7", "title": "Albedo", "content": "x", "target_ind": []}])
    (root / "Yf.txt").write_text("Category->Political_philosophy\nCategory->Autism\nAnarchism\n")
    return root


def test_wikipedia_converts_raw_json_and_label_names(tmp_path):
    write_wikipedia(tmp_path / "src")
    out = tmp_path / "out"
    out.mkdir()
    formats.convert_wikipedia(tmp_path / "src", out)
    ds = read_dataset(out)
    assert ds.lbl.titles == ["Political philosophy", "Autism", "Anarchism"]
    assert ds.lbl.uids == ["0", "1", "2"]
    assert ds.trn.uids == ["12", "1"]  # its own uid, else the row index
    assert ds.trn.contents[0] == "Anarchism is a political philosophy."
    assert ds.trn.labels.toarray().astype(bool).tolist() == [[True, False, True], [False, True, False]]
    assert ds.tst.uids == ["a7"] and ds.tst.labels.nnz == 0


def test_wikipedia_malformed_line_names_file_and_line(tmp_path):
    src = write_wikipedia(tmp_path / "src")
    write_jsonl_gz(src / "tst.raw.json.gz", [{"title": "ok", "target_ind": [0]}, '{"title": "cut', ])
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(DataError, match=r"tst.raw.json.gz, line 2: malformed JSON"):
        formats.convert_wikipedia(src, out)


def test_copy_lf_finds_a_single_subdirectory_and_names_missing_files(tmp_path):
    root = tmp_path / "src" / "LF-Amazon-131K"
    root.mkdir(parents=True)
    for name in ("trn.json.gz", "tst.json.gz"):
        write_jsonl_gz(root / name, [{"uid": "p", "title": "t", "target_ind": [0]}])
    with pytest.raises(DataError, match=r"missing lbl.json.gz"):
        formats.copy_lf(tmp_path / "src", tmp_path)
    write_jsonl_gz(root / "lbl.json.gz", [{"uid": "l", "title": "label"}])
    (root / "filter_labels_test.txt").write_text("0 0\n")
    out = tmp_path / "out"
    out.mkdir()
    formats.copy_lf(tmp_path / "src", out)
    assert (out / "trn.json.gz").read_bytes() == (root / "trn.json.gz").read_bytes()  # byte copy
    assert (out / "filter_labels_test.txt").read_text() == "0 0\n"
    assert (out / "filter_labels_train.txt").read_text() == ""


# --- safe extraction ---------------------------------------------------------------------

def make_tar(path: Path, members: list[tarfile.TarInfo | tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        for m in members:
            if isinstance(m, tarfile.TarInfo):
                tf.addfile(m)
            else:
                info = tarfile.TarInfo(m[0])
                info.size = len(m[1])
                tf.addfile(info, io.BytesIO(m[1]))
    return path


def tar_special(name: str, kind: bytes, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, linkname
    return info


@pytest.mark.parametrize("bad,why", [
    (("../evil.txt", b"x"), "escapes the target directory"),
    (("data/../../evil.txt", b"x"), "escapes the target directory"),
    (("/tmp/evil.txt", b"x"), "absolute path"),
    (tar_special("data/link", tarfile.SYMTYPE, "/etc/passwd"), "is a symbolic link"),
    (tar_special("data/hard", tarfile.LNKTYPE, "data/ok.txt"), "is a hard link"),
    (tar_special("data/dev", tarfile.CHRTYPE), "device file or FIFO"),
])
def test_tar_members_that_escape_or_link_are_refused(tmp_path, bad, why):
    archive = make_tar(tmp_path / "a.tar.gz", [("data/ok.txt", b"fine"), bad])
    target = tmp_path / "x" / "target"
    with pytest.raises(DataError, match=why) as e:
        formats.safe_extract(archive, target)
    name = bad[0] if isinstance(bad, tuple) else bad.name
    assert repr(name) in str(e.value) and "a.tar.gz" in str(e.value)
    assert not (target / "data" / "ok.txt").exists()  # nothing written: checked before extracting
    assert not (tmp_path / "x" / "evil.txt").exists()


@pytest.mark.parametrize("name,why", [("../evil.txt", "escapes"), ("/abs/evil.txt", "absolute"),
                                      ("link", "symbolic link")])
def test_zip_members_that_escape_or_link_are_refused(tmp_path, name, why):
    archive = tmp_path / "a.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("ok.txt", "fine")
        info = zipfile.ZipInfo(name)
        if why == "symbolic link":
            info.external_attr = (0o120777 << 16)
        zf.writestr(info, "/etc/passwd")
    with pytest.raises(DataError, match=why):
        formats.safe_extract(archive, tmp_path / "t")
    assert not (tmp_path / "t" / "ok.txt").exists()


def test_safe_extract_unpacks_regular_archives(tmp_path):
    archive = make_tar(tmp_path / "a.tgz", [("d/one.txt", b"1"), ("d/sub/two.txt", b"2")])
    formats.safe_extract(archive, tmp_path / "t")
    assert (tmp_path / "t" / "d" / "sub" / "two.txt").read_bytes() == b"2"
    not_archive = tmp_path / "plain.txt"
    not_archive.write_text("hello")
    with pytest.raises(DataError, match="not a zip or tar archive"):
        formats.safe_extract(not_archive, tmp_path / "u")
