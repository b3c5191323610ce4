"""Rows -> examples: each row's prompt and response tokens, labels masked over the prompt.

An alpaca row under the human-assistant template (the seed notebook's "Human: ... Assistant: ",
bitfit.data.templates.format_prompt) is the whole story of the seed experiment: the prompt's tokens
get label -100, the response's tokens and an eos are learned. Other data formats
(bitfit.data.formats) and conversations under either template come in through tokenize_example too.

Examples are made lazily (LazyExamples): a row is tokenized when a step reads it.
"""

import collections
import collections.abc

from bitfit.core.examples import IGNORE_INDEX, build_example
from bitfit.data import templates
from bitfit.data.formats import as_messages
from bitfit.errors import InputError

TOKENIZE_CHUNK = 1024  # rows per tokenizer call when measuring prompts: bounds its temporary memory


def tokenize_rows(rows: list[dict], tokenizer, max_len: int,
                  template: str = "human-assistant") -> tuple["LazyExamples", int]:
    """The examples of rows in a prompt format (human-assistant or chat), and how many rows were dropped
    (see drop_reason; the examples' dropped counts each reason)."""
    if template == "human-assistant" and tokenizer.eos_token_id is None:
        raise InputError("the tokenizer has no eos token; one is needed to end each response")
    if template == "chat":
        templates.check_chat_template(tokenizer)
    examples = LazyExamples(rows, tokenizer, max_len, template)
    return examples, sum(examples.dropped.values())


def drop_reason(row: dict, prompt_length: int | None, max_len: int) -> str | None:
    """Why a row makes no example (None: it makes one). The one rule, from the prompt's length alone.

    A row needs an answer to learn, and at least its first token must fit in max_len: otherwise the
    example would have no label token and add nothing to training (and a window of only such rows
    would leave the loss nothing to be divided by).
    """
    if prompt_length is None:
        if "messages" in row and any(message["role"] == "assistant" for message in row["messages"]):
            return "have no assistant turn after a user's (under --template chat an opening answer is context)"
        return "have no assistant turn"
    if prompt_length >= max_len:
        return f"had their response cut away by --max-len {max_len}"
    return None


class LazyExamples(collections.abc.Sequence):
    """The examples of rows, each tokenized when it is read: until then, the rows stay text.

    Tokenizing every row up front holds every token of the data in memory before the first
    step, as Python ints (a 145k-row set: gigabytes), even of rows that --max-steps never reaches.
    Which rows are dropped follows from their prompts' lengths alone (drop_reason), so only those
    are measured up front, a chunk of rows at a time; the order of the examples and their count are
    then known, and a step tokenizes the few it takes. dropped counts the rows left out, by reason.
    """

    def __init__(self, rows: list[dict], tokenizer, max_len: int, template: str = "human-assistant"):
        self.tokenizer, self.max_len, self.template = tokenizer, max_len, template
        self.rows, self.dropped = [], collections.Counter()
        for row, length in zip(rows, prompt_lengths(rows, tokenizer, template)):
            reason = drop_reason(row, length, max_len)
            if reason is None:
                self.rows.append(row)
            else:
                self.dropped[reason] += 1

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        return tokenize_example(self.rows[index], self.tokenizer, self.max_len, self.template)


def prompt_lengths(rows: list[dict], tokenizer, template: str = "human-assistant"):
    """Yield each row's prompt length in tokens (None: nothing to train), TOKENIZE_CHUNK prompts at a time.

    The prompt is what comes before the first label token, tokenized as tokenize_example does:
    with the tokenizer's special tokens under human-assistant, without them under chat (the template holds its own).
    """
    for start in range(0, len(rows), TOKENIZE_CHUNK):
        prompts = [prompt_text(row, tokenizer, template) for row in rows[start:start + TOKENIZE_CHUNK]]
        texts = [prompt for prompt in prompts if prompt is not None]
        # A chunk may hold no prompt at all (no row of it has an answer): nothing to tokenize.
        tokenized = tokenizer(texts, add_special_tokens=template == "human-assistant")["input_ids"] if texts else []
        lengths = iter(len(ids) for ids in tokenized)
        yield from (None if prompt is None else next(lengths) for prompt in prompts)


def prompt_text(row: dict, tokenizer, template: str = "human-assistant") -> str | None:
    """The text of the row's prompt: everything before its first answer; None when it has none."""
    if template == "human-assistant" and "messages" not in row:
        return templates.format_prompt(row["instruction"], row["input"])
    return templates.first_prompt_text(as_messages(row), tokenizer, template)


def tokenize_example(row: dict, tokenizer, max_len: int, template: str = "human-assistant") -> dict | None:
    """One row's example: its prompt and response tokens, labels masked over the prompt."""
    if template == "human-assistant" and "messages" not in row:
        # The prompt gets the tokenizer's own special tokens (a BOS where the model expects one),
        # exactly as at generation time; the response gets none, only the eos we append.
        prompt = tokenizer(templates.format_prompt(row["instruction"], row["input"]))["input_ids"]
        response = tokenizer(row["output"], add_special_tokens=False)["input_ids"]
        return build_example(prompt, response + [tokenizer.eos_token_id], max_len)
    # A conversation, or any row under the chat template: several prompts and answers (bitfit.data.templates).
    return conversation_example(templates.conversation_pieces(as_messages(row), tokenizer, template, max_len), max_len)


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
