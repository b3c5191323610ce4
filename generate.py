"""Show what a model says, before and after its bias delta, e.g.

    python generate.py --bias runs/bitfit --prompt "List five steps for comparing two products." --compare
    python generate.py --model runs/full/model --prompt "Name three primary colors."
"""

import sys

from bitfit.cli import ArgumentParser, run_main
from bitfit.config import DEFAULT_MODEL, DEVICES
from bitfit.errors import InputError

DEFAULT_PROMPT = "List five steps for comparing two products."


def parse_args(argv=None):
    parser = ArgumentParser(description="Answer a prompt with a base model and a BitFit bias delta.")
    add = parser.add_argument
    add("--model", help="base model: hub id or folder (default: the base recorded in the bias "
                        "delta, else the built-in tiny GPT-2)")
    add("--bias", help="a run folder holding bias.safetensors, or the file itself")
    add("--prompt", default=DEFAULT_PROMPT, help="the instruction")
    add("--input", default="", help="optional context for the instruction")
    add("--max-new-tokens", type=int, default=64)
    add("--temperature", type=float, default=0.0, help="0 means greedy decoding")
    add("--compare", action="store_true", help="print the base model's answer, then the tuned one")
    add("--device", choices=DEVICES, default="auto")
    add("--seed", type=int, default=0, help="for sampling when --temperature > 0")
    args = parser.parse_args(argv)
    if args.max_new_tokens <= 0:
        raise InputError(f"--max-new-tokens must be a positive number, got {args.max_new_tokens}")
    if args.temperature < 0:
        raise InputError(f"--temperature must be >= 0, got {args.temperature}")
    if args.compare and not args.bias:
        raise InputError("--compare needs --bias: it compares the base model with the tuned one")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    import torch

    from bitfit.checkpoint import apply_bias_delta, load_bias_delta
    from bitfit.inference import generate_answers
    from bitfit.model import load_model_and_tokenizer, resolve_device

    delta, metadata = load_bias_delta(args.bias) if args.bias else ({}, {})
    model_name = args.model or metadata.get("base_model") or DEFAULT_MODEL
    device = resolve_device(args.device)
    model, tokenizer = load_model_and_tokenizer(model_name)
    model.to(device)

    def answer() -> str:
        torch.manual_seed(args.seed)
        return generate_answers(model, tokenizer, [(args.prompt, args.input)],
                                max_new_tokens=args.max_new_tokens, temperature=args.temperature)[0]

    print(f"### Prompt\n{args.prompt}" + (f"\n{args.input}" if args.input else "") + "\n")
    if args.compare or not args.bias:
        print(f"### Base model ({model_name})\n{answer()}\n")
    if args.bias:
        apply_bias_delta(model, delta)
        print(f"### With bias delta ({args.bias})\n{answer()}\n")


if __name__ == "__main__":
    sys.exit(run_main(main))
