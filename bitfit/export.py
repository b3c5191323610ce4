"""Merge a bias delta into its base and write an ordinary Hugging Face model folder, e.g.

    python -m bitfit.export --bias runs/bitfit --out runs/bitfit-merged

The folder (weights with the tuned biases in place, config, tokenizer with its chat template)
loads with AutoModelForCausalLM.from_pretrained and needs neither bitfit nor the delta to run.

A delta with biases that --add-biases created needs an architecture whose config can switch
those biases on (LLaMA's attention_bias and mlp_bias); where none can, export refuses
(bitfit.store.merge).
"""

import sys
from pathlib import Path

from bitfit.cli import ArgumentParser, run_main
from bitfit.errors import InputError


def parse_args(argv=None):
    parser = ArgumentParser(prog="python -m bitfit.export",
                            description="Write a base model with a bias delta merged in as a model folder.")
    add = parser.add_argument
    add("--model", help="base model: hub id, folder or .gguf file (default: the base recorded in the delta)")
    add("--bias", required=True, help="a run folder holding bias.safetensors, or the file itself")
    add("--out", required=True, help="the model folder to write (new or empty)")
    add("--overwrite", action="store_true", help="replace --out even though it holds files")
    add("--force", action="store_true",
        help="merge even though the delta's recorded base fingerprint, or chat template, differs from this base's")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    from bitfit.data.templates import has_chat_template
    from bitfit.model.loading import load_model_and_tokenizer
    from bitfit.store.delta import load_bias_delta, prompt_template, recorded_base
    from bitfit.store.files import save_model_folder
    from bitfit.store.merge import merge_bias_delta

    tensors, metadata = load_bias_delta(args.bias)
    model_name = args.model or recorded_base([metadata])
    if model_name is None:
        raise InputError(f"{args.bias}: the delta does not record its base model; name it with --model")
    out = Path(args.out)
    _check_out_folder(out, model_name, args.overwrite)
    model, tokenizer = load_model_and_tokenizer(model_name)
    # The folder keeps the tokenizer's chat template, so it must be the one the delta trained through.
    template = prompt_template(tokenizer, [metadata], force=args.force)
    try:
        flags = merge_bias_delta(model, tensors, metadata, force=args.force)
    except InputError as error:
        raise InputError(f"{args.bias}: {error} (this base: {model_name})") from None
    save_model_folder(out, model, tokenizer)
    note = f" (config: {', '.join(f'{flag}=True' for flag in flags)}, for the added biases)" if flags else ""
    print(f"wrote {out}: {model_name} with the {len(tensors)} bias tensors of {args.bias} merged in{note}")
    if template == "human-assistant" and has_chat_template(tokenizer):
        print("note: the delta trained on human-assistant prompts (Human: ... Assistant: ), not through the chat "
              "template the folder's tokenizer carries; prompt it that way")


def _check_out_folder(out: Path, model_name: str, overwrite: bool) -> None:
    """Before the model loads: a folder that can be written, never the base itself, and one that
    holds nothing unless --overwrite (which still writes a new folder and swaps it in whole)."""
    from bitfit.store.run_folder import check_output_path

    check_output_path(out, "--out")
    if out.exists() and out.resolve() == Path(model_name).expanduser().resolve():
        raise InputError(f"--out {out} is the base model's own folder; choose another")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise InputError(f"--out {out} holds files; choose a new or empty folder, or pass --overwrite to "
                         f"replace it")


if __name__ == "__main__":
    sys.exit(run_main(main))
