"""Show what a model says, before and after its bias deltas, e.g.

    python generate.py --bias runs/bitfit --prompt "List five steps for comparing two products." --compare
    python generate.py --bias runs/a --bias runs/b --prompts prompts.txt --compare
    python generate.py --model runs/full/model --prompt "Name three primary colors."
    python generate.py --bias runs/bitfit --quantize nf4     # on the 4-bit base a --quantize nf4 run had

One base model stays in memory; each delta is applied, answers every prompt, and is removed
(restoring the base bit for bit) before the next one.
"""

import math
import sys

from bitfit.cli import ArgumentParser, run_main
from bitfit.config import DEFAULT_MODEL, DEVICES, QUANTIZE, TEMPLATE_ALIASES, TEMPLATES, check_seed
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
                        help="many prompts: a text file with one instruction per line, or a .json/.jsonl "
                             "of alpaca rows (instruction, input) or of messages rows ending in a user turn")
    add("--input", default="", help="optional context for --prompt")
    add("--batch-size", type=int, default=8, help="prompts answered together")
    add("--max-new-tokens", type=int, default=64)
    add("--temperature", type=float, default=0.0, help="0 means greedy decoding")
    add("--compare", action="store_true", help="print the base model's answer, then the tuned ones")
    add("--template", choices=(*TEMPLATES, *TEMPLATE_ALIASES),
        help="prompt through the human-assistant template (the seed notebook's; seed is its older name) or the "
             "tokenizer's chat template (default: the one the deltas "
             "were trained with; without deltas, chat where the tokenizer has a chat template)")
    add("--force", action="store_true",
        help="apply a delta even though its recorded base fingerprint, or chat template, differs from this base's")
    add("--quantize", choices=QUANTIZE, help="serve on the 4-bit base that train.py --quantize nf4 trains on "
                                             "(a delta fits either base)")
    add("--device", choices=DEVICES, default="auto")
    add("--seed", type=int, default=0, help="for sampling when --temperature > 0")
    args = parser.parse_args(argv)
    for flag, value in [("--max-new-tokens", args.max_new_tokens), ("--batch-size", args.batch_size)]:
        if value <= 0:
            raise InputError(f"{flag} must be a positive number, got {value}")
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise InputError(f"--temperature must be a finite number >= 0 (0 = greedy), got {args.temperature}")
    if args.prompt is not None and not args.prompt.strip():
        raise InputError("--prompt is empty; give an instruction (or leave --prompt out for the default one)")
    check_seed(args.seed)
    if args.compare and not args.bias:
        raise InputError("--compare needs --bias: it compares the base model with the tuned one")
    if args.input and args.prompts:
        raise InputError("--input goes with --prompt; in a --prompts file give each row its own input")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    import torch
    from tqdm import tqdm

    from bitfit.data.prompts import read_prompts
    from bitfit.model.compute import resolve_device
    from bitfit.model.generation import generate_answers, room_for_answers, show_prompt
    from bitfit.model.loading import load_model_and_tokenizer, position_limit
    from bitfit.store.delta import (
        apply_bias_delta,
        check_bias_delta,
        load_bias_delta,
        prompt_template,
        recorded_base,
        remove_bias_delta,
    )

    prompts = read_prompts(args.prompts) if args.prompts else [(args.prompt or DEFAULT_PROMPT, args.input)]
    deltas = [(path, *load_bias_delta(path)) for path in args.bias]
    model_name = args.model or recorded_base([metadata for _, _, metadata in deltas]) or DEFAULT_MODEL
    limit = position_limit(model_name)  # from the model's config, before its weights load
    device = resolve_device(args.device)
    model, tokenizer = load_model_and_tokenizer(model_name)
    if args.quantize:
        from bitfit.model.quantize import quantize_frozen_weights

        quantize_frozen_weights(model, device)
    model.to(device)
    # Check every delta, and that every prompt leaves room for an answer, before answering anything.
    for path, tensors, metadata in deltas:
        try:
            check_bias_delta(model, tensors, metadata, force=args.force)
        except InputError as error:
            raise InputError(f"{path}: {error} (this base: {model_name})") from None
    template = prompt_template(tokenizer, [metadata for _, _, metadata in deltas], args.template, args.force)
    max_new_tokens = args.max_new_tokens
    room = room_for_answers(tokenizer, prompts, limit, model_name, template) if limit is not None else max_new_tokens
    if room < max_new_tokens:
        print(f"--max-new-tokens {max_new_tokens} capped at {room}: {model_name} reads at most {limit} "
              f"positions, and the longest prompt takes {limit - room}", file=sys.stderr)
        max_new_tokens = room

    # One column per model: the base (with --compare, or when there is no delta), then each delta.
    base = f"{model_name}, {args.quantize}" if args.quantize else model_name
    columns = [(f"Base model ({base})", None)] if args.compare or not deltas else []
    columns += [(f"With bias delta ({path})", (tensors, metadata)) for path, tensors, metadata in deltas]
    bar = tqdm(total=len(prompts) * len(columns), unit="answer", disable=len(prompts) == 1, file=sys.stderr)
    for start in range(0, len(prompts), args.batch_size):
        batch = prompts[start:start + args.batch_size]
        answers = []  # per column, one per prompt of the batch
        for _, delta in columns:
            previous = apply_bias_delta(model, *delta, force=args.force) if delta else {}
            torch.manual_seed(args.seed)
            answers.append(generate_answers(model, tokenizer, batch, max_new_tokens=max_new_tokens,
                                            temperature=args.temperature, batch_size=len(batch), template=template))
            remove_bias_delta(model, previous)
            bar.update(len(batch))
        # Printed as each batch finishes: a long --prompts file shows answers as it goes.
        for offset, prompt in enumerate(batch):
            number = start + offset + 1
            title = "### Prompt" if len(prompts) == 1 else f"### Prompt {number} of {len(prompts)}"
            text = f"{title}\n{show_prompt(prompt)}\n"
            for (heading, _), column in zip(columns, answers):
                text += f"\n### {heading}\n{column[offset]}\n"
            tqdm.write(text, file=sys.stdout)
    bar.close()


if __name__ == "__main__":
    sys.exit(run_main(main))
