"""The training loop: the one function to read to see what a training step does."""

import contextlib
import math
import signal
import threading
import time

import torch
from tqdm import tqdm

from bitfit.data import collate, optimizer_windows
from bitfit.distributed import SINGLE, all_reduce_grads, all_reduce_sum, any_rank, shard
from bitfit.errors import InputError, Interrupted
from bitfit.loss import causal_lm_loss_sum, label_token_count
from bitfit.metrics import perplexity
from bitfit.model import AUTOCAST_DTYPES
from bitfit.resume import save_training_state


class NonFiniteLoss(InputError):
    """The loss or the gradient became inf/nan; the weights were not updated with it."""


def new_progress() -> dict:
    """Where a run stands: saved in checkpoints, so a resumed run carries on the same counts."""
    return {"step": 0, "epoch": 0, "position": 0, "samples": 0, "tokens": 0, "label_tokens": 0,
            "padded_tokens": 0, "loss_sum": 0.0, "log_loss_sum": 0.0, "log_label_tokens": 0, "seconds": 0.0,
            "eval_loss_before": None, "eval_loss_after": None}


def train_loop(model, optimizer, examples, config, *, pad_id, device, metrics_log=None,
               eval_examples=(), progress=None, world=SINGLE, checkpoint_dir=None) -> dict:
    """Train from progress (a fresh run when None) to config's epochs or max_steps.

    Under torchrun, world says which rank this is; the counts in progress are then global.
    Checkpoints go to checkpoint_dir (the run's staging folder, see bitfit.rundir), by default
    config.output_dir.
    Returns the final progress: steps, samples, tokens, loss and eval sums, training seconds.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    total_steps = count_optimizer_steps(len(examples), config, world.world_size)
    warmup_steps = int(config.warmup_ratio * total_steps)
    run = progress or new_progress()
    log = metrics_log.write if metrics_log is not None else (lambda record: None)
    if eval_examples and run["step"] == 0:
        run["eval_loss_before"] = evaluate(model, eval_examples, config, pad_id, device)
        log(eval_record(0, run["eval_loss_before"]))

    # fp16 can underflow small gradients to zero: scale the loss up before backward and the
    # gradients back down before the step. bf16 has fp32's range and needs none of this.
    scaler = torch.amp.GradScaler(device.type, enabled=config.dtype == "fp16")
    if run.get("grad_scaler"):
        scaler.load_state_dict(run["grad_scaler"])
    model.train()
    lengths = [len(example["input_ids"]) for example in examples] if config.group_by_length else None
    windows = iter_windows(len(examples), config, run["epoch"], run["position"], lengths, world.world_size)
    bar = tqdm(total=total_steps, initial=run["step"], desc=config.mode, unit="step", dynamic_ncols=True,
               disable=not world.is_main)
    with bar, StopOnCtrlC() as ctrl_c:  # the bar ends its line however the loop ends
        for step in range(run["step"], total_steps):
            step_start = time.perf_counter()
            epoch, position, window = next(windows)
            lr = learning_rate(step, total_steps, warmup_steps, config.lr)
            for group in optimizer.param_groups:
                group["lr"] = lr

            # Collate the whole window first: the loss normaliser is its number of label tokens.
            # Under torchrun each rank collates only its own slice of the window.
            batches = [collate([examples[i] for i in ids], pad_id)
                       for ids in shard(window, config.batch_size, world)]
            window_label_tokens, samples, tokens, padded_tokens = window_counts(batches, device, world)
            run["samples"] += samples
            run["tokens"] += tokens
            run["padded_tokens"] += padded_tokens
            window_loss_sum = torch.zeros((), device=device)
            for batch in batches:
                batch = {key: value.to(device, non_blocking=True) for key, value in batch.items()}
                with autocast(device, config.dtype):
                    loss_sum = causal_lm_loss_sum(model, batch)
                # Divide by the label tokens of the whole window, not of this micro-batch: every
                # token then weighs the same however the window is split, so batch 1 x accum 8
                # and batch 8 x accum 1 produce the same gradient. (A per-micro-batch mean would
                # make a 5-token answer count as much as a 200-token one.) Across ranks, the
                # window is the global one: its label tokens are summed over every rank.
                scaler.scale(loss_sum / window_label_tokens).backward()
                window_loss_sum += loss_sum.detach()

            # The ranks' gradients are summed once per optimizer step, not per micro-batch:
            # afterwards every rank holds the same gradient, so clipping and the step agree.
            all_reduce_grads(params)
            scaler.unscale_(optimizer)  # clip the true gradient, not the fp16-scaled one
            grad_norm = torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm).item()
            window_loss_sum = all_reduce_sum(window_loss_sum).item()
            # An inf gradient under fp16 only means the loss scale was too high: the scaler
            # skips that step and lowers the scale. Anything else non-finite is divergence.
            if not (math.isfinite(window_loss_sum) and (math.isfinite(grad_norm) or scaler.is_enabled())):
                bar.close()
                raise NonFiniteLoss(f"the loss became non-finite at optimizer step {step + 1} of "
                                    f"{total_steps} (loss sum {window_loss_sum}, grad norm {grad_norm}); "
                                    f"stopped without saving, files already in {config.output_dir} "
                                    f"are untouched; try a lower --lr")
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            run["grad_scaler"] = scaler.state_dict()

            run.update(step=step + 1, epoch=epoch, position=position + 1)
            run["seconds"] += time.perf_counter() - step_start
            run["loss_sum"] += window_loss_sum
            run["label_tokens"] += window_label_tokens
            run["log_loss_sum"] += window_loss_sum
            run["log_label_tokens"] += window_label_tokens
            bar.set_postfix(loss=f"{window_loss_sum / window_label_tokens:.4f}",
                            tok_s=f"{run['tokens'] / run['seconds']:,.0f}")
            bar.update(1)
            last_step = step + 1 == total_steps
            if (step + 1) % config.log_every == 0 or last_step:
                log({"step": step + 1, "epoch": epoch, "lr": lr, "grad_norm": grad_norm,
                     "loss": run["log_loss_sum"] / run["log_label_tokens"],
                     "samples": run["samples"], "tokens": run["tokens"],
                     "seconds": round(run["seconds"], 3), "tokens_per_s": run["tokens"] / run["seconds"]})
                run.update(log_loss_sum=0.0, log_label_tokens=0)
            if eval_examples and (last_step or (config.eval_every and (step + 1) % config.eval_every == 0)):
                run["eval_loss_after"] = evaluate(model, eval_examples, config, pad_id, device)
                log(eval_record(step + 1, run["eval_loss_after"]))
            stop = any_rank(ctrl_c.pressed, device)  # every rank stops at the same step
            save = stop or (config.save_every and ((step + 1) % config.save_every == 0 or last_step))
            if save and world.is_main:  # the ranks hold the same state: one copy is enough
                save_training_state(checkpoint_dir or config.output_dir, model, optimizer, config, run)
            if stop and not last_step:
                bar.close()
                raise Interrupted(f"checkpoint saved at optimizer step {step + 1} of {total_steps} in "
                                  f"{config.output_dir}; continue with: python train.py --resume "
                                  f"{config.output_dir}")
    bar.close()
    return run


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
    return loss_sum / label_tokens


def autocast(device: torch.device, dtype: str):
    """Compute in bf16/fp16 where that is safe (matmuls), in fp32 where it is not (norms, softmax)."""
    if AUTOCAST_DTYPES[dtype] is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=AUTOCAST_DTYPES[dtype])


def eval_record(step: int, loss: float) -> dict:
    return {"step": step, "eval_loss": loss, "eval_perplexity": perplexity(loss)}


def window_counts(batches: list[dict], device, world) -> tuple[int, int, int, int]:
    """Label tokens, samples, tokens and padded positions of the window, summed over the ranks."""
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


class StopOnCtrlC:
    """While training, Ctrl-C asks for a stop after the current step (with a checkpoint);
    a second Ctrl-C stops at once."""

    def __enter__(self):
        self.pressed = False
        self.active = threading.current_thread() is threading.main_thread()  # signals need it
        if self.active:
            self.previous = signal.signal(signal.SIGINT, self._on_ctrl_c)
        return self

    def _on_ctrl_c(self, signum, frame):
        self.pressed = True
        signal.signal(signal.SIGINT, signal.default_int_handler)
        tqdm.write("Ctrl-C: stopping after this step and saving a checkpoint (press again to quit now)")

    def __exit__(self, *exc_info):
        if self.active:
            signal.signal(signal.SIGINT, self.previous)
