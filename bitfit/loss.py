"""The causal-LM loss as a sum over label tokens, so the caller chooses the normaliser."""

import torch
import torch.nn.functional as F

from bitfit.data import IGNORE_INDEX


def label_token_count(labels: torch.Tensor) -> int:
    """How many tokens are predicted: labels shift left by one, so position 0 never counts."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def causal_lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of next-token cross-entropies over every position whose label is not -100."""
    vocab = logits.size(-1)
    return F.cross_entropy(logits[:, :-1].reshape(-1, vocab).float(), labels[:, 1:].reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")
