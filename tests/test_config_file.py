"""python train.py --config FILE: a run's settings from JSON or YAML, overridden by flags, checked key by key."""

import json

import pytest
import torch
from conftest import cli
from safetensors.torch import load_file

import train


def test_a_runs_own_train_config_reproduces_its_biases_exactly(tiny_model_dir, alpaca_file, tmp_path, capsys):
    first, again = tmp_path / "first", tmp_path / "again"
    argv = ["--model", tiny_model_dir, "--data", alpaca_file, "--max-steps", "3", "--batch-size", "2",
            "--grad-accum", "2", "--lr", "3e-3", "--seed", "7", "--eval-size", "2", "--max-len", "48",
            "--bias-terms", "query,mlp-in", "--output-dir", str(first)]
    assert cli(train.main, argv, capsys)[0] == 0
    status, _, err = cli(train.main, ["--config", str(first / "train_config.json"), "--output-dir", str(again)],
                         capsys)
    assert status == 0, err
    expected, reproduced = load_file(first / "bias.safetensors"), load_file(again / "bias.safetensors")
    assert expected.keys() == reproduced.keys()
    for name, tensor in expected.items():
        assert torch.equal(reproduced[name], tensor), name
    settings = [json.loads((folder / "train_config.json").read_text()) for folder in (first, again)]
    assert {**settings[0], "output_dir": None} == {**settings[1], "output_dir": None}


def write_yaml(tmp_path, text, name="settings.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_flags_override_the_file(tmp_path):
    path = write_yaml(tmp_path, "mode: bitfit\nlr: 2e-3\nseed: 7\nmax_len: 64\nlimit: null\neval_size: 0.1\n"
                                "group_by_length: true\n")
    config = train.parse_args(["--config", path])[0]
    assert (config.lr, config.seed, config.max_len, config.limit, config.eval_size) == (0.002, 7, 64, None, 0.1)
    assert config.group_by_length and config.output_dir == "runs/bitfit"
    config = train.parse_args(["--config", path, "--lr", "5e-4", "--seed", "1", "--output-dir", "elsewhere"])[0]
    assert (config.lr, config.seed, config.max_len, config.output_dir) == (5e-4, 1, 64, "elsewhere")


def test_mode_on_the_command_line_brings_its_own_default_lr_and_folder(tmp_path):
    # A BitFit run's train_config.json holds lr 1e-3 and runs/bitfit, as resolved from its mode.
    saved = train.parse_args([])[0].to_dict()
    path = tmp_path / "train_config.json"
    path.write_text(json.dumps(saved))
    config = train.parse_args(["--config", str(path), "--mode", "full"])[0]
    assert (config.mode, config.lr, config.output_dir) == ("full", 5e-5, "runs/full")
    path.write_text(json.dumps({**saved, "lr": 3e-3, "output_dir": "runs/mine"}))  # chosen, not defaults: kept
    config = train.parse_args(["--config", str(path), "--mode", "full"])[0]
    assert (config.lr, config.output_dir) == (3e-3, "runs/mine")


REFUSED = {
    "unknown key": ("learning_rate: 0.01\n", "unknown setting 'learning_rate' (the settings are: mode, model, "),
    "misspelt key": ("bias_term: query\n", "unknown setting 'bias_term' (did you mean 'bias_terms'?)"),
    "flag spelling": ("max-len: 64\n", "unknown setting 'max-len' (did you mean 'max_len'?)"),
    "text for a number": ("batch_size: '8'\n", "batch_size must be an integer, got '8'"),
    "fraction for an integer": ("grad_accum: 2.5\n", "grad_accum must be an integer, got 2.5"),
    "number for a switch": ("compile: 1\n", "compile must be true or false, got 1"),
    "switch for a number": ("max_steps: true\n", "max_steps must be an integer or null, got True"),
    "out of range": ("batch_size: 0\n", "batch_size must be a positive number, got 0"),
    "warmup out of range": ("warmup_ratio: 1.5\n", "warmup_ratio must be in [0, 1), got 1.5"),
    "combination": ("eval_every: 5\n", "eval_every needs eval_size: there is nothing to evaluate on"),
    "unknown choice": ("mode: lora\n", "mode must be one of bitfit, full; got 'lora'"),
    "not yaml": ("mode: [bitfit\n", "not valid YAML"),
    "a list": ("- mode: full\n", "expected settings as key: value pairs, found a list"),
    "empty": ("", "expected settings as key: value pairs, found nothing"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_a_bad_config_file_is_refused_in_one_line_naming_the_key(case, tmp_path, capsys):
    text, expected = REFUSED[case]
    path = write_yaml(tmp_path, text)
    out = tmp_path / "run"
    status, _, err = cli(train.main, ["--config", path, "--output-dir", str(out)], capsys)
    assert status == 2
    assert err.count("\n") == 1 and err.startswith(f"error: {path}: {expected}"), err
    assert not out.exists()


@pytest.mark.parametrize("name, text, expected", [
    ("settings.json", '{"seed": 1,}', "not valid JSON (Expecting property name enclosed in double quotes at line 1)"),
    ("settings.toml", "seed = 1", "expected a .json, .yaml or .yml file"),
    ("missing.yaml", None, "no such file"),
])
def test_an_unreadable_config_file_is_refused_in_one_line(name, text, expected, tmp_path, capsys):
    path = tmp_path / name
    if text is not None:
        path.write_text(text)
    status, _, err = cli(train.main, ["--config", str(path)], capsys)
    assert status == 2
    assert err.count("\n") == 1 and expected in err, err


def test_config_and_resume_do_not_go_together(tmp_path, capsys):
    path = write_yaml(tmp_path, "seed: 1\n")
    status, _, err = cli(train.main, ["--config", path, "--resume", str(tmp_path)], capsys)
    assert status == 2
    assert err.count("\n") == 1 and "--config starts a new run" in err
