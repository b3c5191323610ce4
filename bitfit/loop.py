"""The training loop: train_step is one optimizer step; train_loop runs the steps and keeps the books.

Read train_step first (python -m bitfit.walkthrough writes the same step out with plain calls).
Three options cost it one line each wherever they touch it, and do nothing otherwise: fp16's loss
scaling (the scaler), torchrun's sums over the processes (all_reduce_grads, all_reduce_sum) and
--fsdp's gradient sync in the last backward pass only (sync_gradients_in_backward).
"""

import contextlib
import math
import time

import torch
from tqdm import tqdm

from bitfit.bias import trainable_parameters
from bitfit.data import collate, optimizer_windows
from bitfit.distributed import SINGLE, all_reduce_grads, all_reduce_sum, shard
from bitfit.errors import InputError
from bitfit.fsdp import free_gathered_weights, idle_micro_batch, sync_gradients_in_backward
from bitfit.loss import causal_lm_loss_sum, label_token_count
from bitfit.metrics import perplexity
from bitfit.model import AUTOCAST_DTYPES
from bitfit.resume import StopOnCtrlC, save_checkpoint_if_due

# fp16 can underflow small gradients to zero: its GradScaler scales the loss up before backward
# and the gradients back down before the step. bf16 has fp32's range and needs none of this; a
# disabled scaler passes everything through unchanged.
NO_LOSS_SCALING = torch.amp.GradScaler("cpu", enabled=False)


class NonFiniteLoss(InputError):
    """The loss or the gradient became inf/nan; the weights were not updated with it."""


def train_step(model, optimizer, batches: list[dict], label_tokens: int, *, max_grad_norm: float, device,
               dtype: str = "fp32", scaler: torch.amp.GradScaler = NO_LOSS_SCALING) -> tuple[float, float]:
    """One optimizer step over a window of micro-batches: forward, token-weighted backward, sync,
    clip, step. label_tokens is the window's label-token count (over every rank under torchrun).
    Returns the window's loss sum and the gradient norm before clipping."""
    params = list(trainable_parameters(model).values())  # in BitFit, the biases: all that has a gradient
    window_loss_sum = torch.zeros((), device=device)
    for index, batch in enumerate(batches):
        sync_gradients_in_backward(model, index == len(batches) - 1)  # --fsdp: the last backward syncs
        batch = {key: value.to(device, non_blocking=True) for key, value in batch.items()}
        with autocast(device, dtype):
            loss_sum = causal_lm_loss_sum(model, batch)  # the forward pass, and the loss summed over labels
        # Divide by the label tokens of the whole window, not of this micro-batch: every token weighs
        # the same however the window is split (batch 1 x accum 8 = batch 8 x accum 1), where a
        # per-micro-batch mean would make a 5-token answer count as much as a 200-token one.
        loss = loss_sum / label_tokens
        scaler.scale(loss).backward()  # adds to each bias's .grad (fp16: the loss scaled up first)
        window_loss_sum += loss_sum.detach()
    all_reduce_grads(params)  # torchrun: sum the ranks' gradients once per step; else (--fsdp too) nothing
    scaler.unscale_(optimizer)  # fp16: clip the true gradient, not the scaled one; otherwise nothing
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm).item()
    window_loss_sum = all_reduce_sum(window_loss_sum).item()  # torchrun: the global window's loss
    # Under fp16 an inf gradient means the loss scale was too high (the scaler skips that step);
    # anything else non-finite is divergence.
    if not (math.isfinite(window_loss_sum) and (math.isfinite(grad_norm) or scaler.is_enabled())):
        raise NonFiniteLoss(f"loss sum {window_loss_sum}, grad norm {grad_norm}")
    scaler.step(optimizer)  # optimizer.step(); fp16 skips a step whose gradient overflowed
    scaler.update()  # fp16: adjust the loss scale; otherwise nothing
    optimizer.zero_grad(set_to_none=True)  # the next window's gradients start from nothing
    return window_loss_sum, grad_norm


def new_progress() -> dict:
    """Where a run stands: saved in checkpoints, so a resumed run carries on the same counts."""
    return {"step": 0, "epoch": 0, "position": 0, "samples": 0, "tokens": 0, "label_tokens": 0,
            "tokens_with_padding": 0, "loss_sum": 0.0, "log_loss_sum": 0.0, "log_label_tokens": 0,
            "seconds": 0.0, "eval_loss_before": None, "eval_loss_after": None}


def train_loop(model, optimizer, examples, config, *, pad_id, device, metrics_log=None,
               eval_examples=(), progress=None, world=SINGLE, checkpoint_dir=None) -> dict:
    """Train from progress (a fresh run when None) to config's epochs or max_steps: the learning
    rate schedule, train_step, counters, logging, evaluation and checkpoints, in that order.

    Under torchrun, world says which rank this is; the counts in progress are then global.
    Checkpoints go to checkpoint_dir (the run's staging folder, see bitfit.rundir), by default
    config.output_dir.
    Returns the final progress: steps, samples, tokens, loss and eval sums, training seconds.
    """
    total_steps = count_optimizer_steps(len(examples), config, world.world_size)
    warmup_steps = int(config.warmup_ratio * total_steps)
    progress = progress or new_progress()
    log = metrics_log.write if metrics_log is not None else (lambda record: None)
    if eval_examples and progress["step"] == 0:
        progress["eval_loss_before"] = evaluate(model, eval_examples, config, pad_id, device)
        log(eval_record(0, progress["eval_loss_before"]))

    scaler = torch.amp.GradScaler(device.type, enabled=config.dtype == "fp16")
    if progress.get("grad_scaler"):
        scaler.load_state_dict(progress["grad_scaler"])
    model.train()
    lengths = [len(example["input_ids"]) for example in examples] if config.group_by_length else None
    windows = iter_windows(len(examples), config, progress["epoch"], progress["position"], lengths,
                           world.world_size)
    with StopOnCtrlC() as ctrl_c, tqdm(total=total_steps, initial=progress["step"], desc=config.mode,
                                        unit="step", dynamic_ncols=True, disable=not world.is_main) as bar:
        for step in range(progress["step"], total_steps):
            step_start = time.perf_counter()
            epoch, position, window = next(windows)
            lr = learning_rate(step, total_steps, warmup_steps, config.lr)
            for group in optimizer.param_groups:
                group["lr"] = lr

            # Collate the whole window first: the loss normaliser is its number of label tokens.
            # Under torchrun each rank collates only its own slice of the window.
            batches = [collate([examples[i] for i in ids], pad_id)
                       for ids in shard(window, config.batch_size, world)]
            label_tokens, samples, tokens, tokens_with_padding = window_counts(batches, device, world)
            if config.fsdp:  # every rank runs every micro-batch: FSDP's gathers need them all
                batches += [idle_micro_batch(pad_id)] * (len(window) - len(batches))
            try:
                window_loss_sum, grad_norm = train_step(model, optimizer, batches, label_tokens,
                                                        max_grad_norm=config.max_grad_norm, device=device,
                                                        dtype=config.dtype, scaler=scaler)
            except NonFiniteLoss as error:
                raise NonFiniteLoss(f"the loss became non-finite at optimizer step {step + 1} of "
                                    f"{total_steps} ({error}); stopped without saving, files already in "
                                    f"{config.output_dir} are untouched; try a lower --lr") from None

            progress.update(step=step + 1, epoch=epoch, position=position + 1,
                            grad_scaler=scaler.state_dict())
            progress["seconds"] += time.perf_counter() - step_start
            progress["samples"] += samples
            progress["tokens"] += tokens
            progress["tokens_with_padding"] += tokens_with_padding
            progress["label_tokens"] += label_tokens
            progress["loss_sum"] += window_loss_sum
            progress["log_label_tokens"] += label_tokens
            progress["log_loss_sum"] += window_loss_sum
            bar.set_postfix(loss=f"{window_loss_sum / label_tokens:.4f}",
                            tok_s=f"{progress['tokens'] / progress['seconds']:,.0f}")
            bar.update(1)
            last_step = step + 1 == total_steps
            if (step + 1) % config.log_every == 0 or last_step:
                log({"step": step + 1, "epoch": epoch, "lr": lr, "grad_norm": grad_norm,
                     "loss": progress["log_loss_sum"] / progress["log_label_tokens"],
                     "samples": progress["samples"], "tokens": progress["tokens"],
                     "seconds": round(progress["seconds"], 3),
                     "tokens_per_s": progress["tokens"] / progress["seconds"]})
                progress.update(log_loss_sum=0.0, log_label_tokens=0)
            if eval_examples and (last_step or (config.eval_every and (step + 1) % config.eval_every == 0)):
                progress["eval_loss_after"] = evaluate(model, eval_examples, config, pad_id, device)
                log(eval_record(step + 1, progress["eval_loss_after"]))
            save_checkpoint_if_due(model, optimizer, config, progress, total_steps=total_steps,
                                   ctrl_c=ctrl_c, device=device, world=world,
                                   checkpoint_dir=checkpoint_dir)
    return progress


@torch.no_grad()
def evaluate(model, examples, config, pad_id, device) -> float:
    """Token-weighted mean loss over examples, with dropout off, like the training loss."""
    model.eval()
    loss_sum, label_tokens = 0.0, 0
    for start in range(0, len(examples), config.batch_size):
        batch = {key: value.to(device) for key, value in
                 collate(examples[start:start + config.batch_size], pad_id).items()}
        with autocast(device, config.dtype):
            loss_sum += causal_lm_loss_sum(model, batch).item()
        label_tokens += label_token_count(batch["labels"])
    model.train()
    free_gathered_weights(model)  # --fsdp: no backward pass came to free them; otherwise nothing
    return loss_sum / label_tokens


def autocast(device: torch.device, dtype: str):
    """Compute in bf16/fp16 where that is safe (matmuls), in fp32 where it is not (norms, softmax)."""
    if AUTOCAST_DTYPES[dtype] is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=AUTOCAST_DTYPES[dtype])


def eval_record(step: int, loss: float) -> dict:
    return {"step": step, "eval_loss": loss, "eval_perplexity": perplexity(loss)}


def window_counts(batches: list[dict], device, world) -> tuple[int, int, int, int]:
    """Label tokens, samples, tokens and tokens with padding of the window, summed over the ranks."""
    # Count on the CPU copies: reading a count back from the GPU would wait for it.
    counts = [sum(label_token_count(batch["labels"]) for batch in batches),
              sum(batch["input_ids"].size(0) for batch in batches),
              sum(int(batch["attention_mask"].sum()) for batch in batches),
              sum(batch["input_ids"].numel() for batch in batches)]
    if world.world_size > 1:
        counts = all_reduce_sum(torch.tensor(counts, device=device)).tolist()
    return tuple(counts)


def count_optimizer_steps(num_examples: int, config, world_size: int = 1) -> int:
    if config.max_steps is not None:
        return config.max_steps
    return config.epochs * windows_per_epoch(num_examples, config, world_size)


def windows_per_epoch(num_examples: int, config, world_size: int = 1) -> int:
    return math.ceil(math.ceil(num_examples / (config.batch_size * world_size)) / config.grad_accum)


def iter_windows(num_examples: int, config, epoch: int = 0, position: int = 0, lengths=None, world_size: int = 1):
    """Yield (epoch, position, window) from the given point on, reshuffling at each new epoch.

    A window's micro-batches are global ones of batch_size x world_size examples.
    """
    while True:
        windows = optimizer_windows(num_examples, config.batch_size * world_size, config.grad_accum, config.seed,
                                    epoch, lengths if config.group_by_length else None)
        for index in range(position, len(windows)):
            yield epoch, index, windows[index]
        epoch, position = epoch + 1, 0


def learning_rate(step: int, total_steps: int, warmup_steps: int, peak_lr: float) -> float:
    """Linear warmup to peak_lr over warmup_steps, then linear decay towards 0 at total_steps."""
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    return peak_lr * (total_steps - step) / (total_steps - warmup_steps)
