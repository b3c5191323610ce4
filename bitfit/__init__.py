"""bitfit: fine-tune only the bias terms of a causal language model (BitFit).

Start with `python -m bitfit.walkthrough`: one optimizer step, written out with plain calls. Then
bitfit/core/step.py, train_step: the same step as the trainer takes it.

The packages, each a layer that imports only the ones above it in this list (each __init__.py
says what it may import; tests/test_architecture.py holds it to that):
    core      the plain BitFit step: examples and collate, what trains, the loss, train_step, train_loop
    data      rows, the four data formats, the prompt templates, rows -> examples
    model     loading (hub, folder, GGUF, built-in), bias terms, added biases, precision, 4-bit, answering
    store     what a run stores: atomic files, deltas, the run folder, training checkpoints, metrics
    parallel  several processes: torchrun, --fsdp
    training  a whole run: the setup steps every caller shares, the run, its summary
Beside them, shared by all: errors (the errors a user meets) and config (the run's settings, one
dataclass). The commands: walkthrough, compare, export, fetch, bench, estimate, experiment (each
`python -m bitfit.NAME`), and cli, what they and train.py and generate.py share.

The names below are the public API, for a notebook or a loop of your own (the README shows
them at work): `import bitfit`, then `bitfit.train_step(...)`.
"""

import importlib

# Public name -> the module that defines it ("module:name" where the name differs). Each is
# imported on first use: the command-line tools import bitfit.cli, which runs this file first,
# and they answer --help and flag errors without loading torch.
PUBLIC = {
    "InputError": "bitfit.errors",
    "Diverged": "bitfit.errors",
    "TrainConfig": "bitfit.config",
    # a model and its tokenizer
    "load_model_and_tokenizer": "bitfit.model.loading",
    "pad_token_id": "bitfit.model.loading",
    # what trains
    "select_trainable": "bitfit.model.bias_terms",
    "trainable_parameters": "bitfit.core.trainable",
    "count_parameters": "bitfit.core.trainable",
    "build_optimizer": "bitfit.core.trainable",
    # data
    "load_rows": "bitfit.data.rows",
    "tokenize_rows": "bitfit.data.tokenize",
    "collate": "bitfit.core.examples",
    # the loss and the step
    "loss_sum_from_logits": "bitfit.core.loss",
    "causal_lm_loss_sum": "bitfit.core.loss",
    "label_loss_sum": "bitfit.model.label_loss",
    "label_token_count": "bitfit.core.loss",
    "train_step": "bitfit.core.step",
    "train_loop": "bitfit.core.loop",
    # a whole run, as train.py makes it (bitfit.training.run.run)
    "train": "bitfit.training.run:run",
    # deltas
    "save_bias_delta": "bitfit.store.delta",
    "load_bias_delta": "bitfit.store.delta",
    "apply_bias_delta": "bitfit.store.delta",
    "remove_bias_delta": "bitfit.store.delta",
    "merge_bias_delta": "bitfit.store.merge",
    "save_model_folder": "bitfit.store.files",
    "generate_answers": "bitfit.model.generation",
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
