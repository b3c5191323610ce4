"""The loss a run computes: bitfit.core.loss.causal_lm_loss_sum's number, with the head only at label positions.

The language-model head is the widest layer of a small LM (bloomz-1b1: 1536 -> 250,880, a third of
its parameters), and most positions of an instruction example are prompt or padding, whose logits
the loss never looks at. So the head runs only where a label is, in chunks small enough that one
chunk's fp32 logits are all that exist at any moment, and a frozen head (BitFit's) works out its
gradient in the forward pass (FrozenHeadLossSum). A run passes label_loss_sum to train_step as its
loss_fn; it equals the definition in value and in gradient, to float rounding. The tests that prove it:
    test_precision_and_speed.py::test_head_on_label_positions_only_matches_the_full_head
        (a frozen head and a trained one, one chunk and many, with and without grad)
    test_precision_and_speed.py::test_frozen_head_loss_matches_the_full_head_in_bf16
    test_walkthrough.py::test_walkthrough_step_equals_train_loop (a whole optimizer step)
and test_a_frozen_head_holds_one_chunk_of_logits_at_a_time, that only one chunk lives at a time.
"""

import torch
import torch.nn.functional as F

# Activation checkpointing: a chunk's logits are recomputed in the backward pass rather than kept.
from torch.utils.checkpoint import checkpoint as recompute_in_backward

from bitfit.core.examples import IGNORE_INDEX
from bitfit.core.loss import loss_sum_from_logits

HEAD_CHUNK_BYTES = 64 * 2**20  # fp32 logits per chunk: 66 positions of bloomz's 250,880-wide vocabulary


def label_loss_sum(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The forward pass and loss_sum_from_logits(model(...).logits, labels), with the head applied
    only at label positions."""
    if not head_is_plain_linear(model):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return loss_sum_from_logits(logits, batch["labels"])
    # model.base_model(...); under --fsdp, the same call through the forward method that
    # bitfit.parallel.fsdp.shard_model registers as base_model_forward, so that FSDP gathers the weights.
    base_model = getattr(model, "base_model_forward", model.base_model)
    hidden = base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        use_cache=False).last_hidden_state
    targets = batch["labels"][:, 1:]
    predicts_a_label = targets != IGNORE_INDEX
    hidden, targets = hidden[:, :-1][predicts_a_label], targets[predicts_a_label]
    head = model.get_output_embeddings()
    chunk_tokens = head_chunk_tokens(head.weight.size(0))
    if hidden.requires_grad and not any(param.requires_grad for param in head.parameters()):
        return FrozenHeadLossSum.apply(hidden, head.weight, head.bias, targets, chunk_tokens)
    zero = hidden.new_zeros((), dtype=torch.float32)
    if targets.numel() <= chunk_tokens or not torch.is_grad_enabled():
        # One chunk, or no backward pass to come: nothing is kept that recomputing would spare.
        return sum((_head_loss_sum(head, hidden[chunk], targets[chunk])
                    for chunk in chunks(targets.numel(), chunk_tokens)), zero)
    # A trained head (full fine-tuning): each chunk's logits are recomputed in the backward pass.
    return sum((recompute_in_backward(_head_loss_sum, head, hidden[chunk], targets[chunk], use_reentrant=False)
                for chunk in chunks(targets.numel(), chunk_tokens)), zero)


class FrozenHeadLossSum(torch.autograd.Function):
    """The loss of a frozen head (BitFit's), with its gradient worked out in the forward pass.

    When the head's weight is frozen, the only gradient the loss sends back is the one for the
    hidden states: (softmax(logits) - one_hot(target)) @ W. Working it out right after each chunk's
    loss means no logits are kept for the backward pass and none are computed twice; the
    backward pass only scales the stored gradient, which is hidden-size wide, not vocabulary-wide.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_tokens):
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden)
        for chunk in chunks(targets.numel(), chunk_tokens):
            logits = F.linear(hidden[chunk], weight, bias).float()
            target_logits = logits.gather(1, targets[chunk, None]).squeeze(1)
            maxima = logits.amax(dim=-1)
            # Softmax in place, so that no second chunk-sized tensor is made; less the maxima first,
            # or exp overflows.
            probs = logits.sub_(maxima[:, None]).exp_()
            sums = probs.sum(dim=-1)
            total += (sums.log() + maxima - target_logits).sum()  # -log softmax at the targets
            probs.div_(sums[:, None])
            probs[torch.arange(probs.size(0), device=probs.device), targets[chunk]] -= 1  # d loss / d logits
            grad_hidden[chunk] = probs.to(weight.dtype) @ weight  # under autocast, in its dtype
            del logits, probs  # free this chunk before the next one is made
        ctx.save_for_backward(grad_hidden)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        (grad_hidden,) = ctx.saved_tensors
        return grad_hidden * grad_total, None, None, None, None


def head_chunk_tokens(vocab_size: int) -> int:
    return max(1, HEAD_CHUNK_BYTES // (4 * vocab_size))


def chunks(length: int, size: int):
    # At least one chunk, if an empty one: a micro-batch without labels (an idle rank's under
    # --fsdp, bitfit.parallel.fsdp.idle_micro_batch) still makes a loss of 0 with a backward pass.
    return [slice(start, start + size) for start in range(0, max(length, 1), size)]


def _head_loss_sum(head, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), targets, reduction="sum")


def head_is_plain_linear(model) -> bool:
    """True when the model's logits are just head(last hidden state), as in GPT-2, BLOOM, OPT,
    GPT-NeoX, LLaMA, Qwen2 and Mistral. Models that scale or soft-cap their logits (Gemma 2,
    Cohere) take the plain path."""
    config = model.config
    adjusts_logits = any(getattr(config, name, None) not in (None, 1.0)
                         for name in ("final_logit_softcapping", "logit_scale", "output_multiplier_scale"))
    return (not adjusts_logits and model.get_output_embeddings() is not None
            and model.base_model is not model)
