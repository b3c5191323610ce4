"""--micro-batch: the window (batch size x grad accum) is the math, the micro-batch is the machine's. Every
cut of the window, sorted by length within it, makes the update batch 1 x accum 8 makes (no dropout here:
the tiny model's is off), in BitFit and full fine-tuning, straight and resumed; auto picks one and keeps it."""

import json

import pytest
import torch
from conftest import cli, ctrl_c_after_step, error_lines
from safetensors.torch import load_file

import train
from bitfit.config import DEFAULT_DATA, TrainConfig
from bitfit.core.examples import split_window
from bitfit.errors import InputError
from bitfit.training.micro_batch import candidate_sizes, largest_that_fits


def argv(model, data, folder, *extra):
    return ["--model", model, "--data", data, "--batch-size", "1", "--grad-accum", "8", "--max-steps", "3",
            "--warmup-ratio", "0", "--log-every", "1", "--output-dir", str(folder), *extra]


def trained(folder) -> dict[str, torch.Tensor]:
    delta = folder / "bias.safetensors"
    return load_file(delta) if delta.exists() else load_file(folder / "model" / "model.safetensors")


def assert_same_update(got, expected):
    a, b = trained(got), trained(expected)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "rows.json"
    rows = json.loads(open(DEFAULT_DATA).read())[:24]  # three windows of eight, of many lengths
    path.write_text(json.dumps(rows))
    return str(path)


@pytest.fixture(scope="module")
def reference(tiny_model_dir, data, tmp_path_factory):
    """batch 1 x accum 8, as the seed runs it, in both modes."""
    root = tmp_path_factory.mktemp("reference")
    for mode in ("bitfit", "full"):
        assert train.main(argv(tiny_model_dir, data, root / mode, "--mode", mode)) is None
    return root


def test_a_window_is_sorted_by_length_and_cut_with_every_example_once():
    window = [[5], [1], [7], [3]]
    lengths = {5: 30, 1: 10, 7: 20, 3: 10}
    assert split_window(window, lengths, 2) == [[1, 3], [7, 5]]
    assert split_window(window, lengths, 3) == [[1, 3, 7], [5]]
    assert split_window(window, lengths, None) == window  # no --micro-batch: today's micro-batches
    assert candidate_sizes(8) == [1, 2, 4, 8] and candidate_sizes(6) == [1, 2, 4, 6] and candidate_sizes(1) == [1]


@pytest.mark.parametrize("mode", ["bitfit", "full"])
@pytest.mark.parametrize("micro", ["1", "2", "8", "auto"])
def test_every_micro_batch_makes_the_update_of_batch_1_accum_8(mode, micro, reference, tiny_model_dir, data,
                                                               tmp_path, capsys):
    run = tmp_path / "run"
    status, out, err = cli(train.main, argv(tiny_model_dir, data, run, "--mode", mode, "--micro-batch", micro),
                           capsys)
    assert status == 0, err
    assert_same_update(run, reference / mode)
    recorded = json.loads((run / "train_config.json").read_text())["micro_batch"]
    if micro == "auto":
        assert recorded in candidate_sizes(8) and f"--micro-batch auto: {recorded}, the fastest" in out
    else:
        assert recorded == int(micro)


@pytest.mark.parametrize("micro", ["2", "auto"])
def test_a_resumed_run_keeps_its_micro_batch_and_its_update(micro, tiny_model_dir, data, tmp_path, capsys,
                                                             monkeypatch):
    """8 steps: auto warms up on the first window and tries 1, 2, 4 and 8 on the next four, then settles;
    stopped after step 6 and resumed, it keeps what it settled on, and makes batch 1 x accum 8's update."""
    straight, run = tmp_path / "straight", tmp_path / "run"
    assert cli(train.main, argv(tiny_model_dir, data, straight, "--max-steps", "8"), capsys)[0] == 0
    released = ctrl_c_after_step(monkeypatch, 6)
    status, out, _ = cli(train.main, argv(tiny_model_dir, data, run, "--max-steps", "8", "--micro-batch", micro),
                         capsys)
    assert status == 130
    released()
    chosen = json.loads((run / "train_config.json").read_text())["micro_batch"]
    assert chosen in candidate_sizes(8) and (micro != "auto" or f"--micro-batch auto: {chosen}, the fastest" in out)
    status, out, err = cli(train.main, ["--resume", str(run)], capsys)
    assert status == 0, err
    assert "--micro-batch auto" not in out  # kept from the checkpoint's settings, not probed again
    assert json.loads((run / "train_config.json").read_text())["micro_batch"] == chosen
    assert_same_update(run, straight)


def test_on_a_gpu_auto_backs_off_from_out_of_memory_to_the_largest_that_fits(tiny_model_dir):
    """The CUDA strategy, on the CPU with a loss that runs out of memory above 2 examples a micro-batch."""
    from bitfit.core.loss import causal_lm_loss_sum
    from bitfit.model.bias_terms import select_trainable
    from bitfit.model.loading import load_model_and_tokenizer

    model, _ = load_model_and_tokenizer(tiny_model_dir)
    select_trainable(model, "bitfit")
    tried = []

    def loss_fn(model, batch):
        tried.append(batch["input_ids"].size(0))
        if batch["input_ids"].size(0) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (pretend)")
        return causal_lm_loss_sum(model, batch)

    read = {0: {"input_ids": [5, 6, 7], "labels": [5, 6, 7]}}
    config = TrainConfig(max_len=16)
    size, said = largest_that_fits(model, read, [1, 2, 4, 8], config, 0, torch.device("cpu"), loss_fn)
    assert size == 2 and tried == [8, 4, 2]
    assert said == "8 ran out of memory; 4 ran out of memory; 2 fits"


def test_micro_batch_flags_out_of_range_are_one_line(tiny_model_dir, data, tmp_path, capsys):
    for value, expected in [("0", "--micro-batch must be a positive whole number or auto, got 0"),
                            ("lots", "expected a positive whole number or auto, got 'lots'")]:
        status, _, err = cli(train.main, argv(tiny_model_dir, data, tmp_path / "run", "--micro-batch", value), capsys)
        assert status == 2 and expected in err and len(error_lines(err)) == 1, err
    with pytest.raises(InputError, match="--fsdp with --micro-batch auto is not supported"):
        TrainConfig(fsdp=True, micro_batch="auto")
