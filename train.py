"""Fine-tune a causal LM with BitFit (biases only) or fully, e.g.

    python train.py --mode bitfit
    python train.py --mode bitfit --model bigscience/bloomz-1b1 --data yahma/alpaca-cleaned --limit 1000
    python train.py --resume runs/bitfit --max-steps 500
"""

import argparse
import sys

from bitfit.cli import ArgumentParser, run_main
from bitfit.config import DEFAULT_LR, DEVICES, DTYPES, MODES, TrainConfig
from bitfit.errors import InputError

D = TrainConfig()  # the defaults, shown in --help
# A resumed run keeps its own settings; only its length may change.
MAY_CHANGE_ON_RESUME = {"max_steps", "epochs"}


def build_parser() -> ArgumentParser:
    # Flags default to "not given" so that --resume can tell what the user asked to change.
    parser = ArgumentParser(description="BitFit: fine-tune only the bias terms of a causal LM.",
                            argument_default=argparse.SUPPRESS)
    add = parser.add_argument
    add("--mode", choices=MODES, help=f"bitfit trains the biases only; full trains every parameter "
                                      f"(default: {D.mode})")
    add("--model", help="hub id, local folder or .gguf file (default: a built-in tiny GPT-2)")
    add("--data", help="hub dataset id or a local .json/.jsonl/.csv/.parquet file of alpaca rows "
                       "(default: a small sample that ships with bitfit)")
    add("--split", help=f"dataset split for hub datasets (default: {D.split})")
    add("--limit", type=int, help="use only the first N rows")
    add("--max-len", type=int, help=f"tokens per example, prompt included (default: {D.max_len})")
    add("--batch-size", type=int, help=f"examples per micro-batch (default: {D.batch_size})")
    add("--grad-accum", type=int, help=f"micro-batches per optimizer step (default: {D.grad_accum})")
    add("--epochs", type=int, help=f"passes over the data (default: {D.epochs})")
    add("--max-steps", type=int, help="optimizer steps to take (overrides --epochs)")
    add("--lr", type=float, help=f"peak learning rate (default: {DEFAULT_LR['bitfit']} for bitfit, "
                                 f"{DEFAULT_LR['full']} for full)")
    add("--warmup-ratio", type=float, help=f"fraction of the steps spent warming the learning rate up, "
                                           f"before linear decay (default: {D.warmup_ratio})")
    add("--weight-decay", type=float, help=f"AdamW weight decay (default: {D.weight_decay})")
    add("--max-grad-norm", type=float, help=f"gradient clipping (default: {D.max_grad_norm})")
    add("--seed", type=int, help=f"data order, held-out rows and dropout (default: {D.seed})")
    add("--log-every", type=int, help=f"optimizer steps between lines in metrics.jsonl (default: {D.log_every})")
    add("--eval-size", type=float, help="hold out rows for evaluation: a count, or a fraction if < 1")
    add("--eval-every", type=int, help="optimizer steps between evaluations (always before and after)")
    add("--save-every", type=int, help="optimizer steps between resumable checkpoints")
    add("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its checkpoint")
    add("--output-dir", help="run folder (default: runs/<mode>)")
    add("--device", choices=DEVICES, help=f"(default: {D.device})")
    add("--dtype", choices=DTYPES, help=f"bf16/fp16: half-precision compute under autocast; BitFit "
                                        f"also stores its frozen weights in it (default: {D.dtype})")
    add("--group-by-length", action="store_true", help="micro-batches of similar lengths: less padding")
    add("--grad-checkpointing", action="store_true", help="recompute activations in backward: less "
                                                          "memory, ~30%% more compute")
    add("--compile", action="store_true", help="torch.compile the transformer body")
    add("--bias-terms", help=f"biases BitFit trains: a comma list of all, query, key, value, attn-out, "
                             f"mlp-in, mlp-out, norm, or regular expressions over parameter names, "
                             f"e.g. query,mlp-in (default: {D.bias_terms})")
    add("--add-biases", action="store_true", help="BitFit on a model without biases (LLaMA, Mistral): "
                                                  "give the Linear layers --bias-terms chooses zero biases "
                                                  "to train")
    return parser


def parse_args(argv=None) -> tuple[TrainConfig, dict | None]:
    """Return the run's settings and, with --resume, the checkpoint to continue from."""
    given = vars(build_parser().parse_args(argv))
    run_dir = given.pop("resume", None)
    if run_dir is None:
        return TrainConfig(**given), None

    from bitfit.resume import load_training_state

    state = load_training_state(run_dir)
    saved = {**state["config"], "output_dir": run_dir}
    for key, value in given.items():
        before = saved.get(key, getattr(D, key))  # a checkpoint from before the flag existed
        if key not in MAY_CHANGE_ON_RESUME and value != before:
            flag = "--" + key.replace("_", "-")
            raise InputError(f"{flag} {value} differs from the resumed run's {before}; a resumed "
                             f"run keeps its settings (only --max-steps and --epochs may change)")
    return TrainConfig(**{**saved, **given}), state


def main(argv=None) -> None:
    config, resume_state = parse_args(argv)
    from bitfit import distributed  # imported late so that --help and flag errors answer at once
    from bitfit.model import resolve_device
    from bitfit.run import run

    # Under torchrun, join the other ranks (a no-op in a single process).
    world = distributed.setup(resolve_device(config.device))
    try:
        run(config, resume_state, world=world)
    finally:
        distributed.cleanup()


if __name__ == "__main__":
    sys.exit(run_main(main))
