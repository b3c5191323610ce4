"""Fine-tune a causal LM with BitFit (biases only) or fully, e.g.

    python train.py --mode bitfit
    python train.py --mode bitfit --model bigscience/bloomz-1b1 --data yahma/alpaca-cleaned --limit 1000
"""

import sys

from bitfit.cli import ArgumentParser, run_main
from bitfit.config import DEFAULT_DATA, DEFAULT_LR, DEFAULT_MODEL, DEVICES, DTYPES, MODES, TrainConfig

DEFAULTS = TrainConfig()


def parse_args(argv=None) -> TrainConfig:
    parser = ArgumentParser(description="BitFit: fine-tune only the bias terms of a causal LM.")
    add = parser.add_argument
    add("--mode", choices=MODES, default=DEFAULTS.mode,
        help="bitfit trains the biases only; full trains every parameter (the baseline)")
    add("--model", default=DEFAULT_MODEL, help="hub id or local folder (default: a built-in tiny GPT-2)")
    add("--data", default=DEFAULT_DATA,
        help="hub dataset id or a local .json/.jsonl/.csv/.parquet file of alpaca rows "
             "(default: a small sample that ships with bitfit)")
    add("--split", default=DEFAULTS.split, help="dataset split for hub datasets")
    add("--limit", type=int, help="use only the first N rows")
    add("--max-len", type=int, default=DEFAULTS.max_len, help="tokens per example, prompt included")
    add("--batch-size", type=int, default=DEFAULTS.batch_size, help="examples per micro-batch")
    add("--grad-accum", type=int, default=DEFAULTS.grad_accum, help="micro-batches per optimizer step")
    add("--epochs", type=int, default=DEFAULTS.epochs)
    add("--max-steps", type=int, help="optimizer steps to take (overrides --epochs)")
    add("--lr", type=float, help=f"peak learning rate (default: {DEFAULT_LR['bitfit']} for bitfit, "
                                 f"{DEFAULT_LR['full']} for full)")
    add("--warmup-ratio", type=float, default=DEFAULTS.warmup_ratio,
        help="fraction of the steps spent warming the learning rate up, before linear decay")
    add("--weight-decay", type=float, default=DEFAULTS.weight_decay)
    add("--max-grad-norm", type=float, default=DEFAULTS.max_grad_norm, help="gradient clipping")
    add("--seed", type=int, default=DEFAULTS.seed)
    add("--log-every", type=int, default=DEFAULTS.log_every,
        help="optimizer steps between lines in metrics.jsonl")
    add("--output-dir", help="run folder (default: runs/<mode>)")
    add("--device", choices=DEVICES, default=DEFAULTS.device)
    add("--dtype", choices=DTYPES, default=DEFAULTS.dtype)
    args = parser.parse_args(argv)
    return TrainConfig(**{key.replace("-", "_"): value for key, value in vars(args).items()})


def main(argv=None) -> None:
    from bitfit.run import run  # imported late so that --help and flag errors answer at once

    run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(run_main(main))
