"""Prompts to answer, from a file (generate.py --prompts): a line each, or rows of JSON.

A prompt is an (instruction, input) pair, one user turn, or a conversation ending in a user turn
([{"role", "content"}, ...]); bitfit.model.generation answers either.
"""

import json
from pathlib import Path

from bitfit.data.formats import read_messages
from bitfit.errors import InputError


def read_prompts(path: str) -> list:
    """Prompts from a text file (one instruction a line) or a .json/.jsonl of rows: alpaca rows
    (instruction, optional input) become (instruction, input) pairs; messages rows are conversations."""
    file = Path(path)
    if not file.is_file():
        raise InputError(f"prompts file not found: {file}")
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InputError(f"{file}: not a UTF-8 text file") from None
    suffix = file.suffix.lower()
    if suffix == ".json":
        rows = _parse_json(file, text)
        if not isinstance(rows, list):
            raise InputError(f"{file}: expected a JSON list of rows with instruction and input, or messages")
    elif suffix == ".jsonl":
        rows = [_parse_json(file, line, number) for number, line in enumerate(text.splitlines(), 1)
                if line.strip()]
    else:
        rows = [{"instruction": line.strip()} for line in text.splitlines() if line.strip()]
    if not rows:
        raise InputError(f"prompts file holds no prompts: {file}")
    return [_prompt_from_row(file, number, row) for number, row in enumerate(rows, 1)]


def _parse_json(file: Path, text: str, line_number: int | None = None):
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise InputError(f"{file}: not valid JSON at line {line_number or error.lineno} "
                         f"({error.msg})") from None


def _prompt_from_row(file: Path, number: int, row):
    if isinstance(row, dict) and "messages" in row:
        conversation = read_messages(row["messages"], "messages", f"{file}: row {number}")
        if not conversation or conversation[-1]["role"] != "user":
            last = f"the {conversation[-1]['role']}'s" if conversation else "missing"
            raise InputError(f"{file}: row {number}: its last turn is {last}; a prompt ends with the user's turn")
        return conversation
    instruction = row.get("instruction") if isinstance(row, dict) else None
    if not isinstance(instruction, str) or not instruction.strip():
        raise InputError(f"{file}: row {number} has no instruction (expected rows with instruction "
                         f"and, optionally, input, or rows with messages)")
    return instruction, "" if row.get("input") is None else str(row["input"])
