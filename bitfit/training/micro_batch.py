"""--micro-batch auto: the micro-batch that runs a window fastest on this machine, within its memory.

The window (--batch-size x --grad-accum examples) is the math: the loss is divided by its label tokens,
so how it is cut changes no update. How it is cut is the machine's business. The seed notebook ran one
example at a time because full fine-tuning of bloomz-1b1 filled its GPU; BitFit needs a fraction of that
memory, and a GPU runs eight examples at once in little more time than one. A CPU is different: small
matmuls gain little from batching, and padding costs real work, so there the best cut must be measured.

    CUDA  the largest micro-batch that fits, before the first step: tried from the whole window down, each
          on a worst-case micro-batch (every row --max-len tokens, every token a label), backing off on
          out-of-memory (in a forked random state, no gradient left behind)
    CPU   the fastest, measured on the first windows as they train: after one window to warm up, the
          candidate sizes cut one window each, from the largest down, timed in tokens a second, until one
          is slower than the one before; the fastest cuts the rest. Every cut of a window is the same
          update, so the probing costs nothing but the slower windows' extra time.

The choice is said in one line and recorded in train_config.json (and in later checkpoints), so that
--resume keeps it.
"""


import torch

from bitfit.core.examples import collate
from bitfit.core.loop import FixedMicroBatch, iter_windows
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


def micro_batches(model, examples, config, *, pad_id: int, device: torch.device, loss_fn, world, decided):
    """What train_loop cuts each window with under --micro-batch auto; decided(size, why) is called once the
    size is known (on CUDA at once, on the CPU after the probing windows)."""
    sizes = candidate_sizes(config.batch_size * config.grad_accum)
    if device.type != "cuda":
        return TryEachSize(sizes, decided)
    _, _, first = next(iter_windows(len(examples), config, world_size=world.world_size))
    read = {index: examples[index] for ids in world.shard(first, config.batch_size) for index in ids}
    model.train()
    with torch.random.fork_rng(devices=[device]):
        size, tried = largest_that_fits(model, read, sizes, config, pad_id, device, loss_fn)
    decided(size, f"the largest of {', '.join(map(str, sizes))} that fits a worst-case micro-batch ({tried})")
    return FixedMicroBatch(size)


class TryEachSize:
    """On the CPU: the first window warms up (at the whole window, untimed); the next windows try the
    candidate sizes from the largest down, one window each, until one is slower than the size before it
    (a CPU's speed rises with the micro-batch until padding and memory traffic outweigh batching, then
    falls: past that point smaller sizes only cost more); from then on every window is cut at the fastest."""

    def __init__(self, sizes: list[int], decided):
        self.sizes, self.decided = sorted(sizes, reverse=True), decided
        self.first = self.chosen = None
        self.rates = {}  # size -> tokens a second
        self.trials = []  # (tokens, seconds) of each probing window

    def for_step(self, step: int) -> int:
        if self.first is None:
            self.first = step
        if self.chosen is not None:
            return self.chosen
        trial = step - self.first - 1
        return self.sizes[trial] if 0 <= trial < len(self.sizes) else self.sizes[-1]

    def measured(self, step: int, tokens: int, seconds: float) -> None:
        trial = step - self.first - 1
        if self.chosen is None and 0 <= trial < len(self.sizes):
            size = self.sizes[trial]
            self.rates[size] = tokens / seconds
            self.trials.append((tokens, seconds))
            slower = trial > 0 and self.rates[size] < self.rates[self.sizes[trial - 1]]
            if slower or len(self.rates) == len(self.sizes):
                self.choose()

    def choose(self) -> None:
        """Settle on the fastest size tried (a run that ends sooner settles on what it tried)."""
        if self.chosen is None and self.rates:
            self.chosen = max(self.rates, key=self.rates.get)
            # What probing cost: the probing windows' time beyond what the chosen size would have taken.
            cost = sum(seconds - tokens / self.rates[self.chosen] for tokens, seconds in self.trials)
            self.decided(self.chosen, "the fastest on the first windows, one window each: " + ", ".join(
                f"{size}: {rate:,.0f} tokens/s" for size, rate in self.rates.items())
                + f"; probing cost {cost:.1f} s over training at {self.chosen} throughout")


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

