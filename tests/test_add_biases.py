"""--add-biases: BitFit on a model without biases (a tiny LLaMA), from zero biases to delta and export."""

import json

import pytest
import torch
from conftest import ROWS, prepare_for_training, save_tiny
from safetensors import safe_open
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, MistralConfig

import generate
import train
from bitfit import export
from bitfit.cli import run_main
from bitfit.config import TrainConfig
from bitfit.core.loop import train_loop
from bitfit.core.trainable import is_bias
from bitfit.data.tokenize import tokenize_rows
from bitfit.errors import InputError
from bitfit.model.added_biases import add_biases, is_added_bias
from bitfit.model.bias_terms import select_trainable
from bitfit.model.fingerprint import base_fingerprint
from bitfit.model.loading import load_model_and_tokenizer, pad_token_id
from bitfit.store.delta import apply_bias_delta, load_bias_delta, remove_bias_delta, save_bias_delta

CPU = torch.device("cpu")
PROBE = torch.tensor([[5, 17, 42, 99, 3, 250]])
PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")



def load_base(folder):
    model, _ = load_model_and_tokenizer(folder)
    return model.eval()


@torch.no_grad()
def logits(model):
    return model.eval()(PROBE).logits


def config(folder, tmp_path, **overrides):
    settings = dict(model=folder, data="unused", output_dir=str(tmp_path), warmup_ratio=0.0, add_biases=True,
                    batch_size=2, grad_accum=1, max_steps=3, lr=1e-2)
    return TrainConfig(**{**settings, **overrides})


def cli(main, argv, capsys):
    status = run_main(main, argv)
    captured = capsys.readouterr()
    return status, captured.out, captured.err


@pytest.fixture(scope="module")
def trained(llama_dir, tmp_path_factory):
    """A short --add-biases run on the tiny LLaMA: (delta path, base params, tuned model's logits, names)."""
    folder = tmp_path_factory.mktemp("run")
    model, tokenizer = load_model_and_tokenizer(llama_dir)
    base = {name: param.detach().clone() for name, param in model.named_parameters()}
    settings = config(llama_dir, folder)
    names, optimizer = prepare_for_training(model, settings, CPU)
    examples, _ = tokenize_rows(ROWS, tokenizer, max_len=64)
    train_loop(model, optimizer, examples, settings, pad_id=pad_token_id(tokenizer), device=CPU)
    save_bias_delta(folder / "bias.safetensors", model, names, base_model=llama_dir)  # as run.run calls it
    return folder / "bias.safetensors", base, logits(model), names, model


def fake_delta(folder, path, bias_terms, seed):
    """Stand in for training: added biases filled with seeded random values. Returns the tuned logits."""
    model = load_base(folder)
    names = add_biases(model, bias_terms)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in names:
            model.get_parameter(name).copy_(torch.randn(model.get_parameter(name).shape, generator=generator))
    save_bias_delta(path, model, names, base_model=folder)
    return logits(model)


# ------------------------------------------------------------------------------ training


def test_bitfit_without_the_flag_suggests_it(llama_dir, tmp_path):
    for terms in ("all", "query,mlp-in"):
        with pytest.raises(InputError, match="--add-biases") as error:
            select_trainable(load_base(llama_dir), "bitfit", terms)
        assert "\n" not in str(error.value)
    with pytest.raises(InputError, match="has no biases; .*--add-biases"):
        prepare_for_training(load_base(llama_dir), config(llama_dir, tmp_path, add_biases=False), CPU)


def test_added_biases_are_zero_and_change_no_logit(llama_dir, tmp_path):
    model = load_base(llama_dir)
    before = logits(model)
    names, _ = prepare_for_training(model, config(llama_dir, tmp_path), CPU)
    assert names == [f"model.layers.{layer}.{projection}.bias" for layer in range(2) for projection in PROJECTIONS]
    assert model.lm_head.bias is None  # the head never gets one
    for name in names:
        bias = model.get_parameter(name)
        assert is_added_bias(bias) and bias.dtype == torch.float32 and not bias.any()
    assert torch.equal(logits(model), before)


def test_groups_choose_which_linear_layers_get_biases(llama_dir, tmp_path):
    model = load_base(llama_dir)
    names, _ = prepare_for_training(model, config(llama_dir, tmp_path, bias_terms="query,mlp-in"), CPU)
    assert names == [f"model.layers.{layer}.{module}.bias" for layer in range(2)
                     for module in ("self_attn.q_proj", "mlp.gate_proj", "mlp.up_proj")]
    assert [name for name, _ in model.named_parameters() if is_bias(name)] == names


def test_bf16_weights_train_fp32_added_biases_under_autocast(llama_dir, tmp_path):
    settings = config(llama_dir, tmp_path, dtype="bf16", max_steps=1)
    model, tokenizer = load_model_and_tokenizer(llama_dir, torch.bfloat16)
    names, optimizer = prepare_for_training(model, settings, CPU)
    bias = model.get_parameter(names[0])
    assert bias.dtype == torch.float32 and model.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    examples, _ = tokenize_rows(ROWS[:2], tokenizer, max_len=64)
    train_loop(model, optimizer, examples, settings, pad_id=pad_token_id(tokenizer), device=CPU)
    assert bias.any()


def test_added_biases_train_and_every_weight_stays_bit_identical(trained):
    _, base, _, names, model = trained
    for name, param in model.named_parameters():
        if name in names:
            assert param.any(), f"{name} did not train"
        else:
            assert torch.equal(param, base[name]), f"{name} changed"


def test_delta_lists_the_added_biases_and_fingerprints_the_base_alone(trained, llama_dir):
    path, _, _, names, _ = trained
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    assert json.loads(metadata["added_biases"]) == names
    assert metadata["base_fingerprint"] == base_fingerprint(load_base(llama_dir), names)


def test_the_flag_reaches_the_config_and_full_mode_refuses_it():
    assert train.parse_args(["--add-biases"])[0].add_biases is True
    assert train.parse_args([])[0].add_biases is False
    with pytest.raises(InputError, match="--add-biases .* --mode full"):
        TrainConfig(mode="full", add_biases=True)


# ------------------------------------------------------------------------ apply and remove


def test_fresh_base_with_the_delta_gives_the_tuned_logits_and_remove_restores_it(trained, llama_dir):
    path, _, tuned_logits, _, _ = trained
    base = load_base(llama_dir)
    before, base_logits = {name: value.clone() for name, value in base.state_dict().items()}, logits(base)
    previous = apply_bias_delta(base, *load_bias_delta(str(path)))
    assert torch.equal(logits(base), tuned_logits)
    remove_bias_delta(base, previous)
    after = base.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[name], before[name]) for name in before)
    assert not any(is_bias(name) for name, _ in base.named_parameters())
    assert all(module.bias is None for module in base.modules() if isinstance(module, torch.nn.Linear))
    assert torch.equal(logits(base), base_logits)


def test_a_delta_whose_added_bias_has_no_place_is_refused(trained):
    path, _, _, _, _ = trained
    tensors, metadata = load_bias_delta(str(path))
    other = LlamaForCausalLM(LlamaConfig(vocab_size=400, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=2))
    with pytest.raises(InputError, match="has no bias-less Linear layer of 64 outputs"):
        apply_bias_delta(other, tensors, metadata, force=True)
    assert not any(is_bias(name) for name, _ in other.named_parameters())


def test_generate_serves_two_added_bias_deltas_from_one_base(llama_dir, tmp_path, capsys):
    paths = [str(tmp_path / f"{name}.safetensors") for name in ("a", "b")]
    fake_delta(llama_dir, paths[0], "all", seed=1)
    fake_delta(llama_dir, paths[1], "query", seed=2)
    status, stdout, err = cli(generate.main, ["--bias", paths[0], "--bias", paths[1], "--compare",
                                              "--max-new-tokens", "4", "--device", "cpu"], capsys)
    assert status == 0, err
    assert stdout.count("### ") == 4  # the prompt, the base, two deltas


# --------------------------------------------------------------------------------- export


@pytest.mark.parametrize("bias_terms, attention_bias, mlp_bias", [("all", True, True), ("query", True, False),
                                                                  ("mlp-out", False, True)])
def test_export_switches_on_the_config_flags_and_gives_the_tuned_logits(llama_dir, tmp_path, capsys, bias_terms,
                                                                        attention_bias, mlp_bias):
    path = tmp_path / "bias.safetensors"
    tuned_logits = fake_delta(llama_dir, path, bias_terms, seed=3)
    out = tmp_path / "merged"
    status, _, err = cli(export.main, ["--bias", str(path), "--out", str(out)], capsys)
    assert status == 0, err
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    assert (merged.config.attention_bias, merged.config.mlp_bias) == (attention_bias, mlp_bias)
    torch.testing.assert_close(logits(merged), tuned_logits, rtol=0, atol=0)
    tensors, _ = load_bias_delta(str(path))
    state = merged.state_dict()
    for name, value in state.items():  # the trained biases as trained, the others the flag made zero
        if is_bias(name):
            assert torch.equal(value, tensors[name]) if name in tensors else not value.any(), name


def test_export_refuses_an_architecture_that_cannot_hold_the_added_biases(tiny_model_dir, tmp_path, capsys):
    mistral = save_tiny(tmp_path / "mistral", MistralConfig, tiny_model_dir)  # no attention_bias or mlp_bias
    path = tmp_path / "bias.safetensors"
    fake_delta(mistral, path, "query", seed=4)
    out = tmp_path / "merged"
    status, _, err = cli(export.main, ["--bias", str(path), "--out", str(out)], capsys)
    assert status == 2
    assert err.count("\n") == 1 and "MistralForCausalLM cannot hold the biases" in err and "generate.py" in err
    assert not out.exists()
