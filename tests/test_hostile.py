"""The second hostile run: what a user's mistake, or bad luck, must never do. Every command that writes
replaces only what it wrote before; every input that can change under a checkpoint is checked on --resume;
every damaged file, odd flag or Ctrl-C is one line and a non-zero exit, never a traceback."""

import errno
import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT, cli, ctrl_c_after_step, error_lines, folder_bytes, leftovers
from safetensors.torch import load_file, save_file

import generate
import train
from bitfit import bench, compare, export, walkthrough
from bitfit.data.tokenize import TOKENIZE_CHUNK, tokenize_rows
from bitfit.store.run_folder import take_lock


def train_argv(model, data, folder, *extra):
    return ["--model", model, "--data", data, "--batch-size", "2", "--grad-accum", "1", "--max-steps", "2",
            "--output-dir", str(folder), *extra]


def one_line(status, err, expected, code=2):
    lines = error_lines(err)
    assert status == code, err
    assert len(lines) == 1 and expected in lines[0], err
    assert "Traceback" not in err


# ---------------------------------------------------- commands that write replace only their own output


@pytest.fixture
def project(tmp_path, tiny_model_dir, alpaca_file, capsys):
    """proj/notes.txt of the user's, and a finished run in proj/runs/bitfit."""
    project = tmp_path / "proj"
    project.mkdir()
    (project / "notes.txt").write_text("important\n")
    status, _, err = cli(train.main, train_argv(tiny_model_dir, alpaca_file, project / "runs" / "bitfit"), capsys)
    assert status == 0, err
    return project


@pytest.mark.parametrize("format", ["hf", "peft"])
@pytest.mark.parametrize("out", ["proj", "proj/runs/bitfit", "proj/runs"])
def test_export_overwrite_never_replaces_a_folder_holding_the_run_or_the_users_files(format, out, project,
                                                                                    capsys, monkeypatch):
    monkeypatch.chdir(project.parent)
    before = folder_bytes(project)
    status, _, err = cli(export.main, ["--bias", "proj/runs/bitfit", "--format", format, "--out", out,
                                       "--overwrite"], capsys)
    assert status == 2 and len(error_lines(err)) == 1, err
    assert folder_bytes(project) == before


def test_export_out_dot_is_one_line_not_a_traceback(project, capsys, monkeypatch):
    monkeypatch.chdir(project)
    before = folder_bytes(project)
    status, _, err = cli(export.main, ["--bias", "runs/bitfit", "--out", ".", "--overwrite"], capsys)
    one_line(status, err, "holds the delta being exported")
    assert folder_bytes(project) == before


def test_export_overwrite_replaces_an_earlier_export_and_nothing_it_did_not_write(project, tmp_path, capsys):
    merged = tmp_path / "merged"
    argv = ["--bias", str(project / "runs" / "bitfit"), "--out", str(merged)]
    assert cli(export.main, argv, capsys)[0] == 0
    assert cli(export.main, argv + ["--overwrite"], capsys)[0] == 0  # its own earlier export: replaced
    (merged / "my-notes.txt").write_text("mine\n")
    before = folder_bytes(merged)
    status, _, err = cli(export.main, argv + ["--overwrite"], capsys)
    one_line(status, err, "holds my-notes.txt, which no export wrote")
    assert folder_bytes(merged) == before


def test_gguf_export_overwrite_never_replaces_a_file_it_did_not_write(project, gguf_path, tmp_path, capsys):
    from bitfit.model.added_biases import add_biases
    from bitfit.model.bias_terms import select_trainable
    from bitfit.model.loading import load_model_and_tokenizer
    from bitfit.store.delta import save_bias_delta

    model, _ = load_model_and_tokenizer(gguf_path)
    add_biases(model, "all")
    delta = tmp_path / "bias.safetensors"
    save_bias_delta(delta, model, select_trainable(model, "bitfit"), base_model=gguf_path)
    mine = tmp_path / "mine.gguf"
    mine.write_bytes(open(gguf_path, "rb").read())  # a GGUF file of the user's, not an export
    argv = ["--bias", str(delta), "--format", "gguf", "--out", str(mine), "--overwrite"]
    status, _, err = cli(export.main, argv, capsys)
    one_line(status, err, "is not a file that bitfit.export wrote")
    assert mine.read_bytes() == open(gguf_path, "rb").read()
    ours = tmp_path / "ours.gguf"
    assert cli(export.main, [*argv[:-2], str(ours)], capsys)[0] == 0
    assert cli(export.main, [*argv[:-2], str(ours), "--overwrite"], capsys)[0] == 0  # its own: replaced


def test_compare_plot_never_replaces_a_picture_it_did_not_draw(earlier_run, tmp_path, capsys):
    mine = tmp_path / "holiday.png"
    mine.write_bytes(b"\x89PNG my photo")
    status, _, err = cli(compare.main, [str(earlier_run), "--plot", str(mine)], capsys)
    one_line(status, err, "exists, and bitfit.compare did not draw it")
    assert mine.read_bytes() == b"\x89PNG my photo"
    ours = tmp_path / "compare.png"
    assert cli(compare.main, [str(earlier_run), "--plot", str(ours)], capsys)[0] == 0
    assert cli(compare.main, [str(earlier_run), "--plot", str(ours)], capsys)[0] == 0  # its own: redrawn


def test_compare_plot_on_a_file_system_that_refuses_writes_is_one_line(earlier_run, tmp_path, capsys,
                                                                      monkeypatch):
    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(compare, "atomic_write", read_only)
    status, _, err = cli(compare.main, [str(earlier_run), "--plot", str(tmp_path / "compare.png")], capsys)
    one_line(status, err, "Read-only file system; nothing was written")
    assert not (tmp_path / "compare.png").exists()


# ------------------------------------------------------------- what --resume checks, and the run folder


def test_resume_refuses_a_chat_template_that_changed_since_the_run_started(tmp_path, capsys, monkeypatch):
    import torch
    from test_chat import templated_tokenizer
    from transformers import GPT2Config, GPT2LMHeadModel

    model_dir = tmp_path / "chat-model"
    tokenizer = templated_tokenizer("chatml")
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_positions=128, n_embd=32, n_layer=2, n_head=2,
                               bos_token_id=0, eos_token_id=0)).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Say {n}."},
                                                     {"role": "assistant", "content": f"{n}."}]}) + "\n"
                            for n in range(12)))
    run = tmp_path / "run"
    released = ctrl_c_after_step(monkeypatch, 2)
    status, _, _ = cli(train.main, train_argv(str(model_dir), str(data), run, "--max-steps", "5",
                                              "--save-every", "5", "--log-every", "1"), capsys)
    assert status == 130
    released()
    tokenizer.chat_template = tokenizer.chat_template.replace("<|im_start|>", "<|im_start|> ")
    tokenizer.save_pretrained(model_dir)  # the same weights, another template
    before = folder_bytes(run)
    status, _, err = cli(train.main, ["--resume", str(run)], capsys)
    one_line(status, err, "the base's chat template (its text differs) changed since the run started")
    assert folder_bytes(run) == before


def test_split_on_a_local_file_is_refused(tiny_model_dir, alpaca_file, tmp_path, capsys):
    status, _, err = cli(train.main, train_argv(tiny_model_dir, alpaca_file, tmp_path / "run", "--split", "test"),
                         capsys)
    one_line(status, err, "--split test: ")
    assert "is a local file, which has no splits" in err and not (tmp_path / "run").exists()


def test_a_leftover_old_run_beside_a_finished_swap_is_removed_and_said(earlier_run, tiny_model_dir, alpaca_file,
                                                                       capsys):
    retired = earlier_run.with_name(f".{earlier_run.name}.old")
    retired.mkdir()
    (retired / "summary.json").write_text("{}")
    status, out, err = cli(train.main, train_argv(tiny_model_dir, alpaca_file, earlier_run, "--overwrite"), capsys)
    assert status == 0, err
    assert f"removed {retired}" in out and not retired.exists()


def test_a_lock_path_that_is_a_folder_is_one_line(tiny_model_dir, alpaca_file, tmp_path, capsys):
    (tmp_path / ".run.lock").mkdir()
    status, _, err = cli(train.main, train_argv(tiny_model_dir, alpaca_file, tmp_path / "run"), capsys)
    one_line(status, err, ".run.lock, where runs into")


@pytest.mark.parametrize("folder", ["a new run, before its first checkpoint", "a finished run"])
def test_resume_while_another_run_writes_names_it(folder, earlier_run, tmp_path, capsys):
    run = tmp_path / "new" if folder.startswith("a new") else earlier_run
    lock = take_lock(run.with_name(f".{run.name}.lock"), run)  # held, as by a run writing into it
    try:
        status, _, err = cli(train.main, ["--resume", str(run), "--max-steps", "4"], capsys)
    finally:
        lock.close()
    one_line(status, err, f"another run (pid {os.getpid()}")


def test_ctrl_c_while_the_model_loads_is_one_line_and_exit_130(tiny_model_dir, alpaca_file, earlier_run, capsys,
                                                                monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("bitfit.training.run.load_model_and_tokenizer", interrupted)
    before = folder_bytes(earlier_run)
    status, _, err = cli(train.main, train_argv(tiny_model_dir, alpaca_file, earlier_run, "--overwrite"), capsys)
    one_line(status, err, "stopped: Ctrl-C", code=130)
    assert folder_bytes(earlier_run) == before and leftovers(earlier_run) == []


# ------------------------------------------------------------------------------- data and drops


def test_a_block_of_rows_without_a_trainable_turn_is_dropped_not_a_traceback(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    unanswered = [{"messages": [{"role": "user", "content": "Hello?"}]}] * TOKENIZE_CHUNK
    answered = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}
    examples, dropped = tokenize_rows([*unanswered, answered], tokenizer, max_len=64)
    assert (len(examples), dropped) == (1, TOKENIZE_CHUNK)
    assert examples.dropped == {"have no assistant turn": TOKENIZE_CHUNK}


def test_a_conversation_opened_by_the_assistant_is_dropped_for_that_reason_under_chat(tiny_model_dir, tmp_path,
                                                                                     capsys):
    from test_chat import templated_tokenizer

    tokenizer = templated_tokenizer("chatml")
    rows = [{"messages": [{"role": "assistant", "content": "Welcome."}]},
            {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}]
    examples, dropped = tokenize_rows(rows, tokenizer, max_len=64, template="chat")
    assert (len(examples), dropped) == (1, 1)
    assert list(examples.dropped) == ["have no assistant turn after a user's (under --template chat an opening "
                                      "answer is context)"]


def test_data_naming_a_folder_says_so(tiny_model_dir, tmp_path, capsys):
    status, _, err = cli(train.main, train_argv(tiny_model_dir, str(tmp_path), tmp_path / "run"), capsys)
    one_line(status, err, f"--data {tmp_path} is a folder")


def test_transformers_warning_about_long_texts_stays_out_of_a_run_that_cuts_them(tiny_model_dir, tmp_path, capsys):
    data = tmp_path / "long.json"
    data.write_text(json.dumps([{"instruction": "Repeat.", "output": "word " * 2000}] * 4))
    status, out, err = cli(train.main, train_argv(tiny_model_dir, str(data), tmp_path / "run", "--max-len", "64"),
                           capsys)
    assert status == 0, err
    assert "Token indices sequence length" not in out + err


# ------------------------------------------------------------------------------ deltas and runs


@pytest.fixture
def delta(earlier_run):
    return earlier_run / "bias.safetensors"


def forge(path, new_tensors=None, **metadata_changes):
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(path) if new_tensors is None else new_tensors
    save_file(tensors, str(path), metadata={**metadata, **metadata_changes})


@pytest.mark.parametrize("case, expected", [
    ("a tensor missing", "the delta is incomplete: it lists 13 tensors and holds 12 (missing"),
    ("a newer format", "its format is 'bitfit-bias-delta/9', and this bitfit reads"),
    ("an unreadable listing", "its tensors metadata is not a listing of names and shapes"),
])
def test_a_damaged_delta_is_named_for_what_it_is(case, expected, delta, capsys):
    if case == "a tensor missing":
        tensors = load_file(delta)
        tensors.pop(sorted(tensors)[0])
        forge(delta, tensors)
    elif case == "a newer format":
        forge(delta, format="bitfit-bias-delta/9")
    else:
        forge(delta, tensors="[not json")
    status, _, err = cli(generate.main, ["--bias", str(delta), "--prompt", "Hi", "--max-new-tokens", "2"], capsys)
    one_line(status, err, expected)


@pytest.mark.parametrize("command", ["generate", "export"])
def test_generate_and_export_on_an_unfinished_run_point_at_resume(command, earlier_run, tmp_path, capsys):
    (earlier_run / "bias.safetensors").unlink()
    (earlier_run / "summary.json").unlink()
    main, argv = ((generate.main, ["--bias", str(earlier_run), "--prompt", "Hi"]) if command == "generate" else
                  (export.main, ["--bias", str(earlier_run), "--out", str(tmp_path / "merged")]))
    status, _, err = cli(main, argv, capsys)
    one_line(status, err, f"finish it with: python train.py --resume {earlier_run}")


@pytest.mark.parametrize("damage, expected", [
    ("empty metrics", "its metrics.jsonl has no training line"),
    ("nan loss", "train_loss is nan, which no finished run writes: a damaged run"),
    ("negative seconds", "seconds is -3.0, which no finished run writes: a damaged run"),
])
def test_compare_refuses_a_damaged_run_by_name(damage, expected, earlier_run, capsys):
    summary = json.loads((earlier_run / "summary.json").read_text())
    if damage == "empty metrics":
        (earlier_run / "metrics.jsonl").write_text("")
    else:
        summary.update({"train_loss": float("nan")} if damage == "nan loss" else {"seconds": -3.0})
        (earlier_run / "summary.json").write_text(json.dumps(summary))
    status, _, err = cli(compare.main, [str(earlier_run)], capsys)
    one_line(status, err, expected)


# ------------------------------------------------------------------------------------ flags


def test_the_walkthrough_parses_its_flags(capsys):
    status, _, err = cli(walkthrough.main, ["--bogus-flag"], capsys)
    assert status == 2 and "unrecognized arguments: --bogus-flag" in err
    done = subprocess.run([sys.executable, "-m", "bitfit.walkthrough", "--help"], cwd=ROOT, capture_output=True,
                          text=True)
    assert done.returncode == 0 and "usage: python -m bitfit.walkthrough" in done.stdout
    assert "freeze:" not in done.stdout  # --help answered; no step was taken


def test_a_negative_number_for_a_list_flag_says_what_the_flag_takes(capsys):
    status, _, err = cli(bench.main, ["--batch-sizes", "-1,2"], capsys)
    assert status == 2
    assert "--batch-sizes takes BATCH_SIZES: micro-batch sizes, comma list" in err



def test_data_naming_a_device_and_resume_naming_a_file_say_so(tiny_model_dir, alpaca_file, tmp_path, capsys):
    status, _, err = cli(train.main, train_argv(tiny_model_dir, "/dev/null", tmp_path / "run"), capsys)
    one_line(status, err, "--data /dev/null is not a regular file")
    status, _, err = cli(train.main, ["--resume", alpaca_file], capsys)
    one_line(status, err, f"--resume {alpaca_file} is a file; name the run folder")
