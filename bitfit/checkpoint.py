"""Files a run leaves behind: bias deltas, model folders and JSON, each written atomically.

Every write goes to a temporary name in the destination folder and is then renamed over the
target (a rename within one filesystem is atomic), so a crash leaves the old file or the new
one, never half of one.
"""

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from bitfit.errors import InputError

BIAS_FILE = "bias.safetensors"
DELTA_FORMAT = "bitfit-bias-delta/1"


def atomic_write(path: Path, write) -> None:
    """Call write(temporary_path), then move the result onto path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(temporary)
        os.replace(temporary, path)
    finally:
        if temporary.exists():
            temporary.unlink()


def save_json(path: Path, data) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2) + "\n"))


def save_bias_delta(path: Path, model: torch.nn.Module, names: list[str], base_model: str) -> None:
    """Save the named trained tensors, under their state-dict names, with the base they fit."""
    params = dict(model.named_parameters())
    tensors = {name: params[name].detach().to("cpu", copy=True).contiguous() for name in names}
    metadata = {"format": DELTA_FORMAT, "base_model": base_model,
                "model_class": type(model).__name__}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def find_bias_file(path: str) -> Path:
    """Accept a run folder (holding bias.safetensors) or the file itself."""
    candidate = Path(path)
    if candidate.is_dir():
        candidate = candidate / BIAS_FILE
    if not candidate.is_file():
        raise InputError(f"bias delta not found: {candidate}")
    return candidate


def load_bias_delta(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Return (tensors, metadata) of a delta file."""
    file = find_bias_file(path)
    try:
        with safe_open(str(file), framework="pt") as handle:
            metadata = handle.metadata() or {}
        tensors = load_file(str(file))
    except (SafetensorError, OSError, ValueError) as error:
        raise InputError(f"{file}: not a readable safetensors file ({error})") from None
    return tensors, metadata


def apply_bias_delta(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy each delta tensor into the model parameter of the same name."""
    params = dict(model.named_parameters())
    for name, tensor in tensors.items():
        if name not in params:
            raise InputError(f"bias delta holds {name!r}, which the model does not have")
        if params[name].shape != tensor.shape:
            raise InputError(f"bias delta tensor {name!r} has shape {tuple(tensor.shape)}, "
                             f"the model's has {tuple(params[name].shape)}")
    with torch.no_grad():
        for name, tensor in tensors.items():
            params[name].copy_(tensor)


def save_model_folder(folder: Path, model, tokenizer) -> None:
    """Write a Hugging Face model folder, replacing any old one only once the new one is whole."""
    folder = Path(folder)
    staging = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    retired = folder.with_name(f".{folder.name}.old-{os.getpid()}")
    if folder.exists():
        os.replace(folder, retired)
    os.replace(staging, folder)
    shutil.rmtree(retired, ignore_errors=True)
