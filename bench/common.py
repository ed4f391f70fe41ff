"""Shared helpers of the benchmark scripts: machine description, JSON results, tables,
memory and time measurement, exact retrieval, datasets, and per-configuration worker processes.

Every benchmark writes one JSON file: {"benchmark", "machine", "settings", "rows": [...]},
rewritten (atomically) after each row, so a run cut short still leaves the rows it finished.
"""
from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python bench/x.py` from anywhere, without installing dexml
    sys.path.insert(0, str(REPO))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

DEFAULT_DATA = str((REPO / ".." / "shared" / "datasets" / "LF-DebianTags").resolve())
MINILM = "sentence-transformers/all-MiniLM-L6-v2"
RESULTS = REPO / "bench" / "results"


# ---------------------------------------------------------------- machine and results
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: str = "cpu") -> dict:
    """What the numbers were measured on (CPU model and cores, GPU, library versions, load)."""
    import torch

    info = {"cpu": cpu_model(), "cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "device": device, "python": platform.python_version(), "torch": torch.__version__,
            "load_avg_1m_at_start": round(os.getloadavg()[0], 2),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")}
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    for name in ("transformers", "onnxruntime", "faiss", "sentence_transformers"):
        try:
            info[name] = __import__(name).__version__
        except Exception:  # absent (faiss on the GPU machine) or no version attribute
            pass
    return info


def default_out(name: str, device: str) -> Path:
    return RESULTS / ("gpu" if device.startswith("cuda") else "cpu") / f"{name}.json"


class Results:
    """One benchmark's JSON file, rewritten after every added row."""

    def __init__(self, path, benchmark: str, device: str, settings: dict, append: bool = False):
        """append: keep an existing file's rows (and its settings and machine) and add to them."""
        self.path = Path(path)
        if append and self.path.exists():
            self.doc = json.loads(self.path.read_text())
            return
        self.doc = {"benchmark": benchmark, "machine": machine_info(device), "settings": settings,
                    "started": time.strftime("%Y-%m-%d %H:%M:%S"), "rows": []}

    def add(self, row: dict) -> None:
        self.doc["rows"].append(row)
        self.save()

    def save(self) -> None:
        from dexml import fileio
        self.doc["machine"]["load_avg_1m_at_end"] = round(os.getloadavg()[0], 2)
        fileio.write_json(self.path, self.doc)


def table(rows: list[dict], columns: list[str], fmt: dict | None = None) -> str:
    """A markdown table of `columns` (missing values shown as '-')."""
    fmt = fmt or {}

    def cell(row, c):
        v = row.get(c)
        if v is None:
            return "-"
        if isinstance(v, float):
            return format(v, fmt.get(c, ".2f"))
        return str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r, c) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------- devices, time, memory
def resolve_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        sys.exit(f"--device {name}: no CUDA device is available")
    return name


def sync(device) -> None:
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


class Clock:
    """Wall and process-CPU seconds of a block (CPU seconds show contention on shared cores)."""

    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall_s = time.perf_counter() - self.wall
        self.cpu_s = time.process_time() - self.cpu


def rss_mb() -> float:
    """Current resident set size of this process."""
    try:
        import psutil

        return psutil.Process().memory_info().rss / 2**20
    except ImportError:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_rss() -> bool:
    """Restart the kernel's peak-RSS count (VmHWM) of this process from its current RSS, so that
    `window_peak_rss_mb` is the peak since now; False where /proc/self/clear_refs is missing."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def window_peak_rss_mb() -> float:
    """Peak RSS since the last `reset_peak_rss` (VmHWM; the process's lifetime peak without one)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return peak_rss_mb()


def quantiles_ms(seconds: list[float]) -> dict:
    import numpy as np

    ms = np.asarray(seconds) * 1000
    return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
            "mean_ms": float(ms.mean())}


def scratch_dir(path: str | None, prefix: str) -> Path:
    """`path`, or a new temporary directory removed when this process exits."""
    if path:
        return Path(path)
    import atexit
    import shutil
    import tempfile

    tmp = tempfile.mkdtemp(prefix=prefix)
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)
    return Path(tmp)


# ---------------------------------------------------------------- data
def load_dataset(spec: str, workdir: Path):
    """(dataset directory, XMCDataset) for a directory in the LF layout, or `synthetic`:
    the project's default synthetic dataset (params.yaml's dataset.synthetic), generated."""
    from dexml.data.dataset import read_dataset, write_dataset

    if spec == "synthetic":
        from dexml.config import load_params
        from dexml.data.synthetic import generate

        out = Path(workdir) / "synthetic"
        if not (out / "trn.json.gz").exists():
            write_dataset(generate(load_params(REPO / "params.yaml").dataset.synthetic), out)
        return out, read_dataset(out)
    path = Path(spec).resolve()
    return path, read_dataset(path)


def text_mode(spec: str, requested: str | None) -> str:
    """title+content for real LF datasets (their README's setting), title for synthetic."""
    if requested:
        return requested
    return "title" if spec == "synthetic" else "title+content"


# ---------------------------------------------------------------- retrieval
def exact_top_k(queries, labels, k: int, score=None, chunk: int = 4096):
    """Exact top-k (torch, on the tensors' device) -> CSR scores (n x L) on CPU.

    score(q_chunk, labels) gives the logits; default the inner product, what a flat faiss index
    returns (used where faiss is absent: the GPU machine)."""
    import numpy as np
    import scipy.sparse as sp
    import torch

    score = score or (lambda q, lab: q.float() @ lab.float().T)
    k = min(k, labels.shape[0])
    vals, inds = [], []
    for start in range(0, queries.shape[0], chunk):
        top = torch.topk(score(queries[start:start + chunk], labels), k, dim=1)
        vals.append(top.values.cpu())
        inds.append(top.indices.cpu())
    vals, inds = torch.cat(vals).numpy(), torch.cat(inds).numpy()
    n = queries.shape[0]
    return sp.csr_matrix((vals.ravel().astype(np.float32), inds.ravel(), np.arange(n + 1) * k),
                         shape=(n, labels.shape[0]))


def xmc_eval(scores, ds) -> dict:
    """The project's metrics (percent) of a test score matrix, test filter pairs removed."""
    from dexml import metrics
    scores = metrics.filter_predictions(scores, ds.filter_tst)
    inv_prop = metrics.inverse_propensity(ds.trn.labels, *ds.propensity)
    return metrics.xmc_metrics(scores, ds.tst.labels, inv_prop)


# ---------------------------------------------------------------- worker processes
def run_worker(script: str, args: list[str], timeout: float | None = None) -> dict:
    """Run `python bench/<script> --worker ...` in a fresh process (own peak memory) and return
    the JSON object it prints on its last stdout line; {"error": ...} if it fails."""
    cmd = [sys.executable, str(REPO / "bench" / script), *args]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s"}
    sys.stderr.write(proc.stderr[-4000:])
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    if proc.returncode != 0 or not lines:
        return {"error": f"exit {proc.returncode}: {proc.stderr.strip().splitlines()[-1:] or ''}"}
    return json.loads(lines[-1])


def guarded(fn, *args) -> dict:
    """fn(*args), or {"error": ...} if it raises: in-process runs, where one failing
    configuration must not cost the others their rows."""
    try:
        return fn(*args)
    except Exception as e:
        import traceback

        traceback.print_exc()
        return {"error": f"{type(e).__name__}: {e}"}


def emit(obj: dict) -> None:
    """A worker's result: one JSON line on stdout."""
    print(json.dumps(obj), flush=True)
