"""Resumable training state: what it takes to continue a run exactly where it stopped.

A checkpoint holds the trainable tensors (in BitFit, the biases: a few MB whatever the model
size), the optimizer's moments, the progress counters and the random-number state. The frozen
weights are not in it: they are reloaded from the base model, which never changes.
"""

import random
from pathlib import Path

import torch

from bitfit.checkpoint import atomic_write
from bitfit.errors import InputError

CHECKPOINT_FILE = "checkpoint.pt"
CHECKPOINT_FORMAT = "bitfit-checkpoint/1"


def save_training_state(output_dir, model, optimizer, config, progress: dict) -> None:
    state = {
        "format": CHECKPOINT_FORMAT,
        "config": config.to_dict(),
        "trainable": {name: param.detach().to("cpu", copy=True)
                      for name, param in model.named_parameters() if param.requires_grad},
        # The learning-rate schedule needs no state of its own: it is a function of the step.
        "optimizer": optimizer.state_dict(),
        "progress": dict(progress),
        # Dropout draws from torch's generators; the data order has its own seeded one, and
        # bitfit draws no numpy random numbers.
        "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
    }
    atomic_write(Path(output_dir) / CHECKPOINT_FILE, lambda tmp: torch.save(state, tmp))


def load_training_state(run_dir: str) -> dict:
    folder = Path(run_dir)
    if not folder.is_dir():
        raise InputError(f"--resume {run_dir}: no such run folder")
    path = folder / CHECKPOINT_FILE
    if not path.is_file():
        raise InputError(f"--resume {run_dir}: no {CHECKPOINT_FILE} in it; a run writes one with "
                         f"--save-every N or when stopped with Ctrl-C")
    try:
        # weights_only: a checkpoint is data (tensors, numbers, strings), never code to run.
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for a damaged file
        raise InputError(f"{path}: not a readable bitfit checkpoint ({type(error).__name__})") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise InputError(f"{path}: not a bitfit checkpoint")
    return state


def restore_training_state(state: dict, model, optimizer) -> dict:
    """Load the tensors, optimizer and RNG state into a freshly set-up run; return its progress."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in state["trainable"].items():
            params[name].copy_(tensor)
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"]["torch"])
    random.setstate(state["rng"]["python"])
    if state["rng"]["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return dict(state["progress"])
