"""Merge a bias delta into its base and write an ordinary Hugging Face model folder, e.g.

    python -m bitfit.export --bias runs/bitfit --out runs/bitfit-merged

The folder (weights with the tuned biases in place, config, tokenizer with its chat template)
loads with AutoModelForCausalLM.from_pretrained and needs neither bitfit nor the delta to run.

A delta with biases that --add-biases created needs an architecture whose config can switch
those biases on (LLaMA's attention_bias and mlp_bias); where none can, export refuses.
"""

import copy
import sys
from pathlib import Path

from bitfit.cli import ArgumentParser, run_main
from bitfit.errors import InputError

# Config switches that give Linear layers biases: LLaMA's attention_bias (q, k, v and o projections)
# and mlp_bias (gate, up and down), also used by configs derived from LLaMA's.
BIAS_FLAGS = ("attention_bias", "mlp_bias")


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
    from bitfit.chat import has_chat_template
    from bitfit.checkpoint import load_bias_delta, recorded_base, save_model_folder
    from bitfit.inference import prompt_template
    from bitfit.model import load_model_and_tokenizer

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
    if template == "seed" and has_chat_template(tokenizer):
        print("note: the delta trained on the seed's prompts (Human: ... Assistant: ), not through the chat "
              "template the folder's tokenizer carries; prompt it the seed's way")


def merge_bias_delta(model, tensors: dict, metadata: dict | None = None, force: bool = False) -> list[str]:
    """Put a delta into model for good, so that save_model_folder writes an ordinary
    model folder: check and apply it (bitfit.checkpoint.apply_bias_delta), then switch on the config
    flags that give the biases --add-biases created a place in the folder; return those flags.
    """
    from bitfit.checkpoint import apply_bias_delta, delta_added_biases

    apply_bias_delta(model, tensors, metadata, force=force)
    added = delta_added_biases(metadata)
    return hold_added_biases(model, added) if added else []


def hold_added_biases(model, added: list[str]) -> list[str]:
    """Switch on the config flags that give the added biases a place in a saved model folder;
    return the flags switched on.

    A flag usually creates more biases than the delta trained (attention_bias creates q, k, v and
    o's): those get zeros, which change no output. Which flag creates which bias is found by
    building the model with it on the meta device (shapes only, no memory).
    """
    import torch
    import transformers

    from bitfit.bias import add_zero_bias, is_bias

    def bias_names(config) -> set[str]:
        with torch.device("meta"):
            skeleton = transformers.AutoModelForCausalLM.from_config(config)
        return {name for name, _ in skeleton.named_parameters() if is_bias(name)}

    config = copy.deepcopy(model.config)
    held = bias_names(config)
    for flag in BIAS_FLAGS:
        if getattr(config, flag, None) is False and not set(added) <= held:
            setattr(config, flag, True)
            with_flag = bias_names(config)
            if with_flag & (set(added) - held):
                held = with_flag
            else:
                setattr(config, flag, False)
    missing = [name for name in added if name not in held]
    if missing:
        raise InputError(f"a {type(model).__name__} cannot hold the biases that --add-biases added (such "
                         f"as {missing[0]}): its config has no switch for them, so no model folder can carry "
                         f"them; use the delta directly with generate.py --bias")
    present = {name for name, _ in model.named_parameters()}
    for name in sorted(held - present):
        add_zero_bias(model.get_submodule(name.removesuffix(".bias")))
    switched = [flag for flag in BIAS_FLAGS if getattr(config, flag, None) != getattr(model.config, flag, None)]
    for flag in switched:
        setattr(model.config, flag, True)
    return switched


def _check_out_folder(out: Path, model_name: str, overwrite: bool) -> None:
    """Before the model loads: a folder that can be written, never the base itself, and one that
    holds nothing unless --overwrite (which still writes a new folder and swaps it in whole)."""
    from bitfit.rundir import check_output_path

    check_output_path(out, "--out")
    if out.exists() and out.resolve() == Path(model_name).expanduser().resolve():
        raise InputError(f"--out {out} is the base model's own folder; choose another")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise InputError(f"--out {out} holds files; choose a new or empty folder, or pass --overwrite to "
                         f"replace it")


if __name__ == "__main__":
    sys.exit(run_main(main))
