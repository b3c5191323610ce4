"""One BitFit optimizer step, top to bottom: python -m bitfit.walkthrough

Read this first. It takes one optimizer step on the built-in tiny GPT-2 and the first 8 rows of
the sample data, with plain torch and transformers calls and bitfit's own data helpers, and
prints what each stage makes. The trainer takes the same step (bitfit/core/step.py, train_step),
faster and with options; tests/test_walkthrough.py checks that both give the same biases.
It runs offline, in seconds.
"""

import sys

import torch
import torch.nn.functional as F

from bitfit.cli import ArgumentParser, run_main
from bitfit.config import DEFAULT_DATA, DEFAULT_MODEL
from bitfit.core.examples import IGNORE_INDEX, collate
from bitfit.data.rows import load_rows
from bitfit.data.tokenize import tokenize_rows
from bitfit.model.loading import load_model_and_tokenizer, pad_token_id

BATCH_SIZE = 2  # examples per micro-batch: the most that goes through the model at once
GRAD_ACCUM = 4  # micro-batches per optimizer step
ROWS = BATCH_SIZE * GRAD_ACCUM  # the examples of this one optimizer step: 8
LR = 1e-3  # BitFit's default learning rate (bitfit.config.DEFAULT_LR)
MAX_GRAD_NORM = 1.0
MAX_LEN = 256  # tokens per example, prompt included


def next_token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The causal-LM loss, summed: the logits at position i predict the token at i + 1, so they
    are scored against labels[:, 1:]; labels of -100 (prompt, padding) are skipped.
    (bitfit.core.loss.loss_sum_from_logits is the same.)"""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")


def main(argv=None) -> torch.nn.Module:
    """Take the step, print each stage, and return the model with its updated biases."""
    ArgumentParser(prog="python -m bitfit.walkthrough",
                   description="One BitFit optimizer step, top to bottom, on the built-in tiny GPT-2 and the "
                               "first 8 sample rows. It takes no flags.").parse_args([] if argv is None else argv)
    # 1. Load a causal LM and its tokenizer. For a real model this is AutoModelForCausalLM and
    # AutoTokenizer.from_pretrained; the built-in one is a 4-layer GPT-2 whose weights are drawn
    # from a fixed seed, so it needs no download. Dropout is switched off so that every run
    # prints the same numbers (a real run keeps it on).
    model, tokenizer = load_model_and_tokenizer(DEFAULT_MODEL)
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    model.train()

    # 2. BitFit: freeze every weight, train only the biases. A frozen tensor gets no gradient
    # and, below, no optimizer state: that is where BitFit's memory goes.
    for name, param in model.named_parameters():
        param.requires_grad_(name.endswith("bias"))
    biases = [param for param in model.parameters() if param.requires_grad]
    trainable, total = sum(p.numel() for p in biases), sum(p.numel() for p in model.parameters())
    print(f"freeze: {trainable:,} of {total:,} parameters train ({100 * trainable / total:.2f}%), "
          f"the {len(biases)} bias tensors")

    # 3. AdamW over the biases alone: its two moment buffers are as small as the biases.
    optimizer = torch.optim.AdamW(biases, lr=LR, weight_decay=0.0)

    # 4. Rows -> tokens and labels. The prompt (the template around the instruction) and the
    # response are tokenized; labels copy input_ids, but are -100 over the prompt, so the loss
    # trains the model to write the answer, never to repeat the question.
    rows = load_rows(DEFAULT_DATA, limit=ROWS)
    examples, _ = tokenize_rows(rows, tokenizer, MAX_LEN)
    show_tokens(tokenizer, min(examples, key=lambda example: len(example["input_ids"])), len(examples))

    # 5. Collate a window of micro-batches: right-pad each micro-batch to its longest example,
    # input_ids with the pad id, attention_mask 0 and labels -100 over the padding.
    window = [collate(examples[start:start + BATCH_SIZE], pad_token_id(tokenizer))
              for start in range(0, BATCH_SIZE * GRAD_ACCUM, BATCH_SIZE)]
    shapes = ", ".join(str(tuple(batch["input_ids"].shape)) for batch in window)
    print(f"window: {len(window)} micro-batches; input_ids, attention_mask, labels: {shapes}")

    # 6. The loss is divided by the label tokens of the whole window, so that every answer token
    # weighs the same however the window is split into micro-batches. Labels shift by one: the
    # logits at position i predict the token at i + 1, so position 0's label never counts.
    label_tokens = sum(int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()) for batch in window)
    print(f"label tokens in the window: {label_tokens}")

    # 7. Forward and backward, one micro-batch at a time: the plain forward pass gives logits for
    # every position, (examples, positions, vocabulary); backward adds this micro-batch's share to
    # the biases' .grad, so after the last one .grad holds the gradient of the window's loss.
    before = {name: param.detach().clone() for name, param in model.named_parameters()}
    window_loss_sum = 0.0
    for number, batch in enumerate(window, 1):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss_sum = next_token_loss_sum(logits, batch["labels"])
        (loss_sum / label_tokens).backward()
        window_loss_sum += loss_sum.item()
        print(f"micro-batch {number}: logits {tuple(logits.shape)}, loss sum {loss_sum.item():.2f} over "
              f"{int((batch['labels'][:, 1:] != IGNORE_INDEX).sum())} label tokens, backward")
    print(f"window loss: {window_loss_sum:.2f} / {label_tokens} = {window_loss_sum / label_tokens:.4f}")

    # 8. Clip the gradient's norm (over every bias at once) to MAX_GRAD_NORM, then step: AdamW
    # moves each bias; zeroing the gradients readies .grad for the next window.
    grad_norm = torch.nn.utils.clip_grad_norm_(biases, MAX_GRAD_NORM)
    print(f"clip: gradient norm {grad_norm.item():.4f}, clipped to {MAX_GRAD_NORM}")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)

    # 9. The same window's loss after the step, and what moved: every bias, no weight.
    loss_after = 0.0
    with torch.no_grad():
        for batch in window:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            loss_after += next_token_loss_sum(logits, batch["labels"]).item()
    print(f"step: AdamW; the window's loss is now {loss_after / label_tokens:.4f} "
          f"(before: {window_loss_sum / label_tokens:.4f})")
    moved = {name for name, param in model.named_parameters() if not torch.equal(param, before[name])}
    trained = {name for name, param in model.named_parameters() if param.requires_grad}
    print(f"moved: {len(moved & trained)} of {len(trained)} bias tensors, {len(moved - trained)} of "
          f"{len(before) - len(trained)} weight tensors")
    return model


def show_tokens(tokenizer, example: dict, examples: int) -> None:
    """One example's tokens beside its input_ids and labels: the prompt, the answer's start, its end."""
    length, prompt_length = len(example["input_ids"]), example["labels"].count(IGNORE_INDEX)
    print(f"tokens: the shortest of the {examples} examples has {length} tokens, "
          f"{prompt_length} of them prompt")
    print("    position  token            input_id  label")
    for position in range(length):
        if prompt_length + 4 <= position < length - 2:
            continue
        if position == length - 2:
            print("    ...")
        token = repr(tokenizer.decode([example["input_ids"][position]]))
        print(f"    {position:>8}  {token:<15}  {example['input_ids'][position]:>8}  "
              f"{example['labels'][position]:>5}")


if __name__ == "__main__":
    sys.exit(run_main(main, sys.argv[1:]))  # as every script: one line for bad input, library noise kept quiet
