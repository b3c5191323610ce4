"""--add-biases: zero biases on a model that has none (LLaMA, Mistral), so that BitFit has something to train.

LLaMA, Mistral and most recent models have no biases at all. add_biases gives the chosen Linear
layers zero biases first, so the model computes exactly what it did; each is marked as added,
which the delta records so that loading can create them again.
"""

import re

import torch

from bitfit.model.bias_names import BIAS_GROUPS, GROUP_MODULES, ends_with


def addable_biases(model: torch.nn.Module, bias_terms: str) -> dict[str, torch.nn.Linear]:
    """name the bias would have -> Linear layer, for the bias-less Linear layers bias_terms chooses.

    `all` means every Linear layer but the output head (often tied to the embedding, and no
    architecture's config can give it a bias on export); a group means its modules; any other
    term is a regular expression searched for in the name the bias would have.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    addable = {}
    for term in (term.strip() for term in bias_terms.split(",")):
        for path, module in model.named_modules():
            if not isinstance(module, torch.nn.Linear) or module.bias is not None or module is head:
                continue
            name = f"{path}.bias"
            if term == "all" or (term in GROUP_MODULES and ends_with(path, GROUP_MODULES[term])) or (
                    term not in BIAS_GROUPS and _searches(term, name)):
                addable[name] = module
    return addable


def _searches(pattern: str, name: str) -> bool:
    try:
        return re.search(pattern, name) is not None
    except re.error:
        return False  # choose_biases reports the bad expression


def add_biases(model: torch.nn.Module, bias_terms: str) -> list[str]:
    """Give the chosen bias-less Linear layers a zero bias; return the names of the added biases."""
    addable = addable_biases(model, bias_terms)
    for module in addable.values():
        add_zero_bias(module)
    return list(addable)


def add_zero_bias(module: torch.nn.Linear) -> None:
    """Register a zero bias on module: nn.Linear's forward adds it, which changes no output.

    The mark goes on the Parameter itself rather than in a list of names kept beside the model:
    it travels with the tensor whatever wraps the model or prefixes its names, and it leaves
    with the bias when remove_added_bias takes it away. The delta and the base fingerprint read it.
    """
    weight = module.weight
    module.bias = torch.nn.Parameter(torch.zeros(module.out_features, dtype=weight.dtype, device=weight.device),
                                     requires_grad=weight.requires_grad)
    module.bias.bitfit_added = True


def remove_added_bias(module: torch.nn.Linear) -> None:
    module.bias = None  # as nn.Linear(..., bias=False) registers it: the base, exactly


def is_added_bias(param: torch.Tensor) -> bool:
    return getattr(param, "bitfit_added", False)
