"""BitFit's core promises: only biases train, the optimizer sees only biases, and the loss
over an accumulation window is weighted by tokens."""

import pytest
import torch
import torch.nn.functional as F
from conftest import ROWS

from bitfit.config import TrainConfig
from bitfit.core.examples import IGNORE_INDEX
from bitfit.core.loop import learning_rate, train_loop
from bitfit.core.trainable import build_optimizer, count_parameters, is_bias, trainable_parameters
from bitfit.data.tokenize import tokenize_rows
from bitfit.errors import InputError
from bitfit.model.bias_terms import select_trainable
from bitfit.model.loading import load_model_and_tokenizer, pad_token_id

CPU = torch.device("cpu")


def load_tiny(tiny_model_dir, mode="bitfit"):
    model, tokenizer = load_model_and_tokenizer(tiny_model_dir)
    select_trainable(model, mode)
    return model, tokenizer


def config(tmp_path, **overrides):
    settings = dict(model="unused", data="unused", output_dir=str(tmp_path), warmup_ratio=0.0)
    return TrainConfig(**{**settings, **overrides})


def test_bitfit_matches_the_seed_count_for_the_bloomz_1b1_shape():
    from transformers import AutoModelForCausalLM, BloomConfig

    with torch.device("meta"):  # shapes only: no memory, no download
        model = AutoModelForCausalLM.from_config(
            BloomConfig(vocab_size=250880, hidden_size=1536, n_layer=24, n_head=16))
    select_trainable(model, "bitfit")
    assert count_parameters(model) == (408_576, 1_065_314_304)


def test_only_biases_receive_gradients(tiny_model_dir):
    model, tokenizer = load_tiny(tiny_model_dir)
    ids = torch.tensor([[1, 2, 3, 4]])
    model(input_ids=ids, labels=ids).loss.backward()
    for name, param in model.named_parameters():
        assert (param.grad is not None) == is_bias(name), name


def test_optimizer_holds_exactly_the_bias_parameters(tiny_model_dir, tmp_path):
    model, _ = load_tiny(tiny_model_dir)
    optimizer = build_optimizer(model, config(tmp_path))
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    biases = {id(p) for name, p in model.named_parameters() if is_bias(name)}
    assert in_optimizer == biases and len(biases) > 0


def test_training_changes_every_bias_and_leaves_every_weight_bit_identical(tiny_model_dir, tmp_path):
    model, tokenizer = load_tiny(tiny_model_dir)
    before = {name: param.detach().clone() for name, param in model.named_parameters()}
    examples, _ = tokenize_rows(ROWS, tokenizer, max_len=64)
    cfg = config(tmp_path, batch_size=2, grad_accum=2, max_steps=2)
    train_loop(model, build_optimizer(model, cfg), examples, cfg, pad_id=pad_token_id(tokenizer), device=CPU)
    for name, param in model.named_parameters():
        if is_bias(name):
            assert not torch.equal(param, before[name]), f"{name} did not train"
        else:
            assert torch.equal(param, before[name]), f"{name} changed"


def test_full_mode_trains_weights_too(tiny_model_dir, tmp_path):
    model, tokenizer = load_tiny(tiny_model_dir, mode="full")
    weight = model.transformer.h[0].mlp.c_fc.weight.detach().clone()
    examples, _ = tokenize_rows(ROWS, tokenizer, max_len=64)
    cfg = config(tmp_path, mode="full", max_steps=1)
    train_loop(model, build_optimizer(model, cfg), examples, cfg, pad_id=pad_token_id(tokenizer), device=CPU)
    assert count_parameters(model)[0] == count_parameters(model)[1]
    assert not torch.equal(model.transformer.h[0].mlp.c_fc.weight, weight)


def sgd_update(tiny_model_dir, tmp_path, examples, batch_size, grad_accum):
    """One optimizer step with plain SGD at lr 1 and no clipping: the update is the gradient."""
    model, tokenizer = load_tiny(tiny_model_dir)
    before = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    cfg = config(tmp_path, batch_size=batch_size, grad_accum=grad_accum, max_steps=1, lr=1.0,
                 max_grad_norm=1e9)
    optimizer = torch.optim.SGD(trainable_parameters(model).values(), lr=1.0)
    train_loop(model, optimizer, examples, cfg, pad_id=pad_token_id(tokenizer), device=CPU)
    return {name: before[name] - p.detach() for name, p in model.named_parameters() if p.requires_grad}


def reference_gradient(tiny_model_dir, examples):
    """The gradient of the mean loss over every label token of the 8 examples, one at a time."""
    model, _ = load_tiny(tiny_model_dir)
    losses, tokens = [], 0
    for example in examples:
        ids, labels = torch.tensor([example["input_ids"]]), torch.tensor(example["labels"][1:])
        logits = model(input_ids=ids).logits[0, :-1]
        losses.append(F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum"))
        tokens += int((labels != IGNORE_INDEX).sum())
    (sum(losses) / tokens).backward()
    return {name: p.grad for name, p in model.named_parameters() if p.requires_grad}


def test_accumulation_is_token_weighted(tiny_model_dir, tmp_path):
    _, tokenizer = load_tiny(tiny_model_dir)
    examples, _ = tokenize_rows(ROWS[:8], tokenizer, max_len=64)
    assert len({sum(l != IGNORE_INDEX for l in e["labels"]) for e in examples}) > 1  # lengths differ
    one_by_eight = sgd_update(tiny_model_dir, tmp_path, examples, batch_size=1, grad_accum=8)
    eight_by_one = sgd_update(tiny_model_dir, tmp_path, examples, batch_size=8, grad_accum=1)
    four_by_two = sgd_update(tiny_model_dir, tmp_path, examples, batch_size=4, grad_accum=2)
    reference = reference_gradient(tiny_model_dir, examples)
    for name, expected in reference.items():
        torch.testing.assert_close(one_by_eight[name], expected, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(eight_by_one[name], expected, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(four_by_two[name], expected, rtol=1e-4, atol=1e-6)


def test_learning_rate_warms_up_then_decays_linearly():
    rates = [learning_rate(step, total_steps=10, warmup_steps=2, peak_lr=1.0) for step in range(10)]
    assert rates[:3] == [0.5, 1.0, 1.0]
    assert rates[2:] == pytest.approx([(10 - s) / 8 for s in range(2, 10)])
    assert all(rate > 0 for rate in rates)


@pytest.mark.parametrize("flag, value", [("batch_size", 0), ("grad_accum", -1), ("max_len", 0),
                                         ("lr", 0.0), ("lr", float("nan")), ("mode", "lora")])
def test_config_rejects_out_of_range_values(flag, value):
    with pytest.raises(InputError, match=f"--{flag.replace('_', '-')}"):
        TrainConfig(**{flag: value})
