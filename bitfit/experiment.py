"""Does BitFit learn? BitFit and full fine-tuning of a real model, on a behaviour it does not have.

    python -m bitfit.experiment            # SmolLM2-135M-Instruct, about 15 minutes on a 2-core CPU

The behaviour: answer a short question with one JSON object, {"answer": "..."}, and nothing else.
SmolLM2-135M-Instruct knows many of the answers (capitals, sums, plurals, chemical symbols) but
never writes them that way: asked "What is the capital of France?" it says "The capital of France
is Paris." bitfit/assets/json_answers_train.json teaches the format on 158 questions;
json_answers_held_out.json holds 42 others of the same kinds, never trained on. Questions are put
through the model's own chat template (the human-assistant template for a tokenizer without one).

Each run trains from the same base with train.py, in a fresh process (so that its peak memory is
its own): BitFit on all the biases --add-biases creates and full fine-tuning, for one epoch and for
three; BitFit at a larger learning rate; BitFit on subsets of the biases; and BitFit in bf16 on the
plain base against BitFit in bf16 on the 4-bit (--quantize nf4) base. Then every model answers the
held-out questions (greedy), and a program checks each reply: is it one JSON object with the one key
"answer" and nothing else (the behaviour), and does it say the right answer (in any format, so the
base is judged too). A run is scored on the base it trained on, as generate.py serves it: the 4-bit
runs on the 4-bit base (`generate.py --quantize nf4`), the others on the plain one. The table
reports, per run: trained parameters, seconds, peak memory, held-out loss and those two shares,
before (that base's own) and after.
"""

import contextlib
import json
import re
import subprocess
import sys
from pathlib import Path

from bitfit.cli import ArgumentParser, run_main
from bitfit.config import ASSETS, DEVICES
from bitfit.errors import InputError

ROOT = Path(__file__).resolve().parents[1]  # where train.py is
TRAIN_DATA = ASSETS / "json_answers_train.json"
HELD_OUT_DATA = ASSETS / "json_answers_held_out.json"
DEFAULT_MODEL = "models/smollm2-135m-instruct"  # python -m bitfit.fetch smollm2-135m-instruct

BITFIT = ["--mode", "bitfit", "--add-biases"]
# name -> (train.py flags, epochs). Each run starts from the base. The learning rates are train.py's
# defaults (1e-3 BitFit, 5e-5 full) but in one run; one epoch shows how fast a method learns, three
# how far it gets.
RUNS = {
    "bitfit-1ep": (BITFIT, 1),
    "bitfit-3ep": (BITFIT, 3),
    "bitfit-lr3e-3-1ep": ([*BITFIT, "--lr", "3e-3"], 1),
    "bitfit-query-mlp-in-3ep": ([*BITFIT, "--bias-terms", "query,mlp-in"], 3),
    "bitfit-attn-out-3ep": ([*BITFIT, "--bias-terms", "attn-out"], 3),
    # The 4-bit base (--quantize nf4) against the plain one, both in bf16 as --quantize is meant to run.
    "bitfit-bf16-3ep": ([*BITFIT, "--dtype", "bf16"], 3),
    "bitfit-nf4-3ep": ([*BITFIT, "--dtype", "bf16", "--quantize", "nf4"], 3),
    "full-1ep": (["--mode", "full"], 1),
    "full-3ep": (["--mode", "full"], 3),
}
MAX_NEW_TOKENS = 24  # a right reply takes about ten
EXAMPLES = 3  # held-out replies printed before and after


def parse_args(argv=None):
    parser = ArgumentParser(prog="python -m bitfit.experiment",
                            description="Train BitFit and full fine-tuning on the JSON-answers data and "
                                        "check the held-out replies.")
    add = parser.add_argument
    add("--model", default=DEFAULT_MODEL, help=f"base model (default: {DEFAULT_MODEL})")
    add("--runs", default=",".join(RUNS), help=f"comma list of {', '.join(RUNS)} (default: all)")
    add("--device", choices=DEVICES, default="auto")
    add("--output-dir", default="runs/experiment", help="a run folder per run, and results.json "
                                                        "(default: runs/experiment)")
    args = parser.parse_args(argv)
    args.runs = [name.strip() for name in args.runs.split(",") if name.strip()]
    unknown = [name for name in args.runs if name not in RUNS]
    if unknown or not args.runs:
        raise InputError(f"--runs takes a comma list of {', '.join(RUNS)}; got {', '.join(unknown) or 'none'}")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    from bitfit.data.templates import choose_template
    from bitfit.model.compute import resolve_device
    from bitfit.model.loading import load_model_and_tokenizer
    from bitfit.model.quantize import quantize_frozen_weights
    from bitfit.store.files import save_json

    output_dir = Path(args.output_dir)
    model, tokenizer = load_model_and_tokenizer(args.model)  # the base: also checks --model before training
    # The model's own chat template where it has one (an instruct model is asked the way it was
    # taught), in training and in answering alike.
    template = choose_template(None, tokenizer)
    summaries = {name: train(name, args, template, output_dir / name) for name in args.runs}

    held_out = read_rows(HELD_OUT_DATA)
    print(f"answering the {len(held_out)} held-out questions", file=sys.stderr, flush=True)
    bases = {None: (model, score(model, tokenizer, held_out, template, args.device))}
    results = {}
    for name in args.runs:
        quantize = summaries[name]["quantize"]
        if quantize not in bases:  # the base this run trained on, as generate.py --quantize serves it
            quantized = load_model_and_tokenizer(args.model)[0]
            quantize_frozen_weights(quantized, resolve_device(args.device))
            bases[quantize] = (quantized, score(quantized, tokenizer, held_out, template, args.device))
        base, base_score = bases[quantize]
        with tuned(base, output_dir / name) as tuned_model:
            results[name] = {**summaries[name], "base": base_score,
                             **score(tuned_model, tokenizer, held_out, template, args.device)}
    report = {"model": args.model, "template": template, "held_out": held_out, "base": bases[None][1],
              "runs": results}
    save_json(output_dir / "results.json", report)
    print(format_table(report))
    print()
    print(format_examples(report, EXAMPLES))


# ------------------------------------------------------------------ training: train.py, one process a run


def train(name: str, args, template: str, run_dir: Path) -> dict:
    """Train one run with train.py in a fresh process; return the figures of its summary."""
    flags, epochs = RUNS[name]
    command = [sys.executable, str(ROOT / "train.py"), "--model", args.model, "--data", str(TRAIN_DATA),
               "--template", template, "--epochs", str(epochs), "--batch-size", "8", "--grad-accum", "1",
               "--max-len", "64", "--seed", "0", "--device", args.device, "--output-dir", str(run_dir),
               "--overwrite", *flags]
    print(f"+ {' '.join(command[1:])}", file=sys.stderr, flush=True)
    done = subprocess.run(command, stdout=subprocess.DEVNULL)
    if done.returncode != 0:
        raise InputError(f"run {name} failed (train.py exited with status {done.returncode}); its messages "
                         f"are above")
    summary = json.loads((run_dir / "summary.json").read_text())
    settings = json.loads((run_dir / "train_config.json").read_text())
    return {"mode": summary["mode"], "bias_terms": settings["bias_terms"], "lr": settings["lr"], "epochs": epochs,
            **{key: summary[key] for key in ("trainable_params", "total_params", "optimizer_steps", "seconds",
                                             "peak_memory_bytes", "peak_rss_bytes", "train_loss", "device",
                                             "dtype", "quantize", "weight_bytes")}}


@contextlib.contextmanager
def tuned(base, run_dir: Path):
    """The base with a run's result in place: its bias delta applied (and removed afterwards),
    or, for full fine-tuning, the model folder it wrote."""
    from bitfit.model.loading import load_model_and_tokenizer
    from bitfit.store.delta import BIAS_FILE, apply_bias_delta, load_bias_delta, remove_bias_delta

    if not (run_dir / BIAS_FILE).is_file():
        yield load_model_and_tokenizer(str(run_dir / "model"))[0]
        return
    previous = apply_bias_delta(base, *load_bias_delta(str(run_dir)))
    try:
        yield base
    finally:
        remove_bias_delta(base, previous)


# ------------------------------------------------------------------ scoring the held-out answers


def read_rows(path: Path) -> list[dict]:
    return json.loads(path.read_text())


def score(model, tokenizer, rows: list[dict], template: str, device: str) -> dict:
    """Held-out loss (token-weighted, as in training) and the greedy answers, checked."""
    from bitfit.config import TrainConfig
    from bitfit.core.loop import evaluate
    from bitfit.data.tokenize import tokenize_rows
    from bitfit.model.compute import resolve_device
    from bitfit.model.generation import generate_answers
    from bitfit.model.loading import pad_token_id

    device = resolve_device(device)
    model.to(device)
    examples, _ = tokenize_rows(rows, tokenizer, max_len=64, template=template)
    loss = evaluate(model, examples, TrainConfig(batch_size=8), pad_token_id(tokenizer), device)
    answers = generate_answers(model, tokenizer, [(row["instruction"], row["input"]) for row in rows],
                               max_new_tokens=MAX_NEW_TOKENS, batch_size=8, template=template)
    expected = [json.loads(row["output"])["answer"] for row in rows]
    return {"held_out_loss": loss,
            "json_share": sum(json_answer(answer) is not None for answer in answers) / len(rows),
            "right_share": sum(mentions(answer, right) for answer, right in zip(answers, expected)) / len(rows),
            "answers": answers}


def json_answer(text: str) -> str | None:
    """The answer, if text is exactly one JSON object with the one key "answer" holding a string."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None
    if isinstance(value, dict) and list(value) == ["answer"] and isinstance(value["answer"], str):
        return value["answer"]
    return None


def mentions(answer: str, expected: str) -> bool:
    """Whether the expected answer appears in the reply as a word (or words), whatever the case and
    the format: the base's free text is judged on what it says, the JSON replies on their answer."""
    return re.search(rf"\b{re.escape(expected)}\b", answer, flags=re.IGNORECASE) is not None


# ------------------------------------------------------------------ the report


def format_table(report: dict) -> str:
    from bitfit.store.metrics import gib

    lines = [f"{report['model']}: {len(read_rows(TRAIN_DATA))} training questions in micro-batches of 8, "
             f"{len(report['held_out'])} held-out questions; before -> after",
             "",
             "| run | trains | lr | epochs | trained parameters | seconds | peak memory | held-out loss "
             "| JSON replies | right replies |",
             "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for name, run in report["runs"].items():
        base = run["base"]  # the base it trained on: the 4-bit one for --quantize runs
        trains = "every weight" if run["mode"] == "full" else f"biases: {run['bias_terms']}"
        trains += f", {run['dtype']}" if run["dtype"] != "fp32" else ""
        trains += f", on the {run['quantize']} base" if run["quantize"] else ""
        memory = gib(run["peak_memory_bytes"]) if run["peak_memory_bytes"] is not None else \
            f"{gib(run['peak_rss_bytes'])} RSS"
        lines.append(f"| {name} | {trains} | {run['lr']:g} | {run['epochs']} | {run['trainable_params']:,} "
                     f"({100 * run['trainable_params'] / run['total_params']:.3f}%) | {run['seconds']:.0f} "
                     f"| {memory} | {base['held_out_loss']:.3f} → {run['held_out_loss']:.3f} "
                     f"| {base['json_share']:.0%} → {run['json_share']:.0%} "
                     f"| {base['right_share']:.0%} → {run['right_share']:.0%} |")
    return "\n".join(lines)


def format_examples(report: dict, count: int) -> str:
    blocks = []
    for index, row in enumerate(report["held_out"][:count]):
        lines = [f"### {row['instruction']}", f"- base: {report['base']['answers'][index]!r}"]
        lines += [f"- {name}: {run['answers'][index]!r}" for name, run in report["runs"].items()]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


if __name__ == "__main__":
    sys.exit(run_main(main))
