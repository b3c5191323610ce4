"""What bitfit trains leaves bitfit: `bitfit.export --format gguf` (llama.cpp, through the xllamacpp wheel,
runs it) and `--format peft` (peft's own PeftModel loads it), on tiny models here; test_real_model.py
does the same on SmolLM2.

The tiny LLaMA's GGUF file is F32, so llama.cpp computes what transformers computes to float rounding:
its log-probabilities pin the bias tensors' names and row order exactly (4-bit arithmetic would blur them).
"""

import json

import gguf
import numpy as np
import pytest
import torch
from conftest import cli, error_lines, llama_cpp_server, save_tiny
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, Qwen2Config

from bitfit import export
from bitfit.model.added_biases import add_biases
from bitfit.model.bias_terms import select_trainable
from bitfit.model.loading import load_model_and_tokenizer
from bitfit.store.delta import apply_bias_delta, save_bias_delta
from bitfit.store.gguf_export import gguf_bias_names, permute_rows
from bitfit.store.peft_export import read_bitfit_metadata

PROBE = [5, 17, 42, 99, 3, 250]


def llama_cpp_log_probs(path: str, prompt: list[int], top: int = 10) -> dict[int, float]:
    """token id -> log-probability of the next token after prompt, the top ones, as llama.cpp computes them."""
    request = {"prompt": prompt, "max_tokens": 1, "temperature": 0, "n_probs": top}
    reply = llama_cpp_server(path).handle_completions(request)
    return {entry["id"]: entry["logprob"] for entry in reply["choices"][0]["logprobs"]["content"][0]["top_logprobs"]}


@torch.no_grad()
def bitfit_log_probs(model, prompt: list[int]) -> torch.Tensor:
    return torch.log_softmax(model.eval()(torch.tensor([prompt])).logits[0, -1].float(), dim=-1)


def delta_of(gguf_path, folder, bias_terms="all", scale=0.0, seed=0) -> str:
    """A delta of the biases --add-biases creates on the GGUF base, each set to scale x N(0, 1)."""
    model, _ = load_model_and_tokenizer(gguf_path)
    add_biases(model, bias_terms)
    names = select_trainable(model, "bitfit", bias_terms)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in names:
            param = model.get_parameter(name)
            param.copy_(scale * torch.randn(param.shape, generator=generator))
    path = folder / "bias.safetensors"
    save_bias_delta(path, model, names, base_model=gguf_path)
    return str(path)


def gguf_export(delta, out, capsys, *extra):
    return cli(export.main, ["--bias", str(delta), "--format", "gguf", "--out", str(out), *extra], capsys)


def test_the_gguf_file_is_the_base_file_with_the_biases_added(gguf_path, tmp_path, capsys):
    delta = delta_of(gguf_path, tmp_path, scale=0.5)
    out = tmp_path / "tuned.gguf"
    status, stdout, err = gguf_export(delta, out, capsys)
    assert status == 0, err
    assert f"wrote {out}" in stdout
    base, tuned = gguf.GGUFReader(gguf_path), gguf.GGUFReader(out)
    # Every metadata key and every tensor of the base, as it was.
    for name, field in base.fields.items():
        if not name.startswith("GGUF."):
            assert tuned.fields[name].contents() == field.contents(), name
    tensors = {tensor.name: tensor for tensor in tuned.tensors}
    for tensor in base.tensors:
        assert tensors[tensor.name].tensor_type == tensor.tensor_type
        assert bytes(tensors[tensor.name].data) == bytes(tensor.data), tensor.name
    # The biases, under llama.cpp's names, in F32, the query and key rows in llama.cpp's order.
    trained = load_file(delta)
    added = {name: tensor for name, tensor in tensors.items() if name not in {t.name for t in base.tensors}}
    assert len(added) == len(trained) == 2 * 7
    config = load_model_and_tokenizer(gguf_path)[0].config
    for name, gguf_name in gguf_bias_names(gguf_path, list(trained)).items():
        heads = {"attn_q": config.num_attention_heads, "attn_k": config.num_key_value_heads}.get(
            gguf_name.split(".")[-2])
        expected = trained[name] if heads is None else permute_rows(trained[name], heads)
        assert added[gguf_name].tensor_type == gguf.GGMLQuantizationType.F32
        np.testing.assert_array_equal(added[gguf_name].data, expected.numpy())


def test_llama_cpp_runs_the_tuned_model_as_bitfit_does(gguf_path, tmp_path, capsys):
    """Query and key biases large enough to reshape attention: their rotary pairing depends on the row
    order, so a bias in the wrong order would move llama.cpp's probabilities elsewhere than bitfit's."""
    delta = delta_of(gguf_path, tmp_path, bias_terms="query,key", scale=3.0)
    out = tmp_path / "tuned.gguf"
    assert gguf_export(delta, out, capsys)[0] == 0
    model, _ = load_model_and_tokenizer(gguf_path)
    before = bitfit_log_probs(model, PROBE)
    apply_bias_delta(model, load_file(delta), {"added_biases": json.dumps(list(load_file(delta)))})
    after = bitfit_log_probs(model, PROBE)
    got = llama_cpp_log_probs(out, PROBE)
    assert max(abs(value - after[token].item()) for token, value in got.items()) < 1e-3
    moved = max(abs(after[token] - before[token]).item() for token in got)
    assert moved > 0.05  # the biases changed what the model says: the comparison above had something to see
    # The same biases in Hugging Face's row order: llama.cpp then disagrees with bitfit by far more.
    unpermuted = tmp_path / "unpermuted.gguf"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("bitfit.store.gguf_export.permute_rows", lambda bias, heads: bias)
        assert gguf_export(delta, unpermuted, capsys)[0] == 0
    wrong = llama_cpp_log_probs(unpermuted, PROBE)
    assert max(abs(value - after[token].item()) for token, value in wrong.items()) > 10 * 1e-3


def test_a_zero_delta_leaves_llama_cpp_answering_exactly_as_the_base_file(gguf_path, tmp_path, capsys):
    delta = delta_of(gguf_path, tmp_path, scale=0.0)
    out = tmp_path / "zero.gguf"
    assert gguf_export(delta, out, capsys)[0] == 0
    assert llama_cpp_log_probs(out, PROBE) == llama_cpp_log_probs(gguf_path, PROBE)


@pytest.mark.parametrize("case, message", [
    ("a folder base", "--format gguf copies a GGUF base file, and the base"),
    ("out exists", "exists; choose a new file, or pass --overwrite"),
    ("out is a folder", "is a folder; it must be a file"),
    ("out is the base", "is the base file itself"),
])
def test_gguf_refusals_are_one_line_and_write_nothing(case, message, gguf_path, llama_dir, tmp_path, capsys):
    delta = delta_of(gguf_path, tmp_path)
    out, extra = tmp_path / "tuned.gguf", []
    if case == "a folder base":
        extra = ["--model", llama_dir]
    elif case == "out exists":
        out.write_bytes(b"mine")
    elif case == "out is a folder":
        out.mkdir()
    else:
        out, extra = gguf_path, ["--overwrite"]
    before = sorted(path.name for path in tmp_path.iterdir())
    status, _, err = gguf_export(delta, out, capsys, *extra)
    assert status == 2
    assert len(error_lines(err)) == 1 and message in err, err
    assert sorted(path.name for path in tmp_path.iterdir()) == before
    assert case != "out exists" or out.read_bytes() == b"mine"


def test_a_bias_llama_cpp_would_not_load_is_refused_with_the_bias_terms_that_export(gguf_path):
    with pytest.raises(Exception, match=r"llama.cpp's llama loads no bias for model.norm.bias; a delta trained with "
                                        r"--bias-terms query,key,value,attn-out,mlp-in,mlp-out exports"):
        gguf_bias_names(gguf_path, ["model.layers.0.self_attn.q_proj.bias", "model.norm.bias"])


# ------------------------------------------------------------------------------ PEFT


def peft_export(delta, out, capsys, *extra):
    return cli(export.main, ["--bias", str(delta), "--format", "peft", "--out", str(out), *extra], capsys)


@torch.no_grad()
def logits(model) -> torch.Tensor:
    return model.eval()(torch.tensor([PROBE])).logits


def trained_delta(base_dir, folder, bias_terms="all", add=False, seed=1) -> str:
    model, _ = load_model_and_tokenizer(base_dir)
    if add:
        add_biases(model, bias_terms)
    names = select_trainable(model, "bitfit", bias_terms)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in names:
            model.get_parameter(name).add_(0.3 * torch.randn(model.get_parameter(name).shape, generator=generator))
    path = folder / "bias.safetensors"
    save_bias_delta(path, model, names, base_model=base_dir)
    return str(path)


@pytest.fixture(scope="module")
def qwen2_dir(tiny_model_dir, tmp_path_factory):
    """A tiny Qwen2, whose query, key and value projections have biases of their own (not zero)."""
    folder = save_tiny(tmp_path_factory.mktemp("tiny-qwen2"), Qwen2Config, tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.normal_(0, 0.5)
    model.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("base, add", [("llama", True), ("qwen2", False)])
def test_the_peft_adapter_gives_the_merged_folders_logits(base, add, llama_dir, qwen2_dir, tmp_path, capsys):
    from peft import PeftModel

    base_dir = llama_dir if base == "llama" else qwen2_dir
    delta = trained_delta(base_dir, tmp_path, add=add)
    adapter, merged = tmp_path / "adapter", tmp_path / "merged"
    status, stdout, err = peft_export(delta, adapter, capsys)
    assert status == 0, err
    assert cli(export.main, ["--bias", delta, "--out", str(merged)], capsys)[0] == 0  # --format hf
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "BEFT" and config["base_model_name_or_path"] == base_dir
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), str(adapter))
    torch.testing.assert_close(logits(tuned), logits(AutoModelForCausalLM.from_pretrained(merged)),
                               rtol=0, atol=1e-5)
    # bitfit's record of the delta travels in the adapter file: its base's fingerprint among it.
    with safe_open(delta, "pt") as handle:
        assert read_bitfit_metadata(adapter / "adapter_model.safetensors") == handle.metadata()


def test_peft_refuses_biases_that_are_not_on_linear_layers(tiny_model_dir, tmp_path, capsys):
    delta = trained_delta(tiny_model_dir, tmp_path)  # GPT-2: Conv1D projections and LayerNorms
    status, _, err = peft_export(delta, tmp_path / "adapter", capsys)
    assert status == 2
    (line,) = error_lines(err)
    assert "BEFT adapts nn.Linear layers only" in line and "(Conv1D)" in line and "(LayerNorm)" in line, line
    assert "export --format hf" in line
    assert not (tmp_path / "adapter").exists()
