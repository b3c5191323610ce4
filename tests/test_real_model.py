"""SmolLM2-135M-Instruct, the real pretrained model (python -m bitfit.fetch smollm2-135m-instruct).

Kept short (135M parameters on two CPU cores): one load of the GGUF file, a forward, one optimizer
step, a few generated tokens. The converted folder stands in for the file where speed matters;
the first test shows the two are the same model.
"""

import pytest
import torch
from conftest import ROWS, cli, prepare_for_training
from transformers import AutoModelForCausalLM, AutoTokenizer

import generate
import train
from bitfit import export
from bitfit.config import TrainConfig
from bitfit.core.examples import collate
from bitfit.core.loop import train_loop
from bitfit.data.tokenize import tokenize_rows
from bitfit.model.fingerprint import base_fingerprint
from bitfit.model.generation import generate_answers
from bitfit.model.loading import load_model_and_tokenizer, pad_token_id
from bitfit.store.delta import apply_bias_delta, load_bias_delta

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
