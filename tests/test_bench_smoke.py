"""Smoke runs of every bench/ script at toy size (tiny encoder, tiny dataset), so they keep
working as the library changes. Checks what the numbers mean, never how fast anything is."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import index as bench_index  # noqa: E402
from bench import chunked_loss, losses, memory, report, serving, throughput  # noqa: E402

METRICS = ("P@1", "P@3", "P@5", "nDCG@5", "PSP@1", "PSP@5", "R@10")


def test_losses_trains_and_scores_against_baselines(tiny_encoder, tiny_dataset_dir, tmp_path):
    out = tmp_path / "cpu" / "losses_synthetic.json"
    doc = losses.main(["--data", str(tiny_dataset_dir), "--encoder", str(tiny_encoder), "--device", "cpu",
                       "--losses", "decoupled_softmax,softmax", "--epochs", "2", "--batch-size", "32",
                       "--lr", "3e-3", "--max-len", "16", "--label-chunk", "16", "-S", "model.tau=0.1",
                       "--out", str(out), "--workdir", str(tmp_path / "work"),
                       "--save-model", str(tmp_path / "model")])
    assert json.loads(out.read_text()) == doc
    rows = {r["method"].split(" ")[0]: r for r in doc["rows"]}
    assert set(rows) == {"TF-IDF", "zero-shot", "decoupled_softmax", "softmax"}
    for row in rows.values():
        assert all(0 <= row[k] <= 100 for k in METRICS)
    trained, untrained = rows["decoupled_softmax"], rows["zero-shot"]
    assert trained["P@5"] > untrained["P@5"] + 5  # training on the labels' words must help
    assert trained["budget"] == {"epochs": 2, "batch_size": 32, "lr": 3e-3, "sample_positives": 0,
                                 "max_len": 16, "negatives": "all", "overrides": ["model.tau=0.1"]}
    assert 1 <= trained["best_epoch"] <= 2 and len(trained["val_curve"]) == 2
    assert (tmp_path / "model" / "dexml_encoder.json").exists()
    assert doc["settings"]["params"]["model"]["tau"] == 0.1


def test_losses_rejects_unknown_loss(tmp_path):
    with pytest.raises(SystemExit, match="unknown name"):
        losses.main(["--data", str(tmp_path), "--losses", "hinge"])


def test_throughput_modes_use_their_label_pools(tiny_encoder, tiny_dataset_dir, tmp_path):
    doc = throughput.main(["--data", str(tiny_dataset_dir), "--encoder", str(tiny_encoder), "--device", "cpu",
                           "--inline", "--batch-size", "8", "--label-chunk", "16", "--max-len", "16",
                           "--steps", "2", "--warmup", "1", "--num-hard", "2", "--shortlist", "5",
                           "--out", str(tmp_path / "tp.json")])
    rows = {r["mode"]: r for r in doc["rows"]}
    assert set(rows) == {"all", "in-batch", "hard", "cached", "sentence-transformers CachedMNRL"}
    assert rows["all"]["pool_labels"] == 40  # every label of the tiny dataset
    assert rows["in-batch"]["pool_labels"] < rows["hard"]["pool_labels"] <= 40  # hard adds negatives
    assert rows["sentence-transformers CachedMNRL"]["pool_labels"] == 8  # one positive per query
    assert rows["cached"]["pool_labels"] == 40 and rows["cached"]["labels_grad"] < 40  # scores all, encodes few
    assert rows["in-batch"]["labels_no_grad"] == 0  # one encode with autograd: the pool fits in a chunk
    assert all(r["examples_per_s"] > 0 and r["peak_mb"] > 0 for r in rows.values())


def test_memory_rows_scale_the_tables_with_labels(tiny_encoder, tmp_path):
    doc = memory.main(["--encoder", str(tiny_encoder), "--device", "cpu", "--inline", "--labels", "300,3000",
                       "--modes", "all,cached", "--batch-size", "4", "--steps", "1", "--label-chunk", "512",
                       "--num-hard", "2", "--out", str(tmp_path / "m.json")])
    rows = {(r["mode"], r["labels"]): r for r in doc["rows"]}
    assert set(rows) == {(m, n) for m in ("all", "cached") for n in (300, 3000)}
    small, large = rows["all", 300], rows["all", 3000]
    assert large["emb_table_mb"] == pytest.approx(10 * small["emb_table_mb"], rel=0.05)
    assert large["state_mb"] == pytest.approx(2 * large["emb_table_mb"] + 3000 * 8 / 2**20, abs=0.1)
    assert rows["cached", 3000]["state_mb"] == pytest.approx(large["emb_table_mb"] + 3000 * 8 / 2**20, abs=0.1)
    assert small["labels_grad"] == 300 and large["labels_grad"] == 3000  # all: every label with gradients
    # cached: the positives and 2 hard negatives per query of 4 queries, never the whole table
    assert 0 < rows["cached", 3000]["labels_grad"] <= 4 * (1 + 2) and rows["cached", 3000]["refresh_s"] > 0
    assert all("error" not in r and r["step_s"] >= 0 and r["peak_mb"] >= r["baseline_mb"] for r in doc["rows"])


def test_serving_exports_times_and_measures_int8(tiny_encoder, tiny_dataset_dir, tmp_path):
    doc = serving.main(["--data", str(tiny_dataset_dir), "--encoder", str(tiny_encoder), "--device", "cpu",
                        "--repeats", "2", "--queries", "5", "--batch", "8", "--tokens", "16",
                        "--out", str(tmp_path / "s.json"), "--workdir", str(tmp_path / "w")])
    rows = doc["rows"]
    backends = [r["backend"] for r in rows if r["part"] == "encoder"]
    chosen = doc["settings"]["export_variant"]
    assert backends[0] == "PyTorch fp32 eager (cpu)" and backends[-1] == f"ONNX Runtime int8 of {chosen} (cpu)"
    assert [b.split()[3] for b in backends[1:-1]] == ["sdpa", "eager", "sdpa_fused", "eager_fused"]
    assert [b for b in backends if "[shipped]" in b] == [b for b in backends if b.split()[3:4] == [chosen]]
    assert all(r["vs_pytorch"] > 0 for r in rows if r["part"] == "encoder")
    latency = [r for r in rows if r["part"] == "predictor"]
    assert len(latency) == 2 and all(r["p50_ms"] <= r["p99_ms"] and r["queries"] == 5 for r in latency)
    fp32, int8, delta = [r for r in rows if r["part"] == "int8"]
    assert delta["P@5"] == pytest.approx(int8["P@5"] - fp32["P@5"])
    assert 0.5 < int8["cosine_mean"] <= 1.0 + 1e-6
    assert doc["settings"]["export_parity"]["query"]["max_abs_diff"] < 1e-4


def test_index_recall_is_measured_against_exact(tmp_path):
    doc = bench_index.main(["--sizes", "3000", "--dim", "32", "--queries", "30", "--per-cluster", "100",
                            "-S", "index.hnsw_ef_construction=40", "--out", str(tmp_path / "i.json")])
    rows = {r["type"]: r for r in doc["rows"]}
    assert rows["flat"]["recall@100"] == 1.0
    assert 0.3 < rows["hnsw"]["recall@100"] <= 1.0 and 0.0 < rows["ivfpq"]["recall@100"] <= 1.0
    assert rows["hnsw"]["params"]["efConstruction"] == 40


def test_report_renders_tables_and_marks_missing_gpu_rows(tmp_path):
    results = tmp_path / "results"
    memory_doc = {"benchmark": "memory", "started": "now", "settings": {},
                  "machine": {"cpu": "Test CPU", "cpu_cores": 2, "torch": "x", "load_avg_1m_at_start": 1.0},
                  "rows": [{"labels": 10000, "step_s": 1.5, "peak_mb": 900.0, "baseline_mb": 400.0}]}
    (results / "cpu").mkdir(parents=True)
    (results / "cpu" / "memory.json").write_text(json.dumps(memory_doc))
    doc = tmp_path / "benchmarks.md"
    names = ("losses", "throughput", "memory", "serving", "load", "index")
    doc.write_text("intro\n" + "".join(f"<!-- BEGIN bench:{n} -->\nold\n<!-- END bench:{n} -->\nprose {n}\n"
                                      for n in names))
    assert report.main(["--results", str(results), "--doc", str(doc)]) == 0
    text = doc.read_text()
    assert "old" not in text and all(f"prose {n}" in text for n in names)
    assert "| - | 10000 | 1.50 | - | - | - | 400 | 900 |" in text  # mode, labels, step_s, ..., baseline, peak and "Test CPU (2 cores" in text
    assert text.count("GPU rows: pending") == 5  # losses (2 datasets), throughput, memory, serving; index and trials: CPU only


def test_chunked_loss_rows_give_the_dense_loss_and_their_memory_growth(tmp_path):
    out = tmp_path / "cpu" / "chunked_loss.json"
    doc = chunked_loss.main(["--labels", "300,700", "--losses", "softmax,soft_topk", "--batch-size", "8",
                             "--dim", "16", "--chunk", "128", "--repeats", "1", "--dense-max", "300",
                             "--fresh", "20", "--inline", "--out", str(out)])
    rows = doc["rows"]
    assert [(r["labels"], r["loss"], r["form"]) for r in rows] == [
        (300, "softmax", "chunked"), (300, "softmax", "dense"), (300, "softmax", "fresh"),
        (300, "soft_topk", "chunked"), (300, "soft_topk", "dense"), (300, "soft_topk", "fresh"),
        (700, "softmax", "chunked"), (700, "softmax", "fresh"), (700, "soft_topk", "chunked"),
        (700, "soft_topk", "fresh")]
    for name in ("softmax", "soft_topk"):  # the forms compute the same loss (fresh rows = the table's own)
        values = [r["loss_value"] for r in rows if r["labels"] == 300 and r["loss"] == name]
        assert values == pytest.approx([values[0]] * 3, rel=1e-4) and values[0] > 0
    for r in rows:  # the fresh form returns 20 rows' gradient, not the table's
        assert r["grad_mb"] == pytest.approx(((20 if r["form"] == "fresh" else r["labels"]) * 16 + r["labels"])
                                             * 4 / 2**20, abs=0.05)
    assert set(doc["chunked_beyond_grad_growth"]) == {f"{n}/{f}" for n in ("softmax", "soft_topk")
                                                      for f in ("chunked", "fresh")}
    assert json.loads(out.read_text())["rows"] == rows
