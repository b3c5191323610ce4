"""The run folder as a transaction: an earlier run survives every failure byte for byte (errors, a full
disk, SIGKILL, a second run at the same time); --overwrite; what a stopped run leaves and the next does."""

import errno
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from conftest import ROOT, cli, error_lines, folder_bytes, leftovers, metric_lines
from safetensors import SafetensorError

import bitfit.store.files
import bitfit.training.run
import train
from bitfit.errors import Interrupted
from bitfit.store.checkpoint import load_training_state
from bitfit.store.metrics import MetricsLog


def train_argv(tiny_model_dir, alpaca_file, folder, *extra):
    return ["--model", tiny_model_dir, "--data", alpaca_file, "--batch-size", "2", "--grad-accum", "1",
            "--log-every", "1", "--output-dir", str(folder), *extra]


def start_training(argv, cwd):
    return subprocess.Popen([sys.executable, str(ROOT / "train.py"), *argv], cwd=cwd, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def wait_for(condition, process, seconds=180):
    deadline = time.monotonic() + seconds
    while not condition():
        assert process.poll() is None, process.communicate()[1]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


class FullDisk(io.RawIOBase):
    """A file whose every write fails as on a full disk."""

    def writable(self):
        return True

    def write(self, data):
        no_space()


def inject(case, monkeypatch):
    """Make the run fail the way case says; return extra flags the case needs."""
    if case == "disk full writing metrics":
        write = MetricsLog.write

        def fills_at_step_two(self, record):
            if record["step"] == 2:
                no_space()
            write(self, record)

        monkeypatch.setattr(MetricsLog, "write", fills_at_step_two)
    elif case == "disk full writing a checkpoint":  # torch.save reports it as a RuntimeError
        monkeypatch.setattr(bitfit.store.files, "open", lambda *args: FullDisk(), raising=False)
        return ["--save-every", "2"]
    elif case == "disk full writing the delta":
        monkeypatch.setattr("pathlib.Path.write_bytes", no_space)
    elif case == "disk full writing the full model":  # safetensors names the OS error in its message
        def save_pretrained(*args, **kwargs):
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

        monkeypatch.setattr("transformers.PreTrainedModel.save_pretrained", save_pretrained)
        return ["--mode", "full"]
    elif case == "permission denied writing the delta":
        def denied(*args, **kwargs):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

        monkeypatch.setattr("pathlib.Path.write_bytes", denied)
    elif case == "the swap fails halfway":  # the earlier run moved aside, the new one not moved in
        replace = os.replace

        def refuses_the_staging_folder(source, target):
            if str(source).endswith(".run.staging"):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(target))
            replace(source, target)

        monkeypatch.setattr(os, "replace", refuses_the_staging_folder)
    elif case == "trained biases not finite":
        train_loop = bitfit.training.run.train_loop

        def diverges_at_the_end(model, *args, **kwargs):
            progress = train_loop(model, *args, **kwargs)
            next(param for param in model.parameters() if param.requires_grad).data[0] = float("nan")
            return progress

        monkeypatch.setattr(bitfit.training.run, "train_loop", diverges_at_the_end)
    return []


@pytest.mark.parametrize("case, expected", [
    ("disk full writing metrics", "No space left on device"),
    ("disk full writing a checkpoint", "No space left on device"),
    ("disk full writing the delta", "No space left on device"),
    ("disk full writing the full model", "No space left on device"),
    ("permission denied writing the delta", "Permission denied"),
    ("the swap fails halfway", "Permission denied"),
    ("trained biases not finite", "holds NaN or inf values; nothing was written"),
])
def test_a_failed_run_leaves_the_earlier_run_byte_identical(case, expected, earlier_run, tiny_model_dir,
                                                            alpaca_file, capsys, monkeypatch):
    extra = inject(case, monkeypatch)
    before = folder_bytes(earlier_run)
    argv = train_argv(tiny_model_dir, alpaca_file, earlier_run, "--max-steps", "3", "--overwrite", *extra)
    status, _, err = cli(train.main, argv, capsys)
    lines = error_lines(err)
    assert status == (3 if case == "trained biases not finite" else 2)  # 3: diverged, not the user's input
    assert len(lines) == 1 and expected in lines[0], err
    assert folder_bytes(earlier_run) == before
    assert leftovers(earlier_run) == []


def test_a_bug_mid_run_leaves_the_earlier_run_byte_identical(earlier_run, tiny_model_dir, alpaca_file, capsys,
                                                             monkeypatch):
    write = MetricsLog.write

    def bug_at_step_two(self, record):
        write(self, record)
        if record["step"] == 2:
            raise RuntimeError("a bug")

    monkeypatch.setattr(MetricsLog, "write", bug_at_step_two)
    before = folder_bytes(earlier_run)
    with pytest.raises(RuntimeError, match="a bug"):
        cli(train.main, train_argv(tiny_model_dir, alpaca_file, earlier_run, "--max-steps", "3", "--overwrite"),
            capsys)
    assert folder_bytes(earlier_run) == before
    assert leftovers(earlier_run) == []


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 512 KiB filesystem of its own, so that a run can fill it."""
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root; the full-disk path is covered by injected ENOSPC")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(mount_point)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()}); the full-disk path is covered by "
                    f"injected ENOSPC")
    yield mount_point
    subprocess.run(["umount", str(mount_point)], check=True)


def test_a_full_disk_mid_run_leaves_the_earlier_run_byte_identical(small_tmpfs, finished_run_template,
                                                                   tiny_model_dir, alpaca_file, capsys):
    folder = small_tmpfs / "run"
    shutil.copytree(finished_run_template, folder)
    before = folder_bytes(folder)
    # Fill the disk but for 3 pages: the lock file, the settings and the metrics fit, a checkpoint not.
    stats = os.statvfs(small_tmpfs)
    (small_tmpfs / "filler").write_bytes(bytes(stats.f_bavail * stats.f_frsize - 3 * 4096))
    argv = train_argv(tiny_model_dir, alpaca_file, folder, "--max-steps", "3", "--save-every", "1", "--overwrite")
    status, _, err = cli(train.main, argv, capsys)
    lines = error_lines(err)
    assert status == 2
    assert len(lines) == 1 and "No space left on device" in lines[0] and "checkpoint.pt" in lines[0], err
    assert folder_bytes(folder) == before
    assert leftovers(folder) == []


def test_sigkill_mid_run_keeps_the_earlier_run_and_resume_continues_the_killed_one(earlier_run, tiny_model_dir,
                                                                                   alpaca_file, capsys):
    before = folder_bytes(earlier_run)
    staged = earlier_run.parent / ".run.staging" / "checkpoint.pt"
    process = start_training(train_argv(tiny_model_dir, alpaca_file, earlier_run, "--max-steps", "500",
                                        "--save-every", "1", "--overwrite"), cwd=earlier_run.parent)
    wait_for(staged.exists, process)
    process.kill()
    process.wait()
    assert folder_bytes(earlier_run) == before

    # A new run would throw the killed run's checkpoint away: refused, naming where it is.
    status, _, err = cli(train.main, train_argv(tiny_model_dir, alpaca_file, earlier_run, "--max-steps", "2"),
                         capsys)
    assert status == 2 and f"{staged.parent} holds the checkpoint" in err and "--resume" in err, err
    assert folder_bytes(earlier_run) == before

    # --resume finds it, carries on, and replaces the earlier run only at the end.
    step = load_training_state(str(earlier_run))["progress"]["step"]
    status, out, err = cli(train.main, ["--resume", str(earlier_run), "--max-steps", str(step + 2)], capsys)
    assert status == 0, err
    assert f"continuing from the checkpoint in {staged.parent}" in out
    assert json.loads((earlier_run / "summary.json").read_text())["optimizer_steps"] == step + 2
    assert [line["step"] for line in metric_lines(earlier_run)] == list(range(1, step + 3))
    assert leftovers(earlier_run) == []


def test_a_second_run_into_the_same_folder_stops_at_once_naming_the_first(earlier_run, tiny_model_dir,
                                                                          alpaca_file, capsys):
    first = start_training(train_argv(tiny_model_dir, alpaca_file, earlier_run, "--max-steps", "20",
                                      "--overwrite"), cwd=earlier_run.parent)
    lock = earlier_run.parent / ".run.lock"
    wait_for(lambda: lock.exists() and f"pid {first.pid}," in lock.read_text(), first)
    status, _, err = cli(train.main, train_argv(tiny_model_dir, alpaca_file, earlier_run, "--max-steps", "2",
                                                "--overwrite"), capsys)
    lines = error_lines(err)
    assert status == 2
    assert len(lines) == 1 and f"another run (pid {first.pid}, started" in lines[0], err
    _, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr
    # The folder holds the first run, whole: its settings, every metrics line and no stray bytes.
    assert json.loads((earlier_run / "train_config.json").read_text())["max_steps"] == 20
    assert json.loads((earlier_run / "summary.json").read_text())["optimizer_steps"] == 20
    assert b"\0" not in (earlier_run / "metrics.jsonl").read_bytes()
    assert [line["step"] for line in metric_lines(earlier_run)] == list(range(1, 21))
    assert leftovers(earlier_run) == []


def test_a_run_is_replaced_only_with_overwrite_and_its_checkpoint_never_resumed(earlier_run, tiny_model_dir,
                                                                                alpaca_file, capsys):
    before = folder_bytes(earlier_run)
    assert "checkpoint.pt" in before
    argv = train_argv(tiny_model_dir, alpaca_file, earlier_run, "--max-steps", "3")
    status, _, err = cli(train.main, argv, capsys)
    assert status == 2 and "holds a finished run; pass --overwrite to replace it" in err, err
    assert folder_bytes(earlier_run) == before

    status, _, err = cli(train.main, [*argv, "--overwrite"], capsys)
    assert status == 0, err
    assert sorted(folder_bytes(earlier_run)) == ["bias.safetensors", "metrics.jsonl", "summary.json",
                                                 "train_config.json"]  # the earlier checkpoint went with it
    assert [line["step"] for line in metric_lines(earlier_run)] == [1, 2, 3]
    status, _, err = cli(train.main, ["--resume", str(earlier_run)], capsys)
    assert status == 2 and "no checkpoint.pt in it" in err, err


def test_a_folder_of_other_files_is_never_replaced(tmp_path, tiny_model_dir, alpaca_file, capsys):
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "todo.txt").write_text("keep me")
    status, _, err = cli(train.main, train_argv(tiny_model_dir, alpaca_file, folder, "--overwrite"), capsys)
    assert status == 2 and "holds files that are not a bitfit run (todo.txt)" in err, err
    assert folder_bytes(folder) == {"todo.txt": b"keep me"}


@pytest.mark.parametrize("how", ["--overwrite", "--resume"])
def test_a_users_own_files_in_a_run_folder_are_never_replaced(how, earlier_run, tiny_model_dir, alpaca_file,
                                                              capsys):
    (earlier_run / "merged").mkdir()  # an export, say, written into the run folder
    (earlier_run / "merged" / "config.json").write_text("{}")
    before = folder_bytes(earlier_run)
    argv = ([*train_argv(tiny_model_dir, alpaca_file, earlier_run), "--overwrite"] if how == "--overwrite"
            else ["--resume", str(earlier_run), "--max-steps", "3"])
    status, _, err = cli(train.main, argv, capsys)
    assert status == 2 and "also holds merged, which no run wrote" in err, err
    assert folder_bytes(earlier_run) == before


def test_ctrl_c_commits_the_unfinished_run_in_place_of_the_earlier_one(earlier_run, tiny_model_dir, alpaca_file,
                                                                       capsys, monkeypatch):
    write = MetricsLog.write

    def ctrl_c_at_step_two(self, record):
        write(self, record)
        if record["step"] == 2:
            signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(MetricsLog, "write", ctrl_c_at_step_two)
    argv = train_argv(tiny_model_dir, alpaca_file, earlier_run, "--max-steps", "4")
    with pytest.raises(Interrupted):
        bitfit.training.run.run(train.parse_args([*argv, "--overwrite"])[0], log=lambda message: None, overwrite=True)
    assert sorted(folder_bytes(earlier_run)) == ["checkpoint.pt", "metrics.jsonl", "train_config.json"]
    assert [line["step"] for line in metric_lines(earlier_run)] == [1, 2]
    assert load_training_state(str(earlier_run))["progress"]["step"] == 2
    assert leftovers(earlier_run) == []
    monkeypatch.setattr(MetricsLog, "write", write)
    status, _, err = cli(train.main, argv, capsys)
    assert status == 2 and "holds a run that did not finish; continue it with --resume" in err, err


def test_the_next_run_tidies_up_after_a_killed_one(earlier_run, tiny_model_dir, alpaca_file, capsys):
    before = folder_bytes(earlier_run)
    # Killed before its first checkpoint, in the middle of the swap: R moved aside, staging not yet in.
    staging, retired = earlier_run.parent / ".run.staging", earlier_run.parent / ".run.old"
    staging.mkdir()
    (staging / "metrics.jsonl").write_text('{"step": 1}\n')
    os.replace(earlier_run, retired)
    status, out, err = cli(train.main, train_argv(tiny_model_dir, alpaca_file, earlier_run), capsys)
    assert status == 2 and "holds a finished run" in err, err
    assert f"restored {earlier_run}" in out and f"removed {staging}" in out
    assert folder_bytes(earlier_run) == before and leftovers(earlier_run) == []

    retired.mkdir()  # killed after the swap, before the earlier run was removed
    (retired / "summary.json").write_text("{}")
    status, _, err = cli(train.main, train_argv(tiny_model_dir, alpaca_file, earlier_run, "--max-steps", "2",
                                                "--overwrite"), capsys)
    assert status == 0, err
    assert leftovers(earlier_run) == []


def test_files_get_the_users_umask(finished_run_template):
    expected = 0o666 & ~current_umask()
    modes = {path.name: path.stat().st_mode & 0o777 for path in finished_run_template.iterdir()}
    assert modes == dict.fromkeys(["bias.safetensors", "checkpoint.pt", "metrics.jsonl", "summary.json",
                                   "train_config.json"], expected)


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ---------------------------------------------------------- output folders that cannot be written


@pytest.fixture
def make_immutable():
    """Set a file's or folder's immutable attribute (chattr +i), which stops even root."""
    made = []

    def make(path):
        done = subprocess.run(["chattr", "+i", str(path)], capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot make a file immutable here ({done.stderr.strip()})")
        made.append(path)

    yield make
    for path in made:
        subprocess.run(["chattr", "-i", str(path)], capture_output=True)  # it may have moved


@pytest.fixture
def make_read_only():
    """Make a folder read-only for this process: a read-only bind mount as root (whom file modes do
    not stop), its mode otherwise."""
    made = []

    def make(folder):
        if os.geteuid() != 0:
            folder.chmod(0o555)
        else:
            done = subprocess.run(["mount", "--bind", "-o", "ro", str(folder), str(folder)], capture_output=True,
                                  text=True)
            if done.returncode != 0:
                pytest.skip(f"cannot make a read-only mount here ({done.stderr.strip()})")
        made.append(folder)

    yield make
    for folder in made:
        if os.geteuid() != 0:
            folder.chmod(0o755)
        else:
            subprocess.run(["umount", str(folder)], check=True)


@pytest.mark.parametrize("case, expected", [
    ("a file", "is a file; it must be a folder"),
    ("under a file", "is a file, not a folder"),
    ("in a read-only folder", "(read-only or no permission)"),
    ("immutable", "is read-only or immutable; it cannot be replaced"),
])
def test_an_output_folder_that_cannot_be_written_is_refused_before_the_model_loads(
        case, expected, tmp_path, earlier_run, tiny_model_dir, alpaca_file, capsys, monkeypatch,
        make_immutable, make_read_only):
    monkeypatch.setattr(bitfit.training.run, "load_model_and_tokenizer", lambda *args: pytest.fail("the model loaded"))
    output = earlier_run
    if case == "a file":
        output = tmp_path / "a-file"
        output.write_text("mine")
    elif case == "under a file":
        output = tmp_path / "a-file" / "run"
        output.parent.write_text("mine")
    elif case == "in a read-only folder":
        parent = tmp_path / "read-only"
        parent.mkdir()
        shutil.move(earlier_run, parent / "run")
        output = parent / "run"
        make_read_only(parent)
    else:
        make_immutable(earlier_run)
    before = folder_bytes(output) if output.is_dir() else None
    status, _, err = cli(train.main, train_argv(tiny_model_dir, alpaca_file, output, "--overwrite"), capsys)
    lines = error_lines(err)
    assert status == 2
    assert len(lines) == 1 and expected in lines[0], err
    if before is not None:
        assert folder_bytes(output) == before
    else:
        assert (tmp_path / "a-file").read_text() == "mine"


def test_an_immutable_file_in_the_earlier_run_is_left_in_a_named_folder(earlier_run, tiny_model_dir,
                                                                        alpaca_file, capsys, make_immutable):
    make_immutable(earlier_run / "summary.json")
    status, out, err = cli(train.main, train_argv(tiny_model_dir, alpaca_file, earlier_run, "--max-steps", "3",
                                                  "--overwrite"), capsys)
    assert status == 0, err
    retired = earlier_run.parent / ".run.old"
    assert f"could not remove {retired}" in out
    # The run folder is the new run, whole; the earlier summary waits beside it, named.
    assert json.loads((earlier_run / "summary.json").read_text())["optimizer_steps"] == 3
    assert (retired / "summary.json").exists()
    subprocess.run(["chattr", "-i", str(retired / "summary.json")], check=True)
