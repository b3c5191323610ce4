"""bitfit.estimate: the peak memory of a run's step on fake tensors equals the same step's count on real ones.

The reference is the count the README's figures were first made with: a dispatch mode adding up the
storages of real CPU tensors while bitfit's setup and train_step run (LiveTensorBytes on real tensors).
"""

import contextlib
import dataclasses
import gc
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, cli, error_lines, folder_bytes, leftovers

from bitfit.config import TrainConfig
from bitfit.core.examples import build_example, collate
from bitfit.core.step import train_step
from bitfit.core.trainable import build_optimizer
from bitfit.core.world import SINGLE
from bitfit.model.compute import weights_dtype
from bitfit.model.loading import load_model_and_tokenizer, load_model_shape
from bitfit.training.estimate import _label_kinds, _name_micro_batches, estimate_peak_memory
from bitfit.training.live_bytes import LiveTensorBytes, allocated_bytes
from bitfit.training.setup import setup_model

GiB = 2**30


def example(max_len: int, prompt: int = 20) -> dict:
    return build_example(list(range(3, 3 + prompt)), [5] * (max_len - prompt), max_len)


def real_peak(model_dir: str, config: TrainConfig, one: dict, world=SINGLE) -> tuple[int, int]:
    """(peak, bytes of the parameters and buffers) of the estimate's two steps, run for real on the CPU
    (under torchrun with world; estimate_driver.py)."""
    torch.manual_seed(0)
    model, _ = load_model_and_tokenizer(model_dir, weights_dtype(config))
    window = config.batch_size * config.grad_accum
    micro = config.micro_batch or config.batch_size
    batches = [collate([one] * min(micro, window - start), 0) for start in range(0, window, micro)][:2]
    labels = sum(label != -100 for label in one["labels"]) * window
    with LiveTensorBytes() as live:
        live.set_kind([*model.parameters(), *model.buffers()], "weights")
        setup = setup_model(model, config, torch.device("cpu"), world, log=lambda line: None)
        optimizer = build_optimizer(model, config, torch.device("cuda"), no_decay=setup.masks)  # fused, as on CUDA
        model.train()
        live.reset_peak()
        count = _name_micro_batches(live, model)
        _label_kinds(live, model, optimizer)
        for step, window_batches in enumerate((batches[:1], batches), start=1):
            count.update(step=step, micro_batch=0)
            train_step(model, optimizer, window_batches, labels, max_grad_norm=1.0, device=torch.device("cpu"),
                       dtype=config.dtype, loss_fn=setup.loss_fn, scaler=setup.scaler, world=setup.world)
        weights = sum(allocated_bytes(tensor.untyped_storage().nbytes()) for tensor in _storages(model))
    return live.peak, weights


def _storages(model) -> list[torch.Tensor]:
    """One tensor per storage of the model's parameters and buffers (a 4-bit weight's codes and scales)."""
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    seen, tensors = set(), []
    pending = [*model.parameters(), *model.buffers()]
    while pending:
        tensor = pending.pop()
        if is_traceable_wrapper_subclass(tensor):  # a DTensor's shard, a 4-bit weight's codes and scales
            inner = [getattr(tensor, name) for name in tensor.__tensor_flatten__()[0]]
            pending += [part for part in inner if isinstance(part, torch.Tensor)]
        elif id(tensor.untyped_storage()) not in seen:
            seen.add(id(tensor.untyped_storage()))
            tensors.append(tensor)
    return tensors


def estimated(model_dir: str, config: TrainConfig, one: dict):
    model, _ = load_model_shape(model_dir, weights_dtype(config))
    return estimate_peak_memory(model, config, one)


CASES = [("bitfit", "fp32", None), ("bitfit", "bf16", None), ("full", "fp32", None), ("full", "bf16", None),
         ("bitfit", "fp32", "nf4"), ("bitfit", "bf16", "nf4")]


@pytest.mark.parametrize("mode,dtype,quantize", CASES)
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_the_fake_step_counts_what_the_real_step_holds(arch, mode, dtype, quantize, tiny_model_dir, llama_dir):
    model_dir = tiny_model_dir if arch == "gpt2" else llama_dir
    # LLaMA has no biases: BitFit trains added ones. Micro-batches of 2, so that the second runs with
    # the first's gradients held.
    config = TrainConfig(mode=mode, dtype=dtype, quantize=quantize, model=model_dir, batch_size=2, grad_accum=2,
                         add_biases=arch == "llama" and mode == "bitfit", device="cpu")
    one = example(96)
    real, real_weights = real_peak(model_dir, config, one)
    fake = estimated(model_dir, config, one)
    assert fake.peak_bytes == pytest.approx(real, rel=0.01)
    assert fake.weights_bytes == pytest.approx(real_weights, rel=0.01)
    assert fake.peak_bytes == fake.weights_bytes + fake.gradient_bytes + fake.optimizer_bytes + fake.other_bytes


@pytest.mark.parametrize("checkpointing", [False, True])
def test_the_builtin_model_with_a_micro_batch_of_its_own(checkpointing):
    config = TrainConfig(mode="bitfit", batch_size=4, grad_accum=2, micro_batch=3, grad_checkpointing=checkpointing,
                         device="cpu")
    one = example(128)
    # torch's checkpointing leaves some recomputed activations in reference cycles, which Python's garbage
    # collector frees when it next runs: a moment that depends on how many Python objects the process has
    # made, which differs between fake and real tensors and from run to run (docs/memory.md). With the
    # collector held off in both, they free the same tensors at the same moments.
    with collector_held_off() if checkpointing else contextlib.nullcontext():
        real, _ = real_peak(config.model, config, one)
        fake = estimated(config.model, config, one)
    assert fake.peak_bytes == pytest.approx(real, rel=0.01)


@contextlib.contextmanager
def collector_held_off():
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


FSDP_SETTINGS = dict(batch_size=2, grad_accum=2, fsdp=True, device="cpu")
FSDP_CASES = ["bitfit:fp32", "bitfit:bf16", "bitfit:bf16:nf4", "full:fp32", "full:bf16"]


def test_under_fsdp_the_estimate_of_rank_0_is_what_rank_0_holds_at_least():
    """Two CPU processes under torchrun shard the built-in GPT-2 (real collectives, gloo); the estimate
    runs rank 0 alone, its collectives those of torch's fake process group."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    result = subprocess.run(torchrun + [str(ROOT / "tests" / "estimate_driver.py"), "builtin:tiny-gpt2", *FSDP_CASES],
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    real = {line["case"]: line["peak"] for line in map(json.loads, result.stdout.splitlines())}
    assert set(real) == set(FSDP_CASES)
    for case in FSDP_CASES:
        mode, dtype, quantize = (case.split(":") + [None])[:3]
        config = TrainConfig(mode=mode, dtype=dtype, quantize=quantize, **FSDP_SETTINGS)
        model, _ = load_model_shape(config.model, weights_dtype(config))
        fake = estimate_peak_memory(model, config, example(96), ranks=2)
        # The fake collectives finish at once; gloo's finish in the background, and a gather's buffers are
        # freed when the collective is done, so a real rank can hold a little more, from run to run.
        assert fake.peak_bytes * 0.99 <= real[case] <= fake.peak_bytes * 1.10, case
    # Sharding is what was counted: one rank holds about half of the weights a single process holds.
    single = estimated(config.model, dataclasses.replace(config, fsdp=False), example(96))
    assert fake.weights_bytes < 0.6 * single.weights_bytes


# ------------------------------------------------------------ the commands

# The bloom-1b1 shape (the seed's bloomz-1b1), micro-batch 1, 256 tokens: what the first real-tensor counts
# gave (docs/memory.md), for the run's first optimizer step.
BLOOM_FIRST_COUNTS_GIB = {("bitfit", "bf16"): 2.42, ("bitfit", "fp32"): 4.45}
LLAMA_2_7B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
              "intermediate_size": 11008, "num_attention_heads": 32, "num_hidden_layers": 32,
              "num_key_value_heads": 32, "vocab_size": 32000, "max_position_embeddings": 4096,
              "rms_norm_eps": 1e-05, "tie_word_embeddings": False, "torch_dtype": "float16"}


def estimate_json(capsys, *argv) -> dict:
    from bitfit.estimate import main

    status, out, err = cli(main, [*argv, "--json"], capsys)
    assert status == 0, err
    return json.loads(out)


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_the_bloom_shape_gives_the_first_counts(capsys, dtype):
    report = estimate_json(capsys, "--arch", "bloom-1b1", "--mode", "bitfit", "--dtype", dtype, "--batch-size", "1",
                           "--max-len", "256")
    bitfit, full = report["modes"]["bitfit"], report["modes"]["full"]
    assert bitfit["peak_bytes"] / GiB == pytest.approx(BLOOM_FIRST_COUNTS_GIB["bitfit", dtype], rel=0.02)
    assert bitfit["trainable_params"] == 408_576 and full["trainable_params"] == 1_065_314_304  # the seed's counts
    # Full fine-tuning holds fp32 weights, their gradients and AdamW's two moments: 16 bytes a parameter.
    assert full["weights_bytes"] + full["gradient_bytes"] + full["optimizer_bytes"] == pytest.approx(
        16 * 1_065_314_304, rel=0.01)
    assert bitfit["gradient_bytes"] < 2**21 and bitfit["optimizer_bytes"] < 2**22  # the biases' alone


def test_a_7b_config_alone_is_estimated_in_little_memory(tmp_path):
    """A folder with only LLaMA-2-7B's config.json: no weights, and the process stays small."""
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_2_7B))
    script = ("import json, resource, sys; from bitfit.cli import run_main; from bitfit.estimate import main; "
              "status = run_main(main, sys.argv[1:]); "
              "print(json.dumps({'rss': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))")
    # BitFit in bf16 (on added biases: LLaMA has none), and full fine-tuning beside it.
    result = subprocess.run([sys.executable, "-c", script, "--model", str(tmp_path), "--mode", "bitfit", "--dtype",
                             "bf16", "--add-biases", "--json"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    report, usage = result.stdout.rsplit("\n{", 1)
    assert json.loads("{" + usage)["rss"] < 4 * GiB
    bitfit, full = json.loads(report)["modes"]["bitfit"], json.loads(report)["modes"]["full"]
    assert bitfit["peak_bytes"] < 16 * GiB and bitfit["trainable_params"] > 1_000_000
    # Full fine-tuning keeps fp32 weights under bf16 autocast: 16 bytes a parameter before any activation.
    assert full["peak_bytes"] > 100 * GiB


def test_the_table_names_each_part_and_where_the_peak_falls(capsys):
    from bitfit.estimate import main

    status, out, _ = cli(main, ["--mode", "full", "--max-len", "64"], capsys)
    assert status == 0
    assert "full (this run)" in out and "bitfit" in out
    for label in ("weights and buffers", "gradients", "optimizer state", "everything else", "peak"):
        assert label in out
    assert "full's peak: step " in out and "bitfit's peak: step " in out


def test_data_gives_the_longest_example_the_run_would_train(capsys, alpaca_file, tiny_model_dir):
    from transformers import AutoTokenizer

    from bitfit.data.rows import load_rows
    from bitfit.data.tokenize import tokenize_rows

    report = estimate_json(capsys, "--model", tiny_model_dir, "--data", alpaca_file, "--max-len", "128")
    examples, _ = tokenize_rows(load_rows(alpaca_file), AutoTokenizer.from_pretrained(tiny_model_dir), 128,
                                "human-assistant")
    assert report["modes"]["bitfit"]["tokens"] == max(len(examples[i]["input_ids"]) for i in range(len(examples)))


def test_train_estimate_prints_and_touches_no_folder(capsys, earlier_run, alpaca_file, tiny_model_dir):
    import train

    before = folder_bytes(earlier_run)
    status, out, err = cli(train.main, ["--model", tiny_model_dir, "--data", alpaca_file, "--output-dir",
                                        str(earlier_run), "--estimate"], capsys)
    assert status == 0, err
    assert "bitfit (this run)" in out and "peak (max_memory_allocated)" in out
    assert folder_bytes(earlier_run) == before and leftovers(earlier_run) == []


@pytest.mark.parametrize("argv,message", [
    (["--model", "{empty}"], "holds no config.json"),
    (["--model", "{bad_shape}"], "cannot build model"),
    (["--micro-batch", "0"], "--micro-batch"),
    (["--fsdp", "1"], "2 or more ranks"),
    (["--model", "{empty}/nowhere"], "not found"),
    (["--arch", "bloom-1b1", "--max-len", "1000000000"], "more than the estimate takes"),
    (["--batch-size", "100000", "--max-len", "512"], "more than the estimate takes"),
    (["--micro-batch", "auto"], "--micro-batch"),
])
def test_bad_input_is_one_line_and_exit_2(capsys, tmp_path, argv, message):
    from bitfit.estimate import main

    (tmp_path / "empty").mkdir()
    bad_shape = tmp_path / "bad"
    bad_shape.mkdir()
    (bad_shape / "config.json").write_text(json.dumps({**LLAMA_2_7B, "vocab_size": -5}))
    argv = [arg.format(empty=tmp_path / "empty", bad_shape=bad_shape) for arg in argv]
    status, out, err = cli(main, argv, capsys)
    assert status == 2
    assert len(error_lines(err)) == 1 and message in err, err


def test_train_estimate_refuses_auto(capsys):
    import train

    status, _, err = cli(train.main, ["--micro-batch", "auto", "--estimate"], capsys)
    assert status == 2 and "--micro-batch auto" in err and len(error_lines(err)) == 1


def test_the_summary_sets_the_estimate_beside_the_measured_peak(tmp_path):
    from bitfit.store.metrics import format_summary
    from bitfit.training.summary import build_summary

    from bitfit.core.loop import new_progress

    progress = {**new_progress(), "step": 1, "samples": 8, "tokens": 800, "tokens_with_padding": 800,
                "label_tokens": 4, "loss_sum": 8.0, "seconds": 1.0}
    summary = build_summary(TrainConfig(), progress, trainable=1, total=2, device=torch.device("cpu"), dropped_rows=0,
                            eval_rows=0, peak_memory_per_rank=[3 * GiB], estimated_peak_memory_bytes=2 * GiB)
    assert summary["peak_memory_vs_estimate"] == 1.5
    assert "3.00 GiB (estimated 2.00 GiB: 1.50x)" in format_summary(summary)
    on_cpu = build_summary(TrainConfig(), progress, trainable=1, total=2, device=torch.device("cpu"), dropped_rows=0,
                           eval_rows=0)
    assert on_cpu["estimated_peak_memory_bytes"] is None and on_cpu["peak_memory_vs_estimate"] is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_on_cuda_the_estimate_is_near_what_the_gpu_measured(tmp_path, dtype, capsys):
    import train

    status, out, err = cli(train.main, ["--device", "cuda", "--dtype", dtype, "--max-steps", "3", "--output-dir",
                                        str(tmp_path / "run")], capsys)
    assert status == 0, err
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    # The allocator hands out a large free block whole when what is left of it is under 1 MiB, so a GPU
    # can count a little more than the live tensors; a tiny model makes that a larger share.
    assert 0.95 < summary["peak_memory_vs_estimate"] < 1.25, summary


def test_a_gguf_file_is_estimated_from_its_metadata(capsys, gguf_path, alpaca_file):
    """The shape from the GGUF file's metadata, and its tokenizer for --data; the counts are a real load's."""
    from bitfit.core.trainable import count_parameters

    report = estimate_json(capsys, "--model", gguf_path, "--add-biases", "--data", alpaca_file, "--max-len", "64")
    model, _ = load_model_and_tokenizer(gguf_path)
    config = TrainConfig(model=gguf_path, add_biases=True, device="cpu")
    setup_model(model, config, torch.device("cpu"), log=lambda line: None)
    assert report["modes"]["bitfit"]["trainable_params"] == count_parameters(model)[0]
    assert report["modes"]["bitfit"]["tokens"] <= 64


def test_fsdp_ranks_divide_the_weights_each_rank_holds(capsys):
    one_process = estimate_json(capsys, "--max-len", "64")
    sharded = estimate_json(capsys, "--max-len", "64", "--fsdp", "4")
    assert sharded["fsdp_ranks"] == 4
    for mode in ("bitfit", "full"):
        assert sharded["modes"][mode]["weights_bytes"] < 0.3 * one_process["modes"][mode]["weights_bytes"]
