"""Will it fit? The peak GPU memory of a training run, before the run, for any model, on any machine.

    python -m bitfit.estimate --arch bloom-1b1 --mode bitfit --dtype bf16
    python -m bitfit.estimate --model path/to/folder-with-a-config.json --mode bitfit --add-biases --dtype bf16
    python -m bitfit.estimate --model meta-llama/Llama-2-70b-hf --fsdp 8 --dtype bf16 --add-biases --json

It runs bitfit's own setup and optimizer steps on fake tensors (bitfit.training.estimate): no weights
are read (a folder needs only its config.json), no memory is taken and nothing is computed. It prints
what torch.cuda.max_memory_allocated would say for the run, in the mode asked for and in the other,
and where the bytes go at the peak. train.py --estimate does the same for the run its flags describe.
"""

import dataclasses
import json
import sys

from bitfit.cli import ArgumentParser, run_main
from bitfit.config import DEFAULT_MODEL, DTYPES, FORMATS, MODES, QUANTIZE, TEMPLATES, TrainConfig
from bitfit.errors import InputError

ARCHS = ("tiny", "gpt2", "smollm2-135m", "bloom-1b1")  # bitfit.bench's named shapes
D = TrainConfig()


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m bitfit.estimate",
                            description="Estimate the peak GPU memory of a training run, BitFit beside full "
                                        "fine-tuning, without a GPU and without the weights.")
    add = parser.add_argument
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", help="hub id (its config in the local cache), folder (a config.json is "
                                        "enough) or .gguf file (default: the built-in tiny GPT-2)")
    source.add_argument("--arch", choices=ARCHS, help="a named model shape of bitfit.bench instead")
    add("--mode", choices=MODES, default=D.mode, help=f"the run's mode; the other is shown beside it "
                                                      f"(default: {D.mode})")
    add("--dtype", choices=DTYPES, default=D.dtype, help=f"(default: {D.dtype})")
    add("--quantize", choices=QUANTIZE, help="BitFit on 4-bit frozen weights")
    add("--batch-size", type=int, default=D.batch_size, help=f"examples per micro-batch (default: {D.batch_size})")
    add("--grad-accum", type=int, default=D.grad_accum, help=f"micro-batches per step (default: {D.grad_accum})")
    add("--micro-batch", type=int, help="run each window as micro-batches of N (default: --batch-size)")
    add("--max-len", type=int, default=D.max_len, help=f"tokens per example (default: {D.max_len})")
    add("--grad-checkpointing", action="store_true", help="recompute activations in backward")
    add("--add-biases", action="store_true", help="BitFit on a model without biases: train added zero biases")
    add("--bias-terms", default=D.bias_terms, help=f"the biases BitFit trains (default: {D.bias_terms})")
    add("--fsdp", type=int, metavar="RANKS", help="shard the model over this many ranks (train.py --fsdp under "
                                                  "torchrun --nproc_per_node RANKS); the memory of one rank")
    add("--data", help="estimate the longest example of this data, as the run would tokenize it (default: "
                       "a row of --max-len tokens)")
    add("--split", default=D.split, help=f"dataset split for hub datasets (default: {D.split})")
    add("--format", choices=FORMATS, help="the data's format (default: told by its columns)")
    add("--template", choices=TEMPLATES, help="how prompts are written (default: as train.py)")
    add("--limit", type=int, help="read only the first N rows of --data")
    add("--json", action="store_true", help="print one JSON object instead of the table")
    return parser


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    if args.fsdp is not None and args.fsdp < 2:
        raise InputError(f"--fsdp shards the model over 2 or more ranks; got {args.fsdp}")
    model = args.model or DEFAULT_MODEL
    config = TrainConfig(mode=args.mode, model=model, dtype=args.dtype, quantize=args.quantize,
                         batch_size=args.batch_size, grad_accum=args.grad_accum, micro_batch=args.micro_batch,
                         max_len=args.max_len, grad_checkpointing=args.grad_checkpointing,
                         add_biases=args.add_biases, bias_terms=args.bias_terms, fsdp=args.fsdp is not None,
                         data=args.data or D.data, split=args.split, format=args.format, template=args.template,
                         limit=args.limit, device="cpu")
    print(run_estimate(config, arch=args.arch, use_data=args.data is not None, ranks=args.fsdp or 1,
                       as_json=args.json))


def run_estimate(config: TrainConfig, arch: str | None = None, use_data: bool = True, ranks: int = 1,
                 as_json: bool = False, log=lambda line: print(line, file=sys.stderr)) -> str:
    """The estimate of config's run and of the other mode's, as a table or as JSON (train.py --estimate
    calls this too)."""
    from bitfit.training.estimate import estimate_both_modes, format_estimates, longest_example

    if config.micro_batch == "auto":
        raise InputError("--micro-batch auto is chosen while training, by the machine; estimate a number "
                         "(auto tries the window's size first, then halves it)")
    if arch is not None:
        from bitfit.bench import arch_positions, build_model

        name, positions = arch, arch_positions(arch)
        build = lambda dtype: (build_model(arch, dtype, "meta"), None)  # noqa: E731
        if positions is not None and config.max_len > positions:
            raise InputError(f"--max-len {config.max_len} is longer than {arch}'s {positions} positions")
        config = dataclasses.replace(config, model=f"{arch} shape")
    else:
        from bitfit.model.loading import load_model_shape
        from bitfit.training.run import fit_max_len_to_model

        name = config.model
        build = lambda dtype: load_model_shape(name, dtype)  # noqa: E731
        build(None)  # a missing or broken config is said first, before anything reads it
        config = fit_max_len_to_model(config, log)
    _, tokenizer = build(None) if use_data else (None, None)
    example = longest_example(config, tokenizer, use_data)
    estimates = estimate_both_modes(config, build, example, ranks=ranks)
    if as_json:
        return json.dumps({"model": name, "chosen_mode": config.mode, "fsdp_ranks": ranks if config.fsdp else None,
                           "settings": {key: value for key, value in config.to_dict().items() if key in SHOWN},
                           "modes": {mode: estimate.to_dict() for mode, estimate in estimates.items()}}, indent=2)
    where = f", rank 0 of {ranks} under --fsdp" if config.fsdp else ""
    return format_estimates(estimates, config.mode, f"{name}: {config.dtype}{', nf4' if config.quantize else ''}, "
                                                     f"batch {config.batch_size} x grad accum {config.grad_accum}, "
                                                     f"max len {config.max_len}{where}")


# The settings that decide memory, which the JSON repeats.
SHOWN = {"mode", "dtype", "quantize", "batch_size", "grad_accum", "micro_batch", "max_len", "grad_checkpointing",
         "add_biases", "bias_terms", "fsdp"}


if __name__ == "__main__":
    sys.exit(run_main(main))
