"""Paper presets: each validates, prints usable -S arguments, and starts training with a tiny stand-in."""
from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
import yaml
from conftest import REPO

from dexml.config import load_params, parse_params, set_dotted
from dexml.errors import ConfigError
from dexml.pipeline.presets import PRESETS, get_preset
from dexml.train.loop import train


def test_presets_hold_the_papers_settings():
    wiki = load_params(REPO / "params.yaml", get_preset("LF-Wikipedia-500K"))
    assert (wiki.model.tau, wiki.model.normalize, wiki.train.batch_size, wiki.train.lr) == (1.0, False, 768, 7e-5)
    eur = load_params(REPO / "params.yaml", get_preset("EURLex-4K"))
    assert (eur.model.query_max_len, eur.model.pooling, eur.train.batch_size, eur.model.tau) == (128, "cls", 512, 0.05)
    amz = load_params(REPO / "params.yaml", get_preset("LF-AmazonTitles-1.3M"))
    assert (amz.model.label_max_len, amz.train.lr, amz.model.normalize, amz.negatives.mode) == (32, 3e-4, False, "cached")
    assert wiki.negatives.mode == "cached" and wiki.negatives.refresh_steps > amz.negatives.refresh_steps  # lower lr
    assert eur.negatives.mode == "all"  # 4K labels: all-label training is affordable
    with pytest.raises(ConfigError, match="unknown preset"):
        get_preset("EURLex-5K")


def test_cli_prints_set_args_that_round_trip(tmp_path):
    out = subprocess.run([sys.executable, "-m", "dexml.cli", "preset", "LF-AmazonTitles-131K",
                          "--params", str(REPO / "params.yaml")], capture_output=True, text=True, check=True)
    args = out.stdout.split()
    pairs = dict(a.split("=", 1) for a in args[1::2])
    assert set(args[0::2]) == {"-S"} and pairs.keys() == PRESETS["LF-AmazonTitles-131K"].keys()
    parsed = {k: yaml.safe_load(v) for k, v in pairs.items()}
    assert parsed == PRESETS["LF-AmazonTitles-131K"]

    params = tmp_path / "params.yaml"
    shutil.copy(REPO / "params.yaml", params)
    subprocess.run([sys.executable, "-m", "dexml.cli", "preset", "EURLex-4K", "--apply", "--params", str(params)],
                   check=True, capture_output=True)
    assert load_params(params).train.batch_size == 512


def test_apply_keeps_the_params_files_comments(tmp_path):
    params = tmp_path / "params.yaml"
    shutil.copy(REPO / "params.yaml", params)
    before = (REPO / "params.yaml").read_text()
    subprocess.run([sys.executable, "-m", "dexml.cli", "preset", "EURLex-4K", "--apply", "--params", str(params)],
                   check=True, capture_output=True)
    after = params.read_text()
    comments = [line.split("#", 1)[1].strip() for line in before.splitlines() if "#" in line]
    assert comments and all(c in after for c in comments)
    assert load_params(params).model.query_max_len == 128
    # only the preset's keys changed: every other line is as it was
    changed = set(before.splitlines()) - set(after.splitlines())
    preset_leaves = {k.rsplit(".", 1)[1] for k in PRESETS["EURLex-4K"]}
    assert all(line.split(":")[0].strip() in preset_leaves for line in changed), changed


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_each_preset_starts_training_with_a_tiny_stand_in(name, tiny_params, tiny_dataset_dir, tmp_path):
    raw = tiny_params()
    for key, value in get_preset(name).items():
        set_dotted(raw, key, value)
    # The stand-in: tiny encoder and data, CPU precision, one small step.
    set_dotted(raw, "model.encoder", tiny_params()["model"]["encoder"])
    set_dotted(raw, "train.amp", "off")
    set_dotted(raw, "train.batch_size", 16)
    set_dotted(raw, "train.max_steps", 1)
    shutil.copytree(tiny_dataset_dir, tmp_path / "data" / "dataset")
    metrics = train(parse_params(raw), tmp_path)
    assert metrics["steps"] == 1
    assert (tmp_path / "models" / "encoder" / "dexml_encoder.json").exists()
