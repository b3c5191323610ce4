"""train_loop: the optimizer steps of a run, and the books kept around them, in nanoGPT's order.

For each step: set the learning rate, collate the window (the loss's normaliser is its label
tokens), train_step, count, log, evaluate now and then, and call after_step (a run saves its
training checkpoint there). The schedule is linear warm-up over warmup_ratio of the steps, then
linear decay towards 0 (learning_rate). The data order is a seeded shuffle per epoch with its own
generator (bitfit.core.examples.optimizer_windows), so it never depends on dropout's draws.
"""

import math
import time

import torch
from tqdm import tqdm

from bitfit.core.examples import collate, optimizer_windows, split_window
from bitfit.core.loss import causal_lm_loss_sum, label_token_count, perplexity
from bitfit.core.step import NO_LOSS_SCALING, autocast, train_step
from bitfit.core.world import SINGLE
from bitfit.errors import Diverged


class FixedMicroBatch:
    """The micro-batch of every window: config.micro_batch (None: the window's batch_size micro-batches as
    they are). --micro-batch auto passes another object with these two methods (bitfit.training.micro_batch)."""

    def __init__(self, size: int | None):
        self.size = size

    def for_step(self, step: int) -> int | None:
        return self.size

    def measured(self, step: int, tokens: int, seconds: float) -> None:
        pass


def new_progress() -> dict:
    """Where a run stands: saved in training checkpoints, so a resumed run carries on the same counts."""
    return {"step": 0, "epoch": 0, "position": 0, "samples": 0, "tokens": 0, "label_tokens": 0,
            "tokens_with_padding": 0, "loss_sum": 0.0, "log_loss_sum": 0.0, "log_label_tokens": 0,
            "seconds": 0.0, "eval_loss_before": None, "eval_loss_after": None}


def train_loop(model, optimizer, examples, config, *, pad_id, device, metrics_log=None, eval_examples=(),
               progress=None, world=SINGLE, loss_fn=causal_lm_loss_sum, scaler=NO_LOSS_SCALING,
               after_step=None, micro_batches=None) -> dict:
    """Train from progress (a fresh run when None) to config's epochs or max_steps: the learning
    rate schedule, train_step, counters, logging, evaluation, in that order; then after_step(progress,
    total_steps), which may stop the run by raising.

    config is a TrainConfig (bitfit.config). world, loss_fn and scaler go to train_step; under
    torchrun the counts in progress are global. micro_batches says how each window is cut (by default
    config.micro_batch for every window).
    Returns the final progress: steps, samples, tokens, loss and eval sums, training seconds.
    """
    total_steps = count_optimizer_steps(len(examples), config, world.world_size)
    warmup_steps = int(config.warmup_ratio * total_steps)
    progress = progress or new_progress()
    log = metrics_log.write if metrics_log is not None else (lambda record: None)
    evaluation = dict(config=config, pad_id=pad_id, device=device, world=world, loss_fn=loss_fn)
    if eval_examples and progress["step"] == 0:
        progress["eval_loss_before"] = evaluate(model, eval_examples, **evaluation)
        log(eval_record(0, progress["eval_loss_before"]))

    if config.dtype == "fp16" and not scaler.is_enabled():  # a bug in the caller, not the user's input
        raise ValueError("--dtype fp16 needs loss scaling: pass scaler=bitfit.model.compute.loss_scaling(...)")
    if progress.get("grad_scaler"):
        scaler.load_state_dict(progress["grad_scaler"])
    model.train()
    if micro_batches is None:
        if config.micro_batch == "auto":  # a bug in the caller, not the user's input
            raise ValueError("--micro-batch auto: pass micro_batches (bitfit.training.micro_batch.micro_batches)")
        micro_batches = FixedMicroBatch(config.micro_batch)
    lengths = [len(example["input_ids"]) for example in examples] if config.group_by_length else None
    windows = iter_windows(len(examples), config, progress["epoch"], progress["position"], lengths,
                           world.world_size)
    with tqdm(total=total_steps, initial=progress["step"], desc=config.mode, unit="step", dynamic_ncols=True,
              disable=not world.is_main) as bar:
        for step in range(progress["step"], total_steps):
            step_start = time.perf_counter()
            epoch, position, window = next(windows)
            lr = learning_rate(step, total_steps, warmup_steps, config.lr)
            for group in optimizer.param_groups:
                group["lr"] = lr

            # Collate the whole window first: the loss normaliser is its number of label tokens.
            # Under torchrun each rank collates only its own slice of the window; --micro-batch re-cuts it.
            micro_batch = micro_batches.for_step(step)
            mine = world.shard(window, config.batch_size)
            read = {i: examples[i] for ids in mine for i in ids}
            cut = split_window(mine, {i: len(example["input_ids"]) for i, example in read.items()}, micro_batch)
            batches = [collate([read[i] for i in ids], pad_id) for ids in cut]
            label_tokens, samples, tokens, tokens_with_padding = window_counts(batches, device, world)
            batches = world.fill_window(batches, micro_batches_per_window(config, len(window), micro_batch), pad_id)
            try:
                window_loss_sum, grad_norm = train_step(model, optimizer, batches, label_tokens,
                                                        max_grad_norm=config.max_grad_norm, device=device,
                                                        dtype=config.dtype, loss_fn=loss_fn, scaler=scaler,
                                                        world=world)
            except Diverged as error:
                raise Diverged(f"the loss became non-finite at optimizer step {step + 1} of {total_steps} "
                               f"({error}); stopped without saving, files already in {config.output_dir} are "
                               f"untouched; try a lower --lr") from None

            progress.update(step=step + 1, epoch=epoch, position=position + 1, grad_scaler=scaler.state_dict())
            micro_batches.measured(step, tokens, time.perf_counter() - step_start)
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
                progress["eval_loss_after"] = evaluate(model, eval_examples, **evaluation)
                log(eval_record(step + 1, progress["eval_loss_after"]))
            if after_step is not None:
                after_step(progress, total_steps)
    return progress


@torch.no_grad()
def evaluate(model, examples, config, pad_id, device, world=SINGLE, loss_fn=causal_lm_loss_sum) -> float:
    """Token-weighted mean loss over examples, with dropout off, like the training loss."""
    model.eval()
    loss_sum, label_tokens = 0.0, 0
    for start in range(0, len(examples), config.batch_size):
        batch = {key: value.to(device) for key, value in
                 collate(examples[start:start + config.batch_size], pad_id).items()}
        with autocast(device, config.dtype):
            loss_sum += loss_fn(model, batch).item()
        label_tokens += label_token_count(batch["labels"])
    model.train()
    world.free_gathered_weights(model)  # --fsdp: no backward pass came to free them
    return loss_sum / label_tokens


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
        counts = world.sum(torch.tensor(counts, device=device)).tolist()
    return tuple(counts)


def micro_batches_per_window(config, global_micro_batches: int, micro_batch: int | None) -> int:
    """The most micro-batches any rank runs in a window: --fsdp makes every rank run that many."""
    if micro_batch is None:
        return global_micro_batches
    return math.ceil(config.batch_size * global_micro_batches / micro_batch)


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
