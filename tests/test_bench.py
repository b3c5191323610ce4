"""The benchmark: one JSON line per run and a table, synthetic rows as specified, real shapes."""

import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import ROOT

from bitfit import bench
from bitfit.cli import run_main
from bitfit.core.examples import IGNORE_INDEX

REQUIRED_KEYS = {"mode", "arch", "dtype", "micro_batch", "grad_accum", "rows", "samples_per_s",
                 "tokens_per_s", "peak_allocated_bytes", "peak_reserved_bytes", "peak_rss_bytes", "mfu",
                 "flops_per_token", "train_loss", "optimizer_steps", "padding_fraction", "device"}


def test_bench_prints_a_json_line_per_run_then_a_table():
    command = [sys.executable, "-m", "bitfit.bench", "--arch", "tiny", "--rows", "16", "--batch-sizes", "2",
               "--dtypes", "fp32", "--device", "cpu", "--warmup-steps", "1"]
    # One thread per worker: the test checks what is printed, not speed, and on a busy two-core
    # machine two threads per worker spend more time waiting on each other than computing.
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    results = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert sorted((r["mode"], r["micro_batch"]) for r in results) == [("bitfit", 2), ("full", 2)]
    for r in results:
        assert "error" not in r and REQUIRED_KEYS <= set(r)
        assert (r["arch"], r["dtype"], r["grad_accum"], r["rows"]) == ("tiny", "fp32", 8, 16)
        assert r["samples"] == 16 and r["optimizer_steps"] == math.ceil(16 / (r["micro_batch"] * 8))
        assert r["samples_per_s"] > 0 and r["tokens_per_s"] > r["samples_per_s"]
        assert r["mfu"] is None or r["mfu"] > 0
        assert r["peak_allocated_bytes"] is None and r["peak_reserved_bytes"] is None  # CPU
        assert r["peak_rss_bytes"] > 0 and math.isfinite(r["train_loss"])
        assert r["flops_per_token"] == (6 if r["mode"] == "full" else 4) * r["total_params"]
        assert 0 < r["padding_fraction"] < 1  # two rows of different lengths share a micro-batch
    # Both modes see the same model and the same rows.
    assert len({(r["total_params"], r["tokens"]) for r in results}) == 1
    table = done.stdout.splitlines()
    assert any(line.startswith("| mode | dtype | micro-batch |") for line in table)
    assert sum(line.startswith(("| bitfit |", "| full |")) for line in table) == 2


def test_a_failed_worker_is_an_error_line_not_the_end_of_the_benchmark(monkeypatch, capsys):
    monkeypatch.setattr(sys, "executable", shutil.which("false"))  # every worker exits 1, printing nothing
    status = run_main(bench.main, ["--arch", "tiny", "--rows", "4", "--batch-sizes", "2", "--dtypes", "fp32",
                                   "--device", "cpu"])
    out = capsys.readouterr().out
    assert status == 0
    results = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert [r["mode"] for r in results] == ["bitfit", "full"]
    assert all(r["error"] == "the worker exited with status 1 and printed no result" for r in results)
    assert all(r["micro_batch"] == 2 and r["dtype"] == "fp32" for r in results)
    assert "| bitfit | fp32 | 2 | the worker exited with status 1" in out


def test_an_exception_in_a_worker_becomes_its_error_line(monkeypatch, capsys):
    def out_of_memory(args, config):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB.\nmore detail")

    monkeypatch.setattr(bench, "measure", out_of_memory)
    run_main(bench.main, ["--worker", "--modes", "full", "--dtypes", "bf16", "--batch-sizes", "8"])
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert result["error"] == "OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB."
    assert (result["mode"], result["dtype"], result["micro_batch"]) == ("full", "bf16", 8)
    assert "Traceback" in captured.err


def test_synthetic_rows_are_seeded_and_within_bounds():
    def make(seed, max_len=256):
        return bench.synthetic_examples(300, vocab_size=2048, eos_id=7, max_len=max_len, seed=seed)

    examples = make(seed=1)
    assert examples == make(seed=1) and examples != make(seed=2)
    prompt_lengths = [ex["labels"].count(IGNORE_INDEX) for ex in examples]
    assert min(prompt_lengths) >= 15 and max(prompt_lengths) <= 80
    assert all(len(ex["input_ids"]) == len(ex["labels"]) <= 256 for ex in examples)
    assert any(len(ex["input_ids"]) == 256 for ex in examples)  # the long tail is cut at max_len
    for ex, prompt in zip(examples, prompt_lengths):
        assert ex["labels"][prompt:] == ex["input_ids"][prompt:]  # labels are the response itself
        assert all(0 <= token < 2048 for token in ex["input_ids"])
    # Uncut, every response ends with the one eos, and its length is log-normal around 90 tokens.
    uncut = make(seed=1, max_len=10_000)
    responses = [ex["input_ids"][ex["labels"].count(IGNORE_INDEX):] for ex in uncut]
    assert all(r[-1] == 7 and 7 not in r[:-1] for r in responses)
    assert 75 <= sorted(len(r) for r in responses)[len(responses) // 2] <= 105


@pytest.mark.parametrize("arch, params", [("bloom-1b1", 1_065_314_304), ("gpt2", 124_439_808)])
def test_arch_builds_the_real_models_shape(arch, params):
    model = bench.build_model(arch, torch.bfloat16, device="meta")  # the shape alone, no memory
    assert sum(p.numel() for p in model.parameters()) == params
    assert next(model.parameters()).dtype == torch.bfloat16


def test_flops_per_token_is_6n_for_full_and_4n_for_bitfit():
    assert bench.count_flops_per_token(1000, "full") == 6000
    assert bench.count_flops_per_token(1000, "bitfit") == 4000


def test_peak_tflops_defaults_only_on_known_devices():
    assert bench.default_peak_tflops("cuda (NVIDIA H200)", "bf16", "highest") == 989.0
    assert bench.default_peak_tflops("cuda (NVIDIA H100 80GB HBM3)", "fp32", "highest") == 67.0
    assert bench.default_peak_tflops("cuda (NVIDIA H100 80GB HBM3)", "fp32", "high") == 494.0  # TF32
    assert bench.default_peak_tflops("cpu (x86_64, 2 threads)", "bf16", "highest") is None


@pytest.mark.parametrize("argv, message", [
    (["--arch", "llama-70b"], "argument --arch: invalid choice"),
    (["--rows", "0"], "--rows must be a positive number"),
    (["--batch-sizes", "1,0"], "argument --batch-sizes: expected a comma list of positive integers"),
    (["--dtypes", "fp8"], "argument --dtypes: expected a comma list of fp32, bf16, fp16"),
    (["--max-len", "40"], "--max-len must be above 80"),
    (["--max-len", "2000"], "--max-len 2000 is longer than tiny's 512 positions"),
    (["--grad-accum", "0"], "--grad-accum must be a positive number"),
])
def test_bad_input_is_one_line_and_exit_2(argv, message, capsys):
    try:
        status = run_main(bench.main, ["--device", "cpu", *argv])
    except SystemExit as exit:  # argparse's own usage errors
        status = exit.code
    captured = capsys.readouterr()
    assert status == 2 and message in captured.err and len(captured.err.strip().splitlines()) == 1
    assert captured.out == ""


def test_smollm2_has_the_real_models_shape_and_bitfit_trains_added_biases_on_it():
    model = bench.build_model("smollm2-135m", torch.float32, device="meta")
    assert sum(p.numel() for p in model.parameters()) == 134_515_008  # as the fetched model (test_real_model)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert not bench.arch_has_biases("smollm2-135m") and bench.arch_has_biases("tiny")
    args = bench.build_parser().parse_args(["--arch", "smollm2-135m", "--device", "cpu"])
    bench.fill_in_defaults(args)
    assert bench.train_config(args, "bitfit", "fp32", 1).add_biases
    assert not bench.train_config(args, "full", "fp32", 1).add_biases


def defaults_for(device, argv=()):
    args = bench.build_parser().parse_args([*argv])
    args.device = device
    bench.fill_in_defaults(args)
    bench.skip_slow_half_precision(args)
    return args


@pytest.mark.parametrize("fast, dtypes", [(("fp32", "bf16"), ["fp32", "bf16"]), (("fp32",), ["fp32"])])
def test_cpu_defaults_are_small_and_skip_half_precision_without_fast_kernels(fast, dtypes, monkeypatch, capsys):
    monkeypatch.setattr(bench, "cpu_has_fast_kernels", lambda dtype: dtype in fast)
    args = defaults_for("cpu")
    assert (args.dtypes, args.batch_sizes, args.rows, args.warmup_steps) == (dtypes, [1, 8], 64, 1)
    skipped = "skipping bf16: this CPU multiplies bf16 matrices slower" in capsys.readouterr().err
    assert skipped == (dtypes == ["fp32"])
    asked = defaults_for("cpu", ["--dtypes", "fp16", "--rows", "16"])  # asked for: runs, and is labelled
    assert (asked.dtypes, asked.rows, asked.batch_sizes) == (["fp16"], 16, [1, 8])
    gpu = defaults_for("cuda")
    assert (gpu.dtypes, gpu.batch_sizes, gpu.rows, gpu.warmup_steps) == (["fp32", "bf16"], [1, 4, 8], 256, 3)


def test_half_precision_without_fast_kernels_is_labelled_in_the_line_and_the_table(monkeypatch, capsys):
    monkeypatch.setattr(bench, "cpu_has_fast_kernels", lambda dtype: dtype == "fp32")
    monkeypatch.setattr(sys, "executable", shutil.which("false"))
    run_main(bench.main, ["--arch", "smollm2-135m", "--rows", "4", "--batch-sizes", "1", "--dtypes", "fp32,fp16",
                          "--device", "cpu"])
    out = capsys.readouterr().out
    results = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert [("note" in r) for r in results] == [False, False, True, True]
    assert [r["added_biases"] for r in results] == [True, False, True, False]
    assert "| bitfit (added biases) | fp16 (no fast kernels here) | 1 |" in out
    assert "| full | fp32 | 1 |" in out



def test_bench_runs_each_window_at_each_micro_batch_asked_for():
    """--micro-batches: the seed's window (1 x 8) run as micro-batches of 2 and auto, beside it as written;
    the same rows make the same loss whatever the cut (the tiny shape has no dropout)."""
    command = [sys.executable, "-m", "bitfit.bench", "--arch", "tiny", "--rows", "48", "--batch-sizes", "1",
               "--micro-batches", "2,auto", "--modes", "bitfit", "--dtypes", "fp32", "--device", "cpu",
               "--warmup-steps", "0"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    results = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert [(r["micro_batch"], r["run_as"]) for r in results] == [(1, 2), (1, "auto")]
    assert results[1]["chosen_micro_batch"] in (1, 2, 4, 8) and "--micro-batch auto: " in done.stderr
    assert results[0]["train_loss"] == pytest.approx(results[1]["train_loss"], rel=1e-5)
    assert "| bitfit (added biases) | fp32 | 1, run as 2 |" in done.stdout or "| bitfit | fp32 | 1, run as 2 |" in \
        done.stdout


def test_bench_hf_refuses_bad_numbers_before_running_anything(capsys):
    from bitfit import bench_hf

    for argv, expected in [(["--rounds", "0"], "--rounds must be a positive number"),
                           (["--rows", "-3"], "--rows must be a positive number")]:
        assert run_main(bench_hf.main, argv) == 2
        assert expected in capsys.readouterr().err
