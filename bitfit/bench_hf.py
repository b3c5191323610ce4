"""bitfit beside the seed notebook's flow (the Hugging Face Trainer), on the same rows, each run alone, e.g.

    python -m bitfit.bench_hf --model models/smollm2-135m-instruct --add-biases --limit 64
    python -m bitfit.bench_hf --rows 1000                       # the built-in tiny GPT-2, the sample rows cycled

The seed notebook trained BitFit with transformers' Trainer at batch 1 x accum 8. Here the Trainer gets what
bitfit trains on: the same examples (the human-assistant prompt, labels -100 over it, collated the same way)
and the same trainable biases (--add-biases where the model has none), at the same learning rate, with no
warm-up, for one epoch. Then train.py runs the same window of 8 examples cut as the seed cuts it (1 x 8), as
one micro-batch (8 x 1), as 2 x 4, and with --micro-batch auto. Each run is a fresh process, one after the
other, so no run's threads compete with another's, and with --rounds the runs take turns, round after
round; the table gives each run's fastest round: the training loop's seconds (the Trainer's train_runtime;
bitfit's summary seconds, auto's probing windows among them) and the train loss.

This is a benchmark, not a test: it reports numbers and asserts none.
"""

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from bitfit.cli import ArgumentParser, run_main
from bitfit.config import DEFAULT_DATA, DEFAULT_MODEL
from bitfit.errors import InputError

ROOT = Path(__file__).resolve().parents[1]  # where train.py is
SPLITS = {"1 x 8": ("1", "8", None), "8 x 1": ("8", "1", None), "2 x 4": ("2", "4", None),
          "1 x 8, --micro-batch auto": ("1", "8", "auto")}


def parse_args(argv=None):
    parser = ArgumentParser(prog="python -m bitfit.bench_hf",
                            description="Time bitfit's splits of the seed's window beside the HF Trainer's seed flow.")
    add = parser.add_argument
    add("--model", default=DEFAULT_MODEL, help="model (default: the built-in tiny GPT-2)")
    add("--data", default=DEFAULT_DATA, help="rows (default: the alpaca sample)")
    add("--rows", type=int, help="train on this many rows, the data's cycled as needed (default: --limit or all)")
    add("--limit", type=int, help="the first N rows of the data")
    add("--add-biases", action="store_true", help="give a model without biases zero ones to train (LLaMA, SmolLM2)")
    add("--lr", type=float, default=1e-3, help="learning rate (default: 1e-3)")
    add("--max-len", type=int, default=256, help="tokens per example (default: 256)")
    add("--rounds", type=int, default=1, help="run every run this many times, in turns; the fastest counts "
                                              "(default: 1)")
    add("--worker", choices=["trainer"], help=argparse_hidden())
    add("--rows-file", help=argparse_hidden())
    args = parser.parse_args(argv)
    for flag, value in [("--rows", args.rows), ("--limit", args.limit), ("--rounds", args.rounds)]:
        if value is not None and value <= 0:
            raise InputError(f"{flag} must be a positive number, got {value}")
    return args


def argparse_hidden():
    import argparse

    return argparse.SUPPRESS


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker == "trainer":
        print(json.dumps(trainer_run(args)), flush=True)
        return
    results = {}  # run -> the rounds' results
    with tempfile.TemporaryDirectory() as scratch:
        rows_file = write_rows(args, Path(scratch))
        for _ in range(args.rounds):  # the runs take turns, so that a busy moment falls on one of each
            name = "HF Trainer, 1 x 8 (the seed notebook's flow)"
            results.setdefault(name, []).append(in_fresh_process(
                [sys.executable, "-m", "bitfit.bench_hf", "--worker", "trainer", "--rows-file", rows_file,
                 *shared_flags(args)], json_line=True))
            print(json.dumps({name: results[name][-1]}), flush=True)
            for name, (batch, accum, micro) in SPLITS.items():
                results.setdefault(name, []).append(bitfit_run(args, rows_file, Path(scratch), batch, accum, micro))
                print(json.dumps({name: results[name][-1]}), flush=True)
    print(format_table(results, args))


def bitfit_run(args, rows_file: str, scratch: Path, batch: str, accum: str, micro: str | None) -> dict:
    folder = scratch / f"run-{batch}x{accum}-{micro}"
    shutil.rmtree(folder, ignore_errors=True)
    command = [sys.executable, str(ROOT / "train.py"), "--model", args.model, "--data", rows_file,
               "--template", "human-assistant", "--epochs", "1", "--lr", str(args.lr), "--warmup-ratio", "0",
               "--max-len", str(args.max_len), "--batch-size", batch, "--grad-accum", accum,
               "--output-dir", str(folder)] + (["--micro-batch", micro] if micro else []) + \
        (["--add-biases"] if args.add_biases else [])
    in_fresh_process(command)
    summary = json.loads((folder / "summary.json").read_text())
    result = {"seconds": summary["seconds"], "train_loss": summary["train_loss"]}
    if micro:
        result["chose"] = json.loads((folder / "train_config.json").read_text())["micro_batch"]
    return result


def shared_flags(args) -> list[str]:
    return ["--model", args.model, "--lr", str(args.lr), "--max-len", str(args.max_len)] + \
        (["--add-biases"] if args.add_biases else [])


def write_rows(args, scratch: Path) -> str:
    """The rows every run trains on, in one file: the data's first --limit, cycled to --rows."""
    from bitfit.data.rows import load_rows

    rows = load_rows(args.data, limit=args.limit)
    count = args.rows or len(rows)
    path = scratch / "rows.json"
    path.write_text(json.dumps([rows[index % len(rows)] for index in range(count)]))
    return str(path)


def in_fresh_process(command: list[str], json_line: bool = False) -> dict | str:
    """Run command; return its last JSON line (json_line), or what it printed."""
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise InputError(f"{' '.join(command[:4])} ... failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
    if json_line:
        return json.loads([line for line in done.stdout.splitlines() if line.startswith("{")][-1])
    return done.stdout


def trainer_run(args) -> dict:
    """The seed's flow: transformers' Trainer at batch 1 x accum 8 over bitfit's examples and biases."""
    import torch
    from torch.utils.data import Dataset
    from transformers import Trainer, TrainingArguments

    from bitfit.config import TrainConfig
    from bitfit.core.examples import collate
    from bitfit.data.rows import load_rows
    from bitfit.data.tokenize import tokenize_rows
    from bitfit.model.loading import load_model_and_tokenizer, pad_token_id
    from bitfit.training.setup import freeze

    model, tokenizer = load_model_and_tokenizer(args.model)
    freeze(model, TrainConfig(add_biases=args.add_biases))  # the same trainable biases as bitfit's
    examples, _ = tokenize_rows(load_rows(args.rows_file), tokenizer, args.max_len, "human-assistant")

    class Examples(Dataset):
        def __len__(self):
            return len(examples)

        def __getitem__(self, index):
            return examples[index]

    with tempfile.TemporaryDirectory() as scratch:
        settings = TrainingArguments(output_dir=scratch, per_device_train_batch_size=1, gradient_accumulation_steps=8,
                                     learning_rate=args.lr, num_train_epochs=1, lr_scheduler_type="linear",
                                     warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, logging_steps=1,
                                     save_strategy="no", report_to=[], seed=42, use_cpu=not torch.cuda.is_available(),
                                     remove_unused_columns=False, disable_tqdm=True)
        trainer = Trainer(model=model, args=settings, train_dataset=Examples(),
                          data_collator=lambda batch: collate(batch, pad_token_id(tokenizer)))
        result = trainer.train()
    return {"seconds": result.metrics["train_runtime"], "train_loss": result.training_loss}


def format_table(results: dict, args) -> str:
    """One row a run: its fastest round's seconds and that round's loss (auto: the size it chose)."""
    best = {name: min(rounds, key=lambda result: result["seconds"]) for name, rounds in results.items()}
    peer = next(iter(best.values()))
    lines = [f"{args.model}, {args.rows or args.limit or 'all'} rows, window of 8, lr {args.lr}, fp32, one epoch, "
             f"the fastest of {args.rounds} round{'s' * (args.rounds > 1)}", "",
             "| run | training seconds | x the HF Trainer's speed | train loss |", "|---|--:|--:|--:|"]
    for name, result in best.items():
        chose = f" (chose {result['chose']})" if "chose" in result else ""
        lines.append(f"| {name}{chose} | {result['seconds']:.1f} | {peer['seconds'] / result['seconds']:.2f}x | "
                     f"{result['train_loss']:.4f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(run_main(main))
