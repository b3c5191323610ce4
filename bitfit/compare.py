"""Finished runs side by side: what each cost and what it gave, e.g.

    python -m bitfit.compare runs/full runs/bitfit                     # a markdown table
    python -m bitfit.compare runs/full runs/bitfit --plot compare.png  # and the loss curves
    python -m bitfit.compare runs/full runs/bitfit --json              # the table for scripts

Everything comes from the files the runs left (summary.json, train_config.json, metrics.jsonl,
and the delta or model folder they saved); no model is loaded. With exactly two runs a last
column divides the second run's number by the first's: with full first and BitFit second it
reads "BitFit: 0.04% of the parameters, 0.25x the memory".
"""

import json
import math
import os
import shlex
import sys
from pathlib import Path

from bitfit.cli import ArgumentParser, run_main
from bitfit.config import MODES, canonical_template
from bitfit.errors import InputError
from bitfit.store.delta import BIAS_FILE
from bitfit.store.files import atomic_write
from bitfit.store.metrics import gib
from bitfit.store.run_folder import CHECKPOINT_FILE

# Settings that change what the runs saw: where they differ, the numbers are not like for like.
SAME_DATA_SETTINGS = ("model", "data", "split", "limit", "max_len", "seed", "eval_size", "template")
# What runs from before a setting existed used: they wrote their prompts in the human-assistant template.
SETTINGS_BEFORE = {"template": "human-assistant"}
# What every run's summary.json holds, and which of its values are numbers.
SUMMARY_KEYS = ("mode", "model", "trainable_params", "total_params", "trainable_percent", "optimizer_steps",
                "samples", "train_loss")
NUMBER_KEYS = ("trainable_params", "total_params", "trainable_percent", "optimizer_steps", "samples", "seconds",
               "samples_per_s", "tokens_per_s", "peak_memory_bytes", "peak_rss_bytes", "train_loss",
               "eval_loss_before", "eval_loss_after", "eval_perplexity_before", "eval_perplexity_after",
               "weight_bytes")
# Rows left out when no run has them: quantize is only in a 4-bit run's summary, and weight_bytes only in
# summaries written since it was added.
OPTIONAL_ROWS = ("quantize", "weights in memory")
PLOT_FORMATS = ("png", "svg", "pdf")
CREATOR = "bitfit.compare"  # in each picture's metadata: the pictures this command may redraw
FIGURE_INCHES, FIGURE_DPI = (8, 4.5), 100  # the picture is 800 x 450 pixels


def load_run(folder: str) -> dict:
    """A finished run's files: its summary, settings, metrics lines and the size of what it saved."""
    path = Path(folder)
    if not path.is_dir():
        raise InputError(f"{folder}: no such run folder")
    if not (path / "summary.json").is_file():
        raise InputError(f"{folder}: {why_unfinished(path)}")
    summary = check_summary(path / "summary.json", read_json(path / "summary.json"))
    config = read_json(path / "train_config.json")
    saved_name = BIAS_FILE if summary.get("mode") == "bitfit" else "model/"
    metrics = read_metrics(path / "metrics.jsonl")
    if not any("loss" in line for line in metrics):  # a finished run logs its last step at least
        raise InputError(f"{folder}: its metrics.jsonl has no training line, which every finished run writes: a "
                         f"damaged run")
    return {"name": path.name, "folder": folder, "summary": summary, "config": config,
            "metrics": metrics,
            "saved": saved_name, "saved_bytes": size_on_disk(path / saved_name)}


def check_summary(path: Path, summary: dict) -> dict:
    """Refuse a summary.json that is not a run's: keys every run writes, numbers where numbers go."""
    for key in SUMMARY_KEYS:
        if key not in summary:
            raise InputError(f"{path}: no {key!r} in it; not a bitfit run's summary")
    for key in NUMBER_KEYS:
        value = summary.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise InputError(f"{path}: {key} should be a number, found {value!r}")
        if value is not None and not (math.isfinite(value) and value >= 0):  # json reads NaN and Infinity too
            raise InputError(f"{path}: {key} is {value}, which no finished run writes: a damaged run")
    return summary


def why_unfinished(path: Path) -> str:
    """What a folder without summary.json is, in words, with what to do about it."""
    if (path / CHECKPOINT_FILE).is_file():
        steps = [line["step"] for line in read_metrics(path / "metrics.jsonl", missing_ok=True) if "loss" in line]
        where = f" (stopped after optimizer step {steps[-1]})" if steps else ""
        return (f"an unfinished run{where}: it has a {CHECKPOINT_FILE} but no summary.json yet; finish it "
                f"with: python train.py --resume {shlex.quote(str(path))}")
    if (path / "train_config.json").is_file():
        return "a run that did not finish (no summary.json) and left no checkpoint to resume; run it again"
    return "not a run folder (no summary.json)"


def missing(path: Path) -> InputError:
    return InputError(f"{path}: missing; a finished run folder holds summary.json, train_config.json and "
                      f"metrics.jsonl")


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise missing(path)
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise InputError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def read_metrics(path: Path, missing_ok: bool = False) -> list[dict]:
    """metrics.jsonl's lines: training lines (step, loss, ...) and eval lines (step, eval_loss, ...)."""
    if not path.is_file():
        if missing_ok:
            return []
        raise missing(path)
    lines = []
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if not (isinstance(record, dict) and isinstance(record.get("step"), int)):
            raise InputError(f"{path}: line {number} is not a metrics record (a JSON object with a step)")
        lines.append(record)
    return lines


def size_on_disk(path: Path) -> int | None:
    """Bytes of a file, or of every file in a folder; None where the run saved nothing there."""
    if path.is_file():
        return path.stat().st_size
    if path.is_dir():
        return sum(file.stat().st_size for file in path.rglob("*") if file.is_file())
    return None


# --- The table ---

def run_rows(run: dict) -> list[tuple[str, object, str]]:
    """One run's column: (row, value, shown), where value is the number a ratio divides (or text)."""
    summary = run["summary"]
    value = summary.get  # a key an older or newer run lacks shows as n/a rather than failing
    terms = bias_terms(run["config"]) if value("mode") == "bitfit" else None
    return [
        ("mode", value("mode"), text(value("mode"))),
        ("model", value("model"), text(value("model"))),
        # Full fine-tuning trains every parameter: which biases BitFit would train does not apply.
        ("bias terms", terms, text(terms) if value("mode") == "bitfit" else "—"),
        ("dtype", value("dtype"), text(value("dtype"))),
        ("device", value("device"), text(value("device"))),
        ("trainable / total", summary["trainable_params"], f"{summary['trainable_params']:,} / "
         f"{summary['total_params']:,} ({summary['trainable_percent']:.4f}%)"),
        ("optimizer steps", value("optimizer_steps"), number(value("optimizer_steps"), "{:,}")),
        ("samples", value("samples"), number(value("samples"), "{:,}")),
        ("seconds", value("seconds"), number(value("seconds"), "{:.1f} s")),
        ("samples/s", value("samples_per_s"), number(value("samples_per_s"), "{:.2f}")),
        ("tokens/s", value("tokens_per_s"), number(value("tokens_per_s"), "{:,.0f}")),
        ("peak GPU memory", value("peak_memory_bytes"), gib(value("peak_memory_bytes"))),
        ("peak RSS", value("peak_rss_bytes"), gib(value("peak_rss_bytes"))),
        ("train loss", value("train_loss"), number(value("train_loss"), "{:.4f}")),
        ("eval loss before (perplexity)", value("eval_loss_before"),
         loss_and_perplexity(value("eval_loss_before"), value("eval_perplexity_before"))),
        ("eval loss after (perplexity)", value("eval_loss_after"),
         loss_and_perplexity(value("eval_loss_after"), value("eval_perplexity_after"))),
        ("saved on disk", run["saved_bytes"],
         "n/a" if run["saved_bytes"] is None else f"{disk_size(run['saved_bytes'])} ({run['saved']})"),
        ("quantize", value("quantize"), text(value("quantize"))),
        ("weights in memory", value("weight_bytes"), gib(value("weight_bytes"))),
    ]


def build_table(runs: list[dict]) -> dict:
    """The runs side by side: their names and folders, the rows (each with its values, the text shown,
    and with two runs the ratio), and the settings that differ."""
    columns = [run_rows(run) for run in runs]
    rows = []
    for cells in zip(*columns):
        label = cells[0][0]
        values = [value for _, value, _ in cells]
        if label in OPTIONAL_ROWS and all(value is None for value in values):
            continue
        rows.append({"row": label, "values": values, "shown": [shown for _, _, shown in cells],
                     "ratio": ratio(values) if len(runs) == 2 else None})
    return {"runs": run_names(runs), "folders": [run["folder"] for run in runs], "rows": rows,
            "differing_settings": differing_settings(runs)}


def run_names(runs: list[dict]) -> list[str]:
    """Each run by its folder's name; by the folder as given where two names are the same."""
    names = [run["name"] for run in runs]
    return names if len(set(names)) == len(names) else [run["folder"] for run in runs]


def ratio(values: list) -> float | None:
    first, second = values
    numbers = all(isinstance(value, (int, float)) and not isinstance(value, bool) for value in values)
    return second / first if numbers and first else None


def differing_settings(runs: list[dict]) -> dict[str, list]:
    differing = {}
    for key in SAME_DATA_SETTINGS:
        values = [run["config"].get(key, SETTINGS_BEFORE.get(key)) for run in runs]
        if key == "template":  # seed is human-assistant's older name
            values = [canonical_template(value) for value in values]
        if any(value != values[0] for value in values):
            differing[key] = values
    return differing


def format_markdown(table: dict) -> str:
    """The table as markdown, padded so that it also reads as a table in a terminal."""
    header = ["", *table["runs"]]
    body = [[row["row"], *row["shown"]] for row in table["rows"]]
    if len(table["runs"]) == 2:
        header.append(f"{table['runs'][1]} / {table['runs'][0]}")
        for line, row in zip(body, table["rows"]):
            line.append("" if row["ratio"] is None else format_ratio(row["ratio"]))
    lines = [[cell.replace("|", "\\|") for cell in line] for line in [header, *body]]
    widths = [max(len(line[column]) for line in lines) for column in range(len(header))]
    rule = ["-" * widths[0]] + ["-" * (width - 1) + ":" for width in widths[1:]]  # numbers to the right

    def markdown_line(cells):
        padded = [cells[0].ljust(widths[0])] + [cell.rjust(width) for cell, width in zip(cells[1:], widths[1:])]
        return "| " + " | ".join(padded) + " |"

    out = [markdown_line(lines[0]), markdown_line(rule), *map(markdown_line, lines[1:])]
    if table["differing_settings"]:
        out += ["", "These settings differ, so the runs did not see the same data (compared anyway):"]
        out += [f"- {key}: " + ", ".join(f"{name} {value}" for name, value in zip(table["runs"], values))
                for key, values in table["differing_settings"].items()]
    return "\n".join(out)


def format_ratio(value: float) -> str:
    if abs(value) < 0.01:
        return f"{value:.2%}"  # 0.0004 reads better as 0.04%
    return f"{value:,.0f}x" if abs(value) >= 100 else f"{value:.2f}x"


def text(value) -> str:
    return "n/a" if value is None else str(value)


def number(value, pattern: str) -> str:
    return "n/a" if value is None else pattern.format(value)


def loss_and_perplexity(loss, perplexity) -> str:
    return "n/a" if loss is None else f"{loss:.4f} ({perplexity:,.1f})"


def disk_size(num_bytes: int) -> str:
    """Sizes on disk in decimal units, as file managers show them."""
    if num_bytes >= 1e9:
        return f"{num_bytes / 1e9:.2f} GB"
    if num_bytes >= 1e6:
        return f"{num_bytes / 1e6:.2f} MB"
    return f"{num_bytes / 1e3:.1f} KB"


def bias_terms(config: dict) -> str:
    terms = config.get("bias_terms", "all")
    return f"{terms} (added)" if config.get("add_biases") else terms


# --- The picture ---

def plot_runs(runs: list[dict], path: Path) -> None:
    """Training loss against optimizer steps for each run, eval losses as markers, in one PNG."""
    # A Figure made without pyplot draws with the Agg renderer: no display, no GUI backend,
    # no global state, so this works on a server or in CI.
    from matplotlib.figure import Figure

    figure = Figure(figsize=FIGURE_INCHES, dpi=FIGURE_DPI, layout="constrained")
    axes = figure.add_subplot()
    for index, (run, name) in enumerate(zip(runs, run_names(runs))):
        color = f"C{index}"  # matplotlib's default colours, in order
        train = [(line["step"], line["loss"]) for line in run["metrics"] if "loss" in line]
        evals = [(line["step"], line["eval_loss"]) for line in run["metrics"] if "eval_loss" in line]
        if train:
            axes.plot(*zip(*train), color=color, linewidth=1.8, label=f"{name}: training loss")
        if evals:
            axes.plot(*zip(*evals), color=color, linestyle=":", marker="o", markersize=7,
                      markerfacecolor="white", markeredgewidth=2, label=f"{name}: eval loss")
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("loss (mean over label tokens)")
    axes.set_title(" vs ".join(run_names(runs)))
    axes.grid(alpha=0.3)
    axes.legend()
    # The picture's format follows the name's suffix; the temporary file's name has none.
    atomic_write(path, lambda tmp: figure.savefig(tmp, format=path.suffix[1:].lower(), metadata={"Creator": CREATOR}))


def check_plot_path(path: Path) -> None:
    """Refuse, before any work is done, a picture name that cannot be written, and one that would replace
    a file this command did not draw (a picture it drew records it, CREATOR, and is redrawn in place)."""
    if path.suffix[1:].lower() not in PLOT_FORMATS:
        raise InputError(f"--plot {path}: a picture's name ends in .png (or .svg, .pdf)")
    if not path.parent.is_dir():
        raise InputError(f"--plot {path}: no such folder {path.parent}")
    if path.is_dir() or path.is_symlink():
        raise InputError(f"--plot {path} is a {'folder' if path.is_dir() else 'symbolic link'}; name a new picture")
    if path.exists() and CREATOR.encode() not in path.read_bytes():
        raise InputError(f"--plot {path} exists, and bitfit.compare did not draw it; name a new picture")
    if not os.access(path.parent, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise InputError(f"--plot {path}: cannot write there (read-only or no permission)")


# --- The command ---

def compare_command(output_dir: str, mode: str) -> str | None:
    """The command that compares a finished run with the other mode's run, where that lies beside it
    (runs/bitfit and runs/full, say); None where there is none. Full comes first, so the ratios
    read as BitFit's share of full fine-tuning's costs."""
    this = Path(output_dir)
    other = this.parent / next(name for name in MODES if name != mode)
    if not (other / "summary.json").is_file() or other.resolve() == this.resolve():
        return None
    full, bitfit = (other, this) if mode == "bitfit" else (this, other)
    picture = this.parent / "compare.png"
    return f"python -m bitfit.compare {shlex.quote(str(full))} {shlex.quote(str(bitfit))} " \
           f"--plot {shlex.quote(str(picture))}"


def parse_args(argv=None):
    parser = ArgumentParser(prog="python -m bitfit.compare",
                            description="Compare finished runs: a markdown table, and the loss curves.")
    add = parser.add_argument
    add("runs", nargs="+", metavar="RUN_DIR", help="run folders; with two, a column of ratios second / first")
    add("--plot", metavar="FILE.png", help="also draw the training and eval losses against optimizer steps")
    add("--json", action="store_true", help="print the table as JSON instead of markdown")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    plot_path = Path(args.plot) if args.plot else None
    if plot_path is not None:
        check_plot_path(plot_path)
    runs = [load_run(folder) for folder in args.runs]
    table = build_table(runs)
    print(json.dumps(table, indent=2) if args.json else format_markdown(table))
    if plot_path is not None:
        try:
            plot_runs(runs, plot_path)
        except OSError as error:  # a full disk, or a file system that turned read-only
            raise InputError(f"--plot {plot_path}: {error.strerror or error}; nothing was written") from None
        print(f"wrote {plot_path}", file=sys.stderr if args.json else sys.stdout)


if __name__ == "__main__":
    sys.exit(run_main(main))
