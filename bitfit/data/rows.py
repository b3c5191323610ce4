"""Rows from a file or a hub dataset, each in one of the four data formats (bitfit.data.formats).

A row is a plain dict; what a run holds of its data is a list of them, read once, checked, then
split into the rows trained on and those held out (--eval-size).
"""

import hashlib
import json
from pathlib import Path

import torch

from bitfit.data.formats import detect_format, normalize_rows
from bitfit.errors import InputError, library_logs_silenced

LOCAL_FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


def load_rows(source: str, split: str = "train", limit: int | None = None, format: str | None = None) -> list[dict]:
    """Read rows from a local .json/.jsonl/.csv/.parquet file or a hub dataset id, in the data format
    its columns show (or format), each checked and put in its shape (bitfit.formats).

    Only the first `limit` rows are read (a .json list is parsed whole; the other formats stop).
    """
    return load_rows_and_format(source, split, limit, format)[0]


def load_rows_and_format(source: str, split: str = "train", limit: int | None = None,
                         format: str | None = None) -> tuple[list[dict], str]:
    """load_rows, and the data format: the one asked for, or the one the columns show."""
    rows = _read_rows(source, split, limit)
    if not rows:
        raise InputError(f"{source}: the data has no rows")
    data_format = format or detect_format(list(rows[0]), source)
    return normalize_rows(rows, data_format, source), data_format


def rows_fingerprint(rows: list[dict]) -> str:
    """16 hex digits of a sha256 over the rows: a resumed run checks it trains on the same data."""
    digest = hashlib.sha256()
    for row in rows:
        digest.update(json.dumps(row, sort_keys=True).encode() + b"\n")
    return digest.hexdigest()[:16]


def split_rows(rows: list[dict], eval_size: float | None, seed: int) -> tuple[list[dict], list[dict]]:
    """Hold out eval rows: a seeded random choice, disjoint from the rows left to train on."""
    if eval_size is None:
        return rows, []
    count = round(eval_size * len(rows)) if eval_size < 1 else int(eval_size)
    if not 1 <= count < len(rows):
        raise InputError(f"--eval-size {eval_size} leaves no rows to train on or none to evaluate "
                         f"on: the data has {len(rows)} rows")
    generator = torch.Generator().manual_seed(seed)
    held_out = set(torch.randperm(len(rows), generator=generator)[:count].tolist())
    return ([row for i, row in enumerate(rows) if i not in held_out],
            [row for i, row in enumerate(rows) if i in held_out])


def _read_rows(source: str, split: str, limit: int | None) -> list[dict]:
    import datasets  # deferred: importing datasets costs a second and is only needed here

    datasets.disable_progress_bars()
    path = Path(source)
    local = path.suffix.lower() in LOCAL_FORMATS or path.exists()
    file_format = _check_local_file(path) if local else None
    if local and split != "train":  # recorded in train_config.json, it would name a split that was never read
        raise InputError(f"--split {split}: {source} is a local file, which has no splits; --split chooses a split "
                         f"of a hub dataset")
    try:
        with library_logs_silenced():
            if local:
                # Streamed: read afresh from the file, through no cache. The datasets cache knows a
                # local file by its path and modification time, so it would serve the old rows of a
                # file rewritten within the same second (or with its time kept).
                dataset = datasets.load_dataset(file_format, data_files=str(path), split="train", streaming=True)
            else:
                dataset = datasets.load_dataset(source, split=split)
            return list(dataset if limit is None else dataset.take(limit))
    except Exception as error:  # datasets wraps parser and hub errors in its own types
        if local:
            raise InputError(f"{source}: not a valid {file_format.upper()} file of rows "
                             f"({_root_cause(error)})") from None
        raise InputError(f"could not load dataset {source!r} split {split!r}: it is not a local "
                         f"file and the hub did not provide it ({_root_cause(error)})") from None


def _check_local_file(path: Path) -> str:
    if path.is_dir():
        raise InputError(f"--data {path} is a folder; name a .json, .jsonl, .csv or .parquet file of rows")
    if path.exists() and not path.is_file():
        raise InputError(f"--data {path} is not a regular file (a device or a pipe); name a file of rows")
    if not path.is_file():
        raise InputError(f"data file not found: {path}")
    file_format = LOCAL_FORMATS.get(path.suffix.lower())
    if file_format is None:
        raise InputError(f"{path}: unsupported file type; use .json, .jsonl, .csv or .parquet")
    if path.stat().st_size == 0:
        raise InputError(f"data file is empty: {path}")
    return file_format


def _root_cause(error: BaseException) -> str:
    while error.__cause__ is not None or error.__context__ is not None:
        error = error.__cause__ or error.__context__
    message = str(error).strip().splitlines()
    return f"{type(error).__name__}: {message[0]}" if message else type(error).__name__
