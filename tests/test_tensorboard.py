"""--report-to tensorboard: the scalars of metrics.jsonl as TensorBoard event files, read back by
TensorBoard's own reader, continued on the same step axis by --resume, part of the run folder's transaction."""

import json
import sys

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import train
from bitfit.config import TrainConfig, read_config_file
from bitfit.errors import InputError
from bitfit.store.metrics import TENSORBOARD_TAGS, MetricsLog
from conftest import cli, error_lines, folder_bytes, leftovers


def argv(tiny_model_dir, alpaca_file, folder, *extra):
    return ["--model", tiny_model_dir, "--data", alpaca_file, "--batch-size", "2", "--grad-accum", "2",
            "--log-every", "1", "--eval-size", "4", "--eval-every", "2", "--report-to", "tensorboard",
            "--output-dir", str(folder), *extra]


def scalars(folder) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value)], as TensorBoard reads the run folder's event files."""
    events = EventAccumulator(str(folder / "tensorboard"))
    events.Reload()
    return {tag: [(event.step, event.value) for event in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def from_metrics(folder) -> dict[str, list[tuple[int, float]]]:
    """The same, from metrics.jsonl."""
    lines = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return {tag: [(line["step"], line[key]) for line in lines if line.get(key) is not None]
            for key, tag in TENSORBOARD_TAGS.items()}


def assert_same(got: dict, expected: dict, timing: bool = True) -> None:
    """The same tags, steps and values (tokens/s only if timing: another run's clock differs)."""
    assert sorted(got) == sorted(expected)
    for tag, points in expected.items():
        if tag == "train/tokens_per_s" and not timing:
            continue
        assert [step for step, _ in got[tag]] == [step for step, _ in points], tag
        assert [value for _, value in got[tag]] == pytest.approx([value for _, value in points], rel=1e-6), tag


def test_tensorboard_gets_one_point_per_logged_step_of_every_scalar(tiny_model_dir, alpaca_file, tmp_path, capsys):
    run = tmp_path / "run"
    status, _, err = cli(train.main, argv(tiny_model_dir, alpaca_file, run, "--max-steps", "4"), capsys)
    assert status == 0, err
    got = scalars(run)
    assert [step for step, _ in got["train/loss"]] == [1, 2, 3, 4]
    assert [step for step, _ in got["eval/loss"]] == [0, 2, 4]  # before training, then every 2 steps
    assert_same(got, from_metrics(run))
    assert json.loads((run / "train_config.json").read_text())["report_to"] == "tensorboard"


def test_a_resumed_run_continues_on_the_same_steps_and_drops_what_came_after_its_checkpoint(
        tiny_model_dir, alpaca_file, tmp_path, capsys, monkeypatch):
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    assert cli(train.main, argv(tiny_model_dir, alpaca_file, straight, "--max-steps", "6"), capsys)[0] == 0
    write = MetricsLog.write

    def crash_at_step_three(self, record):  # logged step 3, checkpoint from step 2: step 3 is trained again
        write(self, record)
        if record["step"] == 3 and "loss" in record:
            raise RuntimeError("killed")

    monkeypatch.setattr(MetricsLog, "write", crash_at_step_three)
    with pytest.raises(RuntimeError, match="killed"):
        cli(train.main, argv(tiny_model_dir, alpaca_file, stopped, "--max-steps", "6", "--save-every", "2"), capsys)
    monkeypatch.setattr(MetricsLog, "write", write)
    assert cli(train.main, ["--resume", str(stopped)], capsys)[0] == 0

    got = scalars(stopped)
    assert [step for step, _ in got["train/loss"]] == [1, 2, 3, 4, 5, 6]  # step 3 once: the retrained one
    assert_same(got, from_metrics(stopped))
    assert_same(got, scalars(straight), timing=False)  # and what a straight run logs


def test_report_to_is_a_setting_of_config_files(tmp_path):
    settings = tmp_path / "settings.yaml"
    settings.write_text("report_to: tensorboard\n")
    assert read_config_file(str(settings)) == {"report_to": "tensorboard"}
    settings.write_text("report_to: wandb\n")
    with pytest.raises(InputError, match="report_to must be one of tensorboard; got 'wandb'"):
        read_config_file(str(settings))
    assert TrainConfig().report_to is None  # metrics.jsonl alone by default


def test_a_missing_tensorboard_is_one_line_and_nothing_is_written(tiny_model_dir, alpaca_file, earlier_run, capsys,
                                                                 monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if it were not installed
    before = folder_bytes(earlier_run)
    status, _, err = cli(train.main, argv(tiny_model_dir, alpaca_file, earlier_run, "--max-steps", "2",
                                          "--overwrite"), capsys)
    assert status == 2
    assert error_lines(err) == ["error: --report-to tensorboard needs the tensorboard package (pip install "
                                "tensorboard)"]
    assert folder_bytes(earlier_run) == before
    assert leftovers(earlier_run) == []
