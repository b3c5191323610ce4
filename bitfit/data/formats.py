"""The four data formats, told apart by their columns, and each row checked and put in one of two shapes.

    alpaca             instruction, input (optional), output
    prompt-completion  prompt, completion
    messages           messages: [{"role": "system" | "user" | "assistant", "content": "..."}, ...]
    sharegpt           conversations: [{"from": "system" | "human" | "gpt", "value": "..."}, ...]

A single-turn row (alpaca, prompt-completion) becomes {"instruction", "input", "output"}: the
human-assistant template reads those names (bitfit.data.templates.format_prompt). A conversation (messages,
sharegpt) becomes {"messages": [{"role", "content"}, ...]}. as_messages turns either into a
conversation, for the chat template.
"""

from bitfit.config import FORMATS
from bitfit.errors import InputError

# The columns that make each format, in FORMATS' order; alpaca's input is optional.
COLUMNS = {"alpaca": ("instruction", "output"), "prompt-completion": ("prompt", "completion"),
           "messages": ("messages",), "sharegpt": ("conversations",)}
ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"system": "system", "human": "user", "gpt": "assistant"}


def detect_format(columns: list[str], source: str) -> str:
    """The one format whose columns the data has."""
    matching = [name for name in FORMATS if all(column in columns for column in COLUMNS[name])]
    if len(matching) == 1:
        return matching[0]
    expected = "; ".join(f"{name}: {', '.join(COLUMNS[name])}" + (", input (optional)" if name == "alpaca" else "")
                         for name in FORMATS)
    if not matching:
        raise InputError(f"{source}: its columns ({', '.join(columns) or 'none'}) fit no data format ({expected})")
    raise InputError(f"{source}: its columns ({', '.join(columns)}) fit the formats {' and '.join(matching)}; "
                     f"choose one with --format")


def normalize_rows(rows: list[dict], data_format: str, source: str) -> list[dict]:
    """Each row in its shape (module docstring), checked; errors name the row, counted from 1."""
    columns = list(rows[0])
    missing = [column for column in COLUMNS[data_format] if column not in columns]
    if missing:
        raise InputError(f"{source}: missing column(s) {', '.join(missing)} for --format {data_format}; found "
                         f"{', '.join(columns) or 'none'}")
    if data_format == "alpaca":
        return [{"instruction": _text(row, "instruction", number, source),
                 "input": _text(row, "input", number, source, optional=True),
                 "output": _text(row, "output", number, source)} for number, row in enumerate(rows, 1)]
    if data_format == "prompt-completion":
        return [{"instruction": _text(row, "prompt", number, source), "input": "",
                 "output": _text(row, "completion", number, source)} for number, row in enumerate(rows, 1)]
    normalized = [{"messages": read_messages(row[COLUMNS[data_format][0]], data_format, f"{source}: row {number}")}
                  for number, row in enumerate(rows, 1)]
    if not any(has_answer(row) for row in normalized):
        raise InputError(f"{source}: no conversation has an assistant turn: there is nothing to train on")
    return normalized


def read_messages(turns, data_format: str, where: str) -> list[dict]:
    """A conversation's turns as [{"role", "content"}], checked: messages as they are, ShareGPT mapped."""
    role_key, content_key = ("role", "content") if data_format == "messages" else ("from", "value")
    roles = ROLES if data_format == "messages" else SHAREGPT_ROLES
    if not (isinstance(turns, list) and all(isinstance(turn, dict) for turn in turns)):
        raise InputError(f"{where}: {COLUMNS[data_format][0]} is not a list of {role_key}/{content_key} dicts "
                         f"(found {_describe(turns)})")
    messages = []
    for number, turn in enumerate(turns, 1):
        role, content = turn.get(role_key), turn.get(content_key)
        if role not in roles:
            raise InputError(f"{where}, turn {number}: unknown {role_key} {role!r} (expected "
                             f"{', '.join(roles)})")
        if not isinstance(content, str):
            raise InputError(f"{where}, turn {number}: its {content_key} is {_describe(content)}, expected text")
        messages.append({"role": SHAREGPT_ROLES.get(role, role) if data_format == "sharegpt" else role,
                         "content": content})
    return messages


def as_messages(row: dict) -> list[dict]:
    """Any row as a conversation: a single-turn row is one user turn (instruction and input, as the
    human-assistant template joins them) and one assistant turn (output)."""
    if "messages" in row:
        return row["messages"]
    return [{"role": "user", "content": "\n".join([row["instruction"], row["input"]]).strip()},
            {"role": "assistant", "content": row["output"]}]


def has_answer(row: dict) -> bool:
    """Whether the row has an assistant turn to train on (single-turn rows always do)."""
    return "messages" not in row or any(message["role"] == "assistant" for message in row["messages"])


def _text(row: dict, column: str, number: int, source: str, optional: bool = False) -> str:
    """A single-turn row's field, which must be text: never str() of a number, a list or a dict (a
    column-oriented JSON file, read as one row of lists, stops here too). An optional field may be
    missing; a required one may be empty (an empty answer trains the eos alone), not missing."""
    value = row.get(column)
    if value is None and optional:
        return ""
    if not isinstance(value, str):
        hint = (" (for conversations use a messages column; a column-oriented file reads as one row of lists: "
                "write a list of rows)" if isinstance(value, list) else "")
        raise InputError(f"{source}: row {number}: {column} is {_describe(value)}, expected text{hint}")
    return value


def _describe(value) -> str:
    """What a field holds, in a few words: missing, a str 'Hi', a int 5, a list, a dict."""
    if value is None:
        return "missing"
    if isinstance(value, (list, dict)):
        return f"a {type(value).__name__}"
    return f"a {type(value).__name__} " + (repr(value[:40]) if isinstance(value, str) else repr(value)[:40])
