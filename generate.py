"""Show what a model says, before and after its bias deltas, e.g.

    python generate.py --bias runs/bitfit --prompt "List five steps for comparing two products." --compare
    python generate.py --bias runs/a --bias runs/b --prompts prompts.txt --compare
    python generate.py --model runs/full/model --prompt "Name three primary colors."

One base model stays in memory; each delta is applied, answers every prompt, and is removed
(restoring the base bit for bit) before the next one.
"""

import sys

from bitfit.cli import ArgumentParser, run_main
from bitfit.config import DEFAULT_MODEL, DEVICES
from bitfit.errors import InputError

DEFAULT_PROMPT = "List five steps for comparing two products."


def parse_args(argv=None):
    parser = ArgumentParser(description="Answer prompts with a base model and BitFit bias deltas.")
    add = parser.add_argument
    add("--model", help="base model: hub id, folder or .gguf file (default: the base recorded in the bias "
                        "deltas, else the built-in tiny GPT-2)")
    add("--bias", action="append", default=[],
        help="a run folder holding bias.safetensors, or the file itself; repeat to compare deltas")
    prompt = parser.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", help=f"the instruction (default: {DEFAULT_PROMPT!r})")
    prompt.add_argument("--prompts", metavar="FILE",
                        help="many prompts: a text file with one instruction per line, or an alpaca "
                             ".json/.jsonl of rows with instruction and input")
    add("--input", default="", help="optional context for --prompt")
    add("--batch-size", type=int, default=8, help="prompts answered together")
    add("--max-new-tokens", type=int, default=64)
    add("--temperature", type=float, default=0.0, help="0 means greedy decoding")
    add("--compare", action="store_true", help="print the base model's answer, then the tuned ones")
    add("--force", action="store_true",
        help="apply a delta even though its recorded base fingerprint differs from this base's")
    add("--device", choices=DEVICES, default="auto")
    add("--seed", type=int, default=0, help="for sampling when --temperature > 0")
    args = parser.parse_args(argv)
    for flag, value in [("--max-new-tokens", args.max_new_tokens), ("--batch-size", args.batch_size)]:
        if value <= 0:
            raise InputError(f"{flag} must be a positive number, got {value}")
    if args.temperature < 0:
        raise InputError(f"--temperature must be >= 0, got {args.temperature}")
    if args.compare and not args.bias:
        raise InputError("--compare needs --bias: it compares the base model with the tuned one")
    if args.input and args.prompts:
        raise InputError("--input goes with --prompt; in a --prompts file give each row its own input")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    import torch

    from bitfit.checkpoint import (apply_bias_delta, check_bias_delta, load_bias_delta, recorded_base,
                                   remove_bias_delta)
    from bitfit.inference import generate_answers, read_prompts
    from bitfit.model import load_model_and_tokenizer, resolve_device

    prompts = read_prompts(args.prompts) if args.prompts else [(args.prompt or DEFAULT_PROMPT, args.input)]
    deltas = [(path, *load_bias_delta(path)) for path in args.bias]
    model_name = args.model or recorded_base([metadata for _, _, metadata in deltas]) or DEFAULT_MODEL
    device = resolve_device(args.device)
    model, tokenizer = load_model_and_tokenizer(model_name)
    model.to(device)
    # Check every delta before answering anything, so a mismatch costs no generation time.
    for path, tensors, metadata in deltas:
        try:
            check_bias_delta(model, tensors, metadata, force=args.force)
        except InputError as error:
            raise InputError(f"{path}: {error} (this base: {model_name})") from None

    def answer() -> list[str]:
        torch.manual_seed(args.seed)
        return generate_answers(model, tokenizer, prompts, max_new_tokens=args.max_new_tokens,
                                temperature=args.temperature, batch_size=args.batch_size)

    columns = []  # (heading, one answer per prompt)
    if args.compare or not deltas:
        columns.append((f"Base model ({model_name})", answer()))
    for path, tensors, metadata in deltas:
        previous = apply_bias_delta(model, tensors, metadata, force=args.force)
        columns.append((f"With bias delta ({path})", answer()))
        remove_bias_delta(model, previous)

    for number, (instruction, input) in enumerate(prompts, 1):
        title = "### Prompt" if len(prompts) == 1 else f"### Prompt {number} of {len(prompts)}"
        print(f"{title}\n{instruction}" + (f"\n{input}" if input else "") + "\n")
        for heading, answers in columns:
            print(f"### {heading}\n{answers[number - 1]}\n")


if __name__ == "__main__":
    sys.exit(run_main(main))
