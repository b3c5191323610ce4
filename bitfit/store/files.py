"""Files written atomically: every write goes to a temporary name in the destination folder and is then
renamed over the target (a rename within one filesystem is atomic), so a crash leaves the old file or the
new one, never half of one. Trained tensors are checked to be finite before they are written, and a write
that fails for lack of space or permission raises OSError, whichever library wrote it.
"""

import io
import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError

from bitfit.errors import Diverged


def atomic_write(path: Path, write) -> None:
    """Call write(temporary_path), then move the result onto path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(temporary)
        os.replace(temporary, path)
    except OSError as error:
        error.filename = error.filename or str(path)  # a failed write() names no file; say which
        raise
    finally:
        if temporary.exists():
            temporary.unlink()


def save_torch(obj, path: Path) -> None:
    """torch.save, atomically. torch reports a failed write (a full disk) as a RuntimeError that
    hides the cause, so it writes through a file object that keeps the OSError, raised instead."""

    class KeepError(io.RawIOBase):
        def __init__(self, file):
            self.file, self.error = file, None

        def writable(self):
            return True

        def write(self, data):
            try:
                return self.file.write(data)
            except OSError as error:
                self.error = error
                raise

    def write(temporary):
        with open(temporary, "wb") as file:
            sink = KeepError(file)
            try:
                torch.save(obj, sink)
            except RuntimeError:
                if sink.error is None:
                    raise
                raise sink.error from None

    atomic_write(path, write)


def first_non_finite(tensors: dict[str, torch.Tensor]) -> str | None:
    """The name of the first floating-point tensor holding a NaN or an inf, if any."""
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            return name
    return None


def refuse_non_finite(tensors: dict[str, torch.Tensor], what: str) -> None:
    """A diverged run must not leave a file that looks like a result: refuse before writing."""
    name = first_non_finite(tensors)
    if name is not None:
        raise Diverged(f"{what}: {name} holds NaN or inf values; nothing was written (try a lower --lr)")


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_json(path: Path, data) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2) + "\n"))


# An export's folder records what it wrote, so that a later --overwrite replaces an earlier export and
# nothing else: never a run, a delta, or a user's file that happens to sit in the folder named.
EXPORT_RECORD = "bitfit-export.json"


def record_export(folder: Path, what: dict) -> None:
    """Write EXPORT_RECORD into a folder an export just filled: what it is, and every file in it."""
    files = sorted(entry.name for entry in Path(folder).iterdir())
    (Path(folder) / EXPORT_RECORD).write_text(json.dumps({**what, "files": files}, indent=2) + "\n")


def not_exported(folder: Path) -> list[str]:
    """The entries of folder that no export wrote: all of them, unless its EXPORT_RECORD lists them."""
    entries = sorted(entry.name for entry in Path(folder).iterdir())
    try:
        listed = set(json.loads((Path(folder) / EXPORT_RECORD).read_text())["files"]) | {EXPORT_RECORD}
    except (OSError, ValueError, KeyError, TypeError):
        listed = set()
    return [name for name in entries if name not in listed]


def save_model_folder(folder: Path, model, tokenizer, state_dict: dict | None = None, record: dict | None = None
                      ) -> None:
    """Write a Hugging Face model folder, replacing any old one only once the new one is whole.

    state_dict, when given, holds the weights to write (under --fsdp, gathered from the shards); record,
    what an export records of itself (EXPORT_RECORD)."""
    refuse_non_finite(dict(model.named_parameters()) if state_dict is None else state_dict, "the trained model")

    def write(staging: Path) -> None:
        try:
            model.save_pretrained(staging, state_dict=state_dict)
        except SafetensorError as error:  # safetensors names a full disk only in its message
            raise _os_error(error, staging) from None
        tokenizer.save_pretrained(staging)
        if record is not None:
            record_export(staging, record)

    replace_folder(folder, write)


def replace_folder(folder: Path, write) -> None:
    """Call write(staging) to fill a new folder beside folder, then swap it in whole: an old folder is
    replaced only once the new one is complete, and a failure leaves it as it was. The files get the
    user's umask (safetensors creates its own 0600)."""
    folder = Path(folder)
    staging = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        staging.mkdir(parents=True)
        write(staging)
        mode = 0o666 & ~umask()
        for file in staging.rglob("*"):
            if file.is_file():
                os.chmod(file, mode)
        retired = folder.with_name(f".{folder.name}.old-{os.getpid()}")
        if folder.exists():
            os.replace(folder, retired)
        os.replace(staging, folder)
        shutil.rmtree(retired, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _os_error(error: Exception, path: Path) -> Exception:
    """The OSError behind a library's "... (os error 28)", or the error itself."""
    number = re.search(r"os error (\d+)", str(error))
    return OSError(int(number.group(1)), os.strerror(int(number.group(1))), str(path)) if number else error
