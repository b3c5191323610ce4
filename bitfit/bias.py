"""Which parameters train: in BitFit, the biases; in full fine-tuning, everything."""

import torch


def is_bias(name: str) -> bool:
    """Bias vectors of Linear, Conv1D and LayerNorm layers are all named '...bias'."""
    return name == "bias" or name.endswith(".bias")


def select_trainable(model: torch.nn.Module, mode: str) -> list[str]:
    """Set requires_grad for the mode and return the names of the parameters that will train."""
    for name, param in model.named_parameters():
        # BitFit's whole idea: weights stay frozen, so autograd computes and stores no
        # gradient for them and AdamW keeps no moments for them; only the biases move.
        param.requires_grad_(mode == "full" or is_bias(name))
    return [name for name, param in model.named_parameters() if param.requires_grad]


def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [param for param in model.parameters() if param.requires_grad]


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total); tied weights (GPT-2's embedding and head) are counted once."""
    params = list(model.parameters())
    return (sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params))


def describe_counts(trainable: int, total: int) -> str:
    return f"trainable params: {trainable:,} / {total:,} ({100 * trainable / total:.4f}%)"
