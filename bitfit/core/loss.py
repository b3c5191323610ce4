"""The causal-LM loss as a sum over label tokens, so that the caller chooses the normaliser.

The model's logits at each position predict the next token, so logits[:, :-1] are scored against
labels[:, 1:], and every label of -100 (prompt, padding) is skipped. The training step divides this
sum by the label tokens of its whole accumulation window (bitfit.core.step.train_step).

causal_lm_loss_sum is what train_step calls unless it is given another loss function. A run passes
a faster one that gives the same number and gradient (bitfit.model.label_loss: the head only at
label positions); the tests hold the two equal.
"""

import math

import torch
import torch.nn.functional as F

from bitfit.core.examples import IGNORE_INDEX


def loss_sum_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The definition: the sum of next-token cross-entropies, from the model's full logits."""
    vocab = logits.size(-1)
    return F.cross_entropy(logits[:, :-1].reshape(-1, vocab).float(), labels[:, 1:].reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")


def label_token_count(labels: torch.Tensor) -> int:
    """How many tokens are predicted: labels shift left by one, so position 0 never counts."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def causal_lm_loss_sum(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The forward pass, and the loss summed over the micro-batch's label tokens."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return loss_sum_from_logits(logits, batch["labels"])


def perplexity(loss: float | None) -> float | None:
    return None if loss is None else math.exp(min(loss, 700))  # exp(710) overflows a float
