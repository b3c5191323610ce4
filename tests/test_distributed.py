"""Training on several processes: torchrun with the gloo backend on the CPU, end to end."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, assert_same_metric_lines, metric_lines
from safetensors.torch import load_file

import train
from bitfit.cli import run_main
from bitfit.core.world import World


def test_each_rank_takes_its_slice_of_every_global_micro_batch():
    window = [[0, 1, 2, 3, 4, 5, 6, 7], [8, 9]]  # global micro-batches of 4 x 2 ranks
    assert World(rank=0, world_size=2).shard(window, 4) == [[0, 1, 2, 3], [8, 9]]
    assert World(rank=1, world_size=2).shard(window, 4) == [[4, 5, 6, 7]]  # nothing left in the last


def test_two_ranks_at_batch_4_train_like_one_process_at_batch_8(tiny_model_dir, alpaca_file, tmp_path):
    # 9 training rows: each step's window is a micro-batch of 8 and one of 1, so rank 1 has
    # nothing in the second one and must still join the gradient sum.
    common = ["--model", tiny_model_dir, "--data", alpaca_file, "--grad-accum", "2", "--max-steps", "2",
              "--eval-size", "1", "--log-every", "1", "--save-every", "2", "--report-to", "tensorboard"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert run_main(train.main, common + ["--batch-size", "8", "--output-dir", str(one)]) == 0

    workdir = tmp_path / "workdir"
    workdir.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    result = subprocess.run(torchrun + [str(ROOT / "train.py")] + common + ["--batch-size", "4", "--output-dir",
                                                                           str(two)],
                            cwd=workdir, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr

    expected, got = load_file(one / "bias.safetensors"), load_file(two / "bias.safetensors")
    assert expected.keys() == got.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor, rtol=1e-5, atol=1e-6)

    single, multi = (json.loads((folder / "summary.json").read_text()) for folder in (one, two))
    assert (multi["world_size"], single["world_size"]) == (2, 1)
    assert multi["peak_memory_bytes_per_rank"] == [None, None] and multi["peak_memory_bytes"] is None
    for key in ("optimizer_steps", "samples", "tokens", "label_tokens"):
        assert multi[key] == single[key], key
    assert multi["padding_fraction"] < single["padding_fraction"]  # 4 rows pad to a shorter width than 8
    for key in ("train_loss", "eval_loss_before", "eval_loss_after"):
        assert multi[key] == pytest.approx(single[key], rel=1e-5), key

    # Only rank 0 wrote, and only into the run folder (TensorBoard's events too: one file); it printed the
    # summary once.
    assert len(list((two / "tensorboard").iterdir())) == 1
    assert sorted(path.name for path in two.iterdir()) == sorted(path.name for path in one.iterdir())
    assert list(workdir.iterdir()) == []
    assert result.stdout.count("optimizer steps") == 1
    assert [line["step"] for line in metric_lines(one)] == [0, 1, 2, 2]  # eval, train, train, eval
    assert_same_metric_lines(metric_lines(two), metric_lines(one), rel=1e-5)
