"""Merge a bias delta into its base and write an ordinary Hugging Face model folder, e.g.

    python -m bitfit.export --bias runs/bitfit --out runs/bitfit/merged

The folder (weights with the tuned biases in place, config, tokenizer) loads with
AutoModelForCausalLM.from_pretrained and needs neither bitfit nor the delta to run.
"""

import sys
from pathlib import Path

from bitfit.cli import ArgumentParser, run_main
from bitfit.errors import InputError


def parse_args(argv=None):
    parser = ArgumentParser(prog="python -m bitfit.export",
                            description="Write a base model with a bias delta merged in as a model folder.")
    add = parser.add_argument
    add("--model", help="base model: hub id or folder (default: the base recorded in the delta)")
    add("--bias", required=True, help="a run folder holding bias.safetensors, or the file itself")
    add("--out", required=True, help="the model folder to write")
    add("--force", action="store_true",
        help="merge even though the delta's recorded base fingerprint differs from this base's")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    from bitfit.checkpoint import apply_bias_delta, load_bias_delta, recorded_base, save_model_folder
    from bitfit.model import load_model_and_tokenizer

    tensors, metadata = load_bias_delta(args.bias)
    model_name = args.model or recorded_base([metadata])
    if model_name is None:
        raise InputError(f"{args.bias}: the delta does not record its base model; name it with --model")
    out = Path(args.out)
    _check_out_folder(out, model_name)
    model, tokenizer = load_model_and_tokenizer(model_name)
    try:
        apply_bias_delta(model, tensors, metadata, force=args.force)
    except InputError as error:
        raise InputError(f"{args.bias}: {error} (this base: {model_name})") from None
    save_model_folder(out, model, tokenizer)
    print(f"wrote {out}: {model_name} with the {len(tensors)} bias tensors of {args.bias} merged in")


def _check_out_folder(out: Path, model_name: str) -> None:
    """Replace an earlier export, but never the base itself or a folder that is not a model."""
    if out.exists() and out.resolve() == Path(model_name).expanduser().resolve():
        raise InputError(f"--out {out} is the base model's own folder; choose another")
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file; it must be a folder to write")
    if out.is_dir() and any(out.iterdir()) and not (out / "config.json").is_file():
        raise InputError(f"--out {out} holds files but no model; choose a new or empty folder")


if __name__ == "__main__":
    sys.exit(run_main(main))
