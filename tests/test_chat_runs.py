"""Chat data end to end: train.py through the model's chat template, generate.py prompting the same
way, export keeping the template; and every bad input in one line, the earlier run kept."""

import json
import shutil

import pytest
import torch
from conftest import cli, error_lines, folder_bytes, leftovers
from safetensors import safe_open
from safetensors.torch import save_file
from test_chat import MARKS_THE_LAST_TURN, REFUSES_EMPTY_TURNS, templated_tokenizer
from test_formats import CONVERSATION, write_jsonl
from transformers import AutoTokenizer, GenerationMixin, GPT2Config, GPT2LMHeadModel

import generate
import train
from bitfit import export
from bitfit.config import canonical_template
from bitfit.data.templates import chat_template_hash, prompt_ids
from bitfit.store.delta import load_bias_delta

QUESTION = [{"role": "user", "content": "Name a primary colour."}]


@pytest.fixture(scope="module")
def chat_model_dir(tmp_path_factory):
    """A tiny GPT-2 whose tokenizer has a ChatML template; its config's eos is still <|endoftext|>."""
    folder = tmp_path_factory.mktemp("chat-gpt2")
    tokenizer = templated_tokenizer("chatml")
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=128, n_embd=32, n_layer=2, n_head=2, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def with_template(chat_model_dir, folder, template):
    """A copy of the chat model whose tokenizer has another chat template."""
    shutil.copytree(chat_model_dir, folder)
    tokenizer = AutoTokenizer.from_pretrained(chat_model_dir)
    tokenizer.chat_template = template
    tokenizer.save_pretrained(folder)
    return str(folder)


def chat_rows(count):
    return [{"messages": [{**message, "content": f"{message['content']} ({number})"} for message in CONVERSATION]}
            for number in range(count)]


@pytest.fixture(scope="module")
def chat_run(chat_model_dir, tmp_path_factory):
    """A BitFit run on messages rows, one of them without an answer, with the default template."""
    from bitfit.cli import run_main

    folder = tmp_path_factory.mktemp("chat-run")
    data = write_jsonl(folder / "chats.jsonl", chat_rows(5) + [{"messages": QUESTION}])
    status = run_main(train.main, ["--model", chat_model_dir, "--data", data, "--max-steps", "2", "--batch-size", "2",
                                   "--grad-accum", "1", "--output-dir", str(folder / "run")])
    assert status == 0
    return folder / "run"


def generate_calls(monkeypatch) -> list[dict]:
    """What model.generate is called with, recorded."""
    calls, original = [], GenerationMixin.generate

    def recorded(self, *args, **kwargs):
        calls.append(kwargs)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(GenerationMixin, "generate", recorded)
    return calls


def test_a_chat_run_records_its_formats_and_drops_the_row_without_an_answer(chat_run, chat_model_dir):
    settings = json.loads((chat_run / "train_config.json").read_text())
    assert (settings["format"], settings["template"]) == ("messages", "chat")
    assert json.loads((chat_run / "summary.json").read_text())["dropped_rows"] == 1
    with safe_open(str(chat_run / "bias.safetensors"), framework="pt") as handle:
        metadata = handle.metadata()
    assert metadata["template"] == "chat"
    assert metadata["chat_template_hash"] == chat_template_hash(AutoTokenizer.from_pretrained(chat_model_dir))


def test_the_dropped_row_is_counted_in_the_log(chat_model_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "chats.jsonl", chat_rows(3) + [{"messages": QUESTION}])
    status, out, err = cli(train.main, ["--model", chat_model_dir, "--data", data, "--max-steps", "1",
                                        "--output-dir", str(tmp_path / "run")], capsys)
    assert status == 0, err
    assert "dropped 1 of 4 rows: 1 have no assistant turn" in out


def test_generate_prompts_a_chat_delta_through_the_chat_template(chat_run, chat_model_dir, tmp_path, capsys,
                                                                 monkeypatch):
    tokenizer = AutoTokenizer.from_pretrained(chat_model_dir)
    calls = generate_calls(monkeypatch)
    status, out, err = cli(generate.main, ["--bias", str(chat_run), "--prompt", QUESTION[0]["content"],
                                           "--max-new-tokens", "3"], capsys)
    assert status == 0, err
    (call,) = calls
    assert call["input_ids"].tolist() == [prompt_ids(tokenizer, QUESTION, "chat")]
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in call["eos_token_id"]  # stops at the end of the turn

    # --prompts takes messages rows, and --template human-assistant (or seed, its older name) overrides
    # what the delta recorded.
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"messages": CONVERSATION[:4]}, {"messages": QUESTION}])
    for template in ("chat", "human-assistant", "seed"):
        calls.clear()
        status, out, err = cli(generate.main, ["--bias", str(chat_run), "--prompts", prompts, "--max-new-tokens", "2",
                                               "--template", template], capsys)
        assert status == 0, err
        written = canonical_template(template)
        expected = [prompt_ids(tokenizer, CONVERSATION[:4], written), prompt_ids(tokenizer, QUESTION, written)]
        (call,) = calls
        width = max(map(len, expected))
        assert [row[width - len(ids):] for row, ids in zip(call["input_ids"].tolist(), expected)] == expected
        assert "### Prompt 1 of 2\nsystem: Answer in one word.\nuser: Name a primary colour." in out


def test_generate_refuses_a_chat_delta_on_another_chat_template_unless_forced(chat_run, chat_model_dir, tmp_path,
                                                                              capsys):
    other = with_template(chat_model_dir, tmp_path / "other",
                          templated_tokenizer("chatml").chat_template.replace("a helpful", "an unhelpful"))
    argv = ["--model", other, "--bias", str(chat_run), "--max-new-tokens", "2"]
    status, out, err = cli(generate.main, argv, capsys)
    assert status == 2 and out == ""
    assert err.count("\n") == 1 and "trained through chat template" in err and "--force" in err, err
    status, out, err = cli(generate.main, [*argv, "--force"], capsys)
    assert status == 0, err


def test_generate_refuses_deltas_of_different_templates_unless_template_is_given(chat_run, tmp_path, capsys):
    tensors, metadata = load_bias_delta(str(chat_run))
    seed_delta = tmp_path / "seed.safetensors"
    save_file(tensors, str(seed_delta), metadata={**metadata, "template": "seed"})
    argv = ["--bias", str(chat_run), "--bias", str(seed_delta), "--max-new-tokens", "2"]
    status, _, err = cli(generate.main, argv, capsys)
    assert status == 2
    assert err.count("\n") == 1
    assert "different prompt formats (chat, human-assistant); choose one with --template" in err
    status, out, err = cli(generate.main, [*argv, "--template", "seed"], capsys)
    assert status == 0 and out.count("### With bias delta") == 2, err


@pytest.mark.parametrize("metadata, expected", [
    ({"template": "chatml"}, "its template metadata is 'chatml', not one of human-assistant, chat"),
    ({"chat_template_hash": "not hex"}, "its chat_template_hash metadata is not 16 hex digits"),
])
def test_a_delta_with_forged_template_metadata_is_refused(chat_run, metadata, expected, tmp_path, capsys):
    tensors, recorded = load_bias_delta(str(chat_run))
    forged = tmp_path / "forged.safetensors"
    save_file(tensors, str(forged), metadata={**recorded, **metadata})
    status, _, err = cli(generate.main, ["--bias", str(forged)], capsys)
    assert status == 2 and err.count("\n") == 1 and expected in err, err


def test_export_keeps_the_chat_template(chat_run, chat_model_dir, tmp_path, capsys):
    status, out, err = cli(export.main, ["--bias", str(chat_run), "--out", str(tmp_path / "merged")], capsys)
    assert status == 0, err
    merged = AutoTokenizer.from_pretrained(tmp_path / "merged")
    assert merged.chat_template == AutoTokenizer.from_pretrained(chat_model_dir).chat_template
    assert prompt_ids(merged, CONVERSATION[:2], "chat") == \
        prompt_ids(AutoTokenizer.from_pretrained(chat_model_dir), CONVERSATION[:2], "chat")


@pytest.mark.parametrize("prompts, expected", [
    ([{"messages": CONVERSATION[:3]}], "row 1: its last turn is the assistant's; a prompt ends with the user's turn"),
    ([{"messages": QUESTION}, {"messages": [{"role": "robot", "content": "x"}]}],
     "row 2, turn 1: unknown role 'robot'"),
])
def test_generate_refuses_a_bad_messages_prompt_in_one_line(prompts, expected, tmp_path, capsys):
    file = write_jsonl(tmp_path / "prompts.jsonl", prompts)
    status, _, err = cli(generate.main, ["--prompts", file], capsys)
    assert status == 2 and err.count("\n") == 1 and expected in err, err


# ---------------------------------------------------------------------------- bad input


def bad_chat_runs(tmp_path, tiny_model_dir, chat_model_dir):
    good = write_jsonl(tmp_path / "good.jsonl", chat_rows(2))
    cases = {
        "messages not a list": ([{"messages": CONVERSATION}, {"messages": {"role": "user"}}],
                                "row 2: messages is not a list of role/content dicts (found a dict)"),
        "unknown role": ([{"messages": [{"role": "bot", "content": "hi"}]}], "row 1, turn 1: unknown role 'bot'"),
        "unknown sharegpt role": ([{"conversations": [{"from": "assistant", "value": "hi"}]}],
                                  "row 1, turn 1: unknown from 'assistant'"),
        "no assistant turn": ([{"messages": QUESTION}] * 3, "no conversation has an assistant turn"),
        "no format": ([{"question": "q", "answer": "a"}], "fit no data format (alpaca: instruction, output"),
    }
    runs = {name: (["--model", chat_model_dir, "--data", write_jsonl(tmp_path / f"{number}.jsonl", rows)], expected)
            for number, (name, (rows, expected)) in enumerate(cases.items())}
    runs["wrong --format"] = (["--model", chat_model_dir, "--data", good, "--format", "sharegpt"],
                              "missing column(s) conversations for --format sharegpt")
    runs["chat without a chat template"] = (["--model", tiny_model_dir, "--data", good, "--template", "chat"],
                                            "the tokenizer has no chat template; use --template human-assistant")
    rewrites = with_template(chat_model_dir, tmp_path / "rewrites", MARKS_THE_LAST_TURN)
    runs["template rewrites turns"] = (["--model", rewrites, "--data", good], "does not render the conversation")
    fails = with_template(chat_model_dir, tmp_path / "fails", REFUSES_EMPTY_TURNS)
    empty_answers = write_jsonl(tmp_path / "empty.jsonl", [{"messages": QUESTION + [
        {"role": "assistant", "content": ""}]}] * 4)  # the prompts render; the answers fail when a step reads them
    runs["template fails on a row"] = (["--model", fails, "--data", empty_answers],
                                       "the chat template fails to render the conversation that begins user: "
                                       "'Name a primary colour.': empty turn")
    return runs


CASES = ["messages not a list", "unknown role", "unknown sharegpt role", "no assistant turn", "no format",
         "wrong --format", "chat without a chat template", "template rewrites turns", "template fails on a row"]


@pytest.mark.parametrize("case", CASES)
def test_bad_chat_input_gives_one_line_and_keeps_the_earlier_run(case, tmp_path, tiny_model_dir, chat_model_dir,
                                                                earlier_run, capsys):
    argv, expected = bad_chat_runs(tmp_path, tiny_model_dir, chat_model_dir)[case]
    before = folder_bytes(earlier_run)
    status, _, err = cli(train.main, [*argv, "--max-steps", "2", "--output-dir", str(earlier_run), "--overwrite"],
                         capsys)
    lines = error_lines(err)
    assert status == 2
    assert len(lines) == 1 and expected in lines[0], err
    assert folder_bytes(earlier_run) == before
    assert leftovers(earlier_run) == []


def test_a_checkpoint_from_before_templates_resumes_in_the_seeds_template(chat_model_dir, alpaca_file, tmp_path,
                                                                         capsys):
    out = tmp_path / "run"
    status, _, err = cli(train.main, ["--model", chat_model_dir, "--data", alpaca_file, "--template", "seed",
                                      "--max-steps", "1", "--save-every", "1", "--output-dir", str(out)], capsys)
    assert status == 0, err
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    del state["config"]["format"], state["config"]["template"]  # as bitfit wrote them before
    torch.save(state, out / "checkpoint.pt")
    status, _, err = cli(train.main, ["--resume", str(out), "--max-steps", "2"], capsys)
    assert status == 0, err
    settings = json.loads((out / "train_config.json").read_text())
    # seed, human-assistant's older name, is recorded by its name; not the model's chat template
    assert (settings["format"], settings["template"]) == ("alpaca", "human-assistant")
