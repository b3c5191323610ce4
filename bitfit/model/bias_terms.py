"""Which biases train (--bias-terms): all of them, named groups, regular expressions, or slices of a fused bias.

`--bias-terms` narrows BitFit to named groups of biases, or to regular expressions over parameter
names. The BitFit paper found that the query bias and the first (expanding) MLP bias alone recover
most of the gain at about half the parameters: `--bias-terms query,mlp-in`.

A choice is a plain dict, term -> {parameter name: (mask, where)}: mask is a bool tensor over the
bias's entries when only a slice of it trains, None when all of it does; where says which slice.
The names chosen go to bitfit.core.trainable.train_only, which freezes everything else.
"""

import re
import textwrap

import torch

from bitfit.core.trainable import is_bias, train_only
from bitfit.errors import InputError
from bitfit.model.added_biases import addable_biases
from bitfit.model.bias_names import BIAS_GROUPS, FUSED_QKV, GROUP_MODULES, QKV, ends_with


def select_trainable(model: torch.nn.Module, mode: str, bias_terms: str = "all") -> list[str]:
    """Set requires_grad for the mode (in BitFit, the biases bias_terms chooses; in full, everything)
    and return the names of the parameters that will train.

    Where only a slice of a fused bias is chosen, the whole tensor requires grad; its other
    entries are held still by mask_gradients (see there).
    """
    if mode == "full":
        return train_only(model, [name for name, _ in model.named_parameters()])
    return train_only(model, trained_entries(choose_biases(model, bias_terms)))


def choose_biases(model: torch.nn.Module, bias_terms: str) -> dict[str, dict]:
    """term -> {name: (mask or None, where)} for each comma-separated term of bias_terms.

    A term is a group name or, failing that, a regular expression searched for in parameter
    names, which chooses whole bias tensors. A term that chooses nothing is an InputError that
    lists the groups this model has.
    """
    chosen = {}
    for term in (term.strip() for term in bias_terms.split(",")):
        if term in BIAS_GROUPS:
            chosen[term] = group_biases(model, term)
            if not chosen[term]:
                what = "biases" if term == "all" else f"{term} biases"
                raise InputError(f"--bias-terms {term}: this {type(model).__name__} has no {what}; "
                                 f"{groups_listing(model)}{add_biases_hint(model, term)}")
            continue
        try:
            pattern = re.compile(term)
        except re.error as error:
            raise InputError(f"--bias-terms {term!r} is neither a group nor a valid regular expression "
                             f"({error}); {groups_listing(model)}") from None
        chosen[term] = {name: (None, "") for name, _ in model.named_parameters()
                        if is_bias(name) and pattern.search(name)}
        if not chosen[term]:
            raise InputError(f"--bias-terms {term!r} is neither a group nor a regular expression that "
                             f"matches a bias of this {type(model).__name__}; {groups_listing(model)}"
                             f"{add_biases_hint(model, term)}")
    return chosen


def group_biases(model: torch.nn.Module, group: str) -> dict[str, tuple]:
    """{name: (mask or None, where)} of the group's biases in model; empty if it has none."""
    parts = {}
    for name, param in model.named_parameters():
        if not is_bias(name):
            continue
        path = name.removesuffix("bias").removesuffix(".")
        if group == "all" or (group in GROUP_MODULES and ends_with(path, GROUP_MODULES[group])):
            parts[name] = (None, "")
        elif group == "norm" and "norm" in type(model.get_submodule(path)).__name__.lower():
            parts[name] = (None, "")  # LayerNorm's shift, whatever the layer is called
        elif group in QKV:
            for module, layout in FUSED_QKV.items():
                if ends_with(path, (module,)):
                    parts[name] = fused_slice(param.numel(), layout, QKV.index(group),
                                              model.config.num_attention_heads)
    return parts


def fused_slice(size: int, layout: str, which: int, num_heads: int) -> tuple[torch.Tensor, str]:
    """(mask, where) of query (which=0), key (1) or value (2) in a fused q,k,v bias of size entries."""
    mask = torch.zeros(size, dtype=torch.bool)
    if layout == "thirds":
        start, stop = which * size // 3, (which + 1) * size // 3
        mask[start:stop] = True
        return mask, f"[{start}:{stop}]"
    head_dim = size // (3 * num_heads)
    mask.view(num_heads, 3, head_dim)[:, which] = True
    return mask, f".view({num_heads}, 3, {head_dim})[:, {which}]"


def groups_listing(model: torch.nn.Module) -> str:
    present = [group for group in BIAS_GROUPS if group_biases(model, group)]
    if not present:
        return "it has no bias terms at all, so BitFit has nothing to train"
    return (f"the groups it has: {', '.join(present)} (or give a regular expression over parameter "
            f"names)")


def add_biases_hint(model: torch.nn.Module, term: str) -> str:
    """What to do when term chooses no bias: --add-biases, where it would find bias-less Linear layers."""
    if addable_biases(model, term):
        return "; --add-biases gives its bias-less Linear layers zero biases to train"
    if not any(is_bias(name) for name, _ in model.named_parameters()):
        return " (--mode full trains every weight)"
    return ""


def trained_entries(chosen: dict[str, dict]) -> dict[str, torch.Tensor | None]:
    """name -> mask of the entries that train, or None where the whole tensor trains."""
    entries = {}
    for parts in chosen.values():
        for name, (mask, _) in parts.items():
            if name in entries and (entries[name] is None or mask is None):
                entries[name] = None
            elif name in entries:
                entries[name] = entries[name] | mask
            else:
                entries[name] = mask
    # query, key and value chosen together make a fused bias whole again.
    return {name: None if mask is not None and bool(mask.all()) else mask for name, mask in entries.items()}


def partly_trained(model: torch.nn.Module, bias_terms: str) -> dict[str, torch.Tensor]:
    """name -> mask of the entries that train, for the tensors of which only a slice does."""
    entries = trained_entries(choose_biases(model, bias_terms))
    return {name: mask for name, mask in entries.items() if mask is not None}


def mask_gradients(model: torch.nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Zero the gradient outside the chosen slice of each partly trained tensor, each time one is
    accumulated into .grad: clipping then measures only what trains, and AdamW leaves the rest unmoved.

    With a gradient of exactly zero, AdamW's moments stay zero and its update there is
    0 / (sqrt(0) + eps) = 0, so the untouched slice stays bit-identical to the base. Only decoupled
    weight decay would still shrink it: bitfit.core.trainable.build_optimizer gives these tensors no decay.
    The delta and the checkpoint store these tensors whole; the untouched slice in them equals
    the base's, so applying a delta stays a plain copy.

    Under --fsdp (bitfit.parallel.fsdp) each rank holds a shard of the tensor and of its mask. FSDP computes
    the gradient on a gathered copy, so a hook on the gradient on its way (register_hook) would never
    see the shard; the hook after accumulation runs once FSDP has put its shard's reduced gradient in .grad.
    """
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        params[name].register_post_accumulate_grad_hook(zero_gradient_outside(mask))


def zero_gradient_outside(keep: torch.Tensor):
    def hook(param):
        # The mask follows the gradient to its device: the model moves there after it is frozen.
        param.grad.masked_fill_(~keep.to(param.grad.device), 0)
    return hook


def describe_bias_terms(model: torch.nn.Module, bias_terms: str) -> str:
    """One line per term: its tensors and slices, and how many numbers."""
    sizes = {name: param.numel() for name, param in model.named_parameters()}
    lines = []
    for term, parts in choose_biases(model, bias_terms).items():
        layers = {}  # per-layer names folded into one pattern; a name alone in its pattern stays as is
        for name, (_, where) in parts.items():
            layers.setdefault(re.sub(r"\.\d+\.", ".*.", name) + where, []).append(name + where)
        patterns = [pattern if len(names) > 1 else names[0] for pattern, names in layers.items()]
        numbers = sum(sizes[name] if mask is None else int(mask.sum()) for name, (mask, _) in parts.items())
        lines.append(textwrap.fill(f"trains {term}: {', '.join(patterns)} ({len(parts)} tensors, {numbers:,} "
                                   f"numbers)", width=100, subsequent_indent="    ",
                                   break_long_words=False, break_on_hyphens=False))
    return "\n".join(lines)
