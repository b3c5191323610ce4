"""train_step: one BitFit optimizer step over a window of micro-batches. Read this first after the walkthrough.

For each micro-batch of the window: forward, the loss summed over its label tokens and divided by
the whole window's count, backward (adding to each bias's .grad). Then clip and step. That is all
of it; python -m bitfit.walkthrough writes the same step out with plain calls, and a test holds the
two equal.

Three options touch the step, each through an argument whose default does nothing:
    loss_fn  the loss; a run passes a faster one of the same value (bitfit.model.label_loss)
    scaler   fp16's loss scaling (torch.amp.GradScaler); by default NoLossScaling, whose calls
             are the plain ones (scale(loss) is loss, step(optimizer) is optimizer.step())
    world    the processes (bitfit.core.world); by default one, where every sum returns at once
"""

import contextlib
import math

import torch

from bitfit.core.loss import causal_lm_loss_sum
from bitfit.core.trainable import trainable_parameters
from bitfit.core.world import SINGLE
from bitfit.errors import Diverged

# --dtype -> the dtype autocast computes in (None: plain fp32).
AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class NoLossScaling:
    """What train_step does with the loss and the optimizer when nothing scales the loss: the plain calls.

    fp16 can underflow small gradients to zero, so its torch.amp.GradScaler scales the loss up
    before backward and the gradients back down before the step; these are its methods. fp32 and
    bf16 (which has fp32's range) need none of it.
    """

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        return loss

    def unscale_(self, optimizer) -> None:
        pass

    def step(self, optimizer) -> None:
        optimizer.step()

    def update(self) -> None:
        pass

    def is_enabled(self) -> bool:
        return False

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


NO_LOSS_SCALING = NoLossScaling()


def train_step(model, optimizer, batches: list[dict], label_tokens: int, *, max_grad_norm: float, device,
               dtype: str = "fp32", loss_fn=causal_lm_loss_sum, scaler=NO_LOSS_SCALING,
               world=SINGLE) -> tuple[float, float]:
    """One optimizer step over a window of micro-batches: forward, token-weighted backward, clip, step.
    label_tokens is the window's label-token count (over every rank under torchrun).
    Returns the window's loss sum and the gradient norm before clipping."""
    params = list(trainable_parameters(model).values())  # in BitFit, the biases: all that has a gradient
    window_loss_sum = torch.zeros((), device=device)
    for index, batch in enumerate(batches):
        world.sync_gradients_in_backward(model, index == len(batches) - 1)  # --fsdp: the last backward syncs
        batch = {key: value.to(device, non_blocking=True) for key, value in batch.items()}
        with autocast(device, dtype):
            loss_sum = loss_fn(model, batch)  # the forward pass, and the loss summed over labels
        # Divide by the label tokens of the whole window, not of this micro-batch: every token weighs
        # the same however the window is split (batch 1 x accum 8 = batch 8 x accum 1), where a
        # per-micro-batch mean would make a 5-token answer count as much as a 200-token one.
        loss = loss_sum / label_tokens
        scaler.scale(loss).backward()  # adds to each bias's .grad
        window_loss_sum += loss_sum.detach()
    world.sum_gradients(params)  # torchrun: the ranks' gradients summed, once per step
    scaler.unscale_(optimizer)  # fp16: clip the true gradient, not the scaled one
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm).item()
    window_loss_sum = world.sum(window_loss_sum).item()
    # Under fp16 an inf gradient means the loss scale was too high (the scaler skips that step);
    # anything else non-finite is divergence.
    if not (math.isfinite(window_loss_sum) and (math.isfinite(grad_norm) or scaler.is_enabled())):
        raise Diverged(f"loss sum {window_loss_sum}, grad norm {grad_norm}")
    scaler.step(optimizer)  # optimizer.step()
    scaler.update()
    optimizer.zero_grad(set_to_none=True)  # the next window's gradients start from nothing
    return window_loss_sum, grad_norm


def autocast(device: torch.device, dtype: str):
    """Compute in bf16/fp16 where that is safe (matmuls), in fp32 where it is not (norms, softmax)."""
    if AUTOCAST_DTYPES[dtype] is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=AUTOCAST_DTYPES[dtype])
