"""python -m bitfit.compare: the table from the runs' files, ratios, the picture, JSON, bad input;
and train.py's closing hint."""

import json
import shutil
from pathlib import Path

import pytest
from conftest import ROWS, cli
from PIL import Image
from safetensors.torch import load_file

import train
from bitfit import compare
from bitfit.cli import run_main


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir):
    """Two tiny finished runs, full and bitfit, in runs/full and runs/bitfit, with held-out rows."""
    root = tmp_path_factory.mktemp("compare")
    data = root / "rows.json"
    data.write_text(json.dumps(ROWS))
    for mode in ("full", "bitfit"):
        argv = ["--mode", mode, "--model", tiny_model_dir, "--data", str(data), "--max-steps", "3",
                "--batch-size", "2", "--grad-accum", "1", "--log-every", "1", "--eval-size", "2",
                "--output-dir", str(root / "runs" / mode)]
        assert run_main(train.main, argv) == 0
    return root / "runs"


@pytest.fixture
def copied_runs(runs, tmp_path):
    """A copy of the two runs that a test may edit."""
    shutil.copytree(runs, tmp_path / "runs")
    return tmp_path / "runs"


def edit_json(path: Path, **changes) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def markdown_table(stdout: str) -> dict[str, list[str]]:
    """The printed table as {row label: cells}, the header under the empty label."""
    lines = [line for line in stdout.splitlines() if line.startswith("|")]
    cells = [[cell.strip() for cell in line.strip("|").split(" | ")] for line in lines]
    del cells[1]  # the |---|---:| rule
    return {line[0]: line[1:] for line in cells}


def test_the_table_shows_the_numbers_in_the_runs_files(runs, capsys):
    status, out, err = cli(compare.main, [str(runs / "full"), str(runs / "bitfit")], capsys)
    assert status == 0, err
    table = markdown_table(out)
    summaries = [json.loads((runs / mode / "summary.json").read_text()) for mode in ("full", "bitfit")]
    assert table[""][:2] == ["full", "bitfit"]
    for column, summary in enumerate(summaries):
        assert table["mode"][column] == summary["mode"]
        assert table["optimizer steps"][column] == str(summary["optimizer_steps"]) == "3"
        assert table["samples"][column] == str(summary["samples"])
        assert table["train loss"][column] == f"{summary['train_loss']:.4f}"
        assert table["peak RSS"][column] == f"{summary['peak_rss_bytes'] / 2**30:.2f} GiB"
        assert table["peak GPU memory"][column] == "n/a"  # CPU
        assert table["eval loss after (perplexity)"][column] == \
            f"{summary['eval_loss_after']:.4f} ({summary['eval_perplexity_after']:,.1f})"
    # The trainable count is the number of values in the saved delta; full trains them all.
    delta = load_file(runs / "bitfit" / "bias.safetensors")
    trainable = sum(tensor.numel() for tensor in delta.values())
    assert table["trainable / total"][1].startswith(f"{trainable:,} / {summaries[1]['total_params']:,} (")
    assert table["trainable / total"][0].endswith("(100.0000%)")
    assert table["bias terms"] == ["—", "all", ""]  # the setting does not apply to full fine-tuning
    # Both start from the same base: the same eval loss before training.
    assert table["eval loss before (perplexity)"][0] == table["eval loss before (perplexity)"][1]
    assert "These settings differ" not in out


def test_saved_size_is_the_delta_file_or_the_whole_model_folder(copied_runs, capsys):
    (copied_runs / "bitfit" / "bias.safetensors").write_bytes(b"x" * 300_000)
    (copied_runs / "bitfit" / "merged").mkdir()  # an export beside the delta is not what the run saved
    (copied_runs / "bitfit" / "merged" / "model.safetensors").write_bytes(b"x" * 5_000_000)
    shutil.rmtree(copied_runs / "full" / "model")
    (copied_runs / "full" / "model" / "sub").mkdir(parents=True)
    (copied_runs / "full" / "model" / "model.safetensors").write_bytes(b"x" * 2_000_000)
    (copied_runs / "full" / "model" / "sub" / "tokenizer.json").write_bytes(b"x" * 500_000)
    status, out, err = cli(compare.main, [str(copied_runs / "full"), str(copied_runs / "bitfit")], capsys)
    assert status == 0, err
    assert markdown_table(out)["saved on disk"] == ["2.50 MB (model/)", "300.0 KB (bias.safetensors)", "0.12x"]


def test_two_runs_get_a_ratio_column_second_over_first(copied_runs, capsys):
    edit_json(copied_runs / "full" / "summary.json", peak_rss_bytes=4 * 2**30, samples_per_s=10.0,
              trainable_params=1_000_000, total_params=1_000_000, trainable_percent=100.0, seconds=300.0)
    edit_json(copied_runs / "bitfit" / "summary.json", peak_rss_bytes=2**30, samples_per_s=19.0,
              trainable_params=400, total_params=1_000_000, trainable_percent=0.04, seconds=60_000.0)
    status, out, err = cli(compare.main, [str(copied_runs / "full"), str(copied_runs / "bitfit")], capsys)
    assert status == 0, err
    table = markdown_table(out)
    assert table[""] == ["full", "bitfit", "bitfit / full"]
    assert table["peak RSS"] == ["4.00 GiB", "1.00 GiB", "0.25x"]
    assert table["samples/s"] == ["10.00", "19.00", "1.90x"]
    assert table["trainable / total"][2] == "0.04%"
    assert table["seconds"] == ["300.0 s", "60000.0 s", "200x"]
    assert table["mode"][2] == "" and table["peak GPU memory"][2] == ""  # text, and n/a on CPU

    status, out, err = cli(compare.main, [str(copied_runs / "full"), str(copied_runs / "bitfit"),
                                          str(copied_runs / "bitfit")], capsys)
    assert status == 0, err
    # Three runs: no ratios; two folders of the same name are told apart by their paths.
    assert markdown_table(out)[""] == [str(copied_runs / "full"), str(copied_runs / "bitfit"),
                                       str(copied_runs / "bitfit")]


def test_settings_that_make_the_comparison_unfair_are_listed_under_the_table(copied_runs, capsys):
    edit_json(copied_runs / "bitfit" / "train_config.json", seed=7, max_len=64)
    edit_json(copied_runs / "bitfit" / "train_config.json", lr=0.5)  # differs by design: not listed
    status, out, err = cli(compare.main, [str(copied_runs / "full"), str(copied_runs / "bitfit")], capsys)
    assert status == 0, err
    notes = out.split("These settings differ")[1].splitlines()[1:]
    # The full run asked for the default 256, capped at the test model's 128 positions.
    assert notes == ["- max_len: full 128, bitfit 64", "- seed: full 42, bitfit 7"]


def test_a_run_from_before_templates_compares_as_a_human_assistant_run(copied_runs, capsys):
    older = copied_runs / "full" / "train_config.json"
    older.write_text(json.dumps({key: value for key, value in json.loads(older.read_text()).items()
                                 if key != "template"}))
    argv = [str(copied_runs / "full"), str(copied_runs / "bitfit")]
    for template in ("human-assistant", "seed"):  # seed: its older name, as runs before the rename wrote it
        edit_json(copied_runs / "bitfit" / "train_config.json", template=template)
        status, out, err = cli(compare.main, argv, capsys)
        assert status == 0 and "These settings differ" not in out, err
    edit_json(copied_runs / "bitfit" / "train_config.json", template="chat")
    status, out, err = cli(compare.main, argv, capsys)
    assert out.split("These settings differ")[1].splitlines()[1:] == ["- template: full human-assistant, bitfit chat"]


def test_plot_writes_a_png_of_the_expected_size_with_both_runs_curves(runs, tmp_path, capsys):
    picture = tmp_path / "compare.png"
    status, out, err = cli(compare.main, [str(runs / "full"), str(runs / "bitfit"), "--plot", str(picture)],
                           capsys)
    assert status == 0, err
    assert f"wrote {picture}" in out and "| mode" in out
    with Image.open(picture) as image:
        assert image.format == "PNG"
        width, height = compare.FIGURE_INCHES
        assert image.size == (width * compare.FIGURE_DPI, height * compare.FIGURE_DPI)
        colors = {color for _, color in image.convert("RGB").getcolors(maxcolors=1 << 20)}
    assert (0x1F, 0x77, 0xB4) in colors and (0xFF, 0x7F, 0x0E) in colors  # C0 and C1: a line for each run
    assert picture.stat().st_size < 100_000
    assert [path.name for path in tmp_path.iterdir()] == ["compare.png"]  # no temporary file left


def test_json_is_the_same_table_with_the_raw_numbers(runs, capsys):
    status, out, err = cli(compare.main, [str(runs / "full"), str(runs / "bitfit"), "--json"], capsys)
    assert status == 0, err
    table = json.loads(out)
    assert table["runs"] == ["full", "bitfit"]
    rows = {row["row"]: row for row in table["rows"]}
    assert list(rows) == list(markdown_table(cli(compare.main, [str(runs / "full"), str(runs / "bitfit")],
                                                  capsys)[1]))[1:]
    summaries = [json.loads((runs / mode / "summary.json").read_text()) for mode in ("full", "bitfit")]
    assert rows["peak RSS"]["values"] == [summary["peak_rss_bytes"] for summary in summaries]
    assert rows["tokens/s"]["ratio"] == pytest.approx(summaries[1]["tokens_per_s"] / summaries[0]["tokens_per_s"])
    assert rows["saved on disk"]["values"][1] == (runs / "bitfit" / "bias.safetensors").stat().st_size
    assert table["differing_settings"] == {}


def unfinished_run(folder: Path) -> None:
    folder.mkdir()
    (folder / "train_config.json").write_text("{}")
    (folder / "metrics.jsonl").write_text('{"step": 1, "loss": 7.0}\n{"step": 2, "loss": 6.9}\n')
    (folder / "checkpoint.pt").write_bytes(b"a checkpoint")


BAD_RUNS = {
    "no such folder": (lambda folder: None, "no such run folder"),
    "not a run": (lambda folder: folder.mkdir(), "not a run folder (no summary.json)"),
    "unfinished": (unfinished_run, "an unfinished run (stopped after optimizer step 2): it has a checkpoint.pt "
                                   "but no summary.json yet; finish it with: python train.py --resume "),
    "failed, no checkpoint": (lambda folder: (folder.mkdir(), (folder / "train_config.json").write_text("{}")),
                              "did not finish (no summary.json) and left no checkpoint"),
}


@pytest.mark.parametrize("case", list(BAD_RUNS))
def test_a_folder_that_is_not_a_finished_run_is_refused_in_one_line(case, runs, tmp_path, capsys):
    make, expected = BAD_RUNS[case]
    folder = tmp_path / "run"
    make(folder)
    status, out, err = cli(compare.main, [str(runs / "full"), str(folder)], capsys)
    assert status == 2 and out == ""
    assert err.count("\n") == 1 and expected in err, err
    if case == "unfinished":
        assert err.rstrip().endswith(f"--resume {folder}")


CORRUPT = {
    "summary not json": ("summary.json", "{oops", "summary.json: not valid JSON"),
    "summary not a run's": ("summary.json", "{}", "no 'mode' in it"),
    "summary number is text": ("summary.json", None, "samples_per_s should be a number, found 'fast'"),
    "config missing": ("train_config.json", "", "train_config.json: missing"),
    "metrics line broken": ("metrics.jsonl", '{"step": 1, "loss": 7.0}\n{"step": 2, "lo', "line 2 is not a metrics"),
}


@pytest.mark.parametrize("case", list(CORRUPT))
def test_a_corrupt_file_is_refused_in_one_line(case, copied_runs, capsys):
    name, content, expected = CORRUPT[case]
    path = copied_runs / "bitfit" / name
    if content is None:
        edit_json(path, samples_per_s="fast")
    elif content == "":
        path.unlink()
    else:
        path.write_text(content)
    status, out, err = cli(compare.main, [str(copied_runs / "full"), str(copied_runs / "bitfit")], capsys)
    assert status == 2 and out == ""
    assert err.count("\n") == 1 and expected in err, err


@pytest.mark.parametrize("plot, expected", [("compare.txt", "a picture's name ends in .png"),
                                            ("no/such/folder/compare.png", "no such folder")])
def test_a_plot_that_cannot_be_written_is_refused_before_anything_is_printed(plot, expected, runs, tmp_path,
                                                                           capsys):
    status, out, err = cli(compare.main, [str(runs / "full"), "--plot", str(tmp_path / plot)], capsys)
    assert status == 2 and out == ""
    assert err.count("\n") == 1 and expected in err


def test_train_ends_with_the_command_that_compares_it_with_the_other_modes_run(copied_runs, tiny_model_dir,
                                                                             tmp_path, capsys):
    data = tmp_path / "rows.json"
    data.write_text(json.dumps(ROWS))
    argv = ["--model", tiny_model_dir, "--data", str(data), "--max-steps", "1"]
    beside_full = copied_runs / "bitfit-lr1e-2"
    status, out, err = cli(train.main, [*argv, "--output-dir", str(beside_full)], capsys)
    assert status == 0, err
    expected = f"python -m bitfit.compare {copied_runs / 'full'} {beside_full} --plot {copied_runs / 'compare.png'}"
    assert out.rstrip().splitlines()[-1] == f"compare it with the other mode's run: {expected}"

    status, out, err = cli(train.main, [*argv, "--output-dir", str(tmp_path / "alone" / "bitfit")], capsys)
    assert status == 0, err
    assert "bitfit.compare" not in out
