"""A delta as a PEFT adapter (python -m bitfit.export --format peft): `PeftModel.from_pretrained(base, DIR)`.

PEFT's bias-only method, BEFT (peft 0.20 and later), adds a trained vector to the output of chosen
nn.Linear layers: exactly what a tuned bias does. Its vector is what training changed, trained minus
base, so that base plus adapter gives the tuned model; for a bias that --add-biases created, the base
has none and the vector is the trained bias itself. peft builds and saves the adapter (its config and
tensor names are peft's own); bitfit adds its delta's metadata (the base's fingerprint among it) to the
safetensors file, where peft's loader ignores it.
"""

import warnings
from pathlib import Path

import torch

from bitfit.errors import InputError
from bitfit.store.files import atomic_write, record_export, replace_folder

ADAPTER_WEIGHTS = "adapter_model.safetensors"
# The groups whose biases sit on nn.Linear layers wherever a model has them (norms never do).
BIAS_TERMS_THAT_EXPORT = "query,key,value,attn-out,mlp-in,mlp-out"


def import_peft():
    try:
        from peft import BeftConfig, get_peft_model
    except ImportError:
        raise InputError("--format peft needs peft 0.20 or later, which has BEFT (pip install 'peft>=0.20')") from None
    return BeftConfig, get_peft_model


def linear_layers(model, names: list[str]) -> dict[str, str]:
    """name of each trained bias -> the path of its nn.Linear layer; a bias on any other layer (GPT-2's
    Conv1D, a LayerNorm), which BEFT cannot hold, is refused in one line that names them."""
    layers, refused = {}, []
    for name in names:
        path = name.removesuffix(".bias")
        try:
            layer = model.get_submodule(path)
        except AttributeError:
            layer = None
        if isinstance(layer, torch.nn.Linear) and name.endswith(".bias"):
            layers[name] = path
        else:
            refused.append(f"{name} ({type(layer).__name__})")
    if refused:
        shown = ", ".join(refused[:3]) + (f" and {len(refused) - 3} more" if len(refused) > 3 else "")
        hint = (f"a delta trained with --bias-terms {BIAS_TERMS_THAT_EXPORT} exports" if layers else
                "none of this model's biases are, so export --format hf")
        raise InputError(f"--format peft: BEFT adapts nn.Linear layers only, and {shown} is not on one; {hint}")
    return layers


def write_peft_adapter(model, tensors: dict[str, torch.Tensor], metadata: dict[str, str], out: Path,
                       base_model: str, record: dict) -> None:
    """Write the delta (checked against model, its base) as a BEFT adapter folder at out, whole or not at all."""
    BeftConfig, get_peft_model = import_peft()
    layers = linear_layers(model, list(tensors))
    params = dict(model.named_parameters())
    # What training changed: trained minus base, where the base has the bias; the bias itself where it was added.
    vectors = {name: (tensor.float() - params[name].detach().float().cpu()) if name in params else tensor.float()
               for name, tensor in tensors.items()}
    config = BeftConfig(task_type="CAUSAL_LM", target_modules=sorted(layers.values()))
    with warnings.catch_warnings():  # a base layer without a bias: "you cannot merge" (peft's merge, not ours)
        warnings.simplefilter("ignore")
        adapted = get_peft_model(model, config)
    adapted.peft_config["default"].base_model_name_or_path = base_model
    with torch.no_grad():
        for name, path in layers.items():
            adapted.base_model.model.get_submodule(path).beft_bias["default"].copy_(vectors[name].reshape(1, -1))

    def write(staging: Path) -> None:
        adapted.save_pretrained(staging)
        keep_metadata(staging / ADAPTER_WEIGHTS, metadata)
        record_export(staging, record)

    replace_folder(out, write)


def keep_metadata(path: Path, metadata: dict[str, str]) -> None:
    """Add the delta's metadata to the adapter's safetensors file, under keys that say whose it is."""
    from safetensors.torch import load_file, safe_open
    from safetensors.torch import save as safetensors_bytes

    with safe_open(str(path), framework="pt") as handle:
        existing = handle.metadata() or {}
    tensors = load_file(str(path))
    bitfit = {f"bitfit.{key}": value for key, value in metadata.items()}
    atomic_write(path, lambda tmp: tmp.write_bytes(safetensors_bytes(tensors, metadata={**existing, **bitfit})))


def read_bitfit_metadata(path: Path) -> dict[str, str]:
    """The delta metadata kept in an adapter written by write_peft_adapter (empty for another adapter)."""
    from safetensors.torch import safe_open

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    return {key.removeprefix("bitfit."): value for key, value in metadata.items() if key.startswith("bitfit.")}

