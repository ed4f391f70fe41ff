"""The reliability probe (issue 13), recorded: every class of bad input a user can type, download
or promote, each asserting that the message names the file / field / limit and that nothing on
disk changed. Fast except where marked."""
from __future__ import annotations

import pytest

from dexml.config import MAX_K, load_params, parse_overrides, parse_params
from dexml.errors import ConfigError

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
    ("loss.name=hinge", "override `loss.name=hinge`: expected one of ['softmax'"),
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
