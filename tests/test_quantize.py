"""--quantize nf4: a 4-bit frozen base under BitFit (tiny GPT-2 with Conv1D layers, tiny LLaMA)."""

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, ROWS, cli, prepare_for_training
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaConfig
from transformers.pytorch_utils import Conv1D

import generate
import train
from bitfit import bench, export
from bitfit.config import TrainConfig
from bitfit.core.loop import train_loop
from bitfit.core.trainable import is_bias
from bitfit.data.tokenize import tokenize_rows
from bitfit.errors import InputError, Interrupted
from bitfit.model.added_biases import is_added_bias
from bitfit.model.fingerprint import base_fingerprint
from bitfit.model.loading import load_model_and_tokenizer, pad_token_id
from bitfit.model.quantize import NF4_BLOCK, NF4Linear, quantize_frozen_weights, scale_group
from bitfit.store.checkpoint import load_training_state
from bitfit.store.delta import apply_bias_delta, check_bias_delta, load_bias_delta, save_bias_delta
from bitfit.store.metrics import MetricsLog, weight_bytes
from bitfit.training.run import run

CPU = torch.device("cpu")
PROBE = torch.tensor([[5, 17, 42, 99, 3, 250]])
NF4_PARTS = ("quantized_data", "quantized_scalers", "quantization_factor", "scaler_mean", "nf4")
# NF4 keeps 16 levels per 64-weight block: a Gaussian weight comes back with ~9% relative RMS error
# (measured: 9.2%). Through two layers the tiny models' logits move 3.4% (GPT-2) and 7.1% (LLaMA).
WEIGHT_RTOL, LOGITS_RTOL = 0.12, 0.10


def load_base(folder, quantize=False):
    model, _ = load_model_and_tokenizer(folder)
    if quantize:
        quantize_frozen_weights(model, CPU)
    return model.eval()


@torch.no_grad()
def logits(model):
    return model.eval()(PROBE).logits


def relative_error(got, expected):
    return float((got - expected).detach().norm() / expected.detach().norm())


def settings(folder, output_dir, **overrides):
    return TrainConfig(**{**dict(model=folder, data="unused", output_dir=str(output_dir), warmup_ratio=0.0,
                                 batch_size=2, grad_accum=1, max_steps=3, lr=1e-2, quantize="nf4"), **overrides})


def train_tiny(folder, output_dir, **overrides):
    """A short nf4 run, as bitfit.run does it: (model, names of the trained biases, what every other
    parameter stored before training, the delta's path)."""
    model, tokenizer = load_model_and_tokenizer(folder)
    config = settings(folder, output_dir, **overrides)
    names, optimizer = prepare_for_training(model, config, CPU)
    before = {name: snapshot(param) for name, param in model.named_parameters() if name not in names}
    examples, _ = tokenize_rows(ROWS, tokenizer, max_len=64)
    train_loop(model, optimizer, examples, config, pad_id=pad_token_id(tokenizer), device=CPU)
    path = output_dir / "bias.safetensors"
    save_bias_delta(path, model, names, base_model=folder, quantized_base="nf4")
    return model, names, before, path


def snapshot(param):
    """A copy of what a parameter stores: the codes, scales and constants of an NF4 weight."""
    if isinstance(param, torch.Tensor) and hasattr(param, "quantized_data"):
        return {part: getattr(param, part).clone() for part in NF4_PARTS}
    return param.detach().clone()


def same(a, b):
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(torch.equal(a[part], b[part]) for part in a)
    return torch.equal(a, b)


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory):
    return train_tiny(tiny_model_dir, tmp_path_factory.mktemp("nf4-run"))


# ------------------------------------------------------------------------------ the 4-bit layers


def test_every_linear_but_the_head_is_held_in_4_bits_under_its_own_names(tiny_model_dir):
    plain, quantized = load_base(tiny_model_dir), load_base(tiny_model_dir, quantize=True)
    assert [name for name, _ in quantized.named_parameters()] == [name for name, _ in plain.named_parameters()]
    layers = {path for path, module in plain.named_modules() if isinstance(module, Conv1D)}
    assert layers and {path for path, module in quantized.named_modules() if isinstance(module, NF4Linear)} == layers
    for path in layers:
        nf4, conv = quantized.get_submodule(path), plain.get_submodule(path)
        assert nf4.weight.shape == conv.weight.t().shape and not nf4.weight.requires_grad
        assert nf4.bias.dtype == torch.float32 and torch.equal(nf4.bias, conv.bias)
    assert quantized.lm_head.weight.dtype == torch.float32  # the head (tied to the embedding) keeps --dtype


def test_the_4_bit_model_computes_with_its_dequantized_weights(tiny_model_dir):
    """Exact against a plain reference: the plain model given each NF4 weight's dequantized values."""
    quantized, reference = load_base(tiny_model_dir, quantize=True), load_base(tiny_model_dir)
    with torch.no_grad():
        for path, module in quantized.named_modules():
            if isinstance(module, NF4Linear):
                reference.get_submodule(path).weight.copy_(module.weight.get_original_weight().t())
    torch.testing.assert_close(logits(quantized), logits(reference), rtol=1e-5, atol=1e-6)


def test_a_large_weight_dequantized_in_pieces_computes_the_same(monkeypatch):
    from bitfit.model import quantize

    torch.manual_seed(0)
    plain = torch.nn.Linear(256, 512)  # 2048 blocks of 64, 8 groups of 256 scales
    layer = NF4Linear(quantize.import_to_nf4()(plain.weight.detach(), NF4_BLOCK, 256), plain.bias, None)
    x, upstream = torch.randn(3, 5, 256, requires_grad=True), torch.randn(3, 5, 512)
    results = []
    for piece in (quantize.DEQUANTIZE_PIECE, 2**14):
        monkeypatch.setattr(quantize, "DEQUANTIZE_PIECE", piece)
        x.grad = plain.bias.grad = None
        out = layer(x)
        out.backward(upstream)
        results.append((quantize.piece_rows(layer.weight), out.detach(), x.grad, plain.bias.grad))
    (whole, *expected), (rows, *got) = results
    assert (whole, rows) == (512, 64)  # 8 pieces of 64 rows, each 2**14 weights
    for got_tensor, expected_tensor in zip(got, expected):
        torch.testing.assert_close(got_tensor, expected_tensor, rtol=1e-5, atol=1e-6)


def test_under_bf16_autocast_a_4_bit_layer_computes_like_a_plain_one():
    """As BitFit runs with --dtype bf16: bf16 weights, an fp32 bias, fp32 input (a norm's output)."""
    from bitfit.model import quantize

    torch.manual_seed(0)
    plain = torch.nn.Linear(256, 128).to(torch.bfloat16)
    plain.bias = torch.nn.Parameter(plain.bias.float())
    nf4 = quantize.import_to_nf4()(plain.weight.detach(), NF4_BLOCK, 64)
    layer = NF4Linear(nf4, plain.bias, None)
    with torch.no_grad():
        plain.weight.copy_(nf4.get_original_weight())
    x = torch.randn(4, 256)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, expected = layer(x), plain(x)
    assert got.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(got, expected, rtol=1e-2, atol=1e-2)  # mm then add vs addmm: bf16 rounding
    got.float().sum().backward()
    assert plain.bias.grad.dtype == torch.float32
    torch.testing.assert_close(plain.bias.grad, torch.full((128,), 4.0))


@pytest.mark.parametrize("folder", ["tiny_model_dir", "llama_dir"])
def test_quantized_logits_are_close_to_the_unquantized_ones(folder, request):
    folder = request.getfixturevalue(folder)
    plain, quantized = load_base(folder), load_base(folder, quantize=True)
    for path, module in quantized.named_modules():
        if isinstance(module, NF4Linear):
            original = plain.get_submodule(path).weight
            original = original.t() if isinstance(plain.get_submodule(path), Conv1D) else original
            assert relative_error(module.weight.get_original_weight(), original) < WEIGHT_RTOL, path
    assert relative_error(logits(quantized), logits(plain)) < LOGITS_RTOL


@pytest.mark.parametrize("shape, group", [((576, 576), 216), ((192, 576), 216), ((1536, 576), 256),
                                          ((1536, 1536), 256), ((96, 32), 48)])
def test_scale_groups_fit_every_shape(shape, group):
    """SmolLM2-135M's 576 x 576 and 192 x 576 projections have no whole groups of 256 block scales."""
    from bitfit.model.quantize import import_to_nf4

    blocks = shape[0] * shape[1] // NF4_BLOCK
    assert scale_group(blocks) == group and blocks % group == 0
    nf4 = import_to_nf4()(torch.empty(shape, device="meta"), NF4_BLOCK, group)
    assert nf4.quantized_scalers.numel() == blocks


def test_every_smollm2_135m_weight_quantizes_and_weight_bytes_counts_the_nf4_storage():
    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    plain_bytes = weight_bytes(model)
    assert quantize_frozen_weights(model, torch.device("meta")) == []
    layers = [module for module in model.modules() if isinstance(module, NF4Linear)]
    assert len(layers) == 30 * 7
    # Worked out from NF4's layout: 4 bits a weight, an int8 scale per 64-weight block, a bf16
    # constant per group of scales, a bf16 mean and the 16-entry bf16 code table per tensor.
    nf4_bytes = sum(n // 2 + n // 64 + 2 * (n // 64 // scale_group(n // 64)) + 2 + 32
                    for n in (layer.weight.numel() for layer in layers))
    held_as_before = plain_bytes - sum(2 * layer.weight.numel() for layer in layers)
    assert weight_bytes(model) == held_as_before + nf4_bytes


# ------------------------------------------------------------------------------ training


def test_gradients_reach_every_bias_through_the_quantized_layers(tiny_model_dir, tmp_path):
    model, tokenizer = load_model_and_tokenizer(tiny_model_dir)
    names, _ = prepare_for_training(model, settings(tiny_model_dir, tmp_path), CPU)
    assert names == [name for name, _ in model.named_parameters() if is_bias(name)]
    input_ids = torch.tensor([tokenizer("Human: Name three primary colors.")["input_ids"]])
    model(input_ids=input_ids, labels=input_ids).loss.backward()
    for name, param in model.named_parameters():
        if name in names:
            assert param.grad is not None and param.grad.any(), name
        else:
            assert param.grad is None, name


def test_training_moves_every_bias_and_leaves_every_weight_bit_identical(trained, tiny_model_dir):
    model, names, before, _ = trained
    for name, param in model.named_parameters():
        if name in names:
            assert param.dtype == torch.float32 and param.requires_grad
        else:
            assert same(snapshot(param), before[name]), f"{name} changed"
    base = load_base(tiny_model_dir)
    moved = [name for name in names if not torch.equal(model.get_parameter(name), base.get_parameter(name))]
    assert moved == names


def test_only_the_chosen_slice_of_a_fused_bias_trains_on_the_4_bit_base(tiny_model_dir, tmp_path):
    model, names, _, _ = train_tiny(tiny_model_dir, tmp_path, bias_terms="query", max_steps=2)
    base = load_base(tiny_model_dir)
    for name in names:  # GPT-2's c_attn bias is [q | k | v]: only its first third moves
        tuned, original = model.get_parameter(name), base.get_parameter(name)
        third = tuned.numel() // 3
        assert not torch.equal(tuned[:third], original[:third]) and torch.equal(tuned[third:], original[third:])


def test_gradient_checkpointing_trains_the_same_biases(tiny_model_dir, trained, tmp_path):
    model, names, _, _ = trained
    checkpointed, _, _, _ = train_tiny(tiny_model_dir, tmp_path, grad_checkpointing=True)
    for name in names:
        torch.testing.assert_close(checkpointed.get_parameter(name), model.get_parameter(name), rtol=1e-5, atol=1e-6)


def test_add_biases_on_a_4_bit_llama(llama_dir, tmp_path):
    model, names, before, path = train_tiny(llama_dir, tmp_path, add_biases=True)
    assert len(names) == 2 * 7 and all(is_added_bias(model.get_parameter(name)) for name in names)
    assert all(model.get_parameter(name).any() for name in names)
    assert all(same(snapshot(param), before[name]) for name, param in model.named_parameters() if name not in names)
    tensors, metadata = load_bias_delta(str(path))
    assert json.loads(metadata["added_biases"]) == names and metadata["quantized_base"] == "nf4"
    for quantize in (False, True):  # the delta fits the plain LLaMA and the 4-bit one
        base = load_base(llama_dir, quantize)
        apply_bias_delta(base, tensors, metadata)
        assert all(torch.equal(base.get_parameter(name), tensors[name]) for name in names)
    torch.testing.assert_close(logits(base), logits(model), rtol=0, atol=0)


def test_a_resumed_4_bit_run_matches_a_straight_one(tiny_model_dir, alpaca_file, tmp_path, monkeypatch):
    def config(folder):
        return TrainConfig(model=tiny_model_dir, data=alpaca_file, output_dir=str(folder), batch_size=2,
                           grad_accum=2, max_steps=3, log_every=1, eval_size=2, quantize="nf4")

    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    summary = run(config(straight), log=lambda message: None)
    assert summary["quantize"] == "nf4" and summary["eval_loss_after"] < summary["eval_loss_before"]
    write = MetricsLog.write

    def ctrl_c_after_step_one(self, record):
        write(self, record)
        if record["step"] == 1 and "loss" in record:
            signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(MetricsLog, "write", ctrl_c_after_step_one)
    with pytest.raises(Interrupted):
        run(config(stopped), log=lambda message: None)
    monkeypatch.setattr(MetricsLog, "write", write)
    run(config(stopped), load_training_state(str(stopped)), log=lambda message: None)
    expected, resumed = load_file(straight / "bias.safetensors"), load_file(stopped / "bias.safetensors")
    for name, tensor in expected.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------ deltas


@pytest.mark.parametrize("folder", ["tiny_model_dir", "llama_dir"])
def test_the_fingerprint_of_a_4_bit_base_is_the_unquantized_ones(folder, request):
    folder = request.getfixturevalue(folder)
    plain, quantized = load_base(folder), load_base(folder, quantize=True)
    biases = [name for name, _ in plain.named_parameters() if is_bias(name)]
    assert base_fingerprint(quantized, biases) == base_fingerprint(plain, biases)
    with torch.no_grad():  # and it still tells another base apart
        next(layer for layer in plain.modules() if isinstance(layer, (Conv1D, torch.nn.Linear))).weight[0, 0] += 1
    assert base_fingerprint(quantized, biases) != base_fingerprint(plain, biases)


def test_a_delta_trained_on_the_4_bit_base_applies_to_either_base(trained, tiny_model_dir):
    model, names, _, path = trained
    tensors, metadata = load_bias_delta(str(path))
    assert metadata["quantized_base"] == "nf4" and sorted(tensors) == sorted(names)
    on_4_bits = load_base(tiny_model_dir, quantize=True)
    apply_bias_delta(on_4_bits, tensors, metadata)
    torch.testing.assert_close(logits(on_4_bits), logits(model), rtol=0, atol=0)  # the trained model exactly
    plain = load_base(tiny_model_dir)
    check_bias_delta(plain, tensors, metadata)  # the fingerprint matches: no --force needed
    apply_bias_delta(plain, tensors, metadata)
    assert relative_error(logits(plain), logits(model)) < LOGITS_RTOL


def test_generate_and_export_take_a_4_bit_delta(trained, tiny_model_dir, tmp_path, capsys):
    model, _, _, path = trained
    for extra in ([], ["--quantize", "nf4"]):
        status, out, err = cli(generate.main, ["--bias", str(path), "--compare", "--max-new-tokens", "3",
                                               "--device", "cpu", *extra], capsys)
        assert status == 0 and out.count("### ") == 3, err
        assert ("Base model (" + tiny_model_dir + (", nf4)" if extra else ")")) in out
    out_dir = tmp_path / "merged"
    status, _, err = cli(export.main, ["--bias", str(path), "--out", str(out_dir)], capsys)
    assert status == 0, err
    merged = AutoModelForCausalLM.from_pretrained(out_dir)
    assert relative_error(logits(merged), logits(model)) < LOGITS_RTOL


# ------------------------------------------------------------------------------ flags and output


def test_full_mode_refuses_quantize_in_one_line(tiny_model_dir, tmp_path, capsys):
    with pytest.raises(InputError, match="quantized weights cannot be trained"):
        TrainConfig(mode="full", quantize="nf4")
    status, _, err = cli(train.main, ["--mode", "full", "--quantize", "nf4", "--model", tiny_model_dir,
                                      "--output-dir", str(tmp_path / "run")], capsys)
    assert status == 2 and err.count("\n") == 1 and not (tmp_path / "run").exists()
    assert train.parse_args(["--quantize", "nf4"])[0].quantize == "nf4"
    assert train.parse_args([])[0].quantize is None


def test_the_summary_reports_quantize_and_weight_bytes_for_every_run(tiny_model_dir, alpaca_file, tmp_path):
    summaries = {}
    for quantize in (None, "nf4"):
        config = TrainConfig(model=tiny_model_dir, data=alpaca_file, output_dir=str(tmp_path / str(quantize)),
                             max_steps=1, grad_accum=1, quantize=quantize)
        summaries[quantize] = run(config, log=lambda message: None)
    assert summaries[None]["quantize"] is None and summaries["nf4"]["quantize"] == "nf4"
    assert summaries[None]["weight_bytes"] == weight_bytes(load_base(tiny_model_dir))
    assert summaries[None]["weight_bytes"] > summaries["nf4"]["weight_bytes"] > 0
    with safe_open(str(tmp_path / "None" / "bias.safetensors"), framework="pt") as handle:
        assert "quantized_base" not in handle.metadata()


def test_the_scripts_keep_torchaos_import_noise_off_the_screen(tiny_model_dir, tmp_path):
    command = [sys.executable, str(ROOT / "generate.py"), "--model", tiny_model_dir, "--quantize", "nf4",
               "--max-new-tokens", "1", "--device", "cpu"]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0 and "### Base model" in done.stdout, done.stderr
    assert "Failed to load" not in done.stderr and "pytree" not in done.stderr, done.stderr


def test_bench_adds_a_4_bit_bitfit_row_beside_each_bitfit_row(monkeypatch, capsys):
    monkeypatch.setattr(sys, "executable", shutil.which("false"))  # every worker fails: the rows alone
    status, out, _ = cli(bench.main, ["--arch", "tiny", "--rows", "4", "--batch-sizes", "1,2", "--dtypes", "fp32",
                                      "--device", "cpu", "--quantize", "nf4"], capsys)
    assert status == 0
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert [(r["micro_batch"], r["mode"], r["quantize"]) for r in rows] == [
        (1, "bitfit", None), (1, "bitfit", "nf4"), (1, "full", None),
        (2, "bitfit", None), (2, "bitfit", "nf4"), (2, "full", None)]
    assert "| bitfit nf4 | fp32 | 1 |" in out
