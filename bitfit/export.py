"""Take a delta out of bitfit, in the form its users run, e.g.

    python -m bitfit.export --bias runs/bitfit --out runs/bitfit-merged                      # --format hf
    python -m bitfit.export --bias runs/bitfit --format gguf --out tuned.gguf --model base.gguf
    python -m bitfit.export --bias runs/bitfit --format peft --out runs/bitfit-adapter

hf (the default): the base with the delta merged in, an ordinary Hugging Face model folder that loads
with AutoModelForCausalLM.from_pretrained and needs neither bitfit nor the delta (bitfit.store.merge).
gguf: a copy of a GGUF base file, quantized blocks untouched, with the trained biases added: llama.cpp,
Ollama and LM Studio run it (bitfit.store.gguf_export). peft: a BEFT adapter folder that
peft.PeftModel.from_pretrained loads onto the base (bitfit.store.peft_export).

Each checks the delta against its base first (fingerprint, shapes, chat template), refuses what the format
cannot carry in one line before anything is written, and writes atomically.
"""

import sys
from pathlib import Path

from bitfit.cli import ArgumentParser, run_main
from bitfit.errors import InputError

FORMATS = ("hf", "gguf", "peft")


def parse_args(argv=None):
    parser = ArgumentParser(prog="python -m bitfit.export",
                            description="Write a bias delta out as a merged model folder, a GGUF file for "
                                        "llama.cpp, or a PEFT adapter.")
    add = parser.add_argument
    add("--model", help="base model: hub id, folder or .gguf file (default: the base recorded in the delta; "
                        "--format gguf needs a .gguf file)")
    add("--bias", required=True, help="a run folder holding bias.safetensors, or the file itself")
    add("--format", choices=FORMATS, default="hf",
        help="hf: a merged model folder (default); gguf: a GGUF file for llama.cpp; peft: a BEFT adapter folder")
    add("--out", required=True, help="the model folder (hf, peft: new or empty) or .gguf file (gguf: new) to write")
    add("--overwrite", action="store_true", help="replace --out even though it exists")
    add("--force", action="store_true",
        help="export even though the delta's recorded base fingerprint, or chat template, differs from this base's")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    from bitfit.data.templates import has_chat_template
    from bitfit.model.loading import load_model_and_tokenizer
    from bitfit.store.delta import check_bias_delta, load_bias_delta, prompt_template, recorded_base

    from bitfit.store.delta import find_bias_file

    tensors, metadata = load_bias_delta(args.bias)
    delta = find_bias_file(args.bias)
    model_name = args.model or recorded_base([metadata])
    if model_name is None:
        raise InputError(f"{args.bias}: the delta does not record its base model; name it with --model")
    out = Path(args.out)
    if args.format == "gguf":
        base_file = check_gguf_base(model_name, list(tensors), out, args.overwrite)
    else:
        _check_out_folder(out, model_name, args.overwrite, delta)
    record = {"written_by": "python -m bitfit.export", "format": args.format, "delta": str(delta.resolve()),
              "base_model": model_name}
    model, tokenizer = load_model_and_tokenizer(model_name)
    # What is written keeps (or is run with) the tokenizer's chat template: the one the delta trained through.
    template = prompt_template(tokenizer, [metadata], force=args.force)
    try:
        check_bias_delta(model, tensors, metadata, force=args.force)
    except InputError as error:
        raise InputError(f"{args.bias}: {error} (this base: {model_name})") from None
    if args.format == "hf":
        from bitfit.store.files import save_model_folder
        from bitfit.store.merge import merge_bias_delta

        flags = merge_bias_delta(model, tensors, metadata, force=True)  # checked above
        save_model_folder(out, model, tokenizer, record=record)
        note = f" (config: {', '.join(f'{flag}=True' for flag in flags)}, for the added biases)" if flags else ""
        print(f"wrote {out}: {model_name} with the {len(tensors)} bias tensors of {args.bias} merged in{note}")
    elif args.format == "gguf":
        from bitfit.store.gguf_export import write_gguf_with_biases

        write_gguf_with_biases(base_file, out, tensors, model.config, record)
        print(f"wrote {out}: {base_file} with the {len(tensors)} bias tensors of {args.bias} added "
              f"({out.stat().st_size / 1e6:.0f} MB, the base {base_file.stat().st_size / 1e6:.0f} MB)")
    else:
        from bitfit.store.peft_export import write_peft_adapter

        write_peft_adapter(model, tensors, metadata, out, model_name, record)
        print(f"wrote {out}: a BEFT adapter of the {len(tensors)} bias tensors of {args.bias}, for {model_name}")
    if template == "human-assistant" and has_chat_template(tokenizer):
        print("note: the delta trained on human-assistant prompts (Human: ... Assistant: ), not through the chat "
              "template the tokenizer carries; prompt it that way")


def check_gguf_base(model_name: str, names: list[str], out: Path, overwrite: bool) -> Path:
    """Before anything loads: the base is a GGUF file whose architecture llama.cpp loads these biases for,
    and --out is a file that may be written. Returns the base file."""
    from bitfit.model.gguf import find_gguf_file, is_gguf_source
    from bitfit.store.gguf_export import gguf_bias_names, written_by_export
    from bitfit.store.run_folder import check_output_path

    if not is_gguf_source(model_name):
        raise InputError(f"--format gguf copies a GGUF base file, and the base {model_name} is not one: name the GGUF "
                         f"file of the same model with --model, or export --format hf and convert that folder with "
                         f"llama.cpp's convert_hf_to_gguf.py")
    base_file = find_gguf_file(model_name)
    gguf_bias_names(base_file, names)
    check_output_path(out, "--out", file=True)
    if out.exists() and out.resolve() == base_file.resolve():
        raise InputError(f"--out {out} is the base file itself; choose another")
    if out.exists() and not overwrite:
        raise InputError(f"--out {out} exists; choose a new file, or pass --overwrite to replace an earlier export")
    if out.exists() and not written_by_export(out):
        raise InputError(f"--out {out} is not a file that bitfit.export wrote; --overwrite replaces only an earlier "
                         f"export, so choose a new file")
    return base_file


def _check_out_folder(out: Path, model_name: str, overwrite: bool, delta: Path) -> None:
    """Before the model loads: a folder that can be written, never the base itself nor one that holds the
    delta, and one that holds nothing unless --overwrite, which replaces only an earlier export's folder
    (it still writes a new folder and swaps it in whole)."""
    from bitfit.store.files import not_exported
    from bitfit.store.run_folder import check_output_path

    check_output_path(out, "--out")
    if out.exists() and out.resolve() == Path(model_name).expanduser().resolve():
        raise InputError(f"--out {out} is the base model's own folder; choose another")
    if out.exists() and out.resolve() in delta.resolve().parents:
        raise InputError(f"--out {out} holds the delta being exported ({delta}); choose another folder")
    if not (out.is_dir() and any(out.iterdir())):
        return
    if not overwrite:
        raise InputError(f"--out {out} holds files; choose a new or empty folder, or pass --overwrite to "
                         f"replace an earlier export")
    others = not_exported(out)
    if others:
        raise InputError(f"--out {out} holds {', '.join(others[:3])}{', ...' * (len(others) > 3)}, which no export "
                         f"wrote; --overwrite replaces only an earlier export's folder, so choose a new or empty one")


if __name__ == "__main__":
    sys.exit(run_main(main))
