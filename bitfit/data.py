"""Rows -> prompt and response tokens -> masked labels -> padded micro-batches.

Each example is a plain dict {"input_ids": [...], "labels": [...]}. Labels are -100 over the
prompt, so the model is trained to write the response and never to echo the instruction.
Labels are aligned with input_ids (labels[i] is input_ids[i] or -100); the loss shifts them,
scoring the logits at position i against labels[i + 1] (bitfit.loss).

An alpaca row under the seed's template (format_prompt, tokenize_example) is the whole story of
the seed experiment. Other data formats (bitfit.formats) and conversations under the seed's
template or the tokenizer's chat template (bitfit.chat) come in through tokenize_example too.
"""

import collections.abc
import hashlib
import json
from pathlib import Path

import torch

from bitfit import chat
from bitfit.errors import InputError, library_logs_silenced
from bitfit.formats import as_messages, detect_format, normalize_rows

IGNORE_INDEX = -100  # cross_entropy skips targets with this value
GROUP_BUCKET = 64  # micro-batches sorted together by --group-by-length
LOCAL_FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
TOKENIZE_CHUNK = 1024  # rows per tokenizer call when measuring prompts: bounds its temporary memory


def format_prompt(instruction: str, input: str = "") -> str:
    """The seed notebook's template, kept exactly so that results stay comparable."""
    return "Human: " + "\n".join([instruction, input]).strip() + "\n\nAssistant: "


# ---------------------------------------------------------------------------- loading rows


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


# ------------------------------------------------------------------ tokenizing and masking


def tokenize_rows(rows: list[dict], tokenizer, max_len: int, template: str = "seed") -> tuple["TokenizedRows", int]:
    """Turn rows into examples in a prompt format (seed or chat); return them and how many rows were dropped.

    A row is dropped when truncation at max_len leaves none of its response: it would have
    no label tokens and add nothing to training (and a window of only such rows would leave
    the loss nothing to be divided by). A conversation with no assistant turn is dropped too.
    """
    if template == "seed" and tokenizer.eos_token_id is None:
        raise InputError("the tokenizer has no eos token; one is needed to end each response")
    if template == "chat":
        chat.check_chat_template(tokenizer)
    examples = TokenizedRows(rows, tokenizer, max_len, template)
    return examples, len(rows) - len(examples)


class TokenizedRows(collections.abc.Sequence):
    """The examples of rows, each tokenized when it is read: until then, the rows stay text.

    Tokenizing every row up front holds every token of the data in memory before the first
    step, as Python ints (a 145k-row set: gigabytes), even of rows that --max-steps never reaches.
    Which rows survive max_len follows from their prompts' lengths alone (a row is dropped when
    its prompt fills max_len), so only those are counted up front, a chunk of rows at a time; the
    order of the examples and their count are then known, and a step tokenizes the few it takes.
    """

    def __init__(self, rows: list[dict], tokenizer, max_len: int, template: str = "seed"):
        self.tokenizer, self.max_len, self.template = tokenizer, max_len, template
        self.rows = [row for row, length in zip(rows, prompt_lengths(rows, tokenizer, template))
                     if length is not None and length < max_len]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        return tokenize_example(self.rows[index], self.tokenizer, self.max_len, self.template)


def prompt_lengths(rows: list[dict], tokenizer, template: str = "seed"):
    """Yield each row's prompt length in tokens (None: nothing to train), TOKENIZE_CHUNK prompts at a time.

    The prompt is what comes before the first label token, tokenized as tokenize_example does:
    with the tokenizer's special tokens under seed, without them under chat (the template holds its own).
    """
    for start in range(0, len(rows), TOKENIZE_CHUNK):
        prompts = [prompt_text(row, tokenizer, template) for row in rows[start:start + TOKENIZE_CHUNK]]
        texts = [prompt for prompt in prompts if prompt is not None]
        lengths = iter(len(ids) for ids in tokenizer(texts, add_special_tokens=template == "seed")["input_ids"])
        yield from (None if prompt is None else next(lengths) for prompt in prompts)


def prompt_text(row: dict, tokenizer, template: str = "seed") -> str | None:
    """The text of the row's prompt: everything before its first answer; None when it has none."""
    if template == "seed" and "messages" not in row:
        return format_prompt(row["instruction"], row["input"])
    return chat.first_prompt_text(as_messages(row), tokenizer, template)


def tokenize_example(row: dict, tokenizer, max_len: int, template: str = "seed") -> dict | None:
    """One row's example: its prompt and response tokens, labels masked over the prompt."""
    if template == "seed" and "messages" not in row:
        # The prompt gets the tokenizer's own special tokens (a BOS where the model expects one),
        # exactly as at generation time; the response gets none, only the eos we append.
        prompt = tokenizer(format_prompt(row["instruction"], row["input"]))["input_ids"]
        response = tokenizer(row["output"], add_special_tokens=False)["input_ids"]
        return build_example(prompt, response + [tokenizer.eos_token_id], max_len)
    # A conversation, or any row under the chat template: several prompts and answers (bitfit.chat).
    return conversation_example(chat.conversation_pieces(as_messages(row), tokenizer, template, max_len), max_len)


def build_example(prompt_ids: list[int], response_ids: list[int], max_len: int) -> dict | None:
    input_ids = (prompt_ids + response_ids)[:max_len]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + response_ids)[:max_len]
    if all(label == IGNORE_INDEX for label in labels):
        return None
    return {"input_ids": input_ids, "labels": labels}


def conversation_example(pieces: list[tuple[list[int], bool]], max_len: int) -> dict | None:
    """Join (token ids, trained) runs into an example cut at max_len, ending at its last label token.

    What follows the last label teaches nothing, so it is cut too: a conversation cut inside a
    user turn keeps the whole turns before it, one cut inside an answer keeps the part that fits.
    """
    input_ids = [token for ids, _ in pieces for token in ids][:max_len]
    labels = [token if trained else IGNORE_INDEX for ids, trained in pieces for token in ids][:max_len]
    while labels and labels[-1] == IGNORE_INDEX:
        labels.pop()
        input_ids.pop()
    return {"input_ids": input_ids, "labels": labels} if labels else None


# ------------------------------------------------------------------- batching and collate


def collate(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a micro-batch: input_ids with pad_id, attention_mask with 0, labels with -100.

    Padding is marked by position, never by token id, so when pad_id is the eos id (GPT-2
    has no pad token) the real eos at the end of each response keeps its label.
    """
    width = max(len(example["input_ids"]) for example in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    for row, example in enumerate(examples):
        length = len(example["input_ids"])
        input_ids[row, :length] = torch.tensor(example["input_ids"])
        attention_mask[row, :length] = 1
        labels[row, :length] = torch.tensor(example["labels"])
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def optimizer_windows(num_examples: int, batch_size: int, grad_accum: int, seed: int, epoch: int,
                      lengths: list[int] | None = None) -> list[list[list[int]]]:
    """One epoch's order: a list of accumulation windows, each a list of micro-batches of indices.

    The order is a seeded shuffle of examples, so batch 1 x accum 8 and batch 8 x accum 1 see
    the same eight examples in each optimizer step. The last window may be shorter.

    Given lengths (--group-by-length), each run of GROUP_BUCKET micro-batches of the shuffled
    order is sorted by length before it is cut, and the micro-batches are then shuffled again:
    a micro-batch holds examples of similar length, so little of it is padding, while the data
    stays shuffled at the scale of the bucket.
    """
    generator = torch.Generator().manual_seed(seed + epoch)
    order = torch.randperm(num_examples, generator=generator).tolist()
    if lengths is not None:
        bucket = batch_size * GROUP_BUCKET
        order = [i for start in range(0, num_examples, bucket)
                 for i in sorted(order[start:start + bucket], key=lambda i: lengths[i])]
    micro_batches = [order[i:i + batch_size] for i in range(0, num_examples, batch_size)]
    if lengths is not None:
        shuffle = torch.randperm(len(micro_batches), generator=generator).tolist()
        micro_batches = [micro_batches[i] for i in shuffle]
    return [micro_batches[i:i + grad_accum] for i in range(0, len(micro_batches), grad_accum)]
