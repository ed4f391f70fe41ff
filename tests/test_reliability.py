"""The reliability probe (issue 13), recorded: every class of bad input a user can type, download
or promote, each asserting that the message names the file / field / limit and that nothing on
disk changed. Fast except where marked."""
from __future__ import annotations

import gzip
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from dexml.config import MAX_K, load_params, parse_overrides, parse_params
from dexml.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]

# --- params: checked when they load, not after a full retrain (item 4) --------------------

BAD_PARAMS = [  # (section, {key: value}, the key named, a fragment of what is expected)
    ("flow", {"gate_metric": "P@7"}, "flow.gate_metric", "one of ['P@1'"),
    ("flow", {"guarded": {"P@11": 1.0}}, "flow.guarded.P@11", "a metric name"),
    ("flow", {"guarded": {"P@1": -0.5}}, "flow.guarded.P@1", "a tolerance >= 0"),
    ("flow", {"guarded": {"P@1": "lots"}}, "flow.guarded.P@1", "a tolerance >= 0"),
    ("flow", {"min_delta": -0.1}, "flow.min_delta", ">= 0"),
    ("flow", {"cron": "0 3 * *"}, "flow.cron", "got 4 fields"),
    ("flow", {"cron": "61 3 * * 1"}, "flow.cron", "minute field '61' is not in 0..59"),
    ("flow", {"cron": "0 3 * * funday"}, "flow.cron", "weekday field"),
    ("flow", {"timezone": "Mars/Olympus"}, "flow.timezone", "IANA time zone"),
    ("flow", {"download_retries": -1}, "flow.download_retries", ">= 0"),
    ("flow", {"download_retry_delay": -5}, "flow.download_retry_delay", ">= 0"),
    ("train", {"max_steps": 0}, "train.max_steps", "null or a positive integer"),
    ("train", {"val_max_points": 0}, "train.val_max_points", "a positive integer"),
    ("train", {"weight_decay": -0.01}, "train.weight_decay", ">= 0"),
    ("train", {"grad_clip": -1.0}, "train.grad_clip", "null or a positive number"),
    ("train", {"num_threads": -2}, "train.num_threads", "0 (torch's default)"),
    ("train", {"nnodes": 2, "node_rank": 2}, "train.node_rank", "[0, train.nnodes = 2)"),
    ("train", {"nnodes": 0}, "train.nnodes", "a positive integer"),
    ("train", {"master_port": 70000}, "train.master_port", "1..65535"),
    ("train", {"master_port": 0}, "train.master_port", "1..65535"),
    ("export", {"opset": 11}, "export.opset", "14..20"),
    ("dataset", {"propensity_a": -0.55}, "dataset.propensity_a", "null or a positive number"),
    ("dataset", {"propensity_b": 0}, "dataset.propensity_b", "null or a positive number"),
    ("evaluate", {"k": 10**11}, "evaluate.k", f"5..{MAX_K}"),
    ("rae", {"k": MAX_K + 1}, "rae.k", f"1..{MAX_K}"),
    ("loss", {"name": "hinge"}, "loss.name", "one of ['softmax', 'decoupled_softmax', 'soft_topk', 'bce'], got 'hinge'"),
]


@pytest.mark.parametrize("section,values,key,expected", BAD_PARAMS,
                         ids=[f"{key}={list(v.values())[-1]}" for _, v, key, _ in BAD_PARAMS])
def test_bad_params_fail_when_they_load_naming_the_key(tmp_path, section, values, key, expected):
    path = tmp_path / "params.yaml"
    path.write_text("{}\n")
    overrides = {f"{section}.{k}": v for k, v in values.items()}
    with pytest.raises(ConfigError) as e:
        load_params(path, overrides)
    msg = str(e.value)
    assert msg.startswith(f"{path}: params key `{key}`: expected ") and expected in msg, msg


def test_the_defaults_and_boundary_values_pass():
    parse_params({})
    parse_params({"flow": {"cron": "*/15 0-6 1,15 jan-jun mon-fri", "guarded": {}, "min_delta": 0},
                  "train": {"max_steps": 1, "nnodes": 2, "node_rank": 1, "master_port": 65535},
                  "export": {"opset": 14}, "evaluate": {"k": MAX_K}})


def test_cron_check_agrees_with_prefects_schedules():
    """What flow.cron accepts is what Prefect's Cron schedule accepts (the deployment uses it)."""
    from prefect._internal.schemas.validators import validate_cron_string

    from dexml.config import cron_problem

    for expr in ("0 3 * * 1", "*/15 * * * *", "0 0 1 jan *", "0 0 * * mon-fri", "0 0 * * 7", "@daily",
                 "0 0 L * *", "0 0 * * 5#3", "0 0 * dec-jan *", "60 * * * *", "0 3 * *", "0 3 * * 8",
                 "*/0 * * * *", "0 24 * * *", "0 0 0 * *", "0 0 * 13 *", "0 0 * * 5#9", "a b c d e"):
        try:
            validate_cron_string(expr)
            prefect_ok = True
        except ValueError:
            prefect_ok = False
        assert (cron_problem(expr) is None) == prefect_ok, expr


# --- -S overrides typed by their field (item 5) -------------------------------------------

def test_overrides_are_parsed_by_the_type_of_their_field(tmp_path):
    digits = "1234567890" * 6 + "1234"
    got = parse_overrides(["train.lr=1e-4", "dataset.path=2024", f"dataset.sha256={digits}",
                           "train.max_steps=null", "train.epochs=3", "model.shared=false",
                           "rae.lambdas=[0, 1e-1, 0.5]", "train.sample_positives=0", "flow.guarded.P@1=2"])
    assert got == {"train.lr": 1e-4, "dataset.path": "2024", "dataset.sha256": digits, "train.max_steps": None,
                   "train.epochs": 3, "model.shared": False, "rae.lambdas": [0, 0.1, 0.5],
                   "train.sample_positives": 0, "flow.guarded.P@1": 2}
    assert isinstance(got["train.lr"], float) and isinstance(got["dataset.path"], str)
    path = tmp_path / "params.yaml"
    path.write_text("{}\n")
    p = load_params(path, got)  # and every one of them loads
    assert p.train.lr == 1e-4 and p.dataset.path == "2024" and p.dataset.sha256 == digits
    assert p.flow.guarded["P@1"] == 2


@pytest.mark.parametrize("item,expected", [
    ("train.lr=fast", "override `train.lr=fast`: expected a number, got 'fast'"),
    ("train.epochs=2.5", "override `train.epochs=2.5`: expected an integer, got '2.5'"),
    ("model.shared=maybe", "override `model.shared=maybe`: expected true or false"),
    ("model.pooling=max", "override `model.pooling=max`: expected one of ['mean', 'cls']"),
    ("train.lr", "override 'train.lr': expected KEY=VALUE"),
])
def test_bad_overrides_name_the_override(item, expected):
    with pytest.raises(ConfigError) as e:
        parse_overrides([item])
    assert expected in str(e.value)


def test_cli_help_example_override_works(tmp_path, monkeypatch, capsys):
    """`-S train.lr=1e-4`, the CLI's own example, and an all-digit path reach the stage."""
    from dexml.cli import main as cli

    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("dataset:\n  synthetic: {num_labels: 8, num_train: 20, num_test: 5}\n")
    assert cli(["download", "-S", "train.lr=1e-4", "-S", "data.dir=2024"]) == 0
    assert (tmp_path / "2024" / "trn.json.gz").is_file()


# --- a bundle for the serving probes --------------------------------------------------------

@pytest.fixture(scope="module")
def bundle(tmp_path_factory, tiny_encoder, tiny_dataset_dir) -> Path:
    """export -> index -> evaluate of an untrained tiny model on the tiny dataset (40 labels)."""
    from dexml import paths
    from dexml.pipeline.evaluate import run as run_evaluate
    from dexml.pipeline.export import run as run_export
    from dexml.pipeline.index import run as run_index
    from dexml.train.model import DualEncoder

    root = tmp_path_factory.mktemp("reliability_root")
    params = parse_params({"model": {"encoder": str(tiny_encoder), "query_max_len": 16, "label_max_len": 12},
                           "data": {"dir": str(tiny_dataset_dir)}, "export": {"parity_texts": 8},
                           "evaluate": {"k": 10}})
    DualEncoder.from_params(params.model).save(root / paths.MODEL_DIR)
    for stage in (run_export, run_index, run_evaluate):
        stage(params, root)
    return root / paths.BUNDLE_DIR


ADDRESS_SPACE = 3 << 30  # enough to load onnxruntime + faiss + the tiny bundle, not a k-sized array


def _limit_memory():
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))


def predict_cli(*args: str, stdin: bytes | None = None, limit: bool = False) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "dexml.cli", "predict", *args], input=stdin, capture_output=True,
                          env=env, cwd=REPO, timeout=120, preexec_fn=_limit_memory if limit else None)


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under root (relative path -> bytes), symlinks as their target: "nothing changed".
    Lock files (production's .lock, held while it is read) are not state and are left out."""
    out = {}
    for p in sorted(Path(root).rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.name == ".lock":
            continue
        if p.is_symlink():
            out[rel] = b"-> " + os.readlink(p).encode()
        elif p.is_file():
            out[rel] = p.read_bytes()
    return out


# --- k: capped at the label count and at max_k before anything is allocated (item 1) ------

@pytest.mark.parametrize("args,stdin", [
    (["-k", str(10**11), "vobo kata"], None),
    (["-k", str(3 * 10**9), "--jsonl"], b"".join(b'{"id": %d, "text": "kata sigi %d"}\n' % (i, i) for i in range(300))),
], ids=["k=1e11", "k=3e9,jsonl-batch"])
def test_a_huge_k_answers_with_every_label_within_a_small_address_space(bundle, args, stdin):
    """Under a 3 GiB address-space limit: before the cap, k = 3e9 asked numpy for 11 GiB."""
    out = predict_cli("--bundle", str(bundle), *args, stdin=stdin, limit=True)
    assert out.returncode == 0, out.stderr.decode()[-2000:]
    if stdin is None:
        assert len(out.stdout.decode().splitlines()) == 1 + 40  # the text, then all 40 labels
    else:
        records = [json.loads(line) for line in out.stdout.decode().splitlines()]
        assert [r["id"] for r in records] == list(range(300))
        assert all(len(r["labels"]) == 40 for r in records)


def test_a_k_above_max_k_is_refused_before_any_input_is_read(bundle):
    out = predict_cli("--bundle", str(bundle), "-k", "30", "--max-k", "10", "--jsonl", stdin=b'"never read"\n')
    err = out.stderr.decode()
    assert out.returncode == 1 and out.stdout == b"" and "Traceback" not in err
    assert "-k 30: at most 10 labels per query (max_k), got 30 (the bundle has 40 labels)" in err


def test_predictor_k_checks(bundle):
    from dexml.errors import BundleError, InputError
    from dexml.serve.predictor import Predictor

    predictor = Predictor(bundle, max_k=10)
    assert predictor.check_k(10) == 10 and Predictor(bundle).check_k(10**11) == 40
    with pytest.raises(InputError, match=r"k: at most 10 labels per query \(max_k\), got 20"):
        predictor.predict(["kata"], 20)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(InputError, match=r"k: expected a positive integer"):
            predictor.check_k(bad)
    emb = predictor.embed(["kata"])
    scores, ids = Predictor(bundle).search(emb, 10**11)
    assert scores.shape == ids.shape == (1, 40)  # capped, not padded to k
    # The bundle's own rae.k (from its manifest) is bounded when it is read.
    with pytest.raises(BundleError, match=rf"k {10**11} \(1..{MAX_K}\)"):
        Predictor(bundle, rae={"lambda": 0.5, "temperature": 0.1, "k": 10**11})


# --- predict input: every valid line answered, every bad one named (items 7 and 8) -------

BAD_LINES = [  # (stdin line, what the error says)
    (b"\xff\xfe not utf-8\n", "not valid UTF-8 (invalid start byte at byte 0)"),
    (b'"\\udcff lone surrogate"\n', "not valid Unicode text: a lone surrogate '\\udcff' at character 0"),
    (b'{"text": "ok", "x": \n', "not valid JSON"),
    (b"[1, 2]\n", 'expected a JSON string or an object with a "text" string field, got \'[1, 2]\''),
    (b'{"txt": "a typo"}\n', 'expected a JSON string or an object with a "text" string field'),
    (b'"' + b"a" * (1 << 20) + b'"\n', f"longer than {1 << 20} bytes"),
]


def test_jsonl_answers_every_valid_line_and_reports_each_bad_one(bundle):
    good = [b'"kata sigi"\n', b'{"id": 7, "text": "tuma ribo"}\n']
    stdin = good[0] + b"".join(line for line, _ in BAD_LINES) + b"\n" + good[1]
    out = predict_cli("--bundle", str(bundle), "-k", "3", "--jsonl", stdin=stdin)
    err = out.stderr.decode()
    assert out.returncode == 1 and "Traceback" not in err
    records = [json.loads(line) for line in out.stdout.decode().splitlines()]
    assert len(records) == 2 + len(BAD_LINES)  # one per non-blank input line, in order
    assert records[0]["text"] == "kata sigi" and len(records[0]["labels"]) == 3
    assert records[-1]["id"] == 7 and len(records[-1]["labels"]) == 3
    for lineno, (record, (_, expected)) in enumerate(zip(records[1:-1], BAD_LINES), 2):
        assert record["line"] == lineno and expected in record["error"], record
        assert f"stdin, line {lineno}: " in err


def test_empty_text_gets_a_warning_not_labels_or_an_error_by_flag(bundle):
    out = predict_cli("--bundle", str(bundle), "--jsonl", stdin=b'"   "\n{"id": 1, "text": ""}\n"kata"\n')
    assert out.returncode == 0, out.stderr.decode()
    records = [json.loads(line) for line in out.stdout.decode().splitlines()]
    assert [r["labels"] for r in records[:2]] == [[], []] and len(records[2]["labels"]) == 5
    assert all("empty or whitespace-only text" in r["warning"] for r in records[:2])
    assert "warning: stdin, line 1: empty or whitespace-only text" in out.stderr.decode()

    strict = predict_cli("--bundle", str(bundle), "--empty", "error", " ", "kata")
    assert strict.returncode == 1 and "error: text 1: empty or whitespace-only text" in strict.stderr.decode()
    assert strict.stdout.decode().splitlines()[0] == "kata"  # the other text is still answered


def test_text_arguments_that_are_not_unicode_are_named(bundle):
    out = predict_cli("--bundle", str(bundle), "-k", "2", "kata", os.fsdecode(b"\xff\xfe"))
    err = out.stderr.decode()
    assert out.returncode == 1 and "Traceback" not in err
    assert "error: text 2: not valid Unicode text: a lone surrogate" in err
    assert out.stdout.decode().splitlines()[0] == "kata"

    from dexml.errors import InputError
    from dexml.serve.predictor import Predictor

    with pytest.raises(InputError, match=r"texts\[1\]: not valid Unicode text: a lone surrogate '\\udcff'"):
        Predictor(bundle).predict(["fine", "bad \udcff"], 3)


def test_a_wrong_dim_in_a_resigned_encoder_json_is_a_bundle_error(bundle, tmp_path):
    import shutil

    from dexml.errors import BundleError
    from dexml.serve.bundle import read_manifest, write_manifest
    from dexml.serve.predictor import Predictor

    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    meta_path = copy / "encoder" / "encoder.json"
    meta = json.loads(meta_path.read_text())
    meta["dim"] += 1
    meta_path.write_text(json.dumps(meta))
    m = read_manifest(copy)  # re-signed: the manifest's checksums match the edited file
    write_manifest(copy, dataset=m["dataset"], params=m["params"], metrics=m["metrics"],
                   throughput=m["throughput"], git_rev=None)
    with pytest.raises(BundleError, match=rf"encoder.json: `dim` is {meta['dim']}, but model.onnx returns "
                                          rf"vectors of shape \({meta['dim'] - 1},\)"):
        Predictor(copy).embed(["kata"])
    with pytest.raises(BundleError, match=rf"labels.faiss: vectors of size {meta['dim'] - 1}, but the encoder "
                                          rf"embeds to {meta['dim']}"):
        Predictor(copy).predict(["kata"], 3)
    meta["dim"] = "32"
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(BundleError, match=r"encoder.json: `dim` expected a positive integer, got '32'"):
        Predictor(copy, verify=False)


# --- datasets: one set of checks; a bad download never replaces the last good one (items 2, 7, 9)

def make_bad(root: Path, **overrides) -> Path:
    """test_validate's 4-label dataset with some files replaced; a bytes row is written raw."""
    from test_validate import make_dataset

    rows = {k: v for k, v in overrides.items() if k in ("lbl", "trn", "tst")}
    text = {k: [r for r in v if not isinstance(r, bytes)] for k, v in rows.items()}
    make_dataset(root, **{**overrides, **text})
    for side, items in rows.items():
        if any(isinstance(r, bytes) for r in items):
            with gzip.open(root / f"{side}.json.gz", "wb") as f:
                f.write(b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in items))
    return root


def _bad_rows():
    from test_validate import LABELS, TRN, TST, replace

    ind = "target_ind a list of integers in [0, 4) without duplicates"
    rel = "target_rel (if present) positive numbers, as many as target_ind"
    text = "title and content (if present) strings of valid Unicode (no lone surrogates)"
    # (id, dataset overrides, file, validate's fragment, the reader's fragment)
    return [
        ("truncated JSON line", dict(trn=TRN[:2] + ['{"uid": "c", "title": "thi']), "trn.json.gz",
         '1 row fails "a JSON object per line" (line 3)', "line 3: malformed JSON"),
        ("not UTF-8", dict(tst=[TST[0], b'{"uid": "y", "title": "\xff\xfe", "target_ind": [0]}']), "tst.json.gz",
         '1 row fails "a JSON object per line" (line 2)', "line 2: not valid UTF-8"),
        ("JSON not an object", dict(trn=TRN[:1] + ["[1, 2]"]), "trn.json.gz",
         '1 row fails "a JSON object per line" (line 2)', "line 2: expected a JSON object"),
        ("duplicate uid", dict(trn=replace(TRN, 3, uid="b")), "trn.json.gz",
         '2 rows fail "uid unique" (lines 2, 4)', "line 4: fails \"uid unique\" (uid 'b' is also on line 2)"),
        ("duplicate label uid", dict(lbl=replace(LABELS, 3, uid="L0")), "lbl.json.gz",
         '2 rows fail "uid unique" (lines 1, 4)', "line 4: fails \"uid unique\""),
        ("missing uid", dict(tst=replace(TST, 1, uid=None)), "tst.json.gz",
         '1 row fails "uid present (a non-empty string or an integer)" (line 2)', "line 2: fails \"uid present"),
        ("null label title", dict(lbl=LABELS[:1] + [{"uid": "L1", "title": None}] + LABELS[2:]), "lbl.json.gz",
         '1 row fails "title a non-empty string" (line 2)', 'line 2: fails "title a non-empty string" (got `title` = None)'),
        ("blank title", dict(trn=replace(TRN, 2, title="  ")), "trn.json.gz",
         '1 row fails "title a non-empty string" (line 3)', 'line 3: fails "title a non-empty string"'),
        ("lone surrogate in a label title", dict(lbl=replace(LABELS, 2, title="bad \udcff")), "lbl.json.gz",
         f'1 row fails "{text}" (line 3)', f"line 3: fails \"{text}\" (got `title` = 'bad \\udcff')"),
        ("lone surrogate in content", dict(trn=replace(TRN, 1, content="x \ud800")), "trn.json.gz",
         f'1 row fails "{text}" (line 2)', "line 2: fails \"title and content (if present) strings of valid Unicode"),
        ("content not a string", dict(trn=replace(TRN, 1, content=7)), "trn.json.gz",
         f'1 row fails "{text}" (line 2)', "line 2: fails \"title and content"),
        ("negative target_rel", dict(trn=replace(TRN, 0, target_rel=[1.0, -0.5])), "trn.json.gz",
         f'1 row fails "{rel}" (line 1)', f'line 1: fails "{rel}" (got `target_rel` = [1.0, -0.5])'),
        ("non-numeric target_rel", dict(trn=replace(TRN, 0, target_rel=["high", 1])), "trn.json.gz",
         f'1 row fails "{rel}" (line 1)', f'line 1: fails "{rel}"'),
        ("NaN target_rel", dict(trn=TRN[:1] + ['{"uid": "b", "title": "x", "target_ind": [1], "target_rel": [NaN]}']),
         "trn.json.gz", f'1 row fails "{rel}" (line 2)', f'line 2: fails "{rel}"'),
        ("empty target_rel", dict(trn=replace(TRN, 1, target_rel=[])), "trn.json.gz",
         f'1 row fails "{rel}" (line 2)', f'line 2: fails "{rel}"'),
        ("label out of range", dict(trn=replace(TRN, 1, target_ind=[4])), "trn.json.gz",
         f'1 row fails "{ind}" (line 2)', f'line 2: fails "{ind}" (got `target_ind` = [4])'),
        ("negative label", dict(tst=replace(TST, 2, target_ind=[-1])), "tst.json.gz",
         f'1 row fails "{ind}" (line 3)', f'line 3: fails "{ind}"'),
        ("repeated label", dict(trn=replace(TRN, 1, target_ind=[2, 2])), "trn.json.gz",
         f'1 row fails "{ind}" (line 2)', f'line 2: fails "{ind}"'),
        ("target_ind not a list", dict(trn=replace(TRN, 1, target_ind=2)), "trn.json.gz",
         f'1 row fails "{ind}" (line 2)', f'line 2: fails "{ind}" (got `target_ind` = 2)'),
        ("empty training split", dict(trn=[], filter_trn=""), "trn.json.gz", 'fails "at least one row"', 'fails "at least one row"'),
        ("no labels", dict(lbl=[], trn=[replace(TRN, 3)[3]], tst=[replace(TST, 0, target_ind=[])[0]], filter_trn=""),
         "lbl.json.gz", 'fails "at least one label"', 'fails "at least one label"'),
        ("filter row out of range", dict(filter_tst="0 1\n3 0\n"), "filter_labels_test.txt",
         '1 row fails "filter row in [0, 3)" (line 2)', "line 2: row 3 out of range [0, 3)"),
        ("filter label out of range", dict(filter_trn="0 1\n\n1 7\n"), "filter_labels_train.txt",
         '1 row fails "filter label in [0, 4)" (line 3)', "line 3: label 7 out of range [0, 4)"),
        ("filter line unparseable", dict(filter_trn="0 x\n"), "filter_labels_train.txt",
         '1 row fails "a line "row label" of two integers" (line 1)', "line 1: expected two integers `row label`"),
    ]


BAD_ROWS = _bad_rows()


@pytest.fixture(scope="module")
def good_stats(tiny_dataset_dir, tmp_path_factory) -> bytes:
    """metrics/data.json of the tiny dataset, as the validate stage writes it."""
    from dexml.data.validate import validate_dataset

    tmp = tmp_path_factory.mktemp("stats")
    validate_dataset(tiny_dataset_dir, tmp / "report.json", tmp / "data.json")
    return (tmp / "data.json").read_bytes()


@pytest.mark.parametrize("overrides,file,validate_says,reader_says", [b[1:] for b in BAD_ROWS],
                         ids=[b[0] for b in BAD_ROWS])
def test_every_bad_row_class_is_refused_by_validate_the_reader_and_download(
        tmp_path, tiny_dataset_dir, good_stats, overrides, file, validate_says, reader_says):
    from dexml.data import download
    from dexml.data.dataset import read_dataset
    from dexml.data.validate import validate_dataset
    from dexml.errors import DataError

    bad = make_bad(tmp_path / "bad", **overrides)
    # validate: every failing row named (file, lines, expectation); the statistics untouched
    metrics = tmp_path / "metrics" / "data.json"
    metrics.parent.mkdir()
    metrics.write_bytes(stats := good_stats)
    with pytest.raises(DataError) as e:
        validate_dataset(bad, tmp_path / "report.json", metrics)
    assert f"{bad / file}: {validate_says}" in str(e.value) and "1 problem;" in str(e.value), str(e.value)
    # the reader train uses: the same row refused, named by file, line and field
    with pytest.raises(DataError) as e:
        read_dataset(bad)
    assert f"{bad / file}" in str(e.value) and reader_says in str(e.value), str(e.value)
    # download: the last good dataset and the statistics describing it stay
    out = tmp_path / "data" / "dataset"
    download.materialise(parse_params({"dataset": {"source": "local", "path": str(tiny_dataset_dir)}}).dataset,
                         out, tmp_path / "cache")
    before = snapshot(tmp_path / "data")
    with pytest.raises(DataError) as e:
        download.materialise(parse_params({"dataset": {"source": "local", "path": str(bad)}}).dataset,
                             out, tmp_path / "cache")
    msg = str(e.value)
    assert msg.startswith(f"dataset from {bad} fails a check, so {out} is left as it was: {file}") and reader_says in msg, msg
    assert snapshot(tmp_path / "data") == before and metrics.read_bytes() == stats  # which describe the disk


def test_a_valid_dataset_passes_all_three_alike(tmp_path):
    from test_validate import make_dataset

    from dexml.data.dataset import check_dataset, read_dataset
    from dexml.data.validate import validate_dataset

    root = make_dataset(tmp_path / "ds")
    stats = validate_dataset(root, tmp_path / "r.json", tmp_path / "m.json")
    ds = read_dataset(root)
    assert check_dataset(root) == {"labels": 4, "trn": 5, "tst": 3}
    assert stats["trn"]["points"] == len(ds.trn.uids) == 5 and stats["labels"] == ds.num_labels == 4
    assert ds.trn.uids[4] == "5" and ds.trn.labels[0, 1] == 0.5  # integer uids and relevance kept


def test_cli_download_of_a_bad_dataset_exits_1_and_keeps_the_last_good_one(tmp_path, monkeypatch, capsys):
    """The issue's case: `dexml download -S dataset.source=local -S dataset.path=DIR_WITH_A_TRUNCATED_LINE`."""
    from test_validate import TRN

    from dexml.cli import main as cli

    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("dataset:\n  synthetic: {num_labels: 8, num_train: 20, num_test: 5}\n")
    assert cli(["download"]) == 0 and cli(["validate"]) == 0
    before = snapshot(tmp_path / "data"), (tmp_path / "metrics" / "data.json").read_bytes()
    bad = make_bad(tmp_path / "bad", trn=TRN[:2] + ['{"uid": "c", "title": "thi'])
    assert cli(["download", "-S", "dataset.source=local", "-S", f"dataset.path={bad}"]) == 1
    assert "trn.json.gz, line 3: malformed JSON" in capsys.readouterr().err
    assert (snapshot(tmp_path / "data"), (tmp_path / "metrics" / "data.json").read_bytes()) == before
    assert cli(["validate"]) == 0  # metrics/data.json still describes what is on disk
    assert (tmp_path / "metrics" / "data.json").read_bytes() == before[1]
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["dataset"]  # no temporary left


def test_several_candidate_datasets_are_refused_and_listed(tmp_path, tiny_dataset_dir):
    import shutil
    import zipfile

    from dexml.data import download
    from dexml.errors import DataError

    src = tmp_path / "src"
    for name in ("LF-b", "LF-a"):
        shutil.copytree(tiny_dataset_dir, src / name)
    out = tmp_path / "data" / "dataset"
    with pytest.raises(DataError, match=r"src: 2 subdirectories hold a dataset \(LF-a, LF-b\); expected one"):
        download.materialise(parse_params({"dataset": {"source": "local", "path": str(src)}}).dataset, out, tmp_path / "c")
    archive = tmp_path / "two.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for p in src.rglob("*"):
            if p.is_file():
                zf.write(p, p.relative_to(src).as_posix())
    with pytest.raises(DataError, match=r"2 subdirectories hold a dataset \(LF-a, LF-b\)"):
        download.materialise(parse_params({"dataset": {"source": "local", "path": str(archive)}}).dataset, out, tmp_path / "c")
    assert not out.exists()


@pytest.mark.parametrize("kind", ["zip", "tar.gz"])
def test_a_truncated_archive_is_named_as_such(tmp_path, tiny_dataset_dir, kind):
    import shutil
    import tarfile
    import zipfile

    from dexml.data import download
    from dexml.errors import DataError, TransientError

    archive = tmp_path / f"LF.{kind}"
    if kind == "zip":
        with zipfile.ZipFile(archive, "w") as zf:
            for p in tiny_dataset_dir.iterdir():
                zf.write(p, f"LF/{p.name}")
    else:
        with tarfile.open(archive, "w:gz") as tf:
            tf.add(tiny_dataset_dir, arcname="LF")
    data = archive.read_bytes()
    archive.write_bytes(data[: len(data) // 2])
    out = tmp_path / "data" / "dataset"
    shutil.copytree(tiny_dataset_dir, out)
    before = snapshot(out)
    with pytest.raises(DataError) as e:
        download.materialise(parse_params({"dataset": {"source": "local", "path": str(archive)}}).dataset, out, tmp_path / "c")
    msg = str(e.value)
    assert str(archive) in msg and "not a zip or tar archive" not in msg
    assert ("truncated or corrupt zip archive" if kind == "zip" else "cannot extract") in msg, msg
    assert not isinstance(e.value, TransientError)  # retrying cannot fix it
    assert snapshot(out) == before


# --- the promotion gate decides on metrics DVC recorded (item 3) -------------------------

MAKE_EVALUATION = """\
import json, sys
from pathlib import Path
from dexml.serve.bundle import write_manifest
metrics = json.loads(Path("metrics.in").read_text())
Path("metrics").mkdir(exist_ok=True)
Path("metrics/eval.json").write_text(json.dumps(metrics, indent=2) + "\\n")
write_manifest("artifacts/bundle", dataset="tiny", params={}, metrics=metrics, throughput={}, git_rev=None)
"""
EVALUATE_DVC_YAML = """\
stages:
  evaluate:
    cmd: python make_evaluation.py
    deps: [make_evaluation.py, metrics.in]
    outs: [artifacts/bundle/manifest.json]
    metrics: [{metrics/eval.json: {cache: false}}]
"""


class Project:
    """A real DVC project whose `evaluate` stage writes a bundle's manifest and metrics/eval.json
    (the bundle's encoder/ and index/ are small stand-in files: the gate reads metrics, not models)."""

    def __init__(self, root: Path):
        self.root, self.bundle = root, root / "artifacts" / "bundle"
        self.env = {**os.environ, "PYTHONPATH": str(REPO), "DVC_NO_ANALYTICS": "1",
                    "DVC_SITE_CACHE_DIR": str(root.parent / "dvc-site")}
        for part, name in (("encoder", "model.onnx"), ("index", "labels.jsonl")):
            (self.bundle / part).mkdir(parents=True)
            (self.bundle / part / name).write_text(f"{part} stand-in\n")
        (root / "make_evaluation.py").write_text(MAKE_EVALUATION)
        (root / "dvc.yaml").write_text(EVALUATE_DVC_YAML)
        (root / "params.yaml").write_text("flow: {gate_metric: P@5, min_delta: 0.0, guarded: {P@1: 1.0}}\n")
        self.run("-m", "dvc", "init", "--no-scm", "-q")

    def run(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, *args], cwd=self.root, env=self.env, capture_output=True,
                              text=True, timeout=300)

    def evaluate(self, p5: float) -> None:
        (self.root / "metrics.in").write_text(json.dumps({"P@1": 80.0, "P@5": p5, "PSP@5": 30.0}))
        out = self.run("-m", "dvc", "repro", "-f", "evaluate")
        assert out.returncode == 0, out.stdout + out.stderr

    def promote(self, *args: str) -> subprocess.CompletedProcess:
        return self.run("-m", "dexml.cli", "promote", "--production", "production", *args)


def edit_json(path: Path, **changes) -> None:
    doc = json.loads(path.read_text())
    for key, value in changes.items():
        node = doc
        *parents, last = key.split("__")
        for part in parents:
            node = node[part]
        node[last] = value
    path.write_text(json.dumps(doc, indent=2) + "\n")


def test_a_candidate_with_edited_metrics_is_refused_and_honest_ones_still_gated(tmp_path):
    """The issue's case: P@5 36.10 -> 99.00 in the candidate's manifest.json got it promoted,
    and every honest candidate after it was rejected."""
    from dexml.errors import EXIT_NOT_PROMOTED

    project = Project(tmp_path / "project")
    project.evaluate(40.0)
    assert project.promote().returncode == 0  # the first candidate
    prod = project.root / "production"
    before = snapshot(prod)

    project.evaluate(36.10)
    manifest = project.bundle / "manifest.json"
    edit_json(manifest, **{"metrics__P@5": 99.0})
    for force in ([], ["--force"]):
        out = project.promote(*force)
        assert out.returncode == 1 and "Traceback" not in out.stderr
        assert "artifacts/bundle/manifest.json: not the file the evaluate stage wrote (md5 " in out.stderr
        assert "dvc.lock records" in out.stderr and "cannot be trusted" in out.stderr
        assert snapshot(prod) == before

    # Editing metrics/eval.json to match does not help, nor editing it alone: DVC recorded it too.
    edit_json(project.root / "metrics" / "eval.json", **{"P@5": 99.0})
    assert "manifest.json: not the file the evaluate stage wrote" in project.promote().stderr
    project.evaluate(36.10)
    edit_json(project.root / "metrics" / "eval.json", **{"P@5": 99.0})
    assert "metrics/eval.json: not the file the evaluate stage wrote" in project.promote().stderr
    assert snapshot(prod) == before

    project.evaluate(36.10)  # the honest numbers again: gated, not promoted
    out = project.promote()
    assert out.returncode == EXIT_NOT_PROMOTED and "gate P@5 did not improve: 40.00 -> 36.10" in out.stderr
    project.evaluate(41.0)  # an honest better candidate is promoted
    assert project.promote().returncode == 0
    assert json.loads((prod / "current" / "manifest.json").read_text())["metrics"]["P@5"] == 41.0


def test_a_bundle_without_a_dvc_record_is_refused_naming_the_fix(tmp_path):
    from test_promote import make_bundle

    from dexml.config import FlowParams
    from dexml.errors import BundleError
    from dexml.pipeline.promote import gate_and_promote

    bundle = make_bundle(tmp_path / "p", 40.0, "a")
    (tmp_path / "p" / "dvc.lock").unlink()  # evaluated by hand, outside DVC
    for force in (False, True):
        with pytest.raises(BundleError, match=r"dvc.lock: not found; the gate trusts only metrics that the "
                                              r"evaluate stage recorded in DVC: rerun it \(`dvc repro evaluate` in"):
            gate_and_promote(bundle, tmp_path / "prod", FlowParams(), force=force)
    assert not (tmp_path / "prod").exists()


def test_a_manifest_of_another_format_version_is_refused(tmp_path):
    from test_promote import make_bundle

    from dexml.errors import BundleError
    from dexml.serve.bundle import verify_bundle

    bundle = make_bundle(tmp_path / "p", 40.0, "a")
    for version in (2, None, "1"):
        edit_json(bundle / "manifest.json", format_version=version)
        with pytest.raises(BundleError, match=rf"manifest.json: format_version {version!r}, but this dexml reads "
                                              r"bundles of format_version 1"):
            verify_bundle(bundle)


# --- recovery: a kill at any switch point is undone or finished by the next command (item 6)

def dexml(cwd: Path, *args: str, crash_at: str | None = None, preexec=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("DEXML_CRASH_AT", None)
    if crash_at:
        env["DEXML_CRASH_AT"] = crash_at
    return subprocess.run([sys.executable, "-m", "dexml.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300, preexec_fn=preexec)


@pytest.mark.parametrize("point", ["atomic_dir:before-swap", "atomic_dir:moved-aside", "atomic_dir:swapped"])
def test_a_download_killed_inside_the_swap_is_recovered_by_the_next_command(tmp_path, tiny_dataset_dir, point):
    from dexml.data.dataset import read_dataset

    (tmp_path / "params.yaml").write_text("dataset:\n  synthetic: {num_labels: 8, num_train: 20, num_test: 5}\n")
    assert dexml(tmp_path, "download").returncode == 0
    old = snapshot(tmp_path / "data" / "dataset")
    new = ["-S", "dataset.source=local", "-S", f"dataset.path={tiny_dataset_dir}"]
    killed = dexml(tmp_path, "download", *new, crash_at=point)
    assert killed.returncode == -9  # SIGKILL: nothing ran after the point
    # Whatever the point, the next reader sees a whole dataset: the old one, or the new one once
    # it was in place (a missing one is put back from where the swap had moved it).
    ds = read_dataset(tmp_path / "data" / "dataset")
    assert ds.num_labels == (40 if point == "atomic_dir:swapped" else 8)
    # The next download finishes the job and leaves nothing behind.
    assert dexml(tmp_path, "download", *new).returncode == 0
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["dataset"]
    assert read_dataset(tmp_path / "data" / "dataset").num_labels == 40
    assert snapshot(tmp_path / "data" / "dataset") != old


def production_state(prod: Path) -> dict:
    link = lambda name: os.readlink(prod / name) if (prod / name).is_symlink() else None  # noqa: E731
    return {"current": link("current"), "previous": link("previous"),
            "releases": sorted(p.name for p in (prod / "releases").iterdir()),
            "other": sorted(p.name for p in prod.iterdir() if p.name not in ("current", "previous", "releases", ".lock"))}


@pytest.fixture
def production(tmp_path):
    """Three candidate projects (P@5 40, 41, 42) and production holding the first two."""
    from test_promote import make_bundle

    (tmp_path / "params.yaml").write_text("flow: {guarded: {}}\n")
    bundles = [str(make_bundle(tmp_path / name, p5, name)) for name, p5 in (("a", 40.0), ("b", 41.0), ("c", 42.0))]
    for bundle in bundles[:2]:
        assert dexml(tmp_path, "promote", "--bundle", bundle, "--production", "prod").returncode == 0
    return tmp_path, bundles


@pytest.mark.parametrize("point,switched", [("promote:release-installed", False), ("promote:journal-written", True),
                                            ("promote:previous-switched", True), ("promote:current-switched", True)])
def test_a_promotion_killed_between_the_switches_is_finished_and_rollback_still_works(production, point, switched):
    from dexml.serve.bundle import verify_bundle

    root, (a, b, c) = production
    prod = root / "prod"
    before = production_state(prod)
    killed = dexml(root, "promote", "--bundle", c, "--production", "prod", crash_at=point)
    assert killed.returncode == -9
    verify_bundle(prod / "current")  # what serves is always a whole release
    # The next command first finishes the switch (or drops the orphan copy), then does its job.
    assert dexml(root, "rollback", "--production", "prod").returncode == 0
    after = production_state(prod)
    assert after["other"] == [] and len(after["releases"]) == 2  # no journal, temp link or orphan left
    if switched:  # c was promoted (b became previous), and rollback went back to b
        assert after["current"] == before["current"] and after["previous"] not in (before["current"], before["previous"])
    else:  # the promotion never happened: rollback went from b to a, as it would have anyway
        assert (after["current"], after["previous"]) == (before["previous"], before["current"])
    verify_bundle(prod / "current")
    verify_bundle(prod / "previous")


def test_a_missing_current_release_can_be_rolled_back_or_replaced_but_is_not_gated(production):
    import shutil

    root, (a, b, c) = production
    prod = root / "prod"
    current = (prod / "current").resolve()
    shutil.rmtree(current)
    before = snapshot(prod)
    out = dexml(root, "promote", "--bundle", c, "--production", "prod")
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert (f"points to releases/{current.name}, which does not exist: there is no production bundle to compare "
            "with. `dexml rollback` restores the previous release") in out.stderr
    assert snapshot(prod) == before  # refused before anything changed
    forced = dexml(root, "promote", "--bundle", c, "--production", "prod", "--force")
    assert forced.returncode == 0, forced.stderr
    state = production_state(prod)
    assert state["previous"] is not None and (prod / "previous").resolve().is_dir()  # a's release, kept
    shutil.rmtree((prod / "current").resolve())
    assert dexml(root, "rollback", "--production", "prod").returncode == 0  # back to a
    assert json.loads((prod / "current" / "manifest.json").read_text())["metrics"]["P@5"] == 40.0
    assert not (prod / "previous").exists()


@pytest.mark.parametrize("command", [["promote", "--bundle", "{c}"], ["promote", "--bundle", "{c}", "--force"],
                                     ["rollback"]])
def test_a_current_that_is_a_plain_directory_is_refused_before_anything_changes(production, command):
    import shutil

    root, (a, b, c) = production
    prod = root / "prod"
    shutil.rmtree(prod)
    shutil.copytree(c, prod / "current")  # someone copied a bundle in by hand
    before = snapshot(prod)
    out = dexml(root, *[part.format(c=c) for part in command], "--production", "prod")
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert f"{prod.relative_to(root) / 'current'} is a directory, not a link to a release" in out.stderr
    assert snapshot(prod) == before and not (prod / "releases").exists()  # no orphan release


def _small_files():
    import signal

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # then writing past the limit fails with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (200, 200))


def test_a_full_disk_during_promotion_is_a_message_and_production_is_unchanged(production):
    """RLIMIT_FSIZE (EFBIG) stands in for ENOSPC: the same OSError from the same writes."""
    root, (a, b, c) = production
    prod = root / "prod"
    before = snapshot(prod)
    out = dexml(root, "promote", "--bundle", c, "--production", "prod", preexec=_small_files)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    assert f"cannot install the release in {prod.relative_to(root) / 'releases'}: File too large" in out.stderr
    assert "production is unchanged" in out.stderr
    assert snapshot(prod) == before


# --- the flow's download retries: transient failures only (item 8) -------------------------

def test_the_download_task_retries_only_transient_failures():
    """The retry condition on real Prefect states (tests/test_flow.py runs it in whole flows:
    a dataset that fails a check is not retried, a path not there yet is)."""
    from prefect.states import Completed, Failed
    from test_flow import flows

    retrain = flows()
    transient = retrain.StageFailed("stage download failed", transient=True)
    permanent = retrain.StageFailed("stage download failed")
    assert retrain.retry_if_transient(None, None, Failed(data=transient))
    assert not retrain.retry_if_transient(None, None, Failed(data=permanent))
    assert not retrain.retry_if_transient(None, None, Failed(data=ValueError("not a stage")))
    assert not retrain.retry_if_transient(None, None, Completed(data=1))


def test_exit_statuses_are_documented_in_the_help():
    promote = dexml(REPO, "promote", "--help")
    assert promote.returncode == 0 and "3 not promoted (the gate said no; production unchanged)" in promote.stdout
    predict = dexml(REPO, "predict", "--help")
    assert predict.returncode == 0 and "1 an error" in predict.stdout and "--max-k" in predict.stdout
    readme = (REPO / "README.md").read_text()
    assert "| 3 | `dexml promote`: not promoted" in readme and "| 75 | `dexml download`: a transient" in readme


def test_a_truncated_archive_from_a_url_says_how_to_fetch_it_again(tmp_path):
    from test_download import Server, lf_zip

    from dexml.data import download
    from dexml.errors import DataError

    server = Server()
    try:
        whole = lf_zip()
        server.files["/LF.zip"] = whole[: len(whole) // 2]  # the server itself sends a short file
        ds = parse_params({"dataset": {"source": "url", "url": server.url + "/LF.zip"}}).dataset
        out, cache = tmp_path / "data" / "dataset", tmp_path / "cache"
        with pytest.raises(DataError, match=r"LF.zip: a truncated or corrupt zip archive \(\d+ bytes\); delete "
                                            r".*LF.zip and rerun to download it again"):
            download.materialise(ds, out, cache)
        assert not out.exists()
        (cached,) = cache.rglob("LF.zip")
        cached.unlink()
        server.files["/LF.zip"] = whole
        download.materialise(ds, out, cache)
        assert (out / "trn.json.gz").is_file()
    finally:
        server.httpd.shutdown()
        server.httpd.server_close()
