"""The speed and memory features must not change what is computed (beyond float rounding)."""

import weakref

import pytest
import torch
from conftest import ROWS, prepare_for_training
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import bitfit.model.label_loss
from bitfit.config import TrainConfig
from bitfit.core.examples import collate, optimizer_windows
from bitfit.core.loop import train_loop
from bitfit.core.loss import label_token_count, loss_sum_from_logits
from bitfit.core.step import autocast
from bitfit.core.trainable import is_bias
from bitfit.data.tokenize import tokenize_rows
from bitfit.model.compute import fuse_tanh_gelu, loss_scaling, prefer_eager_attention_on_cpu, weights_dtype
from bitfit.model.label_loss import FrozenHeadLossSum, label_loss_sum
from bitfit.model.loading import load_model_and_tokenizer, pad_token_id

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    model, tokenizer = load_model_and_tokenizer(tiny_model_dir)
    examples, _ = tokenize_rows(ROWS, tokenizer, max_len=64)
    return tiny_model_dir, tokenizer, examples


def grads(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("mode", ["bitfit", "full"])  # a frozen head, a trained one
@pytest.mark.parametrize("chunk_tokens", [512, 7])
def test_head_on_label_positions_only_matches_the_full_head(tiny, monkeypatch, mode, chunk_tokens):
    folder, tokenizer, examples = tiny
    model, _ = load_model_and_tokenizer(folder)
    vocab_size = model.get_output_embeddings().weight.size(0)
    monkeypatch.setattr(bitfit.model.label_loss, "HEAD_CHUNK_BYTES", chunk_tokens * 4 * vocab_size)
    config = TrainConfig(mode=mode, model=folder, data="x", output_dir="x")
    prepare_for_training(model, config, CPU)
    batch = collate(examples[:4], pad_token_id(tokenizer))
    assert label_token_count(batch["labels"]) > 2 * chunk_tokens or chunk_tokens == 512
    fast = label_loss_sum(model, batch)
    fast_grads = grads(model, fast)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    plain = loss_sum_from_logits(logits, batch["labels"])
    plain_grads = grads(model, plain)
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-4)
    assert fast_grads.keys() == plain_grads.keys() and len(fast_grads) > 0
    for name in plain_grads:
        torch.testing.assert_close(fast_grads[name], plain_grads[name], rtol=1e-4, atol=1e-6)
    with torch.no_grad():  # evaluation's path
        torch.testing.assert_close(label_loss_sum(model, batch), plain.detach(), rtol=1e-5, atol=1e-4)


def train_copy(folder, tokenizer, examples, tmp_path, **overrides):
    config = TrainConfig(**{"model": folder, "data": "x", "output_dir": str(tmp_path), "max_steps": 3,
                            "batch_size": 2, "grad_accum": 2, **overrides})
    model, _ = load_model_and_tokenizer(folder, weights_dtype(config))
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    prepare_for_training(model, config, CPU)
    progress = train_loop(model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                                   lr=config.lr), examples, config,
                          pad_id=pad_token_id(tokenizer), device=CPU, scaler=loss_scaling(config.dtype, CPU))
    return model, before, progress


@pytest.mark.parametrize("dtype, half", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_half_precision_bitfit_keeps_weights_half_and_biases_fp32(tiny, tmp_path, dtype, half):
    folder, tokenizer, examples = tiny
    model, before, progress = train_copy(folder, tokenizer, examples, tmp_path, dtype=dtype)
    _, _, reference = train_copy(folder, tokenizer, examples, tmp_path, dtype="fp32")
    for name, param in model.named_parameters():
        if is_bias(name):
            assert param.dtype == torch.float32 and not torch.equal(param, before[name].float()), name
        elif ".ln_" in name:  # norm weights are kept in fp32 (a few hundred numbers), values unchanged
            assert param.dtype == torch.float32 and torch.equal(param, before[name].float()), name
        else:
            assert param.dtype == half and torch.equal(param, before[name]), name
    half_loss = progress["loss_sum"] / progress["label_tokens"]
    fp32_loss = reference["loss_sum"] / reference["label_tokens"]
    assert half_loss == pytest.approx(fp32_loss, rel=0.02)


def test_full_mode_in_bf16_keeps_fp32_weights(tiny, tmp_path):
    folder, tokenizer, examples = tiny
    model, _, _ = train_copy(folder, tokenizer, examples, tmp_path, mode="full", dtype="bf16")
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_gradient_checkpointing_gives_the_same_training(tiny, tmp_path):
    folder, tokenizer, examples = tiny
    plain, _, plain_progress = train_copy(folder, tokenizer, examples, tmp_path)
    checkpointed, _, progress = train_copy(folder, tokenizer, examples, tmp_path, grad_checkpointing=True)
    assert progress["loss_sum"] == pytest.approx(plain_progress["loss_sum"], rel=1e-5)
    for (name, a), (_, b) in zip(plain.named_parameters(), checkpointed.named_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_group_by_length_covers_every_example_once_with_less_padding():
    lengths = [(i * 37) % 200 + 5 for i in range(256)]
    grouped = optimizer_windows(256, 4, 2, seed=0, epoch=0, lengths=lengths)
    plain = optimizer_windows(256, 4, 2, seed=0, epoch=0)
    flat = sorted(i for window in grouped for micro in window for i in micro)
    assert flat == list(range(256))
    assert grouped == optimizer_windows(256, 4, 2, seed=0, epoch=0, lengths=lengths)  # seeded

    def padding(windows):
        micro_batches = [micro for window in windows for micro in window]
        padded = sum(len(micro) * max(lengths[i] for i in micro) for micro in micro_batches)
        return 1 - sum(lengths) / padded

    assert padding(grouped) < padding(plain) / 3


def test_summary_reports_the_padding_fraction(tiny, tmp_path):
    folder, tokenizer, examples = tiny
    _, _, progress = train_copy(folder, tokenizer, examples, tmp_path, batch_size=4)
    assert 0 < progress["tokens"] < progress["tokens_with_padding"]
    _, _, unpadded = train_copy(folder, tokenizer, examples, tmp_path, batch_size=1)
    assert unpadded["tokens"] == unpadded["tokens_with_padding"]


@pytest.mark.parametrize("family", ["gpt2", "bloom"])
def test_fused_gelu_gives_the_same_loss_and_bias_gradients(family):
    from transformers import AutoModelForCausalLM, BloomConfig, GPT2Config

    no_dropout = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # BLOOM's default is none
    config = {"gpt2": GPT2Config(n_embd=32, n_head=2, n_layer=2, n_positions=32, vocab_size=64, **no_dropout),
              "bloom": BloomConfig(hidden_size=32, n_head=2, n_layer=2, vocab_size=64)}[family]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).train()  # BLOOM's gelu has its own training path
    for name, param in model.named_parameters():
        param.requires_grad_(is_bias(name))
    ids = torch.randint(0, 64, (2, 12))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    loss = label_loss_sum(model, batch)
    reference = grads(model, loss)

    assert fuse_tanh_gelu(model) == 2  # one per MLP
    assert sum(isinstance(module, torch.nn.GELU) for module in model.modules()) == 2
    fused_loss = label_loss_sum(model, batch)
    assert fused_loss.item() == pytest.approx(loss.item(), rel=1e-6)
    fused = grads(model, fused_loss)
    assert fused.keys() == reference.keys()
    for name in reference:
        torch.testing.assert_close(fused[name], reference[name], rtol=1e-4, atol=1e-6)


def test_training_uses_the_fused_gelu(tiny, tmp_path):
    from transformers.activations import NewGELUActivation

    folder, _, _ = tiny
    model, _ = load_model_and_tokenizer(folder)
    assert any(isinstance(module, NewGELUActivation) for module in model.modules())
    prepare_for_training(model, TrainConfig(mode="bitfit", output_dir=str(tmp_path)), CPU)
    assert not any(isinstance(module, NewGELUActivation) for module in model.modules())


def test_attention_dropout_on_cpu_switches_to_eager_attention_with_the_same_loss():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_head=2, n_layer=2, n_positions=32, vocab_size=64,
                                       attn_pdrop=0.1)).eval()  # eval: dropout off, results comparable
    ids = torch.randint(0, 64, (2, 12))
    attention_mask = torch.tensor([[1] * 12, [1] * 9 + [0] * 3])  # the second row is padded
    labels = ids.masked_fill(attention_mask == 0, -100)
    labels[:, :4] = -100  # a prompt
    batch = {"input_ids": ids, "attention_mask": attention_mask, "labels": labels}
    sdpa_loss = label_loss_sum(model, batch)
    assert not prefer_eager_attention_on_cpu(model, torch.device("cuda"))  # fused kernels win on GPUs
    assert model.config._attn_implementation == "sdpa"
    assert prefer_eager_attention_on_cpu(model, CPU)
    assert model.config._attn_implementation == "eager"
    assert label_loss_sum(model, batch).item() == pytest.approx(sdpa_loss.item(), rel=1e-6)


def test_no_attention_dropout_keeps_the_fused_attention(tiny, tmp_path):
    folder, _, _ = tiny  # the fixture's model has dropout off
    model, _ = load_model_and_tokenizer(folder)
    prepare_for_training(model, TrainConfig(mode="bitfit", output_dir=str(tmp_path)), CPU)
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("device", [CPU, pytest.param(torch.device("cuda"), marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device"))])
def test_frozen_head_loss_matches_the_full_head_in_bf16(tiny, monkeypatch, device):
    folder, tokenizer, examples = tiny
    config = TrainConfig(model=folder, data="x", output_dir="x", dtype="bf16")
    model, _ = load_model_and_tokenizer(folder, weights_dtype(config))
    vocab_size = model.get_output_embeddings().weight.size(0)
    monkeypatch.setattr(bitfit.model.label_loss, "HEAD_CHUNK_BYTES", 7 * 4 * vocab_size)
    prepare_for_training(model, config, device)
    batch = {key: value.to(device) for key, value in collate(examples[:4], pad_token_id(tokenizer)).items()}
    with autocast(device, "bf16"):
        fast = label_loss_sum(model, batch)
    fast_grads = grads(model, fast)
    with autocast(device, "bf16"):
        plain = loss_sum_from_logits(model(input_ids=batch["input_ids"],
                                           attention_mask=batch["attention_mask"]).logits, batch["labels"])
    plain_grads = grads(model, plain)
    torch.testing.assert_close(fast, plain, rtol=1e-2, atol=1e-2)
    assert fast_grads.keys() == plain_grads.keys() and len(fast_grads) > 0
    for name in plain_grads:
        assert fast_grads[name].dtype == torch.float32  # the fp32 master biases
        torch.testing.assert_close(fast_grads[name], plain_grads[name], rtol=2e-2, atol=1e-3)


class PeakTensorBytes(TorchDispatchMode):
    """Peak bytes of the tensor storages created inside (what torch.cuda.max_memory_allocated
    counts on a GPU), for CPU runs. Views of the existing tensors given are not new memory."""

    def __init__(self, *existing):
        super().__init__()
        self.existing = [tensor.untyped_storage() for tensor in existing]  # alive, so their ids stay theirs
        self.live, self.now, self.peak = {id(storage) for storage in self.existing}, 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor) and id(tensor.untyped_storage()) not in self.live:
                storage = tensor.untyped_storage()
                self.live.add(id(storage))
                self.now += storage.nbytes()
                self.peak = max(self.peak, self.now)
                weakref.finalize(storage, self._free, id(storage), storage.nbytes())
        return out

    def _free(self, key, size):
        self.live.discard(key)
        self.now -= size


def test_a_frozen_head_holds_one_chunk_of_logits_at_a_time(monkeypatch):
    tokens, hidden_size, vocab, chunk_tokens = 120, 16, 5000, 10
    chunk_bytes = chunk_tokens * vocab * 4
    monkeypatch.setattr(bitfit.model.label_loss, "HEAD_CHUNK_BYTES", chunk_bytes)
    head = torch.nn.Linear(hidden_size, vocab, bias=False).requires_grad_(False)
    hidden = torch.randn(tokens, hidden_size, requires_grad=True)
    targets = torch.randint(0, vocab, (tokens,))
    weights = hidden.detach().clone().requires_grad_()  # the same hidden states for the plain head

    with PeakTensorBytes(head.weight, hidden, targets) as frozen:
        FrozenHeadLossSum.apply(hidden, head.weight, None, targets, chunk_tokens).backward()
    with PeakTensorBytes(head.weight, weights, targets) as plain:
        torch.nn.functional.cross_entropy(head(weights), targets, reduction="sum").backward()
    torch.testing.assert_close(hidden.grad, weights.grad, rtol=1e-4, atol=1e-6)
    assert plain.peak >= tokens * vocab * 4  # every position's logits at once
    assert frozen.peak < 1.2 * chunk_bytes  # one chunk of logits, and small change
