"""Prompt formats: the seed's template and the tokenizer's chat template, masked on the assistant turns only.

Two chat templates of different shapes, on copies of the built-in tokenizer given their special tokens:
ChatML (SmolLM2, Qwen), whose turns end in <|im_end|> and a newline and which inserts a default
system prompt; and Llama-3 headers, whose turns end in <|eot_id|>, with a BOS in the template that
the tokenizer also adds by itself.
"""

import hashlib
import json
import re

import pytest
from conftest import ROOT
from test_formats import CONVERSATION
from transformers import AutoTokenizer

from bitfit.config import DEFAULT_DATA
from bitfit.core.examples import IGNORE_INDEX
from bitfit.data.formats import as_messages
from bitfit.data.rows import load_rows
from bitfit.data.templates import conversation_pieces, format_prompt, prompt_ids, show_masked
from bitfit.data.tokenize import conversation_example, tokenize_example, tokenize_rows
from bitfit.errors import InputError
from bitfit.model.loading import TINY_GPT2_DIR

CHATML = ("{% for message in messages %}"
          "{% if loop.first and message['role'] != 'system' %}"
          "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
          "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
LLAMA3 = ("{{ bos_token }}{% for message in messages %}"
          "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim "
          "+ '<|eot_id|>' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")
MARKERS = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>"}


def templated_tokenizer(kind: str, template: str | None = None):
    """A copy of the built-in tokenizer with a chat template (kind: chatml or llama3) and its special tokens."""
    tokenizer = AutoTokenizer.from_pretrained(TINY_GPT2_DIR)
    if kind == "chatml":
        tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    else:
        tokenizer.add_special_tokens({"bos_token": "<|begin_of_text|>", "additional_special_tokens": [
            "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]})
        tokenizer.add_bos_token = True  # as Llama 3's own tokenizer does, besides the template's BOS
    tokenizer.chat_template = template or {"chatml": CHATML, "llama3": LLAMA3}[kind]
    return tokenizer


@pytest.fixture(scope="module", params=["chatml", "llama3"])
def kind(request):
    return request.param


@pytest.fixture(scope="module")
def tokenizer(kind):
    return templated_tokenizer(kind)


def label_spans(example) -> list[tuple[int, int]]:
    """Where the example's runs of consecutive label tokens start and end."""
    trained = [label != IGNORE_INDEX for label in example["labels"]] + [False]
    starts = [i for i, flag in enumerate(trained) if flag and (i == 0 or not trained[i - 1])]
    return [(start, trained.index(False, start)) for start in starts]


def label_runs(example) -> list[list[int]]:
    return [example["labels"][start:end] for start, end in label_spans(example)]


def masked_text(example, tokenizer) -> str:
    return tokenizer.decode([token for token, label in zip(example["input_ids"], example["labels"])
                             if label == IGNORE_INDEX])


# ------------------------------------------------------------------------------- the masks


def test_labels_are_each_answer_and_its_end_marker_and_nothing_else(kind, tokenizer):
    (example,), dropped = tokenize_rows([{"messages": CONVERSATION}], tokenizer, 256, "chat")
    assert dropped == 0
    answers = [message["content"] for message in CONVERSATION if message["role"] == "assistant"]
    assert [tokenizer.decode(run) for run in label_runs(example)] == [answer + MARKERS[kind] for answer in answers]
    masked = masked_text(example, tokenizer)
    for message in CONVERSATION:  # the system and user turns, and nothing of the answers
        assert (message["content"] in masked) == (message["role"] != "assistant")
    # Labels copy the input where they are not masked, and the whole conversation is there.
    assert all(label in (token, IGNORE_INDEX) for token, label in zip(example["input_ids"], example["labels"]))
    rendered = tokenizer.apply_chat_template(CONVERSATION, tokenize=True, return_dict=False)
    assert rendered[:len(example["input_ids"])] == example["input_ids"]
    assert tokenizer.decode(rendered[len(example["input_ids"]):]) in ("", "\n")  # after the last marker


def test_a_conversation_without_a_system_turn_gets_the_templates_default_one_masked():
    tokenizer = templated_tokenizer("chatml")
    (example,), _ = tokenize_rows([{"messages": CONVERSATION[1:]}], tokenizer, 256, "chat")
    assert "You are a helpful assistant." in masked_text(example, tokenizer)
    assert [tokenizer.decode(run) for run in label_runs(example)] == ["Red.<|im_end|>", "Blue.<|im_end|>"]


def test_the_template_holds_the_only_bos():
    tokenizer = templated_tokenizer("llama3")
    bos = tokenizer.bos_token_id
    assert tokenizer("Hi")["input_ids"][0] == bos  # the tokenizer adds one by itself
    (chat,), _ = tokenize_rows([{"messages": CONVERSATION}], tokenizer, 256, "chat")
    assert chat["input_ids"][0] == bos and chat["input_ids"].count(bos) == 1
    (seed,), _ = tokenize_rows([{"messages": CONVERSATION}], tokenizer, 256, "human-assistant")
    assert seed["input_ids"][0] == bos and seed["input_ids"].count(bos) == 1
    assert prompt_ids(tokenizer, CONVERSATION[:2], "chat").count(bos) == 1


def test_alpaca_rows_under_chat_are_one_user_turn_and_one_answer(tokenizer):
    row = {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}
    as_chat = [{"role": "user", "content": "Add the numbers.\n2 and 3"}, {"role": "assistant", "content": "5"}]
    assert tokenize_example(row, tokenizer, 256, "chat") == tokenize_example({"messages": as_chat}, tokenizer, 256,
                                                                             "chat")


def test_seed_conversations_train_every_answer_and_its_eos(tokenizer):
    example = tokenize_example({"messages": CONVERSATION}, tokenizer, 256, "human-assistant")
    eos = tokenizer.eos_token
    assert [tokenizer.decode(run) for run in label_runs(example)] == ["Red." + eos, "Blue." + eos]
    assert tokenizer.decode(example["input_ids"], skip_special_tokens=False).removeprefix(
        tokenizer.bos_token if tokenizer.add_bos_token else "") == (
        "System: Answer in one word.\n\nHuman: Name a primary colour.\n\nAssistant: Red." + eos
        + "Human: And another?\n\nAssistant: Blue." + eos)


# ------------------------------------------------------------------ the seed path, unchanged


# Tokens of the 160 sample rows under the seed's template with the built-in tokenizer, as bitfit
# made them before chat data came in (commit df7c085): (max_len, examples, dropped, sha256[:16]).
SEED_EXAMPLES_BEFORE = [(256, 160, 0, "45297ac0380011ce"), (48, 154, 6, "4202d62f1a9b478a")]


def test_alpaca_under_the_seed_template_gives_the_tokens_it_gave_before():
    builtin = AutoTokenizer.from_pretrained(TINY_GPT2_DIR)
    rows = load_rows(DEFAULT_DATA)
    as_messages = [{"messages": [{"role": "user", "content": "\n".join([row["instruction"], row["input"]]).strip()},
                                 {"role": "assistant", "content": row["output"]}]} for row in rows]
    for max_len, count, dropped_before, digest in SEED_EXAMPLES_BEFORE:
        for data in (rows, as_messages):  # a one-exchange conversation is the seed's single-turn example
            examples, dropped = tokenize_rows(data, builtin, max_len)
            assert (len(examples), dropped) == (count, dropped_before)
            tokens = json.dumps([[example["input_ids"], example["labels"]] for example in examples])
            assert hashlib.sha256(tokens.encode()).hexdigest()[:16] == digest
    assert prompt_ids(builtin, [{"role": "user", "content": "Add.\n2 and 3"}], "human-assistant") == \
        builtin(format_prompt("Add.", "2 and 3"))["input_ids"]


# ------------------------------------------------------------------------------ truncation


@pytest.mark.parametrize("template", ["human-assistant", "chat"])
def test_truncation_keeps_whole_leading_turns_and_the_part_of_an_answer_that_fits(tokenizer, template):
    whole = tokenize_example({"messages": CONVERSATION}, tokenizer, 1000, template)
    (first_start, first_end), (second_start, second_end) = label_spans(whole)
    assert second_end == len(whole["input_ids"])  # a whole example ends with its last label token
    # Cut inside the second answer: everything before it, and its first two tokens, trained.
    cut = tokenize_example({"messages": CONVERSATION}, tokenizer, second_start + 2, template)
    assert cut == {key: value[:second_start + 2] for key, value in whole.items()}
    # Cut inside the second user turn ("And another?"): the example ends with the first answer.
    assert second_start - first_end > 6
    cut = tokenize_example({"messages": CONVERSATION}, tokenizer, first_end + 5, template)
    assert cut == {key: value[:first_end] for key, value in whole.items()}
    # Cut before the first answer: nothing to train, the row is dropped.
    assert tokenize_example({"messages": CONVERSATION}, tokenizer, first_start, template) is None
    examples, dropped = tokenize_rows([{"messages": CONVERSATION}], tokenizer, first_start, template)
    assert (len(examples), dropped) == (0, 1)


# --------------------------------------------------------------------- generation's prompts


@pytest.mark.parametrize("template", ["human-assistant", "chat"])
def test_the_generation_prompt_is_the_training_prompt_token_for_token(tokenizer, template):
    example = tokenize_example({"messages": CONVERSATION}, tokenizer, 1000, template)
    starts = [start for start, _ in label_spans(example)]
    answers = [i for i, message in enumerate(CONVERSATION) if message["role"] == "assistant"]
    assert len(starts) == len(answers) == 2
    for start, answer in zip(starts, answers):
        prompt = prompt_ids(tokenizer, CONVERSATION[:answer], template)
        assert prompt == example["input_ids"][:start]
        if template == "chat":  # what transformers' own chat templating gives
            assert prompt == tokenizer.apply_chat_template(CONVERSATION[:answer], add_generation_prompt=True,
                                                           tokenize=True, return_dict=False)


# ------------------------------------------------------------- the pre-pass and lazy tokens


def varied_rows() -> list[dict]:
    """Conversations of one to three exchanges, some with a system turn, one without an answer."""
    rows = []
    for number in range(24):
        turns = [{"role": "system", "content": "Be brief. " * (number % 3)}] if number % 4 == 0 else []
        for exchange in range(1 + number % 3):
            turns += [{"role": "user", "content": f"Question {number}.{exchange}: " + "why? " * (number % 5)},
                      {"role": "assistant", "content": f"Answer {exchange}. " + "Because. " * (number % 7)}]
        rows.append({"messages": turns})
    rows.append({"messages": [{"role": "user", "content": "Hello?"}]})
    return rows + [{"instruction": "Say hi.", "input": "", "output": "Hi."}]


class CountingTokenizer:
    """A tokenizer that records every text it is asked to tokenize."""

    def __init__(self, tokenizer):
        self.tokenizer, self.texts = tokenizer, []

    def __call__(self, texts, **kwargs):
        self.texts += [texts] if isinstance(texts, str) else texts
        return self.tokenizer(texts, **kwargs)

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


@pytest.mark.parametrize("template", ["human-assistant", "chat"])
def test_the_prompt_lengths_counted_up_front_drop_exactly_the_rows_left_without_labels(tokenizer, template):
    rows = varied_rows()
    # The reference: every row tokenized whole, with no shortcut, then cut.
    pieces = [conversation_pieces(as_messages(row), tokenizer, template) for row in rows]
    wholes = [conversation_example(row_pieces, 1000) for row_pieces in pieces]
    first_labels = [label_spans(example)[0][0] for example in wholes if example is not None]
    # Lengths that cut right at some rows' first label, and one past it.
    lengths = sorted({first_labels[i] + offset for i in range(0, len(first_labels), 3) for offset in (0, 1)})
    dropped_at = {}
    for max_len in [*lengths, 1000]:
        kept = [example for example in (conversation_example(p, max_len) for p in pieces) if example is not None]
        examples, dropped_at[max_len] = tokenize_rows(rows, tokenizer, max_len, template)
        assert dropped_at[max_len] == len(rows) - len(kept)
        assert list(examples) == kept
    assert dropped_at[1000] == 1  # the row with no answer
    assert len({dropped for dropped in dropped_at.values() if 1 < dropped < len(rows)}) > 3


def test_only_prompts_are_tokenized_until_a_step_reads_a_row(tokenizer):
    rows = varied_rows()
    counting = CountingTokenizer(tokenizer)
    examples, _ = tokenize_rows(rows, counting, 1000, "chat")
    assert not any("Answer" in text or "Because" in text for text in counting.texts)
    examples[3]
    assert any("Answer" in text for text in counting.texts)


# ------------------------------------------------------------------------------- refusals


# A template that ends the last turn otherwise than the others (some put an eos after the final turn
# only): a turn's tokens change once another follows it.
MARKS_THE_LAST_TURN = ("{% for message in messages %}"
                       "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' }}"
                       "{% if loop.last %}{{ '<|endoftext|>' }}{% endif %}{{ '\\n' }}{% endfor %}"
                       "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")

NO_MARKER = ("{% for message in messages %}{{ '### ' + message['role'] + ':\\n' + message['content'] + '\\n' }}"
             "{% endfor %}{% if add_generation_prompt %}{{ '### assistant:\\n' }}{% endif %}")
REFUSES_EMPTY_TURNS = CHATML.replace("{{ '<|im_start|>' + message",
                                     "{% if not message['content'] %}{{ raise_exception('empty turn') }}{% endif %}"
                                     "{{ '<|im_start|>' + message")


def test_a_template_that_rewrites_earlier_turns_is_refused_before_any_row():
    tokenizer = templated_tokenizer("chatml", MARKS_THE_LAST_TURN)
    with pytest.raises(InputError) as error:
        tokenize_rows([{"messages": CONVERSATION}], tokenizer, 256, "chat")
    assert re.fullmatch(r"the chat template does not render the conversation that begins user: 'Name a primary "
                        r"colour\.' turn by turn: the tokens of .* do not begin those of .* \(token \d+: .*\); it "
                        r"rewrites earlier turns, so labels cannot be found by prefixes; "
                        r"try --template human-assistant",
                        str(error.value))


def test_a_template_with_no_special_end_of_turn_is_refused():
    tokenizer = templated_tokenizer("chatml", NO_MARKER)
    with pytest.raises(InputError, match=r"ends assistant turn 1 of the conversation that begins user: 'Name a "
                                         r"primary colour.' with no special token .*; try --template human-assistant"):
        tokenize_rows([{"messages": CONVERSATION}], tokenizer, 256, "chat")


def test_a_row_the_template_fails_to_render_is_named():
    tokenizer = templated_tokenizer("chatml", REFUSES_EMPTY_TURNS)
    row = {"messages": [{"role": "user", "content": "Tell me   nothing at all, please, in the fewest words."},
                        {"role": "assistant", "content": ""}]}
    examples, _ = tokenize_rows([{"messages": CONVERSATION}, row], tokenizer, 256, "chat")  # prompts render
    with pytest.raises(InputError) as error:
        examples[1]
    assert str(error.value) == ("the chat template fails to render the conversation that begins user: 'Tell me "
                                "nothing at all, please, in...': empty turn")


# ------------------------------------------------------------------- the data page's picture


def test_the_data_page_shows_one_conversation_masked_as_the_code_masks_it():
    readme = (ROOT / "docs" / "data.md").read_text()
    row, picture, counts = re.search(r"\*\*One masked conversation\*\*.*?```json\n(.*?)\n```\n\n```text\n(.*?)\n```"
                                     r"\n\n(.*?)\n\n", readme, re.DOTALL).groups()
    assert json.loads(row) == {"messages": CONVERSATION}
    tokenizer = templated_tokenizer("chatml")
    example = tokenize_example(json.loads(row), tokenizer, 256, "chat")
    assert picture == show_masked(example, tokenizer)
    red, blue = label_runs(example)
    assert counts.startswith(f"Of its {len(example['input_ids'])} tokens, {len(red) + len(blue)} are trained: "
                             f"`Red.<|im_end|>` is {len(red)} tokens")
    assert f"`Blue.<|im_end|>` {len(blue)} (" in counts
    assert f"The other {len(example['input_ids']) - len(red) - len(blue)} are" in counts
