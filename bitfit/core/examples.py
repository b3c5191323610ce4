"""Examples and micro-batches: an example's tokens and labels, collate, and the order they are read in.

An example is a plain dict {"input_ids": [...], "labels": [...]}. Labels are aligned with
input_ids (labels[i] is input_ids[i] or -100) and are -100 over the prompt, so the model is trained
to write the response and never to echo the instruction; the loss shifts them, scoring the logits
at position i against labels[i + 1] (bitfit.core.loss). bitfit.data makes examples from rows.
"""

import torch

IGNORE_INDEX = -100  # cross_entropy skips targets with this value
GROUP_BUCKET = 64  # micro-batches sorted together by --group-by-length


def build_example(prompt_ids: list[int], response_ids: list[int], max_len: int) -> dict | None:
    """An example of a prompt and its response, cut at max_len; None where the cut leaves no label."""
    input_ids = (prompt_ids + response_ids)[:max_len]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + response_ids)[:max_len]
    if all(label == IGNORE_INDEX for label in labels):
        return None
    return {"input_ids": input_ids, "labels": labels}


def collate(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a micro-batch: input_ids with pad_id, attention_mask with 0, labels with -100.

    Padding is marked by position, never by token id, so when pad_id is the eos id (GPT-2
    has no pad token) the real eos at the end of each response keeps its label.
    """
    width = max(len(example["input_ids"]) for example in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    for row, example in enumerate(examples):
        length = len(example["input_ids"])
        input_ids[row, :length] = torch.tensor(example["input_ids"])
        attention_mask[row, :length] = 1
        labels[row, :length] = torch.tensor(example["labels"])
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def split_window(micro_batches: list[list[int]], lengths: dict[int, int], size: int | None) -> list[list[int]]:
    """Cut a window's examples (their indices, in micro-batches) into micro-batches of size, after sorting
    them by length (lengths: index -> tokens), so that a micro-batch holds examples of similar length and
    pads little. size None: the micro-batches as they are.

    The loss is summed over the window's label tokens and divided by their count, so how the window is cut
    changes no update (to float rounding): the window is the math, the micro-batch is the machine's. Unlike
    --group-by-length, which reorders examples across windows, this never moves an example to another step.
    """
    if size is None:
        return micro_batches
    ordered = sorted((index for batch in micro_batches for index in batch), key=lambda index: lengths[index])
    return [ordered[start:start + size] for start in range(0, len(ordered), size)]


def optimizer_windows(num_examples: int, batch_size: int, grad_accum: int, seed: int, epoch: int,
                      lengths: list[int] | None = None) -> list[list[list[int]]]:
    """One epoch's order: a list of accumulation windows, each a list of micro-batches of indices.

    The order is a seeded shuffle of examples, so batch 1 x accum 8 and batch 8 x accum 1 see
    the same eight examples in each optimizer step. The last window may be shorter.

    Given lengths (--group-by-length), each run of GROUP_BUCKET micro-batches of the shuffled
    order is sorted by length before it is cut, and the micro-batches are then shuffled again:
    a micro-batch holds examples of similar length, so little of it is padding, while the data
    stays shuffled at the scale of the bucket.
    """
    generator = torch.Generator().manual_seed(seed + epoch)
    order = torch.randperm(num_examples, generator=generator).tolist()
    if lengths is not None:
        bucket = batch_size * GROUP_BUCKET
        order = [i for start in range(0, num_examples, bucket)
                 for i in sorted(order[start:start + bucket], key=lambda i: lengths[i])]
    micro_batches = [order[i:i + batch_size] for i in range(0, num_examples, batch_size)]
    if lengths is not None:
        shuffle = torch.randperm(len(micro_batches), generator=generator).tolist()
        micro_batches = [micro_batches[i] for i in shuffle]
    return [micro_batches[i:i + grad_accum] for i in range(0, len(micro_batches), grad_accum)]
