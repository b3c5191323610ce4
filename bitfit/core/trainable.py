"""BitFit itself: every weight frozen, only the biases train, and AdamW over them alone.

train_only sets requires_grad; everything downstream (autograd, the optimizer, clipping, the saved
delta) follows from that one flag. Which biases train (all of them, named groups, slices of a fused
q,k,v bias, biases added to a model without any) is bitfit.model.bias_terms's business: it hands a
list of names to train_only.
"""

import torch


def is_bias(name: str) -> bool:
    """Bias vectors of Linear, Conv1D and LayerNorm layers are all named '...bias'."""
    return name == "bias" or name.endswith(".bias")


def train_only(model: torch.nn.Module, names) -> list[str]:
    """Freeze every parameter but the named ones; return the names of those that train, in the model's order."""
    names = set(names)
    for name, param in model.named_parameters():
        # BitFit's whole idea: weights stay frozen, so autograd computes and stores no
        # gradient for them and AdamW keeps no moments for them; only the biases move.
        param.requires_grad_(name in names)
    return list(trainable_parameters(model))


def trainable_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """name -> parameter, for those that train (requires_grad), in the model's order: what the
    optimizer updates, the step clips and the checkpoint saves. In BitFit, the chosen biases."""
    return {name: param for name, param in model.named_parameters() if param.requires_grad}


def count_parameters(model: torch.nn.Module, masks: dict[str, torch.Tensor] | None = None) -> tuple[int, int]:
    """(trainable, total); tied weights (GPT-2's embedding and head) are counted once.

    A tensor in masks counts only the entries of its slice that train.
    """
    masks = masks or {}
    trainable = sum(int(masks[name].sum()) if name in masks else p.numel()
                    for name, p in trainable_parameters(model).items())
    # named_parameters gives each tensor once, as model.parameters() does: tied weights count once.
    return trainable, sum(p.numel() for _, p in model.named_parameters())


def describe_counts(trainable: int, total: int) -> str:
    return f"trainable params: {trainable:,} / {total:,} ({100 * trainable / total:.4f}%)"


def build_optimizer(model, config, device=torch.device("cpu"), no_decay=()) -> torch.optim.Optimizer:
    """AdamW over the trainable tensors only, at config.lr with config.weight_decay (a TrainConfig, or
    anything with those two numbers). Unlike torch's AdamW, whose weight decay defaults to 0.01,
    bitfit's defaults to 0 (--weight-decay), as the seed notebook's Trainer did."""
    # The optimizer only ever sees the trainable tensors: in BitFit, AdamW's two moment
    # buffers are then as small as the biases themselves, one of BitFit's memory savings.
    # The fused CUDA kernel updates all tensors in one launch instead of several per tensor.
    # AdamW's decoupled weight decay shrinks every entry of a tensor, gradient or not, so it
    # would move the masked-out slice of a partly trained tensor (no_decay): those get none,
    # which keeps that slice bit-identical to the base without restoring it after every step
    # (their trained slice goes undecayed too; with the default --weight-decay 0 nothing differs).
    named = trainable_parameters(model).items()
    groups = [{"params": [param for name, param in named if name not in no_decay]},
              {"params": [param for name, param in named if name in no_decay], "weight_decay": 0.0}]
    return torch.optim.AdamW([group for group in groups if group["params"]], lr=config.lr,
                             weight_decay=config.weight_decay, fused=device.type == "cuda")
