"""Benchmark BitFit against full fine-tuning: throughput, peak memory and MFU on a real model shape.

    python -m bitfit.bench --arch bloom-1b1 --device cuda --batch-sizes 1,4,8 --dtypes fp32,bf16

The model has the named model's shape and random weights (nothing is downloaded): speed and
memory depend on the shape, not on the values. The rows are random tokens with alpaca-like
lengths. Each (dtype, micro-batch, mode) runs in a fresh process, so no run's memory shows in
another's peak and a CUDA out-of-memory costs one line of the table, not the benchmark. Each
worker prints one JSON line; the parent prints them all, then a markdown table.
"""

import argparse
import dataclasses
import functools
import json
import math
import subprocess
import sys
import time
import traceback

from bitfit.cli import ArgumentParser, run_main
from bitfit.config import DEVICES, DTYPES, MODES, QUANTIZE, TrainConfig
from bitfit.core.examples import build_example
from bitfit.errors import InputError, Interrupted

ARCHS = ("tiny", "gpt2", "smollm2-135m", "bloom-1b1")
SEED = 0  # weights and rows; the same in every worker, so every run sees the same model and data

# Alpaca-like lengths: prompts of 15-80 tokens (uniform), responses log-normal around 90 tokens.
PROMPT_TOKENS = (15, 80)
RESPONSE_MEDIAN, RESPONSE_SIGMA = 90, 0.5

# Dense peak TFLOPS of an H100/H200 SXM (NVIDIA datasheets, without the 2:4 sparsity doubling):
# bf16/fp16 on tensor cores; fp32 matmuls use TF32 tensor cores only when PyTorch is allowed to
# (torch.set_float32_matmul_precision), and the plain fp32 units otherwise. Other devices have no
# default: pass --peak-tflops, or MFU is left null.
H100_CLASS_TFLOPS = {"bf16": 989.0, "fp16": 989.0, "tf32": 494.0, "fp32": 67.0}

# What runs when no flag says otherwise. A CPU gets fewer rows and cells, so that the tiny shape
# takes about a minute, and one warm-up step (there are no GPU kernels or allocator pools to settle).
GPU_DEFAULTS = {"dtypes": ["fp32", "bf16"], "batch_sizes": [1, 4, 8], "rows": 256, "warmup_steps": 3}
CPU_DEFAULTS = {"dtypes": ["fp32", "bf16"], "batch_sizes": [1, 8], "rows": 64, "warmup_steps": 1}


# ------------------------------------------------------------------ model shapes and rows


def arch_config(arch: str):
    """The transformers config of a named shape. Dropout is 0 in all of them so that a run's loss
    repeats exactly (bloom's own config has none; GPT-2's 0.1 would make the loss vary)."""
    import transformers

    if arch == "bloom-1b1":  # bigscience/bloom-1b1, the shape of the seed's bloomz-1b1
        return transformers.BloomConfig(vocab_size=250880, hidden_size=1536, n_layer=24, n_head=16,
                                        hidden_dropout=0.0, attention_dropout=0.0)
    if arch == "smollm2-135m":  # HuggingFaceTB/SmolLM2-135M(-Instruct), the real model of bitfit.fetch
        return transformers.LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                                        num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                                        max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=100000.0,
                                        tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    no_dropout = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    if arch == "gpt2":  # the 124M GPT-2: the config's defaults
        return transformers.GPT2Config(**no_dropout)
    if arch == "tiny":  # a few million parameters, for tests and quick runs on a CPU
        return transformers.GPT2Config(vocab_size=2048, n_positions=512, n_embd=256, n_layer=4, n_head=4,
                                       bos_token_id=0, eos_token_id=0, **no_dropout)
    raise ValueError(f"unknown arch {arch!r}")


@functools.cache
def arch_has_biases(arch: str) -> bool:
    """Whether the shape has bias terms; BitFit on one without (LLaMA's) trains added zero biases."""
    return any(name.endswith(".bias") for name, _ in build_model(arch, None, "meta").named_parameters())


def arch_positions(arch: str) -> int | None:
    """The longest sequence the shape takes; None where positions have no limit (bloom's ALiBi)."""
    config = arch_config(arch)
    return getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)


def build_model(arch: str, dtype, device="cpu"):
    """The arch with random weights drawn from SEED, built in dtype directly on device
    ("meta" builds the shape alone, with no memory behind it)."""
    import torch
    import transformers

    torch.manual_seed(SEED)
    with torch.device(device):
        return transformers.AutoModelForCausalLM.from_config(arch_config(arch), dtype=dtype)


def synthetic_examples(count: int, *, vocab_size: int, eos_id: int, max_len: int,
                       seed: int = SEED) -> list[dict]:
    """count examples of random tokens (never eos but at the end) with alpaca-like lengths.

    The response length counts its eos, so the shortest response is the eos alone. Examples are
    cut at max_len like real ones (build_example); max_len above the longest prompt keeps a label.
    """
    import torch

    generator = torch.Generator().manual_seed(seed)
    prompt_lengths = torch.randint(PROMPT_TOKENS[0], PROMPT_TOKENS[1] + 1, (count,), generator=generator)
    response_lengths = torch.empty(count).log_normal_(math.log(RESPONSE_MEDIAN), RESPONSE_SIGMA,
                                                      generator=generator).round().clamp(min=1).long()
    examples = []
    for prompt_length, response_length in zip(prompt_lengths.tolist(), response_lengths.tolist()):
        tokens = torch.randint(0, vocab_size - 1, (prompt_length + response_length - 1,), generator=generator)
        tokens += tokens >= eos_id  # skip over the eos id: the ids drawn are every id but eos
        tokens = tokens.tolist()
        examples.append(build_example(tokens[:prompt_length], tokens[prompt_length:] + [eos_id], max_len))
    return examples


def count_flops_per_token(num_params: int, mode: str) -> int:
    """Model FLOPs per trained (non-padding) token, the standard estimate behind MFU.

    A matmul with a weight of n numbers costs 2n FLOPs per token forward. Backward costs 2n more for
    the gradient of its input and 2n for the gradient of the weight: 6N in all for full training.
    BitFit freezes every weight, so autograd skips the weight gradients, but the input gradients must
    still flow back through every layer to reach the biases: 2N forward + 2N backward = 4N.

    Like any MFU this counts the model's work, not the hardware's: attention scores (about 1% at
    these lengths) are left out, gradient checkpointing's recomputation is not counted, and the
    head (a third of bloom-1b1) is counted at every token though bitfit.loss runs it only where a
    label is, so MFU can credit work the loop was clever enough to skip.
    """
    return (6 if mode == "full" else 4) * num_params


def default_peak_tflops(device_name: str, dtype: str, float32_matmul_precision: str) -> float | None:
    if "H100" not in device_name and "H200" not in device_name:
        return None
    if dtype == "fp32" and float32_matmul_precision != "highest":
        return H100_CLASS_TFLOPS["tf32"]
    return H100_CLASS_TFLOPS[dtype]


# ------------------------------------------------------------------ the command line


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m bitfit.bench",
                            description="Throughput, peak memory and MFU of bitfit vs full fine-tuning "
                                        "on a named model shape with random weights.")
    add = parser.add_argument
    add("--arch", choices=ARCHS, default="tiny", help="model shape (default: tiny)")
    add("--modes", type=csv_of(str, MODES), default=list(MODES), help="comma list (default: bitfit,full)")
    add("--dtypes", type=csv_of(str, DTYPES),
        help=f"comma list of {', '.join(DTYPES)} (default: fp32,bf16; on a CPU, half precision only "
             f"where its matmuls are faster than fp32's)")
    add("--batch-sizes", type=csv_of(int), help="micro-batch sizes, comma list (default: 1,4,8; CPU: 1,8)")
    add("--micro-batches", type=csv_of(str, None, micro=True),
        help="run each batch size x grad accum window as micro-batches of these sizes instead, comma list of "
             "whole numbers and auto (train.py --micro-batch), e.g. --batch-sizes 1 --micro-batches 1,2,8,auto")
    add("--rows", type=int, help="rows trained on in the timed part of each run (default: 256; CPU: 64)")
    add("--warmup-steps", type=int, help="untimed optimizer steps first (default: 3; CPU: 1)")
    add("--grad-accum", type=int, default=8, help="micro-batches per optimizer step (default: 8)")
    add("--max-len", type=int, default=256, help="tokens per example, prompt included (default: 256)")
    add("--device", choices=DEVICES, default="auto", help="(default: auto)")
    add("--peak-tflops", type=float, help="the device's peak TFLOPS, the MFU denominator (default: "
                                          "989 bf16/fp16 and 67 fp32 on an H100/H200, else no MFU)")
    add("--group-by-length", action="store_true", help="passed to training")
    add("--grad-checkpointing", action="store_true", help="passed to training")
    add("--compile", action="store_true", help="passed to training (torch.compile)")
    add("--quantize", choices=QUANTIZE, help="add BitFit rows with the frozen block weights held in 4 bits")
    add("--seed", type=int, default=SEED, help=argparse.SUPPRESS)
    add("--worker", action="store_true", help=argparse.SUPPRESS)  # run one cell in this process
    return parser


def csv_of(kind, choices=None, micro=False):
    """An argparse type for a comma list: of the given choices, of positive integers, or (micro) of
    positive integers and auto."""
    expected = f"of {', '.join(choices)}" if choices else "of positive integers" + (" and auto" if micro else "")

    def parse(text: str) -> list:
        try:
            values = [item if micro and item == "auto" else int(item) if micro else kind(item)
                      for item in text.split(",") if item.strip()]
        except ValueError:
            values = []
        if not values or any((v not in choices) if choices else v != "auto" and v <= 0 for v in values):
            raise argparse.ArgumentTypeError(f"expected a comma list {expected}, got {text!r}")
        return values
    return parse


def check_args(args) -> None:
    """Bad numbers are found before any worker starts: one line and exit 2, not a table of errors."""
    if args.rows <= 0:
        raise InputError(f"--rows must be a positive number, got {args.rows}")
    if args.warmup_steps < 0:
        raise InputError(f"--warmup-steps must be 0 or more, got {args.warmup_steps}")
    if args.peak_tflops is not None and not (math.isfinite(args.peak_tflops) and args.peak_tflops > 0):
        raise InputError(f"--peak-tflops must be a positive number, got {args.peak_tflops}")
    if args.max_len <= PROMPT_TOKENS[1]:
        raise InputError(f"--max-len must be above {PROMPT_TOKENS[1]}, the longest synthetic prompt, "
                         f"so that every row keeps a response token; got {args.max_len}")
    positions = arch_positions(args.arch)
    if positions is not None and args.max_len > positions:
        raise InputError(f"--max-len {args.max_len} is longer than {args.arch}'s {positions} positions")
    for dtype, batch_size, mode, quantize, micro in list_runs(args):  # TrainConfig checks the rest
        train_config(args, mode, dtype, batch_size, quantize, micro)


def list_runs(args) -> list[tuple]:
    """(dtype, batch size, mode, quantize, micro-batch) of each run: --quantize adds a BitFit run on the
    4-bit base after each BitFit run (full fine-tuning cannot train quantized weights); --micro-batches
    runs each window once per micro-batch size."""
    runs = []
    for dtype in args.dtypes:
        for batch_size in args.batch_sizes:
            for micro in args.micro_batches or [None]:
                for mode in args.modes:
                    runs.append((dtype, batch_size, mode, None, micro))
                    if mode == "bitfit" and args.quantize:
                        runs.append((dtype, batch_size, mode, args.quantize, micro))
    return runs


def train_config(args, mode: str, dtype: str, batch_size: int, quantize: str | None = None, micro=None
                 ) -> TrainConfig:
    return TrainConfig(mode=mode, dtype=dtype, batch_size=batch_size, grad_accum=args.grad_accum, micro_batch=micro,
                       max_len=args.max_len, seed=args.seed, device=args.device,
                       group_by_length=args.group_by_length, grad_checkpointing=args.grad_checkpointing,
                       compile=args.compile, quantize=quantize,
                       add_biases=mode == "bitfit" and not arch_has_biases(args.arch))


def fill_in_defaults(args) -> None:
    """The defaults for the device of the run, for every flag not given."""
    args.dtypes_given = args.dtypes is not None
    for key, value in (CPU_DEFAULTS if args.device == "cpu" else GPU_DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)


def skip_slow_half_precision(args) -> None:
    """On a CPU, half precision runs by default only where its matmuls are at least as fast as
    fp32's: without kernels for it a CPU emulates it many times slower, and one cell would take
    longer than all the others together. Asked for with --dtypes, it runs (and is labelled)."""
    if args.device != "cpu" or args.dtypes_given:
        return
    slow = [dtype for dtype in args.dtypes if not cpu_has_fast_kernels(dtype)]
    args.dtypes = [dtype for dtype in args.dtypes if dtype not in slow]
    for dtype in slow:
        print(f"skipping {dtype}: this CPU multiplies {dtype} matrices slower than fp32 ones (no fast "
              f"kernels for it); --dtypes {dtype} runs it anyway", file=sys.stderr, flush=True)


@functools.cache
def cpu_has_fast_kernels(dtype: str) -> bool:
    """Whether a matmul in dtype takes no longer than in fp32 on this CPU: timed, not guessed from
    its name (bf16 is fast with AVX512-BF16 or AMX, fp16 with AMX-FP16; elsewhere both crawl).

    One thread, the two dtypes in turn, the fastest of ten each: what the kernels can do, not how
    busy the other cores are (a matmul on two threads waits for the slower one)."""
    import torch

    from bitfit.core.step import AUTOCAST_DTYPES

    if dtype == "fp32":
        return True
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        matrices = [torch.ones(256, 256, dtype=AUTOCAST_DTYPES[dtype]), torch.ones(256, 256)]
        fastest = [math.inf, math.inf]
        for _ in range(10):
            for which, matrix in enumerate(matrices):
                start = time.perf_counter()
                matrix @ matrix
                fastest[which] = min(fastest[which], time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    return fastest[0] <= fastest[1]


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    if args.worker:
        run_worker(args)
        return
    from bitfit.model.compute import resolve_device

    args.device = resolve_device(args.device).type  # resolved once: every worker uses the same
    fill_in_defaults(args)
    check_args(args)
    skip_slow_half_precision(args)
    try:
        results = run_benchmark(args)
    except KeyboardInterrupt:
        raise Interrupted("benchmark stopped; the lines above are the runs that finished") from None
    print()
    print(format_table(results, args))


# ------------------------------------------------------------------ the parent: one process per run


def run_benchmark(args) -> list[dict]:
    runs = list_runs(args)
    results = []
    start = time.perf_counter()
    for number, (dtype, batch_size, mode, quantize, micro) in enumerate(runs, 1):
        label = f"{mode} {quantize}" if quantize else mode
        cut = f", run as micro-batches of {micro}" if micro else ""
        print(f"[{number}/{len(runs)}] {label} {dtype} micro-batch {batch_size}{cut} "
              f"({time.perf_counter() - start:.0f} s so far)", file=sys.stderr, flush=True)
        result = run_in_fresh_process(args, mode, dtype, batch_size, quantize, micro)
        if args.device == "cpu" and not cpu_has_fast_kernels(dtype):
            result["note"] = f"no fast {dtype} kernels on this CPU: slower than fp32"
        print(json.dumps(result), flush=True)  # each line as its run ends, even into a pipe
        results.append(result)
    print(f"{len(runs)} runs in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    return results


def run_in_fresh_process(args, mode: str, dtype: str, batch_size: int, quantize: str | None = None, micro=None
                         ) -> dict:
    command = [sys.executable, "-m", "bitfit.bench", "--worker", "--arch", args.arch, "--modes", mode,
               "--dtypes", dtype, "--batch-sizes", str(batch_size), "--rows", str(args.rows),
               "--warmup-steps", str(args.warmup_steps), "--grad-accum", str(args.grad_accum),
               "--max-len", str(args.max_len), "--device", args.device, "--seed", str(args.seed)]
    if args.peak_tflops is not None:
        command += ["--peak-tflops", str(args.peak_tflops)]
    if quantize:  # in a worker, --quantize means this run's base
        command += ["--quantize", quantize]
    if micro:
        command += ["--micro-batches", str(micro)]
    command += [flag for flag, on in [("--group-by-length", args.group_by_length),
                                      ("--grad-checkpointing", args.grad_checkpointing),
                                      ("--compile", args.compile)] if on]
    # The worker's stderr (progress bar, traceback) goes straight to ours. Its own session keeps a
    # Ctrl-C at the terminal from reaching it; this process stops it instead.
    worker = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, _ = worker.communicate()
    except KeyboardInterrupt:
        worker.kill()
        worker.wait()
        raise
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    if lines:
        return json.loads(lines[-1])
    how = f"was killed by signal {-worker.returncode}" if worker.returncode < 0 else \
        f"exited with status {worker.returncode}"
    return {**run_identity(args, mode, dtype, batch_size, quantize, micro),
            "error": f"the worker {how} and printed no result"}


def run_identity(args, mode: str, dtype: str, batch_size: int, quantize: str | None = None, micro=None) -> dict:
    return {"mode": mode, "quantize": quantize, "arch": args.arch, "dtype": dtype, "micro_batch": batch_size,
            "run_as": micro, "added_biases": train_config(args, mode, dtype, batch_size, quantize).add_biases,
            "grad_accum": args.grad_accum, "rows": args.rows, "max_len": args.max_len,
            "warmup_steps": args.warmup_steps, "group_by_length": args.group_by_length,
            "grad_checkpointing": args.grad_checkpointing, "compile": args.compile}


# ------------------------------------------------------------------ the worker: one run, one line


def run_worker(args) -> None:
    mode, dtype, batch_size = args.modes[0], args.dtypes[0], args.batch_sizes[0]
    micro = args.micro_batches[0] if args.micro_batches else None
    identity = run_identity(args, mode, dtype, batch_size, args.quantize, micro)
    try:
        result = {**identity, **measure(args, train_config(args, mode, dtype, batch_size, args.quantize, micro))}
    except Exception as error:  # a CUDA out-of-memory, say: one failed run, not a failed benchmark
        traceback.print_exc()
        message = (str(error).strip().splitlines() or [""])[0][:300]
        result = {**identity, "error": f"{type(error).__name__}: {message}"}
    print(json.dumps(result), flush=True)


def measure(args, config: TrainConfig) -> dict:
    import torch

    from bitfit.core.loop import train_loop
    from bitfit.model.compute import resolve_device, weights_dtype
    from bitfit.store.metrics import peak_memory_bytes, peak_rss_bytes, reset_peak_memory, weight_bytes, work_done
    from bitfit.training.setup import setup_model
    from bitfit.training.summary import device_name

    device = resolve_device(config.device)
    model = build_model(args.arch, weights_dtype(config), device)
    num_params = sum(p.numel() for p in model.parameters())  # tied embedding and head counted once
    setup = setup_model(model, config, device, log=lambda line: None)  # as a run sets its model up
    options = dict(world=setup.world, loss_fn=setup.loss_fn, scaler=setup.scaler)
    examples = synthetic_examples(args.rows, vocab_size=model.config.vocab_size,
                                  eos_id=model.config.eos_token_id, max_len=config.max_len, seed=args.seed)
    pad_id = model.config.pad_token_id if model.config.pad_token_id is not None else model.config.eos_token_id
    chosen = {}
    if config.micro_batch == "auto":  # as a run chooses it, in the timed windows (the probing is timed too)
        from bitfit.core.loop import FixedMicroBatch
        from bitfit.training.micro_batch import micro_batches

        def decided(size, why):
            chosen["chosen_micro_batch"] = size
            print(f"--micro-batch auto: {size}, {why}", file=sys.stderr, flush=True)

        options["micro_batches"] = micro_batches(model, examples, config, pad_id=pad_id, device=device,
                                                 loss_fn=setup.loss_fn, world=setup.world, decided=decided)
        warmup_options = {**options, "micro_batches": FixedMicroBatch(config.batch_size * config.grad_accum)}
    else:
        warmup_options = options

    reset_peak_memory(device)
    # train_loop itself writes no file: a run's files come from bitfit.training.run around it.
    if args.warmup_steps:  # cuDNN/cuBLAS choices, the allocator's pools, torch.compile: untimed
        warmup = dataclasses.replace(config, max_steps=args.warmup_steps)
        train_loop(model, setup.optimizer, examples, warmup, pad_id=pad_id, device=device, **warmup_options)
    steps = math.ceil(args.rows / (config.batch_size * config.grad_accum))
    timed = dataclasses.replace(config, max_steps=steps)
    progress = train_loop(model, setup.optimizer, examples, timed, pad_id=pad_id, device=device, **options)
    if hasattr(options.get("micro_batches"), "choose"):
        options["micro_batches"].choose()  # fewer timed windows than candidates: what it tried

    seconds = progress["seconds"]
    flops_per_token = count_flops_per_token(num_params, config.mode)
    name = device_name(device)
    peak_tflops = args.peak_tflops or default_peak_tflops(name, config.dtype,
                                                          torch.get_float32_matmul_precision())
    achieved_flops = flops_per_token * progress["tokens"] / seconds  # real tokens: padding is wasted work
    return {
        "device": name,
        "total_params": num_params,
        "trainable_params": setup.trainable,
        **work_done(progress),
        "weight_bytes": weight_bytes(model),
        "peak_allocated_bytes": peak_memory_bytes(device),
        "peak_reserved_bytes": torch.cuda.max_memory_reserved(device) if device.type == "cuda" else None,
        "peak_rss_bytes": peak_rss_bytes(),
        "flops_per_token": flops_per_token,
        "peak_tflops": peak_tflops,
        "mfu": achieved_flops / (peak_tflops * 1e12) if peak_tflops else None,
        **chosen,
    }


# ------------------------------------------------------------------ the table


def format_table(results: list[dict], args) -> str:
    from bitfit.store.metrics import gib

    done = [r for r in results if "error" not in r]
    where = f" ({done[0]['total_params']:,} params) on {done[0]['device']}" if done else ""
    lines = [f"{args.arch}{where}: {args.rows} rows, grad accum {args.grad_accum}, max len {args.max_len}",
             "",
             "| mode | dtype | micro-batch | samples/s | tokens/s | peak allocated | peak reserved "
             "| peak RSS | MFU | train loss | padding |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        mode = f"{r['mode']} {r['quantize']}" if r.get("quantize") else r["mode"]
        mode += " (added biases)" if r.get("added_biases") else ""
        dtype = f"{r['dtype']} (no fast kernels here)" if "note" in r else r["dtype"]
        run_as = r.get("run_as")
        cells = [mode, dtype, str(r["micro_batch"]) + (f", run as {run_as}" if run_as else "")
                 + (f" (chose {r['chosen_micro_batch']})" if run_as == "auto" and "chosen_micro_batch" in r else "")]
        if "error" in r:
            cells += [r["error"].replace("|", "/")] + [""] * 7
        else:
            cells += [f"{r['samples_per_s']:.2f}", f"{r['tokens_per_s']:,.0f}",
                      gib(r["peak_allocated_bytes"]), gib(r["peak_reserved_bytes"]), gib(r["peak_rss_bytes"]),
                      "n/a" if r["mfu"] is None else f"{r['mfu']:.1%}", f"{r['train_loss']:.4f}",
                      f"{r['padding_fraction']:.1%}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(run_main(main))
