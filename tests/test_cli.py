"""The command-line tools: a default run end to end, and one clear line for each bad input."""

import json
import os
import shutil
import subprocess
import sys

import pytest
from conftest import ROOT, cli, error_lines, folder_bytes, leftovers

import generate
import train


def script(*args, cwd):
    return subprocess.run([sys.executable, *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def test_default_run_end_to_end_then_generate(tmp_path):
    out = tmp_path / "bitfit"
    done = script(ROOT / "train.py", "--mode", "bitfit", "--output-dir", out, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    summary = json.loads((out / "summary.json").read_text())
    required = {"mode", "model", "trainable_params", "total_params", "trainable_percent",
                "optimizer_steps", "samples", "tokens", "train_loss", "seconds", "samples_per_s",
                "tokens_per_s", "peak_memory_bytes", "peak_rss_bytes", "device", "dropped_rows"}
    assert required <= set(summary)
    assert summary["mode"] == "bitfit" and summary["peak_memory_bytes"] is None  # CPU
    assert 0 < summary["trainable_percent"] < 1
    assert summary["optimizer_steps"] == -(-summary["samples"] // 8)  # batch 1 x accum 8, 1 epoch
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines][:2] == [10, 20]
    assert lines[-1]["step"] == summary["optimizer_steps"]
    assert lines[-1]["loss"] < lines[0]["loss"]  # the biases learn something
    assert (out / "bias.safetensors").stat().st_size < 200_000
    assert "train loss" in done.stdout and "trainable params" in done.stdout

    shown = script(ROOT / "generate.py", "--bias", out, "--compare", "--max-new-tokens", "8",
                   cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert "### Base model" in shown.stdout and "### With bias delta" in shown.stdout


def test_full_mode_writes_a_loadable_model_folder(tiny_model_dir, alpaca_file, tmp_path, capsys):
    out = tmp_path / "full"
    status, stdout, err = cli(train.main, ["--mode", "full", "--model", tiny_model_dir, "--data",
                                           alpaca_file, "--max-steps", "2", "--output-dir", str(out)],
                              capsys)
    assert status == 0, err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["trainable_params"] == summary["total_params"]
    mask = os.umask(0)
    os.umask(mask)
    assert {file.stat().st_mode & 0o777 for file in out.rglob("*") if file.is_file()} == {0o666 & ~mask}
    status, stdout, err = cli(generate.main, ["--model", str(out / "model"), "--max-new-tokens", "4"],
                              capsys)
    assert status == 0, err
    assert "### Base model" in stdout


def bad_runs(tmp_path, tiny_model_dir, alpaca_file):
    not_json = tmp_path / "broken.json"
    not_json.write_text("{oops")
    empty = tmp_path / "empty.json"
    empty.write_text("")
    no_output = tmp_path / "no_output.json"
    no_output.write_text(json.dumps([{"instruction": "a", "response": "b"}]))
    truncated = tmp_path / "truncated-model"
    shutil.copytree(tiny_model_dir, truncated)
    weights = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(weights[:len(weights) // 2])
    data = ["--model", tiny_model_dir, "--data", alpaca_file]
    return {
        "missing data file": (["--data", str(tmp_path / "nope.json")], "data file not found"),
        "invalid json": (["--data", str(not_json)], "not a valid JSON file"),
        "empty data file": (["--data", str(empty)], "data file is empty"),
        "missing column": (["--data", str(no_output)], "its columns (instruction, response) fit no data format"),
        "missing model": (["--model", str(tmp_path / "no-model")], "model folder not found"),
        "truncated model weights": (["--model", str(truncated), "--data", alpaca_file],
                                    "could not load model"),
        "unknown mode": (["--mode", "lora"], "invalid choice: 'lora'"),
        "batch size": ([*data, "--batch-size", "0"], "--batch-size must be a positive number"),
        "grad accum": ([*data, "--grad-accum", "-2"], "--grad-accum must be a positive number"),
        "max len": ([*data, "--max-len", "0"], "--max-len must be a positive number"),
        "lr": ([*data, "--lr", "0"], "--lr must be a positive number"),
        "lr nan": ([*data, "--lr", "nan"], "--lr must be a positive number"),
        "lr beyond float32": ([*data, "--lr", "1e39"], "--lr must be at most 1e+30"),
        "weight decay inf": ([*data, "--weight-decay", "inf"], "--weight-decay must be a finite number"),
        "weight decay nan": ([*data, "--weight-decay", "nan"], "--weight-decay must be a finite number"),
        "weight decay x lr": ([*data, "--weight-decay", "1000"], "must be below 1"),
        "warmup ratio nan": ([*data, "--warmup-ratio", "nan"], "--warmup-ratio must be in [0, 1)"),
        "max grad norm inf": ([*data, "--max-grad-norm", "inf"], "--max-grad-norm must be a positive number"),
        "seed beyond 64 bits": ([*data, "--seed", str(2**64)], "--seed must be a whole number from 0"),
        "negative seed": ([*data, "--seed", "-1"], "--seed must be a whole number from 0"),
        "all rows dropped": ([*data, "--max-len", "4"], "rows was dropped"),
        "resume and overwrite": (["--resume", str(tmp_path / "run")], "give one of them"),
    }


CASES = ["missing data file", "invalid json", "empty data file", "missing column", "missing model",
         "truncated model weights", "unknown mode", "batch size", "grad accum", "max len", "lr", "lr nan",
         "lr beyond float32", "weight decay inf", "weight decay nan", "weight decay x lr", "warmup ratio nan",
         "max grad norm inf", "seed beyond 64 bits", "negative seed", "all rows dropped",
         "resume and overwrite"]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_gives_one_line_and_keeps_earlier_files(case, tmp_path, tiny_model_dir, alpaca_file,
                                                         earlier_run, capsys):
    argv, expected = bad_runs(tmp_path, tiny_model_dir, alpaca_file)[case]
    before = folder_bytes(earlier_run)
    # --overwrite: the earlier run may be replaced, but only by a run that succeeds.
    status, _, err = cli(train.main, [*argv, "--output-dir", str(earlier_run), "--overwrite"], capsys)
    lines = error_lines(err)
    assert status == 2
    assert len(lines) == 1 and expected in lines[0], err
    assert folder_bytes(earlier_run) == before
    assert leftovers(earlier_run) == []


def test_divergence_is_its_own_error_in_one_line_and_keeps_earlier_files(tmp_path, tiny_model_dir, alpaca_file,
                                                                         earlier_run, capsys):
    """A run whose loss becomes inf or NaN is not the user's input at fault: its own line, its own exit status."""
    before = folder_bytes(earlier_run)
    argv = ["--model", tiny_model_dir, "--data", alpaca_file, "--lr", "1e30", "--max-steps", "4",
            "--output-dir", str(earlier_run), "--overwrite"]
    status, _, err = cli(train.main, argv, capsys)
    lines = error_lines(err)
    assert status == 3
    assert len(lines) == 1 and lines[0].startswith("diverged: the loss became non-finite at optimizer step"), err
    assert folder_bytes(earlier_run) == before
    assert leftovers(earlier_run) == []


def test_bad_input_from_the_real_script_has_no_traceback(tmp_path):
    done = script(ROOT / "train.py", "--data", tmp_path / "missing.json", cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [f"error: data file not found: {tmp_path / 'missing.json'}"]


@pytest.mark.parametrize("argv, expected", [
    (["--bias", "no/such/run"], "bias delta not found"),
    (["--compare"], "--compare needs --bias"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be a positive number"),
    (["--batch-size", "0"], "--batch-size must be a positive number"),
    (["--prompt", "a", "--prompts", "b.txt"], "not allowed with argument --prompt"),
    (["--prompts", "b.txt", "--input", "c"], "--input goes with --prompt"),
    (["--temperature", "nan"], "--temperature must be a finite number >= 0"),
    (["--temperature", "inf"], "--temperature must be a finite number >= 0"),
    (["--prompt", ""], "--prompt is empty"),
    (["--prompt", "  "], "--prompt is empty"),
    (["--seed", str(2**64)], "--seed must be a whole number from 0"),
])
def test_generate_rejects_bad_input_in_one_line(argv, expected, capsys):
    status, _, err = cli(generate.main, argv, capsys)
    assert status == 2
    assert err.count("\n") == 1 and expected in err


def test_max_len_beyond_the_models_positions_is_capped_and_said(tiny_model_dir, tmp_path, capsys):
    data = tmp_path / "long.json"  # a row far longer than the model's 128 positions
    data.write_text(json.dumps([{"instruction": "Repeat the word three hundred times.", "input": "word",
                                 "output": "word " * 300}] * 2))
    out = tmp_path / "run"
    status, stdout, err = cli(train.main, ["--model", tiny_model_dir, "--data", str(data), "--max-len", "2000",
                                           "--max-steps", "1", "--output-dir", str(out)], capsys)
    assert status == 0, err
    assert f"--max-len 2000 is more than the 128 positions of {tiny_model_dir}: examples are cut at 128" in stdout
    assert json.loads((out / "train_config.json").read_text())["max_len"] == 128


def test_generate_caps_new_tokens_at_the_models_positions(tiny_model_dir, capsys):
    status, stdout, err = cli(generate.main, ["--model", tiny_model_dir, "--max-new-tokens", "1000"], capsys)
    assert status == 0, err
    assert "--max-new-tokens 1000 capped at" in err and "reads at most 128 positions" in err
    assert "### Base model" in stdout


def test_generate_refuses_a_prompt_longer_than_the_models_positions(tiny_model_dir, capsys):
    status, stdout, err = cli(generate.main, ["--model", tiny_model_dir, "--prompt", "word " * 200], capsys)
    assert status == 2
    assert err.count("\n") == 1 and "reads at most 128: no room is left for an answer" in err, err
    assert stdout == ""


def test_generate_prints_each_batch_as_it_finishes_under_a_progress_bar(tiny_model_dir, tmp_path, capsys,
                                                                        monkeypatch):
    import bitfit.model.generation
    from bitfit.errors import InputError

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(f"Say {number}." for number in range(1, 6)))
    answer = bitfit.model.generation.generate_answers
    batches = []

    def fails_on_the_third_batch(model, tokenizer, instructions, **kwargs):
        batches.append([instruction for instruction, _ in instructions])
        if len(batches) == 3:
            raise InputError("stopped in the third batch")
        return answer(model, tokenizer, instructions, **kwargs)

    monkeypatch.setattr(bitfit.model.generation, "generate_answers", fails_on_the_third_batch)
    status, stdout, err = cli(generate.main, ["--model", tiny_model_dir, "--prompts", str(prompts),
                                              "--batch-size", "2", "--max-new-tokens", "2"], capsys)
    assert status == 2 and "stopped in the third batch" in err
    assert batches == [["Say 1.", "Say 2."], ["Say 3.", "Say 4."], ["Say 5."]]
    # The first two batches' answers were out before the third began.
    assert "### Prompt 4 of 5\nSay 4." in stdout and "### Prompt 5 of 5" not in stdout
    assert "4/5 [" in err  # the bar, on stderr, had counted them
