"""Which parameters train: in BitFit, the biases (all, or chosen groups); in full fine-tuning, everything.

`--bias-terms` narrows BitFit to named groups of biases, or to regular expressions over parameter
names. The BitFit paper found that the query bias and the first (expanding) MLP bias alone recover
most of the gain at about half the parameters: `--bias-terms query,mlp-in`.

LLaMA, Mistral and most recent models have no biases at all. `--add-biases` gives the chosen
Linear layers zero biases first (add_biases), so the model computes exactly what it did and
BitFit has something to train.

A choice is a plain dict, term -> {parameter name: (mask, where)}: mask is a bool tensor over the
bias's entries when only a slice of it trains, None when all of it does; where says which slice.
"""

import re
import textwrap

import torch

from bitfit.errors import InputError

BIAS_GROUPS = ("all", "query", "key", "value", "attn-out", "mlp-in", "mlp-out", "norm")

# The modules that hold each group in the GPT-2, BLOOM, OPT, GPT-NeoX, Qwen2 and LLaMA families,
# matched on the end of the module's path: GPT-2 names both attn.c_proj (attn-out) and mlp.c_proj
# (mlp-out), which only their parent tells apart.
GROUP_MODULES = {
    "query": ("q_proj",),
    "key": ("k_proj",),
    "value": ("v_proj",),
    "attn-out": ("attn.c_proj", "self_attention.dense", "self_attn.out_proj", "attention.dense", "o_proj"),
    "mlp-in": ("mlp.c_fc", "dense_h_to_4h", "fc1", "gate_proj", "up_proj"),
    "mlp-out": ("mlp.c_proj", "dense_4h_to_h", "fc2", "down_proj"),
}
# Modules whose one bias holds query, key and value together, and how they are laid out in it.
# GPT-2's c_attn output is split in thirds, [q | k | v]. BLOOM's and GPT-NeoX's query_key_value
# output is viewed as (heads, 3 * head_dim) and split per head: [q_h, k_h, v_h] for each head h.
FUSED_QKV = {"attn.c_attn": "thirds", "query_key_value": "per-head"}
QKV = ("query", "key", "value")


def is_bias(name: str) -> bool:
    """Bias vectors of Linear, Conv1D and LayerNorm layers are all named '...bias'."""
    return name == "bias" or name.endswith(".bias")


def select_trainable(model: torch.nn.Module, mode: str, bias_terms: str = "all") -> list[str]:
    """Set requires_grad for the mode and return the names of the parameters that will train.

    Where only a slice of a fused bias is chosen, the whole tensor requires grad; its other
    entries are held still by mask_gradients (see there).
    """
    chosen = trained_entries(choose_biases(model, bias_terms)) if mode == "bitfit" else {}
    for name, param in model.named_parameters():
        # BitFit's whole idea: weights stay frozen, so autograd computes and stores no
        # gradient for them and AdamW keeps no moments for them; only the biases move.
        param.requires_grad_(mode == "full" or name in chosen)
    return list(trainable_parameters(model))


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


def ends_with(path: str, modules) -> bool:
    return any(f".{path}".endswith(f".{module}") for module in modules)


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


# ------------------------------------------------------------------ adding biases (--add-biases)


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
    weight decay would still shrink it: bitfit.run.build_optimizer gives these tensors no decay.
    The delta and the checkpoint store these tensors whole; the untouched slice in them equals
    the base's, so applying a delta stays a plain copy.

    Under --fsdp (bitfit.fsdp) each rank holds a shard of the tensor and of its mask. FSDP computes
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


def trainable_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """name -> parameter, for those that train (requires_grad), in the model's order: what the
    optimizer updates, the step clips and the checkpoint saves. In BitFit, the chosen biases."""
    return {name: param for name, param in model.named_parameters() if param.requires_grad}


def count_parameters(model: torch.nn.Module, masks: dict[str, torch.Tensor] | None = None) -> tuple[int, int]:
    """(trainable, total); tied weights (GPT-2's embedding and head) are counted once.

    A tensor in masks counts only the entries of its slice that train.
    """
    masks = masks or {}
    trainable = sum(int(masks[name].sum()) if name in masks else p.numel()
                    for name, p in trainable_parameters(model).items())
    # named_parameters gives each tensor once, as model.parameters() does: tied weights count once.
    return trainable, sum(p.numel() for _, p in model.named_parameters())


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


def describe_counts(trainable: int, total: int) -> str:
    return f"trainable params: {trainable:,} / {total:,} ({100 * trainable / total:.4f}%)"
