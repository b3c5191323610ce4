"""python -m bitfit.experiment: its data, its checks of a reply, and a whole run on a tiny LLaMA."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, cli

from bitfit import experiment
from bitfit.model.loading import load_model_and_tokenizer


def test_the_shipped_data_teaches_exactly_the_behaviour_that_is_checked():
    train, held_out = experiment.read_rows(experiment.TRAIN_DATA), experiment.read_rows(experiment.HELD_OUT_DATA)
    assert (len(train), len(held_out)) == (158, 42)
    for row in train + held_out:
        assert experiment.json_answer(row["output"]) == json.loads(row["output"])["answer"] != ""
        assert experiment.mentions(row["output"], json.loads(row["output"])["answer"])
    assert not {row["instruction"] for row in train} & {row["instruction"] for row in held_out}


@pytest.mark.parametrize("reply, answer", [
    ('{"answer": "Paris"}', "Paris"),
    ('{"answer":"Buenos Aires"}', "Buenos Aires"),
    ('{"answer": "Paris"} The capital of France.', None),  # more than the object
    ('The answer is: {"answer": "Paris"}', None),
    ('{"answer": 42}', None),  # not a string
    ('{"answer": "Paris", "country": "France"}', None),  # another key
    ('["Paris"]', None),
    ('{"answer": "Par', None),  # cut off
])
def test_a_json_reply_is_one_object_with_the_one_key_and_nothing_else(reply, answer):
    assert experiment.json_answer(reply) == answer


def test_a_right_reply_mentions_the_answer_as_a_whole_word_in_any_case():
    assert experiment.mentions("The capital of Ireland is dublin.", "Dublin")
    assert experiment.mentions('{"answer": "Buenos Aires"}', "buenos aires")
    assert not experiment.mentions('{"answer": "10"}', "100")
    assert not experiment.mentions("Dubliners", "Dublin")


@pytest.fixture(scope="module")
def experiment_run(llama_dir, tmp_path_factory):
    """The experiment's one-epoch BitFit and full runs, and BitFit on the 4-bit base, on the tiny LLaMA:
    (output folder, stdout)."""
    folder = tmp_path_factory.mktemp("experiment")
    command = [sys.executable, "-m", "bitfit.experiment", "--model", llama_dir, "--runs",
               "bitfit-1ep,full-1ep,bitfit-nf4-3ep",
               "--device", "cpu", "--output-dir", str(folder)]
    # One thread per process: on a busy two-core machine two spend more time waiting than computing.
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    return folder, done.stdout


def test_the_experiment_trains_each_run_from_the_base_and_scores_the_held_out_replies(experiment_run):
    folder, out = experiment_run
    report = json.loads((folder / "results.json").read_text())
    bitfit, full = report["runs"]["bitfit-1ep"], report["runs"]["full-1ep"]
    assert bitfit["trainable_params"] == 2 * (32 + 32 + 32 + 32 + 64 + 64 + 32)  # the biases --add-biases made
    assert full["trainable_params"] == full["total_params"] == bitfit["total_params"] - bitfit["trainable_params"]
    assert bitfit["optimizer_steps"] == full["optimizer_steps"] == 20  # 158 rows in micro-batches of 8
    assert (bitfit["lr"], full["lr"], bitfit["epochs"]) == (1e-3, 5e-5, 1)
    expected = [json.loads(row["output"])["answer"] for row in report["held_out"]]
    for scored in (report["base"], bitfit, full):
        assert len(scored["answers"]) == 42
        assert scored["json_share"] == sum(experiment.json_answer(a) is not None for a in scored["answers"]) / 42
        assert scored["right_share"] == sum(map(experiment.mentions, scored["answers"], expected)) / 42
    # Each run starts from the base and changes what it says.
    assert bitfit["held_out_loss"] != report["base"]["held_out_loss"] != full["held_out_loss"]
    assert "| bitfit-1ep | biases: all | 0.001 | 1 | 576 (" in out
    assert "| full-1ep | every weight | 5e-05 | 1 |" in out


def test_a_4_bit_run_is_scored_before_and_after_on_the_4_bit_base(experiment_run):
    folder, out = experiment_run
    report = json.loads((folder / "results.json").read_text())
    plain, nf4 = report["runs"]["bitfit-1ep"], report["runs"]["bitfit-nf4-3ep"]
    assert (nf4["quantize"], nf4["dtype"], plain["quantize"]) == ("nf4", "bf16", None)
    assert plain["base"] == report["base"]  # the plain runs start from the plain base
    # The 4-bit base is its own "before": its weights differ from the plain base's by the rounding.
    assert nf4["base"]["held_out_loss"] != report["base"]["held_out_loss"]
    assert nf4["weight_bytes"] < plain["weight_bytes"]
    assert "| bitfit-nf4-3ep | biases: all, bf16, on the nf4 base | 0.001 | 3 | 576 (" in out
    assert f"| {nf4['base']['held_out_loss']:.3f} → {nf4['held_out_loss']:.3f} |" in out


def test_a_delta_is_applied_for_scoring_and_the_base_restored_after(experiment_run, llama_dir):
    folder, _ = experiment_run
    base, _ = load_model_and_tokenizer(llama_dir)
    before = {name: value.clone() for name, value in base.state_dict().items()}
    probe = torch.tensor([[5, 17, 42, 99]])
    with torch.no_grad():
        base_logits = base(probe).logits
        with experiment.tuned(base, folder / "bitfit-1ep") as tuned_model:
            assert tuned_model is base and not torch.equal(tuned_model(probe).logits, base_logits)
        assert torch.equal(base(probe).logits, base_logits)
    after = base.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[name], before[name]) for name in before)


def test_an_unknown_run_is_one_line_and_exit_2(capsys):
    status, _, err = cli(experiment.main, ["--runs", "bitfit-1ep,lora"], capsys)
    assert status == 2 and "--runs takes a comma list of bitfit-1ep" in err and "got lora" in err
