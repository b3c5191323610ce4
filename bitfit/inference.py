"""Answering prompts with a (possibly bias-tuned) model, in the training template."""

import json
from pathlib import Path

import torch

from bitfit.data import format_prompt
from bitfit.errors import InputError


@torch.no_grad()
def generate_answers(model, tokenizer, instructions: list[tuple[str, str]], *, max_new_tokens: int,
                     temperature: float = 0.0, batch_size: int = 8) -> list[str]:
    """Answer (instruction, input) pairs; greedy when temperature is 0."""
    model.eval()
    device = next(model.parameters()).device
    # A decoder-only model continues from the last position, so batches are padded on the left.
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:  # GPT-2 has none; the attention mask hides the padding
        tokenizer.pad_token = tokenizer.eos_token
    prompts = [format_prompt(instruction, input) for instruction, input in instructions]
    answers = []
    for start in range(0, len(prompts), batch_size):
        encoded = tokenizer(prompts[start:start + batch_size], return_tensors="pt", padding=True)
        encoded = {key: value.to(device) for key, value in encoded.items()}
        sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
        output = model.generate(**encoded, max_new_tokens=max_new_tokens,
                                pad_token_id=tokenizer.pad_token_id, **sampling)
        new_tokens = output[:, encoded["input_ids"].size(1):]
        answers += tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    return [answer.strip() for answer in answers]


def room_for_answers(tokenizer, instructions: list[tuple[str, str]], limit: int, model_name: str) -> int:
    """How many new tokens fit after the longest prompt in the model's limit of positions.

    A prompt that leaves no room for an answer is refused: past its position table, a model
    such as GPT-2 fails with an IndexError deep inside generation.
    """
    lengths = [len(ids) for ids in tokenizer([format_prompt(*pair) for pair in instructions])["input_ids"]]
    longest = max(lengths)
    if longest >= limit:
        raise InputError(f"prompt {lengths.index(longest) + 1} is {longest} tokens in the template, and "
                         f"{model_name} reads at most {limit}: no room is left for an answer; shorten it")
    return limit - longest


def read_prompts(path: str) -> list[tuple[str, str]]:
    """(instruction, input) pairs from a text file (one instruction a line) or alpaca .json/.jsonl."""
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
            raise InputError(f"{file}: expected a JSON list of rows with instruction and input")
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


def _prompt_from_row(file: Path, number: int, row) -> tuple[str, str]:
    instruction = row.get("instruction") if isinstance(row, dict) else None
    if not isinstance(instruction, str) or not instruction.strip():
        raise InputError(f"{file}: row {number} has no instruction (expected rows with instruction "
                         f"and, optionally, input)")
    return instruction, "" if row.get("input") is None else str(row["input"])
