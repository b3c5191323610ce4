"""Answering prompts with a (possibly bias-tuned) model, in the prompt format it was trained with.

A prompt is a conversation ending in a user turn ([{"role", "content"}, ...]), or an
(instruction, input) pair, which is one user turn. It is tokenized as training tokenized the
text before each answer (bitfit.chat.prompt_ids): through the seed's template or the chat template.
"""

import json
from pathlib import Path

import torch

from bitfit.chat import chat_template_hash, choose_template, end_of_turn_ids, prompt_ids
from bitfit.checkpoint import delta_template
from bitfit.errors import InputError
from bitfit.formats import read_messages


@torch.no_grad()
def generate_answers(model, tokenizer, prompts: list, *, max_new_tokens: int, temperature: float = 0.0,
                     batch_size: int = 8, template: str = "seed") -> list[str]:
    """Answer prompts (conversations, or (instruction, input) pairs); greedy when temperature is 0."""
    from bitfit.model import pad_token_id

    model.eval()
    device = next(model.parameters()).device
    stop = {"eos_token_id": stop_ids(model, tokenizer)} if template == "chat" else {}
    answers = []
    for start in range(0, len(prompts), batch_size):
        ids = [prompt_ids(tokenizer, as_conversation(prompt), template) for prompt in prompts[start:start + batch_size]]
        # A decoder-only model continues from the last position, so batches are padded on the left;
        # the attention mask hides the padding.
        width = max(len(prompt) for prompt in ids)
        input_ids = torch.tensor([[pad_token_id(tokenizer)] * (width - len(prompt)) + prompt for prompt in ids])
        attention_mask = torch.tensor([[0] * (width - len(prompt)) + [1] * len(prompt) for prompt in ids])
        sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
        output = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                max_new_tokens=max_new_tokens, pad_token_id=pad_token_id(tokenizer), **stop,
                                **sampling)
        answers += tokenizer.batch_decode(output[:, width:], skip_special_tokens=True)
    return [answer.strip() for answer in answers]


def stop_ids(model, tokenizer) -> list[int]:
    """Under the chat template, an answer ends at the template's end-of-turn marker, which a model's
    generation config does not always list among its eos tokens."""
    configured = model.generation_config.eos_token_id
    configured = [] if configured is None else [configured] if isinstance(configured, int) else list(configured)
    return sorted(set(configured) | set(end_of_turn_ids(tokenizer)))


def prompt_template(tokenizer, metadatas: list[dict], requested: str | None = None, force: bool = False) -> str:
    """The prompt format to answer in: --template if given, else the one the deltas were trained with,
    else chat where the tokenizer has a chat template. A delta trained through another chat template
    than this tokenizer's is refused unless force: its prompts would not be the ones it learned from."""
    recorded = sorted({delta_template(metadata) for metadata in metadatas}, key=str)
    if requested is None and len({template for template, _ in recorded}) > 1:
        raise InputError(f"the bias deltas were trained with different prompt formats "
                         f"({', '.join(sorted({template for template, _ in recorded}))}); choose one with --template")
    template = choose_template(requested or (recorded[0][0] if recorded else None), tokenizer)
    if template == "chat" and not force:
        actual = chat_template_hash(tokenizer)
        for _, digest in recorded:
            if digest is not None and digest != actual:
                raise InputError(f"the bias delta was trained through chat template {digest}, and this tokenizer's "
                                 f"is {actual}: the prompts would differ from those it learned from; load the "
                                 f"recorded base, or --force to prompt through this template")
    return template


def as_conversation(prompt) -> list[dict]:
    """A prompt as a conversation: an (instruction, input) pair is one user turn, joined as the seed joins them."""
    if isinstance(prompt, tuple):
        instruction, input = prompt
        return [{"role": "user", "content": "\n".join([instruction, input]).strip()}]
    return prompt


def show_prompt(prompt) -> str:
    """A prompt as generate.py prints it: a lone user turn's text, else one "role: text" line per turn."""
    conversation = as_conversation(prompt)
    if len(conversation) == 1:
        return conversation[0]["content"]
    return "\n".join(f"{message['role']}: {message['content']}" for message in conversation)


def room_for_answers(tokenizer, prompts: list, limit: int, model_name: str, template: str = "seed") -> int:
    """How many new tokens fit after the longest prompt in the model's limit of positions.

    A prompt that leaves no room for an answer is refused: past its position table, a model
    such as GPT-2 fails with an IndexError deep inside generation.
    """
    lengths = [len(prompt_ids(tokenizer, as_conversation(prompt), template)) for prompt in prompts]
    longest = max(lengths)
    if longest >= limit:
        raise InputError(f"prompt {lengths.index(longest) + 1} is {longest} tokens in the template, and "
                         f"{model_name} reads at most {limit}: no room is left for an answer; shorten it")
    return limit - longest


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
