"""Benchmark 6: `dexml serve` under load on 127.0.0.1. N concurrent async httpx clients send M
single-text requests each: requests/s, client-side p50/p99 latency, the batch sizes the server
formed (from its /metrics), errors (goal 0). Scenarios, one after the other in this run:

    batched     micro-batching on (serve.max_batch, serve.max_wait_ms)
    unbatched   the same server with --max-batch 1 (one encoder call per request)
    switch      batched, with a promotion (a second release installed and `current` moved, as
                `dexml promote` does after its gate) at 1/3 of the run and `dexml rollback` at 2/3:
                every response must carry a verified bundle's id; switch time = from the link
                moving to the first response from the new bundle (the watcher's poll interval,
                verification and warm-up included)

The server is `python -m dexml.cli serve` in its own process (pinned with --server-cpus), the
clients run in this one (--client-cpus), so they do not share a core or the GIL.

    taskset -c 0,1 python bench/load.py --bundle /path/to/bundle --data ../shared/datasets/LF-DebianTags
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import common  # noqa: E402

COLUMNS = ["scenario", "requests", "errors", "requests_per_s", "p50_ms", "p99_ms", "mean_batch_texts",
           "max_batch_texts", "bundles_seen", "switch_s"]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", required=True, help="a verified bundle directory (manifest.json, encoder/, index/)")
    ap.add_argument("--data", default=common.DEFAULT_DATA, help="LF-layout dataset: request texts from its test split")
    ap.add_argument("--clients", type=int, default=32, help="concurrent clients (N)")
    ap.add_argument("--requests", type=int, default=40, help="requests per client (M)")
    ap.add_argument("--switch-requests", type=int, default=80, help="requests per client in the switch scenario "
                    "(long enough for two bundle loads)")
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="the server's onnxruntime threads")
    ap.add_argument("--max-batch", type=int, default=64)
    ap.add_argument("--max-wait-ms", type=float, default=2.0)
    ap.add_argument("--watch-interval", type=float, default=0.5, help="serve.watch_interval_s")
    ap.add_argument("--server-cpus", default="0", help="taskset CPU list for the server ('' = no pinning)")
    ap.add_argument("--client-cpus", default="1", help="CPU list for this process ('' = no pinning)")
    ap.add_argument("--scenarios", default="batched,unbatched,switch")
    ap.add_argument("--out", default=None)
    ap.add_argument("--workdir", default=None)
    return ap.parse_args(argv)


def manifest_id(bundle: Path) -> str:
    import hashlib
    return hashlib.sha256((bundle / "manifest.json").read_bytes()).hexdigest()[:12]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`dexml serve` in a subprocess; its log collected in a thread."""

    def __init__(self, bundle: Path, args, max_batch: int, workdir: Path):
        self.port = free_port()
        params = workdir / "params.yaml"
        params.write_text(f"serve:\n  watch_interval_s: {args.watch_interval}\n  max_k: {max(args.k, 5)}\n")
        cmd = [sys.executable, "-m", "dexml.cli", "serve", "--params", str(params), "--bundle", str(bundle),
               "--port", str(self.port), "--threads", str(args.threads), "--max-batch", str(max_batch),
               "--max-wait-ms", str(args.max_wait_ms)]
        if args.server_cpus:
            cmd = ["taskset", "-c", args.server_cpus, *cmd]
        env = {**os.environ, "PYTHONPATH": str(common.REPO)}
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                     cwd=workdir)
        self.log: list[str] = []
        self._reader = threading.Thread(target=lambda: self.log.extend(self.proc.stdout), daemon=True)
        self._reader.start()
        self.url = f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 120) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit("the server exited:\n" + "".join(self.log[-30:]))
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise SystemExit("the server did not become ready:\n" + "".join(self.log[-30:]))

    def metrics(self) -> dict[str, float]:
        import httpx

        out = {}
        for line in httpx.get(f"{self.url}/metrics").text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                out[name] = float(value)
        return out

    def stop(self) -> int:
        self.proc.terminate()
        rc = self.proc.wait(60)
        self._reader.join(5)
        return rc


async def run_load(url: str, texts: list[str], args, events=None) -> list[tuple]:
    """N clients x M requests; returns (sent, received, status, bundle id or None) per request.
    events: [(fraction of all requests sent, callable)], each run once in a thread at that point."""
    import httpx

    total = args.clients * args.requests
    sent = 0
    results = []
    pending_events = sorted(events or [], key=lambda e: e[0])
    event_tasks = []
    limits = httpx.Limits(max_connections=args.clients, max_keepalive_connections=args.clients)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        async def worker(w: int):
            nonlocal sent
            for i in range(args.requests):
                text = texts[(w * args.requests + i) % len(texts)]
                sent += 1
                while pending_events and sent >= pending_events[0][0] * total:
                    event_tasks.append(asyncio.create_task(asyncio.to_thread(pending_events.pop(0)[1])))
                start = time.monotonic()
                try:
                    r = await client.post("/predict", json={"texts": [text], "k": args.k})
                    bundle = r.json().get("bundle") if r.status_code == 200 else None
                    results.append((start, time.monotonic(), r.status_code, bundle))
                except httpx.HTTPError as e:
                    results.append((start, time.monotonic(), type(e).__name__, None))

        await asyncio.gather(*(worker(w) for w in range(args.clients)))
        await asyncio.gather(*event_tasks)
    return results


def summarise(name: str, results: list[tuple], before: dict, after: dict, wall: float) -> dict:
    import numpy as np

    lat = np.asarray([(r[1] - r[0]) * 1000 for r in results])
    errors = [r for r in results if r[2] != 200]
    n_batches = after.get("dexml_batch_texts_count", 0) - before.get("dexml_batch_texts_count", 0)
    n_texts = after.get("dexml_batch_texts_sum", 0) - before.get("dexml_batch_texts_sum", 0)
    # the largest histogram bucket that gained batches
    buckets = sorted((float(re.search(r'le="([^"]+)"', k).group(1)), v - before.get(k, 0))
                     for k, v in after.items() if k.startswith("dexml_batch_texts_bucket") and "+Inf" not in k)
    prev, max_bucket = 0.0, None
    for le, count in buckets:
        if count > prev:
            max_bucket = le
        prev = count
    return {"scenario": name, "requests": len(results), "errors": len(errors),
            "error_kinds": sorted({str(r[2]) for r in errors}), "requests_per_s": len(results) / wall,
            "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99)),
            "mean_ms": float(lat.mean()), "batches": int(n_batches),
            "mean_batch_texts": n_texts / n_batches if n_batches else None,
            "max_batch_texts": f"<= {int(max_bucket)}" if max_bucket else None, "wall_s": wall}


def scenario(name: str, bundle: Path, texts: list[str], args, workdir: Path, max_batch: int,
             switch: tuple | None = None) -> dict:
    server = ServerProcess(bundle, args, max_batch, workdir)
    try:
        server.wait_ready()
        # warm the connections and the encoder's shapes, outside the measurement
        warm = argparse.Namespace(**{**vars(args), "requests": 2})
        asyncio.run(run_load(server.url, texts, warm))
        before = server.metrics()
        events, marks = [], []
        if switch:
            for fraction, fn, new_id in switch:
                def event(fn=fn, new_id=new_id):
                    marks.append((time.monotonic(), new_id))
                    fn()
                events.append((fraction, event))
        start = time.monotonic()
        results = asyncio.run(run_load(server.url, texts, args, events))
        wall = time.monotonic() - start
        row = summarise(name, results, before, server.metrics(), wall)
        row["bundles_seen"] = sorted({r[3] for r in results if r[3]})
        if switch:
            switches = []
            for moved, new_id in marks:  # the first answer from the new bundle to a request sent after the move
                first = min((r[1] for r in results if r[3] == new_id and r[0] >= moved), default=None)
                switches.append(None if first is None else first - moved)
            row["switch_s"] = [None if s is None else round(s, 3) for s in switches]
            row["switch_log"] = [line.strip() for line in server.log if "serving bundle" in line or "refused" in line]
        return row
    finally:
        row_rc = server.stop()
        if row_rc != 0:
            print(f"warning: the server exited with {row_rc}", file=sys.stderr)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.client_cpus:
        os.sched_setaffinity(0, {int(c) for c in args.client_cpus.split(",")})
    workdir = common.scratch_dir(args.workdir, "dexml_bench_load_")
    workdir.mkdir(parents=True, exist_ok=True)
    bundle = Path(args.bundle).resolve()
    from dexml.data.dataset import read_dataset
    from dexml.serve.bundle import verify_bundle

    verify_bundle(bundle)
    ds = read_dataset(Path(args.data))
    # The first 500 characters: the encoder reads 32 tokens, and serve.max_chars (2000) refuses longer texts.
    texts = [t[:500] for t in ds.tst.texts("title+content") if t.strip()][:2000]
    settings = {"bundle": str(bundle), "clients": args.clients, "requests_per_client": args.requests,
                "switch_requests_per_client": args.switch_requests,
                "k": args.k, "server_threads": args.threads, "max_batch": args.max_batch,
                "max_wait_ms": args.max_wait_ms, "watch_interval_s": args.watch_interval,
                "server_cpus": args.server_cpus, "client_cpus": args.client_cpus, "text": "title+content, first 500 characters",
                "request": "one text per request"}
    out = Path(args.out) if args.out else common.default_out("load", "cpu")
    results = common.Results(out, "load", "cpu", settings)
    wanted = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    if "batched" in wanted:
        results.add(scenario("batched", bundle, texts, args, workdir, args.max_batch))
    if "unbatched" in wanted:
        results.add(scenario("unbatched (--max-batch 1)", bundle, texts, args, workdir, 1))
    if "switch" in wanted:
        from dexml.pipeline import promote

        prod = workdir / "production"
        shutil.rmtree(prod, ignore_errors=True)
        # Two releases: the bundle as it is, and a copy with another manifest (another id), the
        # way a retrain that passed the gate would arrive.
        second = workdir / "candidate"
        shutil.rmtree(second, ignore_errors=True)
        shutil.copytree(bundle, second)
        manifest = json.loads((second / "manifest.json").read_text())
        manifest["git_revision"] = f"load-benchmark-{time.time():.0f}"
        (second / "manifest.json").write_text(json.dumps(manifest))
        first_release = promote._install_release(bundle, prod, None, None)
        ids = {"first": manifest_id(first_release), "second": manifest_id(second)}

        def promote_second():  # what `dexml promote` does once its gate says yes
            promote._install_release(second, prod, None, first_release)

        def roll_back():
            promote.rollback(prod)

        long = argparse.Namespace(**{**vars(args), "requests": args.switch_requests})
        row = scenario("switch (promote at 1/3, rollback at 2/3)", prod / "current", texts, long, workdir,
                       args.max_batch, switch=[(1 / 3, promote_second, ids["second"]),
                                               (2 / 3, roll_back, ids["first"])])
        row["verified_ids"] = sorted(ids.values())
        row["only_verified_ids"] = set(row["bundles_seen"]) <= set(ids.values())
        results.add(row)
    print(common.table(results.doc["rows"], COLUMNS, {"requests_per_s": ".1f", "p50_ms": ".1f", "p99_ms": ".1f",
                                                      "mean_batch_texts": ".1f"}))
    print(f"wrote {out}")
    return results.doc


if __name__ == "__main__":
    main()
