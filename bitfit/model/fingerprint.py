"""A base model's fingerprint: a short hash that tells one base from another, so that a delta or a
training checkpoint is never paired with weights it was not trained on."""

import hashlib
import json

import torch

from bitfit.model.added_biases import is_added_bias

FINGERPRINT_HEAD = 4  # values sampled from the start of each frozen tensor, plus its last


def base_fingerprint(model: torch.nn.Module, delta_names) -> str:
    """A short hash that tells one base model from another: names, shapes and a few values.

    Only the frozen parameters (those not in the delta) count, since training changes the rest;
    biases added by --add-biases are not the base's, and never count.
    Hashing whole tensors would read every weight of a 1B model; the first few values and the
    last of each tensor tell one checkpoint from another (fine-tuning moves nearly every value,
    though a single edited weight would go unseen), and they reach the CPU in one transfer.
    They are rounded to bfloat16 first, so the same base loaded in fp32 or bf16 matches.
    """
    delta_names = set(delta_names)
    frozen = sorted(((name, param) for name, param in model.named_parameters()
                     if name not in delta_names and not is_added_bias(param)), key=lambda item: item[0])
    modules = dict(model.named_modules())
    shapes, samples = [], []
    for name, param in frozen:
        owner, _, leaf = name.rpartition(".")
        # A weight held in 4 bits (bitfit.model.quantize) no longer has the base's values; its layer kept
        # the sample of the weight it replaced, so the 4-bit base and the plain one match.
        recorded = getattr(modules[owner], "unquantized_sample", None) if leaf == "weight" else None
        shape, values = recorded or fingerprint_sample(param)
        shapes.append([name, shape])
        samples.append(values.to(param.device))
    values = torch.cat(samples).cpu() if samples else torch.empty(0, dtype=torch.bfloat16)
    digest = hashlib.sha256(json.dumps(shapes).encode())
    digest.update(values.view(torch.int16).numpy().tobytes())  # numpy has no bfloat16: hash the bits
    return digest.hexdigest()[:16]


def fingerprint_sample(tensor: torch.Tensor) -> tuple[list[int], torch.Tensor]:
    """What the fingerprint reads from one frozen tensor: its shape, and its first few values and its
    last, rounded to bfloat16."""
    flat = tensor.detach().reshape(-1)
    return list(tensor.shape), torch.cat([flat[:FINGERPRINT_HEAD], flat[-1:]]).to(torch.bfloat16)
