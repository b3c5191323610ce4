"""The plain BitFit step: what a learner reads, and all that training needs in one process.

    examples   an example's tokens and labels (-100 over the prompt), collate, the batch order
    trainable  BitFit itself: which tensors train, and AdamW over them alone
    loss       the causal-LM loss as a sum over label tokens (the definition the step calls)
    world      the processes a step runs on: one by default, every sum a no-op
    step       train_step: forward, token-weighted loss, backward, clip, step
    loop       train_loop: the steps, and the books kept around them (schedule, logs, evaluation)

Options reach the core as arguments with do-nothing defaults (a world, a loss-scaling object, a
loss function, a function called after each step), never as imports: the core knows nothing of
FSDP, 4-bit weights, GGUF files, run folders or checkpoints.

May import: the standard library, torch, tqdm; bitfit.errors
"""
