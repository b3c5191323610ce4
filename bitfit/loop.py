"""The training loop: the one function to read to see what a training step does."""

import math
import time

import torch
from tqdm import tqdm

from bitfit.data import collate, optimizer_windows
from bitfit.errors import InputError
from bitfit.loss import causal_lm_loss_sum, label_token_count


class NonFiniteLoss(InputError):
    """The loss or the gradient became inf/nan; the weights were not updated with it."""


def train_loop(model, optimizer, examples, config, *, pad_id, device, metrics_log=None) -> dict:
    """Train for config's epochs (or max_steps) and return what was done and how fast."""
    params = [p for p in model.parameters() if p.requires_grad]
    total_steps = count_optimizer_steps(len(examples), config)
    warmup_steps = int(config.warmup_ratio * total_steps)
    windows = iter_windows(len(examples), config)
    totals = {"samples": 0, "tokens": 0, "label_tokens": 0, "loss_sum": 0.0}
    since_log = {"loss_sum": 0.0, "label_tokens": 0}

    model.train()
    progress = tqdm(total=total_steps, desc=config.mode, unit="step", dynamic_ncols=True)
    start = time.perf_counter()
    for step in range(total_steps):
        epoch, window = next(windows)
        lr = learning_rate(step, total_steps, warmup_steps, config.lr)
        for group in optimizer.param_groups:
            group["lr"] = lr

        # Collate the whole window first: the loss normaliser is its number of label tokens.
        batches = [collate([examples[i] for i in ids], pad_id) for ids in window]
        window_label_tokens = sum(label_token_count(batch["labels"]) for batch in batches)
        window_loss_sum = torch.zeros((), device=device)
        for batch in batches:
            batch = {key: value.to(device) for key, value in batch.items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            loss_sum = causal_lm_loss_sum(logits, batch["labels"])
            # Divide by the label tokens of the whole window, not of this micro-batch: every
            # token then weighs the same however the window is split, so batch 1 x accum 8
            # and batch 8 x accum 1 produce the same gradient. (A per-micro-batch mean would
            # make a 5-token answer count as much as a 200-token one.)
            (loss_sum / window_label_tokens).backward()
            window_loss_sum += loss_sum.detach()
            totals["samples"] += batch["input_ids"].size(0)
            totals["tokens"] += int(batch["attention_mask"].sum())

        grad_norm = torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        window_loss_sum = window_loss_sum.item()
        if not (math.isfinite(window_loss_sum) and math.isfinite(grad_norm.item())):
            progress.close()
            raise NonFiniteLoss(f"the loss became non-finite at optimizer step {step + 1} of "
                                f"{total_steps} (loss sum {window_loss_sum}, grad norm "
                                f"{grad_norm.item()}); stopped without saving, files already in "
                                f"{config.output_dir} are untouched; try a lower --lr")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        totals["loss_sum"] += window_loss_sum
        totals["label_tokens"] += window_label_tokens
        since_log["loss_sum"] += window_loss_sum
        since_log["label_tokens"] += window_label_tokens
        elapsed = time.perf_counter() - start
        loss = window_loss_sum / window_label_tokens
        progress.set_postfix(loss=f"{loss:.4f}", tok_s=f"{totals['tokens'] / elapsed:,.0f}")
        progress.update(1)
        if metrics_log is not None and ((step + 1) % config.log_every == 0 or step + 1 == total_steps):
            metrics_log.write({
                "step": step + 1, "epoch": epoch, "lr": lr, "grad_norm": grad_norm.item(),
                "loss": since_log["loss_sum"] / since_log["label_tokens"],
                "samples": totals["samples"], "tokens": totals["tokens"],
                "elapsed_s": round(elapsed, 3), "tokens_per_s": totals["tokens"] / elapsed,
            })
            since_log = {"loss_sum": 0.0, "label_tokens": 0}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    progress.close()
    return {
        "optimizer_steps": total_steps,
        "samples": totals["samples"],
        "tokens": totals["tokens"],
        "label_tokens": totals["label_tokens"],
        # Token-weighted over the run, like each step's loss: total loss / total label tokens.
        "train_loss": totals["loss_sum"] / totals["label_tokens"],
        "seconds": seconds,
    }


def count_optimizer_steps(num_examples: int, config) -> int:
    if config.max_steps is not None:
        return config.max_steps
    micro_batches = math.ceil(num_examples / config.batch_size)
    return config.epochs * math.ceil(micro_batches / config.grad_accum)


def iter_windows(num_examples: int, config):
    """Yield (epoch, window) forever, reshuffling at each epoch; the loop takes what it needs."""
    epoch = 0
    while True:
        for window in optimizer_windows(num_examples, config.batch_size, config.grad_accum,
                                        config.seed, epoch):
            yield epoch, window
        epoch += 1


def learning_rate(step: int, total_steps: int, warmup_steps: int, peak_lr: float) -> float:
    """Linear warmup to peak_lr over warmup_steps, then linear decay towards 0 at total_steps."""
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    return peak_lr * (total_steps - step) / (total_steps - warmup_steps)
