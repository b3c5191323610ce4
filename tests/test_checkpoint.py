"""Bias deltas: they hold only the trained tensors, reload onto the base, and are written atomically."""

import pytest
import torch
from conftest import ROWS
from safetensors.torch import load_file

from bitfit.config import TrainConfig
from bitfit.core.loop import train_loop
from bitfit.core.trainable import build_optimizer, is_bias
from bitfit.data.tokenize import tokenize_rows
from bitfit.errors import InputError
from bitfit.model.bias_terms import select_trainable
from bitfit.model.loading import load_model_and_tokenizer, pad_token_id
from bitfit.store.delta import apply_bias_delta, load_bias_delta, save_bias_delta
from bitfit.store.files import atomic_write, save_json

PROBE = torch.tensor([[5, 17, 42, 99, 3, 250]])


def test_saved_delta_reproduces_the_tuned_logits_on_a_fresh_base(tiny_model_dir, tmp_path):
    model, tokenizer = load_model_and_tokenizer(tiny_model_dir)
    names = select_trainable(model, "bitfit")
    examples, _ = tokenize_rows(ROWS, tokenizer, max_len=64)
    cfg = TrainConfig(model=tiny_model_dir, data="unused", output_dir=str(tmp_path), max_steps=3,
                      batch_size=2, grad_accum=2)
    train_loop(model, build_optimizer(model, cfg), examples, cfg, pad_id=pad_token_id(tokenizer),
               device=torch.device("cpu"))
    model.eval()
    tuned_logits = model(PROBE).logits
    save_bias_delta(tmp_path / "bias.safetensors", model, names, base_model=tiny_model_dir)

    base, _ = load_model_and_tokenizer(tiny_model_dir)
    base.eval()
    base_logits = base(PROBE).logits
    tensors, metadata = load_bias_delta(str(tmp_path))  # a run folder works as well as the file
    apply_bias_delta(base, tensors)
    assert not torch.equal(base_logits, tuned_logits)
    assert torch.equal(base(PROBE).logits, tuned_logits)
    assert metadata["base_model"] == tiny_model_dir
    assert set(tensors) == {name for name, _ in model.named_parameters() if is_bias(name)}


def test_delta_file_holds_only_biases_under_state_dict_names(tiny_model_dir, tmp_path):
    model, _ = load_model_and_tokenizer(tiny_model_dir)
    names = select_trainable(model, "bitfit")
    save_bias_delta(tmp_path / "bias.safetensors", model, names, base_model="x")
    stored = load_file(tmp_path / "bias.safetensors")
    state = model.state_dict()
    assert set(stored) == set(names) and all(is_bias(name) for name in stored)
    for name, tensor in stored.items():
        assert torch.equal(tensor, state[name])


def test_delta_for_another_shape_is_refused(tiny_model_dir, tmp_path):
    model, _ = load_model_and_tokenizer(tiny_model_dir)
    with pytest.raises(InputError, match="shape"):
        apply_bias_delta(model, {"transformer.h.0.attn.c_attn.bias": torch.zeros(7)})
    with pytest.raises(InputError, match="does not have"):
        apply_bias_delta(model, {"transformer.h.9.attn.c_attn.bias": torch.zeros(7)})


def test_a_file_that_is_not_safetensors_is_refused(tmp_path):
    (tmp_path / "bias.safetensors").write_text("not a safetensors file")
    with pytest.raises(InputError, match="not a readable safetensors file"):
        load_bias_delta(str(tmp_path / "bias.safetensors"))


def test_failed_write_leaves_the_old_file_intact(tmp_path):
    target = tmp_path / "summary.json"
    save_json(target, {"run": 1})

    def crash_halfway(temporary):
        temporary.write_text('{"run": 2, "trunc')
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(target, crash_halfway)
    assert target.read_text() == '{\n  "run": 1\n}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]
