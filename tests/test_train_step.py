"""train_step, line by line: each thing it does has a test here or in test_training.py that fails
without it (the token-weighted normaliser: test_accumulation_is_token_weighted; the step itself:
test_training_changes_every_bias_and_leaves_every_weight_bit_identical)."""

import pytest
import torch
import torch.distributed as dist
from conftest import ROWS
from test_training import reference_gradient

from bitfit.core.examples import collate
from bitfit.core.loss import label_token_count
from bitfit.core.step import train_step
from bitfit.core.trainable import is_bias, trainable_parameters
from bitfit.data.tokenize import tokenize_rows
from bitfit.model.bias_terms import select_trainable
from bitfit.model.loading import load_model_and_tokenizer, pad_token_id

CPU = torch.device("cpu")
NO_CLIPPING = 1e9


def one_window(tiny_model_dir):
    """A BitFit model, plain SGD over its biases at lr 1 (the update is then the gradient), and a
    window of two micro-batches of four examples."""
    model, tokenizer = load_model_and_tokenizer(tiny_model_dir)
    select_trainable(model, "bitfit")
    examples, _ = tokenize_rows(ROWS[:8], tokenizer, max_len=64)
    window = [collate(examples[start:start + 4], pad_token_id(tokenizer)) for start in (0, 4)]
    label_tokens = sum(label_token_count(batch["labels"]) for batch in window)
    optimizer = torch.optim.SGD(trainable_parameters(model).values(), lr=1.0)
    return model, optimizer, window, label_tokens, examples


def biases_of(model) -> dict[str, torch.Tensor]:
    return {name: param.detach().clone() for name, param in trainable_parameters(model).items()}


def test_clipping_scales_the_whole_gradient_down_to_max_grad_norm(tiny_model_dir):
    model, optimizer, window, label_tokens, examples = one_window(tiny_model_dir)
    reference = reference_gradient(tiny_model_dir, examples)
    norm = torch.linalg.vector_norm(torch.cat([grad.flatten() for grad in reference.values()])).item()
    before = biases_of(model)
    _, grad_norm = train_step(model, optimizer, window, label_tokens, max_grad_norm=norm / 4, device=CPU)
    assert grad_norm == pytest.approx(norm, rel=1e-4)  # the norm before clipping is what gets logged
    for name, param in trainable_parameters(model).items():
        torch.testing.assert_close(before[name] - param.detach(), reference[name] / 4, rtol=1e-4, atol=1e-7)


def test_each_step_starts_from_zero_gradients(tiny_model_dir):
    model, optimizer, window, label_tokens, examples = one_window(tiny_model_dir)
    optimizer.param_groups[0]["lr"] = 0.0  # a step that moves nothing: only its gradient could stay
    train_step(model, optimizer, window, label_tokens, max_grad_norm=NO_CLIPPING, device=CPU)
    optimizer.param_groups[0]["lr"] = 1.0
    before = biases_of(model)
    train_step(model, optimizer, window, label_tokens, max_grad_norm=NO_CLIPPING, device=CPU)
    reference = reference_gradient(tiny_model_dir, examples)
    for name, param in trainable_parameters(model).items():  # this window's gradient, not twice it
        torch.testing.assert_close(before[name] - param.detach(), reference[name], rtol=1e-4, atol=1e-6)


def test_a_step_puts_gradients_on_the_biases_only_even_under_torchrun(tiny_model_dir, tmp_path):
    """BitFit's memory saving: no weight moves, and none is left holding a gradient, also when
    the gradient sum over processes runs (a one-process gloo group runs the same code as many)."""
    model, optimizer, window, label_tokens, _ = one_window(tiny_model_dir)
    weights = {name: param.detach().clone() for name, param in model.named_parameters() if not is_bias(name)}
    biases = biases_of(model)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        train_step(model, optimizer, window, label_tokens, max_grad_norm=NO_CLIPPING, device=CPU)
    finally:
        dist.destroy_process_group()
    for name, param in model.named_parameters():
        assert param.grad is None, f"{name} still holds a gradient"
        if is_bias(name):
            assert not torch.equal(param, biases[name]), f"{name} did not move"
        else:
            assert torch.equal(param, weights[name]), f"{name} moved"


def test_fp16_clips_and_logs_the_true_gradient_not_the_scaled_one(tiny_model_dir):
    """Under fp16 the loss is scaled up (65,536 times to start with) before backward; the gradient
    must be scaled back down before it is measured and clipped."""
    model, optimizer, window, label_tokens, examples = one_window(tiny_model_dir)
    reference = reference_gradient(tiny_model_dir, examples)
    norm = torch.linalg.vector_norm(torch.cat([grad.flatten() for grad in reference.values()])).item()
    before = biases_of(model)
    scaler = torch.amp.GradScaler("cpu")
    _, grad_norm = train_step(model, optimizer, window, label_tokens, max_grad_norm=norm / 4, device=CPU,
                              dtype="fp16", scaler=scaler)
    assert grad_norm == pytest.approx(norm, rel=0.02)  # fp16 matmuls: a few digits
    for name, param in trainable_parameters(model).items():
        torch.testing.assert_close(before[name] - param.detach(), reference[name] / 4, rtol=0.05, atol=2e-4)
