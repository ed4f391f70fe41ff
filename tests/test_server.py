"""`dexml serve`: a real uvicorn server on a free port of 127.0.0.1 and a real HTTP client.

Answers equal Predictor's; every bad input gets its 4xx; a full queue answers 503; a bundle
swapped in by `rollback` during a burst loses no request; a tampered bundle is refused while the
old one keeps answering; SIGHUP reloads; SIGTERM drains the requests in flight and exits 0."""
from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from dexml import paths
from dexml.config import ServeParams, parse_params
from dexml.data.dataset import read_dataset
from dexml.errors import ConfigError
from dexml.pipeline.evaluate import run as run_evaluate
from dexml.pipeline.export import run as run_export
from dexml.pipeline.index import run as run_index
from dexml.pipeline.promote import rollback
from dexml.serve.predictor import Predictor
from dexml.serve.server import Server, create_app
from dexml.train.model import DualEncoder

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, tiny_encoder, tiny_dataset_dir) -> Path:
    """model -> export -> index -> evaluate on the tiny dataset. Read-only."""
    root = tmp_path_factory.mktemp("serve_root")
    params = parse_params({
        "model": {"encoder": str(tiny_encoder), "query_max_len": 16, "label_max_len": 12},
        "data": {"dir": str(tiny_dataset_dir)},
        "export": {"parity_texts": 8, "variant": "eager"},
        "evaluate": {"k": 10},
    })
    DualEncoder.from_params(params.model).save(root / paths.MODEL_DIR)
    for stage in (run_export, run_index, run_evaluate):
        stage(params, root)
    return root / paths.BUNDLE_DIR


def bundle_id(directory: Path) -> str:
    return hashlib.sha256((directory / "manifest.json").read_bytes()).hexdigest()[:12]


def release_copy(bundle: Path, dest: Path, revision: str) -> Path:
    """A copy of `bundle` with another manifest (so another id): what a retrain that produced the
    same model would promote."""
    shutil.copytree(bundle, dest)
    manifest = json.loads((dest / "manifest.json").read_text())
    manifest["git_revision"] = revision
    (dest / "manifest.json").write_text(json.dumps(manifest))
    return dest


def point(link: Path, target: str) -> None:
    """Move a symlink atomically, as dexml promote does."""
    tmp = link.with_name(f".{link.name}.tmp")
    tmp.unlink(missing_ok=True)
    os.symlink(target, tmp)
    os.replace(tmp, link)


@pytest.fixture
def production(bundle, tmp_path) -> Path:
    """artifacts/production with releases a and b (same model, different manifests): current -> a,
    previous -> b."""
    prod = tmp_path / "production"
    for name in ("a", "b"):
        release_copy(bundle, prod / "releases" / name, f"release-{name}")
    point(prod / "current", "releases/a")
    point(prod / "previous", "releases/b")
    return prod


@contextlib.contextmanager
def serving(bundle_path: Path, **settings):
    """A real uvicorn server on a free port, in a thread; yields (base URL, its Service)."""
    s = ServeParams(port=0, watch_interval_s=0.05, **settings)
    app = create_app(bundle_path, s)
    server = Server(app, s, log_level="warning")
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    service = app.state.service
    deadline = time.monotonic() + 60
    while not (server.started and service.current is not None):
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", service
    finally:
        server.should_exit = True
        thread.join(30)


def metric(client: httpx.Client, name: str) -> float:
    """A sample's value from /metrics (0 when absent); `name` includes its labels."""
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


def burst(url: str, bodies: list[dict], concurrency: int) -> list[httpx.Response]:
    """Send `bodies` with `concurrency` requests in flight at a time; responses in order."""

    async def run():
        sem = asyncio.Semaphore(concurrency)
        limits = httpx.Limits(max_connections=concurrency)
        async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
            async def one(body):
                async with sem:
                    return await client.post("/predict", json=body)
            return await asyncio.gather(*(one(b) for b in bodies))

    return asyncio.run(run())


def test_answers_equal_the_predictors_and_concurrent_requests_are_batched(bundle, tiny_dataset_dir):
    texts = read_dataset(tiny_dataset_dir).tst.titles[:24]
    expected = Predictor(bundle).predict(texts, k=5)
    with serving(bundle, max_wait_ms=50) as (url, _), httpx.Client(base_url=url) as client:
        assert client.get("/healthz").json() == {"alive": True}
        ready = client.get("/readyz")
        assert ready.status_code == 200 and ready.json()["bundle"] == bundle_id(bundle)
        r = client.post("/predict", json={"texts": texts[:3], "k": 5})
        assert r.status_code == 200 and r.headers["x-dexml-bundle"] == bundle_id(bundle)
        body = r.json()
        assert body["bundle"] == bundle_id(bundle) and body["release"] == bundle.name and body["k"] == 5
        for got, want in zip(body["predictions"], expected[:3]):
            assert [p["uid"] for p in got] == [u for u, _, _ in want]
            assert [p["title"] for p in got] == [t for _, t, _ in want]
            assert [p["score"] for p in got] == pytest.approx([s for _, _, s in want], abs=1e-5)
        # Single-text requests at once, different k: micro-batched, each still its own answer.
        responses = burst(url, [{"texts": [t], "k": 1 + i % 5} for i, t in enumerate(texts)], concurrency=24)
        for i, (resp, want) in enumerate(zip(responses, expected)):
            assert resp.status_code == 200
            assert [p["uid"] for p in resp.json()["predictions"][0]] == [u for u, _, _ in want[:1 + i % 5]]
        batches = metric(client, "dexml_batch_requests_count")
        assert metric(client, "dexml_batch_requests_sum") == 1 + len(texts)
        assert batches < 1 + len(texts), "concurrent requests were never batched together"
        assert metric(client, 'dexml_requests_total{status="200"}') == 1 + len(texts)
        assert metric(client, f'dexml_bundle_info{{bundle="{bundle_id(bundle)}",release="{bundle.name}"}}') == 1
        assert "/predict" in client.get("/openapi.json").json()["paths"]
        assert client.get("/docs").status_code == 200


LIMITS = {"max_texts": 4, "max_chars": 50, "max_body_bytes": 2048, "max_k": 30}
BAD = [  # (body: bytes, or an object sent as JSON), status, words the error must contain
    (b'{"texts": ["a"', 400, "not valid JSON"),
    (b"\xff\xfe not utf-8", 400, "not valid JSON"),
    (b"[" * 1500, 400, "not valid JSON"),
    (["a text"], 422, "expected a JSON object"),
    ({"k": 5}, 422, "`texts`: expected a list"),
    ({"texts": "one string"}, 422, "`texts`: expected a list"),
    ({"texts": []}, 422, "empty list"),
    ({"texts": ["ok", 7]}, 422, "`texts[1]`: expected a string"),
    ({"texts": ["ok", ""]}, 422, "`texts[1]`: empty"),
    ({"texts": ["   \t"]}, 422, "`texts[0]`: empty"),
    ({"texts": ["bad \udc80 surrogate"]}, 422, "lone surrogate"),
    ({"texts": ["a"], "k": 0}, 422, "`k`: expected a positive integer"),
    ({"texts": ["a"], "k": -3}, 422, "`k`: expected a positive integer"),
    ({"texts": ["a"], "k": "5"}, 422, "`k`: expected a positive integer"),
    ({"texts": ["a"], "k": True}, 422, "`k`: expected a positive integer"),
    ({"texts": ["a"], "k": 2.5}, 422, "`k`: expected a positive integer"),
    ({"texts": ["a"], "k": 31}, 422, "serve.max_k"),
    ({"texts": ["a"], "k": 10**30}, 422, "serve.max_k"),
    ({"texts": ["a"], "top": 3}, 422, "unknown field(s) 'top'"),
    ({"texts": ["a"] * 5}, 413, "serve.max_texts is 4"),
    ({"texts": ["x" * 51]}, 413, "serve.max_chars is 50"),
    ({"texts": ["a"], "pad": "x" * 3000}, 413, "serve.max_body_bytes is 2048"),
]


def test_every_bad_input_gets_its_4xx_and_the_server_keeps_answering(bundle):
    with serving(bundle, **LIMITS) as (url, _), httpx.Client(base_url=url) as client:
        for body, status, words in BAD:
            content = body if isinstance(body, bytes) else json.dumps(body).encode()
            r = client.post("/predict", content=content, headers={"content-type": "application/json"})
            assert r.status_code == status, (body, r.text)
            assert words in r.json()["error"]["message"], (body, r.json())
        limit = client.post("/predict", json={"texts": ["a"] * 5}).json()["error"]
        assert (limit["kind"], limit["limit"], limit["value"]) == ("limit", "serve.max_texts", 4)
        # A body sent in chunks without Content-Length is cut off at the limit too.
        r = client.post("/predict", content=iter([b'{"texts": ["', b"y" * 1500, b"z" * 1500, b'"]}']))
        assert r.status_code == 413 and "max_body_bytes" in r.json()["error"]["message"]
        # k above the label count (40 labels; max_k raised above it)
        with serving(bundle, max_k=100) as (url2, _):
            r = httpx.post(f"{url2}/predict", json={"texts": ["a"], "k": 41})
            assert r.status_code == 422 and "the bundle has 40 labels" in r.json()["error"]["message"]
        assert client.post("/predict", json={"texts": ["still fine"], "k": 3}).status_code == 200
        assert metric(client, 'dexml_request_errors_total{kind="invalid"}') >= 16
        assert metric(client, 'dexml_request_errors_total{kind="bad_json"}') == 3
        assert metric(client, 'dexml_request_errors_total{kind="internal"}') == 0


def test_a_full_queue_answers_503_with_retry_after(bundle):
    texts = ["a long query about many things " * 3] * 64
    with serving(bundle, queue_size=1, max_batch=1, max_wait_ms=0, max_texts=64, max_chars=200) as (url, _):
        responses = burst(url, [{"texts": texts, "k": 10}] * 60, concurrency=60)
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 503} and 200 in statuses and 503 in statuses, statuses
    busy = next(r for r in responses if r.status_code == 503)
    assert busy.headers["retry-after"] == "1" and busy.json()["error"]["kind"] == "overloaded"
    assert "serve.queue_size" in busy.json()["error"]["message"]


def test_promotion_and_rollback_during_a_burst_lose_no_request(production):
    a, b = bundle_id(production / "releases/a"), bundle_id(production / "releases/b")
    assert a != b
    results: list[httpx.Response] = []
    with serving(production / "current", max_wait_ms=1) as (url, service):
        assert service.current.id == a
        sender = threading.Thread(target=lambda: results.extend(
            burst(url, [{"texts": [f"query {i}"], "k": 3} for i in range(600)], concurrency=8)))
        sender.start()
        for want in (b, a):  # rollback twice: a -> b, then b -> a
            time.sleep(0.3)
            rollback(production)
            deadline = time.monotonic() + 20
            while service.current.id != want:
                assert time.monotonic() < deadline, "the new bundle was never swapped in"
                time.sleep(0.01)
        sender.join(120)
        with httpx.Client(base_url=url) as client:
            assert metric(client, 'dexml_bundle_reloads_total{result="swapped"}') == 3  # start + 2 switches
            assert metric(client, 'dexml_bundle_reloads_total{result="refused"}') == 0
    assert len(results) == 600 and all(r.status_code == 200 for r in results)
    served = [r.json()["bundle"] for r in results]
    assert set(served) == {a, b}, "both bundles answered during the burst"
    assert served[-1] == a


def test_a_tampered_bundle_is_refused_while_the_old_one_keeps_answering(production):
    a = bundle_id(production / "releases/a")
    bad = release_copy(production / "releases/a", production / "releases/tampered", "tampered")
    with open(bad / "index" / "labels.jsonl", "a") as f:
        f.write('{"uid": "X", "title": "injected"}\n')
    with serving(production / "current") as (url, service), httpx.Client(base_url=url) as client:
        point(production / "current", "releases/tampered")
        deadline = time.monotonic() + 20
        while metric(client, 'dexml_bundle_reloads_total{result="refused"}') < 1:
            assert time.monotonic() < deadline, "the tampered bundle was not noticed"
            time.sleep(0.02)
        r = client.post("/predict", json={"texts": ["a query"], "k": 2})
        assert r.status_code == 200 and r.json()["bundle"] == a
        ready = client.get("/readyz").json()
        assert ready["ready"] and ready["bundle"] == a and "labels.jsonl has been modified" in ready["last_refused"]
        time.sleep(0.3)  # the same refused bundle is not retried on every check...
        assert metric(client, 'dexml_bundle_reloads_total{result="refused"}') == 1
        service.request_reload()  # ...but SIGHUP's reload tries again
        while metric(client, 'dexml_bundle_reloads_total{result="refused"}') < 2:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        point(production / "current", "releases/b")  # a good bundle is taken again
        while service.current.id != bundle_id(production / "releases/b"):
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert client.get("/readyz").json()["last_refused"] is None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sighup_reloads_and_sigterm_drains_requests_in_flight_and_exits_0(bundle, tmp_path):
    (tmp_path / "params.yaml").write_text("serve:\n  max_wait_ms: 800\n  max_batch: 4096\n")
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "dexml.cli", "serve", "--bundle", str(bundle), "--port", str(port),
                             "--params", str(tmp_path / "params.yaml")], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.poll() else ""
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/readyz").status_code == 200:
                    break
            time.sleep(0.1)
        proc.send_signal(signal.SIGHUP)  # a forced reload: the same bundle, verified and swapped in again
        with httpx.Client(base_url=url) as client:
            while metric(client, 'dexml_bundle_reloads_total{result="swapped"}') < 2:
                assert time.monotonic() < deadline, "SIGHUP did not reload the bundle"
                time.sleep(0.05)
        # The batch waits 800 ms for more requests: these are in flight when SIGTERM arrives.
        results: list[httpx.Response] = []
        sender = threading.Thread(target=lambda: results.extend(
            burst(url, [{"texts": [f"text {i}"]} for i in range(6)], concurrency=6)))
        sender.start()
        time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        sender.join(30)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    log = proc.stdout.read()
    assert [r.status_code for r in results] == [200] * 6, log
    assert "Shutting down" in log and "Traceback" not in log


def test_serve_refuses_a_bad_bundle_or_setting_before_listening(tmp_path):
    from dexml.cli import main

    (tmp_path / "params.yaml").write_text("{}\n")
    assert main(["serve", "--params", str(tmp_path / "params.yaml"), "--bundle", str(tmp_path / "nowhere")]) == 1
    with pytest.raises(ConfigError, match="serve.max_batch"):
        parse_params({"serve": {"max_batch": 0}})
    with pytest.raises(ConfigError, match="serve.default_k"):
        parse_params({"serve": {"max_k": 10, "default_k": 20}})
