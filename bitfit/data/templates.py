"""The two prompt formats (--template), and conversations as tokens and labels, trained on the answers only.

human-assistant: the seed notebook's template, "Human: " + instruction + "\n\nAssistant: " (format_prompt),
kept exactly so that results stay comparable; `--template seed` is an older name for it. A
conversation goes turn by turn: each stretch of system and user turns becomes "System: ...\n\n"
and "Human: ...\n\n" lines, then "Assistant: "; each assistant turn is its text and an eos. A single
exchange gives exactly the single-turn example (bitfit.data.tokenize).

chat: the tokenizer's own chat template, as serving stacks and generate.py prompt the model. The
labels are found by tokenizing prefixes of the conversation as the template renders them, never by
searching the text: for each assistant turn,

    prompt  = the conversation before it, with add_generation_prompt=True (what generation sees)
    through = the conversation up to and including it

and the turn is through's tokens after prompt's. Each prefix's tokens must begin the next one's,
or the masks would not line up with what the model is trained on; a template that rewrites earlier
turns breaks that and is refused. Of the turn's tokens, those up to and including its last special
token (the end-of-turn marker: <|im_end|>, <|eot_id|>) are trained; what follows it (a newline
before the next turn) is not, nor is anything the prompt holds (system and user turns, role headers).

A conversation is a list of {"role", "content"} (bitfit.data.formats). Both formats make "pieces":
(token ids, trained) runs that bitfit.data.tokenize joins into an example and cuts at --max-len.
"""

import hashlib
import textwrap

from bitfit.config import canonical_template
from bitfit.core.examples import IGNORE_INDEX
from bitfit.errors import InputError

HUMAN_ASSISTANT_HEADERS = {"system": "System: ", "user": "Human: "}
HUMAN_ASSISTANT_ANSWER = "Assistant: "
# Checked before any row is tokenized, so a template that cannot be masked by prefixes stops at once.
PROBE = [{"role": "user", "content": "Name a primary colour."}, {"role": "assistant", "content": "Red."},
         {"role": "user", "content": "And another?"}, {"role": "assistant", "content": "Blue."}]


def format_prompt(instruction: str, input: str = "") -> str:
    """The seed notebook's prompt for an instruction and its optional input, exactly."""
    return "Human: " + "\n".join([instruction, input]).strip() + "\n\nAssistant: "


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def choose_template(requested: str | None, tokenizer) -> str:
    """--template as given; by default chat where the tokenizer has a chat template, else human-assistant."""
    requested = canonical_template(requested)
    if requested is None:
        return "chat" if has_chat_template(tokenizer) else "human-assistant"
    if requested == "chat" and not has_chat_template(tokenizer):
        raise InputError("--template chat: the tokenizer has no chat template; use --template human-assistant "
                         "(the seed notebook's Human: ... Assistant: prompt)")
    return requested


def chat_template_hash(tokenizer) -> str:
    """16 hex digits of a sha256 over the chat template's text: a delta records which one it trained with."""
    return hashlib.sha256(tokenizer.get_chat_template().encode()).hexdigest()[:16]


def check_chat_template(tokenizer) -> None:
    """Mask a short two-exchange conversation: a template that cannot be masked stops before training."""
    chat_pieces(PROBE, tokenizer)


def end_of_turn_ids(tokenizer) -> list[int]:
    """The tokens that end an assistant turn in the chat template: where generation should stop."""
    return sorted({ids[-1] for ids, trained in chat_pieces(PROBE, tokenizer) if trained})


# --------------------------------------------------------------------------- both formats


def conversation_pieces(messages: list[dict], tokenizer, template: str, max_len: int | None = None):
    """The (token ids, trained) runs of a conversation; turns past max_len tokens are left out."""
    if template == "human-assistant":
        return human_assistant_pieces(messages, tokenizer, max_len=max_len)
    return chat_pieces(messages, tokenizer, max_len=max_len)


def prompt_ids(tokenizer, messages: list[dict], template: str) -> list[int]:
    """The tokens that prompt the model to answer a conversation ending in a user turn: generation
    starts from exactly the tokens that training put before each answer."""
    if template == "human-assistant":
        pieces = human_assistant_pieces(messages, tokenizer, add_generation_prompt=True)
        return [token for ids, _ in pieces for token in ids]
    return encode(tokenizer, render(tokenizer, messages, add_generation_prompt=True))


def first_prompt_text(messages: list[dict], tokenizer, template: str) -> str | None:
    """The text before a conversation's first trained token (None: no assistant turn to train).

    Tokenized with the tokenizer's special tokens under human-assistant, without them under chat, it gives the
    count of tokens before the first label, which decides whether --max-len drops the row.
    """
    turns = trained_turns(messages, template)
    if not turns:
        return None
    if template == "human-assistant":
        return human_assistant_text(messages[:turns[0]]) + HUMAN_ASSISTANT_ANSWER
    return render(tokenizer, messages[:turns[0]], add_generation_prompt=True)


def trained_turns(messages: list[dict], template: str) -> list[int]:
    """The indexes of the assistant turns that train. Under chat an assistant turn that opens the
    conversation is context: no conversation comes before it for the template to render a prompt from."""
    first = 1 if template == "chat" else 0
    return [index for index, message in enumerate(messages) if message["role"] == "assistant" and index >= first]


# ------------------------------------------------------------------------- human-assistant


def human_assistant_text(messages: list[dict]) -> str:
    """System and user turns in the human-assistant style (a single user turn: "Human: ...\n\n")."""
    return "".join(HUMAN_ASSISTANT_HEADERS[message["role"]] + message["content"].strip() + "\n\n"
                   for message in messages)


def human_assistant_pieces(messages: list[dict], tokenizer, add_generation_prompt: bool = False,
                           max_len: int | None = None):
    pieces, start, length = [], 0, 0
    for index in trained_turns(messages, "human-assistant"):
        # The first prompt gets the tokenizer's special tokens (a BOS where the model expects one), as
        # the single-turn prompt does; later ones follow an eos and get none.
        prompt = tokenizer(human_assistant_text(messages[start:index]) + HUMAN_ASSISTANT_ANSWER,
                           add_special_tokens=not pieces)
        answer = tokenizer(messages[index]["content"], add_special_tokens=False)["input_ids"]
        pieces += [(prompt["input_ids"], False), (answer + [tokenizer.eos_token_id], True)]
        start, length = index + 1, length + len(prompt["input_ids"]) + len(answer) + 1
        if max_len is not None and length >= max_len:
            return pieces
    if add_generation_prompt:
        prompt = tokenizer(human_assistant_text(messages[start:]) + HUMAN_ASSISTANT_ANSWER,
                           add_special_tokens=not pieces)
        pieces.append((prompt["input_ids"], False))
    return pieces


# ------------------------------------------------------------------------------------ chat


def chat_pieces(messages: list[dict], tokenizer, max_len: int | None = None):
    special = special_ids(tokenizer)
    pieces, done = [], []  # done: the tokens of the conversation through the last turn handled
    for number, index in enumerate(trained_turns(messages, "chat"), 1):
        # No BOS is added: the template's rendering holds the special tokens it wants.
        prompt = encode(tokenizer, render(tokenizer, messages[:index], add_generation_prompt=True))
        require_prefix(done, prompt, messages, f"the conversation through assistant turn {number - 1}",
                       f"the prompt for assistant turn {number}", tokenizer)
        pieces.append((prompt[len(done):], False))
        if max_len is not None and len(prompt) >= max_len:
            return pieces
        through = encode(tokenizer, render(tokenizer, messages[:index + 1]))
        require_prefix(prompt, through, messages, f"the prompt for assistant turn {number}",
                       "the conversation through it", tokenizer)
        answer = through[len(prompt):]
        markers = [position for position, token in enumerate(answer) if token in special]
        if not markers:
            raise InputError(f"the chat template ends assistant turn {number} of {describe(messages)} with no "
                             f"special token (such as <|im_end|>), so the model could not learn where an "
                             f"answer ends; try --template human-assistant")
        end = markers[-1] + 1
        pieces += [(answer[:end], True), (answer[end:], False)]
        done = through
        if max_len is not None and len(done) >= max_len:
            return pieces
    return pieces


def render(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    import jinja2

    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except (jinja2.TemplateError, ValueError) as error:  # a template's raise_exception, a syntax error
        message = str(error).strip().splitlines()
        raise InputError(f"the chat template fails to render {describe(messages)}: "
                         f"{message[0] if message else type(error).__name__}") from None


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def require_prefix(shorter: list[int], longer: list[int], messages, shorter_name, longer_name, tokenizer) -> None:
    if longer[:len(shorter)] == shorter:
        return
    at = next((i for i, (a, b) in enumerate(zip(shorter, longer)) if a != b), min(len(shorter), len(longer)))
    seen = [repr(tokenizer.decode(ids[at:at + 1])) if at < len(ids) else "the end" for ids in (shorter, longer)]
    raise InputError(f"the chat template does not render {describe(messages)} turn by turn: the tokens of "
                     f"{shorter_name} do not begin those of {longer_name} (token {at}: {seen[0]}, then "
                     f"{seen[1]}); it rewrites earlier turns, so labels cannot be found by prefixes; try "
                     f"--template human-assistant")


def special_ids(tokenizer) -> set[int]:
    """The special tokens' ids: those the tokenizer names and the added tokens marked special."""
    added = {index for index, token in tokenizer.added_tokens_decoder.items() if token.special}
    return added | set(tokenizer.all_special_ids)


def describe(messages: list[dict]) -> str:
    """Names a conversation in an error by how it begins: rows are read afresh, split and dropped,
    so its first words find it in the data more surely than a position would."""
    first = messages[0] if messages else {"role": "none", "content": ""}
    opening = textwrap.shorten(first["content"], 40, placeholder="...")
    return f"the conversation that begins {first['role']}: {opening!r}"


# ------------------------------------------------------------------------------ a picture


def show_masked(example: dict, tokenizer) -> str:
    """An example's text as the model reads it, a line of the text per line (newlines shown as \\n),
    with ^ under every character of a trained token."""
    lines, marks = [""], [""]
    for token, label in zip(example["input_ids"], example["labels"]):
        for char in tokenizer.decode([token]):
            shown = "\\n" if char == "\n" else char
            lines[-1] += shown
            marks[-1] += ("^" if label != IGNORE_INDEX else " ") * len(shown)
            if char == "\n":
                lines.append("")
                marks.append("")
    shown = []
    for line, mark in zip(lines, marks):
        shown += [line] if line else []
        shown += [mark.rstrip()] if mark.strip() else []
    return "\n".join(shown)
