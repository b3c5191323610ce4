"""The causal-LM loss as a sum over label tokens, so the caller chooses the normaliser.

The language-model head is the widest layer of a small LM (bloomz-1b1: 1536 -> 250,880, a third
of its parameters), and most positions of an instruction example are prompt or padding, whose
logits the loss never looks at. So the head runs only where a label is, in chunks, and each
chunk is recomputed in the backward pass rather than kept: the fp32 logits of one chunk are all
that exist at any moment.
"""

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from bitfit.data import IGNORE_INDEX

HEAD_CHUNK_TOKENS = 512  # 512 x 250,880 fp32 logits = 0.5 GB at a time for bloomz


def label_token_count(labels: torch.Tensor) -> int:
    """How many tokens are predicted: labels shift left by one, so position 0 never counts."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def causal_lm_loss_sum(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum of next-token cross-entropies over every position whose label is not -100."""
    if not head_is_plain_linear(model):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return loss_sum_from_logits(logits, batch["labels"])
    hidden = model.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                              use_cache=False).last_hidden_state
    targets = batch["labels"][:, 1:]
    predicts_a_label = targets != IGNORE_INDEX
    hidden, targets = hidden[:, :-1][predicts_a_label], targets[predicts_a_label]
    head = model.get_output_embeddings()
    if targets.numel() <= HEAD_CHUNK_TOKENS:
        # One chunk: recomputing it would save nothing, since the backward pass starts at
        # the head, while every activation is still alive anyway.
        return _head_loss_sum(head, hidden, targets)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, targets.numel(), HEAD_CHUNK_TOKENS):
        chunk = slice(start, start + HEAD_CHUNK_TOKENS)
        total = total + checkpoint(_head_loss_sum, head, hidden[chunk], targets[chunk], use_reentrant=False)
    return total


def _head_loss_sum(head, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), targets, reduction="sum")


def loss_sum_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The plain way, from the model's full logits: the reference the fast path must match."""
    vocab = logits.size(-1)
    return F.cross_entropy(logits[:, :-1].reshape(-1, vocab).float(), labels[:, 1:].reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")


def head_is_plain_linear(model) -> bool:
    """True when the model's logits are just head(last hidden state), as in GPT-2, BLOOM, OPT,
    GPT-NeoX, LLaMA, Qwen2 and Mistral. Models that scale or soft-cap their logits (Gemma 2,
    Cohere) take the plain path."""
    config = model.config
    adjusts_logits = any(getattr(config, name, None) not in (None, 1.0)
                         for name in ("final_logit_softcapping", "logit_scale", "output_multiplier_scale"))
    return (not adjusts_logits and model.get_output_embeddings() is not None
            and model.base_model is not model)
