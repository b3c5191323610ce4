"""Merging a delta into its base for good, so that an ordinary model folder can carry it (python -m bitfit.export).

A delta with biases that --add-biases created needs an architecture whose config can switch those
biases on (LLaMA's attention_bias and mlp_bias); where none can, merging refuses.
"""

import copy

import torch

from bitfit.core.trainable import is_bias
from bitfit.errors import InputError
from bitfit.model.added_biases import add_zero_bias
from bitfit.store.delta import apply_bias_delta, delta_added_biases

# Config switches that give Linear layers biases: LLaMA's attention_bias (q, k, v and o projections)
# and mlp_bias (gate, up and down), also used by configs derived from LLaMA's.
BIAS_FLAGS = ("attention_bias", "mlp_bias")


def merge_bias_delta(model, tensors: dict, metadata: dict | None = None, force: bool = False) -> list[str]:
    """Put a delta into model for good, so that save_model_folder writes an ordinary
    model folder: check and apply it (bitfit.store.delta.apply_bias_delta), then switch on the config
    flags that give the biases --add-biases created a place in the folder; return those flags.
    """
    apply_bias_delta(model, tensors, metadata, force=force)
    added = delta_added_biases(metadata)
    return hold_added_biases(model, added) if added else []


def hold_added_biases(model, added: list[str]) -> list[str]:
    """Switch on the config flags that give the added biases a place in a saved model folder;
    return the flags switched on.

    A flag usually creates more biases than the delta trained (attention_bias creates q, k, v and
    o's): those get zeros, which change no output. Which flag creates which bias is found by
    building the model with it on the meta device (shapes only, no memory).
    """
    import transformers

    def bias_names(config) -> set[str]:
        with torch.device("meta"):
            skeleton = transformers.AutoModelForCausalLM.from_config(config)
        return {name for name, _ in skeleton.named_parameters() if is_bias(name)}

    config = copy.deepcopy(model.config)
    held = bias_names(config)
    for flag in BIAS_FLAGS:
        if getattr(config, flag, None) is False and not set(added) <= held:
            setattr(config, flag, True)
            with_flag = bias_names(config)
            if with_flag & (set(added) - held):
                held = with_flag
            else:
                setattr(config, flag, False)
    missing = [name for name in added if name not in held]
    if missing:
        raise InputError(f"a {type(model).__name__} cannot hold the biases that --add-biases added (such "
                         f"as {missing[0]}): its config has no switch for them, so no model folder can carry "
                         f"them; use the delta directly with generate.py --bias")
    present = {name for name, _ in model.named_parameters()}
    for name in sorted(held - present):
        add_zero_bias(model.get_submodule(name.removesuffix(".bias")))
    switched = [flag for flag in BIAS_FLAGS if getattr(config, flag, None) != getattr(model.config, flag, None)]
    for flag in switched:
        setattr(model.config, flag, True)
    return switched
