"""The four data formats: told by their columns (or --format), each row checked, conversations mapped."""

import json
import re

import pytest
from conftest import ROOT

from bitfit.data.rows import load_rows, load_rows_and_format
from bitfit.data.tokenize import tokenize_rows
from bitfit.errors import InputError

CONVERSATION = [{"role": "system", "content": "Answer in one word."},
                {"role": "user", "content": "Name a primary colour."}, {"role": "assistant", "content": "Red."},
                {"role": "user", "content": "And another?"}, {"role": "assistant", "content": "Blue."}]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def readme_examples() -> dict[str, dict]:
    """The data page's one-row example of each format, by format name."""
    readme = (ROOT / "docs" / "data.md").read_text()
    section = readme[readme.index("\n## Data\n"):]
    return {name: json.loads(row) for name, row in
            re.findall(r"^\*\*`([a-z-]+)`\*\*: [^\n]*(?:\n[^\n`]*)?\n```json\n(.*?)\n```", section,
                       re.MULTILINE | re.DOTALL)}


def test_the_data_pages_example_of_each_format_is_told_by_its_columns(tmp_path):
    examples = readme_examples()
    assert sorted(examples) == ["alpaca", "messages", "prompt-completion", "sharegpt"]
    loaded = {name: load_rows_and_format(write_jsonl(tmp_path / f"{name}.jsonl", [row]))
              for name, row in examples.items()}
    assert {name: data_format for name, (_, data_format) in loaded.items()} == {name: name for name in examples}
    (alpaca,), _ = loaded["alpaca"]
    assert alpaca == {key: examples["alpaca"].get(key, "") for key in ("instruction", "input", "output")}
    (single,), _ = loaded["prompt-completion"]
    assert single == {"instruction": examples["prompt-completion"]["prompt"], "input": "",
                      "output": examples["prompt-completion"]["completion"]}
    (messages,), _ = loaded["messages"]
    assert messages == {"messages": examples["messages"]["messages"]}
    (sharegpt,), _ = loaded["sharegpt"]
    roles = {"system": "system", "human": "user", "gpt": "assistant"}
    assert sharegpt == {"messages": [{"role": roles[turn["from"]], "content": turn["value"]}
                                     for turn in examples["sharegpt"]["conversations"]]}


def test_extra_keys_are_left_behind_and_format_chooses_between_matching_formats(tmp_path):
    turns = [{**message, "name": "x"} for message in CONVERSATION]
    path = write_jsonl(tmp_path / "both.jsonl", [{"messages": turns, "instruction": "q", "output": "a", "id": 7}])
    with pytest.raises(InputError, match=r"fit the formats alpaca and messages; choose one with --format"):
        load_rows(path)
    assert load_rows(path, format="messages") == [{"messages": CONVERSATION}]
    assert load_rows(path, format="alpaca") == [{"instruction": "q", "input": "", "output": "a"}]


@pytest.mark.parametrize("rows, expected", [
    ([{"messages": CONVERSATION}, {"messages": "Hi"}],
     "row 2: messages is not a list of role/content dicts (found a str 'Hi')"),
    ([{"messages": [["user", "Hi"]]}], "row 1: messages is not a list of role/content dicts (found a list)"),
    ([{"messages": [{"role": "user", "content": "Hi"}, {"role": "tool", "content": "42"}]}],
     "row 1, turn 2: unknown role 'tool' (expected system, user, assistant)"),
    ([{"messages": [{"role": "user", "content": ["Hi"]}]}], "row 1, turn 1: its content is a list, expected text"),
    ([{"messages": [{"role": "user"}]}], "row 1, turn 1: its content is missing, expected text"),
    ([{"conversations": [{"from": "human", "value": "Hi"}, {"from": "bot", "value": "Hello"}]}],
     "row 1, turn 2: unknown from 'bot' (expected system, human, gpt)"),
    ([{"messages": [{"role": "user", "content": "Hi"}]}] * 2,
     "no conversation has an assistant turn: there is nothing to train on"),
    ([{"prompt": [{"role": "user", "content": "Hi"}], "completion": "Hello"}],
     "row 1: prompt is a list, expected text (for conversations use a messages column; a column-oriented file "
     "reads as one row of lists: write a list of rows)"),
    # Single-turn fields are text, never str() of what they hold; an optional input may be missing.
    ([{"instruction": "q", "output": 5}], "row 1: output is a int 5, expected text"),
    ([{"instruction": "q", "output": {"a": {"b": [1]}}}], "row 1: output is a dict, expected text"),
    ([{"instruction": "q", "output": None}], "row 1: output is missing, expected text"),
    ([{"instruction": "q", "output": "a"}, {"instruction": "q2"}], "row 2: output is missing, expected text"),
    ([{"instruction": "q", "input": 3, "output": "a"}], "row 1: input is a int 3, expected text"),
    ([{"prompt": "q", "completion": True}], "row 1: completion is a bool True, expected text"),
    ([{"question": "Hi", "answer": "Hello"}],
     "its columns (question, answer) fit no data format (alpaca: instruction, output, input (optional); "
     "prompt-completion: prompt, completion; messages: messages; sharegpt: conversations)"),
])
def test_bad_rows_are_named_in_one_line(rows, expected, tmp_path):
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    with pytest.raises(InputError) as error:
        load_rows(path)
    assert str(error.value) == f"{path}: {expected}"


def test_a_column_oriented_json_file_is_refused_not_trained_as_lists(tmp_path):
    path = tmp_path / "columns.json"
    path.write_text(json.dumps({"instruction": ["a", "b"], "input": ["", ""], "output": ["x", "y"]}))
    with pytest.raises(InputError, match=r"row 1: instruction is a list, expected text .*write a list of rows"):
        load_rows(str(path))


def test_a_row_of_another_format_under_a_forced_format_is_refused_by_its_number(tmp_path):
    path = write_jsonl(tmp_path / "mixed.jsonl", [{"instruction": "q", "output": "a"},
                                                  {"prompt": "p", "completion": "c"}])
    with pytest.raises(InputError) as error:
        load_rows(path, format="alpaca")
    assert str(error.value) == f"{path}: row 2: instruction is missing, expected text"


def test_an_empty_answer_is_text_and_trains_the_eos_alone(tmp_path, tiny_model_dir):
    from transformers import AutoTokenizer

    path = write_jsonl(tmp_path / "empty.jsonl", [{"instruction": "Say nothing.", "output": ""}])
    (row,) = load_rows(path)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    (example,), _ = tokenize_rows([row], tokenizer, max_len=64)
    assert [label for label in example["labels"] if label != -100] == [tokenizer.eos_token_id]


def test_a_format_whose_columns_are_missing_is_refused(tmp_path):
    path = write_jsonl(tmp_path / "rows.jsonl", [{"messages": CONVERSATION}])
    with pytest.raises(InputError, match=r"missing column\(s\) prompt, completion for --format prompt-completion; "
                                         r"found messages"):
        load_rows(path, format="prompt-completion")
