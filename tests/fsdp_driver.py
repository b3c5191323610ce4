"""Several training runs in one torchrun launch, for test_fsdp.py (each launch costs seconds of start-up).

    torchrun --nproc_per_node 2 tests/fsdp_driver.py CASES.json WATCHED_FOLDER

CASES.json is a list of cases, each {"argv": [train.py's flags], "ctrl_c_after_step": N or null}; they
run in order in one process group, each as train.py would run it (--resume included). With
ctrl_c_after_step, rank 0 raises SIGINT on itself once step N's metrics line is written, as a user's
Ctrl-C would. Rank 1 records every file it creates, writes, renames or removes under WATCHED_FOLDER
(Python's audit hooks see each one) and leaves the list in WATCHED_FOLDER/rank1_writes.json at the end.
"""

import json
import os
import signal
import sys
from pathlib import Path

import torch

import train
from bitfit.errors import Interrupted
from bitfit.parallel import torchrun
from bitfit.store.metrics import MetricsLog
from bitfit.training.run import run

WRITE_EVENTS = {"os.rename", "os.remove", "os.mkdir", "os.rmdir", "shutil.rmtree", "shutil.move"}


def main(cases_file: str, watched: str) -> None:
    world = torchrun.setup(torch.device("cpu"))
    writes = []
    if not world.is_main:
        sys.addaudithook(lambda event, args: record_write(event, args, Path(watched), writes))
    try:
        for case in json.loads(Path(cases_file).read_text()):
            config, resume_state, overwrite = train.parse_args(case["argv"])
            stop_after(case.get("ctrl_c_after_step"))
            try:
                run(config, resume_state, world=world, overwrite=overwrite)
            except Interrupted:
                pass
            stop_after(None)
            torch.distributed.barrier()  # rank 0 may still be writing what the next case reads
    finally:
        torchrun.cleanup()
    if not world.is_main:
        (Path(watched) / "rank1_writes.json").write_text(json.dumps(sorted(set(writes))))


def record_write(event: str, args: tuple, watched: Path, writes: list) -> None:
    if event == "open":  # open() gives a mode, os.open flags
        path, mode, flags = args
        writing = any(c in mode for c in "wax+") if mode else bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
        paths = [path] if writing else []
    elif event in WRITE_EVENTS:
        paths = args[:2]
    else:
        return
    paths = [Path(os.fsdecode(path)).resolve() for path in paths if isinstance(path, (str, bytes, os.PathLike))]
    writes += [str(path) for path in paths if path.is_relative_to(watched)]


ORIGINAL_WRITE = MetricsLog.write


def stop_after(step: int | None) -> None:
    """From now on, Ctrl-C once the training line of the given step is written (None: never)."""
    def write(self, record):
        ORIGINAL_WRITE(self, record)
        if record["step"] == step and "loss" in record:
            signal.raise_signal(signal.SIGINT)

    MetricsLog.write = ORIGINAL_WRITE if step is None else write


if __name__ == "__main__":
    main(*sys.argv[1:])
