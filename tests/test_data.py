import json
import os

import pytest
from conftest import ROWS
from transformers import AutoTokenizer

from bitfit.core.examples import IGNORE_INDEX, build_example, collate, optimizer_windows
from bitfit.data.rows import load_rows
from bitfit.data.templates import format_prompt
from bitfit.data.tokenize import tokenize_rows
from bitfit.errors import InputError


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def test_prompt_template_matches_the_seed():
    assert format_prompt("Name a color.") == "Human: Name a color.\n\nAssistant: "
    assert format_prompt("Add.", "2 and 3") == "Human: Add.\n2 and 3\n\nAssistant: "


def test_labels_mask_the_prompt_and_end_with_eos(tokenizer):
    row = ROWS[1]
    (example,), dropped = tokenize_rows([row], tokenizer, max_len=256)
    prompt_ids = tokenizer(format_prompt(row["instruction"], row["input"]))["input_ids"]
    response_ids = tokenizer(row["output"], add_special_tokens=False)["input_ids"]
    assert dropped == 0
    assert example["input_ids"] == prompt_ids + response_ids + [tokenizer.eos_token_id]
    assert example["labels"] == [IGNORE_INDEX] * len(prompt_ids) + response_ids + [tokenizer.eos_token_id]


def test_truncation_cuts_at_max_len_and_keeps_the_mask_aligned():
    example = build_example([1, 2, 3], [4, 5, 6, 99], max_len=5)
    assert example == {"input_ids": [1, 2, 3, 4, 5], "labels": [IGNORE_INDEX] * 3 + [4, 5]}


def test_rows_whose_response_is_cut_away_are_dropped(tokenizer):
    long_prompt = {"instruction": "word " * 50, "input": "", "output": "short"}
    examples, dropped = tokenize_rows([long_prompt, ROWS[0]], tokenizer, max_len=20)
    assert dropped == 1
    assert len(examples) == 1
    assert any(label != IGNORE_INDEX for label in examples[0]["labels"])


def test_collate_pads_right_and_keeps_the_real_eos_label():
    eos = 7
    examples = [{"input_ids": [1, 2, eos], "labels": [IGNORE_INDEX, 2, eos]},
                {"input_ids": [3, 4, 5, 6, eos], "labels": [IGNORE_INDEX, IGNORE_INDEX, 5, 6, eos]}]
    batch = collate(examples, pad_id=eos)
    assert batch["input_ids"].tolist() == [[1, 2, eos, eos, eos], [3, 4, 5, 6, eos]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 2, eos, IGNORE_INDEX, IGNORE_INDEX],
                                        [IGNORE_INDEX, IGNORE_INDEX, 5, 6, eos]]


def test_windows_hold_the_same_examples_whatever_the_split():
    one_by_eight = optimizer_windows(20, batch_size=1, grad_accum=8, seed=3, epoch=0)
    eight_by_one = optimizer_windows(20, batch_size=8, grad_accum=1, seed=3, epoch=0)
    flatten = lambda window: [i for micro in window for i in micro]  # noqa: E731
    assert [flatten(w) for w in one_by_eight] == [flatten(w) for w in eight_by_one]
    assert sorted(flatten(sum(one_by_eight, []))) == list(range(20))
    assert flatten(optimizer_windows(20, 1, 8, seed=3, epoch=1)[0]) != flatten(one_by_eight[0])


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".csv", ".parquet"])
def test_local_files_of_each_format_load(tmp_path, suffix):
    import pandas as pd

    path = tmp_path / f"rows{suffix}"
    frame = pd.DataFrame(ROWS[:3])
    if suffix == ".json":
        path.write_text(json.dumps(ROWS[:3]))
    elif suffix == ".jsonl":
        frame.to_json(path, orient="records", lines=True)
    elif suffix == ".csv":
        frame.to_csv(path, index=False)
    else:
        frame.to_parquet(path)
    assert load_rows(str(path)) == ROWS[:3]


def test_input_column_is_optional_and_limit_takes_the_first_rows(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text(json.dumps([{"instruction": f"q{i}", "output": f"a{i}"} for i in range(5)]))
    assert load_rows(str(path), limit=2) == [{"instruction": "q0", "input": "", "output": "a0"},
                                             {"instruction": "q1", "input": "", "output": "a1"}]


@pytest.mark.parametrize("content, expected", [
    (None, "data file not found"),
    ("", "data file is empty"),
    ("{not json", "not a valid JSON file"),
    ('[{"instruction": "q", "answer": "a"}]', "its columns (instruction, answer) fit no data format"),
])
def test_bad_data_files_are_named_in_the_error(tmp_path, content, expected):
    path = tmp_path / "rows.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(InputError, match=expected.replace("(", r"\(").replace(")", r"\)")) as error:
        load_rows(str(path))
    assert "rows.json" in str(error.value)


def test_a_file_rewritten_with_the_same_modification_time_is_read_afresh(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text(json.dumps(ROWS[:3]))
    stat = path.stat()
    assert load_rows(str(path)) == ROWS[:3]
    changed = [{**row, "output": "changed"} for row in ROWS[:3]]
    path.write_text(json.dumps(changed))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert load_rows(str(path)) == changed


class CountingTokenizer:
    """The tiny tokenizer, recording every text it is asked to tokenize."""

    def __init__(self, tokenizer):
        self.tokenizer, self.texts = tokenizer, []
        self.eos_token_id = tokenizer.eos_token_id

    def __call__(self, texts, **kwargs):
        self.texts += [texts] if isinstance(texts, str) else texts
        return self.tokenizer(texts, **kwargs)


def test_rows_are_tokenized_only_when_a_step_reads_them(tokenizer):
    rows = [{**row, "output": f"{row['output']} ({copy})"} for copy in range(50) for row in ROWS]  # 500 rows
    counting = CountingTokenizer(tokenizer)
    examples, dropped = tokenize_rows(rows, counting, max_len=64)
    assert len(examples) == 500 and dropped == 0
    assert not any(row["output"] in counting.texts for row in rows)  # only prompts were measured
    assert [examples[i] for i in (3, 499)]
    assert [text for text in counting.texts if "(" in text] == [rows[3]["output"], rows[499]["output"]]


def test_examples_read_one_by_one_equal_the_whole_set_tokenized_at_once(tokenizer):
    long_prompt = {"instruction": "word " * 40, "input": "", "output": "short"}
    examples, dropped = tokenize_rows([long_prompt, *ROWS], tokenizer, max_len=24)
    prompts = tokenizer([format_prompt(row["instruction"], row["input"]) for row in [long_prompt, *ROWS]])
    responses = tokenizer([row["output"] for row in [long_prompt, *ROWS]], add_special_tokens=False)
    reference = [build_example(p, r + [tokenizer.eos_token_id], 24)
                 for p, r in zip(prompts["input_ids"], responses["input_ids"])]
    kept = [example for example in reference if example is not None]
    assert reference[0] is None and dropped == len(reference) - len(kept)
    assert list(examples) == kept and examples[1:3] == kept[1:3]
