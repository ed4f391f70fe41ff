"""The download stage: every source, against real files and a local HTTP server (127.0.0.1)."""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from test_formats import write_eurlex, write_jsonl_gz

from dexml.cli import main as cli_main
from dexml.config import parse_params
from dexml.data import download, formats
from dexml.data.dataset import read_dataset
from dexml.errors import EXIT_TRANSIENT, ConfigError, DataError, TransientError


class Server:
    """Serves `files` (path -> bytes) with Range support; `cut[path]` = number of responses to
    break off halfway through the body (an interrupted transfer)."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.cut: dict[str, int] = {}
        self.ranges = True  # False: ignore Range headers, like servers without resume support
        self.requests: list[tuple[str, str | None]] = []  # (path, Range header)
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                server.requests.append((self.path, self.headers.get("Range")))
                body = server.files.get(self.path.split("?")[0])
                if body is None:
                    self.send_error(404)
                    return
                start, status = 0, 200
                rng = self.headers.get("Range") if server.ranges else None
                if rng:
                    start = int(rng.removeprefix("bytes=").split("-")[0])
                    if start >= len(body):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(body)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    status = 206
                part = body[start:]
                self.send_response(status)
                self.send_header("Content-Length", str(len(part)))
                if status == 206:
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                self.end_headers()
                if server.cut.get(self.path, 0) > 0:
                    server.cut[self.path] -= 1
                    self.wfile.write(part[: len(part) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(part)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()


@pytest.fixture
def server():
    s = Server()
    yield s
    s.httpd.shutdown()
    s.httpd.server_close()


def lf_zip(subdir: str = "LF-Tiny") -> bytes:
    """A zip of a tiny dataset in the LF layout, inside a single subdirectory."""
    buf = io.BytesIO()
    rows = {"trn.json.gz": [{"uid": "p0", "title": "red shoe", "target_ind": [0], "target_rel": [1.0]},
                            {"uid": "p1", "title": "blue hat", "target_ind": [1]}],
            "tst.json.gz": [{"uid": "q0", "title": "green shoe", "target_ind": [0]}],
            "lbl.json.gz": [{"uid": "L0", "title": "shoes"}, {"uid": "L1", "title": "hats"}]}
    with zipfile.ZipFile(buf, "w") as zf:
        for name, items in rows.items():
            gz = io.BytesIO()
            with gzip.GzipFile(fileobj=gz, mode="wb", mtime=0) as f:
                f.write("".join(json.dumps(r) + "\n" for r in items).encode())
            zf.writestr(f"{subdir}/{name}", gz.getvalue())
        zf.writestr(f"{subdir}/filter_labels_test.txt", "0 1\n")
    return buf.getvalue()


def params(**dataset):
    return parse_params({"dataset": dataset}).dataset


def test_interrupted_transfer_resumes_with_a_range_request(server, tmp_path):
    body = bytes(range(256)) * 4000  # ~1 MB
    server.files["/big.bin"] = body
    server.cut["/big.bin"] = 1
    dest = download.fetch_url(server.url + "/big.bin", tmp_path / "big.bin",
                              sha256=hashlib.sha256(body).hexdigest(), backoff_s=0.01)
    assert dest.read_bytes() == body
    assert server.requests == [("/big.bin", None), ("/big.bin", f"bytes={len(body) // 2}-")]
    assert not (tmp_path / "big.bin.part").exists()


def test_a_partial_file_left_by_an_earlier_run_is_resumed(server, tmp_path):
    body = b"0123456789" * 1000
    server.files["/f"] = body
    (tmp_path / "f.part").write_bytes(body[:3000])
    download.fetch_url(server.url + "/f", tmp_path / "f")
    assert (tmp_path / "f").read_bytes() == body
    assert server.requests == [("/f", "bytes=3000-")]


def test_server_without_range_support_restarts_the_transfer(server, tmp_path):
    body = b"abcdefghij" * 5000
    server.files["/f"] = body
    server.cut["/f"] = 1
    server.ranges = False
    download.fetch_url(server.url + "/f", tmp_path / "f", backoff_s=0.01)
    assert (tmp_path / "f").read_bytes() == body
    assert len(server.requests) == 2 and server.requests[1][1] == f"bytes={len(body) // 2}-"


def test_gives_up_after_the_retries_and_keeps_the_partial_file(server, tmp_path):
    server.files["/f"] = b"x" * 10_000
    server.cut["/f"] = 99
    with pytest.raises(TransientError, match=r"download failed after 3 attempts .*connection closed after"):
        download.fetch_url(server.url + "/f", tmp_path / "f", retries=2, backoff_s=0.01)
    assert len(server.requests) == 3
    assert not (tmp_path / "f").exists() and (tmp_path / "f.part").stat().st_size > 0


def test_checksum_mismatch_fails_cleanly_and_keeps_the_old_dataset(server, tmp_path):
    server.files["/d.zip"] = lf_zip()
    out = tmp_path / "data" / "dataset"
    download.materialise(params(source="url", url=server.url + "/d.zip"), out, tmp_path / "cache")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    other = server.url + "/d.zip?v=2"  # another cache entry
    with pytest.raises(DataError, match=r"sha256 mismatch: expected 0{64}, got [0-9a-f]{64}; the download was discarded"):
        download.materialise(params(source="url", url=other, sha256="0" * 64), out, tmp_path / "cache")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in (tmp_path / "cache").rglob("d.zip*")] == ["d.zip"]  # the first run's only
    assert not list((tmp_path / "data").glob(".dataset*"))  # no half-written sibling


def test_url_archive_becomes_the_dataset_and_is_cached(server, tmp_path):
    server.files["/LF-Tiny.zip"] = lf_zip()
    out = tmp_path / "data"
    ds = params(source="url", url=server.url + "/LF-Tiny.zip",
                sha256=hashlib.sha256(server.files["/LF-Tiny.zip"]).hexdigest(), propensity_b=2.0)
    download.materialise(ds, out, tmp_path / "cache")
    data = read_dataset(out)
    assert data.name == "LF-Tiny" and data.propensity == (0.55, 2.0)
    assert data.lbl.titles == ["shoes", "hats"] and data.filter_tst.tolist() == [[0, 1]]
    download.materialise(ds, out, tmp_path / "cache")  # second run: from the cache
    assert len(server.requests) == 1


def test_path_traversal_archive_from_a_url_is_refused(server, tmp_path):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        info = tarfile.TarInfo("../../escaped.txt")
        info.size = 4
        tf.addfile(info, io.BytesIO(b"evil"))
    server.files["/evil.tar.gz"] = buf.getvalue()
    out = tmp_path / "data" / "dataset"
    with pytest.raises(DataError, match=r"member '../../escaped.txt' escapes the target directory"):
        download.materialise(params(source="url", url=server.url + "/evil.tar.gz"), out, tmp_path / "cache")
    assert not out.exists()
    assert not list(tmp_path.rglob("escaped.txt"))


def test_http_404_is_not_retried(server, tmp_path):
    with pytest.raises(DataError, match=r"/missing.zip: HTTP 404") as e:
        download.fetch_url(server.url + "/missing.zip", tmp_path / "m.zip", backoff_s=0.01)
    assert not isinstance(e.value, TransientError)  # permanent: the flow does not retry it either
    assert len(server.requests) == 1


def test_registered_dataset_fetched_and_converted(server, tmp_path):
    """A registry entry as data (name -> files, converter, propensity), fetched over HTTP."""
    server.files["/131k.zip"] = lf_zip("LF-Amazon-131K")
    registry = {"LF-Test": download.Registered(
        (download.RemoteFile("LF-Amazon-131K.raw.zip", url=server.url + "/131k.zip"),),
        formats.copy_lf, (0.6, 2.6))}
    out = tmp_path / "data"
    download.materialise(params(source="LF-Test"), out, tmp_path / "cache", registry=registry)
    data = read_dataset(out)
    assert data.name == "LF-Test" and data.propensity == (0.6, 2.6) and len(data.trn.uids) == 2
    assert (tmp_path / "cache" / "LF-Test" / "LF-Amazon-131K.raw.zip").is_file()
    assert not [p for p in (tmp_path / "cache").rglob("*") if "unpack" in p.name]  # work dir removed


def test_registry_names_their_published_files_and_constants():
    r = download.REGISTRY
    assert r["EURLex-4K"].files[0].gdrive_id == "1A_sL_mzpkmnr6g0DSZ0_xJTr4GN-rIfi"
    assert r["LF-AmazonTitles-1.3M"].files[0].gdrive_id == "12zH4mL2RX8iSvH0VCNnd3QxO4DzuHWnK"
    assert [f.name for f in r["LF-Wikipedia-500K"].files] == ["trn.raw.json.gz", "tst.raw.json.gz", "Yf.txt"]
    assert r["LF-AmazonTitles-131K"].propensity == (0.6, 2.6)
    assert r["LF-Wikipedia-500K"].propensity == (0.5, 0.4)
    assert r["EURLex-4K"].propensity == (0.55, 1.5)


def test_registered_dataset_from_a_local_copy(tmp_path):
    """`dataset.path` points a registered name at an already-downloaded archive (offline)."""
    write_eurlex(tmp_path / "raw" / "Eurlex-4K")
    archive = tmp_path / "Eurlex-4K.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(tmp_path / "raw" / "Eurlex-4K", arcname="./Eurlex-4K")
    out = tmp_path / "data"
    download.materialise(params(source="EURLex-4K", path=str(archive), propensity_a=0.5), out, tmp_path / "cache")
    data = read_dataset(out)
    assert data.name == "EURLex-4K" and data.propensity == (0.5, 1.5)
    assert data.lbl.titles == ["agriculture", "fisheries", "customs"] and len(data.trn.uids) == 3


def test_local_directory_and_archive_with_checksum(tmp_path, tiny_dataset_dir):
    out = tmp_path / "data"
    download.materialise(params(source="local", path=str(tiny_dataset_dir)), out, tmp_path / "cache")
    assert (out / "trn.json.gz").read_bytes() == (tiny_dataset_dir / "trn.json.gz").read_bytes()
    assert json.loads((out / "dataset.json").read_text()) == {"name": "data", "propensity": [0.55, 1.5]}
    archive = tmp_path / "LF-Tiny.zip"
    archive.write_bytes(lf_zip())
    good = hashlib.sha256(archive.read_bytes()).hexdigest()
    download.materialise(params(source="local", path=str(archive), sha256=good), out, tmp_path / "cache")
    assert read_dataset(out).name == "LF-Tiny"
    with pytest.raises(DataError, match="sha256 mismatch"):
        download.materialise(params(source="local", path=str(archive), sha256="ab" * 32), out, tmp_path / "cache")
    assert read_dataset(out).name == "LF-Tiny"  # untouched


def test_local_directory_missing_a_file_leaves_nothing(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    write_jsonl_gz(src / "trn.json.gz", [{"uid": "p", "title": "t", "target_ind": [0]}])
    out = tmp_path / "data" / "dataset"
    with pytest.raises(DataError, match=r"missing tst.json.gz, lbl.json.gz"):
        download.materialise(params(source="local", path=str(src)), out, tmp_path / "cache")
    assert list((tmp_path / "data").iterdir()) == []


def test_synthetic_source_is_deterministic_and_honours_propensity(tmp_path):
    small = {"num_labels": 10, "num_train": 30, "num_test": 10}
    download.materialise(params(synthetic=small, propensity_a=0.7), tmp_path / "a", tmp_path / "c")
    download.materialise(params(synthetic=small, propensity_a=0.7), tmp_path / "b", tmp_path / "c")
    for name in ("trn.json.gz", "tst.json.gz", "lbl.json.gz"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert json.loads((tmp_path / "a" / "dataset.json").read_text()) == {"name": "synthetic", "propensity": [0.7, 1.5]}


def test_bad_source_settings_name_the_params_key(tmp_path):
    with pytest.raises(ConfigError, match=r"`dataset.source`: expected one of synthetic, local, url, EURLex-4K.*got 'Eurlex'"):
        download.materialise(params(source="Eurlex"), tmp_path / "d")
    with pytest.raises(TransientError, match=r"`dataset.path`: .*nowhere does not exist"):  # retried by the flow
        download.materialise(params(source="local", path=str(tmp_path / "nowhere")), tmp_path / "d")
    with pytest.raises(ConfigError, match=r"`dataset.sha256`: LF-Wikipedia-500K has 3 files"):
        download.materialise(params(source="LF-Wikipedia-500K", sha256="ab" * 32), tmp_path / "d", tmp_path / "c")
    assert not (tmp_path / "d").exists()


def test_cli_download_reports_errors_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    Path("params.yaml").write_text("dataset:\n  synthetic: {num_labels: 8, num_train: 20, num_test: 5}\n")
    assert cli_main(["download"]) == 0
    assert read_dataset("data/dataset").num_labels == 8
    assert cli_main(["download", "-S", "dataset.source=local", "-S", "dataset.path=nowhere"]) == EXIT_TRANSIENT
    assert "dexml download: error: params key `dataset.path`: nowhere does not exist" \
        in capsys.readouterr().err
    assert read_dataset("data/dataset").num_labels == 8  # the previous dataset stays
