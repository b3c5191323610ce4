"""Fine-tune a causal LM with BitFit (biases only) or fully, e.g.

    python train.py --mode bitfit
    python train.py --mode bitfit --model bigscience/bloomz-1b1 --data yahma/alpaca-cleaned --limit 1000
    python train.py --resume runs/bitfit --max-steps 500
    python train.py --config runs/bitfit/train_config.json --lr 5e-4 --output-dir runs/bitfit-lr5e-4

This file turns flags into a TrainConfig and calls bitfit.training.run.run. The training step itself
is bitfit/core/step.py's train_step; python -m bitfit.walkthrough writes the same step out to read first.
"""

import argparse
import sys

from bitfit.cli import ArgumentParser, run_main
from bitfit.config import (DEFAULT_LR, DEVICES, DTYPES, FORMATS, MODES, QUANTIZE, REPORT_TO, TEMPLATE_ALIASES,
                           TEMPLATES, TrainConfig, canonical_template, read_config_file)
from bitfit.errors import InputError

D = TrainConfig()  # the defaults, shown in --help
# A resumed run keeps its own settings; only its length may change.
MAY_CHANGE_ON_RESUME = {"max_steps", "epochs"}


def build_parser() -> ArgumentParser:
    # Flags default to "not given" so that --resume can tell what the user asked to change.
    parser = ArgumentParser(description="BitFit: fine-tune only the bias terms of a causal LM.",
                            argument_default=argparse.SUPPRESS)
    add = parser.add_argument
    add("--config", metavar="FILE", help="start from the settings in a JSON or YAML file (a run's "
                                         "train_config.json is one); flags given here override them")
    add("--mode", choices=MODES, help=f"bitfit trains the biases only; full trains every parameter "
                                      f"(default: {D.mode})")
    add("--model", help="hub id, local folder or .gguf file (default: a built-in tiny GPT-2)")
    add("--data", help="hub dataset id or a local .json/.jsonl/.csv/.parquet file of rows in one of the "
                       "--format formats (default: a small sample of alpaca rows that ships with bitfit)")
    add("--split", help=f"dataset split for hub datasets (default: {D.split})")
    add("--format", choices=FORMATS, help="the data's format (default: told by its columns: instruction and "
                                          "output; prompt and completion; messages; conversations)")
    add("--template", choices=(*TEMPLATES, *TEMPLATE_ALIASES),
        help="how prompts are written: human-assistant, the seed notebook's Human: ... Assistant: (seed is its "
             "older name), or chat, the tokenizer's chat template (default: chat where the tokenizer has one, "
             "else human-assistant)")
    add("--limit", type=int, help="use only the first N rows")
    add("--max-len", type=int, help=f"tokens per example, prompt included (default: {D.max_len})")
    add("--batch-size", type=int, help=f"examples per micro-batch (default: {D.batch_size})")
    add("--grad-accum", type=int, help=f"micro-batches per optimizer step (default: {D.grad_accum})")
    add("--micro-batch", type=micro_batch, metavar="N|auto",
        help="run each optimizer step's batch-size x grad-accum examples as micro-batches of N, sorted by length; "
             "the same update, another speed and memory; auto picks N for speed (default: batch-size)")
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
    add("--overwrite", action="store_true", help="replace the run already in --output-dir (without it, "
                                                 "a folder holding a run is refused)")
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
    add("--quantize", choices=QUANTIZE, help="BitFit with the frozen weights of the transformer blocks held in "
                                             "4 bits (NF4, as in QLoRA); embeddings, norms and head keep --dtype")
    add("--report-to", choices=REPORT_TO, help="also write the metrics as TensorBoard event files, in the run "
                                               "folder's tensorboard/ (metrics.jsonl is always written)")
    add("--fsdp", action="store_true", help="under torchrun: shard every parameter over the ranks (FSDP2), "
                                            "for a model too large for one GPU")
    add("--estimate", action="store_true", help="print the run's peak GPU memory, estimated without a GPU "
                                                "(python -m bitfit.estimate), and exit without training")
    return parser


def micro_batch(text: str) -> int | str:
    """--micro-batch: a whole number, or auto (TrainConfig checks the range)."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive whole number or auto, got {text!r}") from None


def parse_args(argv=None) -> tuple[TrainConfig, dict | None, bool]:
    """Return the run's settings, with --resume the checkpoint to continue from, and --overwrite."""
    given = vars(build_parser().parse_args(argv))
    given.pop("estimate", None)
    run_dir = given.pop("resume", None)
    overwrite = given.pop("overwrite", False)
    config_file = given.pop("config", None)
    if run_dir is not None and config_file is not None:
        raise InputError("--config starts a new run from a file's settings; --resume continues a run with "
                         "the settings it started with: use one or the other")
    if run_dir is None:
        from_file = read_config_file(config_file) if config_file is not None else {}
        return TrainConfig(**{**from_file, **given}), None, overwrite
    if overwrite:
        raise InputError("--overwrite starts the run afresh and --resume continues it: give one of them")

    from bitfit.store.checkpoint import load_training_state

    state = load_training_state(run_dir)
    saved = {**state["config"], "output_dir": run_dir}
    if "template" in given:
        given["template"] = canonical_template(given["template"])
    for key, value in given.items():
        before = saved.get(key, getattr(D, key))  # a checkpoint from before the flag existed
        if key not in MAY_CHANGE_ON_RESUME and value != before:
            flag = "--" + key.replace("_", "-")
            raise InputError(f"{flag} {value} differs from the resumed run's {before}; a resumed "
                             f"run keeps its settings (only --max-steps and --epochs may change)")
    return TrainConfig(**{**saved, **given}), state, False


def main(argv=None) -> None:
    config, resume_state, overwrite = parse_args(argv)
    if "--estimate" in (sys.argv[1:] if argv is None else argv):
        estimate(config)
        return
    from bitfit.compare import compare_command  # imported late so that --help and flag errors answer at once
    from bitfit.model.compute import resolve_device
    from bitfit.parallel import torchrun
    from bitfit.training.run import run

    # Under torchrun, join the other ranks (a no-op in a single process).
    world = torchrun.setup(resolve_device(config.device))
    try:
        run(config, resume_state, world=world, overwrite=overwrite)
    finally:
        torchrun.cleanup()
    command = compare_command(config.output_dir, config.mode)
    if command is not None and world.is_main:
        print(f"compare it with the other mode's run: {command}")


def estimate(config: TrainConfig) -> None:
    """--estimate: the run's peak memory, printed; nothing is trained and the output folder is not touched.
    Under torchrun the ranks are torchrun's (rank 0 prints)."""
    import os

    from bitfit.estimate import run_estimate

    ranks = int(os.environ.get("WORLD_SIZE", "1"))
    if config.fsdp and ranks < 2:
        raise InputError("--estimate --fsdp needs the number of ranks: run it under torchrun --nproc_per_node N, "
                         "or python -m bitfit.estimate --fsdp N")
    report = run_estimate(config, use_data=True, ranks=ranks)
    if os.environ.get("RANK", "0") == "0":
        print(report)


if __name__ == "__main__":
    sys.exit(run_main(main))
