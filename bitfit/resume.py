"""Resumable training state: what it takes to continue a run exactly where it stopped.

A checkpoint holds the trainable tensors (in BitFit, the biases: a few MB whatever the model
size), the optimizer's moments, the progress counters and the random-number state. The frozen
weights are not in it: they are reloaded from the base model, which never changes.

The training loop calls save_checkpoint_if_due after every optimizer step, inside StopOnCtrlC:
a checkpoint is written every --save-every steps, and when Ctrl-C asks the run to stop.
"""

import random
import signal
import threading
from pathlib import Path

import torch
from tqdm import tqdm

from bitfit.bias import trainable_parameters
from bitfit.checkpoint import atomic_write
from bitfit.distributed import any_rank
from bitfit.errors import InputError, Interrupted

CHECKPOINT_FILE = "checkpoint.pt"
CHECKPOINT_FORMAT = "bitfit-checkpoint/1"


def save_training_state(output_dir, model, optimizer, config, progress: dict) -> None:
    state = {
        "format": CHECKPOINT_FORMAT,
        "config": config.to_dict(),
        "trainable": {name: param.detach().to("cpu", copy=True)
                      for name, param in trainable_parameters(model).items()},
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
    progress = dict(state["progress"])
    if "padded_tokens" in progress:  # the name of tokens_with_padding in checkpoints written before it
        progress["tokens_with_padding"] = progress.pop("padded_tokens")
    return progress


def save_checkpoint_if_due(model, optimizer, config, progress: dict, *, total_steps: int, ctrl_c, device,
                           world) -> None:
    """After an optimizer step: write checkpoint.pt every --save-every steps and at the last step,
    or when Ctrl-C was pressed, and then stop the run with Interrupted."""
    step = progress["step"]
    last_step = step == total_steps
    stop = any_rank(ctrl_c.pressed, device)  # every rank stops at the same step
    save = stop or (config.save_every and (step % config.save_every == 0 or last_step))
    if save and world.is_main:  # the ranks hold the same state: one copy is enough
        save_training_state(config.output_dir, model, optimizer, config, progress)
    if stop and not last_step:
        raise Interrupted(f"checkpoint saved at optimizer step {step} of {total_steps} in "
                          f"{config.output_dir}; continue with: python train.py --resume "
                          f"{config.output_dir}")


class StopOnCtrlC:
    """While training, Ctrl-C asks for a stop after the current step (with a checkpoint);
    a second Ctrl-C stops at once."""

    def __enter__(self):
        self.pressed = False
        self.active = threading.current_thread() is threading.main_thread()  # signals need it
        if self.active:
            self.previous = signal.signal(signal.SIGINT, self._on_ctrl_c)
        return self

    def _on_ctrl_c(self, signum, frame):
        self.pressed = True
        signal.signal(signal.SIGINT, signal.default_int_handler)
        tqdm.write("Ctrl-C: stopping after this step and saving a checkpoint (press again to quit now)")

    def __exit__(self, *exc_info):
        if self.active:
            signal.signal(signal.SIGINT, self.previous)
