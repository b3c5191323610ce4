"""python -m bitfit.walkthrough stays true: its plain step is the trainer's step, and the README
shows what it prints."""

import re

import pytest
import torch
from conftest import ROOT, prepare_for_training

from bitfit import walkthrough
from bitfit.config import DEFAULT_MODEL, TrainConfig
from bitfit.core.loop import train_loop
from bitfit.core.trainable import is_bias
from bitfit.data.rows import load_rows
from bitfit.data.tokenize import tokenize_rows
from bitfit.model.loading import load_model_and_tokenizer, pad_token_id

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def walked():
    """The walkthrough's model after its step, and what it printed."""
    import contextlib
    import io

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        model = walkthrough.main()
    return model, printed.getvalue()


def without_dropout(model):
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model


def test_walkthrough_step_equals_train_loop(walked, tmp_path):
    """The same rows and settings through the trainer's whole path: its setup (fused GELU, eager
    attention), train_step and the head only at label positions, against plain calls."""
    tuned, _ = walked
    config = TrainConfig(model=DEFAULT_MODEL, limit=walkthrough.ROWS, max_len=walkthrough.MAX_LEN,
                         batch_size=walkthrough.BATCH_SIZE, grad_accum=walkthrough.GRAD_ACCUM, max_steps=1,
                         lr=walkthrough.LR, max_grad_norm=walkthrough.MAX_GRAD_NORM, warmup_ratio=0.0,
                         output_dir=str(tmp_path))
    model, tokenizer = load_model_and_tokenizer(config.model)
    without_dropout(model)
    examples, _ = tokenize_rows(load_rows(config.data, limit=config.limit), tokenizer, config.max_len)
    assert len(examples) == config.batch_size * config.grad_accum  # one window: the walkthrough's step
    _, optimizer = prepare_for_training(model, config, CPU)
    train_loop(model, optimizer, examples, config, pad_id=pad_token_id(tokenizer), device=CPU)

    base, _ = load_model_and_tokenizer(config.model)
    trained, base = dict(model.named_parameters()), dict(base.named_parameters())
    for name, param in tuned.named_parameters():
        if is_bias(name):
            assert not torch.equal(param, base[name]), f"{name} did not move"
            torch.testing.assert_close(param, trained[name], rtol=0, atol=1e-5)
        else:
            assert torch.equal(param, base[name]), f"{name} changed"


def test_walkthrough_says_only_biases_moved(walked):
    tuned, printed = walked
    biases = sum(is_bias(name) for name, _ in tuned.named_parameters())
    weights = sum(not is_bias(name) for name, _ in tuned.named_parameters())
    assert f"moved: {biases} of {biases} bias tensors, 0 of {weights} weight tensors" in printed


NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?")


def test_the_readme_shows_what_the_walkthrough_prints(walked):
    """Line by line, the same words and integers; decimals to float rounding (other CPUs round
    the last digit differently)."""
    _, printed = walked
    readme = (ROOT / "README.md").read_text()
    shown = re.search(r"\$ python -m bitfit\.walkthrough\n(.*?)```", readme, re.DOTALL).group(1)
    shown_lines, printed_lines = shown.rstrip("\n").splitlines(), printed.rstrip("\n").splitlines()
    assert len(shown_lines) == len(printed_lines)
    for shown_line, printed_line in zip(shown_lines, printed_lines):
        assert NUMBER.sub("#", shown_line) == NUMBER.sub("#", printed_line), printed_line
        for shown_number, number in zip(NUMBER.findall(shown_line), NUMBER.findall(printed_line)):
            if "." in number:
                assert float(shown_number.replace(",", "")) == pytest.approx(float(number.replace(",", "")),
                                                                             rel=1e-3), printed_line
            else:
                assert shown_number == number, printed_line


def test_the_readmes_worked_example_takes_its_numbers_from_the_walkthrough(walked):
    _, printed = walked
    readme = (ROOT / "README.md").read_text()
    header = r"\| one optimizer step \| in the walkthrough's output \|\n"
    table = re.search(header + r"(.*?)\n\n", readme, re.DOTALL).group(1)
    printed_numbers = NUMBER.findall(printed)
    for number in NUMBER.findall(table.replace("--batch-size", "").replace("--grad-accum", "")):
        if "." in number:
            assert any(float(number) == pytest.approx(float(other.replace(",", "")), rel=1e-3)
                       for other in printed_numbers if "." in other), number
        else:
            assert number in printed_numbers, number


def test_the_walkthrough_run_as_the_readme_says_prints_nothing_but_its_step(walked):
    """python -m bitfit.walkthrough is a learner's first command: its output and nothing else (no
    library's import-time log lines on stderr)."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "bitfit.walkthrough"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert done.stdout == walked[1]
