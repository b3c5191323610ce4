"""SmolLM2-135M-Instruct, the real pretrained model (python -m bitfit.fetch smollm2-135m-instruct).

Kept short (135M parameters on two CPU cores): one load of the GGUF file, a forward, one optimizer
step, a few generated tokens. The converted folder stands in for the file where speed matters;
the first test shows the two are the same model.
"""

import json
from pathlib import Path

import pytest
import torch
from conftest import ROWS, cli, llama_cpp_server, prepare_for_training
from transformers import AutoModelForCausalLM, AutoTokenizer

import generate
import train
from bitfit import export
from bitfit.cli import run_main
from bitfit.config import ASSETS
from bitfit.config import TrainConfig
from bitfit.core.examples import collate
from bitfit.core.loop import train_loop
from bitfit.data.tokenize import tokenize_rows
from bitfit.model.fingerprint import base_fingerprint
from bitfit.model.generation import generate_answers
from bitfit.model.loading import load_model_and_tokenizer, pad_token_id
from bitfit.store.delta import apply_bias_delta, load_bias_delta
from bitfit.store.merge import merge_bias_delta

CPU = torch.device("cpu")
QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def from_gguf(real_model):
    gguf_path, _ = real_model
    return load_model_and_tokenizer(gguf_path)


def load_folder(real_model):
    _, folder = real_model
    return load_model_and_tokenizer(folder)


def plain_loss(model, batch) -> float:
    """transformers' own loss (mean over label tokens): a reference that is not bitfit's."""
    with torch.no_grad():
        return model.eval()(**batch).loss.item()


def test_the_gguf_file_loads_as_smollm2_and_the_converted_folder_is_the_same_model(from_gguf, real_model):
    model, tokenizer = from_gguf
    config = model.config
    assert type(model).__name__ == "LlamaForCausalLM"
    assert (config.num_hidden_layers, config.hidden_size, config.vocab_size) == (30, 576, 49152)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied embeddings
    assert sum(param.numel() for param in model.parameters()) == 134_515_008
    assert not any(name.endswith("bias") for name, _ in model.named_parameters())
    assert "<|im_start|>" in tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>"
    folder_model, folder_tokenizer = load_folder(real_model)
    expected, got = folder_model.state_dict(), model.state_dict()
    assert list(got) == list(expected) and all(torch.equal(got[name], expected[name]) for name in expected)
    assert folder_tokenizer.chat_template == tokenizer.chat_template


def test_add_biases_adds_155520_zero_biases_to_its_210_linear_layers_and_changes_no_logit(real_model, tmp_path):
    model, tokenizer = load_folder(real_model)
    batch = collate(tokenize_rows(ROWS[:2], tokenizer, max_len=64)[0], pad_token_id(tokenizer))
    with torch.no_grad():
        before = model(**batch).logits
    settings = TrainConfig(model=real_model[1], add_biases=True, output_dir=str(tmp_path))
    names, _ = prepare_for_training(model, settings, CPU)
    linears = [module for module in model.modules() if isinstance(module, torch.nn.Linear)]
    assert len(names) == 210 and len(linears) == 211  # all but the output head
    assert sum(model.get_parameter(name).numel() for name in names) == 155_520
    assert all(not model.get_parameter(name).any() for name in names)
    with torch.no_grad():
        assert torch.equal(model.eval()(**batch).logits, before)


def test_one_bitfit_step_lowers_the_loss_on_a_repeated_batch(real_model, tmp_path):
    model, tokenizer = load_folder(real_model)
    examples, _ = tokenize_rows(ROWS[:2], tokenizer, max_len=64, template="chat")
    batch = collate(examples, pad_token_id(tokenizer))
    settings = TrainConfig(model=real_model[1], add_biases=True, batch_size=2, grad_accum=1, max_steps=1,
                           warmup_ratio=0.0, output_dir=str(tmp_path))
    _, optimizer = prepare_for_training(model, settings, CPU)
    before = plain_loss(model, batch)
    train_loop(model, optimizer, examples, settings, pad_id=pad_token_id(tokenizer), device=CPU)
    assert plain_loss(model, batch) < before - 0.05


def test_greedy_generation_through_the_chat_template_matches_transformers_own(from_gguf, real_model):
    model, tokenizer = from_gguf
    answer = generate_answers(model, tokenizer, [(QUESTION, "")], max_new_tokens=12, template="chat")

    reference_model = AutoModelForCausalLM.from_pretrained(real_model[1])  # transformers alone
    reference_tokenizer = AutoTokenizer.from_pretrained(real_model[1])
    prompt = reference_tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}],
                                                     add_generation_prompt=True, return_tensors="pt", return_dict=True)
    output = reference_model.generate(**prompt, max_new_tokens=12, do_sample=False)
    reference = reference_tokenizer.decode(output[0, prompt["input_ids"].size(1):])
    assert reference.endswith("<|im_end|>") and "Paris" in reference  # a real model, dequantized right
    assert answer == [reference.removesuffix("<|im_end|>").strip()]


def test_a_delta_trained_on_it_round_trips_through_generate_and_export(real_model, alpaca_file, tmp_path, capsys):
    _, folder = real_model
    run = tmp_path / "run"
    status, _, err = cli(train.main, ["--model", folder, "--add-biases", "--data", alpaca_file, "--device", "cpu",
                                      "--max-steps", "1", "--batch-size", "2", "--grad-accum", "1", "--lr", "1e-2",
                                      "--max-len", "48", "--output-dir", str(run)], capsys)
    assert status == 0, err
    tensors, metadata = load_bias_delta(str(run))
    assert len(tensors) == 210 and metadata["base_model"] == folder

    status, out, err = cli(generate.main, ["--bias", str(run), "--compare", "--prompt", QUESTION,
                                           "--max-new-tokens", "6", "--device", "cpu"], capsys)
    assert status == 0, err
    tuned_answer = out.split(f"### With bias delta ({run})\n")[1].strip()

    merged_dir = tmp_path / "merged"
    status, _, err = cli(export.main, ["--bias", str(run), "--out", str(merged_dir)], capsys)
    assert status == 0, err
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    merged_tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    base, tokenizer = load_folder(real_model)
    assert merged_tokenizer.chat_template == tokenizer.chat_template
    assert metadata["base_fingerprint"] == base_fingerprint(base, tensors)
    batch = collate(tokenize_rows(ROWS[:1], tokenizer, max_len=48)[0], pad_token_id(tokenizer))
    with torch.no_grad():
        base_logits = base(**batch).logits
        apply_bias_delta(base, tensors, metadata)
        tuned_logits = base(**batch).logits
        torch.testing.assert_close(merged(**batch).logits, tuned_logits, rtol=0, atol=0)
    assert not torch.allclose(tuned_logits, base_logits)  # the step did move the model
    assert generate_answers(merged, merged_tokenizer, [(QUESTION, "")], max_new_tokens=6,
                            template=metadata["template"]) == [tuned_answer]


# ------------------------------------------------------------ out of bitfit: llama.cpp and PEFT

JSON_TRAIN, JSON_HELD_OUT = ASSETS / "json_answers_train.json", ASSETS / "json_answers_held_out.json"
# Measured here (see docs/deltas.md): llama.cpp on the Q4_1 file and bitfit on its dequantized weights give
# next-token log-probabilities up to 0.27 apart on the base; the moves a query-and-key delta makes agree to
# 0.23, and to 1.64 with its rows in Hugging Face's order. 0.5 tells the two apart.
FOUR_BIT_TOLERANCE = 0.5


@pytest.fixture(scope="module")
def json_run(real_model, tmp_path_factory):
    """One epoch of BitFit on the JSON-answers data at lr 3e-3, on the fp32 folder, all biases added (~45 s)."""
    run = tmp_path_factory.mktemp("json-run") / "run"
    assert run_main(train.main, ["--model", real_model[1], "--add-biases", "--data", str(JSON_TRAIN), "--epochs", "1",
                                 "--batch-size", "8", "--grad-accum", "1", "--max-len", "64", "--seed", "0",
                                 "--lr", "3e-3", "--output-dir", str(run)]) == 0
    return run


def llama_cpp_answers(path, questions: list[str]) -> list[str]:
    """llama.cpp's greedy replies, through the chat template in the file, as a user of the file gets them."""
    server = llama_cpp_server(path, context=512, threads=2)
    return [server.handle_chat_completions({"messages": [{"role": "user", "content": question}], "max_tokens": 24,
                                            "temperature": 0})["choices"][0]["message"]["content"]
            for question in questions]


def one_key_json(reply: str) -> bool:
    try:
        value = json.loads(reply)
    except json.JSONDecodeError:
        return False
    return isinstance(value, dict) and list(value) == ["answer"] and isinstance(value["answer"], str)


def test_the_json_delta_as_a_gguf_file_makes_llama_cpp_answer_in_json(json_run, real_model, tmp_path, capsys):
    gguf_path, _ = real_model
    out = tmp_path / "tuned.gguf"
    status, _, err = cli(export.main, ["--bias", str(json_run), "--format", "gguf", "--model", gguf_path,
                                       "--out", str(out)], capsys)
    assert status == 0, err
    assert out.stat().st_size <= 1.1 * Path(gguf_path).stat().st_size
    questions = [row["instruction"] for row in json.loads(JSON_HELD_OUT.read_text())]
    assert len(questions) == 42
    tuned = [one_key_json(reply) for reply in llama_cpp_answers(out, questions)]
    base = [one_key_json(reply) for reply in llama_cpp_answers(gguf_path, questions)]
    assert sum(tuned) >= 0.8 * len(questions) and sum(base) == 0


def qk_run(real_model, folder) -> Path:
    """BitFit on the query and key biases alone, for a few steps at a high rate: a delta whose effect
    depends on its rows' order (the rotary embedding pairs them)."""
    run = folder / "qk"
    assert run_main(train.main, ["--model", real_model[1], "--add-biases", "--bias-terms", "query,key", "--data",
                                 str(JSON_TRAIN), "--max-steps", "6", "--batch-size", "8", "--grad-accum", "1",
                                 "--max-len", "64", "--seed", "0", "--lr", "1e-2", "--output-dir", str(run)]) == 0
    return run


def test_query_and_key_biases_move_llama_cpp_as_they_move_bitfit(real_model, tmp_path):
    from bitfit.store.gguf_export import write_gguf_with_biases

    gguf_path, folder = real_model
    tensors, metadata = load_bias_delta(str(qk_run(real_model, tmp_path)))
    model, tokenizer = load_folder(real_model)  # the file's weights, dequantized (the first test)
    write_gguf_with_biases(gguf_path, tmp_path / "qk.gguf", tensors, model.config)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Which word means the opposite of day?"}],
                                           add_generation_prompt=True, return_dict=True)["input_ids"]

    def llama_cpp_log_probs(path) -> dict[int, float]:
        request = {"prompt": prompt, "max_tokens": 1, "temperature": 0, "n_probs": 10}
        reply = llama_cpp_server(path, context=512, threads=2).handle_completions(request)
        (first,) = reply["choices"][0]["logprobs"]["content"]
        return {entry["id"]: entry["logprob"] for entry in first["top_logprobs"]}

    with torch.no_grad():
        base = torch.log_softmax(model.eval()(torch.tensor([prompt])).logits[0, -1], dim=-1)
        apply_bias_delta(model, tensors, metadata)
        tuned = torch.log_softmax(model(torch.tensor([prompt])).logits[0, -1], dim=-1)
    base_cpp, tuned_cpp = llama_cpp_log_probs(gguf_path), llama_cpp_log_probs(tmp_path / "qk.gguf")
    common = [token for token in tuned_cpp if token in base_cpp]
    moves = {token: ((tuned_cpp[token] - base_cpp[token]), (tuned[token] - base[token]).item()) for token in common}
    assert len(moves) >= 3
    assert max(abs(cpp - ours) for cpp, ours in moves.values()) < FOUR_BIT_TOLERANCE
    assert max(abs((tuned[token] - base[token]).item()) for token in tuned_cpp) > 2 * FOUR_BIT_TOLERANCE


def test_a_zero_delta_as_a_gguf_file_answers_as_the_original_file(real_model, tmp_path):
    from bitfit.store.gguf_export import write_gguf_with_biases

    gguf_path, _ = real_model
    model, _ = load_folder(real_model)
    names = [f"{path}.bias" for path, module in model.named_modules()
             if isinstance(module, torch.nn.Linear) and module is not model.lm_head]
    zeros = {name: torch.zeros(model.get_submodule(name.removesuffix(".bias")).out_features) for name in names}
    write_gguf_with_biases(gguf_path, tmp_path / "zero.gguf", zeros, model.config)
    questions = [row["instruction"] for row in json.loads(JSON_HELD_OUT.read_text())[:6]]
    assert llama_cpp_answers(tmp_path / "zero.gguf", questions) == llama_cpp_answers(gguf_path, questions)


def test_the_peft_adapter_of_the_json_delta_gives_the_merged_models_logits(json_run, real_model, tmp_path, capsys):
    from peft import PeftModel

    _, folder = real_model
    adapter = tmp_path / "adapter"
    status, _, err = cli(export.main, ["--bias", str(json_run), "--format", "peft", "--out", str(adapter)], capsys)
    assert status == 0, err
    tensors, metadata = load_bias_delta(str(json_run))
    merged, tokenizer = load_folder(real_model)
    merge_bias_delta(merged, tensors, metadata)  # what --format hf writes
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folder), str(adapter)).eval()
    batch = collate(tokenize_rows(ROWS[:2], tokenizer, max_len=48, template="chat")[0], pad_token_id(tokenizer))
    with torch.no_grad():
        torch.testing.assert_close(tuned(**batch).logits, merged.eval()(**batch).logits, rtol=0, atol=1e-4)
