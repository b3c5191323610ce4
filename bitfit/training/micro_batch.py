"""--micro-batch auto: the micro-batch that runs a window fastest on this machine, within its memory.

The window (--batch-size x --grad-accum examples) is the math: the loss is divided by its label tokens,
so how it is cut changes no update. How it is cut is the machine's business. The seed notebook ran one
example at a time because full fine-tuning of bloomz-1b1 filled its GPU; BitFit needs a fraction of that
memory, and a GPU runs eight examples at once in little more time than one. A CPU is different: small
matmuls gain little from batching, and padding costs real work, so there the best cut must be measured.

    CUDA  the largest micro-batch that fits: tried from the whole window down, each on a worst-case
          micro-batch (every row --max-len tokens, every token a label), backing off on out-of-memory
    CPU   the fastest: the first window, forward and backward, timed at each candidate size in turn,
          round after round (up to PROBE_ROUNDS, or PROBE_SECONDS), the best time of each counting

Probing takes no optimizer step and leaves no gradient behind, and it runs in a forked random state, so
dropout's draws in training are the ones a run with that micro-batch given by number makes.
"""

import time

import torch

PROBE_ROUNDS = 3  # rounds over the candidates: the best of each size's times counts, as timeit's does
PROBE_SECONDS = 4.0  # no new round starts after this long: a large model gets one or two

from bitfit.core.examples import collate, split_window
from bitfit.core.loop import iter_windows
from bitfit.core.loss import label_token_count
from bitfit.core.step import autocast
from bitfit.core.trainable import trainable_parameters


def candidate_sizes(window: int) -> list[int]:
    """Powers of two below the window, and the window itself: 1, 2, 4, 8 for the seed's 1 x 8."""
    sizes, size = [], 1
    while size < window:
        sizes.append(size)
        size *= 2
    return sizes + [window]


def choose_micro_batch(model, examples, config, *, pad_id: int, device: torch.device, loss_fn, world, log) -> int:
    """The micro-batch --micro-batch auto trains with, said in one line (see the module's docstring)."""
    window = config.batch_size * config.grad_accum  # this rank's examples in a window
    sizes = candidate_sizes(window)
    _, _, first = next(iter_windows(len(examples), config, world_size=world.world_size))
    mine = world.shard(first, config.batch_size)
    read = {index: examples[index] for ids in mine for index in ids}
    model.train()  # timed as it trains: dropout on where the model has it
    start = time.perf_counter()
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        if device.type == "cuda":
            chosen, tried = largest_that_fits(model, read, sizes, config, pad_id, device, loss_fn)
            how = f"the largest of {', '.join(map(str, sizes))} that fits a worst-case micro-batch ({tried})"
        else:
            seconds = best_times(model, read, mine, sizes, config, pad_id, device, loss_fn)
            total = world.sum(torch.tensor([seconds[size] for size in sizes], dtype=torch.float64)).tolist()
            chosen = sizes[min(range(len(sizes)), key=lambda index: total[index])]
            how = "the fastest on the first window: " + ", ".join(f"{size}: {seconds[size]:.2f} s" for size in sizes)
    log(f"--micro-batch auto: {chosen}, {how}; probing took {time.perf_counter() - start:.1f} s")
    return chosen


def forward_backward(model, batches: list[dict], config, device, loss_fn) -> None:
    """What train_step does with a window's micro-batches before its step; the gradients are then dropped."""
    label_tokens = max(1, sum(label_token_count(batch["labels"]) for batch in batches))
    try:
        for batch in batches:
            batch = {key: value.to(device) for key, value in batch.items()}
            with autocast(device, config.dtype):
                loss = loss_fn(model, batch) / label_tokens
            loss.backward()
    finally:
        for param in trainable_parameters(model).values():
            param.grad = None


def best_times(model, read: dict, mine: list[list[int]], sizes: list[int], config, pad_id, device, loss_fn
               ) -> dict[int, float]:
    """size -> the fewest seconds the window's forward and backward passes took cut into micro-batches of
    size. The sizes take turns, so that a busy moment of the machine falls on one try of each, not on
    all tries of one; one untimed micro-batch of each first, so that none pays for the set-up."""
    lengths = {index: len(example["input_ids"]) for index, example in read.items()}
    cuts = {size: [collate([read[index] for index in ids], pad_id) for ids in split_window(mine, lengths, size)]
            for size in sizes}
    for batches in cuts.values():
        forward_backward(model, batches[:1], config, device, loss_fn)
    best, start = dict.fromkeys(sizes, float("inf")), time.perf_counter()
    for _ in range(PROBE_ROUNDS):
        for size in sizes:
            began = time.perf_counter()
            forward_backward(model, cuts[size], config, device, loss_fn)
            best[size] = min(best[size], time.perf_counter() - began)
        if time.perf_counter() - start > PROBE_SECONDS:
            break
    return best


def largest_that_fits(model, read: dict, sizes: list[int], config, pad_id, device, loss_fn) -> tuple[int, str]:
    """The largest size whose worst-case micro-batch (the window's longest example, grown to --max-len
    tokens, all of them labels, size times) runs forward and backward without running out of memory."""
    longest = max(read.values(), key=lambda example: len(example["input_ids"]))["input_ids"]
    tokens = (longest * (config.max_len // len(longest) + 1))[:config.max_len]
    tried = []
    for size in reversed(sizes):
        batch = collate([{"input_ids": tokens, "labels": tokens}] * size, pad_id)
        try:
            forward_backward(model, [batch], config, device, loss_fn)
            tried.append(f"{size} fits")
            return size, "; ".join(tried)
        except torch.OutOfMemoryError:
            tried.append(f"{size} ran out of memory")
        finally:
            del batch
            torch.cuda.empty_cache()  # what the failed try allocated goes back before the next
    return 1, "; ".join(tried)  # even one did not fit: the run will say so at its first step

