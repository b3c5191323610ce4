"""Evaluation on held-out rows, checkpoints, --resume and Ctrl-C."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, ROWS, error_lines, folder_bytes, leftovers, metric_lines
from safetensors.torch import load_file

import train
from bitfit.cli import run_main
from bitfit.config import TrainConfig
from bitfit.core.examples import IGNORE_INDEX
from bitfit.data.rows import load_rows, split_rows
from bitfit.data.tokenize import tokenize_rows
from bitfit.errors import Interrupted
from bitfit.model.loading import load_model_and_tokenizer
from bitfit.store.checkpoint import load_training_state
from bitfit.store.metrics import MetricsLog
from bitfit.training.run import run


def settings(tiny_model_dir, alpaca_file, output_dir, **overrides):
    return TrainConfig(**{"model": tiny_model_dir, "data": alpaca_file, "output_dir": str(output_dir),
                          "batch_size": 2, "grad_accum": 2, "max_steps": 4, "log_every": 1,
                          "eval_size": 2, "eval_every": 1, **overrides})


def test_held_out_rows_are_seeded_and_disjoint(alpaca_file):
    rows = load_rows(alpaca_file)
    train_rows, eval_rows = split_rows(rows, 0.3, seed=1)
    assert len(eval_rows) == 3 and len(train_rows) == 7
    assert sorted(map(json.dumps, train_rows + eval_rows)) == sorted(map(json.dumps, rows))
    assert split_rows(rows, 3, seed=1) == (train_rows, eval_rows)
    assert split_rows(rows, 3, seed=2) != (train_rows, eval_rows)


def test_eval_loss_before_is_the_base_models_token_weighted_loss(tiny_model_dir, alpaca_file, tmp_path):
    config = settings(tiny_model_dir, alpaca_file, tmp_path / "run", eval_size=3, max_steps=2)
    summary = run(config, log=lambda message: None)
    model, tokenizer = load_model_and_tokenizer(tiny_model_dir)
    _, eval_rows = split_rows(load_rows(alpaca_file), 3, seed=config.seed)
    examples, _ = tokenize_rows(eval_rows, tokenizer, config.max_len)
    with torch.no_grad():
        losses = [F.cross_entropy(model(input_ids=torch.tensor([e["input_ids"]])).logits[0, :-1],
                                  torch.tensor(e["labels"][1:]), ignore_index=IGNORE_INDEX, reduction="sum")
                  for e in examples]
    tokens = sum(sum(label != IGNORE_INDEX for label in e["labels"][1:]) for e in examples)
    assert summary["eval_loss_before"] == pytest.approx(float(sum(losses)) / tokens, rel=1e-5)
    assert summary["eval_perplexity_after"] == pytest.approx(torch.exp(torch.tensor(summary["eval_loss_after"])).item())
    evals = [line for line in metric_lines(tmp_path / "run") if "eval_loss" in line]
    assert [line["step"] for line in evals] == [0, 1, 2]


def test_resume_gives_the_same_biases_and_metrics_as_a_straight_run(tiny_model_dir, alpaca_file, tmp_path,
                                                                     monkeypatch):
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    run(settings(tiny_model_dir, alpaca_file, straight), log=lambda message: None)

    write = MetricsLog.write

    def ctrl_c_after_step_two(self, record):  # as if the user pressed Ctrl-C during step 2
        write(self, record)
        if record["step"] == 2 and "loss" in record:
            signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(MetricsLog, "write", ctrl_c_after_step_two)
    with pytest.raises(Interrupted, match="checkpoint saved at optimizer step 2 of 4"):
        run(settings(tiny_model_dir, alpaca_file, stopped), log=lambda message: None)
    monkeypatch.setattr(MetricsLog, "write", write)
    assert not (stopped / "bias.safetensors").exists()

    state = load_training_state(str(stopped))
    assert state["progress"]["step"] == 2
    summary = run(settings(tiny_model_dir, alpaca_file, stopped), state, log=lambda message: None)
    assert summary["optimizer_steps"] == 4
    expected, resumed = load_file(straight / "bias.safetensors"), load_file(stopped / "bias.safetensors")
    for name, tensor in expected.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=1e-5, atol=1e-6)
    assert metric_lines(stopped) == metric_lines(straight)
    straight_summary = json.loads((straight / "summary.json").read_text())
    assert summary["train_loss"] == pytest.approx(straight_summary["train_loss"], rel=1e-6)


def test_a_checkpoint_written_before_tokens_with_padding_still_resumes(tiny_model_dir, alpaca_file, tmp_path):
    """Checkpoints written before the progress key was renamed keep their count of padded positions."""
    straight, old = tmp_path / "straight", tmp_path / "old"
    quick = dict(eval_size=None, eval_every=None, max_steps=3)
    expected = run(settings(tiny_model_dir, alpaca_file, straight, **quick), log=lambda message: None)
    run(settings(tiny_model_dir, alpaca_file, old, **{**quick, "max_steps": 2, "save_every": 2}),
        log=lambda message: None)
    state = load_training_state(str(old))
    state["progress"]["padded_tokens"] = state["progress"].pop("tokens_with_padding")
    summary = run(settings(tiny_model_dir, alpaca_file, old, **quick), state, log=lambda message: None)
    assert 0 < summary["padding_fraction"] == pytest.approx(expected["padding_fraction"])


def test_a_resumed_run_may_extend_but_not_change_settings(tiny_model_dir, alpaca_file, tmp_path, capsys):
    out = str(tmp_path / "run")
    base = ["--model", tiny_model_dir, "--data", alpaca_file, "--output-dir", out, "--max-steps", "2",
            "--save-every", "1"]
    assert run_main(train.main, base) == 0
    assert run_main(train.main, ["--resume", out, "--lr", "0.5"]) == 2
    assert "--lr 0.5 differs from the resumed run's 0.001" in capsys.readouterr().err
    assert run_main(train.main, ["--resume", out]) == 2
    assert "already reached step 2 of 2" in capsys.readouterr().err
    assert run_main(train.main, ["--resume", out, "--max-steps", "3"]) == 0
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["optimizer_steps"] == 3


@pytest.mark.parametrize("make, expected", [
    (lambda folder: None, "no such run folder"),
    (lambda folder: folder.mkdir(), "no checkpoint.pt in it"),
    (lambda folder: (folder.mkdir(), (folder / "checkpoint.pt").write_bytes(b"junk")),
     "not a readable bitfit checkpoint"),
])
def test_resume_without_a_usable_checkpoint_is_refused(make, expected, tmp_path, capsys):
    folder = tmp_path / "run"
    make(folder)
    assert run_main(train.main, ["--resume", str(folder)]) == 2
    assert expected in capsys.readouterr().err


def test_eval_size_larger_than_the_data_is_refused(tiny_model_dir, alpaca_file, tmp_path, capsys):
    argv = ["--model", tiny_model_dir, "--data", alpaca_file, "--eval-size", "50", "--output-dir",
            str(tmp_path / "run")]
    assert run_main(train.main, argv) == 2
    assert "--eval-size 50.0 leaves no rows to train on" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_ctrl_c_saves_a_checkpoint_and_resume_finishes_the_run(tmp_path):
    """The real thing: SIGINT to a training process, then --resume (built-in model, dropout on)."""
    out = tmp_path / "run"
    command = [sys.executable, str(ROOT / "train.py"), "--max-steps", "100", "--grad-accum", "1",
               "--max-len", "48", "--log-every", "1", "--output-dir", str(out)]
    process = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True)
    metrics = tmp_path / ".run.staging" / "metrics.jsonl"  # a run writes beside its folder until it ends
    deadline = time.monotonic() + 120
    while (process.poll() is None and time.monotonic() < deadline
           and not (metrics.exists() and metrics.read_text().count("\n") >= 2)):
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert "checkpoint saved at optimizer step" in stderr and "Traceback" not in stderr
    stopped_at = load_training_state(str(out))["progress"]["step"]
    assert 0 < stopped_at < 100

    resumed = subprocess.run([sys.executable, str(ROOT / "train.py"), "--resume", str(out)], cwd=tmp_path,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming at optimizer step {stopped_at} of 100" in resumed.stdout
    assert json.loads((out / "summary.json").read_text())["optimizer_steps"] == 100
    steps = [line["step"] for line in metric_lines(out) if "loss" in line]
    assert steps == list(range(1, 101))


# -------------------------------------------------------- what --resume checks before it continues


def stopped_run(tiny_model_dir, data, folder):
    """A 2-step run that saved its checkpoint at the end, for --resume to extend."""
    argv = ["--model", tiny_model_dir, "--data", str(data), "--output-dir", str(folder), "--max-steps", "2",
            "--save-every", "2", "--batch-size", "2", "--grad-accum", "1"]
    assert run_main(train.main, argv) == 0


def test_resume_refuses_data_whose_rows_changed(tiny_model_dir, tmp_path, capsys):
    data = tmp_path / "rows.json"
    data.write_text(json.dumps(ROWS))
    stopped_run(tiny_model_dir, data, tmp_path / "run")
    before = folder_bytes(tmp_path / "run")
    stat = data.stat()
    data.write_text(json.dumps([{**row, "output": row["output"].upper()} for row in ROWS]))
    os.utime(data, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # the same modification time, too
    assert run_main(train.main, ["--resume", str(tmp_path / "run"), "--max-steps", "4"]) == 2
    err = capsys.readouterr().err
    assert "the training data (its rows differ) changed since the run started" in err, err
    assert folder_bytes(tmp_path / "run") == before


def test_resume_refuses_a_base_whose_weights_changed(tiny_model_dir, alpaca_file, tmp_path, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base)
    stopped_run(str(base), alpaca_file, tmp_path / "run")
    before = folder_bytes(tmp_path / "run")
    torch.manual_seed(7)  # the same shapes, other weights
    GPT2LMHeadModel(GPT2Config.from_pretrained(base)).save_pretrained(base)
    assert run_main(train.main, ["--resume", str(tmp_path / "run"), "--max-steps", "4"]) == 2
    err = capsys.readouterr().err
    assert "the base model (its weights differ) changed since the run started" in err, err
    assert folder_bytes(tmp_path / "run") == before


@pytest.mark.parametrize("damage, expected", [
    (lambda state: state["config"].update(learning_speed=3), "unknown setting(s) learning_speed"),
    (lambda state: state.pop("rng"), "a damaged bitfit checkpoint: it has no rng"),
    (lambda state: state["rng"].pop("python"), "a damaged bitfit checkpoint: it has no rng.python"),
    (lambda state: state["trainable"].update({"transformer.h.0.ln_1.bias": torch.zeros(3)}),
     "the checkpoint does not fit this run"),
])
def test_a_damaged_checkpoint_is_refused_in_one_line(damage, expected, earlier_run, capsys):
    path = earlier_run / "checkpoint.pt"
    state = torch.load(path, weights_only=True)
    damage(state)
    torch.save(state, path)
    before = folder_bytes(earlier_run)
    assert run_main(train.main, ["--resume", str(earlier_run), "--max-steps", "4"]) == 2
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and expected in lines[0], lines
    assert folder_bytes(earlier_run) == before and leftovers(earlier_run) == []
