"""The run folder as a transaction: a run never touches an earlier run's files until it has succeeded.

A run into --output-dir R writes everything (settings, metrics, checkpoints, results) into a
staging folder beside it, `.R.staging`, and moves it into place only at the end: R is renamed to
`.R.old`, the staging folder to R, and `.R.old` is removed. A rename within one filesystem is
atomic, so whatever stops a run (an exception, a full disk, a kill) R holds the earlier run,
whole, or nothing new. A deliberate stop (Ctrl-C) commits too: an unfinished run with its
checkpoint, which --resume R continues.

A lock (flock) on `.R.lock`, a file beside R that outlives the swap, stops a second run into R
at once; the OS releases it when the process ends, however it ends. The next run into R tidies
up after a killed one: a swap cut short is rolled back, and a staging folder is removed unless it
holds a checkpoint, which --resume R then continues from.
"""

import errno
import fcntl
import os
import shutil
import time
from pathlib import Path

from bitfit.errors import Diverged, InputError
from bitfit.store.delta import BIAS_FILE

CONFIG_FILE = "train_config.json"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
CHECKPOINT_FILE = "checkpoint.pt"
SHARDED_CHECKPOINT = "sharded-step-{step}"  # --fsdp: the shards of a checkpoint, beside it (bitfit.store.checkpoint)
TENSORBOARD_DIR = "tensorboard"  # --report-to tensorboard: the metrics as TensorBoard event files
RESUMABLE = (CONFIG_FILE, METRICS_FILE, TENSORBOARD_DIR, CHECKPOINT_FILE)  # what a resumed run takes over
RUN_FILES = (*RESUMABLE, SUMMARY_FILE, BIAS_FILE, "model")  # everything a run writes
# Write failures that are the machine's state, not a bug: reported in one line like bad input.
WRITE_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM}


def sibling(folder: Path, suffix: str) -> Path:
    """A hidden path beside folder, on its filesystem, so a rename between the two is atomic."""
    return folder.with_name(f".{folder.name}.{suffix}")


def run_folder_path(output_dir: str) -> Path:
    path = Path(output_dir)
    if path.name in ("", ".", ".."):  # a run folder needs a name for its siblings
        path = Path(os.path.abspath(path))
    if not path.name:
        raise InputError(f"--output-dir {output_dir}: a run folder cannot be the root of the filesystem")
    return path


class RunFolder:
    """R and its siblings: open (check, lock, tidy up), stage, commit; closing releases the lock.

    Used as a context manager around a run. Leaving it without a commit removes the staging
    folder, unless it holds a checkpoint (kept for --resume R), and turns a full disk or a
    permission error into one line. Under torchrun only rank 0 writes (writer=True); on the other
    ranks every step here does nothing.
    """

    def __init__(self, output_dir: str, writer: bool = True, log=print):
        self.path = run_folder_path(output_dir)
        self.staging, self.retired, self.lock_path = (sibling(self.path, suffix)
                                                      for suffix in ("staging", "old", "lock"))
        self.writer, self.log = writer, log
        self.lock = None
        self.staged = self.committed = False

    def __enter__(self):
        return self

    def open(self, *, overwrite: bool = False, resuming: bool = False) -> None:
        """Before anything loads: check the path, take the lock, tidy up after a killed run, and
        refuse a folder this run would replace without being asked to, or whose files it would lose."""
        if not self.writer:
            return
        check_output_path(self.path, "--output-dir")
        self.lock = take_lock(self.lock_path, self.path)
        self.recover()
        self.refuse_other_files()
        if not resuming:
            self.check_free(overwrite)

    def recover(self) -> None:
        """Undo what a killed run left: a swap cut short, a staging folder with nothing to resume."""
        if self.retired.exists():
            if self.path.exists():  # the swap finished; only the earlier run's removal did not
                remove_tree(self.retired, self.log)
                self.log(f"removed {self.retired}, the earlier run that a run into {self.path} replaced and was "
                         f"stopped before removing")
            else:
                os.replace(self.retired, self.path)
                self.log(f"restored {self.path}: a run was stopped while replacing it")
        if self.staging.exists() and not (self.staging / CHECKPOINT_FILE).is_file():
            remove_tree(self.staging, self.log)
            self.log(f"removed {self.staging}, left by a run into {self.path} that stopped before its "
                     f"first checkpoint")

    def refuse_other_files(self) -> None:
        """A run replaces the whole folder, so it must hold nothing but a run's own files."""
        entries = sorted(entry.name for entry in self.path.iterdir()) if self.path.is_dir() else []
        if entries and CONFIG_FILE not in entries:
            raise InputError(f"--output-dir {self.path} holds files that are not a bitfit run "
                             f"({', '.join(entries[:3])}); a run replaces the whole folder, so choose a new "
                             f"or empty one")
        others = [name for name in entries if name not in RUN_FILES and not is_sharded_checkpoint(name)]
        if others:
            raise InputError(f"{self.path} also holds {', '.join(others[:3])}, which no run wrote; a run "
                             f"replaces the whole folder, so move them out of it first")

    def check_free(self, overwrite: bool) -> None:
        """A new run replaces the folder: refuse one that holds a run (or a stopped run's checkpoint
        beside it), unless --overwrite."""
        if self.staging.exists():  # recover() left it: it holds a checkpoint
            if not overwrite:
                raise InputError(f"{self.staging} holds the checkpoint of a run into {self.path} that stopped "
                                 f"before it finished; continue it with --resume {self.path}, or pass "
                                 f"--overwrite to discard it")
            remove_tree(self.staging, self.log)
        if not (self.path / CONFIG_FILE).is_file() or overwrite:
            return
        if (self.path / SUMMARY_FILE).is_file():
            raise InputError(f"--output-dir {self.path} holds a finished run; pass --overwrite to replace it, "
                             f"or choose another folder")
        raise InputError(f"--output-dir {self.path} holds a run that did not finish; continue it with "
                         f"--resume {self.path}, or pass --overwrite to replace it")

    def stage(self, resuming: bool = False) -> Path:
        """Make the staging folder the run writes into, and return it.

        A resumed run takes over the settings and metrics of the run it continues (and, after a
        kill, that run's staging folder and checkpoint); its metrics are cut back to the
        checkpoint's step by bitfit.store.metrics.MetricsLog.
        """
        if not self.writer:
            return self.staging
        if resuming and self.staging.is_dir():  # where find_checkpoint found the checkpoint
            self.log(f"continuing from the checkpoint in {self.staging}, left by a run that stopped "
                     f"before it finished")
            for entry in self.staging.iterdir():
                if entry.name in RESUMABLE or is_sharded_checkpoint(entry.name):
                    continue
                if entry.is_dir():  # results or temporary files it was writing when it stopped
                    remove_tree(entry, self.log)
                else:
                    entry.unlink()
        else:
            self.staging.mkdir()  # with the user's umask, like every file in it
            if resuming:  # the settings and metrics of the run in R; its checkpoint was read already
                for name in (CONFIG_FILE, METRICS_FILE):
                    if (self.path / name).is_file():
                        shutil.copyfile(self.path / name, self.staging / name)
                if (self.path / TENSORBOARD_DIR).is_dir():
                    shutil.copytree(self.path / TENSORBOARD_DIR, self.staging / TENSORBOARD_DIR)
        self.staged = True
        return self.staging

    def commit(self) -> None:
        """Move the staged run into place: two atomic renames, then the earlier run is removed."""
        if not self.writer:
            return
        if self.path.exists():
            os.replace(self.path, self.retired)
        try:
            os.replace(self.staging, self.path)
        except OSError:
            if self.retired.exists():
                os.replace(self.retired, self.path)  # the earlier run back in place
            raise
        self.committed = True
        remove_tree(self.retired, self.log)

    def __exit__(self, kind, error, traceback):
        kept = False
        if self.staged and not self.committed and self.staging.exists():
            kept = (self.staging / CHECKPOINT_FILE).is_file()
            if not kept:
                remove_tree(self.staging, self.log)
        if self.lock is not None:
            self.lock.close()  # releases the flock
        keeping = (f"; the last checkpoint is kept in {self.staging}: --resume {self.path} continues "
                   f"from it" if kept else "")
        if isinstance(error, OSError) and error.errno in WRITE_ERRORS:
            where = f" ({error.filename})" if error.filename else ""
            raise InputError(f"{error.strerror}{where}: the run stopped, and {self.path} is as it was"
                             f"{keeping}") from None
        if isinstance(error, (InputError, Diverged)) and keeping:
            raise type(error)(f"{error}{keeping}") from None
        return False


def is_sharded_checkpoint(name: str) -> bool:
    return name.startswith(SHARDED_CHECKPOINT.format(step=""))


def check_output_path(path: Path, flag: str, file: bool = False) -> None:
    """Refuse, before anything loads, a path where no folder (or with file, no file) can be written or replaced."""
    kind = "file" if file else "folder"
    if path.is_symlink():
        raise InputError(f"{flag} {path} is a symbolic link; give the {kind} it points to")
    if path.exists() and path.is_dir() == file:
        raise InputError(f"{flag} {path} is a {'folder' if file else 'file'}; it must be a {kind}")
    parents = Path(os.path.abspath(path)).parents or [Path(os.path.abspath(path))]  # the root is its own parent
    ancestor = next(parent for parent in parents if parent.exists())
    if not ancestor.is_dir():
        raise InputError(f"{flag} {path}: {ancestor} is a file, not a folder")
    # The staging folder (or temporary file), the lock file and the swap are made in the parent.
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise InputError(f"{flag} {path}: cannot write in {ancestor} (read-only or no permission)")
    if path.exists() and not os.access(path, os.W_OK):
        raise InputError(f"{flag} {path} is read-only or immutable; it cannot be replaced")


def take_lock(lock_path: Path, folder: Path):
    """Hold an exclusive flock on lock_path, or stop at once naming the run that holds it."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    if lock_path.is_dir() or lock_path.is_symlink():
        raise InputError(f"{lock_path}, where runs into {folder} take their lock, is a "
                         f"{'folder' if lock_path.is_dir() else 'symbolic link'}; remove it")
    handle = open(lock_path, "a+")  # "a+": never empties the holder's note before the lock is ours
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise InputError(f"another run ({holder}) is writing to {folder}; wait for it to finish or choose "
                         f"another --output-dir") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    handle.flush()
    return handle


def lock_holder(lock_path: Path) -> str | None:
    """Who holds the lock on lock_path (the note the holder wrote), or None where nobody does."""
    if not lock_path.is_file():
        return None
    with open(lock_path) as handle:  # read-only: asking changes nothing (flock needs no write access)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return handle.read().strip() or "another process"
        fcntl.flock(handle, fcntl.LOCK_UN)
    return None


def find_checkpoint(run_dir: str) -> Path:
    """The checkpoint --resume continues from: a stopped run's in the staging folder, which is the
    later one where both exist, else the run folder's own."""
    path = run_folder_path(run_dir)
    for candidate in (sibling(path, "staging") / CHECKPOINT_FILE, path / CHECKPOINT_FILE):
        if candidate.is_file():
            return candidate
    # No checkpoint to be found: a run that is writing into R right now may be why (it has not written its
    # first one yet). Asked only here: under torchrun the other ranks read the checkpoint while rank 0,
    # already in the run, holds the lock.
    holder = lock_holder(sibling(path, "lock"))
    if holder is not None:
        raise InputError(f"--resume {run_dir}: another run ({holder}) is writing to it; wait for it to finish")
    if path.exists() and not path.is_dir():
        raise InputError(f"--resume {run_dir} is a file; name the run folder")
    if not path.is_dir():
        raise InputError(f"--resume {run_dir}: no such run folder")
    raise InputError(f"--resume {run_dir}: no {CHECKPOINT_FILE} in it; a run writes one with "
                     f"--save-every N or when stopped with Ctrl-C")


def remove_tree(path: Path, log=print) -> None:
    """Remove a folder; where that fails (an immutable file), say so and leave it for the next run."""
    try:
        shutil.rmtree(path)
    except FileNotFoundError:
        pass
    except OSError as error:
        log(f"note: could not remove {path} ({error.strerror}: {error.filename}); the next run into "
            f"this folder tries again, or remove it by hand")
